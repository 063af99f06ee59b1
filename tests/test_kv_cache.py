"""engine.runtime.kv_cache.KVCache: what its docstring promises (growth in blocks, by half again each time, never
past the window; contents kept across growth; truncate within what was written; nbytes), checked directly."""
from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ContextOverflowError
from engine.runtime.kv_cache import KVCache

LAYERS, KV_HEADS, HEAD_DIM = 2, 3, 4


def filled(cache: KVCache, n: int, start: int = 0) -> None:
    """Write n tokens at start..start+n-1 in every layer: key value = position + 0.25 * layer, value = -key."""
    cache.reserve(start + n)
    for layer in range(LAYERS):
        k = np.arange(start, start + n, dtype=np.float32)[:, None, None] + 0.25 * layer
        k = np.broadcast_to(k, (n, KV_HEADS, HEAD_DIM)).copy()
        cache.write(layer, start, k, -k)
    cache.length = start + n


def test_grows_in_blocks_by_half_again_never_past_the_window():
    c = KVCache(LAYERS, KV_HEADS, HEAD_DIM, max_length=2000, block_tokens=128)
    assert c.capacity == 0 and c.length == 0
    c.reserve(1)
    assert c.capacity == 128
    k = c.k
    c.reserve(128)
    assert c.k is k  # exactly full: no new storage
    capacities = [128]
    for n in range(129, 2001):
        c.reserve(n)
        if c.capacity != capacities[-1]:
            capacities.append(c.capacity)
    # each growth is to max(asked, 1.5x) rounded up to whole blocks, and the last one stops at the window
    assert capacities == [128, 256, 384, 640, 1024, 1536, 2000]
    assert all(cap % 128 == 0 for cap in capacities[:-1])
    c.reserve(2000)
    with pytest.raises(ContextOverflowError, match="context window of 2000"):
        c.reserve(2001)


def test_contents_survive_growth_and_truncate():
    c = KVCache(LAYERS, KV_HEADS, HEAD_DIM, max_length=300, block_tokens=8)
    filled(c, 8)  # exactly one block
    filled(c, 5, start=8)  # grows
    assert c.capacity >= 13 and c.length == 13
    for layer in range(LAYERS):
        keys, values = c.layer(layer, 13)
        assert keys.shape == values.shape == (KV_HEADS, 13, HEAD_DIM)
        expected = np.arange(13, dtype=np.float32)[None, :, None] + 0.25 * layer
        np.testing.assert_array_equal(keys, np.broadcast_to(expected, keys.shape))
        np.testing.assert_array_equal(values, -keys)
    c.truncate(10)
    assert c.length == 10
    filled(c, 2, start=10)  # overwrite after the cut
    np.testing.assert_array_equal(c.layer(1, 12)[0][0, :, 0], np.arange(12) + 0.25)


def test_truncate_only_within_what_was_written():
    c = KVCache(LAYERS, KV_HEADS, HEAD_DIM, max_length=64, block_tokens=16)
    filled(c, 5)
    assert c.capacity == 16
    for bad in (6, 16, -1):  # past the length (even within the capacity), or negative
        with pytest.raises(ValueError):
            c.truncate(bad)
    c.truncate(5)
    c.truncate(0)
    assert c.length == 0


def test_nbytes_counts_keys_and_values_of_the_whole_capacity():
    c = KVCache(LAYERS, KV_HEADS, HEAD_DIM, max_length=64, block_tokens=16)
    filled(c, 3)
    assert c.nbytes == 2 * LAYERS * KV_HEADS * 16 * HEAD_DIM * 4


FREED_CACHES = """
import sys
import numpy as np
from engine.runtime.kv_cache import KVCache
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
big = np.ones(8 << 20, np.uint8); del big  # a freed 8 MiB block: glibc's mmap threshold rises past what follows
base = rss()
if sys.argv[1] == "kvcache":  # 64 caches of TinyLlama's shape at their first block (22 x 4 x 128 x 64: 2.9 MB each)
    held = [KVCache(22, 4, 64, 2048) for _ in range(64)]
    for c in held:
        c.reserve(100)
        c.k.fill(1.0); c.v.fill(1.0)
else:  # the same bytes as heap blocks
    held = [np.ones((22, 4, 128, 64), np.float32) for _ in range(128)]
keep = held[-1]; held.clear()  # every one freed but the newest
print((rss() - base) / 2**20)
"""


@pytest.mark.skipif(not __import__("platform").libc_ver()[0] == "glibc", reason="the heap behaviour shown is glibc's")
def test_freed_caches_leave_the_resident_set():
    """A server finishes sequences for hours: their caches' memory must go back to the OS when they end, and (the
    control) heap blocks of the same size would stay resident."""
    import subprocess
    import sys

    def resident_mib(kind: str) -> float:
        return float(subprocess.run([sys.executable, "-c", FREED_CACHES, kind], capture_output=True, text=True,
                                    check=True).stdout)

    assert resident_mib("heap") > 300  # 127 of 128 freed 2.9 MB blocks kept on the heap (368 MB)
    assert resident_mib("kvcache") < 16  # only the cache still held (2 x 2.9 MB)


def test_copy_prefix_from_copies_the_first_tokens_and_the_two_grow_apart():
    source = KVCache(LAYERS, KV_HEADS, HEAD_DIM, max_length=300, block_tokens=8)
    filled(source, 20)
    copy = KVCache(LAYERS, KV_HEADS, HEAD_DIM, max_length=300, block_tokens=8)
    filled(copy, 30, start=0)  # whatever it held before is dropped
    copy.copy_prefix_from(source, 12)
    assert copy.length == 12
    for layer in range(LAYERS):
        k, v = copy.layer(layer, 12)
        np.testing.assert_array_equal(k, source.layer(layer, 12)[0])
        np.testing.assert_array_equal(v, source.layer(layer, 12)[1])
    filled(copy, 5, start=12)  # the copy grows on its own: the source keeps its tokens 12..19
    copy.k[:, :, :12] = 0.0
    expected = np.arange(20, dtype=np.float32)[None, None, :, None] + 0.25 * np.arange(LAYERS)[:, None, None, None]
    np.testing.assert_array_equal(source.k[:, :, :20], np.broadcast_to(expected, (LAYERS, KV_HEADS, 20, HEAD_DIM)))
    for bad in (-1, 21):
        with pytest.raises(ValueError):
            copy.copy_prefix_from(source, bad)
