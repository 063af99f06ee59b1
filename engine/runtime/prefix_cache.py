"""PrefixCache: a bounded pool of KV blocks indexed by the token ids they hold, shared by every sequence of a model.

A block holds the keys and values of `block_tokens` consecutive tokens for every layer, and is found by the chain
of blocks before it: its key is (the parent block's id, its own token ids), so two blocks are the same only when
the whole prefix up to their end is the same token for token (no hash that could collide: the key is the content).
That makes the index a radix tree with block-sized edges stored in one dict: a lookup walks the prompt a block at a
time, one dict probe per block.

Sequences never read the pool in place: `restore` copies the longest cached prefix into the sequence's own
KVCache (a memcpy, far cheaper than the prefill it replaces) and `store` copies a sequence's full blocks in. So a
block is read-only once stored, no sequence ever sees another's later tokens, the attention kernels keep their
one contiguous cache per sequence, and every block is evictable at any time.

Eviction is weighted by reuse (a segmented LRU): a stored block starts on probation, and moves to the protected
segment the first time a lookup restores it. When the pool is full the least recently used block on probation goes
first (together with the blocks that continue it, no longer reachable), and a protected block only when none is on
probation; the protected segment holds at most PROTECTED_SHARE of the pool (beyond, its least recently used blocks
go back on probation). So a flood of prompts and replies nobody asks for again (random continuations, a client
sending unique junk) churns the probation segment and never pushes out a prefix that requests really share. A chain
is touched from its end back to its root, so a shared prefix (a system prompt) stays more recent than the
conversations that extend it, and leaves are evicted before their parents.

A `salt` partitions the pool: the first block of a chain is keyed by its salt too, so requests with different
salts (different API keys, vLLM's `cache_salt`) never find each other's blocks, and a prober cannot learn from
`cached_tokens` or its time to first token whether someone else sent a prompt.

Only full blocks are stored, and a lookup stops one token short of the prompt: the last prompt token is always run
through the model, since its logits are what the first new token is sampled from.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

PREFIX_BLOCK_TOKENS = 16
PROTECTED_SHARE = 0.8  # at most this share of the pool's blocks are protected (restored at least once)


@dataclass(eq=False)
class _Block:
    id: int
    key: tuple
    parent: "_Block | None"
    data: np.ndarray  # (2, n_layers, n_kv_heads, block_tokens, head_dim) float32: keys then values
    children: set = field(default_factory=set)
    protected: bool = False  # restored by a lookup at least once (see the module docstring)


class PrefixCache:
    """KV blocks of `block_tokens` tokens for a model of n_layers x n_kv_heads x head_dim, at most `max_bytes` of
    them (float32 keys and values). Counters: `hit_tokens` (prompt tokens restored), `evictions` (blocks dropped
    to make room), `nbytes` (bytes held now), `protected_blocks` (blocks restored at least once, see the module
    docstring)."""

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
        self._probation: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self._protected: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self.max_protected = int(self.max_blocks * PROTECTED_SHARE)
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
    def protected_blocks(self) -> int:
        """Blocks in the protected segment (restored by a lookup at least once)."""
        return len(self._protected)

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks held now."""
        return len(self._index) * self.block_nbytes

    @staticmethod
    def usable(cache) -> bool:
        """Whether `cache` keeps its keys/values in host float32 arrays (an engine KVCache) the pool can copy."""
        return isinstance(getattr(cache, "k", None), np.ndarray) and cache.k.dtype == np.float32

    # ---- lookup -------------------------------------------------------------------------------------------------
    @staticmethod
    def _root(salt) -> tuple:
        """The parent key of a chain's first block: its salt's partition."""
        return ("root", salt)

    def _chain(self, token_ids, limit: int, salt=None) -> list[_Block]:
        """The cached blocks that hold token_ids[:n] for the largest n <= limit (a multiple of block_tokens)."""
        b = self.block_tokens
        chain: list[_Block] = []
        parent = None
        for start in range(0, limit - b + 1, b):
            block = self._index.get((self._root(salt) if parent is None else parent.id,
                                     tuple(token_ids[start:start + b])))
            if block is None:
                break
            chain.append(block)
            parent = block
        return chain

    def _touch(self, chain: list[_Block], hit: bool = False) -> None:
        """Mark `chain` used, its root most recent (leaves are evicted before the prefixes they extend); `hit`: a
        lookup restored it, which moves its blocks to the protected segment."""
        for block in reversed(chain):
            if hit and not block.protected:
                del self._probation[block.id]
                block.protected = True
            (self._protected if block.protected else self._probation)[block.id] = block
            (self._protected if block.protected else self._probation).move_to_end(block.id)
        while len(self._protected) > self.max_protected:  # the protected segment's oldest go back on probation
            _, block = self._protected.popitem(last=False)
            block.protected = False
            self._probation[block.id] = block

    def cached_length(self, token_ids, salt=None) -> int:
        """How many leading tokens of `token_ids` `restore` would copy now (all but the last token at most)."""
        token_ids = [int(t) for t in token_ids]
        return len(self._chain(token_ids, len(token_ids) - 1, salt)) * self.block_tokens

    def restore(self, cache, token_ids, salt=None) -> int:
        """Copy the longest cached prefix of `token_ids` (never its last token) stored with the same `salt` into an
        empty `cache` -> its length.

        cache: an empty KVCache (length 0) of the same model; afterwards cache.length = the returned count.
        """
        if cache.length != 0 or not self.usable(cache) or not self._index:
            return 0
        token_ids = [int(t) for t in token_ids]
        chain = self._chain(token_ids, len(token_ids) - 1, salt)
        if not chain:
            return 0
        self._touch(chain, hit=True)
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
    def store(self, cache, token_ids, salt=None) -> int:
        """Copy the full blocks of a sequence into the pool (in `salt`'s partition) -> how many blocks were added.

        token_ids: exactly the tokens whose keys/values `cache` holds at positions 0..len-1 (len <= cache.length).
        Blocks already cached are only marked as used; when the pool is full the least recently used blocks make
        room, those on probation first (never one of this sequence's own prefix).
        """
        if self.max_blocks == 0 or not self.usable(cache):
            return 0
        token_ids = [int(t) for t in token_ids]
        length = min(len(token_ids), cache.length)
        b = self.block_tokens
        chain = self._chain(token_ids, length, salt)
        added = 0
        parent = chain[-1] if chain else None
        on_chain = {block.id for block in chain}
        for start in range(len(chain) * b, length - b + 1, b):
            if len(self._index) >= self.max_blocks and not self._evict_one(on_chain):
                break
            key = (self._root(salt) if parent is None else parent.id, tuple(token_ids[start:start + b]))
            data = np.empty(self.block_shape, dtype=np.float32)
            data[0] = cache.k[:, :, start:start + b]
            data[1] = cache.v[:, :, start:start + b]
            block = _Block(next(self._ids), key, parent, data)
            if parent is not None:
                parent.children.add(block.id)
            self._index[key] = block
            self._probation[block.id] = block
            chain.append(block)
            on_chain.add(block.id)
            parent = block
            added += 1
        self._touch(chain)
        return added

    def _evict_one(self, keep: set[int]) -> bool:
        """Drop the least recently used block on probation, or else the least recently used protected one (and the
        blocks continuing it), never one in `keep` -> whether one was dropped."""
        for segment in (self._probation, self._protected):
            victim = next((b for b in segment.values() if b.id not in keep), None)  # keep: the chain being stored
            if victim is not None:
                self._drop(victim)
                return True
        return False

    def _drop(self, block: _Block) -> None:
        stack = [block]
        if block.parent is not None:
            block.parent.children.discard(block.id)
        while stack:
            b = stack.pop()
            for child_id in b.children:
                stack.append(self._protected.get(child_id) or self._probation[child_id])
            del self._index[b.key]
            del (self._protected if b.protected else self._probation)[b.id]
            self.evictions += 1

    def clear(self) -> None:
        """Forget every block (counters are kept)."""
        self._index.clear()
        self._probation.clear()
        self._protected.clear()
