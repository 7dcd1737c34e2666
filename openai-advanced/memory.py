"""Memory across calls: each completed turn, stored per caller number in SQLite.

Safe under several gunicorn workers: WAL mode (readers never wait for the writer), a busy timeout,
and short transactions. Each operation opens its own connection (~0.1 ms): connections are never
shared between requests, threads, greenlets or processes. To move memory to a shared database
(several machines), reimplement these three methods (`remember`, `recall`, `forget_older_than`) on
top of it.

What is stored, for privacy reviews: the call id, the caller's phone number, what the caller said,
what the assistant answered, and when. Nothing else from Vapi's request (no metadata, no phoneNumber
object)."""

import sqlite3
import time
from contextlib import contextmanager

SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL,
    caller TEXT NOT NULL,
    user_text TEXT NOT NULL,
    assistant_text TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_caller ON turns (caller, created_at);
CREATE INDEX IF NOT EXISTS turns_by_age ON turns (created_at);
"""


class Memory:
    def __init__(self, path, retention_days):
        self.path = str(path)
        self.retention_seconds = retention_days * 86400
        with self.transaction() as db:
            db.execute("PRAGMA journal_mode=WAL")  # a property of the file: set once, kept
            db.executescript(SCHEMA)
        self.forget_older_than(self.retention_seconds)

    @contextmanager
    def transaction(self):
        """A new connection holding one short transaction, closed afterwards."""
        # wait up to 5 s for another writer instead of failing
        db = sqlite3.connect(self.path, timeout=5)
        try:
            # with WAL: durable at checkpoints, no fsync per turn
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                yield db
        finally:
            db.close()

    def remember(self, call_id, caller, user_text, assistant_text, at=None):
        """Store one completed turn, and drop turns older than the retention limit."""
        with self.transaction() as db:
            db.execute("INSERT INTO turns (call_id, caller, user_text, assistant_text, created_at) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (call_id, caller, user_text, assistant_text, at or time.time()))
            db.execute("DELETE FROM turns WHERE created_at < ?",
                       (time.time() - self.retention_seconds,))

    def recall(self, caller, exclude_call_id=None, limit=5):
        """The caller's most recent turns from earlier calls, newest first: [(created_at, user,
        assistant)]."""
        with self.transaction() as db:
            return db.execute(
                "SELECT created_at, user_text, assistant_text FROM turns "
                "WHERE caller = ? AND call_id != ? "
                "AND created_at >= ? ORDER BY created_at DESC LIMIT ?",
                (caller, exclude_call_id or "", time.time() - self.retention_seconds, limit),
            ).fetchall()

    def forget_older_than(self, seconds):
        """Delete every turn older than `seconds`; returns how many."""
        with self.transaction() as db:
            return db.execute("DELETE FROM turns WHERE created_at < ?",
                              (time.time() - seconds,)).rowcount
