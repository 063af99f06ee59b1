"""Regenerate the `tinyllama inspect` pictures of docs/inspection.md from stories260K (../shared/models, or
$TINYLLAMA_SHARED_MODELS) by running the commands a user would:

    python -m bench.inspect_pictures [--out bench/results/inspect-stories260k]

runs `tinyllama inspect attention --layer 1 --head 3` (layer1.png, layer1-head3.png, heads.png) and
`tinyllama inspect lens` (lens.png) on the same story opening, each as `python -m engine` in a subprocess.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside."
LAYER, HEAD = 1, 3  # a previous-token head: the diagonal just below the main one


def commands(model: Path, out: Path) -> list[list[str]]:
    """The `tinyllama inspect` command lines (after `tinyllama`) that make the pictures."""
    return [["inspect", "attention", "--model", str(model), "--layer", str(LAYER), "--head", str(HEAD),
             "--out", str(out), TEXT],
            ["inspect", "lens", "--model", str(model), "--out", str(out / "lens.png"), TEXT]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inspect_pictures", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "inspect-stories260k"), help="output folder")
    args = p.parse_args(argv)
    model = Path(os.environ.get("TINYLLAMA_SHARED_MODELS", REPO.parent / "shared" / "models")) / "stories260K"
    if not model.is_dir():
        print(f"{model} is absent (set TINYLLAMA_SHARED_MODELS)", file=sys.stderr)
        return 1
    out = Path(args.out)
    for command in commands(model, out):
        print("tinyllama " + " ".join(command[:-1]) + f" {command[-1]!r}", flush=True)
        subprocess.run([sys.executable, "-m", "engine", *command], cwd=REPO, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
