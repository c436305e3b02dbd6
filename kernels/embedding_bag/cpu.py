"""Pooled embedding-bag lookup on the CPU: one C + OpenMP pass over every table of a TableBatch
(bindings/_embedding_bag.h: AVX-512 row loops; plain C loops on CPUs without AVX-512).

Why C and not Numba (the previous kernel): the FBGEMM-style row loop needs the pooled row held
in zmm registers across a bag, masked loads for any D, and software prefetches per row (into
L2 far ahead, again half as far for rows of 128+ bytes in tables over half the L3) across bag
boundaries. Numba kept the accumulator in memory, cost 13 cycles a row in cache against FBGEMM's
9 and 102 ns a row from DRAM against 67, and
compiled for 22-25 s per index dtype on a cold cache. The C kernel takes 2.4 ns a row in cache
(D=64 fp32, as torch) and, on one thread from DRAM, 24-28 ns after calls of its own (18 ns with
the second L2 prefetch; torch 38-40) but 38-42 ns right after a torch call (see EB_PREFETCH_BYTES
and EB_RETRY_MIN_TABLE_BYTES in the .h), and the first call now costs
about 0.3 s, nearly all of it importing numba (whose thread
count, numba.get_num_threads(), sets the OpenMP threads, as for the other CPU kernels; calls
under about 3 MB of rows run on the calling thread, see EB_PARALLEL_MIN_COST). It checks
indices in its own pass, so bounds="error" costs no separate scan.

Layout: each table is described by one row of an int64 array (data and qparams addresses, dtype,
R, D, row strides, output column), built once per batch into `batch.prepared`, so tables of any
mix of dtypes and widths run in the same parallel loop. Rows are read in place (any row stride).
int8/int4 scale and bias are read in place when they already sit side by side (FBGEMM's fused
rows: codes, scale, bias in one buffer; a row then costs one memory access, measured 1.4x
faster than codes + separate qparams); otherwise they are copied once into one (R, 2) array,
kept per pair of scale and bias arrays while both live (embedding_bag makes a new TableBatch
per call), so a row's qparams cost one cache miss, not two (+8 bytes a row). Values written
into those arrays in place are therefore not seen: give the table new scale and bias arrays.
"""
import threading
import weakref

import numba
import numpy as np

from ...bindings import _embedding_bag
from .._backend import to_numpy, warn_once
from .._validate import check_bag_indices
from ..quantize_rows import has_contiguous_rows

DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3, "int4": 4}
POOLING_CODES = {"sum": 0, "mean": 1, "max": 2}
# The columns of a table's description, the C kernel's EB_DATA..EB_QPARAMS_STRIDE.
DESCRIPTION_COLUMNS = ("data", "qparams", "dtype", "rows", "dim", "row_bytes", "column", "qparams_stride")
HAS_AVX512 = _embedding_bag.has_avx512()


_side_by_side_qparams = {}  # (id(scale), id(bias)) -> (R, 2) float32 [scale, bias]; dropped with either
_side_by_side_finalizers = {}  # the same key -> the two weakref.finalize watching scale and bias
_side_by_side_lock = threading.Lock()


def _drop_qparams(key):
    """When the scale or the bias array goes (its id may then be reused): forget the pair. Runs at
    deallocation, perhaps inside a locked block of this thread: single dict operations only."""
    _side_by_side_qparams.pop(key, None)
    for finalizer in _side_by_side_finalizers.pop(key, ()):
        finalizer.detach()


def _qparams(table):
    """An int8/int4 table's scale and bias side by side, one cache line a row; built once per pair."""
    scale, bias = table.scale, table.bias   # read once: another thread may swap them
    key = (id(scale), id(bias))
    qparams = _side_by_side_qparams.get(key)
    if qparams is None:
        qparams = np.empty((table.shape[0], 2), np.float32)
        qparams[:, 0], qparams[:, 1] = to_numpy(scale), to_numpy(bias)
        with _side_by_side_lock:
            if key not in _side_by_side_qparams:
                _side_by_side_qparams[key] = qparams
                _side_by_side_finalizers[key] = (weakref.finalize(scale, _drop_qparams, key),
                                                 weakref.finalize(bias, _drop_qparams, key))
            qparams = _side_by_side_qparams[key]
    return qparams


def _rows_of(array):
    """The table's storage as is when its rows are contiguous (any row stride >= 0), else a copy."""
    return array if has_contiguous_rows(array) else np.ascontiguousarray(array)


def _prepare(batch):
    """Host views of the tables and their int64 descriptions (the C kernel's layout), built once per batch.

    int8/int4 qparams are read in place when scale and bias already sit side by side with one
    stride (FBGEMM's fused rows: codes, scale, bias in one buffer); otherwise from the (R, 2) copy.
    """
    with batch.lock:
        prepared = batch.prepared.get("cpu")
        if prepared is None:
            arrays, description, column = [], np.zeros((batch.num_tables, len(DESCRIPTION_COLUMNS)), np.int64), 0
            for t, table in enumerate(batch.tables):
                host = table.numpy()
                rows, dim = table.shape
                data = _rows_of(host.data)
                if host.scale is None:
                    qparams, qparams_address, qparams_stride = None, 0, 0
                elif (host.scale.strides == host.bias.strides
                      and host.bias.ctypes.data == host.scale.ctypes.data + 4):
                    qparams, qparams_address, qparams_stride = host.scale, host.scale.ctypes.data, host.scale.strides[0]
                else:
                    qparams = _qparams(table)
                    qparams_address, qparams_stride = qparams.ctypes.data, qparams.strides[0]
                arrays += [data, qparams]
                description[t] = (data.ctypes.data, qparams_address, DTYPE_CODES[table.dtype], rows, dim,
                                  data.strides[0], column, qparams_stride)
                column += dim
            # `arrays` keeps every buffer whose address is in `description` alive.
            prepared = batch.prepared["cpu"] = (arrays, description, column)
    return prepared


def lookup(batch, indices, offsets, bags_per_table, pooling, per_sample_weights, bounds, *, portable=not HAS_AVX512):
    """Same contract as reference.lookup, except that with bounds="error" the range check runs here,
    in the kernel's pass (the dispatcher leaves it to this backend): IndexError names the first
    bad index. portable=True runs the plain C loops (the default on CPUs without AVX-512)."""
    if portable and not HAS_AVX512:
        warn_once("embedding-avx512", "embedding_bag: this CPU has no AVX-512; the lookup runs as portable C (slower)")
    _, tables, total_dim = _prepare(batch)
    out = np.empty((bags_per_table, total_dim), np.float32)
    bad = _embedding_bag.lookup(tables, indices, offsets, per_sample_weights, bags_per_table,
                                POOLING_CODES[pooling], bounds == "error", out, numba.get_num_threads(), portable)
    if bad >= 0:  # rescan for the message: the kernel's chunks stop at their own first bad index
        check_bag_indices(indices, offsets, batch.rows, bags_per_table, batch.table_names)
        raise AssertionError(f"embedding_bag kernel flagged index position {bad}, which the check passes")
    return out
