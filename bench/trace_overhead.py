"""What the trace recorder costs the normal forward: decode steps of `NumpyBackend.forward` as shipped (with its
`if recorder is not None:` lines, recorder=None) against the same function with those lines stripped out by `ast`
(each `if recorder ...:` replaced by its else-branch or removed), step by step in alternation.

    python -m bench.trace_overhead [--model PATH ...] [--batch 1,8] [--steps 100] [--rounds 10] [--out FILE.json]

Default models: stories260K (../shared/models; a tiny model whose ~0.3 ms decode step is mostly Python, so it is
where a few extra branches would show most) and the bench's QUICK_SHAPE random checkpoint (44 M parameters). Also
times one `recorder is not None` test with timeit and multiplies it by the number a decode step makes
(3 + L x (B + 1): the step check, embeddings, per layer one per sequence for attention and one for the layer output,
the final norm) as an upper bound for the added work.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import platform
import statistics
import textwrap
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def branch_free_forward():
    """NumpyBackend.forward for steps of at most PASS_ROWS tokens (one pass: the decode steps this measures), with
    every `if` of its pass (`_forward_pass`, the layer loop) whose test mentions `recorder` replaced by its
    else-branch (or removed)."""
    from engine.runtime import numpy_backend

    tree = ast.parse(textwrap.dedent(inspect.getsource(numpy_backend.NumpyBackend._forward_pass)))

    class StripRecorder(ast.NodeTransformer):
        def visit_If(self, node):
            self.generic_visit(node)
            if "recorder" in ast.unparse(node.test):
                return node.orelse or None
            return node

    tree = ast.fix_missing_locations(StripRecorder().visit(tree))
    function = tree.body[0]
    function.body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if "recorder" in ast.unparse(function.body):
        raise RuntimeError("a recorder use outside an `if recorder ...:` line; update bench/trace_overhead.py")
    function.args.args = [a for a in function.args.args if a.arg != "recorder"]
    function.args.defaults = []
    namespace = dict(vars(numpy_backend))
    exec(compile(tree, "<branch-free forward>", "exec"), namespace)  # noqa: S102 - our own source, transformed
    stripped_pass = namespace["_forward_pass"]

    def forward(backend, steps):
        """What NumpyBackend.forward does for one pass: reserve the caches, then the stripped pass."""
        for s in steps:
            s.cache.reserve(s.cache.length + len(s.token_ids))
        return stripped_pass(backend, steps)

    return forward


def measure(model, batch: int, steps: int, rounds: int, prompt_len: int = 32) -> dict:
    """Decode steps of the shipped and the branch-free forward interleaved one by one (so both see the same machine
    load), each variant on its own caches holding the same prompt, cut back to it after every `steps` steps.
    -> per-variant median step time, and the median of the per-pair ratios."""
    from engine.runtime.batch import SequenceStep
    from engine.runtime.numpy_backend import NumpyBackend

    variants = {"shipped (recorder=None)": NumpyBackend.forward, "branch-free": branch_free_forward()}
    caches = {name: [model.new_cache() for _ in range(batch)] for name in variants}
    prompt = [1] + [5 + i for i in range(prompt_len - 1)]
    for name in variants:
        for c in caches[name]:
            model.backend.forward([SequenceStep(c, prompt)])
    times = {name: [] for name in variants}
    warmup = max(5, steps // 10)
    for i in range(warmup + rounds * steps):
        if (i - warmup) % steps == 0:
            for c in (c for cs in caches.values() for c in cs):
                c.truncate(prompt_len)
        order = list(variants) if i % 2 else list(variants)[::-1]
        for name in order:
            step = [SequenceStep(c, [3 + (i % 200)]) for c in caches[name]]
            start = time.perf_counter()
            variants[name](model.backend, step)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    shipped, free = times["shipped (recorder=None)"], times["branch-free"]
    ratios = [a / b for a, b in zip(shipped, free)]
    quartiles = statistics.quantiles(ratios, n=4)
    return {"batch": batch, "step_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
            "difference_percent": 100 * (statistics.median(ratios) - 1),
            "pair_ratio_quartiles_percent": [100 * (q - 1) for q in (quartiles[0], quartiles[2])],
            "pairs": len(ratios)}


def branch_cost_ns() -> float:
    """Nanoseconds of one `if recorder is not None:` test that fails (the normal path), best of 5 timeit runs."""
    n = 2_000_000
    return min(timeit.repeat("if recorder is not None: pass", setup="recorder = None", number=n, repeat=5)) / n * 1e9


def shared_model(name: str) -> Path:
    """A folder of the shared real-data folder ($TINYLLAMA_SHARED_MODELS, else ../shared/models)."""
    return Path(os.environ.get("TINYLLAMA_SHARED_MODELS", REPO.parent / "shared" / "models")) / name


def default_models() -> list[str]:
    from bench.checkpoints import QUICK_SHAPE, random_checkpoint

    return [str(shared_model("stories260K")), str(random_checkpoint(QUICK_SHAPE))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trace_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="model folder (repeatable; default stories260K and QUICK_SHAPE)")
    p.add_argument("--batch", default="1,8", help="decode batch sizes (default 1,8)")
    p.add_argument("--steps", type=int, default=100, help="decode steps before the caches are cut back (default 100)")
    p.add_argument("--rounds", type=int, default=10, help="how many times (default 10: 1000 pairs of steps)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS / OpenMP threads (default 1: the branches do not depend on it, and spinning thread "
                        "pools on a shared machine drown the difference in noise)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TINYLLAMA_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before NumPy and the native kernel load
    import engine  # noqa: F401 - picks the BLAS kernel before NumPy loads
    from engine.model import load_model

    check_ns = branch_cost_ns()
    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "branch_check_ns": check_ns, "settings": {"steps": args.steps, "rounds": args.rounds},
               "models": []}
    for ref in args.model or default_models():
        model = load_model(ref)
        c = model.config
        for batch in [int(b) for b in args.batch.split(",")]:
            row = measure(model, batch, args.steps, args.rounds)
            checks = 3 + c.num_hidden_layers * (batch + 1)
            row.update(model=Path(ref).name, parameters=c.weight_count(), branch_checks_per_step=checks,
                       branch_bound_percent=100 * checks * check_ns * 1e-9 / (row["step_ms"]["branch-free"] * 1e-3))
            results["models"].append(row)
            print(f"{row['model']:<22} B={batch:<2} shipped {row['step_ms']['shipped (recorder=None)']:.4f} ms  "
                  f"branch-free {row['step_ms']['branch-free']:.4f} ms  difference {row['difference_percent']:+.2f}% "
                  f"(pairs' quartiles {row['pair_ratio_quartiles_percent'][0]:+.1f}.."
                  f"{row['pair_ratio_quartiles_percent'][1]:+.1f}%)  "
                  f"{checks} checks x {check_ns:.1f} ns = {row['branch_bound_percent']:.4f}% of a step", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
