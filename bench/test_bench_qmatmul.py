"""pytest-benchmark microbenchmarks of qmatmul: GEMV, skinny and prefill shapes on the CPU kernels
(random blocks in each format's layout), plus the Triton kernels on a CUDA device when there is one.

    python -m pytest bench/test_bench_qmatmul.py --benchmark-only
"""
import numpy as np
import pytest

from bench.compare_gpu_qmatmul import random_matrix
from bench.conftest import requires_cuda
from recscore.kernels import qmatmul, use_backend

# (fmt, out_features, in_features): Gemma 3 270M layer shapes and MiniLM's FFN
SHAPES = [("q5_0", 2048, 640), ("q6_k", 640, 2048), ("q4_k", 640, 1024), ("q8_0", 2048, 640),
          ("int8", 1536, 384), ("int4", 1536, 384)]


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
