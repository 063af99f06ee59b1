"""`python -m bench.constraint_crash`: where llguidance's compiler overflows its stack, for the limits of
engine.generation.constraint_limits.

For each shape of chained constraint (the issue's `$ref` chain of objects, chains through anyOf / allOf / items,
bare `$ref`s, links with inline nesting, Lark rule chains, GBNF rule chains), bisect the chain length at which
compiling it (llguidance.LLMatcher with stories260K's tokenizer, on a thread with a --stack-mb stack) kills a child
process. Each try runs in a child process of its own; nothing here can crash this one. Prints JSON: per shape the
longest chain that compiled, the shortest that crashed, and the levels per link as MAX_SCHEMA_DEPTH /
MAX_GRAMMAR_DEPTH count them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, threading
import llguidance
shape, n, stack_mb, tokenizer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
LINKS = {
    "ref-objects": lambda r: {"type": "object", "properties": {"x": {"$ref": r}}},
    "ref-anyOf": lambda r: {"anyOf": [{"$ref": r}, {"type": "null"}]},
    "ref-allOf": lambda r: {"allOf": [{"$ref": r}]},
    "ref-items": lambda r: {"type": "array", "items": {"$ref": r}},
    "ref-bare": lambda r: {"$ref": r},
}
def nested(r, k):
    s = {"type": "object", "properties": {"x": {"$ref": r}}, "required": ["x"]}
    for _ in range(k):
        s = {"type": "object", "properties": {"y": s}, "required": ["y"]}
    return s
if shape.startswith("ref-nest"):
    k = int(shape[len("ref-nest"):])
    LINKS[shape] = lambda r: nested(r, k)
if shape in LINKS:
    defs = {f"d{i}": LINKS[shape](f"#/$defs/d{i + 1}") for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    grammar = "start: %json " + json.dumps({"$ref": "#/$defs/d0", "$defs": defs})
elif shape == "lark-chain":
    grammar = "start: r0\n" + "\n".join(f"r{i}: r{i + 1}" for i in range(n)) + f'\nr{n}: "x"'
else:
    from llguidance.gbnf_to_lark import any_to_lark
    grammar = any_to_lark("root ::= r0\n" + "\n".join(f"r{i} ::= r{i + 1}" for i in range(n)) + f'\nr{n} ::= "x"')
tok = llguidance.LLTokenizer(open(tokenizer).read(), n_vocab=512, eos_token=[2])
threading.stack_size(stack_mb * 2 ** 20)
t = threading.Thread(target=lambda: llguidance.LLMatcher(tok, grammar, log_level=0))
t.start()
t.join()
"""
SHAPES = {  # shape -> levels per link, counted as the limits count them
    "ref-objects": 2, "ref-anyOf": 2, "ref-allOf": 2, "ref-items": 2, "ref-bare": 1, "ref-nest10": 12,
    "ref-nest50": 52, "lark-chain": 1, "gbnf-chain": 1,
}


def compiles(shape: str, n: int, stack_mb: int, tokenizer: str) -> bool:
    """Whether a chain of n links compiles in a child process (False: the child died)."""
    done = subprocess.run([sys.executable, "-c", CHILD, shape, str(n), str(stack_mb), tokenizer],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return done.returncode == 0


def bisect(shape: str, stack_mb: int, tokenizer: str, precision: float) -> tuple[int, int]:
    """(longest chain that compiled, shortest that crashed), doubling from 4 links then bisecting."""
    low, high = 0, 4
    while compiles(shape, high, stack_mb, tokenizer):
        low, high = high, high * 2
        if high > 200_000:
            return low, -1
    while high - low > max(1, int(precision * high)):
        middle = (low + high) // 2
        low, high = (middle, high) if compiles(shape, middle, stack_mb, tokenizer) else (low, middle)
    return low, high


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.constraint_crash", description=__doc__.split("\n\n")[0])
    p.add_argument("--stack-mb", type=int, default=8, help="the compiling thread's stack (default 8: Linux's)")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--precision", type=float, default=0.02, help="stop bisecting at this fraction of the length")
    args = p.parse_args(argv)
    root = Path(os.environ.get("TINYLLAMA_SHARED_MODELS", Path(__file__).resolve().parents[2] / "shared" / "models"))
    tokenizer = str(root / "stories260K" / "tokenizer.json")
    out = {}
    for shape in args.shapes:
        low, high = bisect(shape, args.stack_mb, tokenizer, args.precision)
        out[shape] = {"compiles_up_to": low, "crashes_from": high, "levels_per_link": SHAPES[shape],
                      "levels_at_crash": high * SHAPES[shape]}
        print(shape, out[shape], file=sys.stderr, flush=True)
    print(json.dumps({"stack_mb": args.stack_mb, "shapes": out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
