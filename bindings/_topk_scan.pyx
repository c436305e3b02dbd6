# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Fused similarity top-k (C in _topk_scan.h, vector kernels in _topk_scan_simd.h), at a CPU vector
level: 0 baseline .. 3 AVX-512 VNNI (recscore.kernels._cpu.LEVELS); ValueError above what this CPU runs.
"""
from libc.stdint cimport int64_t, uint8_t


cdef extern from "_topk_scan.h" nogil:
    int RS_OK, RS_ERR_MEMORY, RS_ERR_LEVEL, TKS_ERR_NON_FINITE
    int TKS_FP32, TKS_FP16, TKS_BF16, TKS_INT8, TKS_INT4
    int TKS_IP, TKS_COSINE, TKS_L2, TKS_METRICS
    int rs_cpu_level()
    int rs_level_ok(int level)
    int64_t tks_tile_rows(int level, int kind, int64_t B, int64_t dim)
    int tks_topk(int level, int kind, const void *rows, const float *scale, const float *bias, int64_t n_rows,
                 int64_t dim, const float *queries, int64_t B, int metric, int64_t k, const int64_t *excl_ptr,
                 const int64_t *excl_ids, int int8_bound, int num_threads, float *scores_out, int64_t *ids_out)


cdef _check_level(int level):
    if not rs_level_ok(level):
        raise ValueError(f"topk scan: CPU level {level} is not one this CPU runs (0 .. {rs_cpu_level()})")


def tile_rows(int level, int kind, int64_t B, int64_t dim):
    """Corpus rows a tile of the scan at `level` for B queries of dim values over rows of dtype code `kind`."""
    _check_level(level)
    return tks_tile_rows(level, kind, B, dim)


def scan(int level, int kind, rows, const float[::1] scale, const float[::1] bias, const float[:, ::1] queries,
         int metric, int64_t k, const int64_t[::1] excl_ptr, const int64_t[::1] excl_ids, int num_threads,
         bint int8_bound, float[:, ::1] scores, int64_t[:, ::1] ids):
    """The k best rows per query into scores, ids (B, k), best first (ties: the smaller id; unfilled
    slots id -1, score -inf, +inf for l2), on up to num_threads threads. ValueError when a score comes
    out NaN or inf ("corpus contains NaN or inf").

    kind, metric: codes of recscore.bindings._cpu.DTYPE_CODES, METRIC_CODES.
    rows: N C-contiguous rows of float32 (fp32, (N, d)), uint16 bits of fp16 / bf16 ((N, d)), or uint8
    codes of int8 ((N, d)) / int4 ((N, (d + 1) // 2)) with scale, bias (N,); else scale and bias are empty.
    excl_ptr (B + 1) / excl_ids: the exclusion CSR (query q's ids, any order, at excl_ids[excl_ptr[q]:excl_ptr[q + 1]];
    ids outside [0, N) are ignored), or excl_ptr of length 0 for none.
    int8_bound: int8 rows with fewer than 11 queries skip groups by an exact integer bound (off: all scored in float).
    """
    _check_level(level)
    cdef const float[:, ::1] rows_f32
    cdef const unsigned short[:, ::1] rows_u16
    cdef const uint8_t[:, ::1] rows_u8
    cdef const void *rows_ptr = NULL
    cdef int64_t n_rows, row_width, dim = queries.shape[1], B = queries.shape[0]
    if kind == TKS_FP32:
        rows_f32 = rows
        n_rows, row_width = rows_f32.shape[0], rows_f32.shape[1]
        rows_ptr = &rows_f32[0, 0] if n_rows and row_width else NULL
    elif kind == TKS_FP16 or kind == TKS_BF16:
        rows_u16 = rows
        n_rows, row_width = rows_u16.shape[0], rows_u16.shape[1]
        rows_ptr = &rows_u16[0, 0] if n_rows and row_width else NULL
    elif kind == TKS_INT8 or kind == TKS_INT4:
        rows_u8 = rows
        n_rows, row_width = rows_u8.shape[0], rows_u8.shape[1]
        rows_ptr = &rows_u8[0, 0] if n_rows and row_width else NULL
    else:
        raise ValueError(f"topk scan: unknown corpus kind {kind}")
    if row_width != (dim if kind != TKS_INT4 else (dim + 1) // 2):
        raise ValueError("topk scan: rows do not hold d values a row (d from the queries)")
    cdef bint quantized = kind == TKS_INT8 or kind == TKS_INT4
    if scale.shape[0] != (n_rows if quantized else 0) or bias.shape[0] != scale.shape[0]:
        raise ValueError("topk scan: scale and bias must have one value a row for int8/int4, none else")
    if not 0 <= metric < TKS_METRICS or k < 1 or num_threads < 1:
        raise ValueError("topk scan: bad metric, k or thread count")
    if scores.shape[0] != B or scores.shape[1] != k or ids.shape[0] != B or ids.shape[1] != k:
        raise ValueError("topk scan: scores and ids must be (B, k)")
    if n_rows > 0xFFFFFFFF:
        raise ValueError("topk scan: at most 2**32 - 1 rows (ids are 32 bits in the candidate keys)")
    cdef const int64_t *ptr = NULL
    cdef const int64_t *ids_in = NULL
    cdef int64_t q, n_ids = excl_ids.shape[0]
    if excl_ptr.shape[0]:
        if excl_ptr.shape[0] != B + 1:
            raise ValueError("topk scan: excl_ptr must have B + 1 offsets")
        if excl_ptr[0] < 0 or excl_ptr[B] > n_ids:
            raise ValueError("topk scan: excl_ptr out of range")
        for q in range(B):   # non-decreasing too: C then reads only excl_ids[0:n_ids]
            if excl_ptr[q + 1] < excl_ptr[q]:
                raise ValueError("topk scan: excl_ptr decreases")
        ptr = &excl_ptr[0]
        if n_ids:
            ids_in = &excl_ids[0]
    if B == 0:
        return
    cdef int status
    with nogil:
        status = tks_topk(level, kind, rows_ptr, &scale[0] if quantized and n_rows else NULL,
                          &bias[0] if quantized and n_rows else NULL, n_rows, dim, &queries[0, 0] if dim else NULL,
                          B, metric, k, ptr, ids_in, int8_bound, num_threads, &scores[0, 0], &ids[0, 0])
    if status == RS_ERR_LEVEL:
        _check_level(level)
    if status == RS_ERR_MEMORY:
        raise MemoryError("topk scan: out of memory for the query panels or tile buffers")
    if status == TKS_ERR_NON_FINITE:
        raise ValueError("corpus contains NaN or inf (a score came out non-finite)")


def codes():
    """The dtype and metric codes this module's C code was compiled with (tests/test_codes.py)."""
    return {"dtype": {"fp32": TKS_FP32, "fp16": TKS_FP16, "bf16": TKS_BF16, "int8": TKS_INT8, "int4": TKS_INT4},
            "metric": {"ip": TKS_IP, "cosine": TKS_COSINE, "l2": TKS_L2}}
