"""Durable state: feedback survives kill -9 once acknowledged; forget_user removes the user's data."""
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from engine_data import build_small

from recscore.engine import Engine, UnknownItem
from recscore.state import SQLiteState, StorageUnavailable


@pytest.fixture
def bundle_path(tmp_path):
    return build_small(tmp_path / "b")


def test_acknowledged_feedback_survives_kill_9(bundle_path):
    script = textwrap.dedent(f"""
        import sys
        from recscore.engine import Engine
        engine = Engine.open({str(bundle_path)!r})
        for n, item in enumerate([1003, 1010, 1020]):
            engine.feedback(5, item, value=2.0, event="purchase")
            print("ACK", n, flush=True)
        sys.stdin.readline()   # wait to be killed
        """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        acks = [child.stdout.readline() for _ in range(3)]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert [a.split()[:2] for a in acks] == [["ACK", "0"], ["ACK", "1"], ["ACK", "2"]]
    assert child.returncode == -signal.SIGKILL
    with Engine.open(bundle_path) as engine:
        assert [e[:3] for e in engine.state.events(5)] == [(1003, 2.0, "purchase"), (1010, 2.0, "purchase"),
                                                           (1020, 2.0, "purchase")]
        result = engine.recommend(5, k=50)
        assert not {1003, 1010, 1020} & set(result.items.tolist())


def test_restart_keeps_history_and_popularity(bundle_path):
    with Engine.open(bundle_path) as engine:
        before = engine.score(999_999, [1042])[0]
        for user in (900, 901, 902):
            engine.feedback(user, 1042)
        first = engine.recommend(900, k=10)
        assert engine.score(999_999, [1042])[0] == before + 3
    with Engine.open(bundle_path) as engine:
        again = engine.recommend(900, k=10)
        assert again.source == "history" and list(again.items) == list(first.items)
        assert engine.score(999_999, [1042])[0] == before + 3


def test_forget_user_deletes_everything(bundle_path):
    with Engine.open(bundle_path) as engine:
        assert engine.recommend(7, k=5).source == "history"
        engine.feedback(7, 1001)
        engine.forget_user(7)
        assert engine.recommend(7, k=5).source == "popularity"
    rows = sqlite3.connect(bundle_path / "state.sqlite3").execute("SELECT COUNT(*) FROM events WHERE user = 7")
    assert rows.fetchone()[0] == 0
    with Engine.open(bundle_path) as engine:
        assert engine.recommend(7, k=5).source == "popularity"


def test_state_store_interface(tmp_path):
    store = SQLiteState(tmp_path / "s.sqlite3", durability="power")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.append_many([(1, 10, 1.0, "click", 5.0), (1, 11, -1.0, "dislike", 6.0)])
    store.append_many([(2, 10, 1.0, "click", 7.0)])
    store.append_many([])
    assert store.events(1) == [(10, 1.0, "click", 5.0), (11, -1.0, "dislike", 6.0)]
    assert store.item_counts() == {10: 2, 11: 1}
    assert store.forget_user(1) == 2 and store.is_forgotten(1) and store.events(1) == []
    store.close()
    with pytest.raises(ValueError, match="durability"):
        SQLiteState(tmp_path / "t.sqlite3", durability="maybe")


def test_append_many_stores_all_or_none(tmp_path):
    store = SQLiteState(tmp_path / "s.sqlite3", busy_seconds=0.05)
    store._db.execute("CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.item = 13"
                      " BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(sqlite3.DatabaseError, match="refused"):
        store.append_many([(1, 10, 1.0, "click", 1.0), (1, 11, 1.0, "click", 2.0), (1, 13, 1.0, "click", 3.0)])
    assert store.events(1) == []
    other = sqlite3.connect(tmp_path / "s.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StorageUnavailable, match="nothing was stored"):
        store.append_many([(1, 10, 1.0, "click", 1.0)])
    other.execute("ROLLBACK")
    store.append_many([(1, 10, 1.0, "click", 1.0), (1, 11, 1.0, "click", 2.0)])
    assert [e[0] for e in store.events(1)] == [10, 11]
    store.close()


def test_feedback_many_checks_every_event_before_storing_any(bundle_path):
    with Engine.open(bundle_path) as engine:
        before = engine.recommend(8, k=5).items.tolist()
        stored = engine.state.events(8)
        good = [(8, 1001, 1.0, "click", None), (8, 1002, 2.0, "purchase", 9.0)]
        for bad, error in [((8, 424242, 1.0, "click", None), UnknownItem), ((8, 1003, float("nan"), "click", None), ValueError),
                           (("8", 1003, 1.0, "click", None), TypeError), ((8, 1003, 1.0, None, None), TypeError)]:
            with pytest.raises(error):
                engine.feedback_many(good + [bad])
            assert engine.state.events(8) == stored
        assert engine.recommend(8, k=5).items.tolist() == before
        engine.feedback_many(good)
        assert [e[:3] for e in engine.state.events(8)[len(stored):]] == [(1001, 1.0, "click"), (1002, 2.0, "purchase")]
        assert not {1001, 1002} & set(engine.recommend(8, k=5).items.tolist())
