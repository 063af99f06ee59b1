"""GGML tensor types -> the runtime's weight objects: the one seam a GGUF type plugs into.

A GGUF tensor of ggml type T holding an (rows, cols) matrix (Hugging Face's [out, in] order; ggml writes the shape
reversed, ne = (cols, rows)) is stored row after row, each row cols / block_size blocks of type_size bytes (a block
is one scale or a super-block of 256 with its sub-scales and minimums, then its packed integers, in ggml's byte
order). The GGUF loader (engine.runtime.gguf_weights) hands a registered format the raw bytes of whole rows, a
NumPy uint8 array (n, row_bytes) viewed straight on the file's memory map, and gets back the runtime weight object
that `engine.runtime.layers.linear` multiplies. No format sees a file, a tensor name or a config.

The interface (what a new type provides: subclass GGMLFormat, then `register(MyFormat())` at import time of this
module's bottom list, or from the module that defines the kernels):

    class GGMLFormat:
        name: str          ggml's type name, as gguf.GGMLQuantizationType spells it: "Q4_0", "Q4_K", "F16", ...
        block_size: int    weights per block (1 for F32/F16/BF16, 32 for Q4_0/Q8_0, 256 for the k-quants)
        type_size: int     bytes per block (gguf.GGML_QUANT_SIZES[type] == (block_size, type_size))
        kind: str          the runtime weight kind it makes, for logs and the model's weights_dtype:
                           "float32", "float16", "bfloat16", "int8", "int4", or a new one ("q4_k", ...)
        version: int       (optional, default 1) part of the repacked-weights cache's key: bump it whenever the
                           arrays `repack_into` writes change for the same file bytes

        layout(rows, cols) -> dict[str, (np.dtype, tuple[int, ...])]
            The arrays one weight object of (rows, cols) holds, by field name. The on-disk cache of repacked weights
            (engine.runtime.quant_cache) stores exactly these, and maps them back on the next load.
        build(rows, cols, arrays: dict[str, np.ndarray]) -> weight object
            The weight object over `arrays` (the layout's names, dtypes and shapes): zeroed new arrays to repack into,
            or read-only views of a cache entry. Must not copy them.
        repack_into(weight, start: int, blocks: np.ndarray) -> None
            Write rows start .. start + n of `weight` from `blocks`: uint8 (n, cols / block_size * type_size), the
            file's rows in ggml's byte order, read-only (a view of the file's memory map: read it once, write nothing
            to it). Must reproduce the file's values EXACTLY (`gguf.quants.dequantize` of the same bytes is the
            reference the tests hold it to) or raise ValueError naming what it cannot hold.

    `empty(fmt, rows, cols)` = fmt.build(rows, cols, zeroed arrays). Rows of one fused matrix (q/k/v, gate/up)
    whose tensors have the SAME ggml type are repacked into one object (`repack_into` at successive `start`s); when
    their types differ (q4_K_M files keep some attn_v / ffn_down in Q6_K) the loader makes one object per tensor and
    stacks them in a `RowStack` (below), which `linear` runs part by part.

The weight objects `linear` and the embedding lookup take:
    - np.ndarray (rows, cols): float32, float16, or uint16 holding bf16 bits (the exact 16-bit path);
    - engine.runtime.quant.QuantMatrix (int8 / int4: our group-of-32 grids, the compiled kernels' layout);
    - any other object with the WeightObject protocol: `shape` (rows, cols), `nbytes`, `held_arrays()` (every array
      it holds: for memory accounting), `linear(x)` (x (M, cols) float32 C-contiguous -> (M, rows) float32: x @ W.T,
      on the compiled kernels where they are available) and `dequantize(rows=None)` (all rows, or a slice / index
      array of them -> (n, cols) float32, exact: the embedding lookup and the references use it).

Registered here: F32, F16, BF16 (kept as they are stored: 16-bit stays 16-bit, widened exactly in the kernels) and
Q8_0, Q4_0 (our int8 / int4 grids in another byte order, repacked exactly: Q8_0 is d * q, q int8, d float16; Q4_0
is d * (u - 8), u the 4-bit value, d float16; our QuantMatrix holds s * q with s float16 and q int8 in [-128, 127]
for int8, [-8, 7] for int4). Any other type is an UnsupportedTypeError naming the type, the tensor, and the types
that run (`lookup`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.runtime import native, quant
from engine.runtime.quant import QuantMatrix


class UnsupportedTypeError(ValueError):
    """A tensor of a ggml type no format is registered for (the message names the type, the tensor and what runs)."""


class GGMLFormat:
    """One ggml tensor type and how its blocks become a runtime weight object (module docstring: the interface)."""

    name: str = ""
    block_size: int = 1
    type_size: int = 4
    kind: str = ""

    def row_bytes(self, cols: int) -> int:
        """Bytes of one stored row of `cols` weights; ValueError when cols is not whole blocks."""
        if cols % self.block_size:
            raise ValueError(f"{self.name} rows hold whole blocks of {self.block_size}, not {cols} values")
        return cols // self.block_size * self.type_size

    def layout(self, rows: int, cols: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """name -> (dtype, shape) of every array a weight object of (rows, cols) holds."""
        raise NotImplementedError

    def build(self, rows: int, cols: int, arrays: dict[str, np.ndarray]):
        """The weight object of (rows, cols) over `arrays` (as `layout` describes them), not copied."""
        raise NotImplementedError

    def repack_into(self, weight, start: int, blocks: np.ndarray) -> None:
        """Rows start .. start + n of `weight` from the file's blocks: uint8 (n, row_bytes), exactly."""
        raise NotImplementedError


def empty(fmt: GGMLFormat, rows: int, cols: int):
    """A weight object of `fmt` for an (rows, cols) matrix over new zeroed arrays."""
    return fmt.build(rows, cols, {name: np.zeros(shape, dtype) for name, (dtype, shape) in fmt.layout(rows, cols).items()})


@dataclass
class RowStack:
    """A matrix (rows, cols) made of row blocks of different formats (q/k/v or gate/up tensors of different ggml
    types): `parts` in row order, each a weight object. `linear` runs each part into its columns of the output."""

    parts: list
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.held_arrays())

    def held_arrays(self) -> list[np.ndarray]:
        """Every array of every part."""
        return [a for part in self.parts for a in held_arrays(part)]

    def dequantize(self, rows=None) -> np.ndarray:
        """Rows (all, a slice or an index array) as float32 (n, cols), exact."""
        whole = np.concatenate([dequantized(p) for p in self.parts])
        return whole if rows is None else whole[rows]

    def linear(self, x: np.ndarray) -> np.ndarray:
        """x (M, cols) float32 @ W.T -> (M, rows) float32: every part on its compiled kernel in one call where they all
        run there (native.matmul_parts: block formats share one rounding of x), else part by part."""
        if native.status().available:
            try:
                return native.matmul_parts(np.ascontiguousarray(x, dtype=np.float32), self)
            except ValueError:  # a part the kernels do not take as it is held
                pass
        from engine.runtime.layers import linear

        return np.concatenate([linear(x, p) for p in self.parts], axis=1)


def dequantized(weight) -> np.ndarray:
    """Any weight object's values as float32 (rows, cols), exact (bf16 bits widened, QuantMatrix dequantized)."""
    if isinstance(weight, np.ndarray):
        if weight.dtype == np.uint16:
            return (weight.astype(np.uint32) << 16).view(np.float32)
        return weight.astype(np.float32)
    return weight.dequantize()


def held_arrays(weight) -> list[np.ndarray]:
    """Every array a weight object holds: itself (ndarray), data and scales (QuantMatrix), or its `held_arrays()`."""
    if isinstance(weight, np.ndarray):
        return [weight]
    if isinstance(weight, QuantMatrix):
        return [weight.data, weight.scales]
    return list(weight.held_arrays())


# -- the plain float types: the stored values as they are ----------------------------------------------------------

class _FloatFormat(GGMLFormat):
    """F32 / F16 / BF16: the matrix is its stored values (a 2-D array of the storage dtype)."""

    def __init__(self, name: str, storage: str, kind: str):
        self.name, self.kind = name, kind
        self.storage = np.dtype(storage)
        self.type_size = self.storage.itemsize

    def layout(self, rows: int, cols: int):
        return {"values": (self.storage, (rows, cols))}

    def build(self, rows: int, cols: int, arrays):
        return arrays["values"]

    def repack_into(self, weight, start: int, blocks: np.ndarray) -> None:
        n = blocks.shape[0]
        weight[start : start + n] = blocks.view(self.storage).reshape(n, -1)


# -- Q8_0 and Q4_0: our int8 / int4 QuantMatrix, the same grids in another byte order -----------------------------

class _QuantFormat(GGMLFormat):
    """A ggml type whose values are our QuantMatrix's (groups of 32 columns, one float16 scale each)."""

    block_size = quant.GROUP
    version = 2  # QuantMatrix's kernel layout (weights.QUANT_FORMAT_VERSION): 2 = offset bytes, 4 columns x 16 rows

    def layout(self, rows: int, cols: int):
        m = quant.empty(self.kind, 0, 0)  # the dtypes
        blocks, groups = -(-rows // quant.BLOCK_ROWS), -(-cols // quant.GROUP)
        per_block = m.data.shape[2:]
        return {"data": (m.data.dtype, (blocks, groups) + per_block),
                "scales": (m.scales.dtype, (blocks, groups, quant.BLOCK_ROWS))}

    def build(self, rows: int, cols: int, arrays):
        return QuantMatrix(self.kind, (rows, cols), arrays["data"], arrays["scales"])

    def integers_and_scales(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The file's rows -> (q (n, cols) int8, scales (n, cols / 32) float16) with value = scale * q."""
        raise NotImplementedError

    def repack_into(self, weight: QuantMatrix, start: int, blocks: np.ndarray, compiled: bool | None = None) -> None:
        """compiled: with the compiled kernels' repack where they are available (None; True / False force it), else
        in NumPy; both write the same bytes (tests/test_ggml_formats.py). The compiled one only moves bytes: a
        TinyLlama-shape Q4_0 file's repack took 2.9 s, its pages read from the page cache included (load average
        8); whole first loads with NumPy's took 30-46 s, with this one 13-17 s (docs/quantized-speed.md)."""
        from engine.runtime import native

        if compiled or (compiled is None and native.status().available):
            if blocks.strides[1:] != (1,):
                blocks = np.ascontiguousarray(blocks)
            native.repack_ggml_into(weight, start, blocks)
            return
        q, s16 = self.integers_and_scales(blocks)
        quant.store_rows(weight, start, q, s16)


class _Q8_0(_QuantFormat):
    """Q8_0: blocks of 34 bytes, a float16 d then 32 int8 q; value = d * q."""

    name, kind, type_size = "Q8_0", "int8", 34

    def integers_and_scales(self, blocks):
        n = blocks.shape[0]
        b = blocks.reshape(n, -1, self.type_size)
        d = np.ascontiguousarray(b[:, :, :2]).view(np.float16)[:, :, 0]
        q = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(n, -1)
        return q, d


class _Q4_0(_QuantFormat):
    """Q4_0: blocks of 18 bytes, a float16 d then 16 bytes whose low nibbles are values 0..15 and high nibbles values
    16..31 of the block; value = d * (nibble - 8)."""

    name, kind, type_size = "Q4_0", "int4", 18

    def integers_and_scales(self, blocks):
        n = blocks.shape[0]
        b = blocks.reshape(n, -1, self.type_size)
        d = np.ascontiguousarray(b[:, :, :2]).view(np.float16)[:, :, 0]
        packed = b[:, :, 2:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=2).astype(np.int8) - np.int8(8)
        return q.reshape(n, -1), d


_REGISTRY: dict[str, GGMLFormat] = {}


def register(fmt: GGMLFormat) -> None:
    """Make tensors of ggml type `fmt.name` loadable (a later registration of the same name replaces it)."""
    _REGISTRY[fmt.name] = fmt


def registered() -> list[str]:
    """The ggml type names that run, in registration order."""
    return list(_REGISTRY)


def lookup(type_name: str, tensor: str = "") -> GGMLFormat:
    """The format of ggml type `type_name` (e.g. "Q4_0"); UnsupportedTypeError naming the type, the tensor and the
    types that run when none is registered."""
    fmt = _REGISTRY.get(type_name)
    if fmt is None:
        where = f"tensor '{tensor}' has " if tensor else ""
        raise UnsupportedTypeError(f"{where}ggml type {type_name}, which this engine does not run "
                                   f"(types that run: {', '.join(registered())})")
    return fmt


for _fmt in (_FloatFormat("F32", "<f4", "float32"), _FloatFormat("F16", "<f2", "float16"),
             _FloatFormat("BF16", "<u2", "bfloat16"), _Q8_0(), _Q4_0()):
    register(_fmt)
