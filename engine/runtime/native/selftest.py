"""Build selftest.c (every exported kernel against float64 references) for any target, as the engine builds its
library (each variant its own object, one that does not compile left out), and run it:

    python -m engine.runtime.native.selftest                                   # this machine, $CC or cc
    python -m engine.runtime.native.selftest --cc clang-14 --strict            # warnings are errors, nothing left out
    python -m engine.runtime.native.selftest --cc aarch64-linux-gnu-gcc --run 'qemu-aarch64 -L /usr/aarch64-linux-gnu'
    python -m engine.runtime.native.selftest --cc clang --target arm64-apple-macos11 --compile-only --cflags '...'

Exit status: the selftest's (0: every check of every variant this CPU runs passed), 2 when it cannot be built.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.runtime.native import CFLAGS, HERE, LIBS, compile_objects, compiler

STRICT_FLAGS = ["-Wall", "-Wextra", "-Werror"]


def build_selftest(compiler: list[str], output: Path | None, target: str | None = None, flags: list[str] = (),
                   strict: bool = False) -> dict[str, str]:
    """Compile selftest.c and the library's sources with `compiler` (for `target`, a clang triple, with `flags`) and
    link them into `output` (None: compile only) -> {variant left out: compiler message}. RuntimeError on a failure
    (with `strict`, any warning or a variant left out is one)."""
    flags = ([f"--target={target}"] if target else []) + list(flags) + (STRICT_FLAGS if strict else [])
    with tempfile.TemporaryDirectory(prefix="tinyllama-selftest-") as work:
        try:
            objects, skipped = compile_objects(compiler, HERE, work, flags)
            if strict and skipped:
                raise RuntimeError("; ".join(f"{isa} left out: {why}" for isa, why in skipped.items()))
            main = os.path.join(work, "selftest.o")
            done = subprocess.run(compiler + CFLAGS + flags + ["-c", str(HERE / "selftest.c"), "-o", main],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(compiler)} failed on selftest.c: {done.stdout}{done.stderr}")
            if output is not None:
                done = subprocess.run(compiler + flags + ["-pthread", "-o", str(output), main] + objects + LIBS,
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(compiler)} failed linking: {done.stdout}{done.stderr}")
        except FileNotFoundError as e:
            raise RuntimeError(f"no C compiler ({e.filename})") from None
    return skipped


def main(argv: list[str] | None = None) -> int:
    """The command line: build, then run (unless --compile-only) -> exit status."""
    p = argparse.ArgumentParser(prog="python -m engine.runtime.native.selftest", description=__doc__.split("\n\n")[0])
    p.add_argument("--cc", default=" ".join(compiler()), help="the C compiler (default $CC, else cc)")
    p.add_argument("--target", help="a target triple for clang, e.g. aarch64-linux-gnu, arm64-apple-macos11")
    p.add_argument("--cflags", default="", help="more compiler flags, e.g. '-isystem DIR' for stand-in headers")
    p.add_argument("--run", default="", help="a command to run the binary with, e.g. 'qemu-aarch64 -L SYSROOT'")
    p.add_argument("--compile-only", action="store_true", help="compile every source, link and run nothing")
    p.add_argument("--strict", action="store_true", help="-Wall -Wextra -Werror, and no variant may be left out")
    p.add_argument("--output", help="keep the binary here (default: a temporary file)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tinyllama-selftest-bin-") as tmp:
        output = None if args.compile_only else Path(args.output or os.path.join(tmp, "selftest"))
        try:
            skipped = build_selftest(shlex.split(args.cc), output, args.target, shlex.split(args.cflags), args.strict)
        except RuntimeError as e:
            print(f"selftest: not built: {e}", file=sys.stderr)
            return 2
        for isa, why in skipped.items():
            print(f"selftest: {isa} left out: {' '.join(why.split())[:300]}", file=sys.stderr)
        if output is None:
            print(f"selftest: compiled ({args.cc}{' --target=' + args.target if args.target else ''}), not run")
            return 0
        done = subprocess.run(shlex.split(args.run) + [str(output)])
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
