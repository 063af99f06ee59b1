"""Shared fixtures: where the real test data lives (../shared/models), and random Llama checkpoints made with transformers."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

# A suite started in the background of a non-interactive shell (`cmd &`, nohup, some CI runners) inherits SIGINT
# ignored, and an ignored signal stays ignored in every child it starts: then the servers and `tinyllama chat` the
# tests stop with Ctrl-C's SIGINT would ignore it and each stop would wait for its timeout. A handled signal is reset
# to the default in a child, so give this process Python's own handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
# A fresh process's load of `sys.argv[1]`, printed as JSON: its resident set before, its peak (VmHWM: this
# process's own) and the weight bytes the model holds (Linux: reads /proc/self/status).
LOAD_PROBE = """
import json, sys
import engine

def status(field):  # this process's resident set (VmRSS) or its peak (VmHWM), in bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

before = status("VmRSS")
model = engine.load_model(sys.argv[1])
print(json.dumps({"before": before, "peak": status("VmHWM"), "weight_bytes": int(model.backend.weights.nbytes)}))
"""
# The suite leaves the user's cache of quantized weights alone (tests/test_quant_cache.py turns it on in a tmp folder).
os.environ.setdefault("TINYLLAMA_QUANT_CACHE", "0")


def shared_models_dir() -> Path:
    """The shared real-data folder: $TINYLLAMA_SHARED_MODELS, else ../shared/models beside the repository."""
    return Path(os.environ.get("TINYLLAMA_SHARED_MODELS", REPO.parent / "shared" / "models"))


def shared_model(name: str) -> Path:
    """A folder of ../shared/models, or skip the test with the reason."""
    path = shared_models_dir() / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (real test data beside the repository; set TINYLLAMA_SHARED_MODELS)")
    return path


@pytest.fixture(scope="session")
def stories260k() -> Path:
    return shared_model("stories260K")


@pytest.fixture(scope="session")
def tinyllama_tokenizer_dir() -> Path:
    return shared_model("tinyllama-1.1b-chat-v1.0")


def make_random_checkpoint(folder: Path, dtype: str = "float32", max_shard_size: str | None = None,
                           seed: int = 0, tokenizer_from: Path | None = None, **config) -> Path:
    """Save a randomly initialised LlamaForCausalLM (transformers) to `folder` as safetensors; returns `folder`.

    Norm weights are randomised too (they start at 1.0), and initializer_range defaults to 0.1 so greedy argmaxes
    are well separated. `tokenizer_from` copies that folder's tokenizer files next to the weights.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    defaults = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    defaults.update(config)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**defaults)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_from / name).exists():
                (folder / name).write_bytes((tokenizer_from / name).read_bytes())
    return folder


def load_reference(folder: Path):
    """transformers' LlamaForCausalLM on the checkpoint in float32 (bf16/fp16 weights upcast), eager attention."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def reference_logits(ref_model, ids) -> np.ndarray:
    """(T, vocab) float32 logits from transformers."""
    import torch

    with torch.no_grad():
        return ref_model(torch.tensor([list(ids)])).logits[0].float().numpy()


def reference_greedy(ref_model, ids, n: int) -> list[int]:
    """n greedy new tokens from transformers' logits (argmax of a full forward per step; EOS not special)."""
    out = list(ids)
    for _ in range(n):
        out.append(int(np.argmax(reference_logits(ref_model, out)[-1])))
    return out[len(ids):]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def model_variant(source: Path, folder: Path, json_name: str, edit) -> Path:
    """A new `folder` linking every file of the model `source`, except `json_name`: a copy changed by edit(dict)."""
    folder.mkdir()
    for f in source.iterdir():
        if f.name != json_name:
            (folder / f.name).symlink_to(f)
    data = read_json(source / json_name)
    edit(data)
    (folder / json_name).write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, tinyllama_tokenizer_dir) -> Path:
    """A small random Llama with TinyLlama's real 32000-token tokenizer and chat template (window 256)."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    return make_random_checkpoint(folder, tokenizer_from=tinyllama_tokenizer_dir, vocab_size=32000, hidden_size=64,
                                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, seed=11)


@pytest.fixture
def always_draft(monkeypatch):
    """Every speculating step drafts the most it may (DraftPayoff.adaptive off): tests of the drafting mechanics
    that need drafts to happen whatever the measured costs say."""
    from engine.generation.draft_payoff import DraftPayoff

    monkeypatch.setattr(DraftPayoff, "adaptive", False)
