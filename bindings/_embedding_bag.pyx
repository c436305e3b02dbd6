# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Pooled embedding-bag lookup over the tables of a TableBatch (C in _embedding_bag.h).

`has_avx512()` says whether this CPU runs the AVX-512 loops; `lookup(..., portable=True)` runs
the plain C loops instead (any CPU). The caller validates everything (see
recscore.kernels.embedding_bag.cpu): the table descriptions hold raw addresses.
"""
from libc.stdint cimport int32_t, int64_t

ctypedef fused index_t:
    int32_t
    int64_t


cdef extern from "_embedding_bag.h" nogil:
    int EB_FIELDS
    ctypedef struct eb_call:
        const int64_t *tables
        const void *indices
        int index64
        const int64_t *offsets
        const float *weights
        int64_t bags_per_table
        int pooling, check, portable
        float *out
        int64_t out_stride
    int eb_has_avx512()
    int64_t eb_lookup(const eb_call *call, int64_t n_tables, int num_threads)


def has_avx512():
    """True when the CPU has AVX-512 F/BW/VL, F16C and FMA."""
    return bool(eb_has_avx512())


def lookup(const int64_t[:, ::1] tables, const index_t[::1] indices, const int64_t[::1] offsets,
           const float[::1] weights, int64_t bags_per_table, int pooling, bint check, float[:, ::1] out,
           int num_threads, bint portable):
    """Pool into out (B, sum of D) the bags of every table; returns -1, or with `check` the position
    of an index outside [-1, R) (the call stops there; not necessarily the first such position).

    tables: (T, EB_FIELDS) descriptions (cpu.py); offsets: T*B + 1, table-major, validated;
    weights: per index, or None.
    """
    cdef eb_call call
    cdef int64_t n_tables = tables.shape[0], bad
    if tables.shape[1] != EB_FIELDS or offsets.shape[0] != n_tables * bags_per_table + 1 \
            or out.shape[0] != bags_per_table or offsets[offsets.shape[0] - 1] > indices.shape[0] \
            or (weights is not None and weights.shape[0] != indices.shape[0]):
        raise ValueError("embedding_bag: inconsistent shapes passed to the C kernel")
    call.tables = &tables[0, 0] if n_tables else NULL
    call.indices = &indices[0] if indices.shape[0] else NULL
    call.index64 = index_t is int64_t
    call.offsets = &offsets[0]
    call.weights = &weights[0] if weights is not None and weights.shape[0] else NULL
    call.bags_per_table = bags_per_table
    call.pooling = pooling
    call.check = check
    call.portable = portable
    call.out = &out[0, 0] if out.shape[0] and out.shape[1] else NULL
    call.out_stride = out.shape[1]
    with nogil:
        bad = eb_lookup(&call, n_tables, num_threads)
    if bad == -2:
        raise MemoryError("embedding_bag: out of memory for the work chunks")
    return bad
