"""The contract of quantize_rows, embedding_bag and TableBatch, on the reference backend.

The reference is checked against independent implementations (torch's embedding_bag, the
formulas of API.md written out), and every error the contract promises is provoked.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recscore.kernels import RowTable, TableBatch, embedding_bag, quantize_rows, use_backend

DTYPES = ["fp32", "fp16", "bf16", "int8", "int4"]


def random_bags(rng, rows, bags, max_len=6, pad=True):
    lengths = rng.integers(0, max_len + 1, bags)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = rng.integers(0, rows, offsets[-1]).astype(np.int64)
    if pad and len(indices):
        indices[rng.random(len(indices)) < 0.2] = -1
    return indices, offsets


# ---------------------------------------------------------------- quantize_rows

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 3, 48, 129])
def test_quantize_rows_layout_and_error(rng, dtype, dim):
    weights = rng.standard_normal((7, dim)).astype(np.float32)
    rows = quantize_rows(weights, dtype)
    assert isinstance(rows, RowTable)
    assert rows.shape == (7, dim) and rows.dtype == dtype
    restored = rows.dequantize()
    assert restored.dtype == np.float32 and restored.shape == (7, dim)
    if dtype in ("int8", "int4"):
        levels = 255 if dtype == "int8" else 15
        assert rows.data.shape == (7, dim if dtype == "int8" else (dim + 1) // 2)
        np.testing.assert_array_equal(rows.bias, weights.min(axis=1))
        np.testing.assert_allclose(rows.scale, (weights.max(axis=1) - weights.min(axis=1)) / levels, rtol=1e-6)
        # every element within half a step of its row (plus float32 rounding)
        assert np.all(np.abs(restored - weights) <= rows.scale[:, None] * 0.5 + 1e-6)
        assert rows.nbytes == rows.data.nbytes + 8 * 7
    else:
        tol = {"fp32": 0, "fp16": 1e-3, "bf16": 8e-3}[dtype]
        np.testing.assert_allclose(restored, weights, rtol=tol, atol=tol)


# Finite float32 values of moderate size: a failure shrinks element by element towards zeros.
MODERATE_FLOATS = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
SMALL_SHAPES = hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, SMALL_SHAPES, elements=MODERATE_FLOATS), st.sampled_from(["int8", "int4"]))
def test_quantized_rows_stay_within_half_a_step(weights, dtype):
    """The formulas of API.md on any table: bias = row min, scale = (max - min) / levels, and every
    value within half a step of its row (plus float32 rounding)."""
    with use_backend("reference"):
        rows = quantize_rows(weights, dtype)
    levels = 255 if dtype == "int8" else 15
    wide = weights.astype(np.float64)
    np.testing.assert_array_equal(rows.bias, weights.min(axis=1))
    np.testing.assert_array_equal(rows.scale, ((wide.max(axis=1) - wide.min(axis=1)) / levels).astype(np.float32))
    error = np.abs(rows.dequantize().astype(np.float64) - wide)
    # 1e-40: a row whose range is subnormal gets a scale that underflows (to 0: every value its min)
    assert np.all(error <= rows.scale[:, None] * (0.5 + 1e-5) + 1e-4 * np.abs(wide).max(axis=1, keepdims=True) + 1e-40)


@st.composite
def bag_cases(draw):
    """A table (R, D), and bags given as arrays of lengths and of in-range indices."""
    table = draw(hnp.arrays(np.float32, SMALL_SHAPES, elements=MODERATE_FLOATS))
    lengths = draw(hnp.arrays(np.int64, draw(st.integers(0, 12)), elements=st.integers(0, 5)))
    indices = draw(hnp.arrays(np.int64, int(lengths.sum()), elements=st.integers(0, table.shape[0] - 1)))
    return table, indices, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


@settings(max_examples=60, deadline=None)
@given(bag_cases(), st.sampled_from(["sum", "mean", "max"]))
def test_embedding_bag_matches_torch_on_any_bags(case, pooling):
    table, indices, offsets = case
    with use_backend("reference"):
        ours = embedding_bag(table, indices, offsets, pooling=pooling)
    theirs = torch.nn.functional.embedding_bag(torch.from_numpy(indices), torch.from_numpy(table),
                                               torch.from_numpy(offsets[:-1]), mode=pooling).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-3)


def test_int4_packs_low_nibble_first():
    weights = np.array([[0.0, 15.0, 5.0]], dtype=np.float32)    # min 0, max 15: scale 1
    rows = quantize_rows(weights, "int4")
    assert rows.data.tolist() == [[0 | (15 << 4), 5]]
    assert rows.scale[0] == 1.0 and rows.bias[0] == 0.0


def test_constant_row_has_zero_scale():
    rows = quantize_rows(np.full((2, 5), 3.25, dtype=np.float32), "int8")
    assert rows.scale.tolist() == [0.0, 0.0]
    np.testing.assert_array_equal(rows.dequantize(), np.full((2, 5), 3.25, dtype=np.float32))


def test_bf16_matches_torch_rounding(rng):
    weights = rng.standard_normal((64, 33)).astype(np.float32)
    ours = quantize_rows(weights, "bf16").data
    theirs = torch.from_numpy(weights).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_quantize_rows_torch_in_torch_out(rng):
    weights = torch.from_numpy(rng.standard_normal((5, 4)).astype(np.float32))
    rows = quantize_rows(weights, "int8")
    assert isinstance(rows.data, torch.Tensor) and isinstance(rows.dequantize(), torch.Tensor)
    bf16 = quantize_rows(weights, "bf16")
    assert bf16.data.dtype == torch.bfloat16


def test_quantize_rows_rejects_bad_input():
    with pytest.raises(ValueError, match="dtype"):
        quantize_rows(np.zeros((2, 2), np.float32), "int2")
    with pytest.raises(ValueError, match="weights"):
        quantize_rows(np.array([[1.0, np.nan]], np.float32), "int8")
    with pytest.raises(ValueError, match="weights"):
        quantize_rows(np.zeros(3, np.float32), "fp32")
    with pytest.raises(TypeError, match="weights"):
        quantize_rows(np.zeros((2, 2), np.int32), "fp32")
    with pytest.raises(TypeError, match="weights"):
        quantize_rows([[1.0]], "fp32")
    with pytest.raises(ValueError, match="fp16 range"):
        quantize_rows(np.array([[1e6]], np.float32), "fp16")


# ---------------------------------------------------------------- embedding_bag

@pytest.mark.parametrize("pooling", ["sum", "mean", "max"])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_embedding_bag_matches_torch(rng, pooling, index_dtype):
    table = rng.standard_normal((50, 48)).astype(np.float32)
    indices, offsets = random_bags(rng, 50, 40, pad=False)
    with use_backend("reference"):
        ours = embedding_bag(table, indices.astype(index_dtype), offsets, pooling=pooling)
    theirs = torch.nn.functional.embedding_bag(torch.from_numpy(indices), torch.from_numpy(table),
                                               torch.from_numpy(offsets[:-1]), mode=pooling).numpy()
    assert ours.dtype == np.float32 and ours.shape == (40, 48)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_weighted_sum_and_padding(rng):
    table = rng.standard_normal((10, 3)).astype(np.float32)
    indices = np.array([1, -1, 4, 4, -1], dtype=np.int64)
    offsets = np.array([0, 3, 3, 5], dtype=np.int64)
    weights = np.array([0.5, 9.0, 2.0, -1.0, 7.0], dtype=np.float32)
    with use_backend("reference"):
        out = embedding_bag(table, indices, offsets, per_sample_weights=weights)
        mean = embedding_bag(table, indices, offsets, pooling="mean")
        peak = embedding_bag(table, indices, offsets, pooling="max")
    np.testing.assert_allclose(out[0], 0.5 * table[1] + 2.0 * table[4], rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0)                       # empty bag
    np.testing.assert_allclose(out[2], -table[4], rtol=1e-6)        # padding skipped
    np.testing.assert_allclose(mean[0], (table[1] + table[4]) / 2, rtol=1e-6)   # padding not counted
    np.testing.assert_allclose(mean[2], table[4], rtol=1e-6)
    np.testing.assert_array_equal(peak[1], 0)
    np.testing.assert_allclose(peak[0], np.maximum(table[1], table[4]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_bag_quantized_equals_dequantized(rng, dtype):
    weights = rng.standard_normal((30, 17)).astype(np.float32)
    rows = quantize_rows(weights, dtype)
    indices, offsets = random_bags(rng, 30, 12)
    with use_backend("reference"):
        ours = embedding_bag(rows, indices, offsets)
        plain = embedding_bag(rows.dequantize(), indices, offsets)
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5)


def test_zero_bags_and_padding_only():
    table = np.ones((4, 2), np.float32)
    with use_backend("reference"):
        assert embedding_bag(table, np.zeros(0, np.int64), np.array([0], np.int64)).shape == (0, 2)
        out = embedding_bag(table, np.array([-1, -1], np.int64), np.array([0, 2], np.int64), pooling="mean")
    np.testing.assert_array_equal(out, 0)


def test_bounds_skip_treats_out_of_range_as_padding():
    table = np.arange(8, dtype=np.float32).reshape(4, 2)
    indices = np.array([0, 4, -7, 3], dtype=np.int64)
    with use_backend("reference"):
        out = embedding_bag(table, indices, np.array([0, 4], np.int64), pooling="mean", bounds="skip")
    np.testing.assert_allclose(out[0], (table[0] + table[3]) / 2)


def test_torch_inputs_give_torch_outputs(rng):
    table = torch.from_numpy(rng.standard_normal((6, 4)).astype(np.float32))
    out = embedding_bag(table, torch.tensor([0, 5, 2]), torch.tensor([0, 1, 3]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2, 4)


def test_table_batch_is_per_table_lookups_side_by_side(rng):
    tables = [rng.standard_normal((r, d)).astype(np.float32) for r, d in [(5, 3), (40, 1), (9, 8)]]
    tables[1] = quantize_rows(tables[1], "int4")
    batch = TableBatch(tables)
    B = 6
    parts = [random_bags(rng, t.shape[0], B) for t in tables]
    indices = np.concatenate([p[0] for p in parts])
    offsets = np.concatenate([[0]] + [p[1][1:] + sum(len(q[0]) for q in parts[:i]) for i, p in enumerate(parts)])
    with use_backend("reference"):
        out = batch.lookup(indices, offsets, pooling="mean")
        singles = [embedding_bag(t, *p, pooling="mean") for t, p in zip(tables, parts)]
    assert batch.num_tables == 3 and batch.dims == [3, 1, 8]
    assert batch.nbytes == sum(t.nbytes if isinstance(t, np.ndarray) else t.nbytes for t in tables)
    np.testing.assert_array_equal(out, np.concatenate(singles, axis=1))


def test_inputs_are_not_modified(rng):
    table = rng.standard_normal((20, 5)).astype(np.float32)
    indices, offsets = random_bags(rng, 20, 7)
    weights = rng.random(len(indices)).astype(np.float32)
    copies = [a.copy() for a in (table, indices, offsets, weights)]
    for backend in ("reference", "cpu"):
        with use_backend(backend):
            embedding_bag(table, indices, offsets, per_sample_weights=weights)
    for original, copy in zip((table, indices, offsets, weights), copies):
        np.testing.assert_array_equal(original, copy)


@pytest.mark.parametrize("indices, offsets, error, message", [
    (np.array([0, 9], np.int64), np.array([0, 1, 2], np.int64), IndexError, r"indices\[1\] = 9 \(bag 1, position 0\)"),
    (np.array([0, -2], np.int64), np.array([0, 2], np.int64), IndexError, r"indices\[1\] = -2 \(bag 0, position 1\)"),
    (np.array([0, 1], np.int64), np.array([1, 2], np.int64), ValueError, r"offsets\[0\] must be 0"),
    (np.array([0, 1], np.int64), np.array([0, 2, 1, 2], np.int64), ValueError, "non-decreasing"),
    (np.array([0, 1], np.int64), np.array([0, 1], np.int64), ValueError, r"offsets\[-1\] must equal"),
    (np.array([0, 1], np.int64), np.array([0, 1, 3], np.int64), ValueError, "offsets"),
    (np.array([0, 1], np.int64), np.array([0, 2], np.int32), TypeError, "offsets"),
    (np.array([0.0, 1.0]), np.array([0, 2], np.int64), TypeError, "indices"),
    (np.array([[0, 1]], np.int64), np.array([0, 2], np.int64), ValueError, "indices"),
])
def test_embedding_bag_bad_input(triton_device, indices, offsets, error, message):
    table = np.zeros((4, 2), np.float32)
    for backend in ("reference", "cpu"):
        with use_backend(backend), pytest.raises(error, match=message):
            embedding_bag(table, indices, offsets)
    # The Triton kernel flags bad offsets and indices as it reads them; the message is the same.
    on_device = lambda a: torch.from_numpy(a).to(triton_device)  # noqa: E731
    with use_backend("triton"), pytest.raises(error, match=message):
        embedding_bag(on_device(table), on_device(indices), on_device(offsets))


def test_table_batch_errors_name_the_table():
    batch = TableBatch([np.zeros((4, 2), np.float32), np.zeros((2, 2), np.float32)])
    with pytest.raises(IndexError, match=r"table 1, bag 0, position 1"):
        batch.lookup(np.array([3, 1, 2], np.int64), np.array([0, 1, 3], np.int64))
    with pytest.raises(ValueError, match="T\\*B \\+ 1"):
        batch.lookup(np.array([0], np.int64), np.array([0, 1, 1, 1], np.int64))
    with pytest.raises(ValueError, match="tables"):
        TableBatch([])
    with pytest.raises(TypeError, match=r"tables\[1\]"):
        TableBatch([np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64)])


def test_bad_options_and_weights():
    table = np.zeros((4, 2), np.float32)
    indices, offsets = np.array([0, 1], np.int64), np.array([0, 2], np.int64)
    with pytest.raises(ValueError, match="pooling"):
        embedding_bag(table, indices, offsets, pooling="median")
    with pytest.raises(ValueError, match="bounds"):
        embedding_bag(table, indices, offsets, bounds="clamp")
    with pytest.raises(ValueError, match="per_sample_weights"):
        embedding_bag(table, indices, offsets, pooling="mean", per_sample_weights=np.ones(2, np.float32))
    with pytest.raises(ValueError, match="per_sample_weights"):
        embedding_bag(table, indices, offsets, per_sample_weights=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="per_sample_weights"):
        embedding_bag(table, indices, offsets, per_sample_weights=np.ones(2, np.float64))
    with pytest.raises(ValueError, match="per_sample_weights"):
        embedding_bag(table, indices, offsets, per_sample_weights=np.array([1, np.inf], np.float32))
    with pytest.raises(TypeError, match="table"):
        embedding_bag(np.zeros((4, 2), np.int8), indices, offsets)
    with pytest.raises(ValueError, match="backend"):
        with use_backend("gpu"):
            pass
