"""embedding_bag / TableBatch.lookup: the cpu and triton backends against the reference.

Bags are random with skewed sizes (most short, a few long), padding (-1) and empty bags;
the triton backend runs under TRITON_INTERPRET=1 on small shapes when there is no GPU.
"""
import ctypes
import gc
import mmap
import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recscore.bindings import _embedding_bag
from recscore.kernels import TableBatch, embedding_bag, quantize_rows, use_backend
from recscore.kernels._cpu import LEVELS, supported_levels, use_cpu_level
from recscore.kernels.embedding_bag import cpu
from recscore.kernels.quantize_rows import RowTable

ROW_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
POOLINGS = ("sum", "mean", "max")


def make_table(rng, rows, dim, dtype):
    return quantize_rows(rng.standard_normal((rows, dim)).astype(np.float32), dtype)


def make_bags(rng, rows_per_table, bags, *, max_len=40, index_dtype=np.int64, padding=0.1, out_of_range=0.0):
    """Table-major bags with skewed (geometric) sizes: indices, offsets (T*B + 1)."""
    lengths = np.minimum(rng.geometric(0.25, len(rows_per_table) * bags) - 1, max_len)
    lengths[rng.random(lengths.shape) < 0.1] = 0  # some empty bags
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.empty(offsets[-1], np.int64)
    for t, rows in enumerate(rows_per_table):
        start, end = offsets[t * bags], offsets[(t + 1) * bags]
        part = rng.integers(0, rows, end - start)
        part[rng.random(part.shape) < padding] = -1
        bad = rng.random(part.shape) < out_of_range
        part[bad] = rng.choice([-7, -2, rows, rows + 3], bad.sum())
        indices[start:end] = part
    return indices.astype(index_dtype), offsets


def run(backend, tables, indices, offsets, **options):
    with use_backend(backend):
        return TableBatch(tables).lookup(indices, offsets, **options)


def tolerance(tables):
    # fp32 accumulation against the reference's float64; a larger D sums more rounding.
    return 2e-5 * max(8, max(t.shape[1] for t in tables)) ** 0.5


def check_cpu(tables, indices, offsets, **options):
    indices_before, offsets_before = indices.copy(), offsets.copy()
    weights = options.get("per_sample_weights")
    weights_before = None if weights is None else weights.copy()
    data_before = [t.data.copy() for t in tables]
    want = run("reference", tables, indices, offsets, **options)
    got = run("cpu", tables, indices, offsets, **options)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tolerance(tables), atol=tolerance(tables))
    assert np.array_equal(indices, indices_before) and np.array_equal(offsets, offsets_before)
    assert weights is None or np.array_equal(weights, weights_before)
    assert all(np.array_equal(t.data, before) for t, before in zip(tables, data_before))
    return got


def every_option(rng, tables, bags, index_dtype=np.int64):
    """Each pooling, weighted sum, and bounds="skip" with out-of-range indices."""
    rows = [t.shape[0] for t in tables]
    indices, offsets = make_bags(rng, rows, bags, index_dtype=index_dtype)
    for pooling in POOLINGS:
        yield indices, offsets, dict(pooling=pooling)
    weights = rng.standard_normal(len(indices)).astype(np.float32)
    yield indices, offsets, dict(per_sample_weights=weights)
    skip_indices, skip_offsets = make_bags(rng, rows, bags, index_dtype=index_dtype, out_of_range=0.2)
    for pooling in POOLINGS:
        yield skip_indices, skip_offsets, dict(pooling=pooling, bounds="skip")


# --------------------------------------------------------------------------------------------
# cpu
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("dim", [1, 3, 7, 9, 16, 17, 64, 100, 128, 129, 300, 1000])
def test_cpu_every_option(rng, cpu_level, dtype, dim):
    """D below, at and above the vector lanes (8, 16) and the register blocks (64, 128 columns)."""
    tables = [make_table(rng, 300, dim, dtype)]
    for index_dtype in (np.int64, np.int32):
        for indices, offsets, options in every_option(rng, tables, 37, index_dtype):
            check_cpu(tables, indices, offsets, **options)


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_cpu_one_row_and_many_rows(rng, cpu_level, dtype):
    for rows, dim in [(1, 5), (200_000, 16)]:
        tables = [make_table(rng, rows, dim, dtype)]
        for indices, offsets, options in every_option(rng, tables, 300):
            check_cpu(tables, indices, offsets, **options)


def test_cpu_tables_taking_the_second_l2_prefetch(rng, cpu_level):
    """Tables over 16 MB with rows of 128+ bytes take a second L2 prefetch (EB_RETRY_*), which reads
    indices further ahead: fp32 rows, int8 rows and 128-column blocks of wide rows, in one batch with
    a small table, in calls big enough to split into chunks that end inside a table."""
    tables = [make_table(rng, 70_000, 64, "fp32"), make_table(rng, 90_000, 200, "int8"),
              make_table(rng, 15_000, 300, "fp32"), make_table(rng, 500, 64, "fp32")]
    assert all(t.data.nbytes > 16 << 20 for t in tables[:3])
    for indices, offsets, options in every_option(rng, tables, 1500):
        assert len(indices) * (200 + 64) > 3 << 20   # over EB_PARALLEL_MIN_COST: split across threads
        check_cpu(tables, indices, offsets, **options)


def test_cpu_calls_big_enough_to_run_in_parallel(rng, cpu_level):
    """Calls over EB_PARALLEL_MIN_COST (3 MB of estimated row and index bytes) split into chunks across
    threads: every option, and a bad index late in the call."""
    tables = [make_table(rng, 5000, 64, "fp32"), make_table(rng, 3000, 129, "int8"), make_table(rng, 700, 48, "fp16")]
    bags = 4000
    for indices, offsets, options in every_option(rng, tables, bags):
        assert len(indices) * (48 * 2 + 64) > 3 << 20   # the kernel's cost: row bytes + 64 an index, at least
        check_cpu(tables, indices, offsets, **options)
    indices, offsets = make_bags(rng, [t.shape[0] for t in tables], bags, padding=0.0)
    lengths = np.diff(offsets)
    bag = int(np.flatnonzero(lengths[2 * bags:] > 1)[-1]) + 2 * bags   # a late bag of the third table
    bad = indices.copy()
    bad[offsets[bag] + 1] = 700
    with use_backend("cpu"), pytest.raises(IndexError, match=rf"table 2, bag {bag - 2 * bags}, position 1\)"):
        TableBatch(tables).lookup(bad, offsets)


def test_cpu_mixed_table_batch(rng, cpu_level):
    """All dtypes and widths in one batch, skewed bag sizes (a few bags of thousands)."""
    specs = [(1000, 64, "fp32"), (1, 3, "int8"), (5000, 129, "int4"), (77, 16, "fp16"), (300, 48, "bf16"),
             (20, 1, "fp32"), (900, 1000, "int8")]
    tables = [make_table(rng, rows, dim, dtype) for rows, dim, dtype in specs]
    for indices, offsets, options in every_option(rng, tables, 64):
        got = check_cpu(tables, indices, offsets, **options)
        assert got.shape == (64, sum(dim for _, dim, _ in specs))
    # Heavy skew: one bag holds most of the indices.
    rows = [t.shape[0] for t in tables]
    indices, offsets = make_bags(rng, rows, 50)
    lengths = np.diff(offsets)
    lengths[3] = 5000
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate([rng.integers(0, r, offsets[(t + 1) * 50] - offsets[t * 50])
                              for t, r in enumerate(rows)]).astype(np.int64)
    check_cpu(tables, indices, offsets, pooling="mean")


def test_cpu_no_bags_and_only_empty_bags(rng, cpu_level):
    tables = [make_table(rng, 10, 4, "fp32"), make_table(rng, 10, 6, "int4")]
    out = check_cpu(tables, np.zeros(0, np.int64), np.zeros(1, np.int64))
    assert out.shape == (0, 10)
    for pooling in POOLINGS:
        out = check_cpu(tables, np.zeros(0, np.int64), np.zeros(2 * 5 + 1, np.int64), pooling=pooling)
        assert out.shape == (5, 10) and not out.any()
        padding_only = np.full(6, -1, np.int64)
        out = check_cpu(tables, padding_only, np.array([0, 0, 0, 3, 3, 6, 6], np.int64), pooling=pooling)
        assert not out.any()


def test_cpu_torch_tensors(rng, cpu_level):
    table = rng.standard_normal((50, 8)).astype(np.float32)
    indices, offsets = make_bags(rng, [50], 9)
    with use_backend("reference"):
        want = embedding_bag(table, indices, offsets)
    with use_backend("cpu"):
        got = embedding_bag(torch.from_numpy(table), torch.from_numpy(indices), torch.from_numpy(offsets))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["numpy", "torch"])
def test_embedding_bag_follows_a_row_table_whose_arrays_change(rng, cpu_level, storage):
    """Rows of a float table written in place, arrays swapped for others, and a tensor's storage
    swapped (`tensor.data = ...`) are all seen on the next call (an int8/int4 table's qparams: see
    test_cpu_int8_table_given_new_scale_or_bias_arrays)."""
    wrap = torch.from_numpy if storage == "torch" else (lambda a: a)  # noqa: E731
    values = [rng.standard_normal((40, 6)).astype(np.float32) for _ in range(3)]
    table = RowTable("fp32", (40, 6), wrap(values[0].copy()))
    indices, offsets = make_bags(rng, [40], 7, padding=0.0)
    expected = lambda v: reference_lookup(v, indices, offsets)  # noqa: E731

    def got():
        out = embedding_bag(table, wrap(indices), wrap(offsets))
        return out.numpy() if storage == "torch" else out

    np.testing.assert_allclose(got(), expected(values[0]), rtol=1e-5, atol=1e-5)
    table.data[:] = wrap(values[1])        # in place
    np.testing.assert_allclose(got(), expected(values[1]), rtol=1e-5, atol=1e-5)
    table = RowTable("fp32", (40, 6), wrap(values[2].copy()))    # another array
    np.testing.assert_allclose(got(), expected(values[2]), rtol=1e-5, atol=1e-5)
    if storage == "torch":
        table.data.data = torch.from_numpy(values[0].copy())   # the same tensor, other storage
        np.testing.assert_allclose(got(), expected(values[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["numpy", "torch"])
def test_cpu_column_slice_is_read_in_place_and_a_transpose_copied_with_a_warning(rng, cpu_level, storage, monkeypatch):
    from recscore.kernels import _backend
    monkeypatch.setattr(_backend, "_warned", set())
    wide = rng.standard_normal((50, 24)).astype(np.float32)
    wrap = torch.from_numpy if storage == "torch" else (lambda a: a)  # noqa: E731
    indices, offsets = make_bags(rng, [50], 9)
    want = reference_lookup(np.ascontiguousarray(wide[:, 5:13]), indices, offsets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no copy, so no warning
        batch = TableBatch([wrap(wide)[:, 5:13]])
        with use_backend("cpu"):
            got = batch.lookup(wrap(indices), wrap(offsets))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.shares_memory(batch.prepared["cpu"][0][0], wide)
    transposed = np.ascontiguousarray(wide[:, 5:13].T).T   # column-major
    with pytest.warns(RuntimeWarning, match="rows are not contiguous is copied"):
        with use_backend("cpu"):
            got = embedding_bag(wrap(transposed), wrap(indices), wrap(offsets))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_cpu_int8_table_given_new_scale_or_bias_arrays(rng, cpu_level):
    """The CPU kernel's side-by-side copy of scale and bias is kept per pair of arrays: a table given
    a new bias (or scale) array is read with it."""
    table = quantize_rows(rng.standard_normal((30, 8)).astype(np.float32), "int8")
    indices, offsets = make_bags(rng, [30], 5, padding=0.0)
    for attribute in ("bias", "scale"):
        with use_backend("cpu"):
            embedding_bag(table, indices, offsets)
        table = RowTable(table.dtype, table.shape, table.data,
                         **{"scale": table.scale, "bias": table.bias, attribute: getattr(table, attribute) + np.float32(0.25)})
        with use_backend("cpu"):
            got = embedding_bag(table, indices, offsets)
        np.testing.assert_allclose(got, run("reference", [table], indices, offsets), rtol=1e-5, atol=1e-5)
    before = len(cpu._side_by_side_qparams), len(cpu._side_by_side_finalizers)
    for _ in range(20):   # a long-lived bias beside short-lived scales: nothing piles up
        table = RowTable(table.dtype, table.shape, table.data, table.scale * np.float32(1.0), table.bias)
        with use_backend("cpu"):
            embedding_bag(table, indices, offsets)
    gc.collect()
    assert (len(cpu._side_by_side_qparams), len(cpu._side_by_side_finalizers)) == before


def reference_lookup(values, indices, offsets):
    with use_backend("reference"):
        return embedding_bag(values, indices, offsets)


@pytest.mark.parametrize("dtype,limit", [("int8", 0.01), ("int4", 0.10)])
def test_quantized_pooled_error_vs_float_table(rng, cpu_level, dtype, limit):
    weights = rng.standard_normal((5000, 64)).astype(np.float32)
    indices, offsets = make_bags(rng, [5000], 512, padding=0.0)
    with use_backend("cpu"):
        exact = embedding_bag(weights, indices, offsets)
        pooled = embedding_bag(quantize_rows(weights, dtype), indices, offsets)
    relative_l2 = np.linalg.norm(pooled - exact) / np.linalg.norm(exact)
    assert relative_l2 < limit


def test_cpu_errors_name_bag_and_position(rng, cpu_level):
    table = make_table(rng, 10, 4, "int8")
    indices = np.array([1, 2, 3, 10, 4], np.int64)
    offsets = np.array([0, 2, 5], np.int64)
    for backend in ("reference", "cpu"):
        with use_backend(backend), pytest.raises(IndexError, match=r"bag 1, position 1"):
            embedding_bag(table, indices, offsets)
        with use_backend(backend):
            embedding_bag(table, indices, offsets, bounds="skip")


def test_cpu_concurrent_calls(rng, cpu_level):
    tables = [make_table(rng, 2000, 32, "fp32"), make_table(rng, 500, 17, "int4")]
    batch = TableBatch(tables)  # one batch shared by every thread: its prepared layout too
    cases = [make_bags(rng, [2000, 500], 64, index_dtype=dtype) for dtype in (np.int64, np.int32) * 3]
    with use_backend("reference"):
        want = [batch.lookup(i, o, pooling="mean") for i, o in cases]
    failures = []

    def work(k):
        indices, offsets = cases[k]
        with use_backend("cpu"), use_cpu_level(cpu_level):   # a new thread starts at the default level
            for _ in range(20):
                if not np.allclose(batch.lookup(indices, offsets, pooling="mean"), want[k], rtol=1e-4, atol=1e-5):
                    failures.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_cpu_narrow_and_wide_rows_in_one_batch(rng, cpu_level, dtype):
    """Tables of D around the lane counts and wider than the register block, one batch, every option."""
    tables = [make_table(rng, 300, dim, dtype) for dim in (1, 7, 9, 17, 100, 129, 300)]
    batch = TableBatch(tables)
    for index_dtype in (np.int64, np.int32):
        for indices, offsets, options in every_option(rng, tables, 23, index_dtype):
            pooling, bounds = options.get("pooling", "sum"), options.get("bounds", "error")
            weights = options.get("per_sample_weights")
            want = run("reference", tables, indices, offsets, **options)
            got = cpu.lookup(batch, indices, offsets, 23, pooling, weights, bounds)
            np.testing.assert_allclose(got, want, rtol=tolerance(tables), atol=tolerance(tables))
    indices, offsets = make_bags(rng, [t.shape[0] for t in tables], 23, padding=0.0)
    indices[len(indices) // 2] = 300
    with pytest.raises(IndexError, match=r"indices\[\d+\] = 300 \(table \d, bag \d+, position \d+\)"):
        cpu.lookup(batch, indices, offsets, 23, "sum", None, "error")


def guarded_rows(dtype, rows, dim, rng):
    """A RowTable whose data ends at a page that cannot be read (reading past the table crashes the
    test), and the mapping that holds it."""
    table = make_table(rng, rows, dim, dtype)
    nbytes = table.data.nbytes
    page = mmap.PAGESIZE
    size = (nbytes + page - 1) // page * page + page
    memory = mmap.mmap(-1, size)
    base = np.frombuffer(memory, np.uint8)
    guard = base.ctypes.data + size - page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    assert libc.mprotect(guard, page, 0) == 0, ctypes.get_errno()   # PROT_NONE
    data = base[size - page - nbytes:size - page].view(table.data.dtype).reshape(table.data.shape)
    data[...] = table.data
    return RowTable(dtype, table.shape, data, table.scale, table.bias), memory


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_cpu_reads_nothing_past_the_table(rng, cpu_level, dtype):
    """The last rows of a table that ends at an unreadable page, for every D up to two blocks: a row's
    last vector is read in full only where the table goes on after it."""
    for dim in list(range(1, 34)) + [63, 65, 100, 127, 129, 255, 257]:
        table, memory = guarded_rows(dtype, 40, dim, rng)
        indices = np.array([39, 38, 39, 0, 39, 37, -1, 39], np.int64)
        offsets = np.array([0, 1, 3, 6, 8], np.int64)
        for pooling in POOLINGS:
            check_cpu([table], indices, offsets, pooling=pooling)
        del table, memory   # unmapped once the last view of it goes


def test_cpu_level_above_the_cpu_is_refused(rng):
    """The C entry refuses a level this CPU lacks, or no level, whatever the caller passes."""
    batch = TableBatch([make_table(rng, 10, 8, "fp32")])
    _, description, total_dim = cpu._prepare(batch)
    indices, offsets = np.array([1, 2, 3], np.int64), np.array([0, 1, 3], np.int64)
    out = np.empty((2, total_dim), np.float32)
    for level in range(len(LEVELS)):
        if LEVELS[level] in supported_levels():
            assert _embedding_bag.lookup(description, indices, offsets, None, 2, 0, True, out, 1, level) == -1
        else:
            with pytest.raises(ValueError, match=rf"CPU level {level} is not available"):
                _embedding_bag.lookup(description, indices, offsets, None, 2, 0, True, out, 1, level)
    for level in (len(LEVELS), -1):
        with pytest.raises(ValueError, match=rf"CPU level {level} is not available"):
            _embedding_bag.lookup(description, indices, offsets, None, 2, 0, True, out, 1, level)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_cpu_fused_row_layout_and_strided_rows(rng, cpu_level, dtype):
    """qparams read in place from fused rows; float rows with a row stride larger than D, or negative (copied)."""
    quantized = [make_table(rng, 500, dim, dtype) for dim in (5, 64, 200)]
    strided = rng.standard_normal((300, 40)).astype(np.float32)[:, :33]
    reversed_rows = np.flipud(rng.standard_normal((70, 9)).astype(np.float32))
    tables = [t.fused() for t in quantized] + [RowTable("fp32", strided.shape, strided),
                                                   RowTable("fp32", reversed_rows.shape, reversed_rows)]
    for indices, offsets, options in every_option(rng, tables, 41):
        check_cpu(tables, indices, offsets, **options)
    _, description, _ = cpu._prepare(TableBatch(tables))
    assert list(description[:3, 1]) == [t.scale.ctypes.data for t in tables[:3]]  # no copies
    assert description[3, 0] == strided.ctypes.data


@pytest.mark.parametrize("position", range(5))
def test_cpu_bad_index_at_each_position_of_a_bag(rng, cpu_level, position):
    """The row loop pools even and odd positions separately and an odd bag's last one alone: a bad
    index is caught at each of them."""
    table = make_table(rng, 10, 20, "fp32")
    indices = np.array([1, 2] + [3, 4, 5, 6, 7], np.int64)
    indices[2 + position] = 10
    offsets = np.array([0, 2, 7], np.int64)
    with use_backend("cpu"), pytest.raises(IndexError, match=rf"bag 1, position {position}"):
        embedding_bag(table, indices, offsets)


def test_cpu_fused_check_names_the_first_bad_index(rng, cpu_level):
    """Many bags run in parallel chunks; the error still names the first bad index, whichever chunk finds one."""
    tables = [make_table(rng, 100, 8, "fp32"), make_table(rng, 50, 24, "int8")]
    indices, offsets = make_bags(rng, [100, 50], 4000, padding=0.0)
    first, later = len(indices) // 3, len(indices) - 2
    indices[later] = -5
    indices[first] = 100
    table, bag = divmod(int(np.searchsorted(offsets, first, side="right")) - 1, 4000)
    position = first - offsets[table * 4000 + bag]
    message = rf"indices\[{first}\] = 100 \(table {table}, bag {bag}, position {position}\)"
    with pytest.raises(IndexError, match=message):
        cpu.lookup(TableBatch(tables), indices, offsets, 4000, "sum", None, "error")
    with use_backend("cpu"), pytest.raises(IndexError, match=message):
        TableBatch(tables).lookup(indices, offsets)


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32])
def test_cpu_skip_far_out_of_range_indices(rng, cpu_level, index_dtype):
    """bounds="skip" with the extreme values of the index dtype: skipped, never read."""
    tables = [make_table(rng, 40, 20, "fp16"), make_table(rng, 7, 130, "int4")]
    indices, offsets = make_bags(rng, [40, 7], 30, index_dtype=index_dtype)
    extremes = np.array([np.iinfo(index_dtype).min, np.iinfo(index_dtype).max, -2, 40, 7], index_dtype)
    far = rng.random(len(indices)) < 0.3
    indices[far] = rng.choice(extremes, far.sum())
    for pooling in POOLINGS:
        check_cpu(tables, indices, offsets, pooling=pooling, bounds="skip")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dims=st.lists(st.integers(1, 70), min_size=1, max_size=4),
       dtypes=st.lists(st.sampled_from(ROW_DTYPES), min_size=4, max_size=4),
       bags=st.integers(0, 20), pooling=st.sampled_from(POOLINGS), bounds=st.sampled_from(("error", "skip")))
def test_cpu_matches_reference_property(seed, dims, dtypes, bags, pooling, bounds):
    rng = np.random.default_rng(seed)
    tables = [make_table(rng, int(rng.integers(1, 60)), dim, dtype) for dim, dtype in zip(dims, dtypes)]
    indices, offsets = make_bags(rng, [t.shape[0] for t in tables], bags,
                                 out_of_range=0.2 if bounds == "skip" else 0.0)
    for level in supported_levels():   # hypothesis runs no function-scoped fixture per example
        with use_cpu_level(level):
            check_cpu(tables, indices, offsets, pooling=pooling, bounds=bounds)


# --------------------------------------------------------------------------------------------
# triton (interpreter on CPU tensors when there is no GPU: small shapes)
# --------------------------------------------------------------------------------------------

def check_triton(device, tables, indices, offsets, **options):
    want = run("reference", tables, indices, offsets, **options)
    on_device = [t.to(device) for t in tables]
    to_device = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    weights = options.pop("per_sample_weights", None)
    if weights is not None:
        options["per_sample_weights"] = to_device(weights)
    indices_t, offsets_t = to_device(indices), to_device(offsets)
    got = run("triton", on_device, indices_t, offsets_t, **options)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape and got.device.type == device
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=tolerance(tables), atol=tolerance(tables))
    assert np.array_equal(indices_t.cpu().numpy(), indices) and np.array_equal(offsets_t.cpu().numpy(), offsets)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dims=st.lists(st.integers(1, 70), min_size=1, max_size=3),
       dtypes=st.lists(st.sampled_from(ROW_DTYPES), min_size=3, max_size=3),
       bags=st.integers(1, 6), pooling=st.sampled_from(POOLINGS), weighted=st.booleans())
def test_triton_matches_reference_property(seed, dims, dtypes, bags, pooling, weighted):
    """Random batches of mixed dtypes and D, skewed bags with padding and empty bags, out-of-range
    indices skipped (small shapes: the interpreter runs this without a GPU)."""
    rng = np.random.default_rng(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tables = [make_table(rng, int(rng.integers(1, 30)), dim, dtype) for dim, dtype in zip(dims, dtypes)]
    indices, offsets = make_bags(rng, [t.shape[0] for t in tables], bags, max_len=12, out_of_range=0.1)
    options = {"pooling": pooling, "bounds": "skip"}
    if weighted and pooling == "sum":
        options["per_sample_weights"] = rng.standard_normal(indices.shape[0]).astype(np.float32)
    check_triton(device, tables, indices, offsets, **options)


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_triton_every_option(rng, triton_device, dtype):
    tables = [make_table(rng, 40, 3, dtype), make_table(rng, 1, 16, dtype), make_table(rng, 60, 48, dtype)]
    for index_dtype in (np.int64, np.int32):
        for indices, offsets, options in every_option(rng, tables, 5, index_dtype):
            check_triton(triton_device, tables, indices, offsets, **options)


def test_triton_mixed_batch_wide_and_narrow_rows(rng, triton_device):
    specs = [(30, 1, "fp32"), (20, 129, "int4"), (25, 64, "bf16"), (9, 1000, "int8"), (11, 16, "fp16")]
    tables = [make_table(rng, rows, dim, dtype) for rows, dim, dtype in specs]
    indices, offsets = make_bags(rng, [rows for rows, _, _ in specs], 3, max_len=6)
    for pooling in POOLINGS:
        check_triton(triton_device, tables, indices, offsets, pooling=pooling)


def test_triton_no_bags_and_empty_bags(rng, triton_device):
    tables = [make_table(rng, 10, 4, "fp32"), make_table(rng, 10, 6, "int8")]
    check_triton(triton_device, tables, np.zeros(0, np.int64), np.zeros(1, np.int64))
    for pooling in POOLINGS:
        check_triton(triton_device, tables, np.array([-1, -1], np.int64), np.array([0, 0, 2, 2, 2], np.int64),
                     pooling=pooling)


def test_triton_lookup_with_flags(rng, triton_device):
    """The no-wait lookup: the output of lookup(bounds="skip"), and flags for what lookup would raise."""
    tables = [make_table(rng, 40, 3, "fp32"), make_table(rng, 30, 16, "int8")]
    batch = TableBatch([t.to(triton_device) for t in tables])
    indices, offsets = make_bags(rng, [40, 30], 6, max_len=5)
    weights = rng.random(len(indices)).astype(np.float32)
    on_device = lambda a: torch.from_numpy(a).to(triton_device)  # noqa: E731

    def with_flags(indices, offsets, weights=None):
        with use_backend("triton"):
            out, flags = batch.lookup_with_flags(on_device(indices), on_device(offsets),
                                                 per_sample_weights=None if weights is None else on_device(weights))
        return out.cpu().numpy(), flags.tolist()

    def reference(indices, offsets, weights=None):
        with use_backend("reference"):
            return TableBatch(tables).lookup(indices, offsets, per_sample_weights=weights, bounds="skip")

    out, flags = with_flags(indices, offsets, weights)
    assert flags == [0, 0, 0]
    np.testing.assert_allclose(out, reference(indices, offsets, weights), rtol=1e-5, atol=1e-5)
    bad_index = indices.copy()
    bad_index[0] = 99
    out, flags = with_flags(bad_index, offsets)
    assert flags == [0, 1, 0]
    np.testing.assert_allclose(out, reference(bad_index, offsets), rtol=1e-5, atol=1e-5)
    bad_offsets = offsets.copy()
    bad_offsets[3] = offsets[-1] + 5
    assert with_flags(indices, bad_offsets)[1][0] == 1
    weights[-1] = np.nan
    assert with_flags(indices, offsets, weights)[1] == [0, 0, 1]
    with use_backend("triton"), pytest.raises(ValueError, match="per_sample_weights contains NaN"):
        batch.lookup(on_device(indices), on_device(offsets), per_sample_weights=on_device(weights))
    with pytest.raises(ValueError, match="lookup_with_flags"):
        TableBatch(tables).lookup_with_flags(indices, offsets)


def test_triton_lookup_with_persistent_flags(rng, triton_device):
    """flags=: the call sets its flags in the caller's buffer and returns it, clearing none
    (FBGEMM's warning counter); a bad buffer is refused, naming the argument."""
    tables = [make_table(rng, 20, 3, "fp32"), make_table(rng, 10, 8, "int4")]
    batch = TableBatch([t.to(triton_device) for t in tables])
    indices, offsets = make_bags(rng, [20, 10], 4, max_len=5)
    bad_index = indices.copy()
    bad_index[0] = 77
    flags = torch.zeros(3, dtype=torch.int32, device=triton_device)
    on_device = lambda a: torch.from_numpy(a).to(triton_device)  # noqa: E731
    with use_backend("triton"):
        out, returned = batch.lookup_with_flags(on_device(indices), on_device(offsets), flags=flags)
        assert returned is flags and flags.tolist() == [0, 0, 0]
        with use_backend("reference"):
            want = TableBatch(tables).lookup(indices, offsets)
        np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-5, atol=1e-5)
        batch.lookup_with_flags(on_device(bad_index), on_device(offsets), flags=flags)
        assert flags.tolist() == [0, 1, 0]
        batch.lookup_with_flags(on_device(indices), on_device(offsets), flags=flags)
        assert flags.tolist() == [0, 1, 0], "a clean call must not clear an earlier call's flag"
        int32 = dict(dtype=torch.int32, device=triton_device)
        bad_flags = [(flags.to(torch.int64), TypeError, "flags must have dtype"),
                     (torch.zeros(4, **int32), ValueError, "flags must be a contiguous int32"),
                     (torch.zeros(6, **int32)[::2], ValueError, "flags must be a contiguous"),
                     (np.zeros(3, np.int32), TypeError, "flags must be a torch.Tensor"),
                     ([0, 0, 0], TypeError, "flags must be a NumPy array or a torch.Tensor")]
        if torch.device(triton_device).type == "cuda":
            bad_flags.append((torch.zeros(3, dtype=torch.int32), ValueError, "flags is on the host"))
        for bad, error, match in bad_flags:
            with pytest.raises(error, match=match):
                batch.lookup_with_flags(on_device(indices), on_device(offsets), flags=bad)


def test_triton_lookup_flag_buffer_is_clean_after_errors_and_per_thread(rng, triton_device):
    """`lookup` reuses one flag buffer a thread: after a raised error, or an index skipped with
    bounds="skip", the next call starts clean; threads calling at once see only their own errors."""
    from recscore.kernels.embedding_bag import triton as triton_lookup
    tables = [make_table(rng, 30, 4, "fp32"), make_table(rng, 25, 16, "int8")]
    batch = TableBatch([t.to(triton_device) for t in tables])
    indices, offsets = make_bags(rng, [30, 25], 3, max_len=4)
    bad_index = indices.copy()
    bad_index[-1] = 99
    with use_backend("reference"):
        want = TableBatch(tables).lookup(indices, offsets)
    on_device = lambda a: torch.from_numpy(a).to(triton_device)  # noqa: E731

    def call(idx, **options):
        with use_backend("triton"):
            return batch.lookup(on_device(idx), on_device(offsets), **options).cpu().numpy()

    with pytest.raises(IndexError):
        call(bad_index)
    assert triton_lookup.thread_flags(batch).tolist() == [0, 0, 0]
    call(bad_index, bounds="skip")
    np.testing.assert_allclose(call(indices), want, rtol=1e-5, atol=1e-5)
    assert triton_lookup.thread_flags(batch).tolist() == [0, 0, 0]

    failures = []

    def worker(bad):
        try:
            for _ in range(3):
                if bad:
                    with pytest.raises(IndexError):
                        call(bad_index)
                else:
                    np.testing.assert_allclose(call(indices), want, rtol=1e-5, atol=1e-5)
        except BaseException as error:  # noqa: BLE001  (reported below, with the thread's role)
            failures.append((bad, error))

    threads = [threading.Thread(target=worker, args=(i % 2 == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    mine = triton_lookup.thread_flags(batch)
    other = []
    thread = threading.Thread(target=lambda: other.append(triton_lookup.thread_flags(batch)))
    thread.start()
    thread.join()
    assert triton_lookup.thread_flags(batch) is mine and other[0] is not mine


def test_triton_lookup_uses_the_thread_buffer_and_cleans_it_on_any_exit(rng, triton_device, monkeypatch):
    """`lookup` hands the kernel this thread's flag buffer (no new one a call), and leaves it
    zeroed even when something fails between the launch and the read-back."""
    from recscore.kernels.embedding_bag import triton as triton_lookup
    table = make_table(rng, 12, 5, "fp32").to(triton_device)
    batch = TableBatch([table])
    indices, offsets = make_bags(rng, [12], 3, max_len=4)
    indices[0] = 50
    args = [torch.from_numpy(a).to(triton_device) for a in (indices, offsets)]
    passed = []
    kernel_lookup = triton_lookup.lookup
    monkeypatch.setattr(triton_lookup, "lookup", lambda *a: passed.append(a[-1]) or kernel_lookup(*a))
    with use_backend("triton"):
        batch.lookup(*args, bounds="skip")
        assert passed[-1] is triton_lookup.thread_flags(batch)

        def interrupted(flags):
            raise KeyboardInterrupt
        monkeypatch.setattr(triton_lookup, "read_thread_flags", interrupted)
        with pytest.raises(KeyboardInterrupt):
            batch.lookup(*args, bounds="skip")
    assert triton_lookup.thread_flags(batch).tolist() == [0, 0, 0]


@pytest.mark.parametrize("first", [np.zeros((3, 0), np.float32)], ids=["D=0"])
def test_triton_lookup_with_flags_with_nothing_to_launch(rng, triton_device, first):
    """No bags, or tables of D = 0: the host flags out-of-range indices, in flags= when given."""
    tables = [quantize_rows(first, "fp32").to(triton_device)]
    batch = TableBatch(tables)
    to = lambda a: torch.from_numpy(np.asarray(a, np.int64)).to(triton_device)  # noqa: E731
    flags = torch.zeros(3, dtype=torch.int32, device=triton_device)
    with use_backend("triton"):
        out, returned = batch.lookup_with_flags(to([0, 2]), to([0, 2]), flags=flags)
        assert returned is flags and flags.tolist() == [0, 0, 0] and tuple(out.shape) == (1, 0)
        out, returned = batch.lookup_with_flags(to([0, 9]), to([0, 2]), flags=flags)
        assert returned is flags and flags.tolist() == [0, 1, 0]
        assert batch.lookup_with_flags(to([0, 9]), to([0, 2]))[1].tolist() == [0, 1, 0]
        assert batch.lookup_with_flags(to([]), to([0]), flags=flags)[1] is flags


def test_triton_reads_fused_rows_in_place(rng, triton_device, monkeypatch):
    """FBGEMM-layout int8/int4 tables (RowTable.fused()) move to torch as one buffer and the
    kernel reads codes, scale and bias from the one row; rows whose bytes are not a multiple of 4
    move as separate parts, with a warning."""
    from recscore.kernels import _backend
    monkeypatch.setattr(_backend, "_warned", set())
    tables = [make_table(rng, 50, 64, "int8"), make_table(rng, 40, 16, "int4"), make_table(rng, 30, 5, "fp32"),
              make_table(rng, 20, 6, "int8")]
    fused = [t.fused() if t.scale is not None else t for t in tables]
    with pytest.warns(RuntimeWarning, match="6-byte rows"):
        on_device = [t.to(triton_device) for t in fused]
    assert on_device[0].scale.stride(0) == (64 + 8) // 4 and on_device[1].bias.stride(0) == (8 + 8) // 4
    indices, offsets = make_bags(rng, [50, 40, 30, 20], 7)
    weights = rng.random(len(indices)).astype(np.float32)
    with use_backend("reference"):
        want = TableBatch(tables).lookup(indices, offsets, per_sample_weights=weights)
    with use_backend("triton"):
        got = TableBatch(on_device).lookup(*(torch.from_numpy(a).to(triton_device) for a in (indices, offsets)),
                                           per_sample_weights=torch.from_numpy(weights).to(triton_device))
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first", [np.zeros((0, 4), np.float32), np.zeros((3, 0), np.float32)], ids=["R=0", "D=0"])
def test_triton_batch_whose_first_table_is_empty(triton_device, first):
    tables = [quantize_rows(first, "fp32"), quantize_rows(np.ones((3, 4), np.float32), "fp32"),
              quantize_rows(np.zeros((0, 8), np.float32), "int8")]
    indices, offsets = np.array([0, 1], np.int64), np.array([0, 0, 2, 2], np.int64)
    check_triton(triton_device, tables, indices, offsets)


def test_errors_come_in_one_order_on_every_backend(triton_device):
    """Offsets first, then weights, then indices: an input with several faults names the same one
    whichever backend runs it (the Triton kernel flags them all; the host words the first)."""
    table = np.ones((4, 2), np.float32)
    nan_weights = np.array([np.nan, 1], np.float32)
    cases = [(np.array([0, 9], np.int64), np.array([0, 1, 2], np.int64), "per_sample_weights contains NaN"),
             (np.array([0, 1], np.int64), np.array([0, 3, 2], np.int64), "offsets must be non-decreasing")]
    for indices, offsets, message in cases:
        for backend in ("reference", "cpu", "triton"):
            move = (lambda a: torch.from_numpy(a).to(triton_device)) if backend == "triton" else (lambda a: a)  # noqa: E731
            with use_backend(backend), pytest.raises(ValueError, match=message):
                embedding_bag(move(table), move(indices), move(offsets), per_sample_weights=move(nan_weights))


def test_triton_one_column_table_with_a_long_column_stride(rng, triton_device):
    """A (R, 1) tensor whose column stride is R (a transposed row): torch calls it contiguous, the
    kernel's byte view needs stride 1. As a bare tensor and inside a hand-built RowTable."""
    wide = torch.from_numpy(rng.standard_normal((1, 30)).astype(np.float32)).to(triton_device)
    column = wide.T   # shape (30, 1), strides (1, 30)
    indices, offsets = make_bags(rng, [30], 6)
    want = reference_lookup(np.ascontiguousarray(column.cpu().numpy()), indices, offsets)
    for table in (column, RowTable("fp32", (30, 1), column)):
        with use_backend("triton"):
            got = embedding_bag(table, torch.from_numpy(indices).to(triton_device),
                                torch.from_numpy(offsets).to(triton_device))
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5)


def test_triton_strided_indices_and_weights(rng, triton_device):
    """Views with a stride are read as the values they show (the kernel gets contiguous copies)."""
    table = make_table(rng, 30, 8, "fp32")
    indices, offsets = make_bags(rng, [30], 5, max_len=4)
    weights = rng.random(2 * len(indices)).astype(np.float32)
    with use_backend("reference"):
        want = embedding_bag(table, indices, offsets, per_sample_weights=weights[::2].copy())
    spread = np.repeat(indices, 2)   # indices at even positions of a longer buffer
    with use_backend("triton"):
        got = embedding_bag(table.to(triton_device), torch.from_numpy(spread).to(triton_device)[::2],
                            torch.from_numpy(offsets).to(triton_device),
                            per_sample_weights=torch.from_numpy(weights).to(triton_device)[::2])
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5)
