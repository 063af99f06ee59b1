"""PrefixCache: a bounded pool of KV blocks indexed by the token ids they hold, shared by every sequence of a model.

A block holds the keys and values of `block_tokens` consecutive tokens for every layer, and is found by the chain
of blocks before it: its key is (the parent block's id, its own token ids), so two blocks are the same only when
the whole prefix up to their end is the same token for token (no hash that could collide: the key is the content).
That makes the index a radix tree with block-sized edges stored in one dict: a lookup walks the prompt a block at a
time, one dict probe per block.

Sequences never read the pool in place: `restore` copies the longest cached prefix into the sequence's own
KVCache (a memcpy, far cheaper than the prefill it replaces) and `store` copies a sequence's full blocks in. So a
block is read-only once stored, no sequence ever sees another's later tokens, the attention kernels keep their
one contiguous cache per sequence, and every block is evictable at any time: when the pool is full the least
recently used block goes first, together with the blocks that continue it (no longer reachable). A chain is
touched from its end back to its root, so a shared prefix (a system prompt) stays more recent than the
conversations that extend it, and leaves are evicted before their parents.

Only full blocks are stored, and a lookup stops one token short of the prompt: the last prompt token is always run
through the model, since its logits are what the first new token is sampled from.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

PREFIX_BLOCK_TOKENS = 16


@dataclass(eq=False)
class _Block:
    id: int
    key: tuple
    parent: "_Block | None"
    data: np.ndarray  # (2, n_layers, n_kv_heads, block_tokens, head_dim) float32: keys then values
    children: set = field(default_factory=set)


class PrefixCache:
    """KV blocks of `block_tokens` tokens for a model of n_layers x n_kv_heads x head_dim, at most `max_bytes` of
    them (float32 keys and values). Counters: `hit_tokens` (prompt tokens restored), `evictions` (blocks dropped
    to make room), `nbytes` (bytes held now)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_bytes: int,
                 block_tokens: int = PREFIX_BLOCK_TOKENS):
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.block_tokens = block_tokens
        self.block_shape = (2, n_layers, n_kv_heads, block_tokens, head_dim)
        self.block_nbytes = int(np.prod(self.block_shape)) * 4
        self.max_bytes = max(0, int(max_bytes))
        self.max_blocks = self.max_bytes // self.block_nbytes
        self._index: dict[tuple, _Block] = {}
        self._lru: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self._ids = itertools.count()
        self.hit_tokens = 0
        self.evictions = 0

    @classmethod
    def for_model(cls, model, max_bytes: int, block_tokens: int = PREFIX_BLOCK_TOKENS) -> "PrefixCache":
        """A pool sized for `model`'s layers, KV heads and head size."""
        c = model.config
        return cls(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, max_bytes, block_tokens)

    @property
    def blocks(self) -> int:
        """Blocks held now."""
        return len(self._index)

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks held now."""
        return len(self._index) * self.block_nbytes

    @staticmethod
    def usable(cache) -> bool:
        """Whether `cache` keeps its keys/values in host float32 arrays (an engine KVCache) the pool can copy."""
        return isinstance(getattr(cache, "k", None), np.ndarray) and cache.k.dtype == np.float32

    # ---- lookup -------------------------------------------------------------------------------------------------
    def _chain(self, token_ids, limit: int) -> list[_Block]:
        """The cached blocks that hold token_ids[:n] for the largest n <= limit (a multiple of block_tokens)."""
        b = self.block_tokens
        chain: list[_Block] = []
        parent = None
        for start in range(0, limit - b + 1, b):
            block = self._index.get((-1 if parent is None else parent.id, tuple(token_ids[start:start + b])))
            if block is None:
                break
            chain.append(block)
            parent = block
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        for block in reversed(chain):  # the root ends most recent: leaves are evicted before the prefixes they extend
            self._lru.move_to_end(block.id)

    def cached_length(self, token_ids) -> int:
        """How many leading tokens of `token_ids` `restore` would copy now (all but the last token at most)."""
        token_ids = [int(t) for t in token_ids]
        return len(self._chain(token_ids, len(token_ids) - 1)) * self.block_tokens

    def restore(self, cache, token_ids) -> int:
        """Copy the longest cached prefix of `token_ids` (never its last token) into an empty `cache` -> its length.

        cache: an empty KVCache (length 0) of the same model; afterwards cache.length = the returned count.
        """
        if cache.length != 0 or not self.usable(cache) or not self._index:
            return 0
        token_ids = [int(t) for t in token_ids]
        chain = self._chain(token_ids, len(token_ids) - 1)
        if not chain:
            return 0
        self._touch(chain)
        b = self.block_tokens
        n = len(chain) * b
        cache.reserve(len(token_ids))  # room for the whole prompt at once: its prefill then never re-allocates
        for i, block in enumerate(chain):
            cache.k[:, :, i * b:(i + 1) * b] = block.data[0]
            cache.v[:, :, i * b:(i + 1) * b] = block.data[1]
        cache.length = n
        self.hit_tokens += n
        return n

    # ---- insertion ----------------------------------------------------------------------------------------------
    def store(self, cache, token_ids) -> int:
        """Copy the full blocks of a sequence into the pool -> how many blocks were added.

        token_ids: exactly the tokens whose keys/values `cache` holds at positions 0..len-1 (len <= cache.length).
        Blocks already cached are only marked as used; when the pool is full the least recently used blocks make
        room (never one of this sequence's own prefix).
        """
        if self.max_blocks == 0 or not self.usable(cache):
            return 0
        token_ids = [int(t) for t in token_ids]
        length = min(len(token_ids), cache.length)
        b = self.block_tokens
        chain = self._chain(token_ids, length)
        added = 0
        parent = chain[-1] if chain else None
        on_chain = {block.id for block in chain}
        for start in range(len(chain) * b, length - b + 1, b):
            if len(self._index) >= self.max_blocks and not self._evict_one(on_chain):
                break
            key = (-1 if parent is None else parent.id, tuple(token_ids[start:start + b]))
            data = np.empty(self.block_shape, dtype=np.float32)
            data[0] = cache.k[:, :, start:start + b]
            data[1] = cache.v[:, :, start:start + b]
            block = _Block(next(self._ids), key, parent, data)
            if parent is not None:
                parent.children.add(block.id)
            self._index[key] = block
            self._lru[block.id] = block
            chain.append(block)
            on_chain.add(block.id)
            parent = block
            added += 1
        self._touch(chain)
        return added

    def _evict_one(self, keep: set[int]) -> bool:
        """Drop the least recently used block (and the blocks continuing it), unless it is in `keep` -> dropped?"""
        victim = next(iter(self._lru.values()), None)
        if victim is None or victim.id in keep:
            return False
        self._drop(victim)
        return True

    def _drop(self, block: _Block) -> None:
        stack = [block]
        if block.parent is not None:
            block.parent.children.discard(block.id)
        while stack:
            b = stack.pop()
            for child_id in b.children:
                stack.append(self._lru[child_id])
            del self._index[b.key]
            del self._lru[b.id]
            self.evictions += 1

    def clear(self) -> None:
        """Forget every block (counters are kept)."""
        self._index.clear()
        self._lru.clear()
