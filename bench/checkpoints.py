"""Random-weight checkpoints of a given Llama shape, made with transformers and cached on disk (speed does not
depend on the weights' values)."""
from __future__ import annotations

import json
import os
from pathlib import Path

TINYLLAMA_SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
QUICK_SHAPE = dict(TINYLLAMA_SHAPE, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2)


def cache_root() -> Path:
    return Path(os.environ.get("TINYLLAMA_BENCH_CACHE", Path.home() / ".cache" / "tinyllama-bench"))


def random_checkpoint(shape: dict = TINYLLAMA_SHAPE, dtype: str = "float32", name: str | None = None) -> Path:
    """A folder holding a random LlamaForCausalLM of `shape` saved as safetensors in `dtype`; made once, then reused."""
    name = name or f"llama-{shape['hidden_size']}x{shape['num_hidden_layers']}-{dtype}"
    folder = cache_root() / name
    marker = folder / "shape.json"
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return folder
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**shape, initializer_range=0.02, bos_token_id=1, eos_token_id=2)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="20GB")
    del model
    marker.write_text(json.dumps(shape))
    return folder
