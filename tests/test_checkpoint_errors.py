"""Broken checkpoints: each problem is refused before any computation with a CheckpointError naming file and tensor."""
from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import engine
from weights import CheckpointError


@pytest.fixture()
def good(stories260k, tmp_path):
    """A writable copy of stories260K (config + weights) in tmp_path."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(stories260k / name, folder / name)
    return folder


def rewrite_tensors(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def rewrite_config(folder, change):
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def load_error(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        engine.load_model(str(folder))
    return str(info.value)


def test_the_unbroken_copy_loads(good):
    assert engine.load_model(str(good)).config.num_hidden_layers == 5


def test_missing_folder(tmp_path):
    assert "no such model folder" in load_error(tmp_path / "nowhere")


def test_missing_config(good):
    (good / "config.json").unlink()
    assert "config.json: missing file" in load_error(good)


def test_invalid_config_json(good):
    (good / "config.json").write_text("{ not json")
    assert "config.json: not valid JSON" in load_error(good)


def test_not_llama(good):
    rewrite_config(good, lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    assert "not a Llama-architecture model" in load_error(good)


def test_unsupported_rope_scaling(good):
    rewrite_config(good, lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    msg = load_error(good)
    assert "config.json" in msg and "'yarn' is not supported" in msg


def test_inconsistent_head_counts(good):
    rewrite_config(good, lambda c: c.update(num_key_value_heads=3))
    assert "not a multiple of num_key_value_heads" in load_error(good)


def test_bad_config_value(good):
    rewrite_config(good, lambda c: c.update(hidden_size="64"))
    assert "'hidden_size' must be a positive integer" in load_error(good)


def test_no_weights_file(good):
    (good / "model.safetensors").unlink()
    assert "no model.safetensors" in load_error(good)


def test_truncated_file(good):
    path = good / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    msg = load_error(good)
    assert "model.safetensors: truncated file" in msg and "tensor '" in msg


def test_header_length_past_end_of_file(good):
    path = good / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    assert "inconsistent header: header length" in load_error(good)


def test_header_not_json(good):
    path = good / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\0" * 16)
    assert "inconsistent header: not valid JSON" in load_error(good)


def test_offsets_disagree_with_shape(good):
    path = good / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = "model.norm.weight"
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end - 4]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    path.write_bytes(data[:8] + raw + data[8 + n :])
    msg = load_error(good)
    assert "inconsistent header" in msg and "'model.norm.weight'" in msg


def test_missing_tensor(good):
    rewrite_tensors(good, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    msg = load_error(good)
    assert "missing tensor 'model.layers.3.mlp.up_proj.weight'" in msg and "[172, 64]" in msg


def test_untied_model_without_lm_head(good):
    rewrite_config(good, lambda c: c.update(tie_word_embeddings=False))
    assert "missing tensor 'lm_head.weight'" in load_error(good)


def test_unexpected_tensor(good):
    rewrite_tensors(good, lambda t: t.update({"model.layers.9.extra.weight": np.zeros(3, np.float32)}))
    assert "unexpected tensor 'model.layers.9.extra.weight'" in load_error(good)


def test_wrong_shape(good):
    rewrite_tensors(good, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    msg = load_error(good)
    assert "model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape [64, 64]" in msg
    assert "implies [32, 64]" in msg


def test_unsupported_dtype(good):
    rewrite_tensors(good, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.float64)}))
    assert "tensor 'model.norm.weight' has unsupported dtype F64" in load_error(good)


def test_sharded_index_names_a_missing_shard(good):
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (good / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors: missing file" in load_error(good)
