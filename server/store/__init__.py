"""Everything coserve keeps across restarts, under one data directory:

    <data_dir>/coserve.lock          held (flock) while a server uses the directory
    <data_dir>/coserve.sqlite3       metadata, one row per object (server/store/db.py)
    <data_dir>/files/<file_id>       uploaded file contents (server/store/files.py)

Finetuning jobs, their events and checkpoints are rows of the same database
(server/store/jobs.py).

Every row carries an owner (the API key that created it), so tenants can share a server.
The lock keeps a second server off the directory: its start-up sweep would delete the
contents of the first one's uploads that are renamed into place but not yet committed.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from contextlib import ExitStack
from pathlib import Path

from server.store.db import Database, StoreError
from server.store.files import FileNotFound, FileRecord, FileStore
from server.store.jobs import InvalidTransition, JobNotFound, JobRecord, JobStore

__all__ = ["FileNotFound", "FileRecord", "InvalidTransition", "JobNotFound", "JobRecord", "Store", "StoreError"]


class Store:
    def __init__(self, lock_fd: int, db: Database, files: FileStore, jobs: JobStore):
        self._lock_fd: int | None = lock_fd
        self.db = db
        self.files = files
        self.jobs = jobs

    @classmethod
    def open(cls, data_dir: Path) -> Store:
        """Creates the directory if needed, migrates the schema and sweeps leftovers of a crash."""
        with ExitStack() as undo:
            try:
                data_dir.mkdir(parents=True, exist_ok=True)
                lock_fd = os.open(data_dir / "coserve.lock", os.O_RDWR | os.O_CREAT, 0o644)
                undo.callback(os.close, lock_fd)
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                db = Database(data_dir / "coserve.sqlite3")
                undo.callback(db.close)
                files = FileStore(db, data_dir / "files")
                files.sweep()
                jobs = JobStore(db)
            except BlockingIOError:
                raise StoreError(f"data directory {data_dir} is in use by another coserve server") from None
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(f"cannot use data directory {data_dir}: {exc}") from exc
            undo.pop_all()
        return cls(lock_fd, db, files, jobs)

    def close(self) -> None:
        """Idempotent: the app closes the store at shutdown and the CLI again on its way out."""
        if self._lock_fd is None:
            return
        self.db.close()
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = None
