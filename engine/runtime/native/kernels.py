"""The kernels one call at a time: NumPy arrays in, checked, passed to the library (matmuls, the quantized and
block-format matmuls and their packing, widening, SwiGLU, RMSNorm, rotary, attention, a decode step's attention)."""
from __future__ import annotations

import ctypes

import numpy as np

from .library import _require


WEIGHT_TYPES = {np.dtype(np.float32): 0, np.dtype(np.uint16): 1, np.dtype(np.float16): 2}  # uint16: bf16 bits
QUANT_TYPES = {"int8": 3, "int4": 4}  # quantized weights (engine.runtime.quant.QuantMatrix), kernels.h's W_Q8 / W_Q4
QMATMUL_BUILDS = ("portable", "avx2", "avx512 (vpmaddwd)", "avx512 VNNI (vpdpbusd)")
KMATMUL_BUILDS = ("portable", "avx2", "avx512 (vpmaddubsw)", "avx512 VNNI (vpdpbusd)")
# llama.cpp's block formats (engine.runtime.kquant.KQuantMatrix.kind), kernels.h's W_Q4_1 .. W_Q6_K
KQUANT_TYPES = {"q4_1": 5, "q5_0": 6, "q5_1": 7, "q2_k": 8, "q3_k": 9, "q4_k": 10, "q5_k": 11, "q6_k": 12}


def _rows_contiguous(a: np.ndarray) -> bool:
    return a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == a.itemsize) and a.strides[0] % a.itemsize == 0


def matmul_xwt(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T. x: (M, K) float32; w: (N, K) float32, uint16 (bfloat16 bits) or float16 -> (M, N) float32.

    Rows of x, w and out must be contiguous (any row stride); `status().available` must be true."""
    lib = _require()
    wtype = WEIGHT_TYPES.get(w.dtype)
    if x.dtype != np.float32 or wtype is None or x.ndim != 2 or w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"matmul_xwt needs float32 x (M, K) and a float32/bfloat16/float16 w (N, K); got "
                         f"{x.dtype}{x.shape}, {w.dtype}{w.shape}")
    if not _rows_contiguous(x) or not _rows_contiguous(w):
        raise ValueError("matmul_xwt needs rows of x and w contiguous")
    (m, k), n = x.shape, w.shape[0]
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
    elif out.shape != (m, n) or out.dtype != np.float32 or not _rows_contiguous(out):
        raise ValueError(f"matmul_xwt's out must be float32 ({m}, {n}) with contiguous rows")
    lib.lib.tl_matmul(lib.isa, x.ctypes.data, x.strides[0] // 4, w.ctypes.data, w.strides[0] // w.itemsize, wtype,
                      out.ctypes.data, out.strides[0] // 4, m, n, k, lib.threads)
    return out


def qmatmul_build() -> str:
    """Which build of the quantized matmul the variant in use runs (e.g. "avx512 VNNI (vpdpwssd)")."""
    lib = _require()
    return QMATMUL_BUILDS[lib.lib.tl_qmatmul_build(lib.isa)]


def quantize_into(m, start: int, w: np.ndarray) -> None:
    """Quantize the float32 rows w (n, K) into rows start..start+n of the QuantMatrix m (quantize.c: the arithmetic
    of engine.runtime.quant.quantize_groups), on the kernels' threads."""
    lib = _require()
    kind = QUANT_TYPES.get(m.kind)
    if w.dtype != np.float32 or w.ndim != 2 or w.shape[1] != m.shape[1] or not _rows_contiguous(w) \
            or start < 0 or start + w.shape[0] > m.shape[0] or not m.data.flags.c_contiguous:
        raise ValueError(f"quantize_into: rows {w.dtype}{w.shape} at {start} do not fit {m.kind}{m.shape}")
    lib.lib.tl_quantize(kind, w.ctypes.data, w.strides[0] // 4, w.shape[0], w.shape[1], start, m.data.ctypes.data,
                        m.scales.ctypes.data, m.groups, lib.threads)


GGML_BLOCK_BYTES = {"int8": 34, "int4": 18}  # Q8_0's and Q4_0's blocks of 32 weights


def repack_ggml_into(m, start: int, blocks: np.ndarray) -> None:
    """Rows start..start+n of the QuantMatrix m (int8 | int4) from a GGUF file's Q8_0 | Q4_0 rows: blocks uint8
    (n, groups * 34 | 18) with contiguous rows (quantize.c: the file's scales and integers moved into the layout,
    exactly), on the kernels' threads."""
    lib = _require()
    kind, row_bytes = QUANT_TYPES.get(m.kind), m.groups * GGML_BLOCK_BYTES.get(m.kind, 0)
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != row_bytes or blocks.strides[1] != 1 \
            or start < 0 or start + blocks.shape[0] > m.shape[0] or not m.data.flags.c_contiguous \
            or not m.scales.flags.c_contiguous or m.shape[1] != m.padded_cols:
        raise ValueError(f"repack_ggml_into: rows {blocks.dtype}{blocks.shape} at {start} do not fit "
                         f"{m.kind}{m.shape}")
    lib.lib.tl_repack_ggml(kind, blocks.ctypes.data, blocks.strides[0], blocks.shape[0], start, m.data.ctypes.data,
                           m.scales.ctypes.data, m.groups, lib.threads)


def qmatmul_xwt(x: np.ndarray, w, out: np.ndarray | None = None, build: str | None = None) -> np.ndarray:
    """y = x @ W.T for x (M, K) float32 (contiguous rows) and a quantized W (N, K) (engine.runtime.quant.QuantMatrix,
    int8 or int4) -> (M, N) float32. Activations are rounded to int16 per group of 32 inside (quant.h). build: one of
    QMATMUL_BUILDS to run instead of the variant's own (the tests compare them; ValueError where it cannot run)."""
    lib = _require()
    (n, k), kind = w.shape, QUANT_TYPES.get(w.kind)
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != k or not _rows_contiguous(x) or kind is None \
            or not w.data.flags.c_contiguous or not w.scales.flags.c_contiguous:
        raise ValueError(f"qmatmul_xwt needs float32 x (M, {k}) with contiguous rows; got {x.dtype}{x.shape}")
    m = x.shape[0]
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
    elif out.shape != (m, n) or out.dtype != np.float32 or not _rows_contiguous(out):
        raise ValueError(f"qmatmul_xwt's out must be float32 ({m}, {n}) with contiguous rows")
    args = (x.ctypes.data, x.strides[0] // 4, w.data.ctypes.data, w.scales.ctypes.data, kind, out.ctypes.data,
            out.strides[0] // 4, m, n, k, lib.threads)
    if build is None:
        lib.lib.tl_qmatmul(lib.isa, *args)
    elif build not in QMATMUL_BUILDS or lib.lib.tl_qmatmul_on(QMATMUL_BUILDS.index(build), *args) != 0:
        raise ValueError(f"quantized matmul build {build!r} cannot run here (usable: {', '.join(qmatmul_builds())})")
    return out


def qmatmul_builds() -> list[str]:
    """The builds of the quantized matmul this CPU runs (QMATMUL_BUILDS' names), whichever the dispatch picks."""
    lib = _require()
    x, data, scales = np.zeros(32, np.float32), np.zeros(512, np.uint8), np.zeros(16, np.uint16)  # one int8 block
    out = np.empty(1, dtype=np.float32)
    return [name for i, name in enumerate(QMATMUL_BUILDS)
            if lib.lib.tl_qmatmul_on(i, x.ctypes.data, 32, data.ctypes.data, scales.ctypes.data, QUANT_TYPES["int8"],
                                     out.ctypes.data, 1, 1, 1, 32, 1) == 0]


def widen_into(w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (N, K) float32 = w (N, K) uint16 (bf16 bits) or float16, widened exactly on the kernels' threads."""
    lib = _require()
    wtype = WEIGHT_TYPES.get(w.dtype)
    if wtype not in (1, 2) or out.dtype != np.float32 or out.shape != w.shape or not _rows_contiguous(w) \
            or not _rows_contiguous(out):
        raise ValueError(f"widen_into needs a 16-bit w and a float32 out of its shape; got {w.dtype}{w.shape}, "
                         f"{out.dtype}{out.shape}")
    lib.lib.tl_widen(lib.isa, w.ctypes.data, w.strides[0] // w.itemsize, wtype, out.ctypes.data,
                     out.strides[0] // 4, w.shape[0], w.shape[1], lib.threads)
    return out


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    """SwiGLU with the compiled kernel. gate_up: (N, 2 * I) float32, gate columns first -> (N, I) float32,
    silu(gate) * up with silu(x) = x / (1 + e^-x) (a vectorised exp within 2 ulp of NumPy's)."""
    lib = _require()
    if gate_up.dtype != np.float32 or gate_up.ndim != 2 or gate_up.shape[1] % 2 or not _rows_contiguous(gate_up):
        raise ValueError(f"swiglu needs a float32 (N, 2I) array with contiguous rows, got {gate_up.dtype}{gate_up.shape}")
    m, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = np.empty((m, inter), dtype=np.float32)
    lib.lib.tl_swiglu(lib.isa, gate_up.ctypes.data, gate_up.strides[0] // 4, out.ctypes.data, inter, m, inter,
                      lib.threads)
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, residual: np.ndarray | None = None):
    """RMSNorm with the compiled kernel, the operations of engine.runtime.layers.rms_norm. x, residual: (N, H)
    float32 with contiguous rows; weight: (H,) float32 -> h (N, H), or with `residual` (x + residual, h): the residual
    add and the norm in one pass."""
    lib = _require()
    m, hidden = x.shape
    if x.dtype != np.float32 or weight.dtype != np.float32 or weight.shape != (hidden,) or not _rows_contiguous(x) \
            or (residual is not None and (residual.shape != x.shape or residual.dtype != np.float32
                                          or not _rows_contiguous(residual))):
        raise ValueError("rms_norm needs float32 x (N, H), weight (H,) and residual like x, with contiguous rows")
    h = np.empty((m, hidden), dtype=np.float32)
    summed = np.empty((m, hidden), dtype=np.float32) if residual is not None else None
    lib.lib.tl_rms_norm(lib.isa, x.ctypes.data, x.strides[0] // 4, None if residual is None else residual.ctypes.data,
                        0 if residual is None else residual.strides[0] // 4, np.ascontiguousarray(weight).ctypes.data,
                        float(eps), None if summed is None else summed.ctypes.data, h.ctypes.data, hidden, m, hidden,
                        lib.threads)
    return h if residual is None else (summed, h)


def rotary_(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, heads: int,
            head_dim: int) -> None:
    """The rotary embedding in place on the first `heads` heads of each row of x (N, >= heads * head_dim) float32
    (rows contiguous), row n at positions[n]; cos, sin: (positions, head_dim) float32 tables (HF's halves)."""
    lib = _require()
    pos = np.ascontiguousarray(positions, dtype=np.int64)
    if (x.dtype != np.float32 or not _rows_contiguous(x) or x.shape[1] < heads * head_dim or head_dim % 2
            or cos.dtype != np.float32 or sin.dtype != np.float32 or not cos.flags.c_contiguous
            or not sin.flags.c_contiguous or cos.shape[1] != head_dim or pos.shape != (x.shape[0],)
            or (pos.size and (pos.min() < 0 or pos.max() >= cos.shape[0]))):
        raise ValueError("rotary_ needs a float32 x with contiguous rows, positions inside the tables")
    lib.lib.tl_rotary(lib.isa, x.ctypes.data, x.strides[0] // 4, pos.ctypes.data, cos.ctypes.data, sin.ctypes.data,
                      x.shape[0], heads, head_dim, lib.threads)


ATTENTION_MAX_HEAD_DIM = 512


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int, out: np.ndarray | None = None,
              return_probs: bool = False):
    """Causal GQA attention with the compiled kernel; the arguments and result of engine.runtime.layers.attention.

    q: (T, n_heads, head_dim) float32 at positions start_pos.. ; k, v: (n_kv_heads, L, head_dim) float32 views with
    contiguous rows (a KV cache layer), L == start_pos + T when return_probs, else >= -> (T, n_heads * head_dim)
    float32, and with return_probs the post-softmax probabilities (n_heads, T, start_pos + T) float32 (exact zeros
    above the diagonal; the output is the same bits either way)."""
    lib = _require()
    t, n_heads, head_dim = q.shape
    n_kv, length, kd = k.shape
    if (q.dtype != np.float32 or k.dtype != np.float32 or v.dtype != np.float32 or k.shape != v.shape
            or kd != head_dim or n_heads % n_kv or length < start_pos + t or head_dim > ATTENTION_MAX_HEAD_DIM):
        raise ValueError(f"attention: q {q.dtype}{q.shape}, k {k.dtype}{k.shape}, v {v.dtype}{v.shape}, "
                         f"start {start_pos} do not fit")
    if k.strides != v.strides or k.strides[2] != 4 or k.strides[1] % 4 or k.strides[0] % 4:
        raise ValueError("attention: k and v need contiguous rows and the same strides")
    if q.strides[2] != 4 or q.strides[1] != 4 * head_dim:
        q = np.ascontiguousarray(q)
    if out is None:
        out = np.empty((t, n_heads * head_dim), dtype=np.float32)
    probs = np.empty((n_heads, t, start_pos + t), dtype=np.float32) if return_probs else None
    lib.lib.tl_attention(lib.isa, q.ctypes.data, q.strides[0] // 4, t, n_heads, head_dim, k.ctypes.data,
                         v.ctypes.data, k.strides[0] // 4, k.strides[1] // 4, n_kv, start_pos,
                         float(1.0 / np.sqrt(head_dim)), out.ctypes.data, out.strides[0] // 4,
                         None if probs is None else probs.ctypes.data, lib.threads)
    return (out, probs) if return_probs else out


def kmatmul_build() -> str:
    """Which build of the block-format matmul (kquant.h) the variant in use runs (e.g. "avx512 VNNI (vpdpbusd)")."""
    lib = _require()
    return KMATMUL_BUILDS[lib.lib.tl_kmatmul_build(lib.isa)]


def kpack(kind: str, rows: np.ndarray, k: int, start: int, dst: np.ndarray) -> None:
    """Rows start..start+n of a block-format matrix of `kind` and k columns, held in the kernel layout `dst` (uint8,
    C-contiguous, sized and zeroed for all its rows), from ggml's blocks of those rows: `rows` uint8 (n, ggml's row
    bytes), C-contiguous (kquant_pack.c's tl_kpack)."""
    lib = _require()
    code = KQUANT_TYPES[kind]
    n = rows.shape[0]
    if (rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != lib.lib.tl_kggml_row_bytes(code, k)
            or not rows.flags.c_contiguous or dst.dtype != np.uint8 or not dst.flags.c_contiguous or start < 0
            or (start + n + 15) // 16 > dst.shape[0]):
        raise ValueError(f"kpack: {rows.dtype}{rows.shape} at row {start} does not fit {kind} of {k} columns")
    lib.lib.tl_kpack(code, rows.ctypes.data, n, k, start, dst.ctypes.data, lib.threads)


def kdequant(kind: str, data: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """Rows idx of a block-format matrix held in the kernel layout `data` -> float32 (len(idx), k): the file's values,
    computed as gguf.quants.dequantize computes them."""
    lib = _require()
    rows = np.ascontiguousarray(idx, dtype=np.int64)
    if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() // 16 >= data.shape[0])) \
            or not data.flags.c_contiguous:
        raise ValueError(f"kdequant: rows out of range for a {kind} matrix of {data.shape[0]} row blocks")
    out = np.empty((rows.size, k), dtype=np.float32)
    lib.lib.tl_kdequant(KQUANT_TYPES[kind], data.ctypes.data, k, rows.ctypes.data, rows.size, out.ctypes.data,
                        lib.threads)
    return out


def kquantize(kind: str, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows w (n, K), K whole blocks of `kind` ("q4_k", "q5_k", "q6_k", "q5_0") -> ggml's blocks as uint8
    (n, row bytes): our quantizer (kquant_quantize.c), weighted by `importance` (K,) float32 > 0 per column."""
    lib = _require()
    n, k = w.shape
    code = KQUANT_TYPES[kind]
    if w.dtype != np.float32 or not _rows_contiguous(w):
        raise ValueError(f"kquantize: {w.dtype}{w.shape} is not float32 rows")
    iw = None
    if importance is not None:
        iw = np.ascontiguousarray(importance, dtype=np.float32)
        if iw.shape != (k,):
            raise ValueError(f"kquantize: importance of shape {iw.shape}, expected ({k},)")
    out = np.empty((n, lib.lib.tl_kggml_row_bytes(code, k)), dtype=np.uint8)
    if lib.lib.tl_kquantize(code, w.ctypes.data, w.strides[0] // 4, n, k, None if iw is None else iw.ctypes.data,
                            out.ctypes.data, lib.threads) != 0:
        raise ValueError(f"kquantize: no quantizer for {kind}")
    return out


class _WPart(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_longlong), ("rows", ctypes.c_longlong), ("data", ctypes.c_void_p),
                ("scales", ctypes.c_void_p)]


def weight_parts(w) -> tuple[ctypes.Array, list]:
    """A weight matrix as kernels.h's tl_wpart array -> (the array, the arrays it points into: keep them alive).
    w: a block-format matrix (engine.runtime.kquant.KQuantMatrix in the kernel layout), rows of parts (an object with
    `parts`: engine.runtime.ggml_formats.RowStack), a QuantMatrix (int8 / int4) or an ndarray (float32, uint16 bf16
    bits, float16) with C-contiguous rows. ValueError for anything else."""
    pieces = list(w.parts) if hasattr(w, "parts") else [w]
    parts, keep = [], []
    for p in pieces:
        kind = getattr(p, "kind", None)
        if kind in KQUANT_TYPES:
            if getattr(p, "layout", None) != "kernel" or not p.data.flags.c_contiguous:
                raise ValueError(f"a {kind} matrix not in the kernel layout")
            parts.append(_WPart(KQUANT_TYPES[kind], p.shape[0], p.data.ctypes.data, None))
            keep.append(p.data)
        elif kind in QUANT_TYPES:
            if not p.data.flags.c_contiguous or not p.scales.flags.c_contiguous:
                raise ValueError(f"a {kind} matrix with non-contiguous arrays")
            parts.append(_WPart(QUANT_TYPES[kind], p.shape[0], p.data.ctypes.data, p.scales.ctypes.data))
            keep += [p.data, p.scales]
        elif isinstance(p, np.ndarray) and p.ndim == 2 and p.dtype in WEIGHT_TYPES and p.flags.c_contiguous:
            parts.append(_WPart(WEIGHT_TYPES[p.dtype], p.shape[0], p.ctypes.data, None))
            keep.append(p)
        else:
            raise ValueError(f"weight_parts: cannot take a part {type(p).__name__} {getattr(p, 'dtype', '')}")
    return (_WPart * len(parts))(*parts), keep


def matmul_parts(x: np.ndarray, w, out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W.T for x (M, K) float32 (contiguous rows) and W (N, K) as weight_parts takes it -> (M, N) float32:
    every block-format part on kquant.h's kernel (activations rounded to int16 per group of 32, once per run of such
    parts), the others on their own kernels, in one call."""
    lib = _require()
    n, k = w.shape
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != k or not _rows_contiguous(x):
        raise ValueError(f"matmul_parts needs float32 x (M, {k}) with contiguous rows; got {x.dtype}{x.shape}")
    m = x.shape[0]
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
    elif out.shape != (m, n) or out.dtype != np.float32 or not _rows_contiguous(out):
        raise ValueError(f"matmul_parts's out must be float32 ({m}, {n}) with contiguous rows")
    cached = getattr(w, "_cparts", None)  # built once per matrix (the arrays it points into never change)
    if cached is None:
        cached = weight_parts(w)
        try:
            object.__setattr__(w, "_cparts", cached)
        except AttributeError:
            pass
    parts, keep = cached
    lib.lib.tl_matmul_parts(lib.isa, x.ctypes.data, x.strides[0] // 4, parts, len(parts), out.ctypes.data,
                            out.strides[0] // 4, m, k, lib.threads)
    return out


class StepAttention:
    """The attention of one forward pass's sequences, one kernel call per layer for all of them (rather than a call
    per sequence): each sequence's new keys and values are stored in its cache and its queries attend over it.

    caches: per sequence its KVCache-like storage k, v: (layers, n_kv_heads, capacity, head_dim) float32, C-contiguous
    (room reserved for the new tokens); starts: positions of each sequence's first new token; counts: its new tokens,
    stacked in that order in the pass's rows. The arrays the kernel reads are built once here, for every layer."""

    def __init__(self, caches, starts: list[int], counts: list[int], n_heads: int, head_dim: int):
        self.lib = _require()
        ks, vs = [c.k for c in caches], [c.v for c in caches]
        for k, v in zip(ks, vs):
            if (k.dtype != np.float32 or v.shape != k.shape or k.ndim != 4 or k.shape[3] != head_dim
                    or not k.flags.c_contiguous or not v.flags.c_contiguous or n_heads % k.shape[1]
                    or head_dim > ATTENTION_MAX_HEAD_DIM):
                raise ValueError(f"StepAttention: a cache of {k.dtype}{k.shape} does not fit {n_heads} heads of "
                                 f"{head_dim}")
        self.n_heads, self.head_dim, self.n_kv = n_heads, head_dim, ks[0].shape[1]
        self.rows = np.cumsum([0] + list(counts[:-1]), dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.int64)
        if np.any(self.starts + self.counts > [k.shape[2] for k in ks]):
            raise ValueError("StepAttention: a cache has no room reserved for its new tokens")
        self.capacity = np.asarray([k.shape[2] for k in ks], dtype=np.int64)
        self.k_ptrs = (ctypes.c_void_p * len(ks))(*[k.ctypes.data for k in ks])
        self.v_ptrs = (ctypes.c_void_p * len(vs))(*[v.ctypes.data for v in vs])
        self._keep = (ks, vs)  # the storage the pointers point into stays alive with this object
        self.total = int(self.counts.sum())
        self.scale = float(np.float32(1.0 / np.sqrt(head_dim)))

    def __call__(self, qkv: np.ndarray, layer: int) -> np.ndarray:
        """qkv: (rows, (n_heads + 2 n_kv) * head_dim) float32, rotated, contiguous rows -> (rows, n_heads * head_dim)
        float32, after storing the rows' keys and values at `layer`."""
        width = (self.n_heads + 2 * self.n_kv) * self.head_dim
        if qkv.dtype != np.float32 or qkv.shape != (self.total, width) or not _rows_contiguous(qkv):
            raise ValueError(f"StepAttention: qkv {qkv.dtype}{qkv.shape}, expected ({self.total}, {width}) float32")
        out = np.empty((self.total, self.n_heads * self.head_dim), dtype=np.float32)
        self.lib.lib.tl_attention_seqs(self.lib.isa, qkv.ctypes.data, qkv.strides[0] // 4, self.n_heads, self.n_kv,
                                       self.head_dim, len(self.counts), self.rows.ctypes.data, self.counts.ctypes.data,
                                       self.starts.ctypes.data, self.k_ptrs, self.v_ptrs, self.capacity.ctypes.data,
                                       layer, self.scale, out.ctypes.data, out.strides[0] // 4, self.lib.threads)
        return out
