"""Models: EASE's closed form, the blend served through the kernels, the split and tuning on validation."""
import numpy as np
import pytest
from engine_data import SMALL_CONFIG, small_catalogue_and_events

from recscore import bundle, train
from recscore.evaluate import ConfigEvaluator, rank_users, ranking_metrics, summarize
from recscore.scoring import FactorScorer, history_bags, scorer_for


def small_interactions():
    catalogue, events = small_catalogue_and_events()
    (users, items, values, times), _ = bundle.clean_events(*events, catalogue)
    return bundle.interactions_of(users, items, values, times, catalogue)[1]


def test_ease_is_a_ridge_regression_of_each_item_on_the_others():
    rng = np.random.default_rng(0)
    X = (rng.random((40, 7)) < 0.4).astype(np.float64)
    lam = 3.0
    B = train.ease(X.T @ X, lam)
    for j in range(7):
        others = [i for i in range(7) if i != j]
        A = X[:, others]
        w = np.linalg.solve(A.T @ A + lam * np.eye(6), A.T @ X[:, j])
        np.testing.assert_allclose(B[others, j], w, rtol=1e-4, atol=1e-5)
        assert B[j, j] == 0


def test_temporal_split_holds_out_each_users_last_fifth():
    inter = small_interactions()
    fit, held = train.temporal_split(inter)
    for u in range(inter.num_users):
        n = inter.counts()[u]
        h = held.counts()[u]
        assert h == min(int(np.ceil(0.2 * n)), n - 1)
        events = inter.items[inter.indptr[u]:inter.indptr[u + 1]]
        np.testing.assert_array_equal(held.items[held.indptr[u]:held.indptr[u + 1]], events[n - h:])
        assert held.times[held.indptr[u]:held.indptr[u + 1]].min(initial=2**62) >= \
            fit.times[fit.indptr[u]:fit.indptr[u + 1]].max()


def test_blend_through_the_kernels_equals_dense_scores():
    inter = small_interactions()
    config = SMALL_CONFIG
    vectors = train.svd_vectors(inter, config.svd_rank)
    columns = train.support_of(inter, config.min_support)
    B = train.ease(train.gram(inter, columns), config.ease_lambda)
    scorer = scorer_for(config, vectors, columns, B)
    users = range(10)
    histories = [(inter.items[inter.indptr[u]:inter.indptr[u + 1]], np.ones(inter.counts()[u], np.float32))
                 for u in users]
    pooled = scorer.pool(*history_bags(histories, config.decay, config.max_history))
    scores, rows = scorer.select(pooled, 5, [h for h, _ in histories])
    for b, (items, _) in enumerate(histories):
        last = items[-config.max_history:]
        w = config.decay ** np.arange(len(last) - 1, -1, -1)
        x = np.zeros(inter.num_items)
        np.add.at(x, last, w)
        dense = config.svd_weight * (x @ vectors @ vectors[columns].T)
        dense += config.ease_weight * (x[columns] @ B)
        dense[np.isin(columns, items)] = -np.inf
        best = np.argsort(-dense, kind="stable")[:5]
        np.testing.assert_allclose(scores[b], dense[best], rtol=1e-4, atol=1e-5)
        assert set(rows[b]) == set(columns[best]) and not set(rows[b]) & set(items)


def test_puresvd_scorer_searches_the_item_index():
    inter = small_interactions()
    vectors = train.svd_vectors(inter, 8)
    scorer = FactorScorer(vectors, 1.0, 1000)
    top = rank_users(scorer, inter, 5)
    u = 0
    items = inter.items[inter.indptr[u]:inter.indptr[u + 1]]
    dense = vectors @ vectors[items].sum(0)
    dense[items] = -np.inf
    assert set(top[u]) == set(np.argsort(-dense)[:5])


def test_ranking_metrics_by_hand():
    held = train.Interactions(np.array([0, 2, 3, 3]), np.array([5, 9, 4]), np.ones(3, np.float32),
                              np.zeros(3, np.int64), 10)
    top = np.array([[9, 1, 5], [0, 1, 2], [4, 5, 6]])
    per_user, coverage = ranking_metrics(top, held, 10, ks=(3,))
    np.testing.assert_allclose(per_user["recall@3"], [1.0, 0.0])       # user 2 has nothing held out
    np.testing.assert_allclose(per_user["ndcg@3"], [(1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3)), 0.0])
    np.testing.assert_allclose(per_user["mrr@3"], [1.0, 0.0])
    assert coverage["coverage@3"] == pytest.approx(7 / 10)
    mean, low, high = summarize(per_user, coverage, samples=200)["recall@3"]
    assert mean == 0.5 and 0.0 <= low <= mean <= high <= 1.0


def test_tuning_never_sees_the_test_part():
    inter = small_interactions()
    train_part, test = train.temporal_split(inter)
    seen = []
    evaluator = ConfigEvaluator()

    def spy(config, fit, validation):
        seen.append((fit, validation))
        return evaluator(config, fit, validation)

    grid = {"ease_lambda": (10.0, 50.0), "svd_weight": (0.0, 1.0), "decay": (1.0,)}
    best, results = train.tune(train_part, spy, grid=grid, base=SMALL_CONFIG)
    assert len(results) == 4 and best in [c for c, _ in results]
    test_events = {(u, i) for u in range(inter.num_users) for i in test.items[test.indptr[u]:test.indptr[u + 1]]}
    for fit, validation in seen:
        for part in (fit, validation):
            users = np.repeat(np.arange(part.num_users), part.counts())
            assert not test_events & set(zip(users.tolist(), part.items.tolist()))
