# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""AVX-512 VNNI quantized matmul (C in _qmatmul_vnni.h): int8 activations per block of 32.

`has_vnni()` says whether this CPU runs it; `matmul` must only be called when it is true.
"""
from libc.stdint cimport int8_t, int64_t, uint8_t


cdef extern from "_qmatmul_vnni.h" nogil:
    int qmv_has_vnni()
    int qmv_matmul(int fmt, const uint8_t *data, int64_t row_bytes, const float *scales, int64_t group_size,
                   int64_t N, int64_t K, const float *x, int64_t M, float *out, int num_threads)


def has_vnni():
    """True when the CPU has AVX-512 F/BW/VL and VNNI."""
    return bool(qmv_has_vnni())


def matmul(int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales, int64_t group_size,
           const float[:, ::1] x, float[:, ::1] out, int num_threads):
    """out (M, N) = x (M, K) @ W.T; W: N packed rows `data` of format id `fmt` (cpu.FORMAT_IDS: q8_0,
    q5_0, q4_k, int8, int4), `scales` (N, K / group_size) for int8/int4, else (0, 0).
    K is a multiple of 32 (256 for q4_k; group_size 32 or a multiple of 64 for int4)."""
    cdef int64_t N = out.shape[1], K = x.shape[1], M = x.shape[0]
    cdef const float *scale_ptr = &scales[0, 0] if scales.shape[0] else NULL
    cdef int status
    with nogil:
        status = qmv_matmul(fmt, &data[0, 0], data.shape[1], scale_ptr, group_size, N, K, &x[0, 0], M,
                            &out[0, 0], num_threads)
    if status:
        raise MemoryError("qmatmul: out of memory for the quantized activations or tile buffers")
