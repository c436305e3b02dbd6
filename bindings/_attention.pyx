# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Self-attention of packed texts on the CPU (driver _attention.h, vector code _attention_simd.h) at a
CPU vector level: 0 baseline .. 3 AVX-512 VNNI (recscore.kernels._cpu.LEVELS; 3 runs the AVX-512 code);
ValueError above what this CPU runs. Every shape and the text boundaries are checked here (TypeError,
ValueError naming the argument) before any C runs; the C runs without the GIL.
"""
import numpy as np

from libc.stdint cimport int64_t


cdef extern from "_attention.h" nogil:
    int RS_OK, RS_ERR_MEMORY, RS_ERR_LEVEL
    int rs_cpu_level()
    int rs_level_ok(int level)
    int at_attention(int level, const float *qkv, const float *bias, const int64_t *starts, int64_t n_texts,
                     int64_t n_head, int64_t head_dim, float *out, int threads)

HEAD_DIMS = (32, 64)


cdef bint _runs_from_0_to(const int64_t[::1] starts, int64_t T) noexcept:
    """starts[0] == 0, non-decreasing, starts[-1] == T (a typed loop: NumPy's diff cost more than a short text's
    attention)."""
    cdef Py_ssize_t i
    if starts[0] != 0 or starts[starts.shape[0] - 1] != T:
        return False
    for i in range(1, starts.shape[0]):
        if starts[i] < starts[i - 1]:
            return False
    return True


def attention(qkv, bias, starts, int n_head, out, int threads, int level):
    """out (T, dim) = softmax(Q K^T / sqrt(head_dim)) V per text and head, dim = n_head * head_dim.

    qkv: float32 (T, 3 dim), the queries, keys and values of T packed tokens without their biases;
    bias: float32 (3 dim,); starts: int64 (n_texts + 1,), non-decreasing from 0 to T (text s is rows
    starts[s] .. starts[s + 1]); head_dim = dim / n_head must be 32 or 64. qkv is only read.
    """
    for name, array, dtype in (("qkv", qkv, np.float32), ("bias", bias, np.float32), ("starts", starts, np.int64),
                               ("out", out, np.float32)):
        if not isinstance(array, np.ndarray) or array.dtype != dtype:
            raise TypeError(f"attention: {name} must be a {np.dtype(dtype)} NumPy array, got "
                            f"{getattr(array, 'dtype', type(array).__name__)}")
        if not array.flags.c_contiguous:
            raise ValueError(f"attention: {name} must be C-contiguous")
    if qkv.ndim != 2 or qkv.shape[1] % 3:
        raise ValueError(f"attention: qkv must be (T, 3 dim), got shape {qkv.shape}")
    cdef int64_t T = qkv.shape[0], dim = qkv.shape[1] // 3
    if n_head < 1 or dim % n_head or dim // n_head not in HEAD_DIMS:
        raise ValueError(f"attention: n_head {n_head} must split dim {dim} into heads of {HEAD_DIMS}")
    if bias.shape != (3 * dim,):
        raise ValueError(f"attention: bias must have shape ({3 * dim},), got {bias.shape}")
    if out.shape != (T, dim) or not out.flags.writeable:
        raise ValueError(f"attention: out must be a writeable ({T}, {dim}) array, got {out.shape}")
    if np.shares_memory(out, qkv):
        raise ValueError("attention: out must not overlap qkv")
    if starts.ndim != 1 or starts.shape[0] < 1 or not _runs_from_0_to(starts, T):
        raise ValueError(f"attention: starts must be non-decreasing from 0 to T = {T}")
    if threads < 1:
        raise ValueError(f"attention: threads must be at least 1, got {threads}")
    if not rs_level_ok(level):
        raise ValueError(f"attention: CPU level {level} is not one this CPU runs (0 .. {rs_cpu_level()})")
    cdef const float[:, ::1] q = qkv
    cdef const float[::1] b = bias
    cdef const int64_t[::1] s = starts
    cdef float[:, ::1] o = out
    cdef int64_t n_texts = starts.shape[0] - 1, head_dim = dim // n_head
    cdef int status
    if T == 0:
        return
    with nogil:
        status = at_attention(level, &q[0, 0], &b[0], &s[0], n_texts, n_head, head_dim, &o[0, 0], threads)
    if status == RS_ERR_MEMORY:
        raise MemoryError("attention: out of memory for the per-thread buffers")
    if status != RS_OK:
        raise ValueError(f"attention: kernel failed with status {status}")
