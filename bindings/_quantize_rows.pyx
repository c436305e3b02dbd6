# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Row storage conversions of quantize_rows on the CPU (driver _quantize_rows.h, conversions
_quantize_rows_simd.h) at a CPU vector level: 0 baseline .. 3 AVX-512 VNNI (recscore.kernels._cpu.LEVELS);
ValueError above what this CPU runs. Bit for bit equal to recscore.kernels.quantize_rows.reference at
every level. Every array's type, dtype, shape and layout is checked here (TypeError, ValueError naming
the argument) before any C runs; the C runs without the GIL.
"""
import numpy as np

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t


cdef extern from "_quantize_rows.h" nogil:
    int rs_cpu_level()
    int rs_level_ok(int level)
    int rq_quantize_rows(int level, const void *weights, int weights_double, int64_t rows, int64_t dim, int bits,
                         uint8_t *codes, float *scale, float *bias, int num_threads)
    int rq_narrow_rows(int level, const uint32_t *bits, int64_t rows, int64_t dim, int to_bf16, uint16_t *out,
                       int num_threads)


cdef _check_array(str function, str name, array, tuple dtypes, tuple shape, bint written):
    """TypeError unless `array` is an ndarray of one of `dtypes`; ValueError unless it has `shape`
    (None: any 2-D shape), is C-contiguous, and, where `written`, writeable."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{function}: {name} must be a NumPy array, got {type(array).__name__}")
    if array.dtype not in dtypes:
        raise TypeError(f"{function}: {name} must be {' or '.join(str(np.dtype(d)) for d in dtypes)}, "
                        f"got {array.dtype}")
    if shape is None and array.ndim != 2:
        raise ValueError(f"{function}: {name} must be 2-D (rows, D), got shape {array.shape}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{function}: {name} must have shape {shape}, got {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{function}: {name} must be C-contiguous")
    if written and not array.flags.writeable:
        raise ValueError(f"{function}: {name} must be writeable")


cdef _check_threads_and_level(str function, int num_threads, int level):
    if num_threads < 1:
        raise ValueError(f"{function}: num_threads must be at least 1, got {num_threads}")
    if not rs_level_ok(level):
        raise ValueError(f"{function}: CPU level {level} is not one this CPU runs (0 .. {rs_cpu_level()})")


def quantize_codes(weights, int bits, codes, scale, bias, int num_threads, int level):
    """Row-wise asymmetric quantization of weights (R, D), float32 or float64, into codes: uint8 (R, D)
    for bits 8, (R, (D + 1) // 2) two codes a byte, low nibble first, for bits 4; scale and bias: float32 (R,).
    """
    if bits != 8 and bits != 4:
        raise ValueError(f"quantize_codes: bits must be 8 or 4, got {bits}")
    _check_array("quantize_codes", "weights", weights, (np.float32, np.float64), None, False)
    cdef int64_t rows = weights.shape[0], dim = weights.shape[1]
    cdef int64_t row_bytes = dim if bits == 8 else (dim + 1) // 2
    _check_array("quantize_codes", "codes", codes, (np.uint8,), (rows, row_bytes), True)
    _check_array("quantize_codes", "scale", scale, (np.float32,), (rows,), True)
    _check_array("quantize_codes", "bias", bias, (np.float32,), (rows,), True)
    _check_threads_and_level("quantize_codes", num_threads, level)
    cdef const float[:, ::1] weights32
    cdef const double[:, ::1] weights64
    cdef uint8_t[:, ::1] codes_view = codes
    cdef float[::1] scale_view = scale, bias_view = bias
    cdef const void *weights_ptr = NULL
    cdef bint weights_double = weights.dtype == np.float64
    if weights_double:
        weights64 = weights
        weights_ptr = &weights64[0, 0] if rows and dim else NULL
    else:
        weights32 = weights
        weights_ptr = &weights32[0, 0] if rows and dim else NULL
    if rows == 0:
        return
    with nogil:
        rq_quantize_rows(level, weights_ptr, weights_double, rows, dim, bits,
                         &codes_view[0, 0] if row_bytes else NULL, &scale_view[0], &bias_view[0], num_threads)


cdef _narrow(str function, weights, out, bint to_bf16, int num_threads, int level):
    _check_array(function, "weights", weights, (np.float32,), None, False)
    cdef int64_t rows = weights.shape[0], dim = weights.shape[1]
    _check_array(function, "out", out, (np.uint16,), (rows, dim), True)
    _check_threads_and_level(function, num_threads, level)
    if rows == 0 or dim == 0:
        return
    cdef const uint32_t[:, ::1] bits = weights.view(np.uint32)
    cdef uint16_t[:, ::1] out_view = out
    with nogil:
        rq_narrow_rows(level, &bits[0, 0], rows, dim, to_bf16, &out_view[0, 0], num_threads)


def to_half_bits(weights, out, int num_threads, int level):
    """float32 weights (R, D) -> IEEE half bits into out, uint16 (R, D), rounded to nearest even as
    NumPy's astype(np.float16)."""
    _narrow("to_half_bits", weights, out, False, num_threads, level)


def to_bf16_bits(weights, out, int num_threads, int level):
    """float32 weights (R, D) -> bfloat16 bits into out, uint16 (R, D), rounded to nearest even as torch."""
    _narrow("to_bf16_bits", weights, out, True, num_threads, level)
