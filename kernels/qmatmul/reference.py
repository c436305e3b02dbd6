"""Reference quantized matrices: plain NumPy, the definition every other backend is tested against.

Formats (a row of `in` weights is a run of blocks; GGUF blocks are kept byte for byte):
  f32, f16   raw little-endian floats.
  q8_0       34-byte blocks of 32: fp16 d, 32 int8 q;                  w = d * q
  q5_0       22-byte blocks of 32: fp16 d, uint32 qh, 16 bytes qs;     w = d * (q - 16), q 5 bits:
             element j < 16 is the low nibble of qs[j], j >= 16 the high nibble of qs[j-16],
             bit 4 is bit j of qh.
  q4_k       144-byte super-blocks of 256: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) for
             8 sub-blocks of 32, 128 bytes of nibbles;        w = (d*sc) * q - dmin*m
             sub-block s takes nibble s % 2 of bytes 32*(s//2) .. +32.
  q6_k       210-byte super-blocks of 256: 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits),
             16 int8 scales (one per 16), fp16 d;             w = (d*sc) * (q - 32)
  int8       ours, group-wise symmetric: int8 codes (out, in), float32 scale (out, in/group);
             scale = max|w| / 127, code = rint(w / scale), w = code * scale.
  int4       ours: codes in [-7, 7] (symmetric: -8 is never produced), scale = max|w| / 7, stored as
             code + 8 in nibbles: byte j of a group holds element j (low nibble) and element
             j + group/2 (high nibble), as GGUF's Q4_0 does, so a decoder reads two contiguous halves.
The float32 operations and their order match gguf.quants (no fused multiply-add), so dequantize()
equals gguf.quants.dequantize bit for bit.
"""
import numpy as np

# (weights per block, bytes per block) of the GGUF formats we read.
GGUF_BLOCKS = {"f32": (1, 4), "f16": (1, 2), "q8_0": (32, 34), "q5_0": (32, 22), "q4_k": (256, 144), "q6_k": (256, 210)}
INT_LEVELS = {"int8": 127, "int4": 7}


def _fp16(blocks, start):
    """The fp16 at byte `start` of every block, as float32 (n_blocks, 1)."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _q8_0(blocks):
    return blocks[:, 2:].view(np.int8).astype(np.float32) * _fp16(blocks, 0)


def _q5_0(blocks):
    qh = np.ascontiguousarray(blocks[:, 2:6]).view(np.uint32)                         # (n, 1)
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4          # (n, 32)
    qs = blocks[:, 6:22]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    q = (low | high).astype(np.int8) - np.int8(16)
    return _fp16(blocks, 0) * q.astype(np.float32)


def q4_k_scale_min(scales):
    """12 packed bytes -> 6-bit (sc, m) for the 8 sub-blocks: uint8 (n, 8) each."""
    low4, mid4, high4 = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([low4 & 63, (high4 & 0x0F) | ((low4 >> 6) << 4)], axis=1)
    m = np.concatenate([mid4 & 63, (high4 >> 4) | ((mid4 >> 6) << 4)], axis=1)
    return sc, m


def _q4_k(blocks):
    n = blocks.shape[0]
    sc, m = q4_k_scale_min(blocks[:, 4:16])
    d = (_fp16(blocks, 0) * sc.astype(np.float32))[:, :, None]       # (n, 8, 1)
    dm = (_fp16(blocks, 2) * m.astype(np.float32))[:, :, None]
    qs = blocks[:, 16:144].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 8, 32).astype(np.float32)
    return (d * q - dm).reshape(n, 256)


def _q6_k(blocks):
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, 8, 32)            # row h*4 + s*2 + k: nibble s of ql[64h + 32k + i]
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(n, 8, 32)            # row h*4 + t: bits 2t..2t+1 of qh[32h + i]
    q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
    d = _fp16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)   # (n, 16)
    return (d[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)


_GGUF_DECODERS = {"q8_0": _q8_0, "q5_0": _q5_0, "q4_k": _q4_k, "q6_k": _q6_k}


def unpack_int4(packed, group_size):
    """(R, in/2) nibbles -> int8 codes (R, in) in [-8, 7], in the layout described above."""
    rows = packed.shape[0]
    groups = packed.reshape(rows, packed.shape[1] // (group_size // 2), group_size // 2)   # not -1: rows may be 0
    codes = np.concatenate([groups & 0x0F, groups >> 4], axis=2).astype(np.int8) - np.int8(8)
    return codes.reshape(rows, packed.shape[1] * 2)


def pack_int4(codes, group_size):
    """int codes (R, in) in [-8, 7] -> (R, in/2) uint8, the inverse of unpack_int4."""
    rows = codes.shape[0]
    nibbles = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(rows, codes.shape[1] // group_size, 2,
                                                                    group_size // 2)   # not -1: rows may be 0
    return (nibbles[:, :, 0, :] | (nibbles[:, :, 1, :] << 4)).reshape(rows, codes.shape[1] // 2)


def quantize(weight, fmt, group_size):
    """float (out, in) NumPy -> (codes, scales) of our group-wise symmetric int8/int4.

    The scale is rounded to float32 first and the codes are computed in float64 from it, so
    the dequantized weights are as close to w as the stored scale allows.
    """
    levels = INT_LEVELS[fmt]
    rows, cols = weight.shape
    groups = weight.astype(np.float64).reshape(rows, cols // group_size, group_size)
    scale = (np.abs(groups).max(axis=2, initial=0.0) / levels).astype(np.float32)
    scale64 = scale.astype(np.float64)[:, :, None]
    codes = np.rint(groups / np.where(scale64 > 0, scale64, 1.0))
    codes = np.clip(codes, -levels, levels).astype(np.int8).reshape(rows, cols)
    if fmt == "int4":
        codes = pack_int4(codes, group_size)
    return codes, scale


def dequantize(fmt, data, scales, group_size, rows=None):
    """float32 (len(rows), in) of the stored matrix (all rows when rows is None)."""
    if rows is not None:
        data = data[rows]
        scales = None if scales is None else scales[rows]
    n = data.shape[0]
    if fmt == "f32":
        return np.ascontiguousarray(data).view(np.float32).copy()
    if fmt == "f16":
        return np.ascontiguousarray(data).view(np.float16).astype(np.float32)
    if fmt in ("int8", "int4"):
        codes = unpack_int4(data, group_size) if fmt == "int4" else data
        groups = codes.reshape(n, scales.shape[1], group_size).astype(np.float32)
        return (groups * scales[:, :, None]).reshape(n, -1)
    block_bytes = GGUF_BLOCKS[fmt][1]
    blocks = np.ascontiguousarray(data).reshape(-1, block_bytes)
    return _GGUF_DECODERS[fmt](blocks).reshape(n, -1)


def matmul(x, qm):
    """x float32 (M, in) -> float32 (M, out) = x @ W.T, computed in float64."""
    weight = dequantize(qm.fmt, qm.data, qm.scales, qm.group_size)
    return (x.astype(np.float64) @ weight.astype(np.float64).T).astype(np.float32)


def take(qm, rows):
    return dequantize(qm.fmt, qm.data, qm.scales, qm.group_size, rows)
