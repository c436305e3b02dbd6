"""Pooled embedding-bag lookup on the CPU: one Numba parallel pass over every table of a TableBatch.

Why Numba and not Cython+OpenMP: the kernel is specialised at run time for this CPU (AVX-512
row loops, F16C/AVX-512 half conversion) with no build step, and four tiny LLVM intrinsics give
what C would (raw row pointers, half floats, software prefetch).

Layout: each table is described by one row of an int64 array (data and qparams addresses, dtype,
R, D, row stride, output column), built once per batch into `batch.prepared`, so tables of any
mix of dtypes and widths run in the same parallel loop. int8/int4 scale and bias are copied
once per table into one (R, 2) array (kept while the table's scale array lives, since
embedding_bag makes a new TableBatch per call): a row's qparams then cost one cache miss, not
two (+8 bytes a row, far less than a dequantized table). The bags of all tables form one
table-major sequence of T*B segments; it is cut into chunks of equal estimated cost (indices
weighted by row bytes, plus a per-bag cost), so skewed bag sizes still balance across threads.
"""
import threading
import weakref

import numba
import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import _numba  # noqa: F401  (thread-safe threading layer, before any parallel kernel)

FP32, FP16, BF16, INT8, INT4 = range(5)
DTYPE_CODES = {"fp32": FP32, "fp16": FP16, "bf16": BF16, "int8": INT8, "int4": INT4}
POOLING_CODES = {"sum": 0, "mean": 1, "max": 2}
MEAN, MAX = 1, 2
# Columns of the per-table description.
DATA, QPARAMS, DTYPE, ROWS, DIM, ROW_BYTES, COLUMN = range(7)
# Rows this many indices ahead are prefetched. Measured single-threaded on a 2M x 64 table:
# 1.5x (fp32) to 2.5x (fp16) faster than no prefetch; 16 and 24 ahead were no better than 8.
PREFETCH_DISTANCE = 8
CACHE_LINE = 64
# Chunks of equal estimated cost, handed out one at a time (dynamic scheduling): a thread that
# is descheduled or meets slower rows holds up one chunk, not half of the work.
CHUNKS_PER_THREAD = 16


@intrinsic
def _pointer(typingctx, address):
    """An int64 address as a void pointer, so one kernel reads tables of every dtype."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.int64), codegen


@intrinsic
def _prefetch(typingctx, address):
    """Software prefetch of the cache line at `address` (read, keep in all cache levels)."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(prefetch, [builder.inttoptr(args[0], cgutils.voidptr_t), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(types.int64), codegen


@intrinsic
def _half_to_float(typingctx, bits):
    """IEEE half bits -> float32 (vectorises to vcvtph2ps; Numba has no float16 type)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _bf16_to_float(typingctx, bits):
    """bfloat16 bits -> float32: the bits are the high half of the float32."""
    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(types.uint16), codegen


# Row accumulators: out += alpha * row (sum, mean) or out = max(out, row). For int8/int4 the
# row is codes * scale + bias, dequantized in registers: out += codes * (alpha*scale) + alpha*bias.

@njit(cache=True, inline="always")
def _row_fp32(out, address, dim, alpha, scale, bias, is_max):
    row = carray(_pointer(address), dim, np.float32)
    if is_max:
        for d in range(dim):
            out[d] = out[d] if out[d] >= row[d] else row[d]
    else:
        for d in range(dim):
            out[d] += alpha * row[d]


@njit(cache=True, inline="always")
def _row_fp16(out, address, dim, alpha, scale, bias, is_max):
    row = carray(_pointer(address), dim, np.uint16)
    if is_max:
        for d in range(dim):
            v = _half_to_float(row[d])
            out[d] = out[d] if out[d] >= v else v
    else:
        for d in range(dim):
            out[d] += alpha * _half_to_float(row[d])


@njit(cache=True, inline="always")
def _row_bf16(out, address, dim, alpha, scale, bias, is_max):
    row = carray(_pointer(address), dim, np.uint16)
    if is_max:
        for d in range(dim):
            v = _bf16_to_float(row[d])
            out[d] = out[d] if out[d] >= v else v
    else:
        for d in range(dim):
            out[d] += alpha * _bf16_to_float(row[d])


@njit(cache=True, inline="always")
def _row_int8(out, address, dim, alpha, scale, bias, is_max):
    codes = carray(_pointer(address), dim, np.uint8)
    if is_max:
        for d in range(dim):
            v = np.float32(codes[d]) * scale + bias
            out[d] = out[d] if out[d] >= v else v
    else:
        a, c = alpha * scale, alpha * bias
        for d in range(dim):
            out[d] += np.float32(codes[d]) * a + c


@njit(cache=True, inline="always")
def _row_int4(out, address, dim, alpha, scale, bias, is_max):
    # One byte holds codes 2j (low nibble) and 2j+1 (high nibble): loop over bytes so the
    # loads stay contiguous, the odd last code of an odd D after it.
    packed = carray(_pointer(address), (dim + 1) // 2, np.uint8)
    a, c = (scale, bias) if is_max else (alpha * scale, alpha * bias)
    for j in range(dim // 2):
        low = np.float32(packed[j] & 15) * a + c
        high = np.float32(packed[j] >> 4) * a + c
        if is_max:
            out[2 * j] = out[2 * j] if out[2 * j] >= low else low
            out[2 * j + 1] = out[2 * j + 1] if out[2 * j + 1] >= high else high
        else:
            out[2 * j] += low
            out[2 * j + 1] += high
    if dim & 1:
        last = np.float32(packed[dim // 2] & 15) * a + c
        if is_max:
            out[dim - 1] = out[dim - 1] if out[dim - 1] >= last else last
        else:
            out[dim - 1] += last


@njit(cache=True, inline="always")
def _pool_bag(accumulate_row, out, acc, indices, weights, weighted, start, end, prefetch_end, table, pooling):
    """Pool indices[start:end] of one table into out (its D-wide slice of an output row).

    Rows are summed into `acc`, a scratch array of the calling thread, then written to out:
    a little faster (~7% per row measured) than accumulating in the output row itself.
    """
    rows, dim, row_bytes, data, qparams_address = table[ROWS], table[DIM], table[ROW_BYTES], table[DATA], table[QPARAMS]
    quantized = table[DTYPE] >= INT8
    qparams = carray(_pointer(qparams_address), (rows if quantized else 0, 2), np.float32)
    is_max = pooling == MAX
    acc = acc[:dim]
    acc[:] = -np.inf if is_max else np.float32(0)
    count = 0
    for i in range(start, end):
        ahead = i + PREFETCH_DISTANCE
        if ahead < prefetch_end:
            r = indices[ahead]
            if r >= 0 and r < rows:
                for line in range(0, row_bytes, CACHE_LINE):
                    _prefetch(data + r * row_bytes + line)
                if quantized:
                    _prefetch(qparams_address + 8 * r)
        r = indices[i]
        if r < 0 or r >= rows:  # -1 padding, or out of range with bounds="skip"
            continue
        count += 1
        alpha = weights[i] if weighted else np.float32(1)
        scale = qparams[r, 0] if quantized else np.float32(1)
        bias = qparams[r, 1] if quantized else np.float32(0)
        accumulate_row(acc, data + r * row_bytes, dim, alpha, scale, bias, is_max)
    if count == 0:
        out[:] = 0
    else:
        inverse = np.float32(1) / np.float32(count) if pooling == MEAN else np.float32(1)
        for d in range(dim):
            out[d] = acc[d] * inverse


@njit(cache=True)
def _chunk_starts(offsets, bags_per_table, tables, n_chunks):
    """Cut the T*B table-major segments into n_chunks runs of about equal estimated cost.

    cost(segment s) = sum over earlier tables + within its table: indices * (row bytes + 64)
    + bags * (4*D + 64); monotone in s, so each chunk start is a binary search.
    """
    n_tables = tables.shape[0]
    B = bags_per_table
    index_cost = np.empty(n_tables, np.float64)
    bag_cost = np.empty(n_tables, np.float64)
    table_cost = np.zeros(n_tables + 1, np.float64)
    for t in range(n_tables):
        index_cost[t] = tables[t, ROW_BYTES] + CACHE_LINE
        bag_cost[t] = 4 * tables[t, DIM] + CACHE_LINE
        n_indices = offsets[(t + 1) * B] - offsets[t * B]
        table_cost[t + 1] = table_cost[t] + n_indices * index_cost[t] + B * bag_cost[t]
    starts = np.empty(n_chunks + 1, np.int64)
    starts[0], starts[n_chunks] = 0, n_tables * B
    for c in range(1, n_chunks):
        goal = table_cost[n_tables] * c / n_chunks
        low, high = 0, n_tables * B  # first segment whose cost prefix reaches goal
        while low < high:
            s = (low + high) // 2
            t = s // B
            cost = table_cost[t] + (offsets[s] - offsets[t * B]) * index_cost[t] + (s - t * B) * bag_cost[t]
            if cost < goal:
                low = s + 1
            else:
                high = s
        starts[c] = max(low, starts[c - 1])
    return starts


@njit(cache=True, parallel=True)
def _lookup_kernel(indices, offsets, weights, weighted, bags_per_table, pooling, tables, chunk_starts, out):
    B = bags_per_table
    max_dim = tables[:, DIM].max()
    for chunk in prange(chunk_starts.shape[0] - 1):
        acc = np.empty(max_dim, np.float32)
        for segment in range(chunk_starts[chunk], chunk_starts[chunk + 1]):
            t = segment // B
            table = tables[t]
            out_row = out[segment - t * B, table[COLUMN]:table[COLUMN] + table[DIM]]
            start, end, prefetch_end = offsets[segment], offsets[segment + 1], offsets[(t + 1) * B]
            dtype = table[DTYPE]
            if dtype == FP32:
                _pool_bag(_row_fp32, out_row, acc, indices, weights, weighted, start, end, prefetch_end, table, pooling)
            elif dtype == FP16:
                _pool_bag(_row_fp16, out_row, acc, indices, weights, weighted, start, end, prefetch_end, table, pooling)
            elif dtype == BF16:
                _pool_bag(_row_bf16, out_row, acc, indices, weights, weighted, start, end, prefetch_end, table, pooling)
            elif dtype == INT8:
                _pool_bag(_row_int8, out_row, acc, indices, weights, weighted, start, end, prefetch_end, table, pooling)
            else:
                _pool_bag(_row_int4, out_row, acc, indices, weights, weighted, start, end, prefetch_end, table, pooling)


_side_by_side_qparams = {}  # id(table.scale) -> (R, 2) float32 [scale, bias]; dropped with table.scale
_side_by_side_lock = threading.Lock()


def _qparams(table):
    """An int8/int4 table's scale and bias side by side, one cache line a row; built once per table."""
    key = id(table.scale)
    with _side_by_side_lock:
        qparams = _side_by_side_qparams.get(key)
    if qparams is None:
        host = table.numpy()
        qparams = np.empty((table.shape[0], 2), np.float32)
        qparams[:, 0], qparams[:, 1] = host.scale, host.bias
        with _side_by_side_lock:
            if key not in _side_by_side_qparams:
                _side_by_side_qparams[key] = qparams
                weakref.finalize(table.scale, _side_by_side_qparams.pop, key, None)
            qparams = _side_by_side_qparams[key]
    return qparams


def _prepare(batch):
    """Host views of the tables and their int64 descriptions, built once per batch."""
    with batch.lock:
        prepared = batch.prepared.get("cpu")
        if prepared is None:
            arrays, description, column = [], np.zeros((batch.num_tables, 7), np.int64), 0
            for t, table in enumerate(batch.tables):
                rows, dim = table.shape
                data = np.ascontiguousarray(table.numpy().data)
                qparams = np.zeros((0, 2), np.float32) if table.scale is None else _qparams(table)
                arrays += [data, qparams]
                description[t] = (data.ctypes.data, qparams.ctypes.data, DTYPE_CODES[table.dtype],
                                  rows, dim, data.strides[0] if rows else 0, column)
                column += dim
            # `arrays` keeps every buffer whose address is in `description` alive.
            prepared = batch.prepared["cpu"] = (arrays, description, column)
    return prepared


def lookup(batch, indices, offsets, bags_per_table, pooling, per_sample_weights, bounds):
    """Same contract as reference.lookup. Out-of-range indices are padding in both bounds modes
    (with bounds="error" the dispatcher has already rejected them)."""
    _, tables, total_dim = _prepare(batch)
    out = np.empty((bags_per_table, total_dim), np.float32)
    if bags_per_table == 0:
        return out
    n_chunks = min(tables.shape[0] * bags_per_table, numba.get_num_threads() * CHUNKS_PER_THREAD)
    chunk_starts = _chunk_starts(offsets, bags_per_table, tables, n_chunks)
    weighted = per_sample_weights is not None
    weights = per_sample_weights if weighted else np.zeros(0, np.float32)
    previous_chunksize = numba.set_parallel_chunksize(1)
    try:
        _lookup_kernel(indices, offsets, weights, weighted, bags_per_table, POOLING_CODES[pooling], tables,
                       chunk_starts, out)
    finally:
        numba.set_parallel_chunksize(previous_chunksize)
    return out
