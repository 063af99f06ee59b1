"""`python -m bench.scoring`: what scoring a prompt costs over prefilling it, both in ONE process, timed in
alternating blocks (the ratio compares the two under the same machine state).

Each block runs, in rotated order, one request through the Scheduler (the serving loop's own path) that
(a) prefills the prompt and generates one token, and (b) does the same while scoring every prompt token
(prompt_logprobs=--top: what lm-evaluation-harness' `echo` + `logprobs: 1` + `max_tokens: 1` asks of /v1/completions).
The ratio is the median over blocks of b / a, in wall time and in the process's CPU time (steadier on a shared
machine); the goal is <= 1.2. Prints the BLAS kernel and our kernel variant.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local folder or Hub repo id (default: the random bf16 checkpoint of "
                                                 "TinyLlama's shape that `tinyllama bench` makes)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--blocks", type=int, default=6, help="alternating blocks (default 6)")
    p.add_argument("--top", type=int, default=1, help="alternatives per scored token (default 1, as lm-eval asks)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    for flag in ("prompt_len", "blocks"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.top < 0:
        p.error("--top must be >= 0")
    return args


def run_once(model, prompt: list[int], score: int | None) -> tuple[float, float]:
    """(wall, CPU) seconds for one request through a fresh Scheduler: prefill `prompt`, generate one token (greedy),
    scoring every prompt token with `score` alternatives unless None."""
    from engine.generation.scheduler import Scheduler
    from engine.generation.state import default_options

    scheduler = Scheduler(model)
    options = default_options(model, max_new_tokens=1, temperature=0, prompt_logprobs=score)
    started, cpu = time.perf_counter(), time.process_time()
    request = scheduler.submit(prompt, options)
    for _ in scheduler.run():
        pass
    elapsed = (time.perf_counter() - started, time.process_time() - cpu)
    if score is not None and len(request.result.prompt_logprobs) != len(prompt):
        raise RuntimeError("the scoring request did not score every prompt token")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import engine
    from bench.interleave import checkpoint
    from engine.runtime import native
    from engine.runtime.blas import blas_info

    folder = checkpoint(args.model)
    model = engine.load_model(folder)
    if args.prompt_len + 1 > model.config.max_position_embeddings:
        print(f"--prompt-len must leave room for one token in the {model.config.max_position_embeddings}-token window",
              file=sys.stderr)
        return 1
    prompt = [1] + [int(t) for t in np.random.default_rng(0).integers(3, model.config.vocab_size, args.prompt_len - 1)]
    kernels, blas = native.summary(), blas_info()
    print(f"model {folder} ({model.weights_dtype}), prompt {args.prompt_len} tokens, top {args.top}; kernels "
          f"{kernels['variant'] or 'none'} ({kernels['threads']} threads), BLAS {blas.get('library')} "
          f"{blas.get('kernel')}", flush=True)
    run_once(model, prompt[:32], None)  # warm-up: kernels built, caches touched
    run_once(model, prompt[:32], args.top)
    rows = []
    for block in range(args.blocks):
        order = [None, args.top] if block % 2 == 0 else [args.top, None]
        runs = {("score" if s is not None else "prefill"): run_once(model, prompt, s) for s in order}
        times = {"prefill": runs["prefill"][0], "score": runs["score"][0], "prefill_cpu": runs["prefill"][1],
                 "score_cpu": runs["score"][1]}
        times["ratio"] = times["score"] / times["prefill"]
        times["cpu_ratio"] = times["score_cpu"] / times["prefill_cpu"]
        rows.append(times)
        print(f"block {block + 1}: prefill {times['prefill']:.3f} s, score {times['score']:.3f} s, ratio "
              f"{times['ratio']:.3f} (CPU {times['prefill_cpu']:.2f} s, {times['score_cpu']:.2f} s, ratio "
              f"{times['cpu_ratio']:.3f})", flush=True)
    ratio = statistics.median(r["ratio"] for r in rows)
    cpu_ratio = statistics.median(r["cpu_ratio"] for r in rows)
    print(f"median ratio score / prefill: {ratio:.3f} wall, {cpu_ratio:.3f} CPU (goal <= 1.2)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"model": str(folder), "prompt_len": args.prompt_len, "top": args.top, "kernels": kernels,
                       "blas": blas, "blocks": rows, "median_ratio": ratio,
                       "median_cpu_ratio": cpu_ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
