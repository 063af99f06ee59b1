"""The static-buffer decode path (what CUDA graphs capture), the KV slot pool and the batched one-launch decode.

In the interpreter there is no CUDA graph: TritonBackend(cuda_graphs=True) runs the same static-buffer step as plain
calls ("graph mode off, static buffers on"); these tests check it equals the eager path and the NumPy backend.
"""

import gc

import numpy as np
import pytest

from tests.kernel_support import DEVICE, forward_tolerance, rounded_weights, torch  # first: sets TRITON_INTERPRET
from engine.runtime.batch import SequenceStep
from engine.errors import ContextOverflowError
from engine.runtime.numpy_backend import NumpyBackend
from tinyllama_kernels._common import interpreting
from tinyllama_kernels.attention_decode import decode_attention
from tinyllama_kernels.device_cache import DeviceKVCache, KVSlotPool, PooledKVCache
from tinyllama_kernels.kv_store import store_kv
from tinyllama_kernels.triton_backend import TritonBackend, _to_host_f32
from tests.test_kernels_backend import _config, _rel, _weights


def _t(a, dtype=torch.float32):
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).to(DEVICE)


def test_store_kv_scatters_tokens_to_slots_and_positions():
    rng = np.random.default_rng(0)
    T, Hkv, D, S, cap = 5, 2, 8, 4, 16
    qkv = _t(rng.standard_normal((T, (4 + 2 * Hkv) * D)).astype(np.float32))
    k = qkv[:, 4 * D : (4 + Hkv) * D].view(T, Hkv, D)  # strided views of a fused qkv, as in the backend
    v = qkv[:, (4 + Hkv) * D :].view(T, Hkv, D)
    kc = torch.zeros((S, Hkv, cap, D), device=DEVICE)
    vc = torch.zeros_like(kc)
    slots, pos = [3, 3, 1, 2, 1], [0, 1, 7, 15, 8]
    store_kv(k, v, kc, vc, _t(np.array(slots), torch.int32), _t(np.array(pos), torch.int32))
    ref_k, ref_v = torch.zeros_like(kc), torch.zeros_like(vc)
    for t, (s, p) in enumerate(zip(slots, pos)):
        ref_k[s, :, p] = k[t]
        ref_v[s, :, p] = v[t]
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_slots_and_fixed_grid_equal_per_sequence(dtype):
    """One launch over a slot pool (rows named by `slots`, grid sized by the capacity) equals per-sequence launches."""
    rng = np.random.default_rng(1)
    H, Hkv, D, S, cap = 4, 2, 8, 5, 96
    k = _t(rng.standard_normal((S, Hkv, cap, D)), dtype)
    v = _t(rng.standard_normal((S, Hkv, cap, D)), dtype)
    slots, lengths = [4, 1, 2], [70, 1, 33]
    q = _t(rng.standard_normal((3, H, D)), dtype)
    out = decode_attention(q, k, v, _t(np.array(lengths), torch.int32), max_length=cap,
                           slots=_t(np.array(slots), torch.int32))
    for b, (s, n) in enumerate(zip(slots, lengths)):
        ref = decode_attention(q[b : b + 1], k[s][None], v[s][None], _t(np.array([n]), torch.int32), max_length=n)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        np.testing.assert_allclose(out[b].float().cpu().numpy(), ref[0].float().cpu().numpy(), rtol=tol, atol=tol)


def test_slot_pool_grows_keeps_contents_and_recycles_slots():
    pool = KVSlotPool(2, 1, 4, 8, torch.float32, torch.device(DEVICE), slots=2)  # scratch + 1 slot
    a = PooledKVCache(pool, max_length=8)
    a.reserve(2)
    a.write(1, 0, _t(np.ones((2, 1, 4))), _t(2 * np.ones((2, 1, 4))))
    a.length = 2
    b = PooledKVCache(pool, max_length=8)  # no free slot: the pool doubles
    assert pool.generation == 1 and pool.slots == 4 and {a.slot, b.slot} == {1, 2}
    assert torch.equal(a.k[1, :, :2], torch.ones((1, 2, 4), device=DEVICE))
    assert torch.equal(a.v[1, :, :2], 2 * torch.ones((1, 2, 4), device=DEVICE))
    slot = b.slot
    del b
    gc.collect()
    assert PooledKVCache(pool, max_length=8).slot == slot  # returned on garbage collection, handed out again
    assert a.capacity == 8 and a.nbytes == 2 * 2 * 1 * 8 * 4 * 4
    with pytest.raises(ContextOverflowError):
        a.reserve(9)


def test_pooled_cache_moves_to_private_storage_past_the_pool_window():
    pool = KVSlotPool(1, 1, 2, 4, torch.float32, torch.device(DEVICE))
    c = PooledKVCache(pool, max_length=300)
    c.reserve(3)
    c.write(0, 0, _t(np.arange(6).reshape(3, 1, 2)), _t(-np.arange(6).reshape(3, 1, 2)))
    c.length = 3
    used = pool.in_use
    c.reserve(5)  # beyond the 4-position slot
    assert c.slot is None and pool.in_use == used - 1 and c.capacity >= 5
    assert torch.equal(c.k[0, 0, :3], _t(np.arange(6).reshape(3, 2)))
    assert torch.equal(c.v[0, 0, :3], _t(-np.arange(6).reshape(3, 2)))
    c.length = 5
    c.reserve(200)  # grows like a DeviceKVCache, keeping what it holds
    assert torch.equal(c.k[0, 0, :3], _t(np.arange(6).reshape(3, 2)))


def _decode_script(backend, n_seqs=3, n_steps=2):
    """Prefill n_seqs prompts of different lengths in one ragged batch, decode them together, then a mixed batch,
    a verification step, a truncation, and decoding again: every logits array."""
    rng = np.random.default_rng(5)
    caches = [backend.new_cache() for _ in range(n_seqs)]
    out = backend.forward([SequenceStep(c, rng.integers(0, 96, 2 + i), all_logits=(i == 0))
                           for i, c in enumerate(caches)])
    for _ in range(n_steps):
        out += backend.forward([SequenceStep(c, [int(rng.integers(0, 96))]) for c in caches])
    out += backend.forward([SequenceStep(caches[0], [3, 4], all_logits=True)] +
                           [SequenceStep(c, [int(rng.integers(0, 96))]) for c in caches[1:]])  # mixed
    caches[1].truncate(caches[1].length - 2)
    out += backend.forward([SequenceStep(c, [7]) for c in caches])
    out += backend.forward([SequenceStep(caches[-1], [9])])  # batch of one
    return out


def test_static_decode_path_equals_eager_and_numpy():
    c = _config(4, 2)
    w = _weights(c, seed=21)
    static = TritonBackend(c, w, dtype="float32", cuda_graphs=True, graph_batch_sizes=(1, 2))
    eager = TritonBackend(c, w, dtype="float32", cuda_graphs=False)
    ours = _decode_script(static)
    assert static.stats["static_steps"] == 2 + 2  # 3 sequences run as a 2-bucket and a 1-bucket piece
    assert static.stats["eager_steps"] == 2
    assert static.stats["graph_captures"] == (0 if interpreting() else 2)
    ref_eager = _decode_script(eager)
    assert eager.stats["static_steps"] == 0
    ref = _decode_script(NumpyBackend(c, w))
    for o, e, r in zip(ours, ref_eager, ref):
        assert o.dtype == np.float32 and o.shape == e.shape == r.shape
        assert _rel(o, e) < 1e-5
        assert _rel(o, r) < 1e-4


def test_static_decode_survives_pool_growth_and_spills():
    """Caches created mid-run grow the pool (graphs would be re-captured); a sequence past pool_window spills to
    private storage and its batches go the eager way; logits still equal the NumPy backend's."""
    c = _config(4, 1)
    w = _weights(c, seed=4)
    ours_b = TritonBackend(c, w, dtype="float32", graph_batch_sizes=(2,), pool_window=12)
    ref_b = NumpyBackend(c, w)
    results, first = [], []
    for backend in (ours_b, ref_b):
        out = []
        a = backend.new_cache()
        first.append(a)
        out += backend.forward([SequenceStep(a, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])])
        caches = [a] + [backend.new_cache() for _ in range(2)]  # more than the pool's first slots
        out += backend.forward([SequenceStep(x, [11, 12]) for x in caches[1:]])
        for step in range(3):  # `a` reaches 13 > pool_window on the 3rd step
            out += backend.forward([SequenceStep(x, [20 + step]) for x in caches])
        results.append(out)
    assert ours_b.pool.generation >= 1
    assert first[0].slot is None
    assert ours_b.stats["static_steps"] == 2 and ours_b.stats["eager_steps"] == 3
    for o, r in zip(*results):
        assert _rel(o, r) < 1e-4


def test_bf16_logits_widen_exactly_on_the_host():
    x = torch.tensor([[1.5, -2.75, 3e-3, -0.0], [65504.0, -1e-30, 7.0, 1.0]]).to(torch.bfloat16)
    got = _to_host_f32(x.to(DEVICE))
    assert got.dtype == np.float32
    assert np.array_equal(got, x.float().numpy())


def test_static_path_bf16_close_to_eager():
    c = _config(4, 2)
    w = _weights(c, seed=8)
    ours = _decode_script(TritonBackend(c, w, dtype="bfloat16", graph_batch_sizes=(4,)), n_seqs=2, n_steps=1)
    ref = _decode_script(NumpyBackend(c, rounded_weights(w, torch.bfloat16)), n_seqs=2, n_steps=1)
    tolerance = forward_tolerance(torch.bfloat16, c.num_hidden_layers)  # derived in tests/kernel_support.py
    for o, r in zip(ours, ref):
        assert _rel(o, r) < tolerance


def test_load_model_passes_cuda_graphs_through(stories260k):
    import engine

    model = engine.load_model(str(stories260k), backend="triton", dtype="float32", cuda_graphs=False)
    assert model.backend.cuda_graphs is False and isinstance(model.new_cache(), DeviceKVCache)
    model = engine.load_model(str(stories260k), backend="triton", dtype="float32")
    assert model.backend.cuda_graphs is True and isinstance(model.new_cache(), PooledKVCache)
