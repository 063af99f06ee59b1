"""An on-disk cache of quantized weights, so a checkpoint is quantized once and later loads read the result.

Entries live in <cache_dir()>/quantized/ (beside the compiled kernels: $TINYLLAMA_CACHE or ~/.cache/tinyllama-engine),
one file per (checkpoint folder, kind): a newer checkpoint or quantizer overwrites its folder's entry rather than
adding one. The file is our own simple format:

    b"TLQCACHE" | uint64 little-endian header length | JSON header | zero padding | arrays, each 64-byte aligned

The header holds the key (every checkpoint file's name, size, mtime_ns and the SHA-256 of its safetensors header, the
kind and the quantizer's settings: see `entry_key`) and each array's name, dtype, shape and offset. An entry is used
only when its key equals the one wanted, its size is the size the header promises and every array's dtype and shape
are the ones the caller reads into: anything else (a stale, truncated or foreign file) is a miss, and the caller
quantizes and rewrites it. Writes go to a temporary file renamed over the entry, so an interrupted write never leaves
a broken one; a failed write (read-only or full disk) is a one-line warning. TINYLLAMA_QUANT_CACHE=0 turns it off.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

MAGIC = b"TLQCACHE"
ALIGN = 64
HEADER_ALIGN = 4096
MAX_HEADER_BYTES = 64 << 20
READ_CHUNK_BYTES = 64 << 20  # pieces the arrays are read / written in


def enabled() -> bool:
    """False when TINYLLAMA_QUANT_CACHE is "0" (or "off"/"false"/"no")."""
    return os.environ.get("TINYLLAMA_QUANT_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")


def cache_folder() -> Path:
    """The folder entries are kept in: the compiled kernels' cache folder's `quantized/`."""
    from engine.runtime import native

    return native.cache_dir() / "quantized"


def file_fingerprint(path: Path, header_bytes: int | None = None) -> dict:
    """A cheap fingerprint of one checkpoint file: name, size, mtime_ns and the SHA-256 of its header bytes (a
    safetensors header, or the first `header_bytes` bytes: a GGUF file's metadata and tensor table)."""
    st = path.stat()
    with open(path, "rb") as f:
        if header_bytes is not None:
            digest = hashlib.sha256(f.read(min(header_bytes, MAX_HEADER_BYTES))).hexdigest()
            return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": digest}
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        digest = hashlib.sha256(head + f.read(min(n, MAX_HEADER_BYTES))).hexdigest()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": digest}


def entry_key(files: list[Path], kind: str, settings: dict, header_bytes: int | None = None) -> dict:
    """The key an entry must carry to be used: the checkpoint files' fingerprints, the kind and the quantizer's
    `settings` (format version, group size, ... : JSON values); header_bytes: as in file_fingerprint."""
    return {"kind": kind, "settings": settings,
            "files": [file_fingerprint(Path(p), header_bytes) for p in files]}


def entry_path(folder: Path, kind: str) -> Path:
    """The entry of checkpoint `folder` quantized to `kind` (one per folder and kind)."""
    name = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:24]
    return cache_folder() / f"{name}-{kind}.bin"


def _warn(what: str) -> None:
    print(f"tinyllama: quantized-weights cache: {what}", file=sys.stderr)


class Entry:
    """An open, validated cache entry: `read_into(name, out)` fills `out` with the array stored under `name`."""

    def __init__(self, path: Path, f, arrays: dict[str, dict], extra: dict | None = None):
        self.path, self._f, self._arrays = path, f, arrays
        self.extra = extra or {}  # what the writer kept beside the arrays (JSON values)
        self._map: mmap.mmap | None = None

    def view(self, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The stored array `name` as a read-only array on a memory map of the entry (no copy: its pages are read
        when touched, and shared with every process mapping the same entry). ValueError when the entry does not
        hold it in this dtype and shape. The mapping lives as long as any array viewing it."""
        dtype = np.dtype(dtype)
        info = self._arrays.get(name)
        if info is None or info["dtype"] != dtype.str or tuple(info["shape"]) != tuple(shape):
            raise ValueError(f"{self.path}: no array {name!r} of {dtype} {tuple(shape)}")
        if self._map is None:
            self._map = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=info["offset"]).reshape(shape)

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Copy the stored array `name` into `out` (C-contiguous, the stored dtype and shape), piece by piece from
        the file (no mapping, no second copy). Raises ValueError when the entry does not hold it so."""
        info = self._arrays.get(name)
        if info is None or info["dtype"] != out.dtype.str or tuple(info["shape"]) != out.shape \
                or not out.flags.c_contiguous:
            raise ValueError(f"{self.path}: no array {name!r} of {out.dtype} {out.shape}")
        flat = out.reshape(-1).view(np.uint8)
        self._f.seek(info["offset"])
        done = 0
        while done < flat.size:
            got = self._f.readinto(memoryview(flat[done : done + READ_CHUNK_BYTES]))
            if not got:
                raise ValueError(f"{self.path}: truncated at array {name!r}")
            done += got

    def close(self) -> None:
        """Close the file (arrays handed out by `view` keep their mapping)."""
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_entry(path: Path, key: dict) -> Entry | None:
    """The entry at `path` if it is a complete one carrying `key`, else None (missing, stale, truncated, foreign)."""
    try:
        f = open(path, "rb")
    except OSError:
        return None
    try:
        size = os.fstat(f.fileno()).st_size
        head = f.read(16)
        if len(head) != 16 or head[:8] != MAGIC:
            raise ValueError("not an entry")
        (n,) = struct.unpack("<Q", head[8:])
        if n > MAX_HEADER_BYTES or 16 + n > size:
            raise ValueError("header does not fit")
        header = json.loads(f.read(n).decode("utf-8"))
        if header.get("key") != key or header.get("total_bytes") != size:
            raise ValueError("stale or truncated")
        arrays = header["arrays"]
        for info in arrays.values():
            nbytes = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(info["dtype"]).itemsize
            if info["nbytes"] != nbytes or info["offset"] + nbytes > size:
                raise ValueError("array out of the file")
        return Entry(path, f, arrays, header.get("extra"))
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError):
        f.close()
        return None


def write_entry(path: Path, key: dict, arrays: dict[str, np.ndarray], extra: dict | None = None) -> bool:
    """Write `arrays` (name -> C-contiguous array) under `key` to `path` atomically (a temporary file renamed over
    it), with `extra` (JSON values: Entry.extra) in the header. A failure is one warning line on stderr and False,
    never an error."""
    layout, offset = {}, 0
    for name, a in arrays.items():
        layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "nbytes": a.nbytes, "offset": offset}
        offset += -(-a.nbytes // ALIGN) * ALIGN
    # the header's own length moves the data; fix the start at a page boundary past a generous header estimate
    extra = extra or {}
    probe = json.dumps({"key": key, "arrays": layout, "total_bytes": 0, "extra": extra}).encode()
    start = -(-(16 + len(probe) + 1024 + 40 * len(layout)) // HEADER_ALIGN) * HEADER_ALIGN
    for info in layout.values():
        info["offset"] += start
    total = start + offset
    header = json.dumps({"key": key, "arrays": layout, "total_bytes": total, "extra": extra}).encode()
    assert 16 + len(header) <= start
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".bin", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for name, a in arrays.items():
                f.seek(layout[name]["offset"])
                flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                for i in range(0, flat.size, READ_CHUNK_BYTES):
                    f.write(memoryview(flat[i : i + READ_CHUNK_BYTES]))
            f.truncate(total)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary file (mkstemp makes it private)
        os.replace(tmp, path)
        return True
    except OSError as e:
        _warn(f"not written ({e.strerror or e}): {path}")
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False
