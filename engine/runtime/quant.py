"""Quantized weight formats (int8, int4): group-wise symmetric integers with a float16 scale per group of 32.

A weight matrix W (N, K) in Hugging Face's [out, in] layout is cut into groups of GROUP = 32 consecutive columns of
one row; each group holds integers q and one scale s (float16), W[n, k] ~ s[n, g] * q[n, k] with g = k // 32:
- int8: q in [-127, 127], s = max|w| / 127 (llama.cpp's q8_0 grid), 34 bytes per 32 weights;
- int4: q in [-8, 7], the (signed) scale chosen per group among candidates by least squared error, 18 bytes
  per 32 weights (llama.cpp's q4_0 size).
The scale is rounded to float16 FIRST and q is rounded against that stored scale, so dequantizing is exactly
float(s16) * q.

Kernel layout (engine/runtime/native/quant.h reads it): rows are taken 16 at a time (a block; the row count padded to
a multiple of 16 with zero rows, the columns to a multiple of 32 with zeros), a block's groups one after the other,
and within a block and group the integers are stored offset to unsigned bytes so that one 64-byte vector holds 4
columns of all 16 rows (the operand of AVX512-VNNI's byte dot product, lane r = row r):
- scales: float16 (blocks, groups, 16): the scale of row 16 b + r, group g at [b, g, r];
- int8 data: uint8 (blocks, groups, 8, 16, 4): [b, g, p, r, t] = q[16 b + r, 32 g + 4 p + t] + 128;
- int4 data: uint8 (blocks, groups, 4, 16, 4): byte [b, g, c, r, t] holds q + 8 (0..15) of column 32 g + 8 c + t of
  row 16 b + r in its low nibble and of column 32 g + 8 c + 4 + t in its high nibble.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32  # columns per scale
BLOCK_ROWS = 16  # rows interleaved in the kernel layout
KINDS = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}


@dataclass
class QuantMatrix:
    """A quantized (N, K) weight matrix in the kernel layout (module docstring): `data` and `scales` are all it
    holds."""

    kind: str  # "int8" | "int4"
    shape: tuple[int, int]  # (N, K): the logical matrix
    data: np.ndarray  # uint8: int8 (blocks, groups, 8, 16, 4) | int4 (blocks, groups, 4, 16, 4) (module docstring)
    scales: np.ndarray  # float16 (blocks, groups, 16)

    @property
    def nbytes(self) -> int:
        """Bytes held: the integers and the scales."""
        return self.data.nbytes + self.scales.nbytes

    @property
    def groups(self) -> int:
        return self.scales.shape[1]

    @property
    def padded_cols(self) -> int:
        return self.groups * GROUP

    def dequantize(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """The matrix's values (all rows, or `rows` of them) as float32 (n, K): float(scale) * q, exact."""
        idx = np.arange(self.shape[0])[rows] if rows is not None else np.arange(self.shape[0])
        q = integers(self, idx)  # (n, Kp) int8
        s = self.scales[idx // BLOCK_ROWS, :, idx % BLOCK_ROWS].astype(np.float32)  # (n, G)
        out = (q.reshape(len(idx), self.groups, GROUP) * s[:, :, None]).reshape(len(idx), -1)
        return np.ascontiguousarray(out[:, : self.shape[1]], dtype=np.float32)


def empty(kind: str, n: int, k: int) -> QuantMatrix:
    """A zeroed QuantMatrix of `kind` for an (n, k) matrix (rows and columns padded as the layout needs)."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantized kind {kind!r}")
    blocks, groups = -(-n // BLOCK_ROWS), -(-k // GROUP)
    data = np.zeros((blocks, groups, 8 if kind == "int8" else 4, BLOCK_ROWS, 4), dtype=np.uint8)
    return QuantMatrix(kind, (n, k), data, np.zeros((blocks, groups, BLOCK_ROWS), dtype=np.float16))


def quantize_groups(w: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows w (n, K) float32 -> (q (n, Kp) int8, scales (n, G) float16), K zero-padded to Kp = 32 G columns.

    int8: s = float16(max|w| / 127), q = clip(rint(w * (1 / s)), -127, 127) (1 / s in float32); int4: the
    least-squares scale among candidates (`int4_scales`), q = clip(rint(w * (1 / s)), -8, 7). A group of zeros has
    s = 0, q = 0."""
    n, k = w.shape
    kp = -(-k // GROUP) * GROUP
    if kp != k:
        w = np.concatenate([w, np.zeros((n, kp - k), dtype=np.float32)], axis=1)
    g = w.reshape(n, kp // GROUP, GROUP)
    if kind == "int8":
        s16 = (np.max(np.abs(g), axis=2) / np.float32(127)).astype(np.float16)
        q = _round_to(g, s16, -127, 127)
    else:
        s16 = int4_scales(g)
        q = _round_to(g, s16, -8, 7)
    return q.reshape(n, kp), s16


def _round_to(g: np.ndarray, s16: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Groups g (n, G, 32) float32 rounded against scales s16 (n, G) float16 -> int8 (n, G, 32)."""
    s = s16.astype(np.float32)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(s != 0, np.float32(1) / np.where(s != 0, s, np.float32(1)), np.float32(0))
    q = np.rint(g * inv)  # (1 / s and the product in float32, as quantize.c)
    return np.clip(q, lo, hi).astype(np.int8)


# int4 scale candidates: s = m / d for the group's value of largest magnitude m (signed) and these divisors: d = -8
# is llama.cpp's q4_0 (m lands on -8, the grid's far end; s may be negative), -7.5 and -8.5 a step either side; the
# least squared error wins. Measured on stories260K (512 tokens, mean KL against fp32): q4_0's alone 0.095, these
# three 0.086, eight (adding -7, +-6.5, 7, 7.5) 0.085 at 2.7x the quantizing time: three it is.
INT4_DIVISORS = (-8.0, -7.5, -8.5)


def int4_scales(g: np.ndarray) -> np.ndarray:
    """The int4 scale of every group g (n, G, 32) float32 -> (n, G) float16: of the candidates m / d
    (INT4_DIVISORS, m the group's first value of largest magnitude), each rounded to float16 (signed), the
    one whose grid clip(rint(w * (1 / s)), -8, 7) * s has the least squared error, summed in column order in float64
    (the first on ties, so q4_0's when it is as good). The same arithmetic as the compiled quantizer (quantize.c)."""
    idx = np.argmax(np.abs(g), axis=2)
    m = np.take_along_axis(g, idx[:, :, None], axis=2)[:, :, 0]
    best_s = np.zeros(m.shape, dtype=np.float16)
    best_err = np.full(m.shape, np.inf, dtype=np.float64)
    for d in INT4_DIVISORS:
        s16 = (m / np.float32(d)).astype(np.float16)
        s16 = np.where(s16 == 0, np.float16(0), s16)  # -0 as 0; a negative scale puts m at the grid's -8 end
        q = _round_to(g, s16, -8, 7)
        s64 = s16.astype(np.float64)
        err = np.zeros(m.shape, dtype=np.float64)
        for k in range(GROUP):
            diff = g[:, :, k].astype(np.float64) - q[:, :, k].astype(np.float64) * s64
            err += diff * diff
        better = err < best_err
        best_s = np.where(better, s16, best_s)
        best_err = np.where(better, err, best_err)
    return best_s


def store_rows(m: QuantMatrix, start: int, q: np.ndarray, s16: np.ndarray) -> None:
    """Write rows start..start+n of `m` from q (n, Kp) int8 and s16 (n, G) float16 (quantize_groups' output)."""
    n = q.shape[0]
    groups = m.groups
    row = start
    while row < start + n:
        b, r0 = divmod(row, BLOCK_ROWS)
        r1 = min(BLOCK_ROWS, r0 + start + n - row)
        src = q[row - start : row - start + r1 - r0].reshape(r1 - r0, groups, GROUP)  # (rows, G, 32)
        m.scales[b, :, r0:r1] = s16[row - start : row - start + r1 - r0].T
        if m.kind == "int8":
            # [g, p, r, t] = src[r, g, 4p + t] + 128
            m.data[b, :, :, r0:r1, :] = (src.reshape(r1 - r0, groups, 8, 4).astype(np.int16) + 128).astype(
                np.uint8).transpose(1, 2, 0, 3)
        else:
            # [g, c, r, t] = (src[r, g, 8c + t] + 8) | (src[r, g, 8c + 4 + t] + 8) << 4
            u = (src.reshape(r1 - r0, groups, 4, 2, 4) + 8).astype(np.uint8)  # (r, g, c, half, t)
            m.data[b, :, :, r0:r1, :] = (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).transpose(1, 2, 0, 3)
        row += r1 - r0


def integers(m: QuantMatrix, idx: np.ndarray) -> np.ndarray:
    """The integers q of rows `idx` of m -> (len(idx), Kp) int8 (the layout read back)."""
    b, r = idx // BLOCK_ROWS, idx % BLOCK_ROWS
    u = m.data[b, :, :, r, :].astype(np.int16)  # (n, G, 8 | 4, 4)
    if m.kind == "int8":
        return (u - 128).astype(np.int8).reshape(len(idx), -1)
    q = np.stack([u & 0xF, u >> 4], axis=3) - 8  # (n, G, c, half, t): column 8c + 4 half + t
    return q.astype(np.int8).reshape(len(idx), -1)


def quantize(w: np.ndarray, kind: str, compiled: bool | None = None) -> QuantMatrix:
    """A float32 matrix w (N, K) quantized to `kind` ("int8" | "int4"); compiled: as in `quantize_into`."""
    m = empty(kind, *w.shape)
    quantize_into(m, 0, w, compiled=compiled)
    return m


def linear_dequantized(x: np.ndarray, m: QuantMatrix, block_bytes: int = 8 << 20) -> np.ndarray:
    """x (M, K) float32 @ dequantize(m).T -> (M, N) float32, a block of rows widened at a time (no kernels)."""
    n, k = m.shape
    out = np.empty((x.shape[0], n), dtype=np.float32)
    rows = max(BLOCK_ROWS, block_bytes // (4 * k))
    for start in range(0, n, rows):
        out[:, start : start + rows] = x @ m.dequantize(slice(start, start + rows)).T
    return out


def quantize_into(m: QuantMatrix, start: int, w: np.ndarray, rows_per_piece: int = 4096,
                  compiled: bool | None = None) -> None:
    """Quantize the float32 rows w (n, K) into rows start..start+n of m: with the compiled quantizer where the kernels
    are available (compiled=None; True/False force it), else in NumPy, in pieces of rows_per_piece rows. Both give
    the same bytes (the same arithmetic: `quantize_groups`)."""
    from engine.runtime import native

    if compiled or (compiled is None and native.status().available):
        native.quantize_into(m, start, np.ascontiguousarray(w, dtype=np.float32))
        return
    for r in range(0, w.shape[0], rows_per_piece):
        piece = np.ascontiguousarray(w[r : r + rows_per_piece], dtype=np.float32)
        store_rows(m, start + r, *quantize_groups(piece, m.kind))
