# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""AVX-512 VNNI quantized matmul (C in _qmatmul_vnni.h): int8 activations per block of 32.

`has_vnni()` says whether this CPU runs it; the other functions must only be called when it is true.
`repack` builds the 16-row panel layout (once per matrix, `panel_bytes(fmt, N, K)` bytes) that
`panel_matmul` multiplies for M > 1 (every format id of `matmul`).
"""
from libc.stdint cimport int8_t, int64_t, uint8_t

import numpy as np


cdef extern from "_qmatmul_vnni.h" nogil:
    int qmv_has_vnni()
    int qmv_matmul(int fmt, const uint8_t *data, int64_t row_bytes, const float *scales, int64_t group_size,
                   int64_t N, int64_t K, const float *x, int64_t M, float *out, int num_threads)
    int64_t qmv_panel_bytes(int fmt, int64_t N, int64_t K)
    int qmv_repack(int fmt, const uint8_t *data, int64_t row_bytes, const float *scales, int64_t group_size,
                   int64_t N, int64_t K, uint8_t *panels, int num_threads)
    int qmv_panel_matmul(int fmt, const uint8_t *panels, int64_t N, int64_t K, const float *x, int64_t M,
                         float *out, int num_threads)


cdef bint _shapes_fit(int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales, int64_t group_size,
                     const float[:, ::1] x, float[:, ::1] out) noexcept nogil:
    """Every size the C code derives its reads from agrees, so it never reads out of bounds."""
    cdef int64_t N = out.shape[1], K = x.shape[1]
    # (weights, bytes) per block of format id fmt; int8/int4 carry their scales apart
    cdef int64_t per_block, block_bytes
    if fmt == 0 or fmt == 1:
        per_block, block_bytes = 32, (34 if fmt == 0 else 22)
    elif fmt == 2 or fmt == 3:
        per_block, block_bytes = 256, (144 if fmt == 2 else 210)
    elif fmt == 4 or fmt == 5:
        per_block, block_bytes = (1 if fmt == 4 else 2), 1
    else:
        return False
    if K == 0 or K % 32 or K % per_block or data.shape[0] != N or data.shape[1] != K // per_block * block_bytes \
            or x.shape[0] != out.shape[0]:
        return False
    if fmt == 4 or fmt == 5:
        if group_size <= 0 or group_size % 32 or K % group_size \
                or scales.shape[0] != N or scales.shape[1] != K // group_size:
            return False
        if fmt == 5 and group_size != 32 and group_size % 64:
            return False
    return True


def has_vnni():
    """True when the CPU has AVX-512 F/BW/VL and VNNI."""
    return bool(qmv_has_vnni())


def matmul(int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales, int64_t group_size,
           const float[:, ::1] x, float[:, ::1] out, int num_threads):
    """out (M, N) = x (M, K) @ W.T; W: N packed rows `data` of format id `fmt` (cpu.FORMAT_IDS: q8_0,
    q5_0, q4_k, q6_k, int8, int4), `scales` (N, K / group_size) for int8/int4, else (0, 0).
    K is a multiple of 32 (256 for q4_k and q6_k; group_size 32 or a multiple of 64 for int4).
    Shapes are checked here before any C runs (ValueError)."""
    cdef int64_t N = out.shape[1], K = x.shape[1], M = x.shape[0]
    if not _shapes_fit(fmt, data, scales, group_size, x, out):
        raise ValueError(f"qmatmul kernel: data ({data.shape[0]}, {data.shape[1]}), scales ({scales.shape[0]}, "
                         f"{scales.shape[1]}), x ({M}, {K}) and out ({out.shape[0]}, {N}) do not fit format id "
                         f"{fmt}, group_size {group_size}")
    cdef const float *scale_ptr = &scales[0, 0] if scales.shape[0] else NULL
    cdef int status
    with nogil:
        status = qmv_matmul(fmt, &data[0, 0], data.shape[1], scale_ptr, group_size, N, K, &x[0, 0], M,
                            &out[0, 0], num_threads)
    if status:
        raise MemoryError("qmatmul: out of memory for the quantized activations or tile buffers")


def panel_bytes(int fmt, int64_t N, int64_t K):
    """Bytes of the repacked panels of an (N, K) matrix of format id fmt (K a multiple of 32)."""
    return qmv_panel_bytes(fmt, N, K)


def repack(int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales, int64_t group_size, int64_t K,
           uint8_t[::1] panels, int num_threads):
    """panels (panel_bytes(fmt, N, K), zeroed) <- the N packed rows `data` of format id fmt."""
    cdef int64_t N = data.shape[0]
    if not 0 <= fmt <= 5 or N == 0 or panels.shape[0] != qmv_panel_bytes(fmt, N, K):
        raise ValueError(f"qmatmul repack: format id {fmt}, {N} rows, {panels.shape[0]} panel bytes do not fit")
    # the row checks of matmul: a (0, K) x and (0, N) out stand for the shapes
    if not _shapes_fit(fmt, data, scales, group_size, np.empty((0, K), np.float32),
                       np.empty((0, N), np.float32)):
        raise ValueError(f"qmatmul repack: data ({N}, {data.shape[1]}) and scales ({scales.shape[0]}, "
                         f"{scales.shape[1]}) do not fit format id {fmt}, K {K}, group_size {group_size}")
    cdef const float *scale_ptr = &scales[0, 0] if scales.shape[0] else NULL
    cdef int status
    with nogil:
        status = qmv_repack(fmt, &data[0, 0], data.shape[1], scale_ptr, group_size, N, K, &panels[0], num_threads)
    if status:
        raise MemoryError("qmatmul repack: out of memory for the row buffers")


def panel_matmul(int fmt, const uint8_t[::1] panels, const float[:, ::1] x, float[:, ::1] out, int num_threads):
    """out (M, N) = x (M, K) @ W.T from repack's panels of W (format id fmt)."""
    cdef int64_t N = out.shape[1], K = x.shape[1], M = x.shape[0]
    if not 0 <= fmt <= 5 or K == 0 or K % 32 or N == 0 or M == 0 or out.shape[0] != M \
            or panels.shape[0] != qmv_panel_bytes(fmt, N, K):
        raise ValueError(f"qmatmul panel kernel: {panels.shape[0]} panel bytes, x ({M}, {K}) and out "
                         f"({out.shape[0]}, {N}) do not fit format id {fmt}")
    cdef int status
    with nogil:
        status = qmv_panel_matmul(fmt, &panels[0], N, K, &x[0, 0], M, &out[0, 0], num_threads)
    if status:
        raise MemoryError("qmatmul: out of memory for the quantized activations")
