"""`python -m bench.gguf_load FILE.gguf [--runs N]`: a GGUF file's cold-start cost, each run in a fresh process: load
time and time to first token from the process's start (imports included), peak RSS (VmHWM) against the file's size.
The first run with an empty cache entry repacks the file (and writes the entry); the later ones map the entry.
`--fresh` deletes the file's cache entry first, so the first run is a first load."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import engine

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

model = engine.load_model(sys.argv[1])
t1 = time.perf_counter()
model.complete("The capital of France is", max_new_tokens=1)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "ttft_s": t2 - t0, "peak_rss_bytes": status("VmHWM"),
                  "weight_bytes": int(model.backend.weights.nbytes), "file_bytes": os.path.getsize(sys.argv[1]),
                  "weights_dtype": model.weights_dtype, "reason": model.weights_dtype_reason}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gguf_load", description=__doc__.split("\n")[0])
    p.add_argument("file")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--fresh", action="store_true", help="delete the file's cache entry first (a first load)")
    args = p.parse_args(argv)
    if args.fresh:
        from engine.runtime import quant_cache

        quant_cache.entry_path(os.path.abspath(args.file), "gguf").unlink(missing_ok=True)
    env = {**os.environ, "TINYLLAMA_QUANT_CACHE": os.environ.get("TINYLLAMA_QUANT_CACHE", "1")}
    print(f"{args.file}: load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    for run in range(args.runs):
        out = subprocess.run([sys.executable, "-c", PROBE, args.file], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
            return 1
        r = json.loads(out.stdout)
        print(f"run {run + 1}: load {r['load_s']:.2f} s, first token {r['ttft_s']:.2f} s from the process's start, "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MB = {r['peak_rss_bytes'] / r['file_bytes']:.2f}x the "
              f"file ({r['file_bytes'] / 2**20:.0f} MB; weights {r['weight_bytes'] / 2**20:.0f} MB, "
              f"{r['weights_dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
