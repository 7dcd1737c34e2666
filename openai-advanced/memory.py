"""Memory across calls: each completed turn, stored per caller number, in a SQLite file beside the
server or, when MEMORY_DATABASE_URL is set, in PostgreSQL that several instances share.

Both backends have the same methods (`remember`, `recall`, `forget`, `forget_older_than`) and raise
one exception, MemoryUnavailable, when the store fails: the call goes on without memory, and this
module has logged why.

What is stored, for privacy reviews: the call id, the caller's phone number, what the caller said,
what the assistant answered, and when. Nothing else from Vapi's request (no metadata, no phoneNumber
object). `python memory.py forget +15555550123` deletes everything stored about one number."""

import atexit
import logging
import os
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import gevent

from contract import setting  # it loads .env: for `python memory.py ...` too

HERE = Path(__file__).resolve().parent

# Configuration: where memory is kept, and for how long (app.py reads MEMORY_ENABLED)
MEMORY_DATABASE_URL = os.getenv("MEMORY_DATABASE_URL", "")  # postgresql://...; empty: the file
MEMORY_DB_PATH = HERE / (os.getenv("MEMORY_DB_PATH") or "memory.sqlite3")  # relative to here
MEMORY_RETENTION_DAYS = setting("MEMORY_RETENTION_DAYS", 30.0, float, 0)

log = logging.getLogger("custom-llm")


class MemoryUnavailable(Exception):
    """Memory could not be read or written (a broken file, PostgreSQL down or too slow). Already
    logged here: the caller of a method only has to go on without memory."""


def open_memory():
    """The backend the configuration asks for: PostgreSQL when MEMORY_DATABASE_URL is set, else
    the SQLite file."""
    if MEMORY_DATABASE_URL:
        return PostgresMemory(MEMORY_DATABASE_URL, MEMORY_RETENTION_DAYS)
    return Memory(MEMORY_DB_PATH, MEMORY_RETENTION_DAYS)


def remember_later(memory, call_id, caller, user_text, assistant_text):
    """Store a turn without holding up the call; a failed write is logged here, never raised.
    SQLite waits for the disk holding the whole worker: a real thread. psycopg waits for
    PostgreSQL through gevent, as a socket does: a greenlet."""
    def write():
        try:
            memory.remember(call_id, caller, user_text, assistant_text)
        except MemoryUnavailable:  # logged where it failed
            pass

    if memory.blocking:
        gevent.get_hub().threadpool.spawn(write)
    else:
        gevent.spawn(write)


# --- SQLite: the default, one file beside the server ----------------------------------------------

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
    """Turns in a SQLite file. Safe under several gunicorn workers: WAL mode (readers never wait for
    the writer), a busy timeout, and short transactions. Each operation opens its own connection
    (~0.1 ms): connections are never shared between requests, threads, greenlets or processes."""

    blocking = True  # a write can wait for the disk or another writer, holding the whole process

    def __init__(self, path, retention_days):
        self.path = self.where = str(path)  # where: for the start-up line
        self.retention_seconds = retention_days * 86400
        with self.transaction() as db:
            db.execute("PRAGMA journal_mode=WAL")  # a property of the file: set once, kept
            db.executescript(SCHEMA)
        self.forget_older_than(self.retention_seconds)

    @contextmanager
    def transaction(self):
        """A new connection holding one short transaction, closed afterwards."""
        db = None
        try:
            # wait up to 5 s for another writer instead of failing
            db = sqlite3.connect(self.path, timeout=5)
            # with WAL: durable at checkpoints, no fsync per turn
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                yield db
        except sqlite3.Error as exc:
            log.error("memory (%s) failed: %s", self.path, exc)
            raise MemoryUnavailable(str(exc)) from exc
        finally:
            if db:
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

    def forget(self, caller):
        """Delete every turn of one caller number; returns how many."""
        with self.transaction() as db:
            return db.execute("DELETE FROM turns WHERE caller = ?", (caller,)).rowcount

    def forget_older_than(self, seconds):
        """Delete every turn older than `seconds`; returns how many."""
        with self.transaction() as db:
            return db.execute("DELETE FROM turns WHERE created_at < ?",
                              (time.time() - seconds,)).rowcount


# --- PostgreSQL: one memory for several instances -------------------------------------------------

POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    call_id text NOT NULL,
    caller text NOT NULL,
    user_text text NOT NULL,
    assistant_text text NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_caller ON turns (caller, created_at);
CREATE INDEX IF NOT EXISTS turns_by_age ON turns (created_at);
"""
SCHEMA_LOCK = 7_143_001  # any constant: instances starting at once create the table one by one
# A call waits at most the sum of these for memory: a free connection, then the query.
CONNECTION_WAIT_SECONDS = 0.5
QUERY_WAIT_SECONDS = 1.0
RETRY_SECONDS = 5  # after PostgreSQL failed, memory is skipped this long before the next try


class PostgresMemory:
    """The same turns in PostgreSQL. Each worker keeps a small pool of connections. psycopg 3.1.14
    or newer sees gevent's monkey-patching and waits for the database the way a socket does: other
    calls on the worker go on meanwhile. When PostgreSQL is down or too slow, a call waits at most
    1.5 s, then memory is skipped for RETRY_SECONDS without trying, with one log line when it goes
    away and one when it is back."""

    blocking = False  # waits for PostgreSQL let gevent run the worker's other calls

    def __init__(self, url, retention_days):
        # Imported here: the default SQLite path needs no PostgreSQL driver.
        import psycopg
        from psycopg_pool import ConnectionPool

        self.failed, self.unreachable = psycopg.Error, psycopg.OperationalError  # PoolTimeout too
        self.where = url  # for the start-up line, which shows no password
        self.retention_seconds = retention_days * 86400
        self.schema_ready = False
        self.down, self.retry_at = False, 0.0  # after a failure: skip memory until retry_at
        # The pool logs every failed reconnection attempt; this class logs one line per outage.
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
        self.pool = ConnectionPool(
            url, min_size=1, max_size=10, timeout=CONNECTION_WAIT_SECONDS,
            reconnect_timeout=RETRY_SECONDS, open=False, configure=self.configure, name="memory",
            # reconnect_timeout: the pool stops retrying in the background after this long, so the
            # next try starts afresh rather than after a long back-off. connect_timeout: libpq's
            # shortest; tcp_user_timeout: a dead network fails in time.
            kwargs={"autocommit": True, "connect_timeout": 2,
                    "tcp_user_timeout": int(QUERY_WAIT_SECONDS * 1000)})
        try:  # a connection of its own at start-up, so that the log says why if it fails
            with psycopg.connect(url, autocommit=True, connect_timeout=2) as db:
                self.configure(db)
                self.create_schema(db)
                self.drop_old_turns(db)
        except psycopg.OperationalError as exc:  # the server starts anyway
            self.went_down(exc)
        self.pool.open(wait=False)
        atexit.register(self.pool.close)  # its threads end before the interpreter does

    @staticmethod
    def configure(db):
        """Each new connection: a query that waits for a lock or an overloaded server gives up in
        time."""
        db.execute(f"SET statement_timeout = {int(QUERY_WAIT_SECONDS * 1000)}")

    def create_schema(self, db):
        """Create the table and its indexes if they are missing, one instance at a time."""
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            db.execute(POSTGRES_SCHEMA)
        self.schema_ready = True

    @contextmanager
    def connection(self):
        """A connection from the pool, in autocommit mode; MemoryUnavailable when PostgreSQL fails.
        The table is created here if PostgreSQL was down at start-up."""
        trying = self.down  # this call tries again after an outage; others skip meanwhile
        if trying:
            if time.monotonic() < self.retry_at:
                raise MemoryUnavailable("PostgreSQL is unavailable (it failed moments ago)")
            self.retry_at = time.monotonic() + RETRY_SECONDS
        try:
            with self.pool.connection() as db:
                if not self.schema_ready:
                    self.create_schema(db)
                yield db
        except self.unreachable as exc:  # down, restarting, unreachable or too slow
            self.pool.drain()  # connections made before the failure are not used again
            self.went_down(exc)
            raise MemoryUnavailable(str(exc)) from exc
        except self.failed as exc:
            log.error("memory: PostgreSQL failed: %s", exc)
            raise MemoryUnavailable(str(exc)) from exc
        if trying:
            self.down = False
            log.info("memory: PostgreSQL is back")

    def went_down(self, exc):
        """Skip memory for RETRY_SECONDS; say so once per outage."""
        self.retry_at = time.monotonic() + RETRY_SECONDS
        if not self.down:
            self.down = True
            log.warning("memory: PostgreSQL is unavailable or too slow, calls go on without memory "
                        "(next try in %d s): %s", RETRY_SECONDS, " ".join(str(exc).split()))

    def remember(self, call_id, caller, user_text, assistant_text, at=None):
        """Store one completed turn, and drop turns older than the retention limit."""
        with self.connection() as db:
            # PostgreSQL text cannot hold NUL characters; a transcript never means one
            db.execute("INSERT INTO turns (call_id, caller, user_text, assistant_text, created_at) "
                       "VALUES (%s, %s, %s, %s, to_timestamp(%s))",
                       (call_id, caller, user_text.replace("\0", ""),
                        assistant_text.replace("\0", ""), at or time.time()))
            self.drop_old_turns(db)

    def drop_old_turns(self, db):
        """Delete the turns older than MEMORY_RETENTION_DAYS."""
        db.execute("DELETE FROM turns WHERE created_at < to_timestamp(%s)",
                   (time.time() - self.retention_seconds,))

    def recall(self, caller, exclude_call_id=None, limit=5):
        """The caller's most recent turns from earlier calls, newest first: [(created_at, user,
        assistant)]."""
        with self.connection() as db:
            return db.execute(
                "SELECT extract(epoch FROM created_at)::float8, user_text, assistant_text "
                "FROM turns WHERE caller = %s AND call_id != %s "
                "AND created_at >= to_timestamp(%s) ORDER BY created_at DESC LIMIT %s",
                (caller, exclude_call_id or "", time.time() - self.retention_seconds, limit),
            ).fetchall()

    def forget(self, caller):
        """Delete every turn of one caller number; returns how many."""
        with self.connection() as db:
            return db.execute("DELETE FROM turns WHERE caller = %s", (caller,)).rowcount

    def forget_older_than(self, seconds):
        """Delete every turn older than `seconds`; returns how many."""
        with self.connection() as db:
            return db.execute("DELETE FROM turns WHERE created_at < to_timestamp(%s)",
                              (time.time() - seconds,)).rowcount

    def close(self):
        """Close the pool's connections (the benchmark; a server closes it at exit)."""
        self.pool.close()


# --- the command line -----------------------------------------------------------------------------

USAGE = "usage: python memory.py forget <caller number, e.g. +15555550123>"


def main(args):
    """`python memory.py forget NUMBER`: delete everything stored about one caller, in the memory
    this folder's settings (.env) point at."""
    if len(args) != 2 or args[0] != "forget":
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(format="%(levelname)s %(message)s")
    try:
        deleted = open_memory().forget(args[1])
    except MemoryUnavailable as exc:
        print(f"Nothing deleted: {exc}", file=sys.stderr)
        return 1
    print(f"Deleted {deleted} turn{'' if deleted == 1 else 's'} stored for {args[1]}.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
