"""CPU quantized matmul: the AVX-512 VNNI C kernels (bindings/_qmatmul_vnni.h) where the CPU has
them, else Numba float32 kernels for GEMV, skinny GEMM and prefill GEMM.

Parallel over tiles of TILE_ROWS output rows: each tile's weight rows are decoded once from the
packed blocks into a float32 buffer (16 x in floats, L1/L2 resident) and multiplied with every
row of x in 4 x 4 register blocks of float32 dot products (vectorised FMAs; M = 1 runs 1 x 4
blocks). The packed bytes are read once per call whatever M is; for large M the FMA units are
the limit. GEMV (M = 1) of q8_0 (the output projection), q4_k, int8 and int4 skips the buffer
(gemv_fused).
BLAS on a dequantized tile was tried: alternating Numba's OpenMP pool with OpenBLAS's threads
made both spin against each other on 2 cores (10x slower).

The decoders follow reference.py operation for operation without fused multiply-add, so take()
and dequantize() equal the reference (and gguf) bit for bit; the matmul kernels allow
reassociation and contraction, as any float32 GEMM does.

Dispatch (matmul): every M of the VNNI_FORMATS runs the C kernels of bindings/_qmatmul_vnni.h when
the CPU has AVX-512 VNNI: activations quantized to int8 per block of 32 (llama.cpp's Q8_0
activations), integer dot products (vpdpbusd), float32 per-block scaling. M = 1: fused GEMVs
from the packed bytes. M >= PANEL_MIN_M: the weights repacked once per matrix (vnni_panels, kept in
qm.prepared) into panels of 16 rows x 4 code bytes per zmm lane, so one vpdpbusd yields 16 output
rows; load cost 1.375 bytes a weight (q6_k 1.5: 1.8 MB for Gemma's 640 -> 2048) and ~1-2 ms a
matrix of 0.7-1.3 M weights (2 threads, weights from DRAM, first use). Matrices above
PANEL_MAX_WEIGHTS (the 262144-row output projection: 230 MB of panels) keep the tiled kernel, whose
tiles of 4 rows are decoded to signed int8 per call. One thread, panels vs tiles: M = 2 2.7-5.7x,
M = 16 2.5-4.5x, M = 128 2.1-3.1x (~320 GOP/s); with weights from DRAM (rotated copies) M = 2 1.0-1.4x.
Matrices under SINGLE_THREAD_MACS multiply-adds run on one thread: waking the second OpenMP
thread (OMP_WAIT_POLICY=PASSIVE, a VM) costs 10-70 us, more than it saves on a 0.1 ms GEMV.
Its error is that of the int8 activations: |y - x @ W.T| <= (|x|blockmax @ |W|.T) / 254 plus
float32 rounding, with |x|blockmax each x replaced by the max |x| of its block of 32 (relative
L2 error ~5e-3 on Gaussian x). The other formats (f16, f32; int4 groups not 32 or a multiple of
64) use the float32-activation Numba kernels above (error ~1e-6), as does every format on CPUs
without VNNI (warned once).
"""
import numba
import numpy as np
from numba import njit, prange

from .._backend import warn_once
from ...bindings import _qmatmul_vnni
from .. import _numba  # noqa: F401  (thread-safe threading layer before any parallel kernel)

FORMAT_IDS = {"q8_0": 0, "q5_0": 1, "q4_k": 2, "q6_k": 3, "int8": 4, "int4": 5, "f16": 6}
FUSED_GEMV = ("q8_0", "q4_k", "int8", "int4")   # formats with a fused M = 1 kernel (q5_0 tried: no gain)
VNNI_FORMATS = ("q8_0", "q5_0", "q4_k", "q6_k", "int8", "int4")
HAS_VNNI = _qmatmul_vnni.has_vnni()
PANEL_MIN_M = 2             # M from which the repacked panels run
PANEL_MAX_WEIGHTS = 1 << 24     # larger matrices keep only their packed bytes (panels: 1.375-1.5 bytes a weight)
SINGLE_THREAD_MACS = 1 << 22    # below: one thread (GEMVs of 0.6-1.3 M weights, 1.1-1.2x faster)
TILE_ROWS = 16              # weight rows decoded per parallel work item (16 x in floats: L1/L2)
_FAST = {"nnan", "ninf", "nsz", "arcp", "contract", "afn", "reassoc"}

# Every IEEE half as float32 (NumPy's exact conversion, the one gguf uses), indexed by its bits:
# a lookup costs far less in the block loops than decoding exponent and mantissa (256 KiB, and
# real scales touch only a few lines of it).
_FP16_TO_FLOAT32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_NO_SCALES = np.zeros((0, 0), dtype=np.float32)
_NO_SCALES.flags.writeable = False


@njit(cache=True)
def fp16_value(low_byte, high_byte):
    """An IEEE half from its two little-endian bytes, as float32."""
    return _FP16_TO_FLOAT32[np.uint32(low_byte) | (np.uint32(high_byte) << np.uint32(8))]


# The decoders index the row directly with unsigned indices: Numba wraps negative signed
# indices, and that per-element select compiles to masked pseudo-gathers (10x slower) unless
# LLVM can prove the index is non-negative. Base offsets are computed as int64, converted to
# U (uint64) once, and only U values are added to them (U + int64 would give float64 in Numba).
# Codes become float32 before any arithmetic (Numba widens integer arithmetic to int64), and
# each loop body stores once (two stores per body keep LLVM from vectorising it).
# Inner loop lengths derive from the run-time `group_size`: with a constant 32 LLVM unrolls
# the loop fully and then fails to vectorise it. Kernels pass whole arrays and row numbers, not
# row views: a view per row costs an atomic update of the array's reference count, a cache
# line the threads would fight over. `data` is the uint8 view of the packed
# rows, `signed` its int8 view; decoders write row i of `out`.
U = np.uint64


@njit(cache=True)
def decode_q8_0(data, signed, r, group_size, out, i):
    for b in range(out.shape[1] // group_size):
        o = b * (group_size + 2)
        d = fp16_value(data[r, o], data[r, o + 1])
        src, dst = U(o + 2), U(b * group_size)
        for j in range(group_size):
            out[i, dst + U(j)] = np.float32(signed[r, src + U(j)]) * d


@njit(cache=True)
def decode_q5_0(data, r, group_size, out, i):
    half = group_size // 2
    for b in range(out.shape[1] // group_size):
        o = b * (half + 6)
        d = fp16_value(data[r, o], data[r, o + 1])
        qh = (np.uint32(data[r, o + 2]) | (np.uint32(data[r, o + 3]) << 8)
              | (np.uint32(data[r, o + 4]) << 16) | (np.uint32(data[r, o + 5]) << 24))
        low_bits = qh & np.uint32(0xFFFF)
        high_bits = qh >> np.uint32(16)
        src, dst = U(o + 6), U(b * group_size)
        for j in range(half):
            q = np.float32(data[r, src + U(j)] & 15) + np.float32((low_bits >> np.uint32(j)) & np.uint32(1)) * np.float32(16.0)
            out[i, dst + U(j)] = d * (q - np.float32(16.0))
        dst = U(b * group_size + half)
        for j in range(half):
            q = np.float32(data[r, src + U(j)] >> 4) + np.float32((high_bits >> np.uint32(j)) & np.uint32(1)) * np.float32(16.0)
            out[i, dst + U(j)] = d * (q - np.float32(16.0))


@njit(cache=True, inline="always")
def q4_k_scale_min(data, r, o, s):
    """The 6-bit scale and min of sub-block s of the Q4_K block at byte o of row r (12 packed bytes)."""
    if s < 4:
        return data[r, o + 4 + s] & 63, data[r, o + 8 + s] & 63
    return ((data[r, o + 8 + s] & 15) | ((data[r, o + s] >> 6) << 4),
            (data[r, o + 8 + s] >> 4) | ((data[r, o + 4 + s] >> 6) << 4))


@njit(cache=True)
def decode_q4_k(data, r, group_size, out, i):
    sub = group_size // 8
    for b in range(out.shape[1] // group_size):
        o = b * 144
        d = fp16_value(data[r, o], data[r, o + 1])
        dmin = fp16_value(data[r, o + 2], data[r, o + 3])
        for s in range(8):
            sc, m = q4_k_scale_min(data, r, o, s)
            scale = d * np.float32(sc)
            offset = dmin * np.float32(m)
            src, dst = U(o + 16 + sub * (s // 2)), U(b * group_size + s * sub)
            if s % 2 == 0:
                for j in range(sub):
                    product = scale * np.float32(data[r, src + U(j)] & 15)
                    out[i, dst + U(j)] = product - offset
            else:
                for j in range(sub):
                    product = scale * np.float32(data[r, src + U(j)] >> 4)
                    out[i, dst + U(j)] = product - offset


@njit(cache=True)
def decode_q6_k(data, signed, r, group_size, out, i):
    sub = group_size // 16
    for b in range(out.shape[1] // group_size):
        o = b * 210
        d = fp16_value(data[r, o + 208], data[r, o + 209])
        # see reference._q6_k for the bit layout: in each half h of 128 weights, rows t = 0..3 of
        # 32 take nibble t // 2 of ql[64h + 32 (t % 2) + i] and bits 2t of qh[32h + i]; one scale
        # per 16 weights. Constant shifts let LLVM keep the arithmetic in 32-bit lanes.
        for h in range(2):
            for half in range(2):
                first = sub * half
                ql, qh = U(o + 64 * h + first), U(o + 128 + 32 * h + first)
                ql2 = ql + U(32)
                dst = b * group_size + 128 * h + first
                sc = o + 192 + 8 * h + half
                scale, out_t = d * np.float32(signed[r, sc]), U(dst)
                for j in range(sub):
                    q = np.float32(data[r, ql + U(j)] & 15) + np.float32(data[r, qh + U(j)] & 3) * np.float32(16.0)
                    out[i, out_t + U(j)] = scale * (q - np.float32(32.0))
                scale, out_t = d * np.float32(signed[r, sc + 2]), U(dst + 32)
                for j in range(sub):
                    q = np.float32(data[r, ql2 + U(j)] & 15) + np.float32((data[r, qh + U(j)] >> 2) & 3) * np.float32(16.0)
                    out[i, out_t + U(j)] = scale * (q - np.float32(32.0))
                scale, out_t = d * np.float32(signed[r, sc + 4]), U(dst + 64)
                for j in range(sub):
                    q = np.float32(data[r, ql + U(j)] >> 4) + np.float32((data[r, qh + U(j)] >> 4) & 3) * np.float32(16.0)
                    out[i, out_t + U(j)] = scale * (q - np.float32(32.0))
                scale, out_t = d * np.float32(signed[r, sc + 6]), U(dst + 96)
                for j in range(sub):
                    q = np.float32(data[r, ql2 + U(j)] >> 4) + np.float32(data[r, qh + U(j)] >> 6) * np.float32(16.0)
                    out[i, out_t + U(j)] = scale * (q - np.float32(32.0))


@njit(cache=True)
def decode_int8(signed, scales, r, group_size, out, i):
    for g in range(scales.shape[1]):
        s = scales[r, g]
        first = U(g * group_size)
        for j in range(group_size):
            out[i, first + U(j)] = np.float32(signed[r, first + U(j)]) * s


@njit(cache=True)
def decode_int4(data, scales, r, group_size, out, i):
    half = group_size // 2
    for g in range(scales.shape[1]):
        s = scales[r, g]
        src, low, high = U(g * half), U(g * group_size), U(g * group_size + half)
        for j in range(half):
            out[i, low + U(j)] = (np.float32(data[r, src + U(j)] & 15) - np.float32(8.0)) * s
        for j in range(half):
            out[i, high + U(j)] = (np.float32(data[r, src + U(j)] >> 4) - np.float32(8.0)) * s


@njit(cache=True)
def decode_f16(data, r, out, i):
    for j in range(out.shape[1]):
        out[i, j] = fp16_value(data[r, 2 * j], data[r, 2 * j + 1])


@njit(cache=True)
def decode_row(fmt, data, signed, scales, group_size, r, out, i):
    """Weight row r of the packed matrix -> float32 out[i] (in_features)."""
    if fmt == 0:
        decode_q8_0(data, signed, r, group_size, out, i)
    elif fmt == 1:
        decode_q5_0(data, r, group_size, out, i)
    elif fmt == 2:
        decode_q4_k(data, r, group_size, out, i)
    elif fmt == 3:
        decode_q6_k(data, signed, r, group_size, out, i)
    elif fmt == 4:
        decode_int8(signed, scales, r, group_size, out, i)
    elif fmt == 5:
        decode_int4(data, scales, r, group_size, out, i)
    else:
        decode_f16(data, r, out, i)


@njit(cache=True, parallel=True)
def dequantize_rows(fmt, data, signed, scales, group_size, rows, out):
    """out[i] = weight row rows[i], dequantized."""
    for i in prange(rows.shape[0]):
        decode_row(fmt, data, signed, scales, group_size, rows[i], out, i)


@njit(cache=True, fastmath=_FAST)
def multiply_tile(x, w, n_rows, out, first_row):
    """out[:, first_row + r] = x @ w[r] for r < n_rows, in register blocks of 4 x 4 dot products.

    Each k step of a block loads 4 x values and 4 w values for 16 FMAs (16 vector accumulators),
    so the loop runs on the FMA units rather than on loads.
    """
    M, K = x.shape
    full_m, full_r = M - M % 4, n_rows - n_rows % 4
    for r0 in range(0, full_r, 4):
        for m0 in range(0, full_m, 4):
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
            for k in range(K):
                x0, x1, x2, x3 = x[m0, k], x[m0 + 1, k], x[m0 + 2, k], x[m0 + 3, k]
                w0, w1, w2, w3 = w[r0, k], w[r0 + 1, k], w[r0 + 2, k], w[r0 + 3, k]
                a00 += x0 * w0
                a01 += x0 * w1
                a02 += x0 * w2
                a03 += x0 * w3
                a10 += x1 * w0
                a11 += x1 * w1
                a12 += x1 * w2
                a13 += x1 * w3
                a20 += x2 * w0
                a21 += x2 * w1
                a22 += x2 * w2
                a23 += x2 * w3
                a30 += x3 * w0
                a31 += x3 * w1
                a32 += x3 * w2
                a33 += x3 * w3
            c = first_row + r0
            out[m0, c], out[m0, c + 1], out[m0, c + 2], out[m0, c + 3] = a00, a01, a02, a03
            out[m0 + 1, c], out[m0 + 1, c + 1], out[m0 + 1, c + 2], out[m0 + 1, c + 3] = a10, a11, a12, a13
            out[m0 + 2, c], out[m0 + 2, c + 1], out[m0 + 2, c + 2], out[m0 + 2, c + 3] = a20, a21, a22, a23
            out[m0 + 3, c], out[m0 + 3, c + 1], out[m0 + 3, c + 2], out[m0 + 3, c + 3] = a30, a31, a32, a33
        for m in range(full_m, M):          # rows of x left over: 1 x 4 blocks (GEMV lands here)
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for k in range(K):
                xk = x[m, k]
                a0 += xk * w[r0, k]
                a1 += xk * w[r0 + 1, k]
                a2 += xk * w[r0 + 2, k]
                a3 += xk * w[r0 + 3, k]
            c = first_row + r0
            out[m, c], out[m, c + 1], out[m, c + 2], out[m, c + 3] = a0, a1, a2, a3
    for r in range(full_r, n_rows):         # weight rows left over
        for m in range(M):
            acc = np.float32(0.0)
            for k in range(K):
                acc += x[m, k] * w[r, k]
            out[m, first_row + r] = acc


@njit(cache=True, parallel=True, fastmath=_FAST)
def tiled_gemm(fmt, data, signed, scales, group_size, x, out):
    """out (M, out_features) = x (M, in) @ W.T: each tile of TILE_ROWS weight rows is decoded once
    into a float32 buffer that stays in L1/L2 and multiplied with every row of x."""
    n_rows = data.shape[0]
    n_tiles = (n_rows + TILE_ROWS - 1) // TILE_ROWS
    for t in prange(n_tiles):
        first = t * TILE_ROWS
        count = min(TILE_ROWS, n_rows - first)
        w = np.empty((TILE_ROWS, x.shape[1]), dtype=np.float32)
        for i in range(count):
            decode_row(fmt, data, signed, scales, group_size, first + i, w, i)
        multiply_tile(x, w, count, out, first)


@njit(cache=True, fastmath=_FAST)
def dot_q8_0(data, signed, r, group_size, x):
    """One Q8_0 weight row . x without a decoded buffer: per block, sum(code * x) then times d."""
    acc = np.float32(0.0)
    for b in range(x.shape[1] // group_size):
        o = b * (group_size + 2)
        src, first = U(o + 2), U(b * group_size)
        block_sum = np.float32(0.0)
        for j in range(group_size):
            block_sum += np.float32(signed[r, src + U(j)]) * x[0, first + U(j)]
        acc += fp16_value(data[r, o], data[r, o + 1]) * block_sum
    return acc


@njit(cache=True, fastmath=_FAST)
def dot_int8(signed, scales, r, group_size, x):
    acc = np.float32(0.0)
    for g in range(scales.shape[1]):
        first = U(g * group_size)
        group_sum = np.float32(0.0)
        for j in range(group_size):
            group_sum += np.float32(signed[r, first + U(j)]) * x[0, first + U(j)]
        acc += scales[r, g] * group_sum
    return acc


@njit(cache=True, fastmath=_FAST)
def dot_q4_k(data, r, group_size, x, sub_sums):
    """One Q4_K weight row . x: per sub-block of 32, (d*sc) * sum(q * x) - (dmin*m) * sum(x)."""
    sub = group_size // 8
    acc = np.float32(0.0)
    for b in range(x.shape[1] // group_size):
        o = b * 144
        d = fp16_value(data[r, o], data[r, o + 1])
        dmin = fp16_value(data[r, o + 2], data[r, o + 3])
        for s in range(8):
            sc, m = q4_k_scale_min(data, r, o, s)
            src, first = U(o + 16 + sub * (s // 2)), U(b * group_size + s * sub)
            sub_sum = np.float32(0.0)
            if s % 2 == 0:
                for j in range(sub):
                    sub_sum += np.float32(data[r, src + U(j)] & 15) * x[0, first + U(j)]
            else:
                for j in range(sub):
                    sub_sum += np.float32(data[r, src + U(j)] >> 4) * x[0, first + U(j)]
            acc += (d * np.float32(sc)) * sub_sum - (dmin * np.float32(m)) * sub_sums[b * 8 + s]
    return acc


@njit(cache=True, fastmath=_FAST)
def dot_int4(data, scales, r, group_size, x, group_sums):
    """One int4 weight row . x: per group, scale * (sum(nibble * x) - 8 * sum(x))."""
    half = group_size // 2
    acc = np.float32(0.0)
    for g in range(scales.shape[1]):
        src, first, second = U(g * half), U(g * group_size), U(g * group_size + half)
        group_sum = np.float32(0.0)
        for j in range(half):
            group_sum += np.float32(data[r, src + U(j)] & 15) * x[0, first + U(j)]
        for j in range(half):
            group_sum += np.float32(data[r, src + U(j)] >> 4) * x[0, second + U(j)]
        acc += scales[r, g] * (group_sum - np.float32(8.0) * group_sums[g])
    return acc


@njit(cache=True, parallel=True, fastmath=_FAST)
def gemv_fused(fmt, data, signed, scales, group_size, x, x_sums, out):
    """out[0] = W @ x[0], fused: codes go from memory straight into the FMAs, with no decoded
    buffer to store and reload (1.5-1.7x the tiled path). x_sums holds the sums of x over each
    32-weight sub-block (q4_k) or group (int4), for the formats' offset terms."""
    for r in prange(data.shape[0]):
        if fmt == 0:
            out[0, r] = dot_q8_0(data, signed, r, group_size, x)
        elif fmt == 2:
            out[0, r] = dot_q4_k(data, r, group_size, x, x_sums)
        elif fmt == 4:
            out[0, r] = dot_int8(signed, scales, r, group_size, x)
        else:
            out[0, r] = dot_int4(data, scales, r, group_size, x, x_sums)


def _kernel_args(qm):
    """(fmt id, uint8 and int8 views of the packed rows, scales, group size): one signature for all."""
    scales = _NO_SCALES if qm.scales is None else qm.scales
    return FORMAT_IDS[qm.fmt], qm.data.view(np.uint8), qm.data.view(np.int8), scales, qm.group_size


def uses_vnni(qm, M):
    """Whether matmul runs the int8-activation VNNI kernel for M rows of x against qm."""
    int4_layout_ok = qm.fmt != "int4" or qm.group_size == 32 or qm.group_size % 64 == 0
    eligible = qm.fmt in VNNI_FORMATS and qm.group_size % 32 == 0 and int4_layout_ok and qm.shape[1] > 0
    if eligible and not HAS_VNNI:
        warn_once("qmatmul-vnni", "qmatmul: this CPU has no AVX-512 VNNI; qmatmul runs on the float32 Numba "
                                  "kernels (slower, more exact)")
    return eligible and HAS_VNNI


def uses_panels(qm, M):
    """Whether matmul runs the repacked-panel VNNI kernel (M > 1; see the module docstring)."""
    return (M >= PANEL_MIN_M and qm.shape[0] * qm.shape[1] <= PANEL_MAX_WEIGHTS
            and uses_vnni(qm, M))


def vnni_panels(qm):
    """qm's weights in the 16-row panel layout of bindings/_qmatmul_vnni.h, built on first use under
    qm.lock and kept in qm.prepared (64-byte aligned, read-only)."""
    panels = qm.prepared.get("vnni_panels")
    if panels is not None:
        return panels
    with qm.lock:
        panels = qm.prepared.get("vnni_panels")
        if panels is None:
            size = _qmatmul_vnni.panel_bytes(FORMAT_IDS[qm.fmt], *qm.shape)
            buffer = np.zeros(size + 64, dtype=np.uint8)
            start = -buffer.ctypes.data % 64
            panels = buffer[start:start + size]
            scales = _NO_SCALES if qm.scales is None else qm.scales
            _qmatmul_vnni.repack(FORMAT_IDS[qm.fmt], qm.data.view(np.uint8), scales, qm.group_size, qm.shape[1],
                                 panels, numba.get_num_threads())
            panels.flags.writeable = False
            qm.prepared["vnni_panels"] = panels
    return panels


def vnni_threads(qm, M):
    """Threads for the VNNI kernel: one below SINGLE_THREAD_MACS multiply-adds (see the module docstring)."""
    return 1 if M * qm.shape[0] * qm.shape[1] < SINGLE_THREAD_MACS else numba.get_num_threads()


def matmul(x, qm):
    if qm.fmt == "f32":
        return np.matmul(x, qm.data.view(np.float32).T)
    out = np.empty((x.shape[0], qm.shape[0]), dtype=np.float32)
    if out.size == 0:
        return out
    if uses_panels(qm, x.shape[0]):
        _qmatmul_vnni.panel_matmul(FORMAT_IDS[qm.fmt], vnni_panels(qm), x, out, vnni_threads(qm, x.shape[0]))
        return out
    if uses_vnni(qm, x.shape[0]):
        scales = _NO_SCALES if qm.scales is None else qm.scales
        _qmatmul_vnni.matmul(FORMAT_IDS[qm.fmt], qm.data.view(np.uint8), scales, qm.group_size, x, out,
                             vnni_threads(qm, x.shape[0]))
        return out
    x = x.view()
    x.flags.writeable = False   # one compiled signature for every caller
    if x.shape[0] == 1 and qm.fmt in FUSED_GEMV:
        sum_block = qm.group_size if qm.fmt == "int4" else 32
        x_sums = x.reshape(-1, sum_block).sum(axis=1) if qm.fmt in ("q4_k", "int4") else np.zeros(0, np.float32)
        gemv_fused(*_kernel_args(qm), x, x_sums, out)
    else:
        tiled_gemm(*_kernel_args(qm), x, out)
    return out


def take(qm, rows):
    """rows: int64 NumPy (validated), or None for every row."""
    if qm.fmt == "f32":
        weight = qm.data.view(np.float32)
        return weight.copy() if rows is None else weight[rows]
    if rows is None:
        rows = np.arange(qm.shape[0], dtype=np.int64)
    out = np.empty((rows.shape[0], qm.shape[1]), dtype=np.float32)
    rows = rows.view()
    rows.flags.writeable = False
    dequantize_rows(*_kernel_args(qm), rows, out)
    return out
