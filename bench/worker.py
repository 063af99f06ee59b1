"""One benchmark subprocess: `python -m bench.worker run SPEC.json` times one system; `roofline` measures the machine.

Each system runs in its own process so its peak RSS is its own. Messages go to stdout as lines starting with MARK and
then JSON: {"event": "total" | "status" | "progress" | "rows" | "unavailable" | "error" | "roofline", ...}; anything
else a library prints there is ignored by the parent.
"""
from __future__ import annotations

from engine.runtime.blas import choose_openblas_kernel

choose_openblas_kernel()  # before NumPy loads, as `engine` does, so every worker runs the engine's BLAS kernel

# ruff: noqa: E402
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

MARK = "@@bench "
WARMUP_DECODE_STEPS = 2


def emit(event: str, **fields) -> None:
    sys.stdout.write(MARK + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def run_system(spec: dict) -> int:
    from bench.systems import Unavailable, describe, make_runner

    name, folder = spec["system"], spec["folder"]
    prompt_lens, batches = spec["prompt_lens"], spec["batches"]
    new_tokens, repeats = spec["new_tokens"], spec["repeats"]
    long_context = spec.get("long_context", 0)
    emit("total", units=1 + 1 + len(prompt_lens) * repeats + len(batches) * (1 + repeats) + (1 if long_context else 0))
    base = dict(describe(name), label=name, threads=spec["threads"], repeats=repeats, status="ok")
    rows: list[dict] = []
    try:
        import numpy as np

        from bench.systems import model_config

        runner = make_runner(name, folder, spec["threads"])
        config = model_config(folder)
        # the long-context run holds exactly `long_context` tokens (long_context_row); some slack, within the window
        runner.room = min(max(max(prompt_lens) + new_tokens + WARMUP_DECODE_STEPS, long_context) + 8,
                          config.get("max_position_embeddings", 2048))
        emit("status", what=f"{name}: preparing")
        runner.prepare()
        t0 = time.perf_counter()
        runner.load()
        load_s = time.perf_counter() - t0
        emit("progress", what=f"{name}: loaded in {load_s:.1f} s")
        info = runner.info()
        base.update(load_s=load_s, weight_bytes=runner.weight_bytes, decode_bytes=runner.decode_bytes,
                    weight_count=runner.weight_count,
                    blas_kernel=info.pop("kernel"), info=info)
        if getattr(runner, "dtype", None):  # the engine holds what the checkpoint and its kernels allow
            base["dtype"] = runner.dtype
        if getattr(runner, "decode_bytes", None):
            base["decode_bytes"] = runner.decode_bytes
        vocab = config["vocab_size"]
        ids = [int(t) for t in np.random.default_rng(0).integers(3, vocab, size=max(max(prompt_lens), long_context))]

        runner.prefill(ids[: prompt_lens[0]])  # warm-up
        emit("progress", what=f"{name}: warm-up")
        for p in prompt_lens:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                runner.prefill(ids[:p])
                times.append(time.perf_counter() - t0)
                emit("progress", what=f"{name}: prefill {p}")
            t_med, t_min, t_max = spread(times)
            rows.append(dict(base, kind="prefill", batch=1, prompt_tokens=p, new_tokens=0,
                             prefill_tok_s=p / t_med, prefill_tok_s_min=p / t_max, prefill_tok_s_max=p / t_min,
                             ttft_s=t_med, ttft_s_min=t_min, ttft_s_max=t_max,
                             decode_tok_s=None, decode_tok_s_min=None, decode_tok_s_max=None))

        p = prompt_lens[0]
        for b in batches:
            runner.decode_setup(b, ids[:p])
            for _ in range(WARMUP_DECODE_STEPS):
                runner.decode_step()
            emit("progress", what=f"{name}: batch {b} prefilled")
            now = {} if b != 1 else {"read_gbs_now": read_bandwidth_now(spec["threads"], spec.get("quick", False))}
            rates = []
            for _ in range(repeats):
                runner.decode_reset()
                t0 = time.perf_counter()
                for _ in range(new_tokens):
                    runner.decode_step()
                rates.append(b * new_tokens / (time.perf_counter() - t0))
                emit("progress", what=f"{name}: decode batch {b}")
            r_med, r_min, r_max = spread(rates)
            rows.append(dict(base, kind="decode", batch=b, prompt_tokens=p, new_tokens=new_tokens,
                             prefill_tok_s=None, prefill_tok_s_min=None, prefill_tok_s_max=None,
                             ttft_s=None, ttft_s_min=None, ttft_s_max=None,
                             decode_tok_s=r_med, decode_tok_s_min=r_min, decode_tok_s_max=r_max, **now))
        if long_context:
            rows.append(dict(base, **long_context_row(runner, ids, long_context, new_tokens, repeats)))
            emit("progress", what=f"{name}: context {long_context}")
        if spec.get("speculate") and hasattr(runner, "speculative"):
            emit("status", what=f"{name}: speculative decoding")
            source = spec.get("draft", "lookup")
            spec_rows = [runner.speculative(ids[:p], new_tokens, spec["speculate"], source) for _ in range(repeats)]
            rates = [r["speculative_tok_s"] for r in spec_rows]
            plain = [r["plain_tok_s"] for r in spec_rows]
            r_med, r_min, r_max = spread(rates)
            rows.append(dict(base, kind="speculative", batch=1, prompt_tokens=spec_rows[0]["prompt_tokens"],
                             new_tokens=new_tokens, prefill_tok_s=None, ttft_s=None, decode_tok_s=r_med,
                             decode_tok_s_min=r_min, decode_tok_s_max=r_max, plain_decode_tok_s=spread(plain)[0],
                             plain_decode_tok_s_min=min(plain), plain_decode_tok_s_max=max(plain),
                             speedup=r_med / spread(plain)[0], draft_tokens=spec["speculate"],
                             acceptance_rate=spread([r["acceptance_rate"] for r in spec_rows])[0],
                             step_s=min(r["step_s"] for r in spec_rows),
                             verify_step_s=min(r["verify_step_s"] for r in spec_rows), draft=source,
                             draft_step_s=min((r["draft_step_s"] for r in spec_rows if "draft_step_s" in r),
                                              default=None),
                             draft_steps=sum(r["draft_steps"] for r in spec_rows),
                             plain_steps=sum(r["plain_steps"] for r in spec_rows)))
    except Unavailable as e:
        emit("unavailable", row=dict(base, status="unavailable", note=str(e)))
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent as one line, the traceback on stderr
        traceback.print_exc()
        message = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        for row in rows:
            row["peak_rss_bytes"] = peak_rss_bytes()
        emit("error", rows=rows, row=dict(base, status="error", note=message, peak_rss_bytes=peak_rss_bytes()))
        return 1
    for row in rows:
        row["peak_rss_bytes"] = peak_rss_bytes()
    emit("rows", rows=rows)
    return 0


def read_bandwidth_now(threads: int, quick: bool) -> float:
    """The memory read rate (GB/s, bench.roofline.read_bandwidth) just before a batch-1 decode is timed: its floor is
    taken from this, since this machine's bandwidth drifts by tens of percent over minutes (33-60 GB/s seen). Read
    in a child process, so its array (512 MB) does not count in this system's peak RSS."""
    code = ("import sys; from bench.roofline import read_bandwidth; "
            "print(read_bandwidth(int(sys.argv[1]), int(sys.argv[2]), trials=3)['read_gbs'])")
    done = subprocess.run([sys.executable, "-c", code, str((128 if quick else 512) << 20), str(threads)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class RssSampler:
    """The largest resident memory of this process while the `with` block runs (sampled every 5 ms)."""

    def __enter__(self):
        import threading

        self.before = self.peak = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, current_rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def long_context_row(runner, ids: list[int], context: int, new_tokens: int, repeats: int) -> dict:
    """Batch-1 decode with the cache holding ~`context` tokens, and the memory the prefill of them added (peak RSS
    during it minus RSS before: activations, attention scratch, KV cache)."""
    prompt = ids[: context - new_tokens - WARMUP_DECODE_STEPS]
    with RssSampler() as rss:
        runner.decode_setup(1, prompt)
    for _ in range(WARMUP_DECODE_STEPS):
        runner.decode_step()
    rates = []
    for _ in range(repeats):
        runner.decode_reset()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            runner.decode_step()
        rates.append(new_tokens / (time.perf_counter() - t0))
    r_med, r_min, r_max = spread(rates)
    return dict(kind="long_context", batch=1, prompt_tokens=len(prompt), new_tokens=new_tokens,
                context_tokens=len(prompt) + WARMUP_DECODE_STEPS + new_tokens, prefill_tok_s=None, ttft_s=None, decode_tok_s=r_med,
                decode_tok_s_min=r_min, decode_tok_s_max=r_max, prefill_added_bytes=max(0, rss.peak - rss.before))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict | None:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "memory_bytes": torch.cuda.get_device_properties(0).total_memory}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "torch", "transformers", "triton", "llama-cpp-python"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run_roofline(threads: int, quick: bool) -> int:
    from bench.roofline import measure
    from engine.runtime.blas import blas_info

    roof = measure(threads, quick=quick)
    blas = blas_info()
    emit("roofline", machine={
        "cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
        "blas": blas, "blas_kernel": blas.get("kernel"), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "gpu": gpu_info(), "threads": threads, "versions": versions(), "roofline": roof})
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["run"] and len(argv) == 2:
        with open(argv[1], encoding="utf-8") as f:
            return run_system(json.load(f))
    if argv[:1] == ["roofline"] and len(argv) in (2, 3):
        return run_roofline(int(argv[1]), quick=argv[2:] == ["--quick"])
    if argv[:1] == ["checkpoint"] and len(argv) in (2, 3):
        from bench.checkpoints import QUICK_SHAPE, TINYLLAMA_SHAPE, random_checkpoint

        shape = {"quick": QUICK_SHAPE, "tinyllama": TINYLLAMA_SHAPE}[argv[1]]
        emit("checkpoint", folder=str(random_checkpoint(shape, argv[2] if len(argv) == 3 else "bfloat16")))
        return 0
    print("usage: python -m bench.worker run SPEC.json | roofline THREADS [--quick] | checkpoint quick|tinyllama "
          "[DTYPE]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
