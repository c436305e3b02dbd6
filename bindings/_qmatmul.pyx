# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Quantized matmul and row decoding (C in _qmatmul.h, vector kernels in _qmatmul_simd.h) at a CPU
vector level: 0 baseline .. 3 AVX-512 VNNI (recscore.kernels._cpu.LEVELS); ValueError above what this
CPU runs. Every size the C code reads by is checked here first (ValueError).

A matrix is (fmt, data, scales, group_size): fmt a format id (recscore.bindings._cpu.QMATMUL_FORMAT_IDS:
q8_0, q5_0, q4_k, q6_k, int8, int4, f16), data its N packed rows (uint8, (N, row bytes)), scales
(N, K / group_size) for int8 and int4, else (0, 0).
"""
from libc.stdint cimport int64_t, uint8_t


cdef extern from "_qmatmul.h" nogil:
    int RS_OK, RS_ERR_MEMORY, RS_ERR_LEVEL
    enum:
        QM_Q8_0, QM_Q5_0, QM_Q4_K, QM_Q6_K, QM_INT8, QM_INT4, QM_F16, QM_FORMATS
    int rs_cpu_level()
    int rs_level_ok(int level)
    int64_t qm_span(int fmt, int64_t group_size)
    ctypedef struct qm_matrix:
        int fmt
        const uint8_t *data
        int64_t row_bytes
        const float *scales
        int64_t group_size
        int64_t N, K
    int qm_matmul(int level, const qm_matrix *w, const float *x, int64_t M, float *out, int threads)
    int64_t qm_panel_bytes(int level, int64_t N, int64_t K)
    int qm_repack(int level, const qm_matrix *w, uint8_t *panels, int threads)
    int qm_panel_matmul(int level, int fmt, const uint8_t *panels, int64_t N, int64_t K, int64_t group_size,
                        const float *x, int64_t M, float *out, int threads)
    int qm_streamed_panel_matmul(int level, const qm_matrix *w, const float *x, int64_t M, float *out, int threads)
    int qm_float_matmul(int level, const qm_matrix *w, const float *x, int64_t M, float *out, int threads)
    int qm_take(int level, const qm_matrix *w, const int64_t *rows, int64_t n_rows, float *out, int threads)


# weights and bytes per block of each format id
cdef int64_t _BLOCK_WEIGHTS[QM_FORMATS]
cdef int64_t _BLOCK_BYTES[QM_FORMATS]


cdef _set_blocks():
    for fmt, weights, nbytes in ((QM_Q8_0, 32, 34), (QM_Q5_0, 32, 22), (QM_Q4_K, 256, 144), (QM_Q6_K, 256, 210),
                                 (QM_INT8, 1, 1), (QM_INT4, 2, 1), (QM_F16, 1, 2)):
        _BLOCK_WEIGHTS[fmt], _BLOCK_BYTES[fmt] = weights, nbytes


_set_blocks()


cdef _check_level(int level):
    if not rs_level_ok(level):
        raise ValueError(f"qmatmul: CPU level {level} is not one this CPU runs (0 .. {rs_cpu_level()})")


cdef _check_status(int status, str what):
    if status == RS_ERR_MEMORY:
        raise MemoryError(f"qmatmul: out of memory for the {what} buffers")
    if status != RS_OK:
        raise ValueError(f"qmatmul: {what} kernel failed with status {status}")


cdef bint _describe(qm_matrix *w, int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales,
                    int64_t group_size, int64_t K, bint int8_activations) noexcept:
    """Fill w; False unless data and scales hold an (N, K) matrix of format fmt, K >= 1 (and, with
    int8_activations, one the integer kernels take: K a multiple of 32, int8/int4 groups a multiple of 32,
    int4 groups 32 or a multiple of 64)."""
    if fmt < 0 or fmt >= QM_FORMATS or K < 1 or K % _BLOCK_WEIGHTS[fmt] \
            or data.shape[1] != K // _BLOCK_WEIGHTS[fmt] * _BLOCK_BYTES[fmt]:
        return False
    cdef bint grouped = fmt == QM_INT8 or fmt == QM_INT4
    if grouped:
        if group_size < 1 or K % group_size or (fmt == QM_INT4 and group_size % 2) \
                or scales.shape[0] != data.shape[0] or scales.shape[1] != K // group_size:
            return False
    elif scales.shape[0] != 0 or group_size < 1:
        return False
    if int8_activations:
        if fmt == QM_F16 or K % 32 or (grouped and group_size % 32) \
                or (fmt == QM_INT4 and group_size != 32 and group_size % 64):
            return False
    w.fmt = fmt
    w.data = &data[0, 0] if data.shape[0] else NULL
    w.row_bytes = data.shape[1]
    w.scales = &scales[0, 0] if grouped and scales.shape[0] else NULL
    w.group_size = group_size
    w.N = data.shape[0]
    w.K = K
    return True


cdef _matrix_error(str kernel, int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales,
                   int64_t group_size, int64_t K):
    return ValueError(f"qmatmul {kernel}: data ({data.shape[0]}, {data.shape[1]}) and scales ({scales.shape[0]}, "
                      f"{scales.shape[1]}) do not fit format id {fmt}, K {K}, group_size {group_size}")


cdef _check_product(const float[:, ::1] x, float[:, ::1] out, int64_t N, int64_t K, int threads):
    if x.shape[0] < 1 or x.shape[1] != K or out.shape[0] != x.shape[0] or out.shape[1] != N or N < 1 \
            or threads < 1:
        raise ValueError(f"qmatmul: x ({x.shape[0]}, {x.shape[1]}) and out ({out.shape[0]}, {out.shape[1]}) do "
                         f"not fit a ({N}, {K}) matrix ({threads} threads)")


cdef enum Product:
    ROWS, STREAMED_PANELS, FLOATS

_PRODUCT_NAMES = ("row kernel", "streamed panel kernel", "float kernel")   # by Product


cdef _product(Product kind, int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales, int64_t group_size,
              const float[:, ::1] x, float[:, ::1] out, int threads, int level):
    """out (M, N) = x (M, K) @ W.T from the packed rows by the kernel `kind`, every size checked first."""
    _check_level(level)
    cdef qm_matrix w
    if not _describe(&w, fmt, data, scales, group_size, x.shape[1], kind != FLOATS):
        raise _matrix_error(_PRODUCT_NAMES[kind], fmt, data, scales, group_size, x.shape[1])
    _check_product(x, out, w.N, w.K, threads)
    cdef int status
    with nogil:
        if kind == ROWS:
            status = qm_matmul(level, &w, &x[0, 0], x.shape[0], &out[0, 0], threads)
        elif kind == STREAMED_PANELS:
            status = qm_streamed_panel_matmul(level, &w, &x[0, 0], x.shape[0], &out[0, 0], threads)
        else:
            status = qm_float_matmul(level, &w, &x[0, 0], x.shape[0], &out[0, 0], threads)
    _check_status(status, _PRODUCT_NAMES[kind])


def matmul(int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales, int64_t group_size,
           const float[:, ::1] x, float[:, ::1] out, int threads, int level):
    """out (M, N) = x (M, K) @ W.T with int8 activations, from the packed rows (the row kernel)."""
    _product(ROWS, fmt, data, scales, group_size, x, out, threads, level)


def streamed_panel_matmul(int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales, int64_t group_size,
                          const float[:, ::1] x, float[:, ::1] out, int threads, int level):
    """out (M, N) = x (M, K) @ W.T with int8 activations, through panels repacked from the packed rows
    a few at a time (matrices too large to keep panels for)."""
    _product(STREAMED_PANELS, fmt, data, scales, group_size, x, out, threads, level)


def float_matmul(int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales, int64_t group_size,
                 const float[:, ::1] x, float[:, ::1] out, int threads, int level):
    """out (M, N) = x (M, K) @ W.T with float32 activations (any format but f32)."""
    _product(FLOATS, fmt, data, scales, group_size, x, out, threads, level)


def panel_bytes(int64_t N, int64_t K, int level):
    """Bytes of the panels of an (N, K) matrix at `level` (K a multiple of 32)."""
    _check_level(level)
    if N < 1 or K < 32 or K % 32:
        raise ValueError(f"qmatmul panels: ({N}, {K}) is not a matrix the panels take")
    return qm_panel_bytes(level, N, K)


def repack(int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales, int64_t group_size, int64_t K,
           uint8_t[::1] panels, int threads, int level):
    """panels (panel_bytes(N, K, level) bytes, zeroed) <- the N packed rows of W, for panel_matmul at `level`."""
    _check_level(level)
    cdef qm_matrix w
    if not _describe(&w, fmt, data, scales, group_size, K, True) or w.N < 1:
        raise _matrix_error("repack", fmt, data, scales, group_size, K)
    if panels.shape[0] != qm_panel_bytes(level, w.N, K) or threads < 1:
        raise ValueError(f"qmatmul repack: {panels.shape[0]} panel bytes do not fit a ({w.N}, {K}) matrix at "
                         f"level {level}")
    cdef int status
    with nogil:
        status = qm_repack(level, &w, &panels[0], threads)
    _check_status(status, "repack")


def panel_matmul(int fmt, const uint8_t[::1] panels, int64_t group_size, const float[:, ::1] x, float[:, ::1] out,
                 int threads, int level):
    """out (M, N) = x (M, K) @ W.T from repack's panels of W (format id fmt, built at the same level;
    group_size: W's, which for int8 and int4 is also the block x is quantized by)."""
    _check_level(level)
    cdef int64_t N = out.shape[1], K = x.shape[1], M = x.shape[0]
    cdef bint grouped = fmt == QM_INT8 or fmt == QM_INT4
    if not 0 <= fmt < QM_FORMATS or fmt == QM_F16 or K < 32 or K % _BLOCK_WEIGHTS[fmt] or K % 32 or N < 1 or M < 1 \
            or out.shape[0] != M or threads < 1 or panels.shape[0] != qm_panel_bytes(level, N, K) \
            or (grouped and (group_size < 32 or group_size % 32 or K % group_size)):
        raise ValueError(f"qmatmul panel kernel: {panels.shape[0]} panel bytes, group size {group_size}, x ({M}, {K}) "
                         f"and out ({out.shape[0]}, {N}) do not fit format id {fmt} at level {level}")
    cdef int status
    with nogil:
        status = qm_panel_matmul(level, fmt, &panels[0], N, K, group_size, &x[0, 0], M, &out[0, 0], threads)
    _check_status(status, "panel kernel")


def take(int fmt, const uint8_t[:, ::1] data, const float[:, ::1] scales, int64_t group_size,
         const int64_t[::1] rows, float[:, ::1] out, int threads, int level):
    """out (len(rows), K) = rows of W dequantized, equal to reference.py bit for bit (IndexError for a
    row outside [0, N))."""
    _check_level(level)
    cdef qm_matrix w
    if not _describe(&w, fmt, data, scales, group_size, out.shape[1], False):
        raise _matrix_error("take", fmt, data, scales, group_size, out.shape[1])
    cdef int64_t i, n_rows = rows.shape[0]
    if out.shape[0] != n_rows or threads < 1:
        raise ValueError(f"qmatmul take: out ({out.shape[0]}, {out.shape[1]}) does not fit {n_rows} rows")
    for i in range(n_rows):
        if rows[i] < 0 or rows[i] >= w.N:
            raise IndexError(f"rows[{i}] = {rows[i]} is out of range for a matrix of {w.N} rows")
    if n_rows == 0:
        return
    cdef int status
    with nogil:
        status = qm_take(level, &w, &rows[0], n_rows, &out[0, 0], threads)
    _check_status(status, "take")


def codes():
    """The format ids this module's C code was compiled with (tests/test_codes.py)."""
    return {"q8_0": QM_Q8_0, "q5_0": QM_Q5_0, "q4_k": QM_Q4_K, "q6_k": QM_Q6_K, "int8": QM_INT8, "int4": QM_INT4,
            "f16": QM_F16}


def activation_block(int fmt, int64_t group_size):
    """The values of x that share one int8 scale on the int8-activation path for format id fmt and this
    group size (C's qm_span: an int8/int4 group up to 65,536 values, else 32)."""
    return 32 * qm_span(fmt, group_size)
