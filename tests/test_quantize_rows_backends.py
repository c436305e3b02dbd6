"""quantize_rows: the cpu backend is bit-for-bit the reference (codes, scale, bias; bf16/fp16 rounding)."""
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recscore.kernels import aligned_empty, quantize_rows, use_backend
from recscore.kernels.quantize_rows import cpu, reference

ROW_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")


def assert_same_storage(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    for name in ("data", "scale", "bias"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert np.array_equal(a, b), name


def quantize_both(weights, dtype):
    with use_backend("reference"):
        want = quantize_rows(weights, dtype)
    with use_backend("cpu"):
        got = quantize_rows(weights, dtype)
    return got, want


@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("dim", [1, 3, 16, 129])
@pytest.mark.parametrize("weight_dtype", [np.float32, np.float64, np.float16])
def test_cpu_matches_reference(rng, dtype, dim, weight_dtype):
    rows = 257
    # Rows of very different magnitudes, a constant row and an all-zero row.
    weights = rng.standard_normal((rows, dim)) * 10.0 ** rng.integers(-4, 3, (rows, 1))
    weights[0] = 0.25
    weights[1] = 0.0
    weights = weights.astype(weight_dtype)
    before = weights.copy()
    got, want = quantize_both(weights, dtype)
    assert_same_storage(got, want)
    assert np.array_equal(weights, before)


@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("weight_dtype", [np.float32, np.float64, np.float16, "bfloat16"])
def test_cpu_storage_starts_on_a_cache_line(rng, dtype, weight_dtype):
    """Every new array starts a 64-byte line, so a 64-byte int8 row is one line, not two;
    fp32 of a row-major float32 array is that array."""
    weights = rng.standard_normal((100, 64), dtype=np.float32)
    weights = torch.from_numpy(weights).bfloat16() if weight_dtype == "bfloat16" else weights.astype(weight_dtype)
    with use_backend("cpu"):
        table = quantize_rows(weights, dtype).numpy()   # NumPy views of a CPU tensor's storage
    if dtype == "fp32" and weight_dtype == np.float32:
        assert table.data is weights
        return
    for part in (table.data, table.scale, table.bias):
        if part is not None:
            assert part.ctypes.data % 64 == 0 and part.flags.c_contiguous
    if table.scale is not None:
        assert table.fused().data.ctypes.data % 64 == 0


@pytest.mark.parametrize("shape", [(0,), (5,), (0, 3), (7, 0), (3, 5), (2, 3, 4), (), 6, np.int64(6)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.int64])
def test_aligned_empty(shape, dtype):
    array = aligned_empty(shape, dtype)
    want_shape = (int(shape),) if np.ndim(shape) == 0 and not isinstance(shape, tuple) else shape
    assert array.shape == want_shape and array.dtype == dtype and array.flags.c_contiguous and array.flags.writeable
    assert array.ctypes.data % 64 == 0
    array[...] = 1   # the whole view lies inside its buffer
    assert array.sum() == array.size


@pytest.mark.parametrize("shape", [(-1,), (-1, 4), (3, -2)])
def test_aligned_empty_rejects_negative_dimensions(shape):
    with pytest.raises(ValueError, match="negative dimensions"):
        aligned_empty(shape, np.float32)


@pytest.mark.parametrize("alignment", [0, -64, 3, 6, 64.0])
def test_aligned_empty_rejects_a_bad_alignment(alignment):
    with pytest.raises(ValueError, match="alignment must be a positive multiple of 4"):
        aligned_empty((4, 4), np.float32, alignment)


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_single_row_and_empty_table(dtype):
    for shape in [(1, 5), (0, 8), (4, 0)]:
        weights = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape) - 3.5
        got, want = quantize_both(weights, dtype)
        assert_same_storage(got, want)


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_bfloat16_tensor_input(rng, dtype):
    weights = torch.from_numpy(rng.standard_normal((33, 7)).astype(np.float32)).to(torch.bfloat16)
    got, want = quantize_both(weights, dtype)
    assert_same_storage(got.numpy(), want.numpy())


@settings(max_examples=40, deadline=None)
@given(weights=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=20),
                          elements=st.floats(-1e4, 1e4, width=32)),
       dtype=st.sampled_from(ROW_DTYPES))
def test_cpu_matches_reference_property(weights, dtype):
    got, want = quantize_both(weights, dtype)
    assert_same_storage(got, want)


def test_fp16_rounding_of_every_magnitude():
    """float32 -> fp16 on a stride through all float32 bit patterns: subnormals, ties, overflow."""
    bits = np.arange(0, 2**32, 40_009, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = values[np.isfinite(values) & (np.abs(values) < 65504)].reshape(1, -1)
    assert np.array_equal(cpu.quantize(values, "fp16")[0].view(np.uint16),
                          reference.quantize(values, "fp16")[0].view(np.uint16))
    assert np.array_equal(cpu.quantize(values, "bf16")[0], reference.quantize(values, "bf16")[0])


@pytest.mark.parametrize("dtype,bits", [("int8", 8), ("int4", 4)])
def test_dequantized_rows_within_half_a_step(rng, dtype, bits):
    weights = rng.standard_normal((100, 37)).astype(np.float32)
    with use_backend("cpu"):
        table = quantize_rows(weights, dtype)
    error = np.abs(table.dequantize() - weights)
    assert (error <= table.scale[:, None] * 0.5 + 1e-6).all()


def test_concurrent_calls(rng):
    tables = [rng.standard_normal((500, 24)).astype(np.float32) for _ in range(6)]
    with use_backend("reference"):
        want = [quantize_rows(t, "int4") for t in tables]
    results = [None] * len(tables)

    def work(i):
        with use_backend("cpu"):
            for _ in range(5):
                results[i] = quantize_rows(tables[i], "int4")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(tables))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, expected in zip(results, want):
        assert_same_storage(got, expected)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_fused_layout_stands_for_the_same_table(rng, dtype):
    """fused() keeps every value, the input untouched, and puts a row's codes and qparams in one run of bytes."""
    table = quantize_rows(rng.standard_normal((37, 48), dtype=np.float32), dtype)
    before = table.data.copy()
    fused = table.fused()
    np.testing.assert_array_equal(fused.dequantize(), table.dequantize())
    np.testing.assert_array_equal(table.data, before)
    assert fused.scale.ctypes.data == fused.data.ctypes.data + fused.data.shape[1]
    assert fused.data.strides[0] == fused.data.shape[1] + 8
    with pytest.raises(ValueError, match="int8 or int4"):
        quantize_rows(np.ones((2, 3), np.float32), "fp16").fused()
