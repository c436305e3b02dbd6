# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Fused top-k scan (C in _topk_scan.h): AVX-512 kernels (int8 pre-selection with VNNI), or portable C.

`best_isa()` is the best level this CPU runs: 0 portable, 1 AVX-512, 2 AVX-512 with VNNI; `scan`
takes any level up to it.
"""
from libc.stdint cimport int64_t, uint8_t


cdef extern from "_topk_scan.h" nogil:
    int tks_best_isa()
    int tks_scan(int isa, int kind, const void *rows, const float *scale, const float *bias,
                 int64_t n_rows, int64_t dim, const float *queries, int64_t B, int metric, int64_t k, int64_t tile_rows,
                 const int64_t *excl_ptr, const int64_t *excl_ids, int64_t n_chunks, int64_t cap,
                 int64_t *keys_out, int64_t *counts_out, uint8_t *bad_out, int num_threads)


def best_isa():
    """2 with AVX-512 F/BW/DQ/VL and VNNI, 1 with AVX-512 F/BW/DQ/VL only, else 0."""
    return tks_best_isa()


def scan(int isa, int kind, rows, const float[::1] scale, const float[::1] bias,
         const float[:, ::1] queries, int metric, int64_t k, int64_t tile_rows,
         const int64_t[::1] excl_ptr, const int64_t[::1] excl_ids, int64_t n_chunks, int64_t[:, :, ::1] keys,
         int64_t[:, ::1] counts, uint8_t[::1] bad, int num_threads):
    """`rows` against every query, in n_chunks runs of whole tiles shared among num_threads threads:
    each thread's candidate keys per query in keys[thread] (counts[thread]; bad[thread] when a score
    came out NaN or inf).

    rows: N C-contiguous rows of float32 (kind 0, (N, d)), uint16 bits of fp16 (1) / bf16 (2) ((N, d)), or
    uint8 codes of int8 (3, (N, d)) / int4 (4, (N, (d + 1) // 2)) with scale, bias (N,); else scale and
    bias are empty.
    excl_ptr (B + 1) / excl_ids: the exclusion CSR (query q's ids, any order, at excl_ids[excl_ptr[q]:excl_ptr[q + 1]];
    ids outside [0, N) are ignored), or excl_ptr of length 0 for none. keys (num_threads, B, cap) with cap > k;
    counts (num_threads, B) and bad (num_threads) zero on entry.
    """
    if isa < 0 or isa > tks_best_isa():
        raise ValueError(f"scan: isa {isa} is not one this CPU runs (best: {tks_best_isa()})")
    cdef const float[:, ::1] rows_f32
    cdef const unsigned short[:, ::1] rows_u16
    cdef const uint8_t[:, ::1] rows_u8
    cdef const void *rows_ptr = NULL
    cdef int64_t n_rows, row_width, dim = queries.shape[1]
    if kind == 0:
        rows_f32 = rows
        n_rows, row_width = rows_f32.shape[0], rows_f32.shape[1]
        rows_ptr = &rows_f32[0, 0]
    elif kind == 1 or kind == 2:
        rows_u16 = rows
        n_rows, row_width = rows_u16.shape[0], rows_u16.shape[1]
        rows_ptr = &rows_u16[0, 0]
    elif kind == 3 or kind == 4:
        rows_u8 = rows
        n_rows, row_width = rows_u8.shape[0], rows_u8.shape[1]
        rows_ptr = &rows_u8[0, 0]
    else:
        raise ValueError(f"scan: unknown corpus kind {kind}")
    if row_width != (dim if kind != 4 else (dim + 1) // 2):
        raise ValueError("scan: rows do not hold d values a row (d from the queries)")
    cdef bint quantized = kind >= 3
    if scale.shape[0] != (n_rows if quantized else 0) or bias.shape[0] != scale.shape[0]:
        raise ValueError("scan: scale and bias must have one value a row for int8/int4, none else")
    cdef int64_t B = queries.shape[0], slots = keys.shape[0], cap = keys.shape[2]
    if metric not in (0, 1, 2) or k < 1 or tile_rows < 1 or cap <= k or n_chunks < 1 or num_threads < 1:
        raise ValueError("scan: bad metric, k, tile_rows, cap, chunk or thread count")
    if slots != num_threads or keys.shape[1] != B or counts.shape[0] != slots or counts.shape[1] != B \
            or bad.shape[0] != slots:
        raise ValueError("scan: output buffers do not match (num_threads, B, cap)")
    if n_rows > 0xFFFFFFFF:
        raise ValueError("scan: at most 2**32 - 1 rows (ids are 32 bits in the candidate keys)")
    cdef const int64_t *ptr = NULL
    cdef const int64_t *ids = NULL
    cdef int64_t q, n_ids = excl_ids.shape[0]
    if excl_ptr.shape[0]:
        if excl_ptr.shape[0] != B + 1:
            raise ValueError("scan: excl_ptr must have B + 1 offsets")
        if excl_ptr[0] < 0 or excl_ptr[B] > n_ids:
            raise ValueError("scan: excl_ptr out of range")
        for q in range(B):   # non-decreasing too: C then reads only excl_ids[0:n_ids]
            if excl_ptr[q + 1] < excl_ptr[q]:
                raise ValueError("scan: excl_ptr decreases")
        ptr = &excl_ptr[0]
        if n_ids:
            ids = &excl_ids[0]
    if B == 0 or n_rows == 0:
        counts[:, :] = 0
        bad[:] = 0
        return
    cdef int status
    with nogil:
        status = tks_scan(isa, kind, rows_ptr, &scale[0] if quantized else NULL,
                          &bias[0] if quantized else NULL, n_rows, dim, &queries[0, 0], B, metric, k, tile_rows,
                          ptr, ids, n_chunks, cap, &keys[0, 0, 0], &counts[0, 0], &bad[0], num_threads)
    if status:
        raise MemoryError("topk scan: out of memory for the query panels or tile buffers")
