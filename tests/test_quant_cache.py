"""The on-disk cache of quantized weights (engine/runtime/quant_cache.py): a second load reads the first's bytes."""
from __future__ import annotations

import os

import numpy as np
import pytest

import engine
from engine.runtime import quant, quant_cache
from tests.conftest import make_random_checkpoint


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A fresh cache folder, the cache on (the suite turns it off by default: conftest)."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(quant_cache, "cache_folder", lambda: folder)
    monkeypatch.setenv("TINYLLAMA_QUANT_CACHE", "1")
    return folder


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """A small random bf16 Llama, untied, with rows that are whole groups of 32 (int4 throughout)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("qcache-llama"), dtype="bfloat16", seed=11,
                                  hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, num_hidden_layers=2, initializer_range=0.05)


IDS = np.array([1, 5, 9, 3, 7, 2])


def load(folder, kind):
    return engine.load_model(str(folder), weights_dtype=kind)


def no_quantizer(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the quantizer ran: the cache was not used")
    monkeypatch.setattr(quant, "quantize_into", refuse)


def same_arrays(a, b):
    wa, wb = a.backend.weights.arrays(), b.backend.weights.arrays()
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_second_load_reads_the_cache_bit_for_bit(small_llama, cache, monkeypatch, kind):
    first = load(small_llama, kind)
    entries = list(cache.glob(f"*-{kind}.bin"))
    assert len(entries) == 1
    with monkeypatch.context() as m:
        no_quantizer(m)
        second = load(small_llama, kind)
    same_arrays(first, second)
    wqkv = second.backend.weights.layers[0].wqkv
    assert isinstance(wqkv, quant.QuantMatrix) and wqkv.kind == kind
    assert np.array_equal(first.logits(IDS), second.logits(IDS))


def test_stories260k_tied_embeddings_round_trip(stories260k, cache, monkeypatch):
    """stories260K: tied embeddings (one lm_head entry) and int4 rows that stay int8 (172 wide)."""
    first = load(stories260k, "int4")
    with monkeypatch.context() as m:
        no_quantizer(m)
        second = load(stories260k, "int4")
    assert second.backend.weights.lm_head is second.backend.weights.embed
    same_arrays(first, second)
    assert np.array_equal(first.logits(IDS), second.logits(IDS))


def test_changed_checkpoint_is_quantized_again(small_llama, cache, monkeypatch, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(small_llama, folder)
    load(folder, "int8")
    weights_file = next(folder.glob("*.safetensors"))
    st = weights_file.stat()
    os.utime(weights_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: same bytes, newer
    calls = []
    real = quant.quantize_into
    monkeypatch.setattr(quant, "quantize_into", lambda *a, **k: (calls.append(1), real(*a, **k)))
    load(folder, "int8")
    assert calls, "a touched checkpoint must be quantized again"
    # replaced by another checkpoint of the same shape: quantized again, and the result is the new weights'
    shutil.rmtree(folder)
    make_random_checkpoint(folder, dtype="bfloat16", seed=12, hidden_size=64, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, initializer_range=0.05)
    calls.clear()
    replaced = load(folder, "int8")
    assert calls
    monkeypatch.setenv("TINYLLAMA_QUANT_CACHE", "0")
    same_arrays(replaced, load(folder, "int8"))
    assert len(list(cache.glob("*.bin"))) == 1  # the folder's entry overwritten, not a second one


def test_truncated_entry_is_ignored_and_rewritten(small_llama, cache, monkeypatch):
    first = load(small_llama, "int8")
    (entry,) = cache.glob("*-int8.bin")
    size = entry.stat().st_size
    with open(entry, "r+b") as f:
        f.truncate(size - 100)
    second = load(small_llama, "int8")  # quantized again (the quantizer is real here)
    same_arrays(first, second)
    assert entry.stat().st_size == size  # rewritten whole
    entry.write_bytes(b"TLQCACHE" + b"\xff" * 64)  # garbage header
    same_arrays(first, load(small_llama, "int8"))
    with monkeypatch.context() as m:
        no_quantizer(m)
        same_arrays(first, load(small_llama, "int8"))


def test_switched_off_bypasses_the_cache(small_llama, cache, monkeypatch):
    monkeypatch.setenv("TINYLLAMA_QUANT_CACHE", "0")
    load(small_llama, "int8")
    assert not cache.exists() or not list(cache.iterdir())


def test_unwritable_cache_folder_still_loads(small_llama, tmp_path, monkeypatch, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(quant_cache, "cache_folder", lambda: blocker / "quantized")
    monkeypatch.setenv("TINYLLAMA_QUANT_CACHE", "1")
    model = load(small_llama, "int8")
    err = capfd.readouterr().err
    assert "quantized-weights cache: not written" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("TINYLLAMA_QUANT_CACHE", "0")
    same_arrays(model, load(small_llama, "int8"))


QUANT_LOAD_PROBE = """
import json, sys
import engine

def status(field):  # this process's resident set (VmRSS) or its peak (VmHWM), in bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

from engine.runtime import native, weights
native.status()  # the kernels' library loaded before the count starts
weights.QUANTIZE_PIECE_BYTES = int(sys.argv[3])
before = status("VmRSS")
model = engine.load_model(sys.argv[1], weights_dtype=sys.argv[2])
print(json.dumps({"before": before, "peak": status("VmHWM"), "weight_bytes": int(model.backend.weights.nbytes)}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS / VmHWM from /proc (Linux)")
def test_a_first_quantized_load_holds_one_piece_of_float32_rows(tmp_path):
    """Quantizing at load (the cache off) reads each tensor a piece of rows at a time: the load's peak, less the RSS
    before it, stays within 1.1x the quantized bytes plus one piece (1 MB here) and 6 MB of slack (the file's pages
    in flight, allocator arenas; measured 5-6 MB). The embedding table, the largest tensor, is 49 MB in float32
    against 21 MB of int4 model (its lm_head int8): reading it whole, as the loader once did, puts the peak at 70 MB."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    folder = make_random_checkpoint(tmp_path / "big-vocab", dtype="bfloat16", seed=3, vocab_size=32000,
                                    hidden_size=384, intermediate_size=512, num_attention_heads=4,
                                    num_key_value_heads=2, num_hidden_layers=2)
    piece = 1 << 20
    env = dict(os.environ, TINYLLAMA_QUANT_CACHE="0")
    done = subprocess.run([sys.executable, "-c", QUANT_LOAD_PROBE, str(folder), "int4", str(piece)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout)
    held = m["peak"] - m["before"]
    assert held <= 1.1 * m["weight_bytes"] + piece + (6 << 20), \
        f"quantizing load peak {held / 1e6:.1f} MB for {m['weight_bytes'] / 1e6:.1f} MB of quantized weights"
