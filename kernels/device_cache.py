"""DeviceKVCache: one sequence's keys and values for every layer as device (torch) tensors."""

import torch

from engine.errors import ContextOverflowError

BLOCK_TOKENS = 128


class DeviceKVCache:
    """Keys/values of one sequence. k, v: (n_layers, n_kv_heads, capacity, head_dim) device tensors; `length` valid.

    Same contract as engine.kv_cache.KVCache: capacity grows in blocks of BLOCK_TOKENS (by half again each time,
    never past `max_length`); `truncate(n)` keeps the first n tokens.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device, block_tokens: int = BLOCK_TOKENS):
        self.max_length = max_length
        self.block_tokens = block_tokens
        self.length = 0
        self.k = torch.empty((n_layers, n_kv_heads, 0, head_dim), dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reserve(self, new_length: int) -> None:
        """Make room for `new_length` tokens in total; ContextOverflowError past the model's window."""
        if new_length > self.max_length:
            raise ContextOverflowError(
                f"sequence of {new_length} tokens exceeds the model's context window of {self.max_length}"
            )
        if new_length <= self.capacity:
            return
        grown = max(new_length, self.capacity + self.capacity // 2)
        capacity = min(self.max_length, -(-grown // self.block_tokens) * self.block_tokens)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.empty(old.shape[:2] + (capacity, old.shape[3]), dtype=old.dtype, device=old.device)
            new[:, :, : self.length].copy_(old[:, :, : self.length])
            setattr(self, name, new)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values of `layer` at positions start..start+T-1. k, v: (T, n_kv_heads, head_dim)."""
        end = start + k.shape[0]
        self.k[layer, :, start:end].copy_(k.transpose(0, 1))
        self.v[layer, :, start:end].copy_(v.transpose(0, 1))

    def truncate(self, n: int) -> None:
        """Keep only the first n tokens (0 <= n <= length)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n
