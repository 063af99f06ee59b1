"""The registry of ggml tensor types (engine.runtime.ggml_formats): every registered type repacks the file's bytes to
exactly the values `gguf.quants.dequantize` (llama.cpp's gguf-py) reads from them, and an unregistered type is one
clear error."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

from engine.runtime import ggml_formats  # noqa: E402
from engine.runtime.layers import linear  # noqa: E402
from engine.runtime.weights import widen  # noqa: E402


def file_rows(values: np.ndarray, type_name: str) -> np.ndarray:
    """values (n, k) float32 as the rows a GGUF file stores for `type_name`: uint8 (n, row_bytes)."""
    qtype = GGMLQuantizationType[type_name]
    if type_name in ("F32", "F16"):
        return np.ascontiguousarray(values.astype(np.float32 if type_name == "F32" else np.float16)).view(np.uint8)
    return np.ascontiguousarray(quants.quantize(values, qtype))


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
def test_repack_is_exactly_the_files_values(type_name):
    rng = np.random.default_rng(1)
    rows, cols = 37, 96  # rows not whole blocks of 16: the kernel layout's padding
    values = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3, (rows, 1))).astype(np.float32)
    values[3, :32] = 0  # an all-zero group: scale 0
    raw = file_rows(values, type_name)
    reference = quants.dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols)
    fmt = ggml_formats.lookup(type_name)
    assert raw.shape == (rows, fmt.row_bytes(cols))
    weight = ggml_formats.empty(fmt, rows, cols)
    fmt.repack_into(weight, 0, raw[:20])  # in two pieces, as the loader stacks tensors
    fmt.repack_into(weight, 20, raw[20:])
    np.testing.assert_array_equal(widen(weight), reference)
    assert sum(a.nbytes for a in ggml_formats.held_arrays(weight)) >= raw.nbytes


def test_q8_0_takes_the_whole_int8_range():
    """A Q8_0 block may hold -128 (llama.cpp's own quantizer never writes it; a file may): repacked exactly and
    multiplied as d * q."""
    block = np.zeros(34, dtype=np.uint8)
    block[:2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    block[2:] = np.arange(-128, 128, 8, dtype=np.int8).view(np.uint8)
    raw = block[None, :]
    fmt = ggml_formats.lookup("Q8_0")
    weight = ggml_formats.empty(fmt, 1, 32)
    fmt.repack_into(weight, 0, raw)
    reference = quants.dequantize(raw, GGMLQuantizationType.Q8_0).reshape(1, 32)
    np.testing.assert_array_equal(widen(weight), reference)
    x = np.ones((1, 32), dtype=np.float32)
    np.testing.assert_allclose(linear(x, weight), x @ reference.T, rtol=1e-4)


def test_row_stack_of_different_types_multiplies_part_by_part():
    rng = np.random.default_rng(2)
    parts, references = [], []
    for type_name, rows in (("Q4_0", 16), ("Q8_0", 8), ("F16", 5)):
        values = rng.standard_normal((rows, 64)).astype(np.float32)
        raw = file_rows(values, type_name)
        fmt = ggml_formats.lookup(type_name)
        weight = ggml_formats.empty(fmt, rows, 64)
        fmt.repack_into(weight, 0, raw)
        parts.append(weight)
        references.append(quants.dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, 64))
    stack = ggml_formats.RowStack(parts, (29, 64))
    reference = np.concatenate(references).astype(np.float64)
    np.testing.assert_array_equal(widen(stack), reference.astype(np.float32))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y = linear(x, stack)
    assert y.shape == (3, 29)
    scale = np.abs(x.astype(np.float64) @ reference.T).max()
    assert np.max(np.abs(y - x.astype(np.float64) @ reference.T)) <= 1e-3 * scale  # int16 activations: ~2^-15


def test_an_unregistered_type_names_the_type_the_tensor_and_what_runs():
    with pytest.raises(ggml_formats.UnsupportedTypeError) as e:
        ggml_formats.lookup("IQ2_XXS", "blk.0.ffn_down.weight")
    message = str(e.value)
    assert "IQ2_XXS" in message and "blk.0.ffn_down.weight" in message
    for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0"):
        assert name in message


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0"])
def test_compiled_repack_writes_numpys_bytes(type_name):
    """The compiled repack (quantize.c's tl_repack_ggml, what a load runs) and NumPy's write the same bytes, the file's
    exact values: any integer byte (Q8_0's -128 included), rows gathered out of order (q/k's rotary order) and a
    piece starting mid-block of 16 rows."""
    from engine.runtime import native

    if not native.status().available:
        pytest.skip(f"compiled kernels unavailable: {native.status().reason}")
    rng = np.random.default_rng(7)
    rows, cols = 45, 128
    raw = file_rows(rng.standard_normal((rows, cols)).astype(np.float32), type_name)
    per_block = raw.reshape(rows, -1, raw.shape[1] // (cols // 32))
    per_block[:, :, 2:] = rng.integers(0, 256, per_block[:, :, 2:].shape, dtype=np.uint8)  # every integer / nibble
    reference = quants.dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols)
    fmt = ggml_formats.lookup(type_name)
    order = rng.permutation(rows)
    made = {}
    for compiled in (True, False):
        weight = ggml_formats.empty(fmt, rows, cols)
        fmt.repack_into(weight, 0, raw[order[:19]], compiled=compiled)  # a gathered copy, as f.rows(name, order)
        fmt.repack_into(weight, 19, raw[order[19:]], compiled=compiled)
        made[compiled] = weight
        np.testing.assert_array_equal(widen(weight), reference[order])
    assert np.array_equal(made[True].data, made[False].data) and np.array_equal(made[True].scales, made[False].scales)
