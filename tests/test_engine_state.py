"""Durable state: feedback survives kill -9 once acknowledged; forget_user removes the user's data."""
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from engine_data import build_small

from recscore.engine import Engine
from recscore.state import SQLiteState


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
    store.append(1, 10, 1.0, "click", 5.0)
    store.append(1, 11, -1.0, "dislike", 6.0)
    store.append(2, 10, 1.0, "click", 7.0)
    assert store.events(1) == [(10, 1.0, "click", 5.0), (11, -1.0, "dislike", 6.0)]
    assert store.item_counts() == {10: 2, 11: 1}
    assert store.forget_user(1) == 2 and store.is_forgotten(1) and store.events(1) == []
    store.close()
    with pytest.raises(ValueError, match="durability"):
        SQLiteState(tmp_path / "t.sqlite3", durability="maybe")
