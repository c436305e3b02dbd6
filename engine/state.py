"""Durable per-user state: feedback events and forgotten users, behind `StateStore`.

`SQLiteState` keeps them in one SQLite file in WAL mode, each `append_many` call one transaction
(all its events or none), committed before it returns. With durability "process" (synchronous=NORMAL) a committed
event survives the process being killed (kill -9): it is in the WAL, which the OS holds; a power
loss may drop the last transactions. "power" (synchronous=FULL) syncs the WAL on every commit and
survives that too, at the cost of an fsync per event. Ids are the data's own (int64) user and item ids.
Another store (a server database) replaces it by implementing the same methods.
"""
import contextlib
import sqlite3
import threading

DURABILITY = {"process": "NORMAL", "power": "FULL"}
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, user INTEGER NOT NULL, item INTEGER NOT NULL,"
    " value REAL NOT NULL, event TEXT NOT NULL, ts REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_by_user ON events (user, seq)",
    "CREATE TABLE IF NOT EXISTS forgotten (user INTEGER PRIMARY KEY)",
)


class StorageUnavailable(RuntimeError):
    """The store could not take a write now (database locked, disk full): nothing of it was stored; retry."""


class StateStore:
    """What the engine needs from a state store."""

    def append_many(self, events):
        """Store [(user, item, value, event, ts), ...] durably and atomically (all or none) before returning;
        StorageUnavailable when the store cannot take the write now."""
        raise NotImplementedError

    def events(self, user):
        """The user's events in arrival order: list of (item, value, event, ts)."""
        raise NotImplementedError

    def item_counts(self):
        """{item: number of stored events}, to move popularity on restart."""
        raise NotImplementedError

    def forget_user(self, user):
        """Delete the user's events and remember that their training history is gone; returns events deleted."""
        raise NotImplementedError

    def is_forgotten(self, user):
        raise NotImplementedError

    def close(self):
        pass


class SQLiteState(StateStore):
    def __init__(self, path, durability="process", busy_seconds=5.0):
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {sorted(DURABILITY)}, got {durability!r}")
        self.path = str(path)
        self._lock = threading.Lock()   # one connection shared by the engine's threads
        self._db = sqlite3.connect(self.path, timeout=busy_seconds, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={DURABILITY[durability]}")
        self._db.execute("PRAGMA secure_delete=ON")   # forget_user leaves no readable pages behind
        for statement in SCHEMA:
            self._db.execute(statement)
        self._forgotten = {row[0] for row in self._db.execute("SELECT user FROM forgotten")}

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction under the lock: committed whole, or rolled back whole on any error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:     # a failed COMMIT (disk full) may have rolled back already
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as error:   # locked past the busy timeout, disk full, I/O error
                raise StorageUnavailable(f"the state database refused the write ({error}); nothing was stored") from error

    def append_many(self, events):
        rows = [(int(user), int(item), float(value), str(event), float(ts)) for user, item, value, event, ts in events]
        with self._transaction():
            self._db.executemany("INSERT INTO events (user, item, value, event, ts) VALUES (?, ?, ?, ?, ?)", rows)

    def events(self, user):
        with self._lock:
            return self._db.execute("SELECT item, value, event, ts FROM events WHERE user = ? ORDER BY seq",
                                    (int(user),)).fetchall()

    def item_counts(self):
        with self._lock:
            return dict(self._db.execute("SELECT item, COUNT(*) FROM events GROUP BY item"))

    def forget_user(self, user):
        with self._transaction():
            deleted = self._db.execute("DELETE FROM events WHERE user = ?", (int(user),)).rowcount
            self._db.execute("INSERT OR IGNORE INTO forgotten (user) VALUES (?)", (int(user),))
        with self._lock:
            self._forgotten.add(int(user))
        return deleted

    def is_forgotten(self, user):
        return int(user) in self._forgotten

    def close(self):
        with self._lock:
            self._db.close()
