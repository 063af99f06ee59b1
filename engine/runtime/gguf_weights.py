"""A GGUF file's tensors -> ModelWeights: each matrix repacked by its ggml type's format (engine.runtime.ggml_formats)
into the runtime's weight objects, fused as the NumPy backend runs them (q/k/v -> wqkv, gate/up -> w_gate_up).

Tensor by tensor: the file's rows (a view of its memory map) are repacked into their place in the fused object, then
their pages are dropped from this process (weights.gguf_file.GGUFFile.release), so a load holds the repacked weights
and at most one tensor of the file. The rows of q_proj and k_proj are read in Hugging Face's order (llama.cpp's
converter interleaves each head's halves; rows are whole blocks, so putting them back is exact for every type) and
the rotary embedding runs as it does for a safetensors checkpoint.

Repacked weights are kept on disk (engine/runtime/quant_cache.py) when some matrix is not a plain float type, with
everything else a load needs beside them (the config, the tensors' types, the norms and what the caller adds: the
tokenizer): a later load of the same file (same size, time and first PREFIX_BYTES) memory-maps the entry and reads
nothing of the GGUF file at all (`load_cached`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.config import ModelConfig
from engine.runtime import ggml_formats, quant_cache
from engine.runtime.ggml_formats import GGMLFormat, RowStack, dequantized
from engine.runtime.weights import LayerWeights, ModelWeights, expected_tensors
from weights.gguf_file import GGUFFile, gguf_name

FLOAT_TYPES = ("F32", "F16", "BF16")
# Bump when the loader's cached bytes or extras change for the same file and formats.
GGUF_CACHE_VERSION = 1
# The file's fingerprint hashes its first bytes (the metadata and tensor table of any GGUF lie well within), beside
# its size and modification time.
PREFIX_BYTES = 16 << 20
CHUNK_BYTES = 4 << 20  # file bytes repacked at a time
ROW_ALIGN = 16  # pieces start on whole blocks of the kernel layout's rows (QuantMatrix: 16)


def matrix_types(f: GGUFFile, config: ModelConfig) -> dict[str, str]:
    """Hugging Face name -> ggml type name of every matrix (and the embedding table) the model runs."""
    shapes, _ = expected_tensors(config)
    return {n: f.tensors[n].type_name for n, s in shapes.items() if len(s) == 2 and n in f.tensors}


def weights_label(types: dict[str, str]) -> str:
    """The runtime kind most of the layers' matrices are held in ("int4", "int8", "bfloat16", ...): what the model
    reports as its weights_dtype. Some tensors may be held otherwise (a q4_0 file's output matrix in Q6_K)."""
    kinds = [ggml_formats.lookup(t).kind for n, t in types.items() if ".layers." in n]
    return max(set(kinds), key=kinds.count) if kinds else "float32"


def cache_settings() -> dict:
    """Everything besides the file that decides the cached bytes: the loader's and each format's version."""
    return {"gguf_cache_version": GGUF_CACHE_VERSION,
            "formats": {name: [ggml_formats.lookup(name).kind, getattr(ggml_formats.lookup(name), "version", 1)]
                        for name in ggml_formats.registered()}}


def _cache_key(path: Path) -> tuple[Path, dict] | None:
    if not quant_cache.enabled():
        return None
    try:
        return quant_cache.entry_path(path, "gguf"), quant_cache.entry_key([path], "gguf", cache_settings(),
                                                                           header_bytes=PREFIX_BYTES)
    except OSError:
        return None


def load_cached(path) -> tuple[ModelConfig, ModelWeights, dict] | None:
    """(config, weights, extra) of the GGUF file at `path` from its cache entry, every array a read-only view of the
    mapped entry, or None when there is no valid entry (then load with load_gguf_weights). `extra` holds what the
    first load's caller kept (`load_gguf_weights(..., extra=...)`)."""
    found = _cache_key(Path(path))
    if found is None:
        return None
    entry = quant_cache.open_entry(*found)
    if entry is None:
        return None
    with entry:  # the arrays keep their mapping after the file is closed
        extra = dict(entry.extra)
        try:
            config = ModelConfig.from_dict(extra["config"], source=str(path))
            weights = _assemble(config, extra["types"], False, entry=entry)
        except (KeyError, TypeError, ValueError, OSError):
            return None  # an entry that does not hold this model: the caller loads the file and rewrites it
    return config, weights, extra


def load_gguf_weights(f: GGUFFile, config: ModelConfig, widen: bool = False, extra: dict | None = None) \
        -> ModelWeights:
    """The weights of the GGUF file `f` for `config` (from f.config_dict()): validated against the config, every
    matrix in its ggml type's runtime object (widen=True: every matrix as float32, dequantized exactly: the path
    without compiled kernels for 16-bit types, or weights_dtype=float32), norms float32.

    When some matrix is quantized (and not widened) the result is written to the cache with f.config_dict(), the
    types and `extra` (JSON values) beside it, for `load_cached`. UnsupportedTypeError (a ValueError) for a tensor of
    a type no format runs, before anything is read."""
    shapes, optional = expected_tensors(config)
    f.validate(shapes, optional)
    types = matrix_types(f, config)
    for name, type_name in types.items():
        ggml_formats.lookup(type_name, gguf_name(name))
    found = None if widen or all(t in FLOAT_TYPES for t in types.values()) else _cache_key(f.path)
    made = {} if found is not None else None
    weights = _assemble(config, types, widen, f=f, made=made)
    if found is not None:
        quant_cache.write_entry(*found, made, {**(extra or {}), "config": f.config_dict(), "types": types})
    return weights


def _assemble(config: ModelConfig, types: dict[str, str], widen: bool, f: GGUFFile | None = None,
              entry: quant_cache.Entry | None = None, made: dict | None = None) -> ModelWeights:
    """The ModelWeights: every matrix repacked from the file `f` (its arrays, and the norms, recorded in `made` by
    label) or, given a cache `entry`, mapped from it (ValueError when the entry does not hold it)."""
    shapes, _ = expected_tensors(config)
    float32 = ggml_formats.lookup("F32")
    rotary = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}

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
            order = f.hf_row_order(name, rotary)
            own = ggml_formats.lookup(types[name], gguf_name(name))
            n = shapes[name][0]
            step = max(ROW_ALIGN, CHUNK_BYTES // own.row_bytes(cols) // ROW_ALIGN * ROW_ALIGN)
            for r in range(0, n, step):  # pieces of rows: the repack's temporaries stay a few MB
                rows = slice(r, min(n, r + step))
                blocks = f.rows(name, order[rows] if order is not None else rows)
                if fmt is own:
                    fmt.repack_into(weight, start + r, blocks)
                else:  # widened: the rows in their own format, then their exact float32 values
                    piece = ggml_formats.empty(own, len(blocks), cols)
                    own.repack_into(piece, 0, blocks)
                    fmt.repack_into(weight, start + r, dequantized(piece).view(np.uint8))
                    del piece
                del blocks
                if order is None:
                    f.release(name, rows)
            f.release(name)
            start += n
        if made is not None:
            made.update({f"{label}.{a}": v for a, v in arrays.items()})
        return weight

    def matrix(label: str, names: list[str]):
        """Tensors `names` (one ggml type: one object; several: a RowStack of one object per run of a type)."""
        fmts = [float32 if widen else ggml_formats.lookup(types[n], gguf_name(n)) for n in names]
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
        """A norm's weights as float32 (H,)."""
        if entry is not None:
            return entry.view(f"norm.{name}", np.float32, shapes[name])
        t = f.tensors[name]
        fmt = ggml_formats.lookup(t.type_name, t.file_name)
        piece = ggml_formats.empty(fmt, 1, shapes[name][0])
        fmt.repack_into(piece, 0, f.rows(name))
        f.release(name)
        out = np.ascontiguousarray(dequantized(piece).reshape(shapes[name]), dtype=np.float32)
        if made is not None:
            made[f"norm.{name}"] = out
        return out

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
    label = "float32" if widen else weights_label(types)
    return ModelWeights(embed=embed, layers=layers, final_norm=vector("model.norm.weight"), lm_head=lm_head,
                        dtype=label)
