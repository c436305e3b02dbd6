"""The Engine API: recommend, recommend_many, score, similar_items, feedback, filters, catalogue, hooks."""
import dataclasses
import threading

import numpy as np
import pytest
from engine_data import SMALL_CONFIG, build_small

from recscore.engine import Engine, FeatureUnavailable, UnknownItem, blend_scores, llm_prompt_prefix


@pytest.fixture(scope="module")
def blend_bundle(tmp_path_factory):
    return build_small(tmp_path_factory.mktemp("blend") / "b")


@pytest.fixture(scope="module")
def svd_bundle(tmp_path_factory):
    return build_small(tmp_path_factory.mktemp("svd") / "b", config=dataclasses.replace(SMALL_CONFIG, scorer="puresvd"))


@pytest.fixture
def engine(blend_bundle, tmp_path):
    from recscore.state import SQLiteState
    from recscore.bundle import open_bundle
    with Engine(open_bundle(blend_bundle), SQLiteState(tmp_path / "s.db")) as e:
        yield e


def history_of(engine, user):
    return set(engine.bundle.arrays["catalogue.safetensors"]["item_ids"][engine._user(user).rows].tolist())


def test_recommend_excludes_seen_and_reports_stages(engine):
    result = engine.recommend(3, k=10)
    assert len(result.items) == 10 and result.source == "history"
    assert not set(result.items.tolist()) & history_of(engine, 3)
    assert list(result.scores) == sorted(result.scores, reverse=True)
    assert {"history", "score", "select", "total"} <= set(result.timings_ms)
    with_seen = engine.recommend(3, k=10, exclude_seen=False)
    assert set(with_seen.items.tolist()) & history_of(engine, 3)


def test_feedback_is_reflected_by_the_next_request(engine):
    first = engine.recommend(4, k=5)
    engine.feedback(4, int(first.items[0]))
    assert int(first.items[0]) not in engine.recommend(4, k=5).items


def test_incremental_pooled_row_equals_a_recompute(blend_bundle, engine):
    engine.recommend(6, k=5)                        # caches the pooled row
    for item in range(1100, 1100 + SMALL_CONFIG.max_history + 3):   # past the window: old events drop out
        engine.feedback(6, item, value=1.5)
    cached = engine._user(6).pooled
    engine._users.clear()
    recomputed = engine._pooled([6], [engine._user(6)])[0]
    np.testing.assert_allclose(cached, recomputed, rtol=1e-4, atol=1e-5)


def test_recommend_many_matches_single_requests(engine):
    users = [1, 2, 3, 12345, 7]
    many = engine.recommend_many(users, k=6)
    for user, result in zip(users, many):
        single = engine.recommend(user, k=6)
        np.testing.assert_array_equal(result.items, single.items)
        np.testing.assert_allclose(result.scores, single.scores, rtol=1e-5)
    assert many[3].source == "popularity"


def test_genre_filters_are_exclusions_inside_the_top_k(engine):
    genres = engine.bundle.arrays["catalogue.safetensors"]
    names = engine.genre_names
    item_genres = {int(i): {names[c] for c in genres["genre_codes"][genres["genre_indptr"][r]:genres["genre_indptr"][r + 1]]}
                   for r, i in enumerate(genres["item_ids"])}
    allowed = engine.recommend(3, k=20, filters={"allow_genres": ["Horror"]})
    assert len(allowed.items) == 20 and all("Horror" in item_genres[i] for i in allowed.items.tolist())
    denied = engine.recommend(3, k=20, filters={"deny_genres": ["Drama", "Comedy"]})
    assert len(denied.items) == 20 and all(item_genres[i] == {"Horror"} for i in denied.items.tolist())
    with pytest.raises(ValueError, match="unknown genre"):
        engine.recommend(3, filters={"allow_genres": ["Jazz"]})
    with pytest.raises(ValueError, match="filters"):
        engine.recommend(3, filters={"colour": ["red"]})


def test_score_and_similar_items(engine):
    result = engine.recommend(3, k=5)
    np.testing.assert_allclose(engine.score(3, result.items.tolist()), result.scores, rtol=1e-5)
    items, scores = engine.similar_items(1005, k=4)
    assert len(items) == 4 and 1005 not in items and list(scores) == sorted(scores, reverse=True)
    with pytest.raises(UnknownItem):
        engine.score(3, [5])
    with pytest.raises(TypeError, match="user"):
        engine.recommend("3")


def test_new_user_gets_popularity_and_feedback_moves_it(engine):
    before = engine.recommend(424242, k=3)
    assert before.source == "popularity"
    for user in range(500, 540):
        engine.feedback(user, 1199)
    assert engine.recommend(424242, k=3).items[0] == 1199


def test_live_catalogue(svd_bundle, tmp_path):
    from recscore.bundle import open_bundle
    from recscore.state import SQLiteState
    with Engine(open_bundle(svd_bundle), SQLiteState(tmp_path / "s.db")) as engine:
        user_vector = engine._pooled([3], [engine._user(3)])[0]
        engine.add_items([777], titles=["Brand New"], genres=[["Musical"]], vectors=(user_vector * 100)[None])
        assert engine.recommend(3, k=3).items[0] == 777
        assert engine.recommend(3, k=3, filters={"allow_genres": ["Musical"]}).items.tolist() == [777]
        top = engine.recommend(3, k=5).items.tolist()
        assert engine.remove_items(top[:2]) == 2
        assert not set(top[:2]) & set(engine.recommend(3, k=20).items.tolist())
        assert np.isnan(engine.score(3, top[:1])).all()
        with pytest.raises(ValueError, match="already"):
            engine.add_items([777])


def test_removed_items_leave_the_blend_too(engine):
    top = engine.recommend(3, k=5).items.tolist()
    engine.remove_items(top)
    assert not set(top) & set(engine.recommend(3, k=30).items.tolist())
    assert not set(top) & set(engine.recommend(3, k=30, filters={"deny_genres": ["Drama"]}).items.tolist())


def test_text_and_llm_hooks_say_what_is_missing(engine):
    with pytest.raises(FeatureUnavailable, match="text encoder"):
        engine.recommend(3, text="space adventure")
    with pytest.raises(FeatureUnavailable, match="the LLM runtime is not installed"):
        engine.recommend(3, rerank="llm")
    with pytest.raises(FeatureUnavailable, match="the LLM runtime is not installed"):
        engine.explain(3, 1005)
    with pytest.raises(ValueError, match="rerank"):
        engine.recommend(3, rerank="magic")


def test_prompt_and_blend():
    prefix = llm_prompt_prefix(["Alien (1979)", "Heat (1995)"])
    assert prefix.index("Alien") < prefix.index("Heat") and prefix.endswith("is:")
    blended = blend_scores([3.0, 2.0, 1.0], [-5.0, -1.0, -3.0], 0.5)
    assert np.argmax(blended) == 1 and blend_scores([1, 1], [2, 2], 0.5).tolist() == [0, 0]


def test_threads_recommend_and_feedback_together(engine):
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(60):
                user = int(rng.integers(1, 20))
                if rng.random() < 0.3:
                    engine.feedback(user, int(rng.integers(1000, 1200)))
                else:   # what was seen before the request may not come back (later feedback may)
                    seen = history_of(engine, user)
                    result = engine.recommend(user, k=5)
                    assert not set(result.items.tolist()) & seen
        except BaseException as error:   # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors[0]
