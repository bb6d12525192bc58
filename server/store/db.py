"""The SQLite metadata database: one connection in WAL mode, schema migrated at open.

Metadata for everything coserve keeps across restarts lives in one SQLite file. WAL
lets a reader run while a write commits, and `synchronous=FULL` makes a commit reach the
disk before it returns, so a row the server has answered with survives a power cut.

One connection serves every thread behind a lock: SQLite admits one writer at a time
anyway, and metadata statements are tiny next to the file I/O around them. Reads go
through `transaction` too, so a statement sequence such as "find the cursor row, then
the page after it" sees one consistent state.

Schema changes are appended to `MIGRATIONS` and never edited: schema version N is the
first N scripts, and the `schema_version` table records how many a database has run.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MIGRATIONS: tuple[str, ...] = (
    # 1: uploaded files (server/store/files.py). `seq` is the insertion order, which breaks
    # ties between files created in the same second so cursor pagination is a total order.
    """
    CREATE TABLE files (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX files_by_owner ON files (owner, created_at, seq);
    """,
    # 2: finetuning jobs, their events and checkpoints (server/store/jobs.py). JSON columns
    # hold what the job was asked for and reports, as given; `seq` orders each table by
    # insertion, which is what every list pages by.
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        model TEXT NOT NULL,
        training_file TEXT NOT NULL,
        validation_file TEXT,
        status TEXT NOT NULL,
        hyperparameters TEXT NOT NULL,
        lora TEXT NOT NULL,
        suffix TEXT,
        seed INTEGER NOT NULL,
        metadata TEXT,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        fine_tuned_model TEXT,
        error TEXT,
        trained_tokens INTEGER
    );
    CREATE INDEX jobs_by_owner ON jobs (owner, seq);
    CREATE INDEX jobs_by_status ON jobs (status);
    CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX job_events_by_job ON job_events (job_id, seq);
    CREATE TABLE job_checkpoints (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        step INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        fine_tuned_model_checkpoint TEXT NOT NULL,
        metrics TEXT NOT NULL,
        path TEXT NOT NULL,
        UNIQUE (job_id, step)
    );
    CREATE INDEX job_checkpoints_by_job ON job_checkpoints (job_id, seq);
    """,
)


# WHERE condition selecting the rows of the owner passed (twice) as parameters; every
# owner's rows for None (an admin, or the server itself).
OWNED = "(? IS NULL OR owner = ?)"


class StoreError(Exception):
    """The data directory cannot be used: locked by another server, unreadable, or from a newer coserve."""


class Database:
    def __init__(self, path: Path):
        # Autocommit mode (isolation_level=None): transactions are exactly the explicit ones below.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection, inside a transaction that commits when the block exits normally."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _migrate(self) -> None:
        conn = self._conn
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = _schema_version(conn)
        if version > len(MIGRATIONS):
            raise StoreError(f"the database has schema version {version}, newer than this coserve's {len(MIGRATIONS)}")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # executescript ignores the connection's transaction handling, so the script carries
            # its own: a migration and its version bump commit together or not at all.
            try:
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\n"
                    f"DELETE FROM schema_version;\nINSERT INTO schema_version VALUES ({number});\nCOMMIT;"
                )
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise


def _schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return row[0] if row else 0
