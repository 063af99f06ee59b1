"""`python -m bench.fidelity`: how far each quantized system's next-token distributions are from exact fp32 logits,
on the same weights and the same text.

The reference is transformers' float32 LlamaForCausalLM on the checkpoint. Every system scores the same token ids
(teacher-forced, one pass over the text): this engine with int8 / int4 weights (`load_model(weights_dtype=...)`),
and llama.cpp's GGUF types through llama-cpp-python with `logits_all` (q8_0 by its converter, q4_0 / q4_K_M by its
quantizer from the f16 file: bench.llamacpp). Per system: top-1 agreement with the reference, KL(reference ||
system) per token (mean, max), and perplexity. Each system runs in a process of its own, so one that crashes (a
segfault in a native library) is a failed row with its reason, not the end of the run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_SYSTEMS = "engine-auto,engine-int8,engine-int4,llama.cpp-q8_0,llama.cpp-q4_0,llama.cpp-q4_K_M"
DEFAULT_TEXT = Path(__file__).resolve().parent / "texts" / "story.txt"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a model folder (default: the random bf16 checkpoint of TinyLlama's "
                                                 "shape that `tinyllama bench` makes, with TinyLlama's tokenizer)")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="the text every system scores (default %(default)s)")
    p.add_argument("--tokens", type=int, default=512, help="most tokens of the text to score (default 512)")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"comma-separated (default {DEFAULT_SYSTEMS})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--worker", nargs=3, metavar=("SYSTEM", "IDS", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, float64: (T, V) -> (T, V)."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def scores(reference: np.ndarray, logits: np.ndarray, ids: list[int]) -> dict:
    """Top-1 agreement, KL(reference || logits) mean / max (nats per token) and perplexity over rows 0..T-2 (the
    rows that predict a token of the text): reference, logits (T, V); ids (T,)."""
    ref, mine = log_softmax(reference[:-1]), log_softmax(logits[:-1])
    kl = np.maximum(0.0, (np.exp(ref) * (ref - mine)).sum(-1))
    nxt = np.asarray(ids[1:])
    rows = np.arange(len(nxt))
    return {"positions": len(nxt), "top1_agreement": float(np.mean(ref.argmax(-1) == mine.argmax(-1))),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "perplexity": float(np.exp(-mine[rows, nxt].mean())),
            "perplexity_reference": float(np.exp(-ref[rows, nxt].mean()))}


def tokenizer_folder(folder: Path) -> Path:
    """The folder whose tokenizer.json encodes the text: the model's, else TinyLlama's real one (random weights)."""
    if (folder / "tokenizer.json").exists():
        return folder
    from bench.llamacpp import shared_tokenizer_dir

    tok = shared_tokenizer_dir()
    if tok is None:
        raise RuntimeError(f"{folder} has no tokenizer.json and TinyLlama's is not in ../shared/models")
    return tok


def system_logits(system: str, folder: str, ids: list[int], threads: int) -> np.ndarray:
    """(T, V) float32 logits of `system` over `ids` (one teacher-forced pass)."""
    family, _, kind = system.partition("-")
    if family == "transformers":
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(threads)
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()
    if family == "engine":
        import engine

        return engine.load_model(folder, weights_dtype=kind).logits(ids)
    if family == "llama.cpp":
        return llamacpp_logits(folder, kind, ids, threads)
    raise ValueError(f"unknown system {system!r}")


def llamacpp_logits(folder: str, kind: str, ids: list[int], threads: int) -> np.ndarray:
    """llama.cpp's logits for every position of `ids` ((T, V) float32) on the GGUF of `folder` at `kind`, through
    llama-cpp-python's low-level API with every row's logits (what `Llama(logits_all=True)` keeps); the AMX / repack
    buffer types are left out where they crash the build (bench.llamacpp.amx_build)."""
    import llama_cpp as L

    from bench.llamacpp import amx_build, gguf_for

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    if hasattr(mp, "use_extra_bufts") and amx_build():
        mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(gguf_for(folder, kind)).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load the {kind} GGUF")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    p = L.llama_context_default_params()
    p.n_ctx = len(ids) + 8
    p.n_batch = p.n_ubatch = min(512, len(ids))
    p.n_threads = p.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, p)
    out = np.empty((len(ids), n_vocab), dtype=np.float32)
    for start in range(0, len(ids), p.n_batch):
        chunk = ids[start:start + p.n_batch]
        batch = L.llama_batch_init(len(chunk), 0, 1)
        try:
            for i, tok in enumerate(chunk):
                batch.token[i], batch.pos[i] = tok, start + i
                batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, 0, True
            batch.n_tokens = len(chunk)
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for i in range(len(chunk)):
                out[start + i] = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
        finally:
            L.llama_batch_free(batch)
    return out


def run_worker(system: str, folder: str, ids: list[int], threads: int, timeout: float = 1800) -> tuple:
    """(logits or None, failure reason or None): `system` in a process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out = Path(tmp) / "ids.json", Path(tmp) / "logits.npy"
        ids_path.write_text(json.dumps({"folder": folder, "ids": ids, "threads": threads}))
        try:
            r = subprocess.run([sys.executable, "-m", "bench.fidelity", "--worker", system, str(ids_path), str(out)],
                               capture_output=True, text=True, timeout=timeout,
                               cwd=Path(__file__).resolve().parent.parent)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:.0f} s"
        if r.returncode != 0:
            if r.returncode < 0:
                return None, f"crashed: killed by {signal.Signals(-r.returncode).name}"
            lines = [ln for ln in (r.stderr or "").strip().splitlines() if ln.strip()]
            return None, (lines[-1] if lines else f"exit status {r.returncode}")[:300]
        return np.load(out), None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        system, ids_path, out = args.worker
        job = json.loads(Path(ids_path).read_text())
        np.save(out, system_logits(system, job["folder"], job["ids"], job["threads"]))
        return 0
    from bench.interleave import checkpoint
    from engine.text.tokenizer import Tokenizer
    from weights.checkpoint import read_json

    folder = Path(checkpoint(args.model))
    window = read_json(folder / "config.json")["max_position_embeddings"]
    tok = tokenizer_folder(folder)
    ids = Tokenizer.from_folder(tok).encode(Path(args.text).read_text(encoding="utf-8"))[: min(args.tokens, window)]
    print(f"{folder}: {len(ids)} tokens of {args.text} (tokenizer {tok})", file=sys.stderr)
    reference, why = run_worker("transformers-float32", str(folder), ids, args.threads)
    if reference is None:
        print(f"error: the reference (transformers fp32) failed: {why}", file=sys.stderr)
        return 1
    rows = []
    for system in [s.strip() for s in args.systems.split(",") if s.strip()]:
        logits, why = run_worker(system, str(folder), ids, args.threads)
        row = {"system": system, "status": "ok" if why is None else "failed", "note": why}
        if logits is not None:
            row.update(scores(reference, logits, ids))
        rows.append(row)
        print(f"{system}: " + (why or f"top-1 {100 * row['top1_agreement']:.1f}%, KL mean {row['kl_mean']:.4g}"),
              file=sys.stderr)
    result = {"model": str(folder), "text": args.text, "tokens": len(ids), "tokenizer": str(tok), "rows": rows,
              "reference": "transformers LlamaForCausalLM float32 (eager)",
              "llama_cpp_version": _llama_cpp_version()}
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _llama_cpp_version():
    from bench.llamacpp import version

    return version()


def table(result: dict) -> str:
    """The results as a markdown table."""
    ppl = next((r["perplexity_reference"] for r in result["rows"] if r["status"] == "ok"), None)
    lines = [f"{result['model']}, {result['tokens']} tokens; reference perplexity (fp32) "
             + (f"{ppl:.4g}" if ppl else "-"),
             "", "| system | top-1 agreement | KL mean (nats/token) | KL max | perplexity |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['system']} | failed: {r['note']} | | | |")
        else:
            lines.append(f"| {r['system']} | {100 * r['top1_agreement']:.1f}% | {r['kl_mean']:.4g} | "
                         f"{r['kl_max']:.3g} | {r['perplexity']:.4g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
