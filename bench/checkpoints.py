"""Random-weight checkpoints of a given Llama shape, made with transformers and cached on disk (speed does not
depend on the weights' values)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TINYLLAMA_SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
QUICK_SHAPE = dict(TINYLLAMA_SHAPE, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2)


def cache_root() -> Path:
    return Path(os.environ.get("TINYLLAMA_BENCH_CACHE", Path.home() / ".cache" / "tinyllama-bench"))


def checkpoint_folder(shape: dict = TINYLLAMA_SHAPE, dtype: str = "float32", name: str | None = None) -> Path:
    """Where random_checkpoint(shape, dtype, name) keeps its folder (made or not)."""
    return cache_root() / (name or f"llama-{shape['hidden_size']}x{shape['num_hidden_layers']}-{dtype}")


def checkpoint_ready(shape: dict = TINYLLAMA_SHAPE, dtype: str = "float32", name: str | None = None) -> bool:
    """Whether random_checkpoint would return at once (without importing torch)."""
    marker = checkpoint_folder(shape, dtype, name) / "shape.json"
    try:
        return json.loads(marker.read_text()) == shape
    except (OSError, ValueError):
        return False


def random_checkpoint(shape: dict = TINYLLAMA_SHAPE, dtype: str = "float32", name: str | None = None) -> Path:
    """A folder holding a random LlamaForCausalLM of `shape` saved as safetensors in `dtype`; made once, then reused.

    The folder is written beside its final place and renamed into it, so a concurrent or interrupted run never sees
    a half-written checkpoint.
    """
    folder = checkpoint_folder(shape, dtype, name)
    if checkpoint_ready(shape, dtype, name):
        return folder
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**shape, initializer_range=0.02, bos_token_id=1, eos_token_id=2)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size="20GB")
        del model
        (staging / "shape.json").write_text(json.dumps(shape))
        if checkpoint_ready(shape, dtype, name):  # another process finished first
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except OSError:
        if not checkpoint_ready(shape, dtype, name):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def with_tokenizer(folder: Path, tokenizer_dir: Path) -> Path:
    """A folder beside `folder` ("<name>-tokenizer") whose files link to its weights and config and to the tokenizer
    files of `tokenizer_dir` (TinyLlama's real tokenizer: the random model reads and writes real text); made once."""
    target = folder.with_name(folder.name + "-tokenizer")
    target.mkdir(parents=True, exist_ok=True)
    for source in [p for p in folder.iterdir() if p.is_file()] + [tokenizer_dir / n for n in TOKENIZER_FILES]:
        link = target / source.name
        if source.exists() and not link.exists():
            link.symlink_to(source.resolve())
    return target


def main(argv=None) -> int:
    """`python -m bench.checkpoints`: make (once) a random checkpoint of TinyLlama's shape, or of its width with fewer
    layers, and print its folder; with --tokenizer, a folder that also has that tokenizer."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.checkpoints", description=main.__doc__.split(";")[0])
    p.add_argument("--layers", type=int, default=TINYLLAMA_SHAPE["num_hidden_layers"],
                   help="decoder layers (default 22: TinyLlama's own shape; fewer keep its width)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a folder with tokenizer.json etc. (e.g. ../shared/models/tinyllama-1.1b-chat-v1.0)")
    args = p.parse_args(argv)
    if args.layers < 1:
        p.error("--layers must be >= 1")
    shape = dict(TINYLLAMA_SHAPE, num_hidden_layers=args.layers)
    name = None if args.layers == TINYLLAMA_SHAPE["num_hidden_layers"] else \
        f"tinyllama-width-{args.layers}-layers" + ("" if args.dtype == "bfloat16" else f"-{args.dtype}")
    folder = random_checkpoint(shape, args.dtype, name)
    print(with_tokenizer(folder, args.tokenizer) if args.tokenizer else folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
