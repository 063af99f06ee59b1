"""llama.cpp's block formats as weight formats of the runtime: Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

A GGUF tensor of one of these types is read as ggml's raw blocks and repacked at load into the kernels' layout
(engine/runtime/native/kquant_layout.h describes it byte by byte): the same integers, scales and minimums, so the
dequantized values are exactly the file's (`gguf.quants.dequantize` of the same bytes, float32), in an order the
kernels read with whole-vector loads (16 rows side by side, 4 columns a row per 32-bit lane). The kernels
(native/kquant.h) multiply them against activations rounded to int16 per group of 32 (never llama.cpp's 8-bit
q8_0 / q8_K rounding), with exact integer sums per sub-block.

Every format is w = A_j * u - B_j per sub-block j of a row (u an unsigned integer of 2..6 bits):
    Q4_1 / Q5_1   32 columns     A = d, B = -m                         (float16 d, m per 32)
    Q5_0          32 columns     A = d, B = 16 d                        (float16 d per 32)
    Q2_K          256 = 16 x 16  A = d sc_j, B = dmin m_j               (sc, m 4 bits)
    Q3_K          256 = 16 x 16  A = d sc_j, B = 4 d sc_j               (sc 6 bits signed)
    Q4_K / Q5_K   256 = 8 x 32   A = d sc_j, B = dmin m_j               (sc, m 6 bits)
    Q6_K          256 = 16 x 16  A = d sc_j, B = 32 d sc_j              (sc int8)
The layout takes exactly ggml's bytes per weight (4.5 bits for Q4_K, 6.5625 for Q6_K, ...), rounded up to whole
64-byte lines per 16-row block (nothing for TinyLlama's shapes).

`KQuantMatrix` holds one matrix of one format (the weight-object protocol of engine.runtime.ggml_formats, where
these formats are registered: `BlockFormat`); a matrix whose rows come in parts of different formats (llama.cpp's
q4_K_M stores v in Q6_K in some layers and q, k in Q4_K: the fused q/k/v matrix is then two parts) is a
ggml_formats.RowStack, multiplied in one kernel call (native.matmul_parts). Without the compiled kernels a
KQuantMatrix keeps ggml's own bytes and blocks of rows are dequantized with `gguf.quants` for OpenBLAS.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.runtime import ggml_formats, native
from engine.runtime.ggml_formats import GGMLFormat, RowStack

# ggml type name -> our kind; kernels.h's W_* code; columns per block; ggml's bytes per block
GGML_TYPES = {"Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q2_K": "q2_k", "Q3_K": "q3_k", "Q4_K": "q4_k",
              "Q5_K": "q5_k", "Q6_K": "q6_k"}
KINDS = tuple(GGML_TYPES.values())
BLOCK_COLUMNS = {k: (256 if k.endswith("_k") else 32) for k in KINDS}
GGML_BLOCK_BYTES = {"q4_1": 20, "q5_0": 22, "q5_1": 24, "q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176,
                    "q6_k": 210}
ROWS = 16  # rows per block of the layout
# the layout (kquant_layout.h): header bytes per super-block, bytes per group of 32 columns
_HEADER = {"q4_1": 64, "q5_0": 32, "q5_1": 64, "q2_k": 320, "q3_k": 224, "q4_k": 256, "q5_k": 256, "q6_k": 288}
_NIB = {"q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"}
_CR = {"q6_k", "q2_k", "q3_k"}
_HI = {"q5_0", "q5_1", "q5_k", "q3_k"}


def _round64(n: int) -> int:
    return -(-n // 64) * 64


def block_bytes(kind: str, k: int) -> int:
    """Bytes of one 16-row block of the layout for k columns (kquant_layout.h's kq_block_bytes)."""
    group = 256 * (kind in _NIB) + 128 * (kind in _CR) + 64 * (kind in _HI)
    return _round64(k // BLOCK_COLUMNS[kind] * _HEADER[kind]) + _round64(k // 32 * group)


def ggml_row_bytes(kind: str, k: int) -> int:
    """ggml's bytes for one row of k columns of `kind`."""
    return k // BLOCK_COLUMNS[kind] * GGML_BLOCK_BYTES[kind]


def bits_per_weight(kind: str) -> float:
    """The format's bits per weight (ggml's, which the layout matches)."""
    return GGML_BLOCK_BYTES[kind] * 8 / BLOCK_COLUMNS[kind]


@dataclass
class KQuantMatrix:
    """An (N, K) weight matrix of one block format (`kind`, e.g. "q4_k"). `data` is uint8: the kernel layout
    (blocks, block_bytes) with `layout == "kernel"`, or ggml's own blocks (N, row bytes) with `layout == "ggml"`
    (without the compiled kernels). It holds nothing else."""

    kind: str
    shape: tuple[int, int]
    data: np.ndarray
    layout: str = "kernel"

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.data.nbytes

    def held_arrays(self) -> list[np.ndarray]:
        """Every array it holds (one)."""
        return [self.data]

    def linear(self, x: np.ndarray) -> np.ndarray:
        """x (M, K) float32 C-contiguous @ W.T -> (M, N) float32: the compiled kernels where available (activations
        rounded to int16 per group of 32, exact integer sums per sub-block), else blocks of W dequantized for
        OpenBLAS (activations float32)."""
        if self.layout == "kernel":
            return native.matmul_parts(np.ascontiguousarray(x, dtype=np.float32), self)
        return linear_dequantized(np.ascontiguousarray(x, dtype=np.float32), self)

    def dequantize(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """The matrix's values (all rows, or `rows` of them) as float32 (n, K): exactly gguf.quants.dequantize's."""
        idx = np.arange(self.shape[0])[rows] if rows is not None else np.arange(self.shape[0])
        if self.layout == "ggml":
            import gguf

            kind = getattr(gguf.GGMLQuantizationType, ggml_name(self.kind))
            return np.ascontiguousarray(gguf.quants.dequantize(self.data[idx], kind), dtype=np.float32)
        return native.kdequant(self.kind, self.data, self.shape[1], idx)


def ggml_name(kind: str) -> str:
    """"q4_k" -> "Q4_K"."""
    return {v: k for k, v in GGML_TYPES.items()}[kind]


def empty(kind: str, n: int, k: int) -> KQuantMatrix:
    """A zeroed KQuantMatrix of `kind` for n rows of k columns (k a whole number of the format's blocks), in the
    kernel layout."""
    if kind not in KINDS:
        raise ValueError(f"unknown block format {kind!r}")
    if k % BLOCK_COLUMNS[kind]:
        raise ValueError(f"{ggml_name(kind)} needs rows of whole blocks of {BLOCK_COLUMNS[kind]} columns, got {k}")
    blocks = -(-n // ROWS)
    return KQuantMatrix(kind, (n, k), np.zeros((blocks, block_bytes(kind, k)), dtype=np.uint8))


def _as_rows(raw: np.ndarray, kind: str, n: int, k: int) -> np.ndarray:
    """ggml's bytes of an (n, k) tensor as uint8 (n, row bytes), checked against the shape."""
    raw = np.asarray(raw)
    raw = raw.view(np.uint8) if raw.dtype != np.uint8 else raw
    want = n * ggml_row_bytes(kind, k)
    if raw.size != want:
        raise ValueError(f"{ggml_name(kind)} tensor of shape ({n}, {k}) needs {want} bytes, got {raw.size}")
    return raw.reshape(n, ggml_row_bytes(kind, k))


def pack_into(m: KQuantMatrix, start: int, raw: np.ndarray, n: int) -> None:
    """Rows start..start+n of m (kernel layout) from ggml's blocks of those n rows (uint8, n * row bytes)."""
    rows = _as_rows(raw, m.kind, n, m.shape[1])
    if start < 0 or start + n > m.shape[0]:
        raise ValueError(f"rows {start}..{start + n} do not fit a matrix of {m.shape[0]}")
    native.kpack(m.kind, np.ascontiguousarray(rows), m.shape[1], start, m.data)


def from_ggml(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> KQuantMatrix:
    """A GGUF tensor of ggml type `type_name` ("Q4_K", ...) with its raw blocks `raw` (any array of its bytes, e.g.
    gguf's memory-mapped data) and shape (rows, columns) -> KQuantMatrix: repacked into the kernel layout where the
    compiled kernels are available, else ggml's bytes kept (a copy: the file's map may close)."""
    kind = GGML_TYPES.get(type_name)
    if kind is None:
        raise ValueError(f"{type_name} is not one of the block formats {', '.join(GGML_TYPES)}")
    n, k = int(shape[0]), int(shape[1])
    if k % BLOCK_COLUMNS[kind]:
        raise ValueError(f"a {type_name} tensor needs whole blocks of {BLOCK_COLUMNS[kind]} columns, got {k}")
    rows = _as_rows(raw, kind, n, k)
    if not native.status().available:
        return KQuantMatrix(kind, (n, k), np.array(rows, dtype=np.uint8), layout="ggml")
    m = empty(kind, n, k)
    native.kpack(kind, np.ascontiguousarray(rows), k, 0, m.data)
    return m


QUANTIZERS = ("q4_k", "q5_k", "q6_k", "q5_0")  # the formats our own quantizer makes (native/kquant_quantize.c)


def quantize_ggml(w: np.ndarray, kind: str, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows w (n, K) -> ggml's blocks of `kind` (QUANTIZERS) as uint8 (n, row bytes): our quantizer (the
    compiled kernels' kquant_quantize.c), the squared error weighted per column by `importance` (K,) when given."""
    if kind not in QUANTIZERS:
        raise ValueError(f"no quantizer for {kind} (ours make {', '.join(QUANTIZERS)})")
    if w.shape[1] % BLOCK_COLUMNS[kind]:
        raise ValueError(f"{ggml_name(kind)} needs rows of whole blocks of {BLOCK_COLUMNS[kind]}, got {w.shape[1]}")
    return native.kquantize(kind, np.ascontiguousarray(w, dtype=np.float32), importance)


def quantize(w: np.ndarray, kind: str, importance: np.ndarray | None = None) -> KQuantMatrix:
    """A float32 matrix w (N, K) quantized to `kind` by our quantizer, in the kernel layout."""
    m = empty(kind, *w.shape)
    pack_into(m, 0, quantize_ggml(w, kind, importance), w.shape[0])
    return m


def stack(parts: list) -> KQuantMatrix | RowStack:
    """Matrices of the same K stacked row-wise: one KQuantMatrix when they are all the same block format in the
    kernel layout and every part but the last has whole 16-row blocks, else a RowStack of them."""
    k = parts[0].shape[1]
    if any(p.shape[1] != k for p in parts):
        raise ValueError("stacked matrices need the same number of columns")
    if len(parts) == 1:
        return parts[0]
    n = sum(p.shape[0] for p in parts)
    same = all(isinstance(p, KQuantMatrix) and p.layout == "kernel" and p.kind == parts[0].kind for p in parts)
    if same and all(p.shape[0] % ROWS == 0 for p in parts[:-1]):
        return KQuantMatrix(parts[0].kind, (n, k), np.concatenate([p.data for p in parts], axis=0))
    return RowStack(list(parts), (n, k))


def linear_dequantized(x: np.ndarray, w, block_bytes_: int = 8 << 20) -> np.ndarray:
    """x (M, K) float32 @ dequantize(w).T -> (M, N) float32 for a KQuantMatrix, blocks of rows dequantized at a time
    for OpenBLAS (no kernels)."""
    n, k = w.shape
    out = np.empty((x.shape[0], n), dtype=np.float32)
    rows = max(ROWS, block_bytes_ // (4 * k))
    for start in range(0, n, rows):
        out[:, start : start + rows] = x @ w.dequantize(slice(start, start + rows)).T
    return out


class BlockFormat(GGMLFormat):
    """A ggml block format (Q4_K, ...) as engine.runtime.ggml_formats registers it: its rows repacked exactly into
    a KQuantMatrix (the kernel layout with the compiled kernels, else ggml's own bytes)."""

    version = 1  # bump when the kernel layout changes (the GGUF cache's key)

    def __init__(self, name: str):
        self.name, self.kind = name, GGML_TYPES[name]
        self.block_size, self.type_size = BLOCK_COLUMNS[self.kind], GGML_BLOCK_BYTES[self.kind]

    @staticmethod
    def _kernels() -> bool:
        return native.status().available

    def layout(self, rows: int, cols: int) -> dict:
        if cols % self.block_size:
            raise ValueError(f"{self.name} rows hold whole blocks of {self.block_size}, not {cols} values")
        if self._kernels():
            return {"blocks": (np.dtype(np.uint8), (-(-rows // ROWS), block_bytes(self.kind, cols)))}
        return {"ggml": (np.dtype(np.uint8), (rows, ggml_row_bytes(self.kind, cols)))}

    def build(self, rows: int, cols: int, arrays: dict) -> KQuantMatrix:
        if "blocks" in arrays:
            return KQuantMatrix(self.kind, (rows, cols), arrays["blocks"])
        return KQuantMatrix(self.kind, (rows, cols), arrays["ggml"], layout="ggml")

    def repack_into(self, weight: KQuantMatrix, start: int, blocks: np.ndarray) -> None:
        n = blocks.shape[0]
        if weight.layout == "ggml":
            weight.data[start : start + n] = _as_rows(blocks, self.kind, n, weight.shape[1])
            return
        pack_into(weight, start, blocks, n)


for _name in GGML_TYPES:
    ggml_formats.register(BlockFormat(_name))
