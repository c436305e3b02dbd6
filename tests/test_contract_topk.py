"""The contract of topk on the reference backend: ordering, ties, padding, exclusions, errors."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recscore.kernels import quantize_rows, topk, use_backend


def brute_force(queries, corpus, k, metric, excluded=None):
    """Sort every candidate by (score, id) in float64, scores rounded to float32 first."""
    q, x = queries.astype(np.float64), corpus.astype(np.float64)
    if metric == "ip":
        scores = q @ x.T
    elif metric == "l2":
        scores = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    else:
        denom = np.sqrt((q * q).sum(1))[:, None] * np.sqrt((x * x).sum(1))[None, :]
        scores = np.where(denom > 0, (q @ x.T) / np.where(denom > 0, denom, 1), 0.0)
    scores = scores.astype(np.float32)
    sign = 1 if metric == "l2" else -1
    out_s = np.full((len(q), k), np.inf * sign, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    for b in range(len(q)):
        ids = [i for i in range(len(x)) if excluded is None or i not in excluded[b]]
        ids.sort(key=lambda i: (sign * scores[b, i], i))
        ids = ids[:k]
        out_s[b, :len(ids)] = scores[b, ids]
        out_i[b, :len(ids)] = ids
    return out_s, out_i


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("k", [1, 5, 37, 60])
def test_topk_matches_brute_force(rng, metric, k):
    queries = rng.standard_normal((4, 3)).astype(np.float32)
    corpus = rng.standard_normal((37, 3)).astype(np.float32)
    with use_backend("reference"):
        scores, ids = topk(queries, corpus, k, metric=metric)
    want_s, want_i = brute_force(queries, corpus, k, metric)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == (4, k)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-6)


TINY_VALUES = st.integers(-2, 2).map(float)   # exact ties are common; shrinks towards 0


@st.composite
def tie_cases(draw):
    """(corpus (n, d), queries (3, d), excluded (3, n) bool) drawn as arrays, so a failure shrinks
    element by element to a small corpus of zeros with few exclusions."""
    n, d = draw(st.integers(1, 30)), draw(st.integers(1, 4))
    corpus = draw(hnp.arrays(np.float32, (n, d), elements=TINY_VALUES))
    queries = draw(hnp.arrays(np.float32, (3, d), elements=TINY_VALUES))
    excluded = draw(hnp.arrays(np.bool_, (3, n)))
    return corpus, queries, excluded


@settings(max_examples=40, deadline=None)
@given(tie_cases(), st.integers(1, 40), st.sampled_from(["ip", "l2", "cosine"]))
def test_ties_go_to_smaller_id(case, k, metric):
    """Integer vectors from a tiny range make exact ties common; the order is (score, id)."""
    corpus, queries, mask = case
    excluded = [set(np.flatnonzero(row).tolist()) for row in mask]
    indptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int64)
    flat = np.concatenate([np.flatnonzero(row) for row in mask]).astype(np.int64)
    with use_backend("reference"):
        scores, ids = topk(queries, corpus, k, metric=metric, exclude=(indptr, flat))
    want_s, want_i = brute_force(queries, corpus, k, metric, excluded)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-6)


def test_padding_when_k_exceeds_candidates():
    corpus = np.eye(3, dtype=np.float32)
    queries = np.ones((2, 3), np.float32)
    exclude = (np.array([0, 2, 2], np.int64), np.array([0, 2], np.int64))
    for metric, fill in [("ip", -np.inf), ("l2", np.inf)]:
        with use_backend("reference"):
            scores, ids = topk(queries, corpus, 5, metric=metric, exclude=exclude)
        assert ids[0].tolist() == [1, -1, -1, -1, -1]
        assert ids[1].tolist() == [0, 1, 2, -1, -1]
        assert np.all(scores[:, 3:] == fill) and scores[0, 1] == fill


def test_zero_queries_and_single_item():
    with use_backend("reference"):
        scores, ids = topk(np.zeros((0, 4), np.float32), np.ones((5, 4), np.float32), 3)
        assert scores.shape == (0, 3) and ids.shape == (0, 3)
        scores, ids = topk(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), 2)
    assert ids.tolist() == [[0, -1]] and scores[0, 0] == 2.0


def test_cosine_zero_vectors_score_zero():
    corpus = np.array([[0, 0], [1, 0]], np.float32)
    with use_backend("reference"):
        scores, ids = topk(np.array([[2.0, 0.0], [0.0, 0.0]], np.float32), corpus, 2, metric="cosine")
    assert ids[0].tolist() == [1, 0] and scores[0].tolist() == [1.0, 0.0]
    assert ids[1].tolist() == [0, 1] and scores[1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "int4"])
def test_quantized_corpus_scores_its_dequantized_rows(rng, dtype):
    corpus = quantize_rows(rng.standard_normal((50, 8)).astype(np.float32), dtype)
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    with use_backend("reference"):
        scores, ids = topk(queries, corpus, 10)
        want_s, want_i = topk(queries, corpus.dequantize(), 10)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_array_equal(scores, want_s)


def test_torch_queries_give_torch_results(rng):
    queries = torch.from_numpy(rng.standard_normal((2, 4)).astype(np.float32))
    scores, ids = topk(queries, torch.from_numpy(rng.standard_normal((9, 4)).astype(np.float32)), 3)
    assert isinstance(scores, torch.Tensor) and ids.dtype == torch.int64


def test_topk_inputs_not_modified(rng):
    queries = rng.standard_normal((3, 5)).astype(np.float32)
    corpus = rng.standard_normal((20, 5)).astype(np.float32)
    exclude = (np.array([0, 1, 1, 3], np.int64), np.array([4, 0, 19], np.int64))
    copies = [queries.copy(), corpus.copy(), exclude[0].copy(), exclude[1].copy()]
    for backend in ("reference", "cpu"):
        with use_backend(backend):
            topk(queries, corpus, 4, metric="cosine", exclude=exclude)
    for a, b in zip([queries, corpus, *exclude], copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("call, error, message", [
    (lambda q, c: topk(q, c, 0), ValueError, "k must be >= 1"),
    (lambda q, c: topk(q, c, 2.0), TypeError, "k must be an integer"),
    (lambda q, c: topk(q, c, 2, metric="dot"), ValueError, "metric"),
    (lambda q, c: topk(q[:, :2], c, 2), ValueError, "d = 2"),
    (lambda q, c: topk(q[0], c, 2), ValueError, "queries must be 2-D"),
    (lambda q, c: topk(q.astype(np.int32), c, 2), TypeError, "queries"),
    (lambda q, c: topk(np.full_like(q, np.nan), c, 2), ValueError, "queries contains NaN"),
    (lambda q, c: topk(q, c.astype(np.int8), 2), TypeError, "corpus"),
    (lambda q, c: topk(q, c, 2, exclude=(np.array([0, 1], np.int64), np.array([1], np.int64))), ValueError,
     r"exclude\[0\] \(indptr\) must have length 3"),
    (lambda q, c: topk(q, c, 2, exclude=(np.array([0, 1, 2], np.int64), np.array([1, 6], np.int64))), IndexError,
     r"excluded_ids\[1\] = 6 \(query 1, position 0\)"),
    (lambda q, c: topk(q, c, 2, exclude=(np.array([0, 2, 1], np.int64), np.array([1, 2], np.int64))), ValueError,
     "non-decreasing"),
    (lambda q, c: topk(q, c, 2, exclude=np.array([1, 2])), TypeError, "exclude"),
])
def test_topk_bad_input(call, error, message):
    queries = np.ones((2, 3), np.float32)
    corpus = np.ones((6, 3), np.float32)
    for backend in ("reference", "cpu"):
        with use_backend(backend), pytest.raises(error, match=message):
            call(queries, corpus)


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_in_corpus_is_reported(metric, bad):
    """Every metric, cosine included (where a NaN row must not pass as a zero vector scored 0)."""
    corpus = np.ones((6, 3), np.float32)
    corpus[4, 1] = bad
    for backend in ("reference", "cpu"):
        with use_backend(backend), pytest.raises(ValueError, match="corpus contains NaN"):
            topk(np.ones((1, 3), np.float32), corpus, 2, metric=metric)
