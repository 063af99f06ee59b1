"""`python -m bench.speculation`: what self-speculative decoding costs and gives at batch 1, measured in one process.

The 16-bit model and its quantized copies (int8, int4) are loaded side by side; in alternating rounds it times, after
the same prompt, a plain decode step of the model (1 token), a verification step of 1 + k tokens (every row's
logits) for each k, and a decode step of each draft model. From the medians it gives, for a per-token agreement p
between draft and model, the expected speed-up of greedy speculation with k drafts per step over plain decoding:
tokens per step (1 - p^(k+1)) / (1 - p), against the cost of k draft steps and one verification of k + 1 rows, in
plain steps. With `--measure N` it also decodes N tokens for real with each draft (the output checked identical to
plain decoding) and reports the agreement and tokens/s it got.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.speculation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the random bf16 checkpoint of TinyLlama's "
                                                 "shape that `tinyllama bench` makes)")
    p.add_argument("--drafts", default="int8,int4", help="draft kinds (default int8,int4)")
    p.add_argument("--k", default="1,2,3,4,6,8", help="draft lengths to cost (default 1,2,3,4,6,8)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (default 5)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--agreement", default="0.85,0.9,0.95,0.97", help="per-token agreements to give speed-ups for")
    p.add_argument("--measure", type=int, default=0, metavar="N",
                   help="also decode N greedy tokens with each draft and with plain decoding (default 0: skip)")
    p.add_argument("--speculate", type=int, default=4, help="draft length of the --measure runs (default 4)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def expected_speedup(p: float, k: int, draft_cost: float, verify_cost: float) -> float:
    """Tokens per plain-step of work: (1 - p^(k+1)) / (1 - p) tokens per round over k draft steps + 1 verification
    (costs in plain steps)."""
    tokens = k + 1 if p >= 1 else (1 - p ** (k + 1)) / (1 - p)
    return tokens / (k * draft_cost + verify_cost)


def timed(model, cache, tokens, all_logits) -> float:
    from engine.runtime.batch import SequenceStep

    length = cache.length
    t0 = time.perf_counter()
    model.forward([SequenceStep(cache, tokens, all_logits=all_logits)])
    dt = time.perf_counter() - t0
    cache.truncate(length)
    return dt


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np

    import engine
    from bench.interleave import checkpoint

    folder = checkpoint(args.model)
    drafts = [d.strip() for d in args.drafts.split(",") if d.strip()]
    ks = [int(k) for k in args.k.split(",")]
    t0 = time.perf_counter()
    model = engine.load_model(folder)
    copies = {d: model.draft_model(d) for d in drafts}
    print(f"loaded {folder} ({model.weights_dtype}) and {', '.join(drafts)} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    ids = [int(t) for t in np.random.default_rng(0).integers(3, model.config.vocab_size, args.prompt_len)]
    caches = {name: m.new_cache() for name, m in [("model", model)] + list(copies.items())}
    for name, m in [("model", model)] + list(copies.items()):
        from engine.runtime.batch import SequenceStep

        m.forward([SequenceStep(caches[name], ids)])
    times: dict[str, list[float]] = {}
    jobs = [("plain", model, "model", 1)] + [(f"verify{k + 1}", model, "model", k + 1) for k in ks] + \
           [(f"draft-{d}", copies[d], d, 1) for d in drafts]
    for r in range(args.rounds):
        for name, m, cache, rows in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:
            times.setdefault(name, []).append(timed(m, caches[cache], ids[-rows:], rows > 1))
        print(f"round {r + 1}: plain {1000 * times['plain'][-1]:.1f} ms", file=sys.stderr)
    med = {n: statistics.median(v) for n, v in times.items()}
    plain = med["plain"]
    result = {"model": folder, "weights_dtype": model.weights_dtype, "rounds": args.rounds,
              "step_s": {n: v for n, v in med.items()},
              "cost_in_plain_steps": {n: v / plain for n, v in med.items()}, "speedups": {}}
    agreements = [float(a) for a in args.agreement.split(",")]
    for d in drafts:
        dc = med[f"draft-{d}"] / plain
        result["speedups"][d] = {f"{p:g}": {str(k): expected_speedup(p, k, dc, med[f"verify{k + 1}"] / plain)
                                            for k in ks} for p in agreements}
    if args.measure:
        for _ in range(2):  # the first run warms the pools and caches up
            plain_r = model.complete(ids, max_new_tokens=args.measure, ignore_eos=True, temperature=0.0,
                                     repetition_penalty=1.0)
        result["measured"] = {"plain_tok_s": plain_r.generated_tokens_per_s}
        for d in drafts:
            r = model.complete(ids, max_new_tokens=args.measure, ignore_eos=True, temperature=0.0,
                               repetition_penalty=1.0, speculate=args.speculate, draft=d)
            result["measured"][d] = {"identical": r.token_ids == plain_r.token_ids, "tok_s": r.generated_tokens_per_s,
                                     "acceptance_rate": r.acceptance_rate, "draft_tokens": r.draft_tokens,
                                     "draft_steps": r.draft_steps, "plain_steps": r.plain_steps,
                                     "speedup": r.generated_tokens_per_s / plain_r.generated_tokens_per_s}
    print(report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def report(result: dict) -> str:
    """The cost table and the expected speed-ups as text."""
    c = result["cost_in_plain_steps"]
    lines = [f"{result['model']} ({result['weights_dtype']}): plain step {1000 * result['step_s']['plain']:.1f} ms",
             "costs in plain steps: " + ", ".join(f"{n} {v:.2f}" for n, v in c.items() if n != "plain")]
    for d, by_p in result["speedups"].items():
        for p, by_k in by_p.items():
            lines.append(f"{d} draft at agreement {p}: " + ", ".join(f"k={k} {v:.2f}x" for k, v in by_k.items()))
    for d, m in (result.get("measured") or {}).items():
        if d != "plain_tok_s":
            lines.append(f"measured {d}: {m['tok_s']:.2f} tok/s against {result['measured']['plain_tok_s']:.2f} "
                         f"({m['speedup']:.2f}x), {100 * m['acceptance_rate']:.0f}% of drafts kept, "
                         f"{m['draft_steps']} drafting / {m['plain_steps']} plain steps, identical: {m['identical']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
