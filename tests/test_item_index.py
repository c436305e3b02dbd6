"""ItemIndex: a live catalogue searched with topk; adds, replaces, removes, threads, files."""
import threading

import numpy as np
import pytest
import torch
from threads import run_workers

from recscore.kernels import ItemIndex, topk, use_backend


def expected_search(catalogue, queries, k, metric, excluded=None):
    """Reference topk over the live items {id: vector}, mapped to external ids."""
    ids = np.array(sorted(catalogue), dtype=np.int64)
    vectors = np.array([catalogue[i] for i in ids], np.float32).reshape(len(ids), -1)
    exclude = None
    if excluded is not None:
        rows = [np.flatnonzero(np.isin(ids, e)) for e in excluded]
        exclude = (np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64),
                   np.concatenate(rows + [np.zeros(0)]).astype(np.int64))
    with use_backend("reference"):
        scores, rows = topk(queries, vectors, k, metric=metric, exclude=exclude)
    return scores, np.where(rows >= 0, ids[np.maximum(rows, 0)] if len(ids) else -1, -1)


def assert_same_ranking(got, want, catalogue, queries, metric, excluded=None):
    """Scores and ids equal rank by rank (ties to the smaller external id), and each returned id is
    live, allowed, distinct and has that score."""
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    for q, row in enumerate(got[1]):
        ids = row[row >= 0].tolist()
        assert len(set(ids)) == len(ids) and not (excluded and set(ids) & set(excluded[q]))
        vectors = np.array([catalogue[i] for i in ids], np.float64).reshape(len(ids), -1)
        x = queries[q].astype(np.float64)
        exact = vectors @ x if metric == "ip" else ((vectors - x) ** 2).sum(1)
        np.testing.assert_array_equal(exact.astype(np.float32), got[0][q][:len(ids)])


def csr(lists):
    return (np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64),
            np.concatenate([np.asarray(x, np.int64) for x in lists] + [np.zeros(0, np.int64)]))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_add_replace_remove_search(rng, metric):
    """Integer vectors, ids in shuffled order: equal to the reference over the live items."""
    index = ItemIndex(6, metric=metric)
    catalogue = {}
    for step in range(12):
        ids = rng.choice(5000, 300, replace=False) * 7 + 3
        vectors = rng.integers(-3, 4, (300, 6)).astype(np.float32)
        index.add(ids, vectors)
        catalogue.update(zip(ids.tolist(), vectors))
        gone = rng.choice(np.array(sorted(catalogue)), 100, replace=False)
        assert index.remove(np.concatenate([gone, [-5, 10**12]])) == 100  # unknown ids are ignored
        for i in gone.tolist():
            del catalogue[i]
        assert len(index) == len(catalogue)
        queries = rng.integers(-3, 4, (5, 6)).astype(np.float32)
        excluded = [rng.choice(np.array(sorted(catalogue)), 50).tolist() + [123456789] for _ in range(5)]
        for k, ex in [(10, None), (len(catalogue) + 3, None), (25, excluded)]:
            got = index.search(queries, k, exclude=None if ex is None else csr(ex))
            want = expected_search(catalogue, queries, k, metric, ex)
            assert_same_ranking(got, want, catalogue, queries, metric, ex)


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_quantized_index_and_cosine(rng, dtype):
    index = ItemIndex(16, metric="cosine", dtype=dtype)
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    index.add(np.arange(500) * 2, vectors)
    queries = rng.standard_normal((4, 16)).astype(np.float32)
    scores, ids = index.search(queries, 20)
    _, exact = expected_search(dict(zip((np.arange(500) * 2).tolist(), vectors)), queries, 20, "cosine")
    assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids, exact)]) >= 0.9
    assert index.nbytes < 500 * 16 * 4  # stored narrower than float32


def test_repeated_id_in_one_add_keeps_the_last(rng):
    index = ItemIndex(2)
    index.add(np.array([4, 4, 9]), np.array([[1, 0], [0, 1], [5, 5]], np.float32))
    assert len(index) == 2
    scores, ids = index.search(np.array([[0.0, 1.0]], np.float32), 3)
    assert ids.tolist() == [[9, 4, -1]] and scores[0, :2].tolist() == [5.0, 1.0]


def test_empty_index_and_zero_queries():
    index = ItemIndex(3)
    scores, ids = index.search(np.ones((2, 3), np.float32), 4)
    assert (ids == -1).all() and (scores == -np.inf).all() and len(index) == 0
    index.add(np.array([1]), np.ones((1, 3), np.float32))
    assert index.search(np.ones((0, 3), np.float32), 4)[1].shape == (0, 4)
    assert index.remove(np.array([1, 1])) == 1 and len(index) == 0
    assert (index.search(np.ones((1, 3), np.float32), 2)[1] == -1).all()


def test_torch_queries(rng):
    index = ItemIndex(4)
    index.add(np.arange(10), rng.standard_normal((10, 4)).astype(np.float32))
    scores, ids = index.search(torch.ones((2, 4)), 3)
    assert isinstance(ids, torch.Tensor) and ids.shape == (2, 3)


def test_storage_grows_geometrically(rng):
    index = ItemIndex(8)
    buffers_seen = set()
    for step in range(200):
        index.add(np.arange(step * 10, step * 10 + 10), rng.standard_normal((10, 8)).astype(np.float32))
        buffers_seen.add(id(index._buffers[0]))
    assert len(index) == 2000
    assert len(buffers_seen) <= 8  # reallocated about log2(2000 / 64) times, not per add
    assert 2000 * 8 * 4 <= index.nbytes <= 2 * 2048 * (8 * 4 + 8)


def test_compaction_after_many_removals(rng):
    index = ItemIndex(4)
    vectors = rng.integers(-3, 4, (5000, 4)).astype(np.float32)
    index.add(np.arange(5000), vectors)
    removed = rng.permutation(5000)[:4000]
    for chunk in np.array_split(removed, 40):
        index.remove(chunk)
    assert len(index) == 1000 and len(index._snapshot.retired) <= 1024
    keep = np.setdiff1d(np.arange(5000), removed)
    queries = rng.integers(-3, 4, (3, 4)).astype(np.float32)
    got = index.search(queries, 50)
    catalogue = dict(zip(keep.tolist(), vectors[keep]))
    assert_same_ranking(got, expected_search(catalogue, queries, 50, "ip"), catalogue, queries, "ip")


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_save_load_round_trip(rng, tmp_path, dtype):
    index = ItemIndex(5, metric="l2", dtype=dtype)
    index.add(np.arange(300) * 3, rng.standard_normal((300, 5)).astype(np.float32))
    index.remove(np.arange(0, 300, 4) * 3)
    index.save(tmp_path / "items.npz")
    loaded = ItemIndex.load(tmp_path / "items.npz")
    with np.load(tmp_path / "items.npz", allow_pickle=False) as f:  # plain arrays, no pickle
        assert all(f[name].dtype != object for name in f.files)
    assert (loaded.dim, loaded.metric, loaded.dtype, len(loaded)) == (5, "l2", dtype, len(index))
    queries = rng.standard_normal((4, 5)).astype(np.float32)
    for got, want in zip(loaded.search(queries, 30), index.search(queries, 30)):
        np.testing.assert_array_equal(got, want)
    loaded.add(np.array([1]), np.zeros((1, 5), np.float32))  # a loaded index stays live
    assert len(loaded) == len(index) + 1


def test_concurrent_writers_and_readers_never_see_a_torn_state(rng):
    """Each write moves every item to the next version v (x = base + v * e0, with base[0] = 0),
    or removes and re-adds some items of the current version. A search must see one version only:
    score - base . q must be the same v * q[0] for every id it returns."""
    dim, n = 6, 3000
    base = rng.integers(-2, 3, (n, dim)).astype(np.float32)
    base[:, 0] = 0
    ids = np.arange(n) * 11
    index = ItemIndex(dim)
    index.add(ids, base)
    stop = threading.Event()

    def writer(seed):
        local = np.random.default_rng(seed)
        for version in range(1, 30):
            vectors = base.copy()
            vectors[:, 0] = version * 1000
            index.add(ids, vectors)
            some = local.choice(n, 200, replace=False)
            index.remove(ids[some])
            index.add(ids[some], vectors[some])
        stop.set()

    def reader(seed):
        local = np.random.default_rng(seed)
        while not stop.is_set():
            queries = local.integers(-2, 3, (3, dim)).astype(np.float32)
            queries[:, 0] = 1
            excluded = csr([local.choice(ids, 30).tolist() for _ in range(3)])
            scores, found = index.search(queries, 40, exclude=excluded)
            for q in range(3):
                rows = found[q] // 11
                version_part = scores[q] - base[rows] @ queries[q]
                assert np.all(version_part == version_part[0]), f"query {q} saw several versions: {scores[q]}"
                assert len(set(rows.tolist())) == 40, f"query {q} returned an item twice: {found[q]}"
                assert not set(found[q].tolist()) & set(excluded[1][excluded[0][q]:excluded[0][q + 1]].tolist())

    run_workers([lambda: writer(1), lambda: reader(2), lambda: reader(3)], timeout=60, stop=stop)
    assert len(index) == n


def test_a_crashing_writer_fails_the_thread_test_instead_of_hanging_it():
    """The helper the thread tests use: a worker's exception reaches the test, and readers that
    loop until the writer is done are released."""
    stop = threading.Event()

    def writer():
        raise RuntimeError("writer crashed")

    def reader():
        while not stop.is_set():
            stop.wait(0.01)

    with pytest.raises(RuntimeError, match="writer crashed"):
        run_workers([writer, reader, reader], timeout=10, stop=stop)
    with pytest.raises(TimeoutError, match="1 of 2 workers still running"):
        run_workers([lambda: None, lambda: threading.Event().wait(2)], timeout=0.2)


@pytest.mark.parametrize("call, error, message", [
    (lambda: ItemIndex(0), ValueError, "dim must be >= 1"),
    (lambda: ItemIndex(2.5), TypeError, "dim must be an integer"),
    (lambda: ItemIndex(4, metric="dot"), ValueError, "metric"),
    (lambda: ItemIndex(4, dtype="int2"), ValueError, "dtype"),
])
def test_constructor_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("call, error, message", [
    (lambda ix: ix.add(np.array([1, 2]), np.ones((2, 3), np.float32)), ValueError, "vectors must have 4 columns"),
    (lambda ix: ix.add(np.array([1]), np.ones((2, 4), np.float32)), ValueError, "ids has 1 entries"),
    (lambda ix: ix.add(np.array([1.0, 2.0]), np.ones((2, 4), np.float32)), TypeError, "ids"),
    (lambda ix: ix.add(np.array([-1, 2]), np.ones((2, 4), np.float32)), ValueError, "ids must be >= 0"),
    (lambda ix: ix.add(np.array([1, 2]), np.full((2, 4), np.nan, np.float32)), ValueError, "vectors contains NaN"),
    (lambda ix: ix.remove(np.array([[1]])), ValueError, "ids must be 1-D"),
    (lambda ix: ix.search(np.ones((1, 3), np.float32), 2), ValueError, "queries must have 4 columns"),
    (lambda ix: ix.search(np.ones((1, 4), np.float32), 0), ValueError, "k must be >= 1"),
    (lambda ix: ix.search(np.ones((2, 4), np.float32), 2, exclude=(np.array([0, 1]), np.array([1]))), ValueError,
     "indptr"),
])
def test_method_errors(call, error, message):
    index = ItemIndex(4)
    index.add(np.arange(3), np.ones((3, 4), np.float32))
    with pytest.raises(error, match=message):
        call(index)
    assert len(index) == 3


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ties_go_to_the_smaller_external_id(metric):
    """Equal vectors stored in descending id order still come back smallest id first, also when the
    tie straddles the k-th slot."""
    index = ItemIndex(2, metric=metric)
    index.add(np.array([90, 70, 50, 30, 10], np.int64), np.ones((5, 2), np.float32))
    index.add(np.array([5], np.int64), np.full((1, 2), 2, np.float32))   # strictly best for ip and l2
    query = np.full((1, 2), 2, np.float32)
    for k, want in [(1, [5]), (2, [5, 10]), (3, [5, 10, 30]), (6, [5, 10, 30, 50, 70, 90])]:
        assert index.search(query, k)[1][0].tolist() == want
    assert index.search(query, 8)[1][0].tolist() == [5, 10, 30, 50, 70, 90, -1, -1]


def test_add_takes_ids_first_and_names_the_faiss_order_mistake(rng):
    """add(ids, vectors), also by keyword; FAISS's add_with_ids(x, ids) order raises a TypeError saying so."""
    index = ItemIndex(4, metric="l2")
    vectors = rng.standard_normal((3, 4)).astype(np.float32)
    index.add(vectors=vectors, ids=np.array([7, 8, 9]))
    assert len(index) == 3 and index.search(vectors, 1)[1][:, 0].tolist() == [7, 8, 9]
    for swapped in [(vectors, np.array([1, 2, 3])), (torch.from_numpy(vectors), torch.tensor([1, 2, 3]))]:
        with pytest.raises(TypeError, match=r"ids must be int32 or int64, got float32 of shape \(3, 4\)\. "
                                            r"ItemIndex.add takes \(ids, vectors\).*add_with_ids"):
            index.add(*swapped)
    with pytest.raises(TypeError, match=r"vectors must be a float \(n, 4\) matrix, got 1-D int64\. .*"
                                        r"add\(ids=\.\.\., vectors=\.\.\.\)"):
        index.add(np.array([1, 2, 3]), np.array([4, 5, 6]))
    assert len(index) == 3
