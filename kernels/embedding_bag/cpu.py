"""Pooled embedding-bag lookup on the CPU: one C + OpenMP pass over every table of a TableBatch
(bindings/_embedding_bag.h drives the row loops of _embedding_bag_simd.h, compiled for every CPU
vector level; the call runs at kernels._cpu.cpu_level()).

The OpenMP threads follow kernels._cpu.kernel_threads(), as for the other CPU kernels (calls under
about 3 MB of rows run on the calling thread). Indices are checked in the kernel's own pass, so
bounds="error" costs no separate scan. Why C and what was measured: bench/notes/cpu-embedding.md.

Layout: each table is described by one row of an int64 array (data and qparams addresses, dtype,
R, D, row strides, output column), built once per batch into `batch.prepared`, so tables of any
mix of dtypes and widths run in the same parallel loop. Rows are read in place (any row stride).
int8/int4 scale and bias are read in place when they already sit side by side (FBGEMM's fused
rows: codes, scale, bias in one buffer); otherwise they are copied once into one (R, 2) array,
kept per pair of scale and bias arrays while both live (embedding_bag makes a new TableBatch
per call), so a row's qparams cost one cache miss, not two (+8 bytes a row). Values written
into those arrays in place are therefore not seen: give the table new scale and bias arrays.
"""
import threading
import weakref

import numpy as np

from ...bindings import _embedding_bag
from ...bindings._cpu import DTYPE_CODES, POOLING_CODES
from .._backend import to_numpy
from .._cpu import cpu_level, kernel_threads
from .._validate import check_bag_indices
from ..quantize_rows import has_contiguous_rows

# The columns of a table's description, the C kernel's EB_DATA..EB_QPARAMS_STRIDE.
DESCRIPTION_COLUMNS = ("data", "qparams", "dtype", "rows", "dim", "row_bytes", "column", "qparams_stride")


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


def lookup(batch, indices, offsets, bags_per_table, pooling, per_sample_weights, bounds):
    """Same contract as reference.lookup, except that with bounds="error" the range check runs here,
    in the kernel's pass (the dispatcher leaves it to this backend): IndexError names the first
    bad index."""
    _, tables, total_dim = _prepare(batch)
    out = np.empty((bags_per_table, total_dim), np.float32)
    bad = _embedding_bag.lookup(tables, indices, offsets, per_sample_weights, bags_per_table,
                                POOLING_CODES[pooling], bounds == "error", out, kernel_threads(), cpu_level())
    if bad >= 0:  # rescan for the message: the kernel's chunks stop at their own first bad index
        check_bag_indices(indices, offsets, batch.rows, bags_per_table, batch.table_names)
        raise RuntimeError(f"embedding_bag: the CPU kernel flagged indices[{bad}] = {indices[bad]}, "
                           "which the range check accepts (a kernel bug)")
    return out
