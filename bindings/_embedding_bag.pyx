# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Pooled embedding-bag lookup over the tables of a TableBatch (C in _embedding_bag.h and
_embedding_bag_simd.h). The caller validates everything (see recscore.kernels.embedding_bag.cpu):
the table descriptions hold raw addresses.
"""
from libc.stdint cimport int32_t, int64_t

ctypedef fused index_t:
    int32_t
    int64_t


cdef extern from "_embedding_bag.h" nogil:
    int EB_FIELDS
    int RS_OK, RS_ERR_MEMORY, RS_ERR_LEVEL
    int rs_cpu_level()
    ctypedef struct eb_call:
        const int64_t *tables
        const void *indices
        int index64
        const int64_t *offsets
        const float *weights
        int64_t bags_per_table
        int pooling, check, level
        float *out
        int64_t out_stride
    int eb_lookup(const eb_call *call, int64_t n_tables, int num_threads, int64_t *bad_position)


def lookup(const int64_t[:, ::1] tables, const index_t[::1] indices, const int64_t[::1] offsets,
           const float[::1] weights, int64_t bags_per_table, int pooling, bint check, float[:, ::1] out,
           int num_threads, int level):
    """Pool into out (B, sum of D) the bags of every table at CPU vector level `level` (0 baseline ..
    3 AVX-512 VNNI; ValueError above what this CPU runs); returns -1, or with `check` the position of
    an index outside [-1, R) (the call stops there; not necessarily the first such position).

    tables: (T, EB_FIELDS) descriptions (cpu.py); offsets: T*B + 1, table-major, validated;
    weights: per index, or None.
    """
    cdef eb_call call
    cdef int64_t n_tables = tables.shape[0], bad
    cdef int status
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
    call.level = level
    call.out = &out[0, 0] if out.shape[0] and out.shape[1] else NULL
    call.out_stride = out.shape[1]
    with nogil:
        status = eb_lookup(&call, n_tables, num_threads, &bad)
    if status == RS_ERR_LEVEL:
        raise ValueError(f"embedding_bag: CPU level {level} is not available: this CPU runs levels 0..{rs_cpu_level()}")
    if status == RS_ERR_MEMORY:
        raise MemoryError("embedding_bag: out of memory for the work chunks")
    return bad
