"""Coverage-guided fuzzing (atheris, libFuzzer) of the public kernel entry points, from fuzzer bytes.

Each input picks an entry point and builds its arguments from the bytes: dtypes (object, bool, complex,
float16/64, big-endian, unsigned), layouts (negative strides, steps, transposes, unaligned, zero strides),
shapes (0-size, off by one), values (NaN/inf, past float32, out-of-range and extreme indices/offsets) and
option values (k, metric, pooling, bounds, exclude, group_size, fmt). A call must return or raise
TypeError/ValueError/IndexError with a message, and leave its inputs unchanged (tests/test_kernel_fuzz.py
checks the same with hypothesis); anything else is a crash that libFuzzer reports with the input.

    flock /tmp/recscore-cpu.lock .venv/bin/python bench/fuzz_kernels.py -runs=20000 -max_total_time=240 -len_control=0
    (libFuzzer flags pass through; -runs=N bounds the inputs run). Prints the inputs run per entry point.
"""
import collections
import os
import sys
import types

import atheris

with atheris.instrument_imports(include=["recscore"]):
    import numpy as np

    from recscore.kernels import (ItemIndex, QuantizedMatrix, RowTable, TableBatch, embedding_bag, qmatmul,
                                  quantize_matrix, quantize_rows, topk, use_backend)

ALLOWED = (TypeError, ValueError, IndexError)
RUN = collections.Counter()          # entry point -> inputs run
REFUSED = collections.Counter()      # entry point -> inputs refused with an allowed exception
DTYPES = ["float32", "float32", "float32", "float64", "float16", "int64", "int32", "uint8", "int8", "uint16",
          "uint64", "bool", "complex64", "object", ">f4", "int16"]
SPECIAL_FLOATS = [0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 3e38, -3e38, 1e39, 1e300, 65504.0, 1e-45]
SPECIAL_INTS = [0, 1, -1, -2, 2, 3, 2 ** 31 - 1, 2 ** 31, -2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1, -2 ** 63]
JUNK = [None, "x", b"sum", 1.5, float("nan"), [], {}, (), object(), True, 2 ** 63, -1, np.array([1, 2])]


class Bytes:
    """Argument choices read from the fuzzer's bytes."""

    def __init__(self, data):
        self.fdp = atheris.FuzzedDataProvider(data)
        self.made = []           # (array, its bytes): every array handed to a kernel, to check afterwards

    def int(self, low, high):
        return self.fdp.ConsumeIntInRange(low, high)

    def pick(self, options):
        return options[self.int(0, len(options) - 1)]

    def chance(self, percent):
        return self.int(0, 99) >= 100 - percent      # bytes run out -> 0 -> the common, valid choice

    def float(self):
        return self.pick(SPECIAL_FLOATS) if self.chance(15) else self.fdp.ConsumeFloatInRange(-4.0, 4.0)

    def index(self, rows):
        return self.pick(SPECIAL_INTS + [rows, rows - 1]) if self.chance(10) else self.int(-1, max(rows - 1, -1))

    def array(self, shape, dtype, values="float", wrong=10):
        if self.chance(wrong):
            dtype = self.pick(DTYPES)
        if self.chance(wrong // 2):
            shape = self.pick([(), (2,), (2, 2), (1, 2, 2), tuple(shape) + (1,)])
        size = int(np.prod(shape, dtype=np.int64))
        raw = [self.float() if values == "float" else self.index(values) for _ in range(size)]
        with np.errstate(all="ignore"):
            try:
                array = np.array(raw, dtype=object).astype(dtype).reshape(shape)
            except (OverflowError, TypeError, ValueError):
                array = np.array(raw, dtype=object).reshape(shape)
        return self.layout(array)

    def layout(self, array):
        array = self._layout(array)
        if array.dtype != object:
            self.made.append((array, array.tobytes()))
        return array

    def unchanged(self):
        return all(array.tobytes() == before for array, before in self.made)

    def _layout(self, array):
        layout = self.int(0, 9)
        if layout == 1 and array.ndim:
            return np.flip(np.flip(array, 0).copy(), 0)
        if layout == 2 and array.ndim:
            return np.repeat(array, 2, axis=-1)[..., ::2]
        if layout == 3 and array.ndim == 2:
            return np.ascontiguousarray(array.T).T
        if layout == 4 and array.dtype.itemsize > 1 and array.dtype != object:
            out = np.ndarray(array.shape, array.dtype, buffer=np.zeros(array.nbytes + 1, np.uint8), offset=1)
            out[...] = array
            return out
        if layout == 5 and array.ndim and array.shape[0]:
            return np.broadcast_to(array[:1], array.shape)
        if layout == 6:
            out = array.copy()
            out.flags.writeable = False
            return out
        return array

    def maybe_junk(self, value, percent=5):
        return self.pick(JUNK) if self.chance(percent) else value


def table(b, rows, dim):
    if b.chance(40):
        values = b.array((rows, dim), "float32", wrong=0)
        try:
            return quantize_rows(np.nan_to_num(np.asarray(values, np.float32), posinf=1, neginf=-1),
                                 b.pick(["fp32", "fp16", "bf16", "int8", "int4"]))
        except ALLOWED:
            return values
    return b.array((rows, dim), b.pick(["float32", "float16"]))


def bags(b, rows, n_bags):
    sizes = [b.int(0, 3) for _ in range(n_bags)]
    indices = b.array((sum(sizes),), b.pick(["int64", "int32"]), values=rows)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if b.chance(30) and len(offsets):
        offsets[b.int(0, len(offsets) - 1)] = b.pick(SPECIAL_INTS)
    if b.chance(10):
        offsets = offsets[:-1] if b.chance(50) else offsets.astype(b.pick(DTYPES))
    return indices, b.layout(offsets)


def weights(b, n):
    return None if b.chance(60) else b.maybe_junk(b.array((n + (1 if b.chance(5) else 0),), "float32"))


def exclude(b, n_queries, n_ids):
    if b.chance(50):
        return b.maybe_junk(None, 10)
    sizes = [b.int(0, 2) for _ in range(n_queries)]
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if b.chance(15) and len(indptr):
        indptr[b.int(0, len(indptr) - 1)] = b.pick(SPECIAL_INTS)
    ids = b.array((int(sum(sizes)),), "int64", values=max(n_ids, 1))
    return (b.layout(indptr), ids)


def k_value(b):
    return b.pick([0, -1, 3.0, "3", None, True, np.int64(2)] + SPECIAL_INTS) if b.chance(15) else b.int(1, 8)


def run_quantize_rows(b):
    rows, dim = b.int(0, 5), b.int(0, 8)
    weights_ = b.maybe_junk(b.array((rows, dim), b.pick(["float32", "float64", "float16"])))
    out = quantize_rows(weights_, b.pick(["fp32", "fp16", "bf16", "int8", "int4", "int2", None]))
    assert out.shape == tuple(weights_.shape) and out.dequantize().shape == out.shape


def run_row_table(b):
    dtype = b.pick(["fp32", "fp16", "bf16", "int8", "int4", "x"])
    rows, dim = b.int(0, 4), b.int(0, 6)
    element = {"fp16": "float16", "bf16": "uint16", "int8": "uint8", "int4": "uint8"}.get(dtype, "float32")
    data = b.array((rows, (dim + 1) // 2 if dtype == "int4" else dim), element)
    scale = bias = None
    if dtype in ("int8", "int4") or b.chance(10):
        scale, bias = b.array((rows,), "float32"), b.array((rows,), "float32")
    shape = b.pick([(rows, dim)] * 4 + [(rows + 1, dim), (-1, dim), (2 ** 63, dim), (rows,), None])
    out = RowTable(dtype, shape, data, scale, bias)
    assert out.dequantize().shape == out.shape


def run_embedding_bag(b):
    rows, dim = b.int(0, 6), b.int(0, 6)
    indices, offsets = bags(b, rows, b.int(0, 4))
    tbl = b.maybe_junk(table(b, rows, dim))
    out = embedding_bag(tbl, indices, offsets,
                        pooling=b.pick(["sum", "mean", "max", "sum", "avg", None, ["sum"]]),
                        per_sample_weights=weights(b, len(indices)),
                        bounds=b.pick(["error", "skip", "error", "ignore", None]))
    assert out.shape == (len(offsets) - 1, tbl.shape[1]) and out.dtype == np.float32, (out.shape, out.dtype)


def run_table_batch(b):
    members = [table(b, b.int(0, 5), b.int(0, 5)) for _ in range(b.int(1, 3))]
    batch = TableBatch(b.pick([members] * 6 + [[], tuple(members), dict(enumerate(members)), members[0]]))
    indices, offsets = bags(b, min(m.shape[0] for m in members), b.int(0, 3) * len(members))
    out = batch.lookup(indices, offsets, pooling=b.pick(["sum", "mean", "max", "x"]),
                       per_sample_weights=weights(b, len(indices)), bounds=b.pick(["error", "skip"]))
    assert out.shape == ((len(offsets) - 1) // len(members), sum(batch.dims))


def run_topk(b):
    n_queries, dim, rows = b.int(0, 4), b.int(0, 5), b.int(0, 7)
    queries = b.maybe_junk(b.array((n_queries, dim), b.pick(["float32", "float64", "float16"])))
    k = k_value(b)
    scores, ids = topk(queries, table(b, rows, dim if b.chance(90) else dim + 1), k,
                       metric=b.pick(["ip", "cosine", "l2", "ip", "dot", None]), exclude=exclude(b, n_queries, rows))
    assert scores.shape == ids.shape == (queries.shape[0], k) and ids.dtype == np.int64


def run_item_index(b):
    dim = b.pick([1, 2, 3, 4] * 4 + [0, -1, 2.0, None, 2 ** 63])
    index = ItemIndex(dim, metric=b.pick(["ip", "cosine", "l2", "x"]), dtype=b.pick(["fp32", "fp16", "int8", "x"]))
    for _ in range(b.int(1, 4)):
        op, n = b.int(0, 2), b.int(0, 4)
        try:
            if op == 0:
                index.add(b.array((n,), "int64", values=20), b.array((n, index.dim), "float32"))
            elif op == 1:
                ids = b.array((n,), "int64", values=20)
                removed = index.remove(ids)
                assert 0 <= removed <= len(ids), (removed, ids)
            else:
                queries = b.array((b.int(0, 3), index.dim), "float32")
                k = k_value(b)
                scores, ids = index.search(queries, k, exclude=exclude(b, queries.shape[0], 20))
                assert scores.shape == (queries.shape[0], k)
        except ALLOWED as error:
            assert str(error)


def run_quantize_matrix(b):
    weight = b.array((b.int(0, 3), b.int(0, 2) * 32 + b.pick([0, 0, 1])), b.pick(["float32", "float64"]))
    qm = quantize_matrix(weight, b.pick(["int8", "int4", "q8_0"]),
                         group_size=b.pick([32, 32, 16, 2, 0, -32, 2 ** 63, 3, None]))
    assert qm.dequantize().shape == tuple(weight.shape)
    rows = b.array((b.int(0, 3),), "int64", values=qm.shape[0])
    assert qm.take(rows).shape == (len(rows), qm.shape[1])


def run_quantized_matrix(b):
    fmt = b.pick(["int8", "int4", "f32", "q8_0", "q4_k", "x"])
    out, blocks = b.int(0, 3), b.int(0, 2)
    per_block, block_bytes = {"f32": (1, 4), "q8_0": (32, 34), "q4_k": (256, 144)}.get(fmt, (32, 32))
    width = blocks * (16 if fmt == "int4" else block_bytes)
    data = b.array((out, width + (1 if b.chance(10) else 0)), "int8" if fmt == "int8" else "uint8", wrong=5)
    if fmt == "f32":
        data = np.zeros_like(data) if isinstance(data, np.ndarray) and data.dtype == np.uint8 else data
    scales = b.array((out, blocks), "float32") if fmt in ("int8", "int4") else None
    qm = QuantizedMatrix(fmt, b.pick([(out, blocks * per_block)] * 4 + [(out + 1, 1), (-1, 0), None]),
                         np.ascontiguousarray(data) if b.chance(60) and isinstance(data, np.ndarray) else data,
                         scales, b.pick([per_block] * 4 + [0, 2, 2 ** 63]))
    x = b.array((b.int(0, 2), qm.shape[1]), b.pick(["float32", "float64"]))
    assert qmatmul(x, qm).shape == (x.shape[0], qm.shape[0])


def run_from_gguf(b):
    name = b.pick(["F32", "F16", "Q8_0", "Q5_0", "Q4_K", "Q6_K", "BF16"])
    per_block, block_bytes = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_K": (256, 144),
                              "Q6_K": (256, 210)}.get(name, (32, 34))
    rows, blocks = b.int(0, 3), b.int(0, 2)
    shape = b.pick([[blocks * per_block, rows]] * 4 + [[blocks * per_block + 1, rows], [-per_block, rows], [2 ** 63, 1]])
    raw = np.zeros(max(rows * blocks * block_bytes + b.pick([0, 0, 1, -1]), 0), np.uint8)
    tensor = types.SimpleNamespace(name="t", tensor_type=types.SimpleNamespace(name=name), shape=shape, data=raw)
    qm = QuantizedMatrix.from_gguf(b.maybe_junk(tensor, 10))
    assert qm.dequantize().shape == qm.shape


ENTRY_POINTS = [run_quantize_rows, run_row_table, run_embedding_bag, run_table_batch, run_topk, run_item_index,
                run_quantize_matrix, run_quantized_matrix, run_from_gguf]


RUNS_LIMIT = next((int(arg.split("=", 1)[1]) for arg in sys.argv if arg.startswith("-runs=")), None)
REPORT_EVERY = 5000


def one_input(data):
    total = sum(RUN.values())
    if total and (total % REPORT_EVERY == 0):
        report()
    try:
        _one_input(data)
    finally:
        if RUNS_LIMIT is not None and sum(RUN.values()) == RUNS_LIMIT:
            report()               # libFuzzer exits without running atexit handlers


def _one_input(data):
    b = Bytes(data)
    entry = b.pick(ENTRY_POINTS)
    backend = b.pick(["cpu", "cpu", "reference"])
    name = entry.__name__.removeprefix("run_")
    RUN[name] += 1
    try:
        with np.errstate(all="ignore"), use_backend(backend):
            entry(b)
    except ALLOWED as error:
        if not str(error).strip():
            raise AssertionError(f"{name}: {type(error).__name__} without a message") from error
        REFUSED[name] += 1
    if not b.unchanged():
        raise AssertionError(f"{name} modified an input in place")


def report():
    total = sum(RUN.values())
    print(f"\nfuzz_kernels: {total} inputs run, {total - sum(REFUSED.values())} accepted, "
          f"{sum(REFUSED.values())} refused (TypeError/ValueError/IndexError)")
    for name in sorted(RUN):
        print(f"  {name:20s} {RUN[name]:8d} run {REFUSED[name]:8d} refused")
    sys.stdout.flush()


if __name__ == "__main__":
    import warnings
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRITON_INTERPRET", "0")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
