"""KVCache: one sequence's keys and values for every layer, KV heads only, growing in blocks as the sequence grows."""
from __future__ import annotations

import mmap

import numpy as np

from engine.errors import ContextOverflowError

BLOCK_TOKENS = 128


class KVCache:
    """Keys/values of one sequence. k, v: (n_layers, n_kv_heads, capacity, head_dim) float32; `length` tokens valid.

    Capacity grows in blocks of BLOCK_TOKENS (by half again each time, never past `max_length`), so a short chat
    reserves little; `truncate(n)` drops everything after the first n tokens (rejected drafts, a changed chat suffix).
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_length: int, block_tokens: int = BLOCK_TOKENS):
        self.max_length = max_length
        self.block_tokens = block_tokens
        self.length = 0
        self.k = self.allocate((n_layers, n_kv_heads, 0, head_dim))
        self.v = self.allocate((n_layers, n_kv_heads, 0, head_dim))

    def allocate(self, shape: tuple[int, ...]):
        """New storage of `shape`, float32 (a device cache overrides this).

        Each block is its own anonymous memory map, unmapped when the cache drops it: a long-running process (the
        server, a chat) that finishes thousands of sequences gives their memory back to the OS at once. From the
        heap, glibc keeps freed blocks of this size resident once its mmap threshold has risen past them (it rises
        to the largest block freed, up to 32 MiB): bench.serve's server grew 10% between rounds that way."""
        nbytes = int(np.prod(shape)) * 4
        if nbytes == 0:
            return np.empty(shape, dtype=np.float32)
        return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.float32).reshape(shape)

    @property
    def capacity(self) -> int:
        """Positions allocated per layer (k.shape[2]); `length` of them are valid."""
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the k and v storage together (the whole capacity, not just `length`)."""
        return 2 * self.k.size * self.k.itemsize

    def reserve(self, new_length: int) -> None:
        """Make room for `new_length` tokens in total; ContextOverflowError past the model's window."""
        self.check_window(new_length)
        if new_length <= self.capacity:
            return
        grown = max(new_length, self.capacity + self.capacity // 2)
        blocks = -(-grown // self.block_tokens)
        capacity = min(self.max_length, blocks * self.block_tokens)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = self.allocate(tuple(old.shape[:2]) + (capacity, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def check_window(self, new_length: int) -> None:
        """ContextOverflowError when `new_length` tokens would not fit the model's window."""
        if new_length > self.max_length:
            raise ContextOverflowError(
                f"sequence of {new_length} tokens exceeds the model's context window of {self.max_length}"
            )

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store new keys/values of `layer` at positions start..start+T-1. k, v: (T, n_kv_heads, head_dim)."""
        end = start + k.shape[0]
        self.k[layer, :, start:end] = k.swapaxes(0, 1)
        self.v[layer, :, start:end] = v.swapaxes(0, 1)

    def layer(self, layer: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the first `length` positions of `layer`: k, v each (n_kv_heads, length, head_dim)."""
        return self.k[layer, :, :length], self.v[layer, :, :length]

    def copy_prefix_from(self, source: "KVCache", n: int) -> None:
        """Make this cache hold the first n tokens of `source` (a cache of the same model): a copy, so the two grow
        apart afterwards (the choices of an n > 1 request start from one prefill this way)."""
        if not 0 <= n <= source.length:
            raise ValueError(f"cannot copy {n} tokens of a cache of {source.length}")
        self.length = 0
        self.reserve(n)
        self.k[:, :, :n] = source.k[:, :, :n]
        self.v[:, :, :n] = source.v[:, :, :n]
        self.length = n

    def truncate(self, n: int) -> None:
        """Keep only the first n tokens (0 <= n <= length)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n
