"""Quantized matmul on a CUDA device (issue 5, GPU targets): the Triton kernels against fp16
F.linear on the same GPU.

    python -m bench.compare gpu_qmatmul          # needs a CUDA device

Shapes 4096 -> 4096 and 4096 -> 14336 (a 7-8B model's attention and FFN projections), every
Triton format (int8 and int4 with groups of 32, GGUF Q8_0 and Q4_K), random blocks. Each side
rotates over 8 distinct weights (ours packed, the peer's fp16), one per input set, so no call
finds its weight in the 50 MB L2.
- M = 1: GB/s counts the packed weight bytes, against the device copy measured in the same run
  (target 70% for int4 and Q4_K); the fp16 F.linear peer is there for scale.
- M = 16 and 64: ours vs fp16 F.linear (target 2x).
Public-call rows include qmatmul's check that x is finite (a wait for the GPU per call); "device
time" rows replay CUDA graphs of 8 calls of the Triton launcher (no check) against graphs of 8
F.linear calls: the GPU's own time, where the GB/s targets are read.
"""
import numpy as np
import torch
import torch.nn.functional as F

from bench.protocol import Comparison, cuda_graph_of
from recscore.kernels import QuantizedMatrix, qmatmul, use_backend
from recscore.kernels.qmatmul import reference
from recscore.kernels.qmatmul import triton as triton_kernels

DEVICE = "cuda"
N_SETS = 8
SHAPES = [(4096, 4096), (14336, 4096)]   # (out_features, in_features)
FORMATS = ("int4", "q4_k", "int8", "q8_0")
SCALE_OFFSETS = {"q8_0": (0,), "q5_0": (0,), "q4_k": (0, 2), "q6_k": (208,)}   # fp16 fields of a GGUF block


def random_matrix(fmt, out_features, in_features, seed=0):
    """A QuantizedMatrix of random codes in `fmt`'s layout with small random scales (groups of 32)."""
    rng = np.random.default_rng(seed)
    if fmt in ("int8", "int4"):
        codes = rng.integers(0, 256, (out_features, in_features if fmt == "int8" else in_features // 2), dtype=np.uint8)
        scales = (rng.random((out_features, in_features // 32), dtype=np.float32) * 0.01).astype(np.float32)
        return QuantizedMatrix(fmt, (out_features, in_features), codes.view(np.int8) if fmt == "int8" else codes,
                               scales, group_size=32)
    weights_per_block, block_bytes = reference.GGUF_BLOCKS[fmt]
    n_blocks = out_features * in_features // weights_per_block
    blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[fmt]:
        blocks[:, offset:offset + 2] = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return QuantizedMatrix(fmt, (out_features, in_features), blocks.reshape(out_features, -1), group_size=weights_per_block)


def comparisons(quick=False):
    for out_features, in_features in SHAPES[:1] if quick else SHAPES:
        weights_fp16 = [torch.randn(out_features, in_features, device=DEVICE, dtype=torch.float16) * 0.02
                        for _ in range(N_SETS)]
        xs = {M: [torch.randn(M, in_features, device=DEVICE) for _ in range(N_SETS)] for M in (1, 16, 64)}
        for fmt in FORMATS:
            matrices = [random_matrix(fmt, out_features, in_features, seed) for seed in range(N_SETS)]
            shape = f"{fmt} {in_features}->{out_features}"

            def ours(M):
                def run(i):
                    with use_backend("triton"):
                        return qmatmul(xs[M][i], matrices[i])
                return run

            def linear(M):
                return lambda i: F.linear(xs[M][i].half(), weights_fp16[i])

            packed = matrices[0].nbytes
            yield Comparison(f"{shape} M=1", f"recscore triton {fmt}", "torch F.linear cuda fp16", ours(1), linear(1),
                             bytes_per_call=packed, device=DEVICE,
                             note="GB/s target: 70% of the device copy" if fmt in ("int4", "q4_k") else "")
            for M in (16, 64):
                yield Comparison(f"{shape} M={M}", f"recscore triton {fmt}", "torch F.linear cuda fp16", ours(M),
                                 linear(M), target=2.0, bytes_per_call=packed, device=DEVICE)
            graph = f"device time, graph of {N_SETS} calls"
            for M in (1, 16, 64):
                kernel = cuda_graph_of(lambda i, M=M: triton_kernels.matmul(xs[M][i], matrices[i]), N_SETS)
                peer = cuda_graph_of(lambda i, M=M: F.linear(xs[M][i].half(), weights_fp16[i]), N_SETS)
                yield Comparison(f"{shape} M={M}, {graph}", f"recscore triton {fmt} kernel", "torch F.linear cuda fp16",
                                 kernel, peer, n_sets=1, target=None if M == 1 else 2.0,
                                 bytes_per_call=N_SETS * packed, device=DEVICE,
                                 note="GB/s target: 70% of the device copy" if M == 1 and fmt in ("int4", "q4_k") else "")
            del matrices
