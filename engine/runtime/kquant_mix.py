"""`weights_dtype="q4_k_m"`: a safetensors checkpoint quantized at load into llama.cpp's q4_K_M mix by our quantizer.

The mix is llama.cpp's (src/llama-quant.cpp, LLAMA_FTYPE_MOSTLY_Q4_K_M, a llama model without experts): Q4_K for
every matrix, except Q6_K for the output matrix (and the embedding table when it is tied to it), for v_proj and
down_proj in the layers where `use_more_bits` holds (the first and last eighth of the layers and every third one
between); a matrix whose rows are not whole 256-column blocks falls back as llama.cpp's does: Q4_K to Q5_0, Q6_K
and the output matrix to Q8_0 (our int8: the same grid), and rows not whole 32-column groups keep the checkpoint's
own dtype (llama.cpp: F16). The quantizer is ours (engine/runtime/native/kquant_quantize.c: a least-squares search
for every scale and minimum, where llama.cpp rounds once), writing ggml's own blocks, which the kernels' layout then
takes (engine/runtime/kquant.py). Like int8 / int4, the result is cached on disk (engine/runtime/quant_cache.py).
"""
from __future__ import annotations

import numpy as np

from engine.config import ModelConfig
from engine.runtime import kquant, quant, quant_cache
from engine.runtime.ggml_formats import RowStack
from engine.runtime.kquant import KQuantMatrix
from weights.checkpoint import Checkpoint

MIXES = ("q4_k_m",)
# Bump when the bytes change for the same weights (cache entries written before are then not used).
MIX_FORMAT_VERSION = 1
SAFETENSORS_STORAGE = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers whose v and down projections get more bits in the _M mixes."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_kind(name: str, config: ModelConfig, mix: str = "q4_k_m") -> str:
    """The format of checkpoint tensor `name` in `mix`: "q4_k", "q6_k", "q5_0", "int8" (Q8_0) or "keep" (its own
    dtype), after llama.cpp's fallbacks for rows that are not whole blocks."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}")
    cols = config.tensor_shapes()[name][1]
    output = name == "lm_head.weight" or (name == "model.embed_tokens.weight" and config.tie_word_embeddings)
    if output:
        kind = "q6_k" if cols % 256 == 0 else "int8"
    else:
        kind = "q4_k"
        if name.endswith(("self_attn.v_proj.weight", "mlp.down_proj.weight")):
            layer = int(name.split(".")[2])
            if use_more_bits(layer, config.num_hidden_layers):
                kind = "q6_k"
        if cols % 256:
            kind = {"q4_k": "q5_0", "q6_k": "int8"}[kind]
    return kind if cols % 32 == 0 else "keep"


def plan(config: ModelConfig, mix: str = "q4_k_m") -> dict[str, list[tuple[str, list[str]]]]:
    """label -> the parts of that fused matrix: [(kind, [tensor names stacked in it])], runs of one kind merged."""
    out: dict[str, list[tuple[str, list[str]]]] = {}

    def add(label: str, names: list[str]) -> None:
        parts: list[tuple[str, list[str]]] = []
        for name in names:
            kind = tensor_kind(name, config, mix)
            if parts and parts[-1][0] == kind and kind != "keep":
                parts[-1][1].append(name)
            else:
                parts.append((kind, [name]))
        out[label] = parts

    for i in range(config.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        add(q + "wqkv", [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"])
        add(q + "wo", [p + "self_attn.o_proj.weight"])
        add(q + "w_gate_up", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        add(q + "w_down", [p + "mlp.down_proj.weight"])
    add("embed", ["model.embed_tokens.weight"])
    if not config.tie_word_embeddings:
        add("lm_head", ["lm_head.weight"])
    return out


def settings(mix: str) -> dict:
    """Everything besides the checkpoint that decides the bytes (the on-disk cache's key)."""
    return {"mix": mix, "mix_format_version": MIX_FORMAT_VERSION, "block_rows": kquant.ROWS,
            "int8_group": quant.GROUP}


def _empty_part(kind: str, rows: int, cols: int, keep_dtype) -> KQuantMatrix | quant.QuantMatrix | np.ndarray:
    if kind == "int8":
        return quant.empty("int8", rows, cols)
    if kind == "keep":
        return np.zeros((rows, cols), dtype=keep_dtype)
    return kquant.empty(kind, rows, cols)


def _arrays(part) -> dict[str, np.ndarray]:
    """The arrays of one part, by suffix (what the cache stores)."""
    if isinstance(part, KQuantMatrix):
        return {"blocks": part.data}
    if isinstance(part, quant.QuantMatrix):
        return {"data": part.data, "scales": part.scales}
    return {"values": part}


def load_mix(checkpoint: Checkpoint, config: ModelConfig, mix: str, layer_weights, model_weights,
             importance=None, importance_settings: dict | None = None):
    """The weights of a validated checkpoint in `mix` (MIXES): a ModelWeights built with the given classes
    (engine.runtime.weights' LayerWeights and ModelWeights), norms float32. Each tensor is read as float32 on its own
    and quantized into its rows of its part: never a float32 copy of more than one tensor. `importance`: None, or a
    function called once before quantizing -> {matrix label: (in_features,) float32 weight of each column's squared
    error} (engine.runtime.calibration), `importance_settings` what decides it (part of the cache's key). Cached on
    disk like int8 / int4: a later load reads the bytes back (and calls nothing)."""
    layout = plan(config, mix)
    key_settings = {**settings(mix), "importance": importance_settings if importance else None}

    def quantized(made: dict | None):
        columns = importance() if importance else None
        return _build(checkpoint, config, layout, made, None, layer_weights, model_weights, mix, columns)

    if not quant_cache.enabled():
        return quantized(None)
    path = quant_cache.entry_path(checkpoint.folder, mix)
    try:
        key = quant_cache.entry_key([f.path for f in checkpoint.files], mix, key_settings)
    except OSError:
        return quantized(None)
    entry = quant_cache.open_entry(path, key)
    if entry is not None:
        with entry:
            try:
                return _build(checkpoint, config, layout, None, entry, layer_weights, model_weights, mix)
            except (ValueError, OSError):
                pass  # an entry that does not hold these matrices: quantize and rewrite it
    made: dict[str, np.ndarray] = {}
    weights = quantized(made)
    quant_cache.write_entry(path, key, made)
    return weights


def _build(checkpoint: Checkpoint, config: ModelConfig, layout: dict, made: dict | None, entry, layer_weights,
           model_weights, mix: str, importance: dict | None = None):
    shapes = config.tensor_shapes()

    def matrix(label: str):
        parts = []
        for index, (kind, names) in enumerate(layout[label]):
            rows, cols = sum(shapes[n][0] for n in names), shapes[names[0]][1]
            keep_dtype = SAFETENSORS_STORAGE.get(checkpoint.info(names[0]).dtype, np.float32)
            part = _empty_part(kind, rows, cols, keep_dtype)
            arrays = _arrays(part)
            if entry is not None:
                for suffix, array in arrays.items():
                    entry.read_into(f"{label}.{index}.{suffix}", array)
            else:
                start = 0
                for name in names:
                    n = shapes[name][0]
                    if kind == "keep":
                        checkpoint.read_into(name, part[start : start + n])
                    else:
                        tensor = np.empty(shapes[name], dtype=np.float32)
                        checkpoint.read_into(name, tensor)
                        if kind == "int8":
                            quant.quantize_into(part, start, tensor)
                        else:
                            iw = importance.get(label) if importance else None
                            kquant.pack_into(part, start, kquant.quantize_ggml(tensor, kind, iw), n)
                        del tensor
                    start += n
                if made is not None:
                    made.update({f"{label}.{index}.{suffix}": array for suffix, array in arrays.items()})
            parts.append(part)
        return parts[0] if len(parts) == 1 else RowStack(parts, (sum(p.shape[0] for p in parts), parts[0].shape[1]))

    def norm(name: str) -> np.ndarray:
        out = np.empty(shapes[name], dtype=np.float32)
        checkpoint.read_into(name, out)
        return out

    layers = []
    for i in range(config.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        layers.append(layer_weights(attn_norm=norm(p + "input_layernorm.weight"), wqkv=matrix(q + "wqkv"),
                                    wo=matrix(q + "wo"), mlp_norm=norm(p + "post_attention_layernorm.weight"),
                                    w_gate_up=matrix(q + "w_gate_up"), w_down=matrix(q + "w_down")))
    embed = matrix("embed")
    lm_head = embed if config.tie_word_embeddings else matrix("lm_head")
    return model_weights(embed=embed, layers=layers, final_norm=norm("model.norm.weight"), lm_head=lm_head, dtype=mix)


def bits_per_weight(weights) -> float:
    """Bits held per weight over every matrix and the embedding table (a tied table counted once)."""
    held = [weights.embed] + ([] if weights.lm_head is weights.embed else [weights.lm_head])
    for layer in weights.layers:
        held += [layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down]
    return sum(m.nbytes for m in held) * 8 / sum(int(np.prod(m.shape)) for m in held)
