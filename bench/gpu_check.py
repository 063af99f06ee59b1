"""GPU check of the Triton backend on TinyLlama-shaped random bf16 weights: correctness against transformers and
speed against the device's own yardsticks. For a machine with an NVIDIA GPU:

    python -m bench.gpu_check [--out DIR] [--quick]
    python -m bench.gpu_check --plan [--context N]     (no GPU: the targets below, see bench/gpu_plan.py)

  (a) correctness: prompt logits vs transformers LlamaForCausalLM in bf16 on the same GPU (max |diff|; the fp32
      reference shows how far bf16 itself is from exact), 32 greedy tokens: agreement with transformers' greedy
      run and, teacher-forced, with transformers' argmax on our sequence;
  (b) yardsticks: device copy bandwidth (a 1 GiB torch copy, best of 5, read + written bytes counted) and bf16 matmul
      peak (torch.matmul 8192^3, best of 5); torch is only the ruler here;
  (c) decode at batch 1 with CUDA graphs: tok/s, the floor (weight bytes / copy bandwidth) and % of it; the same
      without graphs; transformers bf16 decode (its KV cache, no torch.compile) tok/s on the same GPU and the ratio;
  (d) decode at batch 32: aggregate tok/s;
  (e) prefill of 2048 tokens: TFLOP/s (2 * matmul params * tokens + causal attention flops) vs the matmul peak.

Writes DIR/gpu_check-<device>.json (default DIR: the current folder; rewritten after every section, so a crash keeps
what was measured) and prints a summary. Exit status: 0, or 2 when a section failed (its traceback is in the JSON's
"errors"), or 1 with a one-line message when there is no CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

from bench.gpu_plan import attention_flops, matmul_params, prefill_flops  # noqa: F401 (the counts results use)
from engine.compare import transformers_step

NO_GPU_MESSAGE = "gpu_check: no CUDA GPU available (torch.cuda.is_available() is False); run it on a machine with one"
GiB = 1 << 30
DEVICE = "cuda"  # where transformers runs and what gets synchronised (tests point it at "cpu")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# ---- yardsticks --------------------------------------------------------------------------------------------------

def _best_ms(fn, trials: int = 5, warmup: int = 1) -> float:
    """Best wall time of fn() in milliseconds, timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def copy_bandwidth(nbytes: int = GiB, trials: int = 5) -> dict:
    """dst.copy_(src) of `nbytes`: each byte is read once and written once, so 2 * nbytes move per copy."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.fill_(1)
    ms = _best_ms(lambda: dst.copy_(src), trials)
    src = dst = None  # noqa: F841 - free the 2 GiB before the model loads
    torch.cuda.empty_cache()
    return {"bytes_copied": nbytes, "bytes_moved": 2 * nbytes, "best_ms": ms, "gb_per_s": 2 * nbytes / ms / 1e6}


def matmul_peak(n: int = 8192, trials: int = 5) -> dict:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _best_ms(lambda: torch.matmul(a, b), trials)
    return {"n": n, "dtype": "bfloat16", "best_ms": ms, "tflop_per_s": 2 * n**3 / ms / 1e9}


# ---- the engine and the reference ----------------------------------------------------------------------------------

def weight_bytes(backend) -> int:
    """Bytes one decode step streams: every layer matrix and norm, the final norm and lm_head (the embedding is
    gathered, a few rows, unless it is also the lm_head)."""
    tensors = [backend.lm_head, backend.final_norm]
    for layer in backend.layers:
        tensors += [layer.attn_norm, layer.wqkv, layer.wo, layer.mlp_norm, layer.w_gate_up, layer.w_down]
    return sum(t.numel() * t.element_size() for t in tensors)


def _sync():
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def decode_rate(backend, batch: int, prompt_len: int, steps: int, warmup: int = 4, seed: int = 0) -> dict:
    """Prefill `batch` random prompts, then `steps` timed decode steps feeding each sequence its argmax (the host
    round trip included, as in generation). Returns tok/s per sequence and aggregate."""
    import numpy as np

    from engine.runtime.batch import SequenceStep

    rng = np.random.default_rng(seed)
    vocab = backend.config.vocab_size
    caches = [backend.new_cache() for _ in range(batch)]
    logits = backend.forward([SequenceStep(c, rng.integers(3, vocab, prompt_len)) for c in caches])
    nxt = [int(np.argmax(row[-1])) for row in logits]
    for _ in range(warmup):  # captures the bucket's graph, warms the allocator
        logits = backend.forward([SequenceStep(c, [t]) for c, t in zip(caches, nxt)])
        nxt = [int(np.argmax(row[-1])) for row in logits]
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = backend.forward([SequenceStep(c, [t]) for c, t in zip(caches, nxt)])
        nxt = [int(np.argmax(row[-1])) for row in logits]
    _sync()
    seconds = time.perf_counter() - t0
    return {"batch": batch, "prompt_tokens": prompt_len, "steps": steps, "seconds": seconds,
            "tok_per_s_per_sequence": steps / seconds, "tok_per_s_aggregate": batch * steps / seconds,
            "ms_per_step": 1e3 * seconds / steps}


def prefill_rate(backend, tokens: int, trials: int = 3) -> dict:
    import numpy as np

    from engine.runtime.batch import SequenceStep

    ids = np.random.default_rng(1).integers(3, backend.config.vocab_size, tokens)
    backend.forward([SequenceStep(backend.new_cache(), ids)])  # compile every GEMM / attention config
    best = float("inf")
    for _ in range(trials):
        cache = backend.new_cache()
        _sync()
        t0 = time.perf_counter()
        backend.forward([SequenceStep(cache, ids)])  # returns host logits: the step is finished
        best = min(best, time.perf_counter() - t0)
        del cache
    flops = prefill_flops(backend.config, tokens)
    return {"tokens": tokens, "best_s": best, "tok_per_s": tokens / best, "flops": flops,
            "tflop_per_s": flops / best / 1e12}


def _empty_cache():
    import torch

    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def hf_model(folder, dtype_name: str):
    import torch
    import transformers

    dtype = getattr(torch, dtype_name)
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    model = transformers.LlamaForCausalLM.from_pretrained(folder, **{key: dtype})
    model = model.to(device=DEVICE, dtype=dtype).eval()
    return model


def hf_prompt_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)], device=DEVICE)).logits[0].float().cpu().numpy()


def hf_greedy(model, ids, n: int) -> list[int]:
    """n greedy tokens with transformers' own KV cache (EOS not special)."""
    import torch

    out = []
    with torch.no_grad():
        res, cache = transformers_step(model, torch.tensor([list(ids)], device=DEVICE))
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res, cache = transformers_step(model, torch.tensor([[tok]], device=DEVICE), cache)
    return out


def hf_decode_rate(model, prompt_len: int, steps: int, warmup: int = 4) -> dict:
    import numpy as np
    import torch

    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, prompt_len)
    with torch.no_grad():
        res, cache = transformers_step(model, torch.tensor([ids.tolist()], device=DEVICE))
        tok = int(res.logits[0, -1].argmax())
        for i in range(warmup + steps):
            if i == warmup:
                _sync()
                t0 = time.perf_counter()
            res, cache = transformers_step(model, torch.tensor([[tok]], device=DEVICE), cache)
            tok = int(res.logits[0, -1].argmax())  # a host sync per token, as in our loop
        _sync()
    seconds = time.perf_counter() - t0
    return {"batch": 1, "prompt_tokens": prompt_len, "steps": steps, "seconds": seconds,
            "tok_per_s_per_sequence": steps / seconds, "attn_implementation": model.config._attn_implementation}


def hf_prefill_rate(model, tokens: int, trials: int = 3) -> dict:
    import numpy as np
    import torch

    import inspect

    ids = torch.tensor([np.random.default_rng(1).integers(3, model.config.vocab_size, tokens).tolist()], device=DEVICE)
    params = inspect.signature(model.forward).parameters
    keep = {name: 1 for name in ("logits_to_keep", "num_logits_to_keep") if name in params}  # lm_head on 1 row
    keep = dict(list(keep.items())[:1])
    best = float("inf")
    with torch.no_grad():
        for i in range(trials + 1):
            _sync()
            t0 = time.perf_counter()
            model(ids, **keep)
            _sync()
            if i:
                best = min(best, time.perf_counter() - t0)
    return {"tokens": tokens, "best_s": best, "tok_per_s": tokens / best}


def correctness(model, folder, prompt_len: int, n_greedy: int) -> dict:
    """Ours (bf16) vs transformers bf16 and fp32 on one prompt, and greedy agreement."""
    import numpy as np

    ids = np.random.default_rng(2).integers(3, model.config.vocab_size, prompt_len).tolist()
    ours = model.logits(ids)
    ours_greedy = model.generate(ids, max_new_tokens=n_greedy, temperature=0.0, ignore_eos=True)
    ref = hf_model(folder, "bfloat16")
    ref_bf16 = hf_prompt_logits(ref, ids)
    ref_greedy = hf_greedy(ref, ids, n_greedy)
    forced = hf_prompt_logits(ref, ids + ours_greedy[:-1])[len(ids) - 1:].argmax(axis=-1).tolist()
    del ref
    _empty_cache()
    ref32 = hf_model(folder, "float32")
    ref_fp32 = hf_prompt_logits(ref32, ids)
    del ref32
    _empty_cache()
    first_diff = next((i for i, (a, b) in enumerate(zip(ours_greedy, ref_greedy)) if a != b), None)
    return {
        "prompt_tokens": prompt_len,
        "max_abs_logit": float(np.abs(ref_fp32).max()),
        "max_abs_diff_vs_hf_bf16": float(np.abs(ours - ref_bf16).max()),
        "max_abs_diff_vs_hf_fp32": float(np.abs(ours - ref_fp32).max()),
        "hf_bf16_max_abs_diff_vs_hf_fp32": float(np.abs(ref_bf16 - ref_fp32).max()),
        "argmax_agreement_vs_hf_bf16": float(np.mean(ours.argmax(-1) == ref_bf16.argmax(-1))),
        "greedy_tokens": n_greedy,
        "greedy_equal_to_hf_bf16": ours_greedy == ref_greedy,
        "greedy_first_divergence": first_diff,
        "greedy_teacher_forced_agreement": float(np.mean(np.array(forced) == np.array(ours_greedy))),
        "ours_greedy": ours_greedy,
        "hf_greedy": ref_greedy,
    }


# ---- main ------------------------------------------------------------------------------------------------------

def run(out_dir: Path, quick: bool = False) -> dict:
    """Every measurement; a section that fails records its error and the rest still run. Returns the results."""
    import traceback

    import torch
    import triton

    import engine
    from bench.checkpoints import TINYLLAMA_SHAPE, random_checkpoint

    steps = 32 if quick else 128
    props = torch.cuda.get_device_properties(0)
    results: dict = {
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / GiB, 1),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "shape": TINYLLAMA_SHAPE, "weights_dtype": "bfloat16", "errors": {},
        "notes": {
            "floor": "decode floor = copy bandwidth (read+write bytes / time) / bytes of weights streamed per step "
                     "(layers, final norm, lm_head; KV reads at 128-256 positions are < 1% and not counted)",
            "prefill_flops": "2 * decoder matmul params * tokens + 2 * hidden * vocab (lm_head, last row only) "
                             "+ causal attention 4 * layers * heads * head_dim * T(T+1)/2",
            "transformers": "LlamaForCausalLM bf16 on the same GPU, its own KV cache, no torch.compile",
        },
    }
    slug = re.sub(r"[^A-Za-z0-9]+", "-", results["device"]).strip("-").lower()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_check-{slug}.json"

    def log(msg):
        print(f"[gpu_check] {msg}", flush=True)

    def section(name, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - record and go on: one run should bring back all it can
            results["errors"][name] = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]
            log(f"{name} FAILED: {type(e).__name__}: {e}")
            return None
        finally:
            path.write_text(json.dumps(results, indent=2, default=str))  # partial results survive a crash

    log(f"device {results['device']}; making/reading the random TinyLlama-shaped bf16 checkpoint")
    folder = random_checkpoint(TINYLLAMA_SHAPE, dtype="bfloat16")
    results["checkpoint"] = str(folder)

    bw = results["copy_bandwidth"] = section("copy_bandwidth", copy_bandwidth)
    peak = results["matmul_peak"] = section("matmul_peak", matmul_peak)
    if bw and peak:
        log(f"copy {bw['gb_per_s']:.0f} GB/s, bf16 matmul {peak['tflop_per_s']:.0f} TFLOP/s")

    model = engine.load_model(str(folder), backend="triton", dtype="bfloat16")  # cuda_graphs on by default
    backend = model.backend
    results["capture"] = backend.capture
    corr = results["correctness"] = section("correctness", lambda: correctness(model, folder, 64, 32))
    if corr:
        log(f"max |logit diff| vs transformers bf16 {corr['max_abs_diff_vs_hf_bf16']:.4f} (transformers bf16 vs "
            f"fp32 {corr['hf_bf16_max_abs_diff_vs_hf_fp32']:.4f}, ours vs fp32 {corr['max_abs_diff_vs_hf_fp32']:.4f});"
            f" greedy equal {corr['greedy_equal_to_hf_bf16']}, teacher-forced agreement "
            f"{corr['greedy_teacher_forced_agreement']:.2f}")

    def decode1():
        d = decode_rate(backend, batch=1, prompt_len=128, steps=steps)
        d["weight_bytes"] = wbytes = weight_bytes(backend)
        if bw:
            d["floor_tok_per_s"] = floor = bw["gb_per_s"] * 1e9 / wbytes
            d["percent_of_floor"] = 100 * d["tok_per_s_per_sequence"] / floor
            log(f"decode b=1 (graphs) {d['tok_per_s_per_sequence']:.1f} tok/s = {d['percent_of_floor']:.0f}% of the "
                f"{floor:.0f} tok/s floor")
        d["graph_captures"], d["graph_replays"] = backend.stats["graph_captures"], backend.stats["graph_replays"]
        return d

    d1 = results["decode_batch1_cuda_graphs"] = section("decode_batch1_cuda_graphs", decode1)
    d32 = results["decode_batch32_cuda_graphs"] = section(
        "decode_batch32_cuda_graphs", lambda: decode_rate(backend, batch=32, prompt_len=128, steps=steps // 2))
    if d32:
        log(f"decode b=32 (graphs) {d32['tok_per_s_aggregate']:.0f} tok/s aggregate")

    def prefill():
        pf = prefill_rate(backend, 2048)
        if peak:
            pf["percent_of_matmul_peak"] = 100 * pf["tflop_per_s"] / peak["tflop_per_s"]
        log(f"prefill 2048: {pf['best_s'] * 1e3:.0f} ms, {pf['tflop_per_s']:.0f} TFLOP/s "
            f"({pf.get('percent_of_matmul_peak', float('nan')):.0f}% of the matmul peak)")
        return pf

    pf = results["prefill_2048"] = section("prefill_2048", prefill)
    results["backend_stats"] = dict(backend.stats)
    model = backend = None  # free the device weights, pool and graphs before the next model loads
    torch.cuda.empty_cache()

    def eager_decode():
        eager = engine.load_model(str(folder), backend="triton", dtype="bfloat16", cuda_graphs=False).backend
        d = decode_rate(eager, batch=1, prompt_len=128, steps=steps // 2)
        log(f"decode b=1 without graphs {d['tok_per_s_per_sequence']:.1f} tok/s")
        return d

    results["decode_batch1_no_graphs"] = section("decode_batch1_no_graphs", eager_decode)
    torch.cuda.empty_cache()

    def reference():
        ref = hf_model(folder, "bfloat16")
        hd = results["hf_decode_batch1"] = hf_decode_rate(ref, prompt_len=128, steps=steps)
        hp = results["hf_prefill_2048"] = hf_prefill_rate(ref, 2048)
        if d1:
            results["decode_batch1_speedup_vs_hf"] = d1["tok_per_s_per_sequence"] / hd["tok_per_s_per_sequence"]
            log(f"transformers bf16 decode b=1 {hd['tok_per_s_per_sequence']:.1f} tok/s; ours "
                f"x{results['decode_batch1_speedup_vs_hf']:.2f}")
        if pf:
            results["prefill_2048_speedup_vs_hf"] = hp["best_s"] / pf["best_s"]
            log(f"transformers prefill 2048 {hp['best_s'] * 1e3:.0f} ms; "
                f"ours x{results['prefill_2048_speedup_vs_hf']:.2f}")

    section("transformers_speed", reference)
    log(f"wrote {path}" + (f" ({len(results['errors'])} section(s) failed)" if results["errors"] else ""))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_check-<device>.json (default: .)")
    p.add_argument("--quick", action="store_true", help="fewer decode steps")
    p.add_argument("--plan", action="store_true",
                   help="no GPU needed: print the targets (bytes per decode step per kernel, decode floors, prefill "
                        "ceilings) for TinyLlama bf16 on an H100 and an A100, from the backend's recorded launches")
    p.add_argument("--context", type=int, default=256,
                   help="--plan: cached positions per sequence in the decode step (default 256: a 128-token prompt "
                        "and 128 new tokens, as the measured decode runs)")
    args = p.parse_args(argv)
    if args.plan:
        from bench.gpu_plan import format_plan, plan

        print(format_plan(plan(args.context)), flush=True)
        return 0
    if not cuda_available():
        print(NO_GPU_MESSAGE, flush=True)
        return 1
    results = run(args.out, quick=args.quick)
    return 2 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
