"""`python -m bench.interleave`: batch-1 decode of several systems loaded in ONE process, timed in alternating blocks,
so every ratio compares the systems under the same memory-bandwidth spell.

`tinyllama bench` runs each system in its own process, minutes apart; this machine's read rate drifts between 33 and
60 GB/s within minutes, so there a batch-1 ratio compares the spells as much as the code. Here each block times
`--tokens` greedy decode steps of every system back to back (the order rotated per block), and a ratio is the median
over blocks of the per-block ratio. Same runners as `tinyllama bench` (bench.systems); one engine kernel variant per
process (the variant is chosen when the kernels load).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from engine.errors import EngineError

DEFAULT_SYSTEMS = "engine-numpy,llama.cpp-f16,llama.cpp-f32"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.interleave", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local folder, Hub repo id or GGUF file (a GGUF: system `llama.cpp` "
                                                 "runs the same file; default: the random bf16 checkpoint of "
                                                 "TinyLlama's shape that `tinyllama bench` makes)")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"comma-separated, as in tinyllama bench; ratios are "
                                                              f"against the first (default {DEFAULT_SYSTEMS})")
    p.add_argument("--blocks", type=int, default=8, help="alternating blocks (default 8)")
    p.add_argument("--tokens", type=int, default=16, help="decode steps timed per system per block (default 16)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before decoding (default 128)")
    p.add_argument("--threads", type=int, default=2, help="threads per system (default 2)")
    p.add_argument("--speculate", type=int, default=4, metavar="N",
                   help="most draft tokens per step of a speculating system (engine-numpy-draft-int8, "
                        "engine-numpy-draft-int4, engine-numpy-draft-lookup, engine-numpy-draft-int8+lookup; "
                        "engine-numpy-draft-none is the same loop without speculation; default 4)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    for flag in ("blocks", "tokens", "prompt_len", "threads", "speculate"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def checkpoint(model: str | None) -> str:
    """The checkpoint folder (or GGUF file), as `tinyllama bench` resolves it: --model, or the cached random bf16
    checkpoint of TinyLlama's shape (made once, in a worker process)."""
    from bench.run import resolve_checkpoint

    with tempfile.TemporaryDirectory() as logs:
        return str(resolve_checkpoint(model, None, False, dict(os.environ), Path(logs)))


def check_systems(names: list[str]) -> None:
    """One engine kernel variant per process, known system names, no repeats."""
    from bench.systems import ENGINE_BACKENDS, engine_parts

    if len(set(names)) != len(names) or not names:
        raise EngineError(f"--systems needs distinct names, got {','.join(names) or 'none'}")
    isas = {engine_parts(n)[1] for n in names if n.startswith("engine-")}
    if len(isas) > 1:
        raise EngineError("one engine kernel variant per process: the variant is chosen when the kernels load "
                          f"(got {', '.join(sorted(str(i or 'auto') for i in isas))})")
    for n in names:
        family = n.partition("-")[0]
        if family not in ("engine", "transformers", "llama.cpp") or (family == "engine"
                                                                    and engine_parts(n)[0] not in ENGINE_BACKENDS):
            raise EngineError(f"unknown system {n!r} (see tinyllama bench --help)")


def time_block(runner, tokens: int, cpu: list | None = None) -> float:
    """Decode tok/s of `tokens` greedy batch-1 steps from the prompt (one untimed step first: pools wake up); a
    speculating runner times `tokens` tokens of its own decoding (`decode_block`). `cpu`: a list that gets the
    tokens per second of this process's CPU time over the block (every thread's; a speculating runner's includes its
    first token's step), a figure other processes' load disturbs less than the wall clock."""
    c0 = time.process_time()
    if hasattr(runner, "decode_block"):
        rate = tokens / runner.decode_block(tokens)
    else:
        runner.decode_reset()
        runner.decode_step()
        t0 = time.perf_counter()
        for _ in range(tokens):
            runner.decode_step()
        rate = tokens / (time.perf_counter() - t0)
    if cpu is not None:
        cpu.append(tokens / max(time.process_time() - c0, 1e-9))
    return rate


def interleave(runners: dict, blocks: int, tokens: int, progress=None,
               cpu: dict | None = None) -> dict[str, list[float]]:
    """{name: [tok/s per block]}: every block times each runner once, the order rotated block by block; `cpu`: a
    dict that gets {name: [tok/s of CPU time per block]}."""
    names = list(runners)
    rates: dict[str, list[float]] = {n: [] for n in names}
    if cpu is not None:
        cpu.update({n: [] for n in names})
    for b in range(blocks):
        for n in names[b % len(names):] + names[: b % len(names)]:
            rates[n].append(time_block(runners[n], tokens, None if cpu is None else cpu[n]))
        if progress:
            progress(b + 1, {n: r[-1] for n, r in rates.items()})
    return rates


def summarize(rates: dict[str, list[float]], decode_bytes: dict[str, int]) -> dict:
    """Per system the median/min/max tok/s and GB read per second at its median; per system after the first, the
    median over blocks of its rate divided by the first system's rate in the same block."""
    names = list(rates)
    base = names[0]
    out = {"systems": {}, "ratios_to": base}
    for n in names:
        med = statistics.median(rates[n])
        out["systems"][n] = {"tok_s": rates[n], "median_tok_s": med, "min_tok_s": min(rates[n]),
                             "max_tok_s": max(rates[n]), "decode_bytes": decode_bytes.get(n),
                             "read_gbs_at_median": med * decode_bytes[n] / 1e9 if decode_bytes.get(n) else None,
                             "ratio": statistics.median(a / b for a, b in zip(rates[n], rates[base]))}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np

    from bench.systems import Unavailable, make_runner, model_config
    from weights.errors import CheckpointError

    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    try:
        check_systems(names)
        folder = checkpoint(args.model)
        vocab = model_config(folder)["vocab_size"]
        ids = [int(t) for t in np.random.default_rng(0).integers(3, vocab, size=args.prompt_len)]
        runners, decode_bytes = {}, {}
        for n in names:
            r = make_runner(n, folder, args.threads)
            r.room = args.prompt_len + args.tokens + 8
            if hasattr(r, "speculate"):
                r.speculate = args.speculate
            r.prepare()
            r.load()
            r.decode_setup(1, ids)
            runners[n] = r
            decode_bytes[n] = getattr(r, "decode_bytes", None)
            print(f"loaded {n}: {r.info().get('kernel')}", file=sys.stderr)
    except (EngineError, CheckpointError, Unavailable, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cpu: dict[str, list[float]] = {}
    rates = interleave(runners, args.blocks, args.tokens, progress=lambda b, last: print(
        f"block {b}: " + ", ".join(f"{n} {v:.1f}" for n, v in last.items()), file=sys.stderr), cpu=cpu)
    result = summarize(rates, decode_bytes)
    base = names[0]
    for n in names:  # the same ratio over CPU time: this process's work per token, less disturbed by other load
        result["systems"][n]["cpu_tok_s"] = cpu[n]
        result["systems"][n]["cpu_ratio"] = statistics.median(a / b for a, b in zip(cpu[n], cpu[base]))
    result.update(load_average=os.getloadavg(), model=folder, blocks=args.blocks, tokens=args.tokens, prompt_len=args.prompt_len,
                  threads=args.threads, kernels={n: r.info().get("kernel") for n, r in runners.items()},
                  speculation={n: {k: r.info().get(k) for k in ("draft", "speculate", "acceptance_rate",
                                                                 "identical_tokens", "draft_steps", "plain_steps")}
                               for n, r in runners.items() if hasattr(r, "decode_block")})
    base = result["ratios_to"]
    print(f"batch-1 decode, {args.blocks} alternating blocks of {args.tokens} tokens after {args.prompt_len} "
          f"(median [min-max] tok/s; ratio = median of per-block ratios to {base}; cpu: the same over this "
          f"process's CPU time; load average {os.getloadavg()[0]:.1f})")
    for n, s in result["systems"].items():
        gbs = f"{s['read_gbs_at_median']:.1f} GB/s" if s["read_gbs_at_median"] else "-"
        info = result["speculation"].get(n)
        kept = f", {100 * info['acceptance_rate']:.0f}% of drafts kept" if info and info["acceptance_rate"] else ""
        if info:
            kept += f", {info['draft_steps']} drafting / {info['plain_steps']} plain steps"
        print(f"{n:<28} {s['median_tok_s']:6.1f} [{s['min_tok_s']:.1f}-{s['max_tok_s']:.1f}]  {gbs:>10}  "
              f"{s['ratio']:.2f}x  cpu {s['cpu_ratio']:.2f}x  ({result['kernels'][n]}{kept})")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
