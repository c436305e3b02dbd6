"""Triton quantized matmul for CUDA tensors: weights stay packed in device memory and are decoded
in registers, tile by tile; accumulation in float32.

Formats: our int8/int4 (codes + float32 group scales) and GGUF Q8_0 / Q4_K read from the file's
raw block bytes (fp16 scales rebuilt from their two bytes in registers).
  GEMV (M <= GEMV_MAX_M): one program per (row of x, block of BLOCK_N outputs, K split);
      split-K fills the GPU when M is 1 and out_features is small; partial sums meet in an atomic add.
  GEMM: (BLOCK_M x BLOCK_N) tiles, the weight tile decoded once per K step and fed to tl.dot.
Matching the CPU backends, the matmul is x @ W.T with W as reference.dequantize defines it.
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted

FORMATS = ("int8", "int4", "q8_0", "q4_k")
_FORMAT_IDS = {"int8": 0, "int4": 1, "q8_0": 2, "q4_k": 3}
GEMV_MAX_M = 4


@triton.jit
def _fp16_at(ptr, mask):
    """The little-endian fp16 stored at byte pointer(s) `ptr`, as float32."""
    low = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    high = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _weight_tile(data_ptr, scales_ptr, row_bytes, n_groups, offs_n, offs_k, mask,
                 FMT: tl.constexpr, GROUP: tl.constexpr):
    """Decode W[offs_n, offs_k] (a [BLOCK_N, BLOCK_K] tile) to float32 in registers."""
    rows = offs_n[:, None].to(tl.int64)
    k = offs_k[None, :]
    row_ptr = data_ptr + rows * row_bytes
    if FMT == 0:    # int8: codes (out, in), scale per group
        codes = tl.load(row_ptr + k, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        scale = tl.load(scales_ptr + rows * n_groups + k // GROUP, mask=mask, other=0.0)
        w = codes * scale
    elif FMT == 1:  # int4: byte j of a group holds element j (low nibble) and j + GROUP/2 (high)
        in_group = k % GROUP
        byte = tl.load(row_ptr + (k // GROUP) * (GROUP // 2) + in_group % (GROUP // 2), mask=mask, other=0)
        nibble = (byte >> ((in_group // (GROUP // 2)) * 4).to(tl.uint8)) & 15
        scale = tl.load(scales_ptr + rows * n_groups + k // GROUP, mask=mask, other=0.0)
        w = (nibble.to(tl.float32) - 8.0) * scale
    elif FMT == 2:  # q8_0: 34-byte blocks, fp16 d then 32 int8 codes
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
        x = tl.load(x_ptr + m * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        mask = (offs_n[:, None] < N) & mask_k[None, :]
        w = _weight_tile(data_ptr, scales_ptr, row_bytes, n_groups, offs_n, offs_k, mask, FMT, GROUP)
        acc += tl.sum(w * x[None, :], axis=1)
    out = out_ptr + m * N + offs_n
    if SPLIT_K == 1:
        tl.store(out, acc, mask=offs_n < N)
    else:
        tl.atomic_add(out, acc, mask=offs_n < N)


@triton.jit
def qgemm_kernel(x_ptr, data_ptr, scales_ptr, out_ptr, M, N, K, row_bytes, n_groups,
                 FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & mask_k[None, :], other=0.0).to(tl.float32)
        w = _weight_tile(data_ptr, scales_ptr, row_bytes, n_groups, offs_n, offs_k,
                         (offs_n[:, None] < N) & mask_k[None, :], FMT, GROUP)
        acc += tl.dot(x, tl.trans(w))
    out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


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


def matmul(x, qm):
    """x: float (M, in) contiguous tensor on a CUDA device (or CPU under the interpreter)."""
    assert qm.fmt in FORMATS and x.ndim == 2 and x.shape[1] == qm.shape[1] and x.is_contiguous()
    M, K = x.shape
    N = qm.shape[0]
    if M == 0 or N == 0:
        return torch.zeros((M, N), dtype=torch.float32, device=x.device)
    data, scales = _device_storage(qm, x.device)
    n_groups = 0 if qm.scales is None else qm.scales.shape[1]
    fmt = _FORMAT_IDS[qm.fmt]
    block_k = 256 if qm.fmt == "q4_k" else (32 if triton_interpreted() else 128)
    if M <= GEMV_MAX_M:
        block_n = 16 if triton_interpreted() else 64
        n_blocks = triton.cdiv(N, block_n)
        k_steps = triton.cdiv(K, block_k)
        # split K until the grid covers the GPU about twice, each split a whole number of K steps
        split_k = max(1, min(k_steps, (2 * _sm_count(x.device)) // max(1, M * n_blocks)))
        k_per_split = triton.cdiv(k_steps, split_k) * block_k
        split_k = triton.cdiv(K, k_per_split)
        out = (torch.zeros if split_k > 1 else torch.empty)((M, N), dtype=torch.float32, device=x.device)
        qgemv_kernel[(M, n_blocks, split_k)](x, data, scales, out, N, K, data.shape[1], n_groups, k_per_split,
                                            FMT=fmt, GROUP=qm.group_size, BLOCK_N=block_n, BLOCK_K=block_k,
                                            SPLIT_K=split_k)
        return out
    block_m = 16 if (M <= 16 or triton_interpreted()) else 64
    block_n = 16 if triton_interpreted() else 64
    out = torch.empty((M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    qgemm_kernel[grid](x, data, scales, out, M, N, K, data.shape[1], n_groups,
                       FMT=fmt, GROUP=qm.group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
