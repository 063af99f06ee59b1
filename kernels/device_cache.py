"""Device KV caches: DeviceKVCache (one sequence, its own growing tensors) and PooledKVCache (one slot of a
KVSlotPool: fixed-window storage stacked across sequences, for batched decode attention and CUDA graphs)."""

import weakref

import torch

from engine.runtime.kv_cache import BLOCK_TOKENS, KVCache


class DeviceKVCache(KVCache):
    """Keys/values of one sequence in device tensors: engine.runtime.kv_cache.KVCache's growth, writes and truncation, with
    k, v: (n_layers, n_kv_heads, capacity, head_dim) in the backend's dtype on its device."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device, block_tokens: int = BLOCK_TOKENS):
        self.dtype, self.device = dtype, device
        super().__init__(n_layers, n_kv_heads, head_dim, max_length, block_tokens)

    def allocate(self, shape: tuple[int, ...]) -> torch.Tensor:
        """New uninitialised tensor of `shape` in the cache's dtype on its device."""
        return torch.empty(shape, dtype=self.dtype, device=self.device)


class KVSlotPool:
    """Fixed-window KV storage shared by many sequences: k, v (n_layers, slots, n_kv_heads, window, head_dim).

    Layer i's storage k[i] is one stacked (slots, n_kv_heads, window, head_dim) tensor, so decode attention for a
    whole batch is one launch (each sequence names its row), and its address never changes while the pool keeps
    its size: what a captured CUDA graph needs. Slot 0 is scratch (the padding rows of a graph batch write there)
    and is never handed out. When every slot is taken the pool doubles (a new allocation, contents copied) and
    `generation` goes up: graphs captured against the old storage must be dropped.
    """

    SCRATCH = 0

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, window: int, dtype: torch.dtype,
                 device: torch.device, slots: int = 8):
        self.window = window
        self.generation = 0
        shape = (n_layers, max(2, slots), n_kv_heads, window, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self._free = list(range(self.slots - 1, 0, -1))  # pop() hands out the lowest free slot first

    @property
    def slots(self) -> int:
        """Number of slots, the scratch slot 0 included."""
        return self.k.shape[1]

    @property
    def in_use(self) -> int:
        """Slots handed out now (the scratch slot not counted)."""
        return self.slots - 1 - len(self._free)

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot's keys and values over all layers."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def acquire(self) -> int:
        """Hand out the lowest free slot (never the scratch slot); the pool doubles first if none is free."""
        if not self._free:
            self._grow(2 * self.slots)
        return self._free.pop()

    def release(self, slot: int) -> None:
        """Give `slot` back to the free list (the scratch slot and an already free slot are ignored)."""
        if slot != self.SCRATCH and slot not in self._free:
            self._free.append(slot)
            self._free.sort(reverse=True)

    def _grow(self, slots: int) -> None:
        old = self.slots
        for name in ("k", "v"):
            cur = getattr(self, name)
            new = torch.empty(cur.shape[:1] + (slots,) + cur.shape[2:], dtype=cur.dtype, device=cur.device)
            new[:, :old].copy_(cur)
            setattr(self, name, new)
        self._free = sorted(self._free + list(range(old, slots)), reverse=True)
        self.generation += 1


class PooledKVCache(KVCache):
    """One sequence's keys/values in a slot of a KVSlotPool (KVCache's writes and truncation over pool storage).

    k, v: (n_layers, n_kv_heads, capacity, head_dim) views of the pool (re-read on every access, so they follow a
    pool that grew). The slot returns to the pool when the cache is garbage-collected (or on `release()`). A
    sequence that outgrows the pool's window moves to private growing storage (a DeviceKVCache, up to the model's
    window); it then takes the per-sequence paths of the backend (`slot` is None).
    """

    def __init__(self, pool: KVSlotPool, max_length: int, block_tokens: int = BLOCK_TOKENS):
        # KVCache.__init__ is not called: the storage is the pool's, k and v are views of it.
        self.pool = pool
        self.max_length = max_length
        self.block_tokens = block_tokens
        self.length = 0
        self.slot: int | None = pool.acquire()
        self._private: DeviceKVCache | None = None
        self._finalizer = weakref.finalize(self, pool.release, self.slot)

    @property
    def k(self) -> torch.Tensor:
        """Keys: (n_layers, n_kv_heads, capacity, head_dim) view of the pool slot, or the private tensor."""
        return self.pool.k[:, self.slot] if self.slot is not None else self._private.k

    @property
    def v(self) -> torch.Tensor:
        """Values: (n_layers, n_kv_heads, capacity, head_dim) view of the pool slot, or the private tensor."""
        return self.pool.v[:, self.slot] if self.slot is not None else self._private.v

    @property
    def capacity(self) -> int:
        """Positions available: the pool's window, or the private storage's capacity."""
        return self.pool.window if self.slot is not None else self._private.capacity

    @property
    def nbytes(self) -> int:
        """Bytes of this cache's storage: one pool slot, or the private storage."""
        return self.pool.slot_nbytes if self.slot is not None else self._private.nbytes

    def reserve(self, new_length: int) -> None:
        """Make room for `new_length` tokens in total; ContextOverflowError past the model's window."""
        self.check_window(new_length)
        if self.slot is not None:
            if new_length <= self.pool.window:
                return
            k = self.pool.k[:, self.slot]
            n_layers, n_kv_heads, _, head_dim = k.shape
            private = DeviceKVCache(n_layers, n_kv_heads, head_dim, self.max_length, k.dtype, k.device,
                                    self.block_tokens)
            private.reserve(new_length)
            private.k[:, :, : self.length].copy_(k[:, :, : self.length])
            private.v[:, :, : self.length].copy_(self.pool.v[:, self.slot, :, : self.length])
            self._private = private
            self.release()
        self._private.length = self.length
        self._private.reserve(new_length)

    def release(self) -> None:
        """Give the slot back to the pool now (the cache must not be used in the pool afterwards)."""
        self._finalizer()
        self.slot = None
