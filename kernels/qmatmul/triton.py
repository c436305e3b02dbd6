"""Triton quantized matmul for CUDA tensors: weights stay packed in device memory and are decoded
in registers, tile by tile; accumulation in float32.

Formats: our int8/int4 (codes + float32 group scales) and GGUF Q8_0 / Q4_K read from the file's
raw block bytes (fp16 scales rebuilt from their two bytes in registers).
  GEMV (M <= GEMV_MAX_M): one program per (row of x, block of BLOCK_N outputs, K split); K is
      split until the grid has about GEMV_PROGRAMS_PER_SM programs a multiprocessor (enough bytes
      in flight to stream the weight); partial sums meet in an atomic add. int4 and Q4_K have
      their own GEMV kernels that load whole packed bytes (16-byte loads) and split the nibbles
      in registers; int8 and Q8_0 decode element-wise tiles (_weight_tile).
  GEMM: (BLOCK_M x BLOCK_N) tiles, the weight tile decoded once per K step and fed to tl.dot;
      split-K too when there are too few tiles to fill the GPU.
Matching the CPU backends, the matmul is x @ W.T with W as reference.dequantize defines it.
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .._triton_launch import LaunchCache
from .._triton_offsets import matrix_offsets, row_starts
from ...bindings._cpu import QMATMUL_FORMAT_IDS

FORMATS = ("int8", "int4", "q8_0", "q4_k")
# _weight_tile's branches, by the format ids the CPU kernels take
INT8, INT4, Q8_0 = (tl.constexpr(QMATMUL_FORMAT_IDS[fmt]) for fmt in ("int8", "int4", "q8_0"))
GEMV_MAX_M = 4
GEMV_PROGRAMS_PER_SM = 8


@triton.jit
def _fp16_at(ptr, mask):
    """The little-endian fp16 stored at byte pointer(s) `ptr`, as float32."""
    low = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    high = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _write(out, acc, mask, SPLIT_K: tl.constexpr):
    """Store a program's result, or add its partial sum when K is split across programs."""
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _weight_tile(data_ptr, scales_ptr, row_bytes, n_groups, offs_n, offs_k, mask,
                 FMT: tl.constexpr, GROUP: tl.constexpr):
    """Decode W[offs_n, offs_k] (a [BLOCK_N, BLOCK_K] tile) to float32 in registers."""
    k = offs_k[None, :]
    row_ptr = data_ptr + row_starts(offs_n, row_bytes)[:, None]
    scales_row_ptr = scales_ptr + row_starts(offs_n, n_groups)[:, None]
    if FMT == INT8:    # codes (out, in), scale per group
        codes = tl.load(row_ptr + k, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        scale = tl.load(scales_row_ptr + k // GROUP, mask=mask, other=0.0)
        w = codes * scale
    elif FMT == INT4:  # byte j of a group holds element j (low nibble) and j + GROUP/2 (high)
        in_group = k % GROUP
        byte = tl.load(row_ptr + (k // GROUP) * (GROUP // 2) + in_group % (GROUP // 2), mask=mask, other=0)
        nibble = (byte >> ((in_group // (GROUP // 2)) * 4).to(tl.uint8)) & 15
        scale = tl.load(scales_row_ptr + k // GROUP, mask=mask, other=0.0)
        w = (nibble.to(tl.float32) - 8.0) * scale
    elif FMT == Q8_0:  # 34-byte blocks, fp16 d then 32 int8 codes
        block_ptr = row_ptr + (k // 32) * 34
        codes = tl.load(block_ptr + 2 + k % 32, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        w = codes * _fp16_at(block_ptr, mask)
    else:           # q4_k: 144-byte super-blocks of 256 (see reference.py)
        block_ptr = row_ptr + (k // 256) * 144
        sub = (k % 256) // 32
        d = _fp16_at(block_ptr, mask)
        dmin = _fp16_at(block_ptr + 2, mask)
        low4 = tl.load(block_ptr + 4 + sub % 4, mask=mask, other=0)       # scales[0:4]
        mid4 = tl.load(block_ptr + 8 + sub % 4, mask=mask, other=0)       # scales[4:8]
        high4 = tl.load(block_ptr + 12 + sub % 4, mask=mask, other=0)     # scales[8:12]
        sc = tl.where(sub < 4, low4 & 63, (high4 & 15) | ((low4 >> 6) << 4))
        m = tl.where(sub < 4, mid4 & 63, (high4 >> 4) | ((mid4 >> 6) << 4))
        byte = tl.load(block_ptr + 16 + (sub // 2) * 32 + k % 32, mask=mask, other=0)
        q = (byte >> ((sub % 2) * 4).to(tl.uint8)) & 15
        w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * m.to(tl.float32)
    return w


@triton.jit
def qgemv_kernel(x_ptr, data_ptr, scales_ptr, out_ptr, N, K, row_bytes, n_groups, k_per_split,
                 FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * k_per_split
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + row_starts(m, K) + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        mask = (offs_n[:, None] < N) & mask_k[None, :]
        w = _weight_tile(data_ptr, scales_ptr, row_bytes, n_groups, offs_n, offs_k, mask, FMT, GROUP)
        acc += tl.sum(w * x[None, :], axis=1)
    _write(out_ptr + row_starts(m, N) + offs_n, acc, offs_n < N, SPLIT_K)


@triton.jit
def qgemv_int4_kernel(x_ptr, data_ptr, scales_ptr, out_ptr, N, K, row_bytes, n_groups, bytes_per_split,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, SPLIT_K: tl.constexpr):
    """int4 GEMV over whole packed bytes: a contiguous [BLOCK_N, BLOCK_B] byte tile (16-byte loads)
    gives its low nibbles (element j of a group) and high nibbles (element j + GROUP/2)."""
    HALF: tl.constexpr = GROUP // 2
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + row_starts(m, K)
    b_start = tl.program_id(2) * bytes_per_split
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for b0 in range(b_start, b_start + bytes_per_split, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mask_b = b < row_bytes
        mask = mask_n[:, None] & mask_b[None, :]
        packed = tl.load(data_ptr + matrix_offsets(offs_n, b, row_bytes), mask=mask, other=0)
        group = b // HALF
        first = group * GROUP + (b - group * HALF)      # the element of the low nibble
        x_low = tl.load(x_row + first, mask=mask_b, other=0.0).to(tl.float32)
        x_high = tl.load(x_row + first + HALF, mask=mask_b, other=0.0).to(tl.float32)
        low = (packed & 15).to(tl.float32) - 8.0
        high = (packed >> 4).to(tl.float32) - 8.0
        scale = tl.load(scales_ptr + matrix_offsets(offs_n, group, n_groups), mask=mask, other=0.0)
        acc += tl.sum((low * x_low[None, :] + high * x_high[None, :]) * scale, axis=1)
    _write(out_ptr + row_starts(m, N) + offs_n, acc, mask_n, SPLIT_K)


@triton.jit
def _q4_k_scale_min(block_ptr, sub, mask):
    """The 6-bit scale and min of sub-blocks `sub` ([S]) of the super-blocks at `block_ptr`
    ([BLOCK_N]): two [BLOCK_N, S] float32 tiles (see reference.q4_k_scale_min)."""
    base = block_ptr[:, None] + sub[None, :] % 4
    low4 = tl.load(base + 4, mask=mask[:, None], other=0)     # scales[0:4]
    mid4 = tl.load(base + 8, mask=mask[:, None], other=0)     # scales[4:8]
    high4 = tl.load(base + 12, mask=mask[:, None], other=0)   # scales[8:12]
    first = sub[None, :] < 4
    scale = tl.where(first, low4 & 63, (high4 & 15) | ((low4 >> 6) << 4))
    minimum = tl.where(first, mid4 & 63, (high4 >> 4) | ((mid4 >> 6) << 4))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def qgemv_q4_k_kernel(x_ptr, data_ptr, out_ptr, N, K, row_bytes, blocks_per_split,
                      BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """Q4_K GEMV a super-block (256 weights, 144 bytes) at a time: its 128 code bytes as one
    [BLOCK_N, 4, 32] tile, byte i of pair j holding weight i of sub-block 2j (low nibble) and of
    2j + 1 (high); y += d * sum(scale * (q . x)) - dmin * sum(min * sum(x)) per sub-block."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pair = tl.arange(0, 4)
    i = tl.arange(0, 32)
    n_blocks = K // 256
    first_block = tl.program_id(2) * blocks_per_split
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for sb in range(first_block, tl.minimum(first_block + blocks_per_split, n_blocks)):
        block_ptr = data_ptr + row_starts(offs_n, row_bytes) + sb * 144
        d = _fp16_at(block_ptr, mask_n)
        dmin = _fp16_at(block_ptr + 2, mask_n)
        scale_low, min_low = _q4_k_scale_min(block_ptr, 2 * pair, mask_n)
        scale_high, min_high = _q4_k_scale_min(block_ptr, 2 * pair + 1, mask_n)
        codes = tl.load(block_ptr[:, None, None] + 16 + pair[None, :, None] * 32 + i[None, None, :],
                        mask=mask_n[:, None, None], other=0)
        x_block = x_ptr + row_starts(m, K) + sb * 256 + pair[:, None] * 64 + i[None, :]
        x_low = tl.load(x_block).to(tl.float32)            # [4, 32]: sub-block 2j
        x_high = tl.load(x_block + 32).to(tl.float32)      # sub-block 2j + 1
        dot_low = tl.sum((codes & 15).to(tl.float32) * x_low[None, :, :], axis=2)     # [BLOCK_N, 4]
        dot_high = tl.sum((codes >> 4).to(tl.float32) * x_high[None, :, :], axis=2)
        sum_low = tl.sum(x_low, axis=1)
        sum_high = tl.sum(x_high, axis=1)
        acc += d * tl.sum(scale_low * dot_low + scale_high * dot_high, axis=1)
        acc -= dmin * tl.sum(min_low * sum_low[None, :] + min_high * sum_high[None, :], axis=1)
    _write(out_ptr + row_starts(m, N) + offs_n, acc, mask_n, SPLIT_K)


@triton.jit
def qgemm_kernel(x_ptr, data_ptr, scales_ptr, out_ptr, M, N, K, row_bytes, n_groups, k_per_split,
                 FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + matrix_offsets(offs_m, offs_k, K),
                    mask=(offs_m[:, None] < M) & mask_k[None, :], other=0.0).to(tl.float32)
        w = _weight_tile(data_ptr, scales_ptr, row_bytes, n_groups, offs_n, offs_k,
                         (offs_n[:, None] < N) & mask_k[None, :], FMT, GROUP)
        acc += tl.dot(x, tl.trans(w))
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    _write(out_ptr + matrix_offsets(offs_m, offs_n, N), acc, mask, SPLIT_K)


_launch_qgemv, _launch_qgemv_int4, _launch_qgemv_q4_k, _launch_qgemm = (
    LaunchCache(kernel) for kernel in (qgemv_kernel, qgemv_int4_kernel, qgemv_q4_k_kernel, qgemm_kernel))


def _device_storage(qm, device):
    """The packed bytes and scales on `device`, copied once per matrix and device."""
    key = ("triton", str(device))
    storage = qm.prepared.get(key)
    if storage is None:
        with qm.lock:
            storage = qm.prepared.get(key)
            if storage is None:
                data = torch.from_numpy(qm.data.view("uint8").copy()).to(device)
                scales = data if qm.scales is None else torch.from_numpy(qm.scales.copy()).to(device)
                storage = qm.prepared[key] = (data, scales)
    return storage


def _sm_count(device):
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(steps, programs, device):
    """How many K splits give the grid about GEMV_PROGRAMS_PER_SM programs a multiprocessor (bytes
    in flight for a bandwidth-bound GEMV), at most one per K step: (splits, steps per split)."""
    split_k = max(1, min(steps, (GEMV_PROGRAMS_PER_SM * _sm_count(device)) // max(1, programs)))
    per_split = triton.cdiv(steps, split_k)
    return triton.cdiv(steps, per_split), per_split


def _output(M, N, split_k, device):
    """The (M, N) float32 result: zeroed when split-K programs add their partial sums into it."""
    return (torch.zeros if split_k > 1 else torch.empty)((M, N), dtype=torch.float32, device=device)


def _gemv(x, qm, data, scales, n_groups, fmt):
    M, K = x.shape
    N = qm.shape[0]
    interpreted = triton_interpreted()
    block_n = 16 if interpreted else 32
    n_blocks = triton.cdiv(N, block_n)
    if qm.fmt == "int4":
        block_b = 32 if interpreted else 128
        split_k, steps = _split(triton.cdiv(data.shape[1], block_b), M * n_blocks, x.device)
        out = _output(M, N, split_k, x.device)
        _launch_qgemv_int4((M, n_blocks, split_k), x, data, scales, out, N, K, data.shape[1], n_groups, steps * block_b,
                          GROUP=qm.group_size, BLOCK_N=block_n, BLOCK_B=block_b, SPLIT_K=split_k)
        return out
    if qm.fmt == "q4_k":
        split_k, blocks = _split(K // 256, M * n_blocks, x.device)
        out = _output(M, N, split_k, x.device)
        _launch_qgemv_q4_k((M, n_blocks, split_k), x, data, out, N, K, data.shape[1], blocks,
                          BLOCK_N=block_n, SPLIT_K=split_k)
        return out
    block_k = 32 if interpreted else 128
    split_k, steps = _split(triton.cdiv(K, block_k), M * n_blocks, x.device)
    out = _output(M, N, split_k, x.device)
    _launch_qgemv((M, n_blocks, split_k), x, data, scales, out, N, K, data.shape[1], n_groups, steps * block_k,
                 FMT=fmt, GROUP=qm.group_size, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k)
    return out


def matmul(x, qm):
    """x: float (M, in) contiguous tensor on a CUDA device (or CPU under the interpreter)."""
    assert qm.fmt in FORMATS and x.ndim == 2 and x.shape[1] == qm.shape[1] and x.is_contiguous()
    M, K = x.shape
    N = qm.shape[0]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), dtype=torch.float32, device=x.device)
    data, scales = _device_storage(qm, x.device)
    n_groups = 0 if qm.scales is None else qm.scales.shape[1]
    fmt = QMATMUL_FORMAT_IDS[qm.fmt]
    if M <= GEMV_MAX_M:
        return _gemv(x, qm, data, scales, n_groups, fmt)
    block_m = 16 if (M <= 16 or triton_interpreted()) else 64
    block_n = 16 if triton_interpreted() else 64
    # K steps of 64 for every format (a Q4_K step of 256 would not fit its float32 tiles in shared
    # memory on an H100: 288 KB at 3 stages); the decoders take any K offset.
    block_k = 32 if triton_interpreted() else 64
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    # Few (M, N) tiles (M = 16..64 against a 4096-wide layer is 64 tiles for 132 multiprocessors):
    # split K as the GEMV does, the partial tiles meeting in an atomic add.
    split_k, steps = _split(triton.cdiv(K, block_k), tiles, x.device)
    out = _output(M, N, split_k, x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _launch_qgemm(grid, x, data, scales, out, M, N, K, data.shape[1], n_groups, steps * block_k,
                 FMT=fmt, GROUP=qm.group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k)
    return out
