"""API keys: `<id>.<secret>` tokens of which only sha256(secret) is stored, in one SQLite file, with a role.

A lookup finds the row by the public id and compares hashes with hmac.compare_digest, so neither the
token nor its hash is ever compared in variable time or written to a log.
"""
import hashlib
import hmac
import secrets
import sqlite3
import threading
import time

ROLES = ("read", "write", "admin")          # each role may do what the ones before it may
KEYS_FILE = "keys.sqlite3"                  # default key store, beside the bundle's state
SECRET_BYTES = 32
SCHEMA = ("CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, hash TEXT NOT NULL, role TEXT NOT NULL,"
          " name TEXT NOT NULL, rate REAL, created REAL NOT NULL, revoked REAL)")


def role_allows(role, needed):
    return ROLES.index(role) >= ROLES.index(needed)


def _hash(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)

    def create(self, role, name="", rate=None):
        """A new key: returns (id, token); the token is shown this once and never stored."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {rate!r}")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(SECRET_BYTES)
        with self._lock:
            self._db.execute("INSERT INTO keys (id, hash, role, name, rate, created) VALUES (?, ?, ?, ?, ?, ?)",
                             (key_id, _hash(secret), role, name, rate, time.time()))
        return key_id, f"{key_id}.{secret}"

    def lookup(self, token):
        """(id, role, rate) of a valid, unrevoked token, else None."""
        if not isinstance(token, str) or token.count(".") != 1:
            return None
        key_id, secret = token.split(".")
        with self._lock:
            row = self._db.execute("SELECT hash, role, rate FROM keys WHERE id = ? AND revoked IS NULL",
                                   (key_id,)).fetchone()
        if row is None or not hmac.compare_digest(row[0], _hash(secret)):
            return None
        return key_id, row[1], row[2]

    def list(self):
        """[{id, role, name, rate, created, revoked}] (never the hashes)."""
        with self._lock:
            rows = self._db.execute("SELECT id, role, name, rate, created, revoked FROM keys ORDER BY created").fetchall()
        return [dict(zip(("id", "role", "name", "rate", "created", "revoked"), row)) for row in rows]

    def revoke(self, key_id):
        """True if an active key was revoked."""
        with self._lock:
            return self._db.execute("UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                                    (time.time(), key_id)).rowcount == 1

    def has_admin(self):
        with self._lock:
            return self._db.execute("SELECT 1 FROM keys WHERE role = 'admin' AND revoked IS NULL").fetchone() is not None

    def close(self):
        with self._lock:
            self._db.close()
