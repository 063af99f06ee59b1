"""`python -m bench.constraint_compile`: what compiling a constraint in an isolated worker first costs a request.

The server compiles a constraint twice (engine.generation.constraint_compiler): in a compile worker process (so a
native crash, a memory blow-up or a runaway compile cannot take the server down), then, once the worker came
through, in the server's own process. This measures, in one process and on the same tokenizer, for schemas never
seen before (each gets a new `title`, so nothing is cached):

- direct: llguidance.LLMatcher on the calling thread (what the server did before);
- in-process: engine.generation.constraints.compile_constraint (limits checked before, a big-stack thread, the
  emptiness check after), no worker;
- isolated: ConstraintCompiler.compile with the cache off: a compile thread, the worker's compile and first mask,
  then the in-process compile;
- cached: ConstraintCompiler.compile of a schema compiled before (what a client sending its schema again pays).

The systems alternate in blocks (`--rounds` x `--per-block` compiles each, the order rotating every round), so load
changes hit them alike. The
tokenizer is TinyLlama's real one (32,000 tokens); the schema is bench.structured's nested 20-field one. Results:
JSON on stdout and in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from bench.structured import SCHEMA


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.constraint_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-block", type=int, default=10)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)

    import llguidance

    from bench.llamacpp import shared_tokenizer_dir
    from engine.generation.constraint_compiler import ConstraintCompiler
    from engine.generation.constraints import compile_constraint, constraint_grammar, ll_tokenizer
    from engine.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(shared_tokenizer_dir())
    vocab, eos = 32000, (2,)
    ll_tok = ll_tokenizer(tokenizer, vocab, eos)
    isolated = ConstraintCompiler(tokenizer, vocab, eos, workers=1, cache_size=0).start()
    cached = ConstraintCompiler(tokenizer, vocab, eos, workers=1).start()
    counter = iter(range(10 ** 9))

    def fresh() -> str:
        return constraint_grammar(json_schema=dict(SCHEMA, title=f"schema {next(counter)}"))[1]

    warm = fresh()
    isolated.compile("json_schema", warm, eos)  # workers started, tokenizers built
    cached.compile("json_schema", warm, eos)
    systems = {
        "direct": lambda g: llguidance.LLMatcher(ll_tok, g, log_level=0),
        "in-process": lambda g: compile_constraint(tokenizer, vocab, eos, "json_schema", g),
        "isolated": lambda g: isolated.compile("json_schema", g, eos),
        "cached": lambda g: cached.compile("json_schema", warm, eos),
    }
    times: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for round_number in range(args.rounds):
        order = names[round_number % len(names):] + names[:round_number % len(names)]  # each system leads in turn
        for name in order:
            run = systems[name]
            for _ in range(args.per_block):
                grammar = fresh()
                started = time.perf_counter()
                run(grammar)
                times[name].append(time.perf_counter() - started)
    isolated.stop()
    cached.stop()
    median = {name: 1000 * statistics.median(t) for name, t in times.items()}
    result = {
        "what": "ms to compile bench.structured.SCHEMA (a new title each time) with TinyLlama's tokenizer",
        "median_ms": {k: round(v, 2) for k, v in median.items()},
        "p90_ms": {k: round(1000 * sorted(t)[int(0.9 * len(t))], 2) for k, t in times.items()},
        "added_by_isolation_ms": round(median["isolated"] - median["in-process"], 2),
        "added_vs_direct_ms": round(median["isolated"] - median["direct"], 2),
        "samples": len(times["direct"]),
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
