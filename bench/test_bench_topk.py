"""Microbenchmarks of topk and ItemIndex (pytest-benchmark); peers live in compare_topk.py.

    pytest bench/test_bench_topk.py --benchmark-only
"""
import numpy as np
import pytest

from bench.conftest import requires_cuda
from recscore.kernels import ItemIndex, quantize_rows, topk, use_backend

N, D = 200_000, 64


@pytest.fixture(scope="module")
def corpus():
    return np.random.default_rng(0).standard_normal((N, D), dtype=np.float32)


@pytest.fixture(scope="module")
def tables(corpus):
    return {"fp32": corpus, "fp16": quantize_rows(corpus, "fp16"), "int8": quantize_rows(corpus, "int8")}


def _rotating(B, n_sets=8, seed=1):
    rng = np.random.default_rng(seed)
    sets = [rng.standard_normal((B, D), dtype=np.float32) for _ in range(n_sets)]
    state = {"i": 0}

    def next_set():
        state["i"] = (state["i"] + 1) % n_sets
        return sets[state["i"]]
    return next_set


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("B", [1, 16, 256])
def test_topk_cpu(benchmark, tables, dtype, B):
    queries = _rotating(B)
    with use_backend("cpu"):
        topk(queries(), tables[dtype], 100)  # compile / load from cache
        benchmark(lambda: topk(queries(), tables[dtype], 100))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_topk_cpu_metrics(benchmark, corpus, metric):
    queries = _rotating(16)
    topk(queries(), corpus, 100, metric=metric)
    benchmark(lambda: topk(queries(), corpus, 100, metric=metric))


def test_topk_cpu_exclude_1_percent(benchmark, corpus):
    rng = np.random.default_rng(2)
    excluded = (np.arange(17, dtype=np.int64) * (N // 100),
                np.concatenate([rng.choice(N, N // 100, replace=False) for _ in range(16)]).astype(np.int64))
    queries = _rotating(16)
    topk(queries(), corpus, 100, exclude=excluded)
    benchmark(lambda: topk(queries(), corpus, 100, exclude=excluded))


def test_item_index_search_while_catalogue_changes(benchmark, corpus):
    index = ItemIndex(D)
    index.add(np.arange(N), corpus)
    queries = _rotating(1)
    rng = np.random.default_rng(3)

    def churn_and_search():
        ids = rng.integers(0, N, 64)
        index.remove(ids)
        index.add(ids, corpus[ids])
        return index.search(queries(), 100)

    churn_and_search()
    benchmark(churn_and_search)


@requires_cuda
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
@pytest.mark.parametrize("B", [1, 256])
def test_topk_triton(benchmark, tables, dtype, B):
    import torch
    table = tables[dtype].to("cuda")
    queries = torch.from_numpy(_rotating(B)()).cuda()
    topk(queries, table, 100)
    torch.cuda.synchronize()

    def run():
        out = topk(queries, table, 100)
        torch.cuda.synchronize()
        return out
    benchmark(run)
