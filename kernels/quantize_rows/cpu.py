"""Row storage on the CPU: Numba kernels, parallel over rows, bit-for-bit equal to reference.py.

int8/int4 follow the reference's arithmetic exactly: min and max in float64, scale and bias
rounded to float32, codes rint((w - bias) / scale) in float64 with those float32 values (no
fastmath, so no reciprocal or contraction changes a code). bf16 rounds float32 bits to nearest
even; float32 -> fp16 is LLVM's fptrunc (vcvtps2ph, round to nearest even, like NumPy). fp32,
and fp16 from float64 (a direct double -> half rounding, as NumPy does), are NumPy casts.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .. import _numba  # noqa: F401  (thread-safe threading layer, before any parallel kernel)
from .._backend import aligned_copy, aligned_empty
from .reference import QUANT_BITS


@njit(cache=True, parallel=True)
def _quantize_kernel(weights, bits, codes, scale, bias):
    """weights float32/float64 (R, D) -> codes (R, D) for int8, (R, ceil(D/2)) packed for int4."""
    levels = (1 << bits) - 1
    rows, dim = weights.shape
    for r in prange(rows):
        row = weights[r]
        low = np.float64(row[0]) if dim else 0.0
        high = low
        for d in range(1, dim):
            value = np.float64(row[d])
            low = value if value < low else low
            high = value if value > high else high
        scale32 = np.float32((high - low) / levels)
        bias32 = np.float32(low)
        scale[r], bias[r] = scale32, bias32
        step, offset = np.float64(scale32), np.float64(bias32)
        out = codes[r]
        if bits == 4:
            out[:] = 0
        for d in range(dim):
            code = 0
            if step > 0:
                code = int(min(max(np.rint((np.float64(row[d]) - offset) / step), 0.0), levels))
            if bits == 8:
                out[d] = code
            else:  # two codes a byte, low nibble first
                out[d >> 1] |= code << ((d & 1) * 4)


@intrinsic
def _float_to_half_bits(typingctx, value):
    """float32 -> IEEE half bits, rounded to nearest even (Numba has no float16 type)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@njit(cache=True, parallel=True)
def _fp16_kernel(weights, out):
    rows, dim = weights.shape
    for r in prange(rows):
        for d in range(dim):
            out[r, d] = _float_to_half_bits(weights[r, d])


@njit(cache=True, parallel=True)
def _bf16_kernel(bits32, out):
    """float32 bit patterns (R, D) -> bfloat16 bits, round to nearest even (as torch does)."""
    rows, dim = bits32.shape
    for r in prange(rows):
        for d in range(dim):
            b = bits32[r, d]
            out[r, d] = np.uint16((b + (((b >> 16) & 1) + np.uint32(0x7FFF))) >> 16)


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
        _fp16_kernel(np.ascontiguousarray(weights), out.view(np.uint16))
        return out, None, None
    if dtype == "bf16":
        weights32 = np.ascontiguousarray(weights, dtype=np.float32)
        out = aligned_empty(weights32.shape, np.uint16)
        _bf16_kernel(weights32.view(np.uint32), out)
        return out, None, None
    if weights.dtype not in (np.float32, np.float64):  # float16: widen exactly (Numba has no float16)
        weights = weights.astype(np.float32)
    weights = np.ascontiguousarray(weights)
    rows, dim = weights.shape
    bits = QUANT_BITS[dtype]
    codes = aligned_empty((rows, dim if bits == 8 else (dim + 1) // 2), np.uint8)
    scale, bias = aligned_empty(rows, np.float32), aligned_empty(rows, np.float32)
    _quantize_kernel(weights, bits, codes, scale, bias)
    return codes, scale, bias
