"""topk backends ("cpu", "triton") against the reference: ids, scores, ties, padding, exclusions."""
import contextlib
import threading
from unittest import mock
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recscore.bindings import _topk_scan
from recscore.bindings._cpu import DTYPE_CODES
from recscore.kernels import RowTable, quantize_rows, topk, use_backend
from recscore.kernels._cpu import DETECTED, LEVELS, use_cpu_level
from recscore.kernels.topk import cpu as topk_cpu
from recscore.kernels.topk.reference import score_block

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


def reference_topk(queries, corpus, k, metric="ip", exclude=None):
    with use_backend("reference"):
        return topk(queries, corpus, k, metric=metric, exclude=exclude)


def cpu_topk(queries, corpus, k, metric="ip", exclude=None):
    with use_backend("cpu"):
        return topk(queries, corpus, k, metric=metric, exclude=exclude)


def triton_topk(queries, corpus, k, metric="ip", exclude=None, device="cpu"):
    table = torch.from_numpy(corpus).to(device) if isinstance(corpus, np.ndarray) else corpus.to(device)
    with use_backend("triton"):
        scores, ids = topk(torch.from_numpy(queries).to(device), table, k, metric=metric, exclude=exclude)
    return scores.cpu().numpy(), ids.cpu().numpy()


def integer_data(rng, n, d, low=-3, high=4):
    """Small integers: every product and sum is exact in float32, and ties are common."""
    return rng.integers(low, high, (n, d)).astype(np.float32)


def writable_copy(table):
    """A RowTable equal to `table` with storage the test may write (tables are read-only)."""
    return RowTable(table.dtype, table.shape, *(None if a is None else np.array(a)
                                                 for a in (table.data, table.scale, table.bias)))


def random_exclusions(rng, n_queries, n_rows, most):
    """A CSR of unsorted, repeated ids per query, from none up to `most` of the rows."""
    lists = [rng.integers(0, n_rows, rng.integers(0, most + 1)) if n_rows else np.zeros(0, np.int64)
             for _ in range(n_queries)]
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    return indptr, np.concatenate(lists + [np.zeros(0)]).astype(np.int64)


def assert_close_topk(got, want, queries, corpus, metric, exclude=None, atol=1e-4):
    """Equal up to near-ties: each rank's score (recomputed exactly for the id we returned)
    matches the reference's score at that rank, ids are distinct, allowed, and padding agrees."""
    (got_s, got_i), (want_s, want_i) = got, want
    assert got_s.dtype == np.float32 and got_i.dtype == np.int64 and got_s.shape == want_s.shape
    np.testing.assert_array_equal(got_i < 0, want_i < 0)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=atol)
    rows = corpus.dequantize() if hasattr(corpus, "dequantize") else corpus
    for q in range(len(got_i)):
        ids = got_i[q][got_i[q] >= 0]
        assert len(set(ids.tolist())) == len(ids)
        if exclude is not None:
            assert not set(ids.tolist()) & set(exclude[1][exclude[0][q]:exclude[0][q + 1]].tolist())
        exact = score_block(queries[q].astype(np.float64), rows[ids].astype(np.float64), metric)
        np.testing.assert_allclose(exact, want_s[q][:len(ids)], rtol=1e-4, atol=atol)


# ---- CPU: every test at every CPU vector level (the cpu_level fixture) -------------------------

def c_scan_topk(queries, corpus, k, metric="ip", exclude=None, run=cpu_topk):
    """The CPU backend at the fixture's level (run: topk_cpu.topk for inputs the public API would
    refuse). Each call runs twice: as it comes (these small corpora scan on the calling thread, under
    SERIAL_SCAN_BELOW) and with the scan split across threads as for big corpora (chunks, per-thread
    top-k, merge), which must give the same result."""
    want = run(queries, corpus, k, metric, exclude)
    with mock.patch.object(topk_cpu, "SERIAL_SCAN_BELOW", 0):
        split = run(queries, corpus, k, metric, exclude)
    np.testing.assert_array_equal(split[0], want[0])
    np.testing.assert_array_equal(split[1], want[1])
    return want


# one query at a time below 5 queries (11 on int8 rows), panels from there: both sides of both edges
BATCHES = [(1, 7), (2, 5), (4, 3), (5, 2), (7, 1), (8, 1), (9, 64), (10, 4), (11, 5), (17, 10), (64, 3)]


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("d", [1, 3, 17, 33, 100, 385])
def test_cpu_exact_on_integer_data(rng, cpu_level, dtype, metric, d):
    """Integer-valued data: ids and scores equal the reference's exactly, ties included. One query at
    a time against groups of rows (B < 5), panels with a partial last one, blocks of 1 to all panels,
    partial row blocks and tiles, vector tails of every length, exclusions, k > candidates."""
    n = 1100 if d < 100 else 300   # several tiles for small d
    corpus = quantize_rows(integer_data(rng, n, d), dtype)
    for B, k in BATCHES + [(3, n), (2, n + 7), (40, n + 1)]:
        queries = integer_data(rng, B, d)
        exclude = random_exclusions(rng, B, n, n // 3) if B % 2 else None
        got = c_scan_topk(queries, corpus, k, metric, exclude)
        want = reference_topk(queries, corpus, k, metric, exclude)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8", "int4"])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("d", [1, 17, 41, 385])
def test_cpu_close_on_random_data(rng, cpu_level, dtype, metric, d):
    """Every dtype and metric (int8 with B < 11: codes scored where they lie), odd d (int4 rows end in
    half a byte), exclusions, k > N."""
    n = 1500 if d < 100 else 400
    corpus = quantize_rows(rng.standard_normal((n, d)).astype(np.float32), dtype)
    for B, k in BATCHES + [(3, n + 2)]:
        queries = rng.standard_normal((B, d)).astype(np.float32)
        exclude = random_exclusions(rng, B, n, n // 3)
        got = c_scan_topk(queries, corpus, k, metric, exclude)
        assert_close_topk(got, reference_topk(queries, corpus, k, metric, exclude), queries, corpus, metric, exclude)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("d", [5, 64])
def test_cpu_int8_few_queries(rng, cpu_level, metric, d):
    """int8 with fewer than 11 queries is scored on its codes where they lie (B = 11, 35: query panels
    on dequantized tiles): several tiles, exclusions, a partial last tile."""
    corpus = quantize_rows(rng.standard_normal((1300, d)).astype(np.float32), "int8")
    for B, k in [(1, 1), (1, 30), (2, 7), (3, 1300), (10, 9), (11, 3), (35, 20)]:
        queries = rng.standard_normal((B, d)).astype(np.float32)
        exclude = random_exclusions(rng, B, 1300, 400)
        for ex in (None, exclude):
            got = c_scan_topk(queries, corpus, k, metric, ex)
            assert_close_topk(got, reference_topk(queries, corpus, k, metric, ex), queries, corpus, metric, ex)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_cpu_int8_bound_is_exact(rng, cpu_level, metric):
    """The integer bound only skips rows that cannot enter: the answer equals scoring every group in
    float. Every row is row 0 with one code moved by one (rows i and i + d are equal: ties), so scores
    differ by one query value, and query values by less than the step they are quantized with."""
    for d, n in [(5, 3000), (17, 1500), (64, 2500), (70, 1500), (1000, 300)]:
        table = writable_copy(quantize_rows(rng.standard_normal((n, d)).astype(np.float32), "int8"))
        table.data[:] = table.data[0]
        table.data[np.arange(n), np.arange(n) % d] ^= 1
        table.scale[:], table.bias[:] = table.scale[0], table.bias[0]
        for B, k in [(1, 1), (3, 50), (7, n + 1)]:
            # few distinct values a query, each blurred below the quantization step: near-ties everywhere
            queries = (integer_data(rng, B, d) / 2 + rng.standard_normal((B, d)) * 1e-5).astype(np.float32)
            queries[0] = 0 if B == 3 else queries[0]   # a zero query: nothing to quantize
            queries[-1, 0] = 1000 if B == 7 else queries[-1, 0]   # the rest under the int16 step: a wide bound
            exclude = random_exclusions(rng, B, n, n // 4)
            got = c_scan_topk(queries, table, k, metric, exclude)
            with mock.patch.object(topk_cpu, "INT8_BOUND", False):
                want = c_scan_topk(queries, table, k, metric, exclude)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_cpu_exclusions_heavy_and_empty(rng, cpu_level, metric):
    corpus = integer_data(rng, 2000, 8)
    queries = integer_data(rng, 6, 8)
    lists = [np.arange(2000), np.zeros(0), rng.permutation(2000)[:1990], np.array([5, 5, 5, 1999, 0]),
             np.arange(0, 2000, 2), np.zeros(0)]
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    exclude = (indptr, np.concatenate(lists).astype(np.int64))
    got = c_scan_topk(queries, corpus, 20, metric, exclude)
    want = reference_topk(queries, corpus, 20, metric, exclude)
    if metric == "cosine":
        assert_close_topk(got, want, queries, corpus, metric, exclude)
    else:
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    assert (got[1][0] == -1).all() and (got[1][2][10:] == -1).all()
    empty = (np.zeros(7, np.int64), np.zeros(0, np.int64))
    np.testing.assert_array_equal(cpu_topk(queries, corpus, 20, metric, empty)[1],
                                  cpu_topk(queries, corpus, 20, metric)[1])


def test_cpu_edge_shapes(rng, cpu_level):
    corpus = integer_data(rng, 1, 4)
    for metric, fill in [("ip", -np.inf), ("cosine", -np.inf), ("l2", np.inf)]:
        for B in (2, 8):
            scores, ids = c_scan_topk(integer_data(rng, B, 4), corpus, 3, metric)
            assert (ids[:, 0] == 0).all() and (ids[:, 1:] == -1).all() and (scores[:, 1:] == fill).all()
        scores, ids = cpu_topk(np.zeros((0, 4), np.float32), corpus, 3, metric)
        assert scores.shape == (0, 3) and ids.shape == (0, 3)
        for B in (2, 9):
            scores, ids = c_scan_topk(integer_data(rng, B, 4), np.zeros((0, 4), np.float32), 2, metric)
            assert (ids == -1).all() and (scores == fill).all()


def test_cpu_all_ties_and_large_k(rng, cpu_level):
    """Every score equal: the k smallest ids, in order; k up to 4096, one query and panels."""
    corpus = np.ones((5000, 3), np.float32)
    for B in (2, 9):
        for k in (1, 100, 4096):
            scores, ids = c_scan_topk(np.ones((B, 3), np.float32), corpus, k)
            assert (ids == np.arange(k)).all() and (scores == 3).all()
    corpus = integer_data(rng, 9000, 4, -1, 2)
    queries = integer_data(rng, 9, 4, -1, 2)
    for B in (3, 9):
        got, want = c_scan_topk(queries[:B], corpus, 4096, "l2"), reference_topk(queries[:B], corpus, 4096, "l2")
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_cpu_ties_heavy_exclusions_and_halves(rng, cpu_level):
    table = quantize_rows(np.ones((5000, 3), np.float32), "fp32")
    queries = np.ones((9, 3), np.float32)
    lists = [np.arange(5000), np.zeros(0), np.arange(0, 5000, 2), np.array([4999, 0, 0])] + [np.zeros(0)] * 5
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    exclude = (indptr, np.concatenate(lists).astype(np.int64))
    scores, ids = c_scan_topk(queries, table, 20, "l2", exclude)
    assert (ids[0] == -1).all() and (scores[0] == np.inf).all()
    assert ids[2].tolist() == list(range(1, 40, 2)) and ids[3].tolist() == list(range(1, 21))
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16)   # every finite half >= 0, subnormals too
    for B in (1, 8):
        scores, ids = c_scan_topk(np.ones((B, 1), np.float32), quantize_rows(halves[:, None], "fp16"), 5000)
        assert (ids == np.arange(0x7BFF, 0x7BFF - 5000, -1)).all() and (scores == halves[ids].astype(np.float32)).all()
        scores, ids = c_scan_topk(-np.ones((B, 1), np.float32), quantize_rows(halves[:, None], "fp16"), 5)
        assert (ids == np.arange(5)).all() and (scores == -halves[:5].astype(np.float32)).all()


def test_cpu_cosine_zero_vectors(cpu_level):
    corpus = np.array([[0, 0], [1, 0], [0, 0], [-1, 0]], np.float32)
    for B in (2, 8):
        queries = np.zeros((B, 2), np.float32)
        queries[0, 0] = 2.0
        scores, ids = c_scan_topk(queries, corpus, 4, "cosine")
        assert ids[:2].tolist() == [[1, 0, 2, 3], [0, 1, 2, 3]]
        assert scores[:2].tolist() == [[1.0, 0.0, 0.0, -1.0], [0.0] * 4]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38])
def test_cpu_non_finite_corpus_raises(cpu_level, bad):
    """A NaN or inf value (or one whose score overflows) anywhere in the corpus, every dtype (int8/int4:
    in a row's scale), every metric, one query and panels."""
    tables = []
    for dtype in ("fp32", "fp16", "bf16", "int8", "int4"):
        table = writable_copy(quantize_rows(np.tile(np.arange(5, dtype=np.float32), (1200, 1)), dtype))
        if dtype in ("int8", "int4"):
            table.scale[1100] = bad
        elif dtype == "fp16":
            table.data[1100, 2] = np.inf if bad == 3e38 else bad
        elif dtype == "bf16":
            table.data[1100, 2] = np.array([bad], np.float32).view(np.uint32)[0] >> 16
        else:
            table.data[1100, 2] = bad
        tables.append(table)
    for table in tables:
        for metric in ("ip", "l2", "cosine"):
            for B in (1, 20):
                with pytest.raises(ValueError, match="corpus contains NaN or inf"):
                    c_scan_topk(np.full((B, 5), 2, np.float32), table, 3, metric)


def test_cpu_overflowing_scores_raise(cpu_level):
    corpus = np.full((10, 4), 3e38, np.float32)
    for B in (1, 8):
        with pytest.raises(ValueError, match="corpus contains NaN or inf"):
            cpu_topk(np.ones((B, 4), np.float32), corpus, 2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 20), st.integers(1, 1300), st.integers(1, 40), st.integers(1, 40),
       st.sampled_from(["ip", "l2"]), st.sampled_from(["fp32", "fp16", "bf16"]), st.integers(0, 2**32 - 1))
def test_cpu_matches_reference_property(cpu_level, B, n, d, k, metric, dtype, seed):
    rng = np.random.default_rng(seed)
    corpus = quantize_rows(integer_data(rng, n, d, -2, 3), dtype)
    queries = integer_data(rng, B, d, -2, 3)
    exclude = random_exclusions(rng, B, n, n)
    got = cpu_topk(queries, corpus, k, metric, exclude)
    want = reference_topk(queries, corpus, k, metric, exclude)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_cpu_torch_inputs_and_threads(rng, cpu_level):
    """CPU tensors in, CPU tensors out; many host threads at once get their own answers."""
    corpus = rng.standard_normal((3000, 16)).astype(np.float32)
    batches = [rng.standard_normal((b, 16)).astype(np.float32) for b in (1, 2, 40, 7, 1, 33)]
    want = [cpu_topk(q, corpus, 15) for q in batches]
    scores, ids = topk(torch.from_numpy(batches[0]), torch.from_numpy(corpus), 15)
    assert isinstance(ids, torch.Tensor) and np.array_equal(ids.numpy(), want[0][1])
    results = [None] * len(batches)

    def work(i):
        with use_cpu_level(cpu_level):   # a new thread starts at the default level
            for _ in range(5):
                results[i] = topk(batches[i], corpus, 15)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(results, want):
        np.testing.assert_array_equal(got[1], expected[1])


def test_cpu_exclusions_sorted_by_tile_with_ties(rng, cpu_level):
    """The scan sorts each query's ids by tile itself: unsorted, repeated ids on tile and chunk
    boundaries, a CSR that starts past 0, every score tied (the smallest ids not excluded win), one
    query (groups of rows) and batches (panels)."""
    n, d = 7001, 3
    table = quantize_rows(np.ones((n, d), np.float32), "fp32")
    for B in (1, 5, 16, 37):
        tile_rows = _topk_scan.tile_rows(LEVELS.index(cpu_level), DTYPE_CODES["fp32"], B, d)
        edges = np.array([0, 1, tile_rows - 1, tile_rows, tile_rows + 1, 2 * tile_rows, n - 1], np.int64)
        lists = [rng.permutation(np.concatenate([edges, edges[::2], rng.integers(0, 60, 40)]))
                 if q % 3 else np.zeros(0, np.int64) for q in range(B)]
        lists[-1] = np.arange(n)[::-1]   # every row: nothing left
        indptr = 3 + np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
        ids_in = np.concatenate([np.full(3, 5)] + lists).astype(np.int64)   # 3 leading ids no query owns
        for k in (1, 50, 4100):
            scores, ids = c_scan_topk(np.ones((B, d), np.float32), table, k, "ip", (indptr, ids_in), topk_cpu.topk)
            for q in range(B):
                allowed = np.setdiff1d(np.arange(n), lists[q])[:k]
                assert ids[q, :len(allowed)].tolist() == allowed.tolist(), (B, k, q)
                assert (ids[q, len(allowed):] == -1).all() and (scores[q, :len(allowed)] == d).all()


def test_cpu_exclusions_random_against_reference(rng, cpu_level):
    """Random data, many tiles: each query's 0..30% excluded, as the reference answers."""
    corpus = quantize_rows(rng.standard_normal((9000, 16)).astype(np.float32), "fp32")
    for B in (1, 3, 20):
        queries = rng.standard_normal((B, 16)).astype(np.float32)
        exclude = random_exclusions(rng, B, 9000, 2700)
        for metric in ("ip", "l2"):
            got = c_scan_topk(queries, corpus, 40, metric, exclude)
            assert_close_topk(got, reference_topk(queries, corpus, 40, metric, exclude), queries, corpus, metric,
                              exclude)


def test_cpu_batch_equals_single_queries(rng, cpu_level):
    """A batch (query panels) answers each query as it is answered alone (one query against a group of rows)."""
    corpus = integer_data(rng, 3000, 20)
    queries = integer_data(rng, 19, 20)
    batch = cpu_topk(queries, corpus, 25, "l2")
    one_by_one = [cpu_topk(q[None], corpus, 25, "l2") for q in queries]
    np.testing.assert_array_equal(batch[1], np.concatenate([ids for _, ids in one_by_one]))
    np.testing.assert_array_equal(batch[0], np.concatenate([s for s, _ in one_by_one]))


def test_cpu_scan_refuses_levels_this_cpu_lacks():
    """Whatever level a caller passes, the C entry runs none above the CPU's (no illegal instruction)."""
    rows, queries = np.zeros((10, 4), np.float32), np.zeros((3, 4), np.float32)
    none, no_ids = np.zeros(0, np.float32), np.zeros(0, np.int64)
    for level in (-1, DETECTED + 1, 4, 99):
        with pytest.raises(ValueError, match="CPU level"):
            _topk_scan.scan(level, 0, rows, none, none, queries, 0, 2, no_ids, no_ids, 1, True,
                            np.zeros((3, 2), np.float32), np.zeros((3, 2), np.int64))
        with pytest.raises(ValueError, match="CPU level"):
            _topk_scan.tile_rows(level, DTYPE_CODES["fp32"], 3, 4)


def test_cpu_scan_rejects_inconsistent_buffers():
    """The binding checks every shape and offset the C code trusts (it must never read out of bounds)."""
    rows, queries, none = np.zeros((10, 4), np.float32), np.zeros((3, 4), np.float32), np.zeros(0, np.float32)
    no_ids = no_ptr = np.zeros(0, np.int64)

    def scan(rows=rows, kind=0, scale=none, bias=none, queries=queries, k=2, ptr=no_ptr, ids=no_ids,
             scores=None, out_ids=None, threads=1, metric=0):
        scores = np.zeros((len(queries), k), np.float32) if scores is None else scores
        out_ids = np.zeros((len(queries), k), np.int64) if out_ids is None else out_ids
        _topk_scan.scan(0, kind, rows, scale, bias, queries, metric, k, ptr, ids, threads, True, scores, out_ids)

    scan()
    cases = [dict(rows=np.zeros((10, 5), np.float32)), dict(kind=4, rows=np.zeros((10, 4), np.uint8)),
             dict(kind=3, rows=np.zeros((10, 4), np.uint8), scale=np.ones(9, np.float32), bias=np.ones(9, np.float32)),
             dict(scale=np.ones(10, np.float32), bias=np.ones(10, np.float32)), dict(kind=7), dict(metric=3),
             dict(k=0), dict(threads=0), dict(scores=np.zeros((3, 3), np.float32)), dict(out_ids=np.zeros((2, 2), np.int64)),
             dict(ptr=np.zeros(3, np.int64)), dict(ptr=np.zeros((3, 4), np.int64)),
             dict(ptr=np.array([0, 1, 1, 2], np.int64), ids=np.zeros(1, np.int64)),
             dict(ptr=np.array([-1, 0, 0, 0], np.int64)), dict(ptr=np.array([0, 1, 0, 1], np.int64), ids=no_ids + 1)]
    for case in cases:
        with pytest.raises((ValueError, TypeError)):
            scan(**case)


# ---- int8 recall ------------------------------------------------------------------------

def recall_at(got_ids, exact_ids):
    return np.mean([len(set(g) & set(e)) / len(e) for g, e in zip(got_ids, exact_ids)])


def test_int8_recall_random_normal(cpu_level):
    """The same data at every level: recall@100 of exact int8 scores themselves is 0.989 to 0.995
    across seeds here, so the bound is a property of the data, which every level must reproduce."""
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((20000, 64)).astype(np.float32)
    queries = rng.standard_normal((20, 64)).astype(np.float32)
    for metric in ("ip", "cosine", "l2"):
        exact = cpu_topk(queries, corpus, 100, metric)[1]
        for B in (1, 20):   # one query at a time (codes where they lie) and panels
            got = np.concatenate([cpu_topk(queries[i:i + B], quantize_rows(corpus, "int8"), 100, metric)[1]
                                  for i in range(0, 20, B)])
            assert recall_at(got, exact) >= 0.99, (metric, B)


def movielens_vectors(dim=32):
    """Item and user vectors from a truncated SVD of the MovieLens ratings (users x movies)."""
    ratings = np.loadtxt(MOVIELENS / "ratings.csv", delimiter=",", skiprows=1, usecols=(0, 1, 2))
    users = np.unique(ratings[:, 0], return_inverse=True)[1]
    movies = np.unique(ratings[:, 1], return_inverse=True)[1]
    matrix = np.zeros((users.max() + 1, movies.max() + 1))
    matrix[users, movies] = ratings[:, 2]
    values, vectors = np.linalg.eigh(matrix @ matrix.T)  # users x users: small, gives the SVD
    top = np.argsort(values)[::-1][:dim]
    singular = np.sqrt(values[top])
    items = (matrix.T @ vectors[:, top]) / singular
    user_vectors = vectors[:, top] * singular
    return items.astype(np.float32), user_vectors.astype(np.float32)


@pytest.mark.skipif(not MOVIELENS.is_dir(), reason=f"MovieLens data not found at {MOVIELENS}")
def test_int8_recall_movielens(cpu_level):
    """ip and l2. (cosine normalises the many tiny vectors of rarely rated movies, whose int8 rows
    are relatively coarse: recall@100 of the exact int8 scores themselves is about 0.989 there.)"""
    items, users = movielens_vectors()
    for metric in ("ip", "l2"):
        exact = cpu_topk(users, items, 100, metric)[1]
        got = cpu_topk(users, quantize_rows(items, "int8"), 100, metric)[1]
        assert recall_at(got, exact) >= 0.99, metric


# ---- Triton (the interpreter on CPU tensors when there is no GPU) ---------------------------

@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_triton_exact_on_integer_data(rng, triton_device, metric):
    corpus = integer_data(rng, 150, 3, -2, 3)
    queries = integer_data(rng, 18, 3, -2, 3)
    exclude = random_exclusions(rng, 18, 150, 40)
    for rows, k, ex in [(150, 5, None), (150, 9, exclude), (12, 16, random_exclusions(rng, 18, 12, 5))]:
        got = triton_topk(queries, corpus[:rows], k, metric, ex, triton_device)
        want = reference_topk(queries, corpus[:rows], k, metric, ex)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_triton_single_query(rng, triton_device, metric):
    """B = 1 scores without tl.dot (BLOCK_Q = 1): same answers, exclusions and int8 rows too."""
    corpus = integer_data(rng, 150, 5, -2, 3)
    query = integer_data(rng, 1, 5, -2, 3)
    exclude = random_exclusions(rng, 1, 150, 30)
    for k, ex in [(7, None), (20, exclude), (200, exclude)]:
        got = triton_topk(query, corpus, k, metric, ex, triton_device)
        want = reference_topk(query, corpus, k, metric, ex)
        if metric == "cosine":  # rows at one angle tie only up to rounding
            assert_close_topk(got, want, query, corpus, metric, ex)
        else:  # integer data: exact scores
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])
    table = quantize_rows(rng.standard_normal((90, 24)).astype(np.float32), "int8")
    query = rng.standard_normal((1, 24)).astype(np.float32)
    assert_close_topk(triton_topk(query, table, 6, metric, None, triton_device),
                      reference_topk(query, table, 6, metric), query, table, metric)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_triton_quantized_and_cosine(rng, triton_device, dtype):
    corpus = quantize_rows(rng.standard_normal((200, 40)).astype(np.float32), dtype)
    queries = rng.standard_normal((3, 40)).astype(np.float32)
    for metric in ("ip", "cosine"):
        got = triton_topk(queries, corpus, 8, metric, None, triton_device)
        assert_close_topk(got, reference_topk(queries, corpus, 8, metric), queries, corpus, metric)


def test_triton_edges(rng, triton_device):
    corpus = integer_data(rng, 1, 4)
    scores, ids = triton_topk(integer_data(rng, 2, 4), corpus, 3, "l2", None, triton_device)
    assert (ids[:, 0] == 0).all() and (ids[:, 1:] == -1).all() and (scores[:, 1:] == np.inf).all()
    scores, ids = triton_topk(np.zeros((0, 4), np.float32), corpus, 3, "ip", None, triton_device)
    assert scores.shape == (0, 3)
    bad = np.ones((40, 4), np.float32)
    bad[7, 1] = np.nan
    for metric in ("ip", "l2", "cosine"):   # cosine too: a NaN row is not a zero vector scored 0
        for queries in (np.ones((1, 4), np.float32), np.ones((20, 4), np.float32)):
            with pytest.raises(ValueError, match="corpus contains NaN or inf"):
                triton_topk(queries, bad, 2, metric, None, triton_device)


@pytest.mark.parametrize("dtype, d, k, warning", [
    ("int4", 24, 5, "no Triton kernel for int4 rows"), ("int4", 7, 500, "no Triton kernel for int4 rows"),
    ("fp32", 24, 257, "at most k = 256"), ("int8", 24, 400, "at most k = 256"), ("bf16", 5, 300, "at most k = 256"),
    ("fp16", 24, 257, "at most k = 256")])
@pytest.mark.filterwarnings("ignore:topk's Triton kernel keeps at most")   # the exact-ties part, k = 300
def test_triton_torch_path_for_int4_rows_and_large_k(rng, triton_device, monkeypatch, dtype, d, k, warning):
    """int4 rows and k past the kernel's register budget are scored with torch matmuls, chunk by
    chunk (here 1-4 rows a chunk, so the running best merges many chunks), announced once."""
    from recscore.kernels import _backend
    from recscore.kernels.topk import triton as topk_triton
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(topk_triton, "TORCH_CHUNK_ELEMENTS", 21)
    corpus = quantize_rows(rng.standard_normal((300, d)).astype(np.float32), dtype)
    queries = rng.standard_normal((3, d)).astype(np.float32)
    exclude = random_exclusions(rng, 3, 300, 20)
    for metric, ex in (("ip", exclude), ("l2", exclude), ("cosine", None)):
        with pytest.warns(RuntimeWarning, match=warning) if metric == "ip" else contextlib.nullcontext():
            got = triton_topk(queries, corpus, k, metric, ex, triton_device)
        assert_close_topk(got, reference_topk(queries, corpus, k, metric, ex), queries, corpus, metric, ex)
    integers = integer_data(rng, 150, 4, -2, 3)   # exact scores, many ties: ids must match exactly
    for metric in ("ip", "l2"):
        got = triton_topk(integers[:5], integers, 300, metric, exclude=None, device=triton_device)
        want = reference_topk(integers[:5], integers, 300, metric)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    bad = np.ones((40, 4), np.float32)
    bad[33, 2] = np.inf
    for metric in ("ip", "l2", "cosine"):
        with pytest.raises(ValueError, match="corpus contains NaN or inf"):
            triton_topk(np.ones((2, 4), np.float32), bad, 260, metric, None, triton_device)


@pytest.mark.filterwarnings("ignore:topk's Triton kernel keeps at most", "ignore:topk has no Triton kernel for int4")
def test_triton_torch_path_edges(rng, triton_device, monkeypatch):
    """The torch path on B = 0, N = 0, D = 1, zero vectors under cosine, a fused int8 table, and
    with TF32 matmuls allowed globally (its float64 products must not change)."""
    from recscore.kernels.topk import triton as topk_triton
    monkeypatch.setattr(topk_triton, "TORCH_CHUNK_ELEMENTS", 16)
    corpus = integer_data(rng, 40, 1, -2, 3)
    corpus[[3, 9]] = 0.0
    queries = np.concatenate([integer_data(rng, 2, 1, -2, 3), np.zeros((1, 1), np.float32)])
    for metric in ("ip", "l2", "cosine"):
        got = triton_topk(queries, corpus, 300, metric, None, triton_device)
        want = reference_topk(queries, corpus, 300, metric)
        if metric == "cosine":
            assert_close_topk(got, want, queries, corpus, metric)
        else:
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])
    for queries, rows in ((np.zeros((0, 4), np.float32), 10), (np.ones((2, 4), np.float32), 0)):
        table = quantize_rows(rng.standard_normal((rows, 4)).astype(np.float32), "int4")
        scores, ids = triton_topk(queries, table, 3, "l2", None, triton_device)
        assert scores.shape == ids.shape == (queries.shape[0], 3) and (ids == -1).all() and (scores == np.inf).all()
    table = quantize_rows(rng.standard_normal((90, 12)).astype(np.float32), "int8")
    queries = rng.standard_normal((4, 12)).astype(np.float32)
    exclude = random_exclusions(rng, 4, 90, 30)
    want = reference_topk(queries, table, 290, "ip", exclude)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got = triton_topk(queries, table.fused(), 290, "ip", exclude, triton_device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert_close_topk(got, want, queries, table, "ip", exclude)


def test_triton_copies_a_strided_corpus_with_a_warning(rng, triton_device, monkeypatch):
    """A fused int8 table (codes, scale and bias strided in one buffer) and a column slice of a
    float tensor: the kernel reads rows at n * D, so strided rows are copied, with a warning."""
    from recscore.kernels import _backend
    monkeypatch.setattr(_backend, "_warned", set())
    table = quantize_rows(rng.standard_normal((60, 16), dtype=np.float32), "int8")
    queries = rng.standard_normal((3, 16), dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="not contiguous"):
        got = triton_topk(queries, table.fused(), 6, "l2", None, triton_device)
    assert_close_topk(got, reference_topk(queries, table, 6, "l2"), queries, table, "l2")
    monkeypatch.setattr(_backend, "_warned", set())
    wide = rng.standard_normal((60, 40)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="not contiguous"):   # sliced on the device: the kernel sees the stride
        got = triton_topk(queries, torch.from_numpy(wide).to(triton_device)[:, 8:24], 6, "ip", None, triton_device)
    assert_close_topk(got, reference_topk(queries, wide[:, 8:24], 6, "ip"), queries, wide[:, 8:24], "ip")


def test_cpu_warns_when_it_must_copy_a_strided_corpus(rng, cpu_level, monkeypatch):
    """A fused int8 table (strided codes) still gives the same answer, but the per-call copy is announced."""
    from recscore.kernels import _backend
    monkeypatch.setattr(_backend, "_warned", set())
    table = quantize_rows(rng.standard_normal((50, 16), dtype=np.float32), "int8")
    queries = rng.standard_normal((2, 16), dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="not contiguous"):
        fused_scores, fused_ids = topk(queries, table.fused(), 5)
    scores, ids = topk(queries, table, 5)
    np.testing.assert_array_equal(fused_ids, ids)
    np.testing.assert_array_equal(fused_scores, scores)
