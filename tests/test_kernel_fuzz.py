"""Hostile arguments to every public kernel entry point (../shared/API.md): wrong dtypes (object, bool,
complex, float16, float64, big-endian, unsigned), non-contiguous, negative-stride, unaligned, read-only and
zero-stride views, 0-size and huge dimensions, NaN/inf and values past float32, out-of-range and negative
indices and offsets, mismatched lengths, wrong types for k/metric/exclude/pooling/weights/bounds, and ints
such as 2**63. A call either succeeds, and then its result has the contract's shape and dtype, or raises
TypeError, ValueError or IndexError with a message (the contract allows no other exception, not even
OverflowError or MemoryError); in both cases the inputs are left as they were. The calls run on the cpu
and the reference backends, with NumPy arrays and CPU tensors; each entry point counts the calls it got.
"""
import collections
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recscore.kernels import (ItemIndex, QuantizedMatrix, RowTable, TableBatch, embedding_bag, qmatmul,
                              quantize_matrix, quantize_rows, topk, use_backend)

torch = pytest.importorskip("torch")
# values past float16 and float32 are cast on purpose; the kernels' fallback notices are RuntimeWarnings too
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

ALLOWED = (TypeError, ValueError, IndexError)
REFUSED = object()
FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
tried = collections.Counter()            # entry point -> calls made
MINIMUM = 300                            # calls each entry point must have had (methods reached only
MINIMUM_AFTER = 75                       # through a successful call before them: MINIMUM_AFTER)

BIG_INTS = [2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 2 ** 70,
            -1, -2, -2 ** 31, -2 ** 63, -2 ** 63 - 1]
JUNK = [None, "x", b"sum", 1.5, float("nan"), [], {}, (), object(), True, 2 ** 63, -1, np.array([1, 2])]
OTHER_DTYPES = ["object", "bool", "complex64", "complex128", "float16", "float64", ">f4", "int8", "uint8",
                "uint16", "int16", "uint32", "uint64", "int32", "int64", "<U3", "datetime64[s]"]
FLOAT_VALUES = (st.floats(-4, 4, width=32)
                | st.sampled_from([0.0, -0.0, 1.0, float("nan"), float("inf"), -float("inf"), 3.0e38, -3.0e38,
                                   65504.0, 7.0e4, 1e-45, 1e39, -1e300, 1e300]))
FINITE = st.floats(-4, 4, width=32)


# ---- hostile arrays ------------------------------------------------------------------------

def _fill(draw, dtype, shape, floats):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":             # float64 values cast as NumPy casts them: past float16/32 they become inf
        with np.errstate(over="ignore"):
            return draw(hnp.arrays(np.float64, shape, elements=floats)).astype(dtype)
    if dtype.kind == "c":
        return draw(hnp.arrays(dtype, shape, elements=st.complex_numbers(max_magnitude=4, width=dtype.itemsize * 8)))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return draw(hnp.arrays(dtype, shape, elements=st.integers(int(info.min), int(info.max))))
    if dtype.kind == "b":
        return draw(hnp.arrays(dtype, shape))
    if dtype.kind == "O":
        array = np.empty(shape, object)
        for position in np.ndindex(*shape):
            array[position] = draw(st.sampled_from([1, 1.5, None, "a", float("nan")]))
        return array
    return np.zeros(shape, dtype)


LAYOUTS = ["plain", "plain", "plain", "reversed", "strided", "transposed", "fortran", "unaligned", "readonly",
           "broadcast", "byteswapped", "tensor", "tensor_t"]


def relayout(draw, array, layouts=LAYOUTS):
    """`array` as the same values in a hostile layout: negative strides, a step, a transpose, Fortran order,
    an unaligned or read-only buffer, zero strides, swapped bytes, or a torch tensor."""
    layout = draw(st.sampled_from(layouts))
    if layout == "reversed" and array.ndim:
        axis = draw(st.integers(0, array.ndim - 1))
        return np.flip(np.flip(array, axis).copy(), axis)             # same values, negative stride
    if layout == "strided" and array.ndim:
        wide = np.repeat(array, 2, axis=-1)
        return wide[..., ::2]
    if layout == "transposed" and array.ndim == 2:
        return np.ascontiguousarray(array.T).T
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "unaligned" and array.dtype.itemsize > 1 and array.dtype != object:
        raw = np.zeros(array.nbytes + 1, np.uint8)
        out = np.ndarray(array.shape, array.dtype, buffer=raw, offset=1)
        out[...] = array
        return out
    if layout == "readonly":
        out = array.copy()
        out.flags.writeable = False
        return out
    if layout == "broadcast" and array.ndim and array.shape[0]:
        return np.broadcast_to(array[:1], array.shape)
    if layout == "byteswapped" and array.dtype.itemsize > 1 and array.dtype != object:
        return array.astype(array.dtype.newbyteorder())
    if layout in ("tensor", "tensor_t") and array.dtype.kind in "fiub" and array.dtype.isnative \
            and array.dtype.name not in ("uint16", "uint32", "uint64"):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if layout == "tensor_t" and array.ndim == 2:
            tensor = torch.from_numpy(np.ascontiguousarray(array.T)).T
        if array.dtype == np.float32 and draw(st.booleans()):
            tensor = tensor.to(torch.bfloat16)
        return tensor
    return array


@st.composite
def arrays(draw, shape, dtype, floats=FLOAT_VALUES, wrong_dtype=0.15, wrong_ndim=0.05):
    """Mostly `dtype` of `shape`; sometimes another dtype or rank; any layout. Half the arrays of
    FLOAT_VALUES hold finite values only, so that calls get past the finiteness checks."""
    if floats is FLOAT_VALUES and draw(st.booleans()):
        floats = FINITE
    if draw(st.floats(0, 1)) < wrong_dtype:
        dtype = draw(st.sampled_from(OTHER_DTYPES))
    if draw(st.floats(0, 1)) < wrong_ndim:
        shape = draw(st.sampled_from([(), (2,), (2, 2), (1, 2, 2), tuple(shape) + (1,)]))
    return relayout(draw, _fill(draw, dtype, tuple(shape), floats))


def junk_or(draw, strategy, junk=0.08):
    return draw(st.sampled_from(JUNK)) if draw(st.floats(0, 1)) < junk else draw(strategy)


# ---- calling ---------------------------------------------------------------------------------

def _leaves(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        yield value
    elif isinstance(value, RowTable):
        yield from (p for p in (value.data, value.scale, value.bias) if p is not None)


def _bytes(array):
    if isinstance(array, torch.Tensor):
        array = array.detach()
        if array.dtype == torch.bfloat16:
            array = array.view(torch.int16)
        array = array.numpy()
    if array.size > 1 << 20 and 0 in array.strides:
        array = array[(slice(0, 1),) * array.ndim]      # a zero-stride view of huge dims: all of it is here
    return (array.dtype.str, array.shape, np.ascontiguousarray(array).tobytes())


def attempt(entry, fn, *args, **kwargs):
    """Call fn; REFUSED if it raised an allowed exception with a message. Fails on any other exception
    and on a changed input."""
    before = [(leaf, _bytes(leaf)) for leaf in _leaves((args, kwargs))]
    tried[entry] += 1
    try:
        result = fn(*args, **kwargs)
    except ALLOWED as error:
        assert str(error).strip(), f"{entry} raised {type(error).__name__} without a message"
        result = REFUSED
    except Exception as error:       # noqa: BLE001  (the point: nothing else may come out)
        raise AssertionError(f"{entry} raised {type(error).__name__} ({error}), not TypeError/ValueError/"
                             f"IndexError") from error
    for leaf, snapshot in before:
        assert _bytes(leaf) == snapshot, f"{entry} modified an input in place"
    return result


def as_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy() if x.dtype == torch.bfloat16 else x.detach().numpy()
    return np.asarray(x)


def assert_array(result, shape, dtype, entry):
    assert isinstance(result, (np.ndarray, torch.Tensor)), f"{entry} returned {type(result).__name__}"
    assert tuple(result.shape) == tuple(shape), f"{entry} returned shape {tuple(result.shape)}, expected {shape}"
    name = str(result.dtype).removeprefix("torch.")
    assert name == dtype, f"{entry} returned dtype {name}, expected {dtype}"


backends = st.sampled_from(["cpu", "cpu", "reference"])


def _finite(x):
    return bool(np.isfinite(as_numpy(x).astype(np.float64)).all())


# ---- quantize_rows and RowTable --------------------------------------------------------------

ROW_DTYPES = ["fp32", "fp16", "bf16", "int8", "int4"]
row_dtype = st.sampled_from(ROW_DTYPES * 4 + ["FP32", "int2", "", None, 8, b"int8", np.str_("int8")])


@st.composite
def tables(draw, rows=None, dim=None, huge=True):
    """A float table (R, D) of any layout/dtype, or a quantize_rows result. huge: sometimes a zero-stride
    view of 2**40 rows (the reference backend, which dequantizes whole tables, is not given one)."""
    rows = draw(st.integers(0, 7)) if rows is None else rows
    dim = draw(st.integers(0, 9)) if dim is None else dim
    values = draw(hnp.arrays(np.float32, (rows, dim), elements=FINITE))
    if draw(st.booleans()):
        dtype = draw(st.sampled_from(ROW_DTYPES))
        table = quantize_rows(values, dtype)
        if dtype in ("int8", "int4") and rows and draw(st.booleans()):
            table = table.fused()
        return table
    if huge and draw(st.floats(0, 1)) < 0.05:        # "huge" R: a zero-stride view of 2**40 rows, never copied
        return np.broadcast_to(values[:1], (2 ** 40, dim)) if rows else values
    return draw(arrays((rows, dim), draw(st.sampled_from(["float32", "float32", "float16"])), floats=FINITE))


@FUZZ
@given(data=st.data(), backend=backends)
def test_quantize_rows(data, backend):
    rows, dim = data.draw(st.integers(0, 6)), data.draw(st.integers(0, 9))
    weights = junk_or(data.draw, arrays((rows, dim), data.draw(st.sampled_from(["float32", "float64", "float16"]))))
    dtype = data.draw(row_dtype)
    with use_backend(backend):
        table = attempt("quantize_rows", quantize_rows, weights, dtype)
    if table is REFUSED:
        return
    assert isinstance(table, RowTable) and table.dtype == dtype and table.shape == tuple(weights.shape)
    out = attempt("RowTable.dequantize", table.dequantize)
    assert out is not REFUSED
    assert_array(out, weights.shape, "float32", "RowTable.dequantize")
    assert _finite(out), f"quantize_rows({dtype}) of finite weights dequantizes to NaN/inf"


@FUZZ
@given(data=st.data())
def test_row_table(data):
    dtype = data.draw(row_dtype)
    rows, dim = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 9))
    shape = data.draw(st.sampled_from([(rows, dim)] * 4 + [(rows, dim + 1), (rows + 1, dim), (-1, dim), (rows,),
                                       (2 ** 63, dim), (rows, 2 ** 63), (rows, 2 ** 70), (1.0, dim), None,
                                       (True, dim), (np.int64(rows), np.uint64(dim)), "ab"]))
    element = {"fp32": "float32", "fp16": "float16", "bf16": "uint16", "int8": "uint8", "int4": "uint8"}.get(
        dtype if isinstance(dtype, str) else "", "float32")
    width = (dim + 1) // 2 if dtype == "int4" else dim
    data_array = junk_or(data.draw, arrays((rows, width), element))
    quantized = dtype in ("int8", "int4")
    scale = data.draw(st.sampled_from([None, "scale"] if not quantized else ["scale"] * 4 + [None]))
    bias = scale
    if scale is not None:
        scale = data.draw(arrays((rows,), "float32"))
        bias = data.draw(arrays((rows,), "float32"))
    table = attempt("RowTable", RowTable, dtype, shape, data_array, scale, bias)
    if table is REFUSED:
        return
    assert table.shape == tuple(int(n) for n in shape) and table.dtype == dtype
    out = attempt("RowTable.dequantize", table.dequantize)
    assert out is not REFUSED
    assert_array(out, table.shape, "float32", "RowTable.dequantize")


# ---- embedding_bag and TableBatch -------------------------------------------------------------

@st.composite
def bags(draw, rows, n_bags):
    """(indices, offsets) for n_bags bags over `rows` rows: mostly valid, with padding and the odd
    out-of-range, extreme or mis-typed entry, or offsets that break the rules."""
    sizes = draw(st.lists(st.integers(0, 4), min_size=n_bags, max_size=n_bags))
    total = sum(sizes)
    index_values = st.integers(-1, max(rows - 1, -1)) if draw(st.floats(0, 1)) < 0.7 else (
        st.integers(-3, rows + 2) | st.sampled_from([-2 ** 63, 2 ** 63 - 1, 2 ** 31, -2 ** 31, rows]))
    index_dtype = draw(st.sampled_from(["int64", "int32"]))
    if index_dtype == "int32":
        index_values = index_values.map(lambda v: int(np.clip(v, -2 ** 31, 2 ** 31 - 1)))
    indices = np.array(draw(st.lists(index_values, min_size=total, max_size=total)), dtype=index_dtype)
    if draw(st.floats(0, 1)) < 0.1:
        indices = indices.astype(draw(st.sampled_from(OTHER_DTYPES[:6] + ["uint64", "int16"])))
    indices = relayout(draw, indices)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    mutation = draw(st.sampled_from(["none"] * 6 + ["first", "last", "decrease", "huge", "negative", "length",
                                                    "dtype", "empty", "2d"]))
    if mutation == "first" and len(offsets):
        offsets[0] = draw(st.sampled_from([1, -1, 2 ** 62]))
    elif mutation == "last":
        offsets[-1] = draw(st.sampled_from([total + 1, total - 1, -1, 2 ** 63 - 1, -2 ** 63]))
    elif mutation == "decrease" and len(offsets) > 2:
        offsets[1] = offsets[-1] + 1
    elif mutation == "huge" and len(offsets) > 2:
        offsets[1] = 2 ** 62
    elif mutation == "negative" and len(offsets) > 2:
        offsets[1] = -5
    elif mutation == "length":
        offsets = offsets[:-1] if draw(st.booleans()) else np.append(offsets, total)
    elif mutation == "dtype":
        offsets = offsets.astype(draw(st.sampled_from(["int32", "uint64", "float64", "object", "bool"])))
    elif mutation == "empty":
        offsets = np.zeros(0, np.int64)
    elif mutation == "2d":
        offsets = offsets[None, :]
    offsets = relayout(draw, offsets)
    return indices, offsets


def _rows(table):
    return table.shape[0]


@st.composite
def weights_for(draw, n):
    choice = draw(st.sampled_from(["none"] * 5 + ["ok"] * 4 + ["nan", "length", "dtype", "junk", "2d"]))
    if choice == "none":
        return None
    if choice == "junk":
        return draw(st.sampled_from(JUNK))
    values = draw(hnp.arrays(np.float32, (n,), elements=FINITE))
    if choice == "nan" and n:
        values[draw(st.integers(0, n - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif choice == "length":
        values = np.append(values, np.float32(1))
    elif choice == "dtype":
        values = values.astype(draw(st.sampled_from(["float64", "float16", "int32", "object", "complex64"])))
    elif choice == "2d":
        values = values[:, None]
    return relayout(draw, values)


poolings = st.sampled_from(["sum", "mean", "max"] * 4 + ["SUM", "avg", "", None, 0, ["sum"], b"sum",
                                                          np.str_("mean")])
bounds_options = st.sampled_from(["error", "skip"] * 4 + ["ignore", None, True, 1, ("error",)])


@FUZZ
@given(data=st.data(), backend=backends)
def test_embedding_bag(data, backend):
    table = junk_or(data.draw, tables(huge=backend == "cpu"))
    rows = _rows(table) if hasattr(table, "shape") and len(table.shape) == 2 else 3
    n_bags = data.draw(st.integers(0, 5))
    indices, offsets = data.draw(bags(rows, n_bags))
    weights = data.draw(weights_for(len(indices)))
    pooling, bounds = data.draw(poolings), data.draw(bounds_options)
    with use_backend(backend):
        out = attempt("embedding_bag", embedding_bag, table, indices, offsets, pooling=pooling,
                      per_sample_weights=weights, bounds=bounds)
    if out is REFUSED:
        return
    assert_array(out, (len(offsets) - 1, table.shape[1]), "float32", "embedding_bag")


@FUZZ
@given(data=st.data(), backend=backends)
def test_table_batch(data, backend):
    n_tables = data.draw(st.integers(1, 3))
    members = [junk_or(data.draw, tables(huge=backend == "cpu"), junk=0.04) for _ in range(n_tables)]
    argument = data.draw(st.sampled_from(["list"] * 16 + ["tuple", "empty", "dict", "array", "generator", "one"]))
    argument = {"list": members, "tuple": tuple(members), "empty": [], "dict": dict(enumerate(members)),
                "array": np.zeros((2, 2), np.float32), "generator": (m for m in members),
                "one": members[0]}[argument]
    batch = attempt("TableBatch", TableBatch, argument)
    if batch is REFUSED:
        return
    assert batch.num_tables == len(members) and batch.dims == [m.shape[1] for m in members]
    n_bags = data.draw(st.integers(0, 4))
    sizes = [data.draw(st.lists(st.integers(0, 3), min_size=n_bags, max_size=n_bags)) for _ in members]
    indices = np.array([data.draw(st.integers(-1, max(m.shape[0] - 1, -1))) for m, ss in zip(members, sizes)
                        for s in ss for _ in range(s)], np.int64)
    offsets = np.concatenate([[0], np.cumsum([s for ss in sizes for s in ss])]).astype(np.int64)
    if data.draw(st.floats(0, 1)) < 0.5:                   # hostile bags instead
        indices, offsets = data.draw(bags(min(m.shape[0] for m in members), n_bags * n_tables))
    weights = data.draw(weights_for(len(indices)))
    pooling, bounds = data.draw(poolings), data.draw(bounds_options)
    with use_backend(backend):
        out = attempt("TableBatch.lookup", batch.lookup, indices, offsets, pooling=pooling,
                      per_sample_weights=weights, bounds=bounds)
    if out is REFUSED:
        return
    assert_array(out, ((len(offsets) - 1) // n_tables, sum(batch.dims)), "float32", "TableBatch.lookup")


# ---- topk and ItemIndex -----------------------------------------------------------------------

ks = st.integers(1, 9) | st.sampled_from([0, -1, 3.0, "3", None, True, np.int64(2), np.uint64(3), np.int32(-1),
                                           np.float64(2.0), [2]] + BIG_INTS)
metrics = st.sampled_from(["ip", "cosine", "l2"] * 4 + ["IP", "dot", "", None, 1, ["ip"], np.str_("l2")])


@st.composite
def exclusions(draw, n_queries, n_ids, id_values=None):
    choice = draw(st.sampled_from(["none"] * 4 + ["ok"] * 4 + ["range", "indptr", "dtype", "junk", "triple", "list"]))
    if choice == "none":
        return None
    if choice == "junk":
        return draw(st.sampled_from(JUNK + [(1, 2), ("a", "b"), (None, None)]))
    sizes = draw(st.lists(st.integers(0, 3), min_size=n_queries, max_size=n_queries))
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    values = id_values if id_values is not None else st.integers(0, max(n_ids - 1, 0))
    ids = np.array(draw(st.lists(values, min_size=int(indptr[-1]), max_size=int(indptr[-1]))), np.int64)
    if choice == "range" and len(ids):
        ids[draw(st.integers(0, len(ids) - 1))] = draw(st.sampled_from([-1, n_ids, 2 ** 63 - 1, -2 ** 63]))
    elif choice == "indptr":
        indptr = draw(st.sampled_from([indptr[:-1], np.append(indptr, 0), indptr[::-1].copy(), indptr + 1]))
    elif choice == "dtype":
        ids = ids.astype(draw(st.sampled_from(["float32", "uint64", "object", "bool"])))
    pair = (relayout(draw, indptr), relayout(draw, ids))
    if choice == "triple":
        return pair + (ids,)
    return list(pair) if choice == "list" else pair


def _check_topk_result(result, n_queries, k, n_rows, entry):
    assert isinstance(result, tuple) and len(result) == 2, f"{entry} returned {type(result).__name__}"
    scores, ids = result
    assert_array(scores, (n_queries, k), "float32", entry)
    assert_array(ids, (n_queries, k), "int64", entry)
    return scores, ids


@FUZZ
@given(data=st.data(), backend=backends)
def test_topk(data, backend):
    n_queries, dim, n_rows = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 6)), data.draw(st.integers(0, 8))
    queries = junk_or(data.draw, arrays((n_queries, dim), data.draw(st.sampled_from(["float32", "float64",
                                                                                     "float16"]))))
    corpus = data.draw(tables(n_rows, dim if data.draw(st.floats(0, 1)) < 0.9 else dim + 1))
    if isinstance(corpus, np.ndarray) and corpus.ndim == 2 and corpus.shape[0] == 2 ** 40:
        corpus = np.zeros((n_rows, dim), np.float32)    # a 2**40-row corpus would be scanned
    k, metric = data.draw(ks), data.draw(metrics)
    exclude = data.draw(exclusions(n_queries, n_rows))
    with use_backend(backend):
        result = attempt("topk", topk, queries, corpus, k, metric=metric, exclude=exclude)
    if result is REFUSED:
        return
    scores, ids = _check_topk_result(result, queries.shape[0], int(k), n_rows, "topk")
    ids = as_numpy(ids)
    assert ((ids >= -1) & (ids < n_rows)).all(), "topk returned an id outside [-1, N)"


index_dims = st.sampled_from([1, 2, 3, 4, 5, 6] * 5 + [0, -1, 2.0, "4", None, True, np.int64(3)] + BIG_INTS[:9])


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_item_index(data):
    dim = data.draw(index_dims)
    index = attempt("ItemIndex", ItemIndex, dim, metric=data.draw(metrics),
                    dtype=data.draw(st.sampled_from(["fp32", "fp16", "int8"] * 4 + ["int4", "bf16", "f32", None])))
    if index is REFUSED:
        return
    dim = index.dim
    if dim > 64:
        return                           # a valid index of a huge dim: no vectors of that width to give it
    known = set()
    ids_values = st.integers(0, 20) | st.sampled_from([-1, 2 ** 63 - 1, -2 ** 63, 2 ** 31])
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["add", "add", "remove", "remove", "search", "search"]))
        n = data.draw(st.integers(0, 5))
        if op == "add":
            ids = np.array(data.draw(st.lists(ids_values, min_size=n, max_size=n)), np.int64)
            if data.draw(st.floats(0, 1)) < 0.15:
                ids = ids.astype(data.draw(st.sampled_from(OTHER_DTYPES[:6] + ["uint64"])))
            ids = relayout(data.draw, ids)
            vectors = data.draw(arrays((n if data.draw(st.floats(0, 1)) < 0.9 else n + 1,
                                        dim if data.draw(st.floats(0, 1)) < 0.9 else dim + 1),
                                       data.draw(st.sampled_from(["float32", "float64", "float16"]))))
            if data.draw(st.floats(0, 1)) < 0.05:
                ids, vectors = vectors, ids                   # FAISS's argument order
            if attempt("ItemIndex.add", index.add, ids, vectors) is not REFUSED:
                known |= set(as_numpy(ids).tolist() if not isinstance(ids, np.ndarray) else ids.tolist())
        elif op == "remove":
            ids = data.draw(arrays((n,), "int64", wrong_dtype=0.15))
            removed = attempt("ItemIndex.remove", index.remove, ids)
            if removed is not REFUSED:
                assert isinstance(removed, int) and 0 <= removed <= n
        else:
            n_queries = data.draw(st.integers(0, 3))
            queries = junk_or(data.draw, arrays((n_queries, dim), "float32"))
            k = data.draw(ks)
            exclude = data.draw(exclusions(n_queries, 0, ids_values))
            result = attempt("ItemIndex.search", index.search, queries, k, exclude=exclude)
            if result is not REFUSED:
                _check_topk_result(result, queries.shape[0], int(k), len(index), "ItemIndex.search")
        assert 0 <= len(index) <= len(known)


# ---- quantized matrices -------------------------------------------------------------------------

group_sizes = st.sampled_from([32] * 8 + [16, 8, 2, 1, 3, 0, -32, 2 ** 63, 2 ** 70, 32.0, None, "32", True,
                               np.int64(32)])


@FUZZ
@given(data=st.data(), backend=backends)
def test_quantize_matrix(data, backend):
    out_features, groups = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 3))
    group_size = data.draw(group_sizes)
    width = groups * 32 + data.draw(st.sampled_from([0, 0, 0, 1, 16]))
    weight = junk_or(data.draw, arrays((out_features, width), data.draw(st.sampled_from(["float32", "float64",
                                                                                         "float16"]))))
    fmt = data.draw(st.sampled_from(["int8", "int4"] * 4 + ["q8_0", "f32", "INT8", None, 8]))
    with use_backend(backend):
        qm = attempt("quantize_matrix", quantize_matrix, weight, fmt, group_size=group_size)
    if qm is REFUSED:
        return
    assert isinstance(qm, QuantizedMatrix) and qm.fmt == fmt and qm.shape == tuple(weight.shape)
    out = attempt("QuantizedMatrix.dequantize", qm.dequantize)
    assert out is not REFUSED
    assert_array(out, qm.shape, "float32", "QuantizedMatrix.dequantize")
    assert _finite(out), f"quantize_matrix({fmt}) of finite weights dequantizes to NaN/inf"
    rows = data.draw(arrays((data.draw(st.integers(0, 4)),), "int64", wrong_dtype=0.1))
    if isinstance(rows, np.ndarray) and rows.dtype.kind == "i" and data.draw(st.booleans()):
        rows = np.clip(rows, 0, max(qm.shape[0] - 1, 0)).astype(rows.dtype)
    taken = attempt("QuantizedMatrix.take", qm.take, rows)
    if taken is not REFUSED:
        assert_array(taken, (len(rows), qm.shape[1]), "float32", "QuantizedMatrix.take")


GGUF_BLOCKS = {"f32": (1, 4), "f16": (1, 2), "q8_0": (32, 34), "q5_0": (32, 22), "q4_k": (256, 144),
               "q6_k": (256, 210)}


@FUZZ
@given(data=st.data(), backend=backends)
def test_quantized_matrix(data, backend):
    fmt = data.draw(st.sampled_from(["int8", "int4", "f32", "f16", "q8_0", "q5_0", "q4_k", "q6_k"] * 2
                                    + ["Q8_0", None, 1]))
    out_features, blocks = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 2))
    if fmt in ("int8", "int4"):
        group_size = data.draw(group_sizes)
        gs = group_size if isinstance(group_size, int) and 0 < group_size < 64 else 32
        in_features = blocks * gs
        width = in_features // 2 if fmt == "int4" else in_features
        dtype = "int8" if fmt == "int8" else "uint8"
        scales = data.draw(arrays((out_features, in_features // gs), "float32"))
    else:
        weights_per_block, block_bytes = GGUF_BLOCKS.get(fmt, (32, 34))
        group_size = data.draw(st.sampled_from([weights_per_block] * 4 + [32, 1, 0]))
        in_features, width, dtype = blocks * weights_per_block, blocks * block_bytes, "uint8"
        scales = None if data.draw(st.floats(0, 1)) < 0.9 else np.ones((out_features, 1), np.float32)
    codes = data.draw(arrays((out_features, width if data.draw(st.floats(0, 1)) < 0.9 else width + 1), dtype,
                             wrong_dtype=0.08))
    if data.draw(st.floats(0, 1)) < 0.6 and isinstance(codes, np.ndarray):
        codes = np.ascontiguousarray(codes)        # most calls past the layout check
    if fmt in ("f32", "f16") and isinstance(codes, np.ndarray) and codes.dtype == np.uint8 and codes.size:
        # only finite floats: bytes of NaN/inf stand for weights the contract lets a GGUF file hold
        codes = np.zeros_like(codes)
    shape = data.draw(st.sampled_from([(out_features, in_features)] * 6
                                      + [(out_features + 1, in_features), (-1, in_features), (2 ** 63, in_features),
                                         (out_features, 2 ** 70), None, (1.5, 2)]))
    qm = attempt("QuantizedMatrix", QuantizedMatrix, fmt, shape, codes, scales, group_size)
    if qm is REFUSED:
        return
    assert qm.shape == tuple(int(n) for n in shape) and qm.fmt == fmt
    rows = data.draw(arrays((data.draw(st.integers(0, 4)),), "int64", wrong_dtype=0.15))
    if isinstance(rows, np.ndarray) and rows.dtype.kind == "i" and data.draw(st.booleans()):
        rows = np.clip(rows, 0, max(qm.shape[0] - 1, 0)).astype(rows.dtype)
    with use_backend(backend):
        taken = attempt("QuantizedMatrix.take", qm.take, rows)
        if taken is not REFUSED:
            assert_array(taken, (len(rows), qm.shape[1]), "float32", "QuantizedMatrix.take")
        x = data.draw(arrays((data.draw(st.integers(0, 3)), qm.shape[1] if data.draw(st.floats(0, 1)) < 0.9
                              else qm.shape[1] + 1), data.draw(st.sampled_from(["float32", "float64", "float16"])),
                             floats=FLOAT_VALUES))
        y = attempt("qmatmul", qmatmul, x, qm)
    if y is not REFUSED:
        assert_array(y, (x.shape[0], qm.shape[0]), "float32", "qmatmul")


@FUZZ
@given(data=st.data(), backend=backends)
def test_qmatmul(data, backend):
    out_features, in_features = data.draw(st.integers(0, 4)), data.draw(st.sampled_from([0, 32, 64]))
    weight = data.draw(hnp.arrays(np.float32, (out_features, in_features), elements=FINITE))
    qm = quantize_matrix(weight, data.draw(st.sampled_from(["int8", "int4"])))
    qm = junk_or(data.draw, st.just(qm), junk=0.1)
    x = junk_or(data.draw, arrays((data.draw(st.integers(0, 4)), in_features if data.draw(st.floats(0, 1)) < 0.9
                                   else in_features + 1), data.draw(st.sampled_from(["float32", "float64",
                                                                                     "float16"]))))
    with use_backend(backend):
        y = attempt("qmatmul", qmatmul, x, qm)
    if y is REFUSED:
        return
    assert_array(y, (x.shape[0], out_features), "float32", "qmatmul")


@FUZZ
@given(data=st.data(), backend=backends)
def test_quantized_matrix_take(data, backend):
    out_features = data.draw(st.integers(0, 5))
    qm = quantize_matrix(np.arange(out_features * 64, dtype=np.float32).reshape(out_features, 64) / 64,
                         data.draw(st.sampled_from(["int8", "int4"])), group_size=data.draw(st.sampled_from([32, 64])))
    n = data.draw(st.integers(0, 5))
    values = st.integers(0, max(out_features - 1, 0)) | st.sampled_from([-1, out_features] + BIG_INTS[:9])
    rows = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=object)
    dtype = data.draw(st.sampled_from(["int64", "int32"] * 3 + OTHER_DTYPES))
    try:
        with np.errstate(all="ignore"):
            rows = rows.astype(dtype)
    except (OverflowError, TypeError, ValueError):
        rows = rows.astype(object)
    rows = junk_or(data.draw, st.just(relayout(data.draw, rows)))
    with use_backend(backend):
        taken = attempt("QuantizedMatrix.take", qm.take, rows)
    if taken is not REFUSED:
        assert_array(taken, (len(rows), 64), "float32", "QuantizedMatrix.take")


def _fake_gguf_tensor(draw):
    type_name = draw(st.sampled_from(list({"F32", "F16", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}) * 2 + ["Q2_K", "BF16"]))
    fmt = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0", "Q5_0": "q5_0", "Q4_K": "q4_k", "Q6_K": "q6_k"}.get(type_name)
    weights_per_block, block_bytes = GGUF_BLOCKS.get(fmt, (32, 34))
    rows, blocks = draw(st.integers(0, 3)), draw(st.integers(0, 2))
    shape = draw(st.sampled_from([[blocks * weights_per_block, rows]] * 4
                                 + [[blocks * weights_per_block], [blocks * weights_per_block + 1, rows],
                                    [blocks * weights_per_block, rows, 2], [-weights_per_block, rows],
                                    [2 ** 63, 1], [weights_per_block, 2 ** 62], []]))
    n_bytes = rows * blocks * block_bytes + draw(st.sampled_from([0, 0, 0, 1, -1]))
    raw = np.zeros(max(n_bytes, 0), np.uint8)
    return types.SimpleNamespace(name="t", tensor_type=types.SimpleNamespace(name=type_name), shape=shape,
                                 data=relayout(draw, raw, ["plain", "plain", "readonly", "reversed"]))


@FUZZ
@given(data=st.data())
def test_quantized_matrix_from_gguf(data):
    tensor = _fake_gguf_tensor(data.draw) if data.draw(st.floats(0, 1)) < 0.85 else data.draw(st.sampled_from(JUNK))
    qm = attempt("QuantizedMatrix.from_gguf", QuantizedMatrix.from_gguf, tensor)
    if qm is REFUSED:
        return
    assert qm.shape[1] == int(tensor.shape[0])
    out = attempt("QuantizedMatrix.dequantize", qm.dequantize)
    assert_array(out, qm.shape, "float32", "QuantizedMatrix.dequantize")


# ---- use_backend --------------------------------------------------------------------------------

@FUZZ
@given(name=st.sampled_from(["reference", "cpu", "triton"] * 2 + ["CPU", "", None, 1, ["cpu"], b"cpu",
                                                                 np.str_("cpu"), ("cpu",)]) | st.text(max_size=8))
def test_use_backend(name):
    def enter():
        with use_backend(name):
            return embedding_bag(np.ones((3, 2), np.float32), np.array([0, 2]), np.array([0, 2]))
    out = attempt("use_backend", enter)
    if out is not REFUSED:
        assert_array(out, (1, 2), "float32", "use_backend")


# ---- regressions: what this fuzz found ---------------------------------------------------------------

@pytest.mark.parametrize("k", [2 ** 31, 2 ** 40, 2 ** 63, 2 ** 70])
def test_a_huge_k_is_refused_not_allocated(k):
    """A k past the corpus whose (B, k) result would be huge raised MemoryError (or asked the C scan for
    gigabytes of buffers); now ValueError naming k."""
    queries, corpus = np.ones((2, 4), np.float32), np.ones((5, 4), np.float32)
    for backend in ("cpu", "reference"):
        with use_backend(backend), pytest.raises(ValueError, match="k = "):
            topk(queries, corpus, k)
    index = ItemIndex(4)
    index.add(np.array([7, 8]), corpus[:2])
    with pytest.raises(ValueError, match="k = "):
        index.search(queries, k)
    if k < 2 ** 63:
        scores, ids = topk(queries[:0], corpus, k)         # no queries: an empty (0, k) result is no allocation
        assert scores.shape == ids.shape == (0, k)
    else:
        with pytest.raises(ValueError, match="int64"):
            topk(queries[:0], corpus, k)


def test_k_past_the_corpus_still_pads():
    queries, corpus = np.ones((2, 4), np.float32), np.arange(12, dtype=np.float32).reshape(3, 4)
    scores, ids = topk(queries, corpus, 5)
    assert ids.tolist() == [[2, 1, 0, -1, -1]] * 2 and np.isneginf(scores[:, 3:]).all()
    index = ItemIndex(4)
    index.add(np.array([30, 10, 20]), corpus)
    for k in (3, 4):                                       # k = n and k > n: every row is a candidate
        scores, ids = index.search(queries, k)
        assert ids.tolist() == [[20, 10, 30, -1][:k]] * 2


def test_triton_backend_refuses_numpy_inputs(monkeypatch):
    """Under TRITON_INTERPRET=1, use_backend("triton") with NumPy inputs reached the Triton launcher and
    raised AttributeError ('numpy.ndarray' object has no attribute 'contiguous' / 'detach')."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qm = quantize_matrix(np.ones((2, 32), np.float32), "int8")
    calls = [lambda: embedding_bag(np.ones((3, 2), np.float32), np.array([0, 2]), np.array([0, 2])),
             lambda: topk(np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), 2),
             lambda: qmatmul(np.ones((1, 32), np.float32), qm)]
    for call in calls:
        with use_backend("triton"), pytest.raises(ValueError, match="torch tensors"):
            call()


def test_empty_int4_matrix():
    """An int4 matrix of 0 rows and 0 columns: the nibble packing reshaped with -1 and raised."""
    qm = quantize_matrix(np.zeros((0, 0), np.float32), "int4")
    assert qm.shape == (0, 0) and qm.dequantize().shape == (0, 0)
    assert qm.take(np.zeros(0, np.int64)).shape == (0, 0)
    assert qmatmul(np.zeros((2, 0), np.float32), qm).shape == (2, 0)


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_weights_past_the_stored_range_are_refused(dtype):
    """float64 weights past float32 were stored as inf (fp32, and int8/int4 biases); an int8/int4 row
    spanning about the whole float32 range dequantized to inf. Both are ValueError now."""
    with pytest.raises(ValueError, match="outside the"):
        quantize_rows(np.array([[1e39, 0.0]]), dtype)
    if dtype != "fp32":
        with pytest.raises(ValueError, match="outside the"):
            quantize_rows(np.array([[-3e38, 3e38]], np.float32), dtype)
    table = quantize_rows(np.array([[-1e37, 1e37, 0.5]], np.float32), dtype)
    assert np.isfinite(table.dequantize()).all()


# ---- counts ---------------------------------------------------------------------------------------

ENTRY_POINTS = ["quantize_rows", "RowTable", "RowTable.dequantize", "embedding_bag", "TableBatch",
                "TableBatch.lookup", "topk", "ItemIndex", "ItemIndex.add", "ItemIndex.remove", "ItemIndex.search",
                "quantize_matrix", "QuantizedMatrix", "QuantizedMatrix.take", "QuantizedMatrix.dequantize",
                "QuantizedMatrix.from_gguf", "qmatmul", "use_backend"]
REACHED_AFTER = {"RowTable.dequantize", "TableBatch.lookup", "ItemIndex.add", "ItemIndex.remove", "ItemIndex.search",
                 "QuantizedMatrix.take", "QuantizedMatrix.dequantize"}


def test_kernel_fuzz_tried_every_entry_point():
    """Runs last in this file: every entry point got at least MINIMUM calls."""
    print("\nkernel fuzz calls:", dict(sorted(tried.items())), "total", sum(tried.values()))
    short = {entry: tried[entry] for entry in ENTRY_POINTS
             if tried[entry] < (MINIMUM_AFTER if entry in REACHED_AFTER else MINIMUM)}
    assert not short, f"entry points with fewer calls than the minimum: {short}"
