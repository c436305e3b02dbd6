"""Row storage on the CPU: the C conversions of bindings/_quantize_rows_simd.h, compiled ahead of time
for every CPU vector level (no JIT on the first call; the call runs at kernels._cpu.cpu_level()),
parallel over rows, bit-for-bit equal to reference.py.

int8/int4 follow the reference's arithmetic exactly: min and max in float64, scale and bias
rounded to float32, codes rint((w - bias) / scale) in float64 with those float32 values (compiled
without contraction or fast-math, so no FMA or reciprocal changes a code). bf16 rounds float32 bits
to nearest even; float32 -> fp16 rounds to nearest even, as NumPy. fp32, and fp16 from float64 (a
direct double -> half rounding, as NumPy does), are NumPy casts.
"""
import numpy as np

from ...bindings import _quantize_rows
from .._backend import aligned_copy, aligned_empty
from .._cpu import cpu_level, kernel_threads
from .reference import QUANT_BITS

PARALLEL_MIN_VALUES = 1 << 16   # below: one thread (waking the others costs more than it saves)


def threads(size):
    """1 below PARALLEL_MIN_VALUES values, else kernel_threads()."""
    return 1 if size < PARALLEL_MIN_VALUES else kernel_threads()


def quantize(weights, dtype):
    """float (R, D) NumPy -> (data, scale, bias) in the layout of `dtype`, as reference.quantize."""
    if dtype == "fp32":
        if weights.dtype == np.float32 and weights.flags.c_contiguous:
            return weights, None, None   # the caller's table, read in place
        return aligned_copy(weights, np.float32), None, None
    if dtype == "fp16":
        if weights.dtype != np.float32:
            return aligned_copy(weights, np.float16), None, None
        out = aligned_empty(weights.shape, np.float16)
        _quantize_rows.to_half_bits(np.ascontiguousarray(weights), out.view(np.uint16), threads(weights.size),
                                    cpu_level())
        return out, None, None
    if dtype == "bf16":
        weights32 = np.ascontiguousarray(weights, dtype=np.float32)
        out = aligned_empty(weights32.shape, np.uint16)
        _quantize_rows.to_bf16_bits(weights32, out, threads(weights32.size), cpu_level())
        return out, None, None
    if weights.dtype not in (np.float32, np.float64):  # float16: widen exactly (the C reads float or double)
        weights = weights.astype(np.float32)
    weights = np.ascontiguousarray(weights)
    rows, dim = weights.shape
    bits = QUANT_BITS[dtype]
    codes = aligned_empty((rows, dim if bits == 8 else (dim + 1) // 2), np.uint8)
    scale, bias = aligned_empty(rows, np.float32), aligned_empty(rows, np.float32)
    _quantize_rows.quantize_codes(weights, bits, codes, scale, bias, threads(weights.size), cpu_level())
    return codes, scale, bias
