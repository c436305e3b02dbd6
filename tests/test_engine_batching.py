"""The micro-batcher: many threads' requests coalesced, answers equal to direct calls, errors surfaced."""
import concurrent.futures
import threading

import numpy as np
import pytest
from engine_data import build_small

from recscore.batching import MicroBatcher
from recscore.bundle import open_bundle
from recscore.engine import Engine
from recscore.state import SQLiteState

TIMEOUT = 60


@pytest.fixture
def engine(tmp_path):
    with Engine(open_bundle(build_small(tmp_path / "b")), SQLiteState(tmp_path / "s.db")) as e:
        yield e


def test_concurrent_requests_are_batched_and_correct(engine):
    users = [1 + (i % 30) for i in range(240)]
    expected = {u: engine.recommend(u, k=7).items.tolist() for u in set(users)}
    barrier = threading.Barrier(8)
    with MicroBatcher(engine, max_batch=16, max_wait_us=2000) as batcher:
        def client(part):
            barrier.wait(timeout=TIMEOUT)
            return [(u, batcher.recommend(u, k=7, timeout=TIMEOUT).items.tolist()) for u in part]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            parts = [users[i::8] for i in range(8)]
            results = [f.result(timeout=TIMEOUT) for f in [pool.submit(client, p) for p in parts]]
    for part in results:
        for user, items in part:
            assert items == expected[user]
    text = engine.metrics.text()
    count = float(next(line.split()[1] for line in text.splitlines() if line.startswith("recscore_batch_size_count")))
    assert count < len(users)            # coalesced: fewer batches than requests
    assert "recscore_user_cache_hit_ratio" in text and 'recscore_stage_seconds_bucket{le="0.0001",stage="select"}' in text


def test_options_are_grouped_and_errors_reach_the_caller(engine):
    with MicroBatcher(engine, max_batch=8, max_wait_us=5000) as batcher:
        a = batcher.submit(3, k=4)
        b = batcher.submit(3, k=4, filters={"allow_genres": ["Horror"]})
        bad = batcher.submit(3, k=4, filters={"allow_genres": ["Jazz"]})
        none = batcher.submit(3, k=0)
        assert len(a.result(TIMEOUT).items) == 4
        assert b.result(TIMEOUT).items.tolist() == engine.recommend(3, k=4, filters={"allow_genres": ["Horror"]}).items.tolist()
        with pytest.raises(ValueError, match="unknown genre"):
            bad.result(TIMEOUT)
        with pytest.raises(ValueError, match="k must be"):
            none.result(TIMEOUT)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(3)


def test_feedback_invalidates_the_cached_vector(engine):
    with MicroBatcher(engine, max_wait_us=0) as batcher:
        first = batcher.recommend(9, k=3, timeout=TIMEOUT)
        hits = engine.metrics.hits
        batcher.recommend(9, k=3, timeout=TIMEOUT)
        assert engine.metrics.hits == hits + 1
        engine.feedback(9, int(first.items[0]))
        after = batcher.recommend(9, k=3, timeout=TIMEOUT)
        assert int(first.items[0]) not in after.items
        assert np.isfinite(after.scores).all()
