"""ModelWeights: a checkpoint's tensors in the layout the forward pass uses, in the checkpoint's own dtype.

Hugging Face's [out_features, in_features] layout is kept (y = x @ W.T reads W row by row, the fastest way), and
the projections that read the same input are fused into one matrix: q/k/v into `wqkv`, gate/up into `w_gate_up`.
Each tensor is copied straight from the memory-mapped file into its slice of the fused array: no second copy.

The matrices and the embedding table stay in the checkpoint's 16-bit dtype when the compiled kernels can use them
(bfloat16 as uint16 arrays holding the bf16 bits, float16 as float16 arrays): the kernels widen each value exactly to
float32 in registers, so the products are those of the float32 weights while each decoded token reads half the bytes.
Otherwise (or with weights_dtype="float32") they are widened to float32 at load. Norm weights are always float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import ModelConfig
from engine.errors import EngineError
from engine.runtime import kquant_mix, quant, quant_cache
from engine.runtime.ggml_formats import held_arrays
from engine.runtime.quant import QuantMatrix
from weights.checkpoint import Checkpoint

# weights_dtype name -> NumPy storage dtype of the matrices and the embedding table
STORAGE = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16)}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
WEIGHTS_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "int8", "int4") + kquant_mix.MIXES
# Quantized models: the format of the lm_head (and of a tied embedding table) per weights_dtype. int4 keeps the
# lm_head int8 (as llama.cpp's q4_0 keeps its output matrix at 6 bits): docs/weights.md.
LM_HEAD_KIND = {"int8": "int8", "int4": "int8"}
# An int4 model keeps int8 the matrices whose rows are not whole groups of 32 (stories260K's down projection, 172
# wide), as llama.cpp's q4_0 falls back to a wider type there; measured on stories260K (512 tokens of text): mean KL
# 0.085 with those rows padded to int4, 0.065 with them int8 (llama.cpp q4_0: 0.065). The one-call layers need one
# kind per stack, so such a model runs the layer loop (TinyLlama's rows are all whole groups).
INT4_WHOLE_GROUPS_ONLY = True


@dataclass
class LayerWeights:
    """One decoder layer (H = hidden, I = intermediate, Q = heads*head_dim, KV = kv_heads*head_dim).

    Matrices in the model's storage dtype (float32, uint16 bf16 bits or float16); norms float32."""

    attn_norm: np.ndarray  # (H,) float32
    wqkv: np.ndarray  # (Q + 2*KV, H): rows of q_proj, then k_proj, then v_proj
    wo: np.ndarray  # (H, Q)
    mlp_norm: np.ndarray  # (H,) float32
    w_gate_up: np.ndarray  # (2*I, H): rows of gate_proj, then up_proj
    w_down: np.ndarray  # (H, I)


@dataclass
class ModelWeights:
    """All weights of a Llama model; `dtype` names how the matrices and the embedding table are stored."""

    embed: np.ndarray  # (vocab, H)
    layers: list[LayerWeights]
    final_norm: np.ndarray  # (H,) float32
    lm_head: np.ndarray  # (vocab, H); the same array as `embed` when embeddings are tied
    dtype: str = "float32"  # "float32" | "bfloat16" (uint16 arrays of bf16 bits) | "float16" | "int8" | "int4"

    def arrays(self) -> list[np.ndarray]:
        """Every weight array once (a tied lm_head is the embedding table; a QuantMatrix is its data and scales)."""
        held = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            held += [layer.attn_norm, layer.wqkv, layer.wo, layer.mlp_norm, layer.w_gate_up, layer.w_down]
        arrays = []
        for a in held:
            arrays += held_arrays(a)
        return arrays

    @property
    def nbytes(self) -> int:
        """Bytes of all weight arrays (a tied lm_head counted once)."""
        return sum(a.nbytes for a in self.arrays())

    def decode_bytes(self) -> int:
        """Bytes one decoded token reads: every matrix and the lm_head; of the embedding table only one row, unless
        it is tied (then it is the lm_head, read whole)."""
        embed_row = 0 if self.lm_head is self.embed else self.embed.nbytes // self.embed.shape[0]
        return self.nbytes - self.embed.nbytes + embed_row + (self.embed.nbytes if self.lm_head is self.embed else 0)


def is_quantized(weights: "ModelWeights") -> bool:
    """Whether any layer matrix is held in a quantized format (int8 / int4, llama.cpp's block formats): every row of
    those runs on the compiled kernels."""
    return any(not isinstance(m, np.ndarray) for layer in weights.layers
               for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))


def widen(a: np.ndarray) -> np.ndarray:
    """A weight array (float32, uint16 bf16 bits, float16, or a QuantMatrix) as float32 with the same values (a copy
    unless float32; a QuantMatrix dequantized)."""
    if not isinstance(a, np.ndarray):  # a QuantMatrix, or another format's weight object (ggml_formats' protocol)
        return a.dequantize()
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def embed_rows(table: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """Rows of the embedding table (vocab, H) in its storage dtype -> (len(token_ids), H) float32, widened exactly
    (a quantized table: those rows dequantized)."""
    if not isinstance(table, np.ndarray):  # a QuantMatrix, or another format's weight object
        return table.dequantize(np.asarray(token_ids))
    return widen(table[token_ids])


def expected_tensors(config: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(name -> shape of every tensor the config implies, names that may be absent: lm_head when tied)."""
    return config.tensor_shapes(), ({"lm_head.weight"} if config.tie_word_embeddings else set())


def stored_dtype(checkpoint: Checkpoint, config: ModelConfig) -> str:
    """The dtype the checkpoint stores its matrices and embedding table in: "bfloat16", "float16" or "float32"
    (also "float32" when they are mixed, the one dtype that holds every bf16 and fp16 value exactly)."""
    shapes, _ = expected_tensors(config)
    names = [n for n, shape in shapes.items() if len(shape) == 2 and n in checkpoint.names]
    found = {SAFETENSORS_DTYPES[checkpoint.info(n).dtype] for n in names}
    return found.pop() if len(found) == 1 else "float32"


def choose_weights_dtype(requested: str, stored: str, kernels_available: bool, kernels_detail: str = "") \
        -> tuple[str, str]:
    """(dtype to hold the weights in, why) for weights_dtype=`requested` on a checkpoint stored as `stored`.

    "auto" keeps 16-bit weights 16-bit when the compiled kernels can multiply them (widened exactly in registers),
    and widens them to float32 otherwise; "float32" always widens; "bfloat16"/"float16" must name the checkpoint's
    own dtype (converting between them would change the weights). EngineError for anything else."""
    if requested not in WEIGHTS_DTYPE_CHOICES:
        raise EngineError(f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPE_CHOICES)}, got {requested!r}")
    if requested == "float32":
        return "float32", "asked for (weights_dtype=float32)"
    if requested in quant.KINDS:
        how = "the kernels' integer pair dot products" if kernels_available else \
            f"dequantized per block for OpenBLAS: the compiled kernels are not available ({kernels_detail})"
        return requested, (f"quantized at load from the checkpoint's {stored} values (groups of {quant.GROUP}, "
                           f"float16 scales), {how}")
    if requested in kquant_mix.MIXES:
        if not kernels_available:
            raise EngineError(f"weights_dtype={requested} needs the compiled kernels (its quantizer is theirs), which "
                              f"are not available here: {kernels_detail}; use int4 or int8")
        return requested, (f"quantized at load from the checkpoint's {stored} values into llama.cpp's {requested} mix "
                           f"by our quantizer (Q4_K, Q6_K for the output and some v / down projections), the kernels' "
                           f"byte dot products on int16 activations")
    if stored == "float32":
        if requested != "auto":
            raise EngineError(f"weights_dtype={requested} but the checkpoint stores float32 weights; rounding them to "
                              f"{requested} would change them (use auto or float32)")
        return "float32", "the checkpoint's dtype"
    if requested not in ("auto", stored):
        raise EngineError(f"weights_dtype={requested} but the checkpoint stores {stored} weights; converting would "
                          f"change them (use auto, {stored} or float32)")
    if not kernels_available:
        return "float32", f"widened at load: the compiled kernels are not available ({kernels_detail})"
    return stored, "the checkpoint's dtype, widened in the kernels"


def load_model_weights(checkpoint: Checkpoint, config: ModelConfig, dtype: str = "float32", importance=None,
                       importance_settings: dict | None = None) -> ModelWeights:
    """Validate `checkpoint` against `config`, then read every tensor into the fused arrays, matrices and embedding
    table stored as `dtype` ("float32", or the checkpoint's own "bfloat16"/"float16", or quantized "int8"/"int4":
    see load_quantized, or a mix of llama.cpp's block formats, "q4_k_m": engine.runtime.kquant_mix, whose quantizer
    may weigh columns by `importance`), norms as float32."""
    shapes, optional = expected_tensors(config)
    checkpoint.validate(shapes, optional)
    if dtype in quant.KINDS:
        return load_quantized(checkpoint, config, dtype)
    if dtype in kquant_mix.MIXES:
        return kquant_mix.load_mix(checkpoint, config, dtype, LayerWeights, ModelWeights, importance,
                                   importance_settings)
    storage = STORAGE[dtype]

    def read(name: str, as_dtype=storage) -> np.ndarray:
        """Tensor `name` as a new array of `as_dtype`."""
        out = np.empty(shapes[name], dtype=as_dtype)
        checkpoint.read_into(name, out)
        return out

    def read_rows(names: list[str]) -> np.ndarray:
        """Tensors `names` stacked row-wise into one new array: (sum of their rows, in_features)."""
        rows = sum(shapes[n][0] for n in names)
        out = np.empty((rows,) + shapes[names[0]][1:], dtype=storage)
        start = 0
        for name in names:
            n = shapes[name][0]
            checkpoint.read_into(name, out[start : start + n])
            start += n
        return out

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                attn_norm=read(p + "input_layernorm.weight", np.float32),
                wqkv=read_rows([p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"]),
                wo=read(p + "self_attn.o_proj.weight"),
                mlp_norm=read(p + "post_attention_layernorm.weight", np.float32),
                w_gate_up=read_rows([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                w_down=read(p + "mlp.down_proj.weight"),
            )
        )
    embed = read("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings else read("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, final_norm=read("model.norm.weight", np.float32), lm_head=lm_head,
                        dtype=dtype)


# Bump when the quantized bytes change for the same weights (the cache's entries written before are then not used).
# 2: integers stored offset to unsigned bytes, 4 columns of 16 rows per 64 bytes (VNNI's byte dot product).
QUANT_FORMAT_VERSION = 2


def quant_settings() -> dict:
    """Everything besides the checkpoint that decides the quantized bytes (the on-disk cache's key)."""
    return {"format_version": QUANT_FORMAT_VERSION, "group": quant.GROUP, "block_rows": quant.BLOCK_ROWS,
            "int4_divisors": list(quant.INT4_DIVISORS), "lm_head_kind": LM_HEAD_KIND,
            "int4_whole_groups_only": INT4_WHOLE_GROUPS_ONLY}


# Float32 bytes of a tensor read at a time to be quantized (a piece of rows): the load's peak is the quantized
# weights plus this (the whole embedding table in float32 was 262 MB on TinyLlama, 1.5x an int4 model's bytes).
QUANTIZE_PIECE_BYTES = 8 << 20


def load_quantized(checkpoint: Checkpoint, config: ModelConfig, kind: str) -> ModelWeights:
    """The weights of a validated checkpoint with every matrix quantized to `kind` ("int8" | "int4"; the lm_head and
    a tied embedding table to LM_HEAD_KIND[kind]), norms float32. Each tensor is read as float32 a piece of rows at a
    time (QUANTIZE_PIECE_BYTES), each piece quantized straight into its rows of the fused QuantMatrix.

    The result is kept on disk (engine/runtime/quant_cache.py, keyed by the checkpoint's files and the quantizer's
    settings): a later load of the same checkpoint reads the integers and scales back instead of quantizing."""
    if not quant_cache.enabled():
        return _quantize_checkpoint(checkpoint, config, kind, None)
    path = quant_cache.entry_path(checkpoint.folder, kind)
    try:
        key = quant_cache.entry_key([f.path for f in checkpoint.files], kind, quant_settings())
    except OSError:
        return _quantize_checkpoint(checkpoint, config, kind, None)
    entry = quant_cache.open_entry(path, key)
    if entry is not None:
        with entry:
            try:
                return _quantize_checkpoint(checkpoint, config, kind, None, entry)
            except (ValueError, OSError):
                pass  # an entry that does not hold these matrices: quantize and rewrite it
    matrices: dict[str, QuantMatrix] = {}
    weights = _quantize_checkpoint(checkpoint, config, kind, matrices)
    arrays = {}
    for label, m in matrices.items():
        arrays[label + ".data"], arrays[label + ".scales"] = m.data, m.scales
    quant_cache.write_entry(path, key, arrays)
    return weights


def _quantize_checkpoint(checkpoint: Checkpoint, config: ModelConfig, kind: str,
                         made: dict[str, QuantMatrix] | None, entry: quant_cache.Entry | None = None) -> ModelWeights:
    """load_quantized's weights: each matrix quantized from the checkpoint (and recorded in `made` under its label),
    or, given a cache `entry`, read from it (ValueError when the entry does not hold it in this kind and shape)."""
    shapes, _ = expected_tensors(config)

    def quantized(label: str, names: list[str], as_kind: str = kind) -> QuantMatrix:
        """Tensors `names` quantized and stacked row-wise into one QuantMatrix (rows, in_features); int4 rows whose
        length is not a multiple of the group stay int8 (INT4_WHOLE_GROUPS_ONLY)."""
        rows, cols = sum(shapes[n][0] for n in names), shapes[names[0]][1]
        if as_kind == "int4" and cols % quant.GROUP and INT4_WHOLE_GROUPS_ONLY:
            as_kind = "int8"
        out = quant.empty(as_kind, rows, cols)
        if entry is not None:
            entry.read_into(label + ".data", out.data)
            entry.read_into(label + ".scales", out.scales)
            return out
        start = 0
        for name in names:
            n, k = shapes[name]
            step = max(1, QUANTIZE_PIECE_BYTES // (4 * k))
            piece = np.empty((min(step, n), k), dtype=np.float32)
            for r in range(0, n, step):
                rows = piece[: min(step, n - r)]
                checkpoint.read_into(name, rows, first=r * k)
                quant.quantize_into(out, start + r, rows)
            start += n
            del piece
        if made is not None:
            made[label] = out
        return out

    def norm(name: str) -> np.ndarray:
        out = np.empty(shapes[name], dtype=np.float32)
        checkpoint.read_into(name, out)
        return out

    layers = []
    for i in range(config.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        layers.append(
            LayerWeights(
                attn_norm=norm(p + "input_layernorm.weight"),
                wqkv=quantized(q + "wqkv", [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                                            p + "self_attn.v_proj.weight"]),
                wo=quantized(q + "wo", [p + "self_attn.o_proj.weight"]),
                mlp_norm=norm(p + "post_attention_layernorm.weight"),
                w_gate_up=quantized(q + "w_gate_up", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                w_down=quantized(q + "w_down", [p + "mlp.down_proj.weight"]),
            )
        )
    head_kind = LM_HEAD_KIND[kind]
    if config.tie_word_embeddings:
        embed = lm_head = quantized("embed", ["model.embed_tokens.weight"], head_kind)
    else:
        embed = quantized("embed", ["model.embed_tokens.weight"])
        lm_head = quantized("lm_head", ["lm_head.weight"], head_kind)
    return ModelWeights(embed=embed, layers=layers, final_norm=norm("model.norm.weight"), lm_head=lm_head, dtype=kind)
