"""pytest-benchmark microbenchmarks of qmatmul: GEMV, skinny and prefill shapes on the CPU kernels
(random blocks in each format's layout), plus the Triton kernels on a CUDA device when there is one.

    python -m pytest bench/test_bench_qmatmul.py --benchmark-only
"""
import numpy as np
import pytest

from bench.conftest import requires_cuda
from recscore.kernels import QuantizedMatrix, qmatmul, quantize_matrix, use_backend
from recscore.kernels.qmatmul import reference

# (fmt, out_features, in_features): Gemma 3 270M layer shapes and MiniLM's FFN
SHAPES = [("q5_0", 2048, 640), ("q6_k", 640, 2048), ("q4_k", 640, 1024), ("q8_0", 2048, 640),
          ("int8", 1536, 384), ("int4", 1536, 384)]


def random_matrix(fmt, out_features, in_features, seed=0):
    rng = np.random.default_rng(seed)
    if fmt in ("int8", "int4"):
        return quantize_matrix(rng.standard_normal((out_features, in_features)).astype(np.float32), fmt)
    weights_per_block, block_bytes = reference.GGUF_BLOCKS[fmt]
    n_blocks = out_features * in_features // weights_per_block
    blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    scale_offsets = {"q8_0": (0,), "q5_0": (0,), "q4_k": (0, 2), "q6_k": (208,)}[fmt]
    for offset in scale_offsets:
        blocks[:, offset:offset + 2] = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return QuantizedMatrix(fmt, (out_features, in_features), blocks.reshape(out_features, -1), group_size=weights_per_block)


@pytest.mark.parametrize("M", [1, 16, 128])
@pytest.mark.parametrize("fmt,out_features,in_features", SHAPES)
def test_qmatmul_cpu(benchmark, fmt, out_features, in_features, M):
    qm = random_matrix(fmt, out_features, in_features)
    x = np.random.default_rng(1).standard_normal((M, in_features)).astype(np.float32)
    qmatmul(x, qm)   # compile / load the kernels
    benchmark(qmatmul, x, qm)


@requires_cuda
@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("fmt", ["int8", "int4", "q8_0", "q4_k"])
def test_qmatmul_triton(benchmark, fmt, M):
    import torch
    qm = random_matrix(fmt, 4096, 4096)
    x = torch.randn(M, 4096, device="cuda")

    def run():
        with use_backend("triton"):
            qmatmul(x, qm)
        torch.cuda.synchronize()

    run()
    benchmark(run)
