"""Reference row storage: plain NumPy, float64 where rounding matters. The definition every
other backend is tested against.

int8/int4 rows are FBGEMM's fused row-wise layout with float32 qparams: a row r stands for
`codes * scale[r] + bias[r]`, `scale = (max - min) / (2**bits - 1)` and `bias = min`,
both rounded to float32 first; codes are `rint((w - bias) / scale)` computed in float64
with those stored float32 values, so dequantized rows are as close to w as the stored
qparams allow. int4 packs two codes per byte, low nibble first; odd D pads the last byte.
"""
import numpy as np

from .._backend import bf16_bits_to_float32

QUANT_BITS = {"int8": 8, "int4": 4}


def float32_to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def quantize_codes(weights, bits):
    """Row-wise asymmetric quantization of float64 (R, D) -> uint8 codes, float32 scale, bias."""
    levels = (1 << bits) - 1
    row_min = weights.min(axis=1) if weights.shape[1] else np.zeros(weights.shape[0])
    row_max = weights.max(axis=1) if weights.shape[1] else np.zeros(weights.shape[0])
    scale = ((row_max - row_min) / levels).astype(np.float32)
    bias = row_min.astype(np.float32)
    scale64 = scale.astype(np.float64)[:, None]
    safe_scale = np.where(scale64 > 0, scale64, 1.0)
    codes = np.rint((weights - bias.astype(np.float64)[:, None]) / safe_scale)
    codes = np.where(scale64 > 0, np.clip(codes, 0, levels), 0).astype(np.uint8)
    return codes, scale, bias


def pack_int4(codes):
    """(R, D) codes in 0..15 -> (R, ceil(D/2)) bytes, low nibble first."""
    rows, dim = codes.shape
    padded = np.zeros((rows, dim + (dim & 1)), dtype=np.uint8)
    padded[:, :dim] = codes
    return padded[:, 0::2] | (padded[:, 1::2] << 4)


def unpack_int4(packed, dim):
    codes = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    return codes[:, :dim]


def quantize(weights, dtype):
    """float (R, D) NumPy -> (data, scale, bias) in the layout of `dtype`."""
    if dtype == "fp32":
        return np.ascontiguousarray(weights, dtype=np.float32), None, None
    if dtype == "fp16":
        return np.ascontiguousarray(weights.astype(np.float16)), None, None
    if dtype == "bf16":
        return float32_to_bf16_bits(weights.astype(np.float32)), None, None
    codes, scale, bias = quantize_codes(weights.astype(np.float64), QUANT_BITS[dtype])
    if dtype == "int4":
        codes = pack_int4(codes)
    return codes, scale, bias


def dequantize(dtype, dim, data, scale, bias):
    """NumPy storage -> float32 (R, D)."""
    if dtype == "fp32":
        return data.astype(np.float32, copy=True)
    if dtype == "fp16":
        return data.astype(np.float32)
    if dtype == "bf16":
        return bf16_bits_to_float32(data)
    codes = unpack_int4(data, dim) if dtype == "int4" else data
    return codes.astype(np.float32) * scale[:, None] + bias[:, None]
