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
