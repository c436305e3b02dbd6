# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Pooled embedding-bag lookup over the tables of a TableBatch (C in _embedding_bag.h and
_embedding_bag_simd.h). Every size and code the C code indexes by is checked here (ValueError); the
addresses in the table descriptions, and the rows behind them, are the caller's (see
recscore.kernels.embedding_bag.cpu).
"""
from libc.stdint cimport int32_t, int64_t

from ._checks import first_bad_offset

ctypedef fused index_t:
    int32_t
    int64_t


cdef extern from "_embedding_bag.h" nogil:
    int EB_FIELDS, EB_DTYPE, EB_ROWS, EB_DIM, EB_COLUMN
    int EB_FP32, EB_FP16, EB_BF16, EB_INT8, EB_INT4, EB_DTYPES
    int EB_SUM, EB_MEAN, EB_MAX, EB_POOLINGS
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

    tables: (T, EB_FIELDS) descriptions (cpu.py); offsets: T*B + 1, table-major;
    weights: per index, or None.
    """
    cdef eb_call call
    cdef int64_t t, n_tables = tables.shape[0], bad
    cdef int status
    if tables.shape[1] != EB_FIELDS:
        raise ValueError(f"embedding_bag: tables must have {EB_FIELDS} columns, got {tables.shape[1]}")
    if bags_per_table < 0 or offsets.shape[0] != n_tables * bags_per_table + 1:
        raise ValueError(f"embedding_bag: offsets must have tables * bags_per_table + 1 = "
                         f"{n_tables * bags_per_table + 1} entries, got {offsets.shape[0]}")
    if first_bad_offset(offsets, indices.shape[0]) >= 0:
        raise ValueError(f"embedding_bag: offsets must start at 0, not decrease, and end at len(indices) "
                         f"= {indices.shape[0]}")
    if weights is not None and weights.shape[0] != indices.shape[0]:
        raise ValueError(f"embedding_bag: weights must have one value per index ({indices.shape[0]}), "
                         f"got {weights.shape[0]}")
    if out.shape[0] != bags_per_table:
        raise ValueError(f"embedding_bag: out must have bags_per_table = {bags_per_table} rows, got {out.shape[0]}")
    if not 0 <= pooling < EB_POOLINGS:
        raise ValueError(f"embedding_bag: pooling code {pooling} is not one of 0..{EB_POOLINGS - 1}")
    if num_threads < 1:
        raise ValueError(f"embedding_bag: num_threads must be at least 1, got {num_threads}")
    for t in range(n_tables):
        if not 0 <= tables[t, EB_DTYPE] < EB_DTYPES:
            raise ValueError(f"embedding_bag: tables[{t}] has dtype code {tables[t, EB_DTYPE]}, not one of "
                             f"0..{EB_DTYPES - 1}")
        if tables[t, EB_ROWS] < 0 or tables[t, EB_DIM] < 0:
            raise ValueError(f"embedding_bag: tables[{t}] has a negative row count or D")
        if tables[t, EB_COLUMN] < 0 or tables[t, EB_DIM] > out.shape[1] - tables[t, EB_COLUMN]:
            raise ValueError(f"embedding_bag: out has {out.shape[1]} columns, but tables[{t}] writes columns "
                             f"{tables[t, EB_COLUMN]}..{tables[t, EB_COLUMN] + tables[t, EB_DIM] - 1}")
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


def codes():
    """The dtype and pooling codes this module's C code was compiled with (tests/test_codes.py)."""
    return {"dtype": {"fp32": EB_FP32, "fp16": EB_FP16, "bf16": EB_BF16, "int8": EB_INT8, "int4": EB_INT4},
            "pooling": {"sum": EB_SUM, "mean": EB_MEAN, "max": EB_MAX}}
