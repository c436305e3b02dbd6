"""Microbenchmarks of the embedding kernels (pytest-benchmark): CPU cases here, GPU cases on GPU runners.

    pytest bench/test_bench_embedding.py --benchmark-only
"""
import numpy as np
import pytest

from bench.conftest import requires_cuda
from recscore.kernels import TableBatch, embedding_bag, quantize_rows

B, L, D = 2048, 32, 64


@pytest.fixture(scope="module")
def table():
    return np.random.default_rng(0).standard_normal((100_000, D), dtype=np.float32)


@pytest.fixture(scope="module")
def bags():
    rng = np.random.default_rng(1)
    return rng.integers(0, 100_000, B * L), np.arange(0, B * L + 1, L, dtype=np.int64)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8", "int4"])
def test_cpu_embedding_bag(benchmark, table, bags, dtype):
    stored = quantize_rows(table, dtype)
    indices, offsets = bags
    benchmark(embedding_bag, stored, indices, offsets)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_cpu_embedding_bag_pooling(benchmark, table, bags, pooling):
    indices, offsets = bags
    benchmark(embedding_bag, table, indices, offsets, pooling=pooling)


def test_cpu_table_batch_mixed(benchmark):
    """Eight tables of mixed dtype and width, skewed bag sizes, one call."""
    rng = np.random.default_rng(2)
    specs = [(50_000, 64, "fp32"), (10_000, 128, "int8"), (100_000, 32, "int4"), (5_000, 16, "fp16"),
             (20_000, 64, "bf16"), (1_000, 128, "fp32"), (80_000, 64, "int8"), (300, 8, "fp32")]
    batch = TableBatch([quantize_rows(rng.standard_normal((r, d), dtype=np.float32), t) for r, d, t in specs])
    lengths = np.minimum(rng.geometric(0.05, len(specs) * 512), 200)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate([rng.integers(0, r, offsets[(t + 1) * 512] - offsets[t * 512])
                              for t, (r, _, _) in enumerate(specs)])
    benchmark(batch.lookup, indices, offsets)


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_cpu_quantize_rows(benchmark, dtype):
    weights = np.random.default_rng(3).standard_normal((1_000_000, D), dtype=np.float32)
    benchmark(quantize_rows, weights, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4"])
def test_triton_embedding_bag_large(benchmark, dtype):
    import torch
    rng = np.random.default_rng(4)
    stored = quantize_rows(rng.standard_normal((2_000_000, D), dtype=np.float32), dtype).to("cuda")
    indices = torch.from_numpy(rng.integers(0, 2_000_000, B * L)).cuda()
    offsets = torch.arange(0, B * L + 1, L, dtype=torch.int64, device="cuda")

    def run():
        embedding_bag(stored, indices, offsets)
        torch.cuda.synchronize()

    benchmark(run)
