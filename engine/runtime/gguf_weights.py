"""A GGUF file's tensors -> ModelWeights: each matrix repacked by its ggml type's format (engine.runtime.ggml_formats)
into the runtime's weight objects, fused as the NumPy backend runs them (q/k/v -> wqkv, gate/up -> w_gate_up).

Tensor by tensor: the file's rows (a view of its memory map) are repacked into their place in the fused object, then
their pages are dropped from this process (weights.gguf_file.GGUFFile.release), so a load holds the repacked weights
and at most one tensor of the file. The rows of q_proj and k_proj are read in Hugging Face's order (llama.cpp's
converter interleaves each head's halves; rows are whole blocks, so putting them back is exact for every type) and
the rotary embedding runs as it does for a safetensors checkpoint.

Repacked weights are kept on disk (engine/runtime/quant_cache.py, keyed by the file's size, time and header and the
registered formats' versions) when some matrix is not a plain float type: a later load memory-maps the entry and
touches neither the file's quantized blocks nor any repacking.
"""
from __future__ import annotations

import numpy as np

from engine.config import ModelConfig
from engine.runtime import ggml_formats, quant_cache
from engine.runtime.ggml_formats import GGMLFormat, RowStack, dequantized
from engine.runtime.weights import LayerWeights, ModelWeights, expected_tensors
from weights.gguf_file import GGUFFile, gguf_name

FLOAT_TYPES = ("F32", "F16", "BF16")
# Bump when the loader's cached bytes change for the same file and formats.
GGUF_CACHE_VERSION = 1


def matrix_types(f: GGUFFile, config: ModelConfig) -> dict[str, str]:
    """Hugging Face name -> ggml type name of every matrix (and the embedding table) the model runs."""
    shapes, _ = expected_tensors(config)
    return {n: f.tensors[n].type_name for n, s in shapes.items() if len(s) == 2 and n in f.tensors}


def weights_label(types: dict[str, str]) -> str:
    """The runtime kind most of the layers' matrices are held in ("int4", "int8", "bfloat16", ...): what the model
    reports as its weights_dtype. Some tensors may be held otherwise (a q4_0 file's output matrix in Q6_K)."""
    kinds = [ggml_formats.lookup(t).kind for n, t in types.items() if ".layers." in n]
    return max(set(kinds), key=kinds.count) if kinds else "float32"


def load_gguf_weights(f: GGUFFile, config: ModelConfig, widen: bool = False) -> ModelWeights:
    """The weights of the GGUF file `f` for `config` (from f.config_dict()): validated against the config, every
    matrix in its ggml type's runtime object (widen=True: every matrix as float32, dequantized exactly: the path
    without compiled kernels for 16-bit types, or weights_dtype=float32), norms float32.

    UnsupportedTypeError (a ValueError) for a tensor of a type no format runs, before anything is read."""
    shapes, optional = expected_tensors(config)
    f.validate(shapes, optional)
    types = matrix_types(f, config)
    for name, type_name in types.items():
        ggml_formats.lookup(type_name, gguf_name(name))
    raw_config = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    cached = not widen and any(t not in FLOAT_TYPES for t in types.values()) and quant_cache.enabled()
    entry, made = None, None
    if cached:
        path = quant_cache.entry_path(f.path, "gguf")
        try:
            key = quant_cache.entry_key([f.path], "gguf", cache_settings(), header_bytes=f.header_bytes)
        except OSError:
            cached = False
        else:
            entry = quant_cache.open_entry(path, key)
            if entry is not None:
                with entry:  # the arrays keep their mapping after the file is closed
                    try:
                        return _assemble(f, config, shapes, raw_config, widen, entry, None)
                    except (ValueError, OSError):
                        pass  # an entry that does not hold these matrices: repack and rewrite it
            made = {}
    weights = _assemble(f, config, shapes, raw_config, widen, None, made)
    if cached and made is not None:
        quant_cache.write_entry(path, key, made)
    return weights


def cache_settings() -> dict:
    """Everything besides the file that decides the repacked bytes: the loader's and each format's version."""
    return {"gguf_cache_version": GGUF_CACHE_VERSION,
            "formats": {name: [ggml_formats.lookup(name).kind, getattr(ggml_formats.lookup(name), "version", 1)]
                        for name in ggml_formats.registered()}}


def _assemble(f: GGUFFile, config: ModelConfig, shapes: dict, raw_config: dict, widen: bool,
              entry: quant_cache.Entry | None, made: dict | None) -> ModelWeights:
    """The ModelWeights, every matrix repacked from the file (its arrays recorded in `made` by label) or, given a
    cache `entry`, mapped from it (ValueError when the entry does not hold it)."""
    float32 = ggml_formats.lookup("F32")

    def part(label: str, fmt: GGMLFormat, names: list[str]):
        """One weight object of `fmt` holding tensors `names` stacked row-wise."""
        rows, cols = sum(shapes[n][0] for n in names), shapes[names[0]][1]
        layout = fmt.layout(rows, cols)
        if entry is not None:
            return fmt.build(rows, cols, {a: entry.view(f"{label}.{a}", dtype, shape)
                                          for a, (dtype, shape) in layout.items()})
        arrays = {a: np.zeros(shape, dtype) for a, (dtype, shape) in layout.items()}
        weight = fmt.build(rows, cols, arrays)
        start = 0
        for name in names:
            blocks = f.rows(name, f.hf_row_order(name, raw_config))
            own = ggml_formats.lookup(f.tensors[name].type_name, f.tensors[name].file_name)
            if fmt is own:
                fmt.repack_into(weight, start, blocks)
            else:  # widened: the tensor in its own format, then its exact float32 values
                piece = ggml_formats.empty(own, len(blocks), cols)
                own.repack_into(piece, 0, blocks)
                fmt.repack_into(weight, start, dequantized(piece).view(np.uint8))
                del piece
            del blocks
            f.release(name)
            start += shapes[name][0]
        if made is not None:
            made.update({f"{label}.{a}": v for a, v in arrays.items()})
        return weight

    def matrix(label: str, names: list[str]):
        """Tensors `names` (one ggml type: one object; several: a RowStack of one object per type run)."""
        fmts = [float32 if widen else ggml_formats.lookup(f.tensors[n].type_name, f.tensors[n].file_name)
                for n in names]
        if all(fmt is fmts[0] for fmt in fmts):
            return part(label, fmts[0], names)
        parts, i = [], 0
        while i < len(names):
            j = i
            while j < len(names) and fmts[j] is fmts[i]:
                j += 1
            parts.append(part(f"{label}.{len(parts)}", fmts[i], names[i:j]))
            i = j
        return RowStack(parts, (sum(shapes[n][0] for n in names), shapes[names[0]][1]))

    def vector(name: str) -> np.ndarray:
        t = f.tensors[name]
        fmt = ggml_formats.lookup(t.type_name, t.file_name)
        piece = ggml_formats.empty(fmt, 1, shapes[name][0])
        fmt.repack_into(piece, 0, f.rows(name))
        f.release(name)
        return np.ascontiguousarray(dequantized(piece).reshape(shapes[name]), dtype=np.float32)

    layers = []
    for i in range(config.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        layers.append(LayerWeights(
            attn_norm=vector(p + "input_layernorm.weight"),
            wqkv=matrix(q + "wqkv", [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                                     p + "self_attn.v_proj.weight"]),
            wo=matrix(q + "wo", [p + "self_attn.o_proj.weight"]),
            mlp_norm=vector(p + "post_attention_layernorm.weight"),
            w_gate_up=matrix(q + "w_gate_up", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
            w_down=matrix(q + "w_down", [p + "mlp.down_proj.weight"]),
        ))
    embed = matrix("embed", ["model.embed_tokens.weight"])
    lm_head = embed if config.tie_word_embeddings else matrix("lm_head", ["lm_head.weight"])
    label = "float32" if widen else weights_label(matrix_types(f, config))
    return ModelWeights(embed=embed, layers=layers, final_norm=vector("model.norm.weight"), lm_head=lm_head,
                        dtype=label)
