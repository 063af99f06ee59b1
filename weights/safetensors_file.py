"""Reading one .safetensors file, memory-mapped, with its header validated before any tensor is touched.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, ...},
then the data region; offsets are relative to the start of the data region.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weights.errors import CheckpointError

# safetensors dtype name -> (numpy storage dtype, bytes per element). BF16 is stored as raw uint16 bits.
DTYPES = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
PAGE = mmap.PAGESIZE
COPY_CHUNK_BYTES = 4 << 20  # file bytes copied between releases of the pages already read


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file: dtype name, shape, absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements: the product of `shape` (1 for a scalar)."""
        return int(np.prod(self.shape, dtype=np.int64))


class SafetensorsFile:
    """One safetensors file: validated header (`tensors`), and float32 reads of any tensor from a read-only mmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        self._mmap: mmap.mmap | None = None
        self._parse_header()

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def _parse_header(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._fail(f"truncated file ({size} bytes): too short to hold a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise self._fail(f"inconsistent header: header length {n} does not fit in a file of {size} bytes")
                raw = f.read(n)
        except OSError as e:
            raise self._fail(f"cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"inconsistent header: not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("inconsistent header: the header is not a JSON object")
        data_start = 8 + n
        data_size = size - data_start
        self.metadata = header.pop("__metadata__", None) or {}
        for name, entry in header.items():
            self.tensors[name] = self._check_entry(name, entry, data_start, data_size)

    def _check_entry(self, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise self._fail(f"inconsistent header: tensor '{name}' lacks dtype/shape/data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise self._fail(f"tensor '{name}' has unsupported dtype {dtype} (supported: F32, F16, BF16)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._fail(f"inconsistent header: tensor '{name}' has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise self._fail(f"inconsistent header: tensor '{name}' has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]
        if not 0 <= begin <= end or end - begin != expected:
            raise self._fail(
                f"inconsistent header: tensor '{name}' offsets {offsets} hold {end - begin} bytes, "
                f"but {dtype}{shape} needs {expected}"
            )
        if end > data_size:
            raise self._fail(
                f"truncated file: tensor '{name}' ends at byte {data_start + end} but the file has "
                f"{data_start + data_size} bytes"
            )
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            # Start reading the whole file into the page cache now, in the background, while tensors are copied.
            self._mmap.madvise(mmap.MADV_WILLNEED)
        return self._mmap

    def read_into(self, name: str, out: np.ndarray, first: int | None = None) -> None:
        """Copy tensor `name` into `out` (same number of elements, C-contiguous); given `first`, the out.size
        elements from element `first` on instead (rows of a 2-D tensor: first = row * columns).

        `out` is float32 (F16/BF16 widened exactly on the way), or the tensor's own 16-bit storage: float16 for F16,
        uint16 (the raw bits) for BF16. The file's pages are released from this process as soon as they are copied
        (every COPY_CHUNK_BYTES), so loading a whole checkpoint holds the copies and at most one chunk of the file
        mapping resident: the load peak stays at the weights' bytes plus a few MB, whatever the largest tensor.
        """
        info = self.tensors[name]
        storage, itemsize = DTYPES[info.dtype]
        count = info.numel if first is None else out.size
        first = first or 0
        if out.size != count or first < 0 or first + count > info.numel or not out.flags.c_contiguous \
                or out.dtype not in (np.float32, storage):
            raise ValueError(f"read_into({name}): needs a contiguous float32 or {storage} array of "
                             f"{info.numel - first} elements{' or fewer' if first else ''}, got {out.dtype} {out.shape}")
        if count == 0:
            return
        mm = self._map()
        begin = info.begin + first * itemsize
        start = begin - begin % PAGE
        mm.madvise(mmap.MADV_WILLNEED, start, begin + count * itemsize - start)  # one large read-ahead
        src = np.frombuffer(mm, dtype=storage, count=count, offset=begin)
        flat = out.reshape(-1)
        step = max(1, COPY_CHUNK_BYTES // itemsize)
        for i in range(0, count, step):
            piece = slice(i, min(i + step, count))
            if out.dtype == storage:
                np.copyto(flat[piece], src[piece])  # the checkpoint's own bytes
            elif info.dtype == "BF16":
                bits = flat[piece].view(np.uint32)
                np.copyto(bits, src[piece])  # uint16 -> uint32
                bits <<= 16  # bf16 is the top half of a float32
            else:
                np.copyto(flat[piece], src[piece], casting="same_kind")
            end = begin + piece.stop * itemsize
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)  # the pages copied so far (read again if touched)
            start = end - end % PAGE
        del src

    def read(self, name: str) -> np.ndarray:
        """Return tensor `name` as a new float32 array of its shape."""
        out = np.empty(self.tensors[name].shape, dtype=np.float32)
        self.read_into(name, out)
        return out

    def close(self) -> None:
        """Close the memory map, if open (safe to call twice)."""
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
