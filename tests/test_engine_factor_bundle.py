"""Factor-only bundles (bundle.build_factor_bundle): given item vectors, no EASE, fp32 or int8 index rows."""
import dataclasses

import numpy as np
import pytest
from engine_data import SMALL_CONFIG, small_catalogue_and_events

from recscore import bundle
from recscore.engine import Engine
from recscore.state import SQLiteState


def vectors_for(catalogue, dim=8, seed=0):
    return np.random.default_rng(seed).standard_normal((len(catalogue.ids), dim)).astype(np.float32)


def dense_top(engine, vectors, user, k):
    """The engine's answer by hand: recency-weighted sum of the user's last events' vectors, seen items out."""
    entry = engine._user(user)
    rows = entry.rows[-engine.config.max_history:]
    weights = engine.config.decay ** np.arange(len(rows) - 1, -1, -1)
    scores = (weights[:, None] * vectors[rows]).sum(0) @ vectors.T
    scores[entry.seen] = -np.inf
    return engine._catalogue.item_ids[np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_factor_bundle_serves_its_vectors(tmp_path, dtype):
    catalogue, events = small_catalogue_and_events()
    vectors = vectors_for(catalogue)
    config = dataclasses.replace(SMALL_CONFIG, index_dtype=dtype)
    manifest = bundle.build_factor_bundle(catalogue, events, vectors, tmp_path / "b", config=config, log=lambda *_: None)
    assert manifest["serving"]["scorer"] == "puresvd" and manifest["serving"]["index_dtype"] == dtype
    assert manifest["counts"]["ease_columns"] == 0
    opened = bundle.open_bundle(tmp_path / "b")
    np.testing.assert_array_equal(opened.arrays["puresvd.safetensors"]["item_vectors"], vectors)
    engine = Engine(opened, SQLiteState(tmp_path / "state.db"))
    assert engine.scorer.index.dtype == dtype
    users = [1, 2, 3, 17]
    for user, got in zip(users, engine.recommend_many(users, k=10)):
        expected = dense_top(engine, vectors, user, 10)
        single = engine.recommend(user, k=10)
        np.testing.assert_array_equal(single.items, got.items)
        assert not np.isin(got.items, engine._catalogue.item_ids[engine._user(user).seen]).any()
        if dtype == "fp32":
            np.testing.assert_array_equal(got.items, expected)
        else:   # int8 rows: nearly the same list
            assert len(np.intersect1d(got.items, expected)) >= 8
    item = int(catalogue.ids[5])
    engine.feedback(1, item)
    assert item not in engine.recommend(1, k=50).items
    engine.close()


def test_old_manifests_default_to_fp32_rows(tmp_path):
    catalogue, events = small_catalogue_and_events()
    bundle.build_factor_bundle(catalogue, events, vectors_for(catalogue), tmp_path / "b", config=SMALL_CONFIG,
                               log=lambda *_: None)
    opened = bundle.open_bundle(tmp_path / "b")
    del opened.manifest["serving"]["index_dtype"]     # a bundle written before the field existed
    assert opened.config.index_dtype == "fp32"


def test_factor_bundle_checks_its_vectors(tmp_path):
    catalogue, events = small_catalogue_and_events()
    with pytest.raises(ValueError, match="one row per item"):
        bundle.build_factor_bundle(catalogue, events, vectors_for(catalogue)[:-1], tmp_path / "b", log=lambda *_: None)
    bad = vectors_for(catalogue)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        bundle.build_factor_bundle(catalogue, events, bad, tmp_path / "b", log=lambda *_: None)
