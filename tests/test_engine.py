"""The engine around the kernels: catalogues, splits, PureSVD fold-in, metrics, and the demo itself."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recscore.datasets import Catalogue, hold_out_last, load_movielens, synthetic_catalogue
from recscore.demo import run_movielens
from recscore.evaluate import popularity_ranking, recall_ndcg
from recscore.factorize import pure_svd
from recscore.kernels import cpu_info
from recscore.recommender import Recommender, histories_of

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
needs_movielens = pytest.mark.skipif(not MOVIELENS.exists(), reason=f"MovieLens not found at {MOVIELENS}")


def small_catalogue():
    indptr = np.array([0, 3, 4, 7], np.int64)
    items = np.array([0, 2, 1, 3, 4, 0, 2], np.int64)
    return Catalogue([f"item {i}" for i in range(5)], ["a"] * 5, indptr, items,
                     np.arange(1, 8, dtype=np.float32))


def test_recall_and_ndcg():
    ranked = np.array([[3, 1, 2], [0, 4, 5], [7, 8, 9]])
    recall, ndcg = recall_ndcg(ranked, np.array([3, 5, 1]))
    assert recall == pytest.approx(2 / 3)
    assert ndcg == pytest.approx((1.0 + 1 / np.log2(4)) / 3)


def test_hold_out_last_and_histories():
    catalogue = small_catalogue()
    train, users, items = hold_out_last(catalogue)
    assert users.tolist() == [0, 2] and items.tolist() == [1, 2]
    assert train.history_indptr.tolist() == [0, 2, 3, 5]
    assert train.history_items.tolist() == [0, 2, 3, 4, 0]
    indptr, hist, weights = histories_of(catalogue, [2, 0])
    assert indptr.tolist() == [0, 3, 6] and hist.tolist() == [4, 0, 2, 0, 2, 1]
    assert weights.tolist() == [5, 6, 7, 1, 2, 3]


def test_popularity_skips_seen_items():
    catalogue = small_catalogue()
    ranked = popularity_ranking(catalogue.history_indptr, catalogue.history_items, 5, np.array([0, 1]), 2)
    assert ranked.tolist() == [[3, 4], [0, 2]]     # 0 and 2 are most popular; ties by id


def test_pure_svd_fold_in_is_a_weighted_pooled_lookup(rng):
    """Scores r_u V V^T from the kernels equal the dense PureSVD scores with seen items removed."""
    catalogue = synthetic_catalogue(num_items=300, num_users=40, dim=8, progress=False)
    V = pure_svd(catalogue.history_indptr, catalogue.history_items, catalogue.history_weights, 300, rank=16)
    R = np.zeros((40, 300))
    R[np.repeat(np.arange(40), np.diff(catalogue.history_indptr)), catalogue.history_items] = 1
    _, _, Vt = np.linalg.svd(R, full_matrices=False)
    np.testing.assert_allclose(np.abs(V.T @ Vt[:16].T), np.eye(16), atol=1e-4)   # same subspace, same basis
    recs = Recommender(V, V, pooling="sum", weighted=True).recommend(
        catalogue.history_indptr, catalogue.history_items, catalogue.history_weights, k=5)
    dense = R @ V.astype(np.float64) @ V.T.astype(np.float64)
    dense[R > 0] = -np.inf
    np.testing.assert_allclose(recs.scores, -np.sort(-dense, axis=1)[:, :5], rtol=1e-4, atol=1e-5)


def test_synthetic_catalogue_is_deterministic():
    a = synthetic_catalogue(num_items=200, num_users=10, progress=False)
    b = synthetic_catalogue(num_items=200, num_users=10, progress=False)
    np.testing.assert_array_equal(a.item_factors, b.item_factors)
    np.testing.assert_array_equal(a.history_items, b.history_items)
    assert a.titles == b.titles and len(set(a.categories)) > 1


def test_demo_runs_the_engine_end_to_end():
    """The default demo: a bundle built, recommendations, a click that changes the next answer, latency,
    an LLM rerank and a streamed explanation."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    done = subprocess.run([sys.executable, "-m", "recscore", "demo"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"level {cpu_info()['level']}" in out and "User 1 (history): top 10" in out
    before, after = out.split("After a click on ")[0], out.split("After a click on ")[1].split("Latency")[0]
    assert " 10. " in before and " 10. " in after and "<- new" in after
    assert "Latency, one request" in out and "Re-ranked by Gemma 3 270M" in out and "first piece after" in out


def test_kernel_demo_runs_at_the_level_recscore_cpu_caps():
    env = dict(os.environ, PYTHONIOENCODING="utf-8", RECSCORE_CPU="baseline")
    done = subprocess.run([sys.executable, "-m", "recscore", "demo", "--kernels"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "level baseline" in done.stdout and done.stdout.count("\nUser ") == 3
    assert " 10. " in done.stdout and "Latency, one user" in done.stdout


def test_demo_reports_a_missing_dataset(tmp_path):
    done = subprocess.run([sys.executable, "-m", "recscore", "demo", "--movielens", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "ratings.csv" in done.stderr


@needs_movielens
def test_movielens_demo_beats_popularity():
    lines = []
    metrics = run_movielens(MOVIELENS, out=lines.append)
    assert metrics["recall"] > metrics["popularity_recall"] and metrics["ndcg"] > metrics["popularity_ndcg"]
    assert any("Shawshank" in line or "Matrix" in line or "(19" in line for line in lines)


@needs_movielens
def test_load_movielens():
    catalogue = load_movielens(MOVIELENS)
    assert catalogue.num_users == 610 and catalogue.num_items == 9742 and len(catalogue.history_items) == 100836
    assert catalogue.titles[0] == "Toy Story (1995)"
