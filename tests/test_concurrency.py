"""The CPU kernels called from several threads at once, at every CPU level (the workers run at the
test's level), each result compared with the reference.

Every call is large enough to run its OpenMP parallel region (embedding_bag above
EB_PARALLEL_MIN_COST, about bytes read; topk above SERIAL_SCAN_BELOW; qmatmul above
SINGLE_THREAD_MACS), so the parallel regions of different calls overlap. Data are small integers
where the kernel's sums are then exact (embedding fp32 rows, top-k scores), so those results must
equal the reference exactly; the others are compared with a tolerance far below what a call that
read another call's buffers would be off by.
"""
import functools

import numpy as np
import pytest
from threads import run_workers

from recscore.kernels import ItemIndex, TableBatch, qmatmul, quantize_matrix, quantize_rows, topk, use_backend

THREADS = 6
CALLS = 3            # per worker
TIMEOUT_S = 60       # per test: a deadlock fails it
DIM = 64
ROWS = 40_000        # 10 MB of fp32 rows: a top-k scan over SERIAL_SCAN_BELOW (8 MB)
BAGS, BAG_LENGTH = 1024, 16   # 16k rows of 320 bytes of cost each: 5 MB, over EB_PARALLEL_MIN_COST (3 MB)
QUERIES, K = 8, 10
MATRIX = (2048, 2560)   # M = 1 is 5.2M multiply-adds, over SINGLE_THREAD_MACS (4.2M)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(16)
    rows = rng.integers(-3, 4, (ROWS, DIM)).astype(np.float32)
    int8_table = quantize_rows(rng.standard_normal((ROWS // 2, 48)).astype(np.float32), "int8")
    return {"rows": rows, "rng": rng, "tables": TableBatch([rows, int8_table]),
            "corpora": {"fp32": rows, "fp16": quantize_rows(rows, "fp16")},
            "matrix": quantize_matrix(rng.standard_normal(MATRIX).astype(np.float32), "int8")}


def bags(rng, tables):
    lengths = np.full(BAGS * tables.num_tables, BAG_LENGTH)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate([rng.integers(0, rows, BAGS * BAG_LENGTH) for rows in tables.rows])
    return indices, offsets


def with_reference(call):
    with use_backend("reference"):
        return call()


def check_calls(cases, compare):
    """Run every case's call CALLS times in each of THREADS workers at once (worker i takes case
    i % len(cases)), comparing each result with the case's expected one."""
    def worker(call, expected):
        for _ in range(CALLS):
            compare(call(), expected)
    run_workers([functools.partial(worker, *cases[i % len(cases)]) for i in range(THREADS)], timeout=TIMEOUT_S)


def equal_results(got, want):
    for got_part, want_part in zip(got, want):
        np.testing.assert_array_equal(got_part, want_part)


def test_embedding_bag_from_threads(cpu_level, data):
    tables = data["tables"]
    cases = []
    for _ in range(THREADS):
        indices, offsets = bags(data["rng"], tables)
        call = functools.partial(tables.lookup, indices, offsets)
        cases.append((call, with_reference(call)))
    check_calls(cases, lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4))


def test_topk_from_threads(cpu_level, data):
    cases = []
    for i in range(THREADS):
        queries = data["rng"].integers(-3, 4, (QUERIES, DIM)).astype(np.float32)
        corpus = data["corpora"]["fp32" if i % 2 else "fp16"]
        call = functools.partial(topk, queries, corpus, K, metric=("ip", "l2")[i % 2])
        cases.append((call, with_reference(call)))
    check_calls(cases, equal_results)


def test_qmatmul_from_threads(cpu_level, data):
    qm = data["matrix"]
    cases = []
    for i in range(THREADS):
        x = data["rng"].standard_normal((1 + 3 * (i % 3), MATRIX[1])).astype(np.float32)   # M = 1, 4, 7
        want = with_reference(lambda: qmatmul(x, qm))
        # The VNNI kernels quantize x (qmatmul's docstring): the serial result, checked against the
        # reference once, is what every concurrent call must give.
        serial = qmatmul(x, qm)
        assert np.linalg.norm(serial - want) <= 1e-2 * np.linalg.norm(want)
        cases.append((functools.partial(qmatmul, x, qm), serial))
    check_calls(cases, lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5))


def test_item_index_adds_and_searches_from_threads(cpu_level, data):
    """Searches while other threads add and remove items that can never rank (vectors of -100 against
    positive queries): every search must return exactly the reference's top-k of the fixed items."""
    index = ItemIndex(DIM)
    ids = np.arange(ROWS, dtype=np.int64) * 3
    index.add(ids, data["rows"])
    searches = []
    for _ in range(THREADS - 2):
        queries = data["rng"].integers(1, 4, (QUERIES, DIM)).astype(np.float32)
        scores, rows = with_reference(lambda: topk(queries, data["rows"], K))
        searches.append((queries, scores, ids[rows]))

    def writer(first_id):
        cold = np.full((500, DIM), -100, np.float32)
        for step in range(4 * CALLS):
            new = first_id + np.arange(500, dtype=np.int64) + 1000 * step
            index.add(new, cold)
            index.remove(new[::2])

    def reader(queries, scores, found):
        for _ in range(CALLS):
            got_scores, got_ids = index.search(queries, K)
            np.testing.assert_array_equal(got_scores, scores)
            np.testing.assert_array_equal(got_ids, found)

    run_workers([functools.partial(writer, 10**9), functools.partial(writer, 2 * 10**9)]
                + [functools.partial(reader, *search) for search in searches], timeout=TIMEOUT_S)
    assert len(index) == ROWS + 2 * 4 * CALLS * 250


def test_every_kernel_at_once(cpu_level, data):
    """embedding_bag, topk, qmatmul and ItemIndex searches in eight threads at the same time."""
    tables, qm = data["tables"], data["matrix"]
    index = ItemIndex(DIM, dtype="fp16")
    index.add(np.arange(ROWS, dtype=np.int64), data["rows"])
    indices, offsets = bags(data["rng"], tables)
    queries = data["rng"].integers(-3, 4, (QUERIES, DIM)).astype(np.float32)
    x = data["rng"].standard_normal((4, MATRIX[1])).astype(np.float32)
    lookup_want = with_reference(lambda: tables.lookup(indices, offsets))
    topk_want = with_reference(lambda: topk(queries, data["rows"], K, metric="l2"))
    search_want = with_reference(lambda: topk(queries, data["rows"], K))
    matmul_want = qmatmul(x, qm)

    def lookups():
        for _ in range(CALLS):
            np.testing.assert_allclose(tables.lookup(indices, offsets), lookup_want, rtol=1e-5, atol=1e-4)

    def scans():
        for _ in range(CALLS):
            equal_results(topk(queries, data["corpora"]["fp16"], K, metric="l2"), topk_want)

    def matmuls():
        for _ in range(CALLS):
            np.testing.assert_allclose(qmatmul(x, qm), matmul_want, rtol=1e-5, atol=1e-5)

    def searches():
        for _ in range(CALLS):
            equal_results(index.search(queries, K), search_want)

    run_workers([lookups, scans, matmuls, searches] * 2, timeout=TIMEOUT_S)
