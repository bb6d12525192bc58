"""Uploaded files: a metadata row in SQLite, the contents in `<data_dir>/files/<file_id>`.

Crash safety comes from ordering. Contents are written to a temp file in the same
directory, fsynced, renamed into place (and the directory fsynced, so the name is
durable too); only then is the row committed. So a committed row always has its
contents. Deletion removes the row first, then the contents. Either crash window leaves
at most contents without a row, which `sweep` removes at start-up together with the
temp files of interrupted uploads.

Every lookup names an owner, and another owner's file is reported as absent, so a
caller cannot even learn that someone else's file id exists. Owner None (an admin, or
the server itself) sees every owner's files.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from server.store.db import OWNED, Database

log = logging.getLogger(__name__)

FILE_ID_PREFIX = "file-"
# Temp files start with a dot so a file id (which never does) cannot collide with one.
TEMP_PREFIX = ".upload-"

_COLUMNS = "id, owner, filename, purpose, bytes, created_at"


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: int


@dataclass(frozen=True)
class FilePage:
    records: list[FileRecord]
    has_more: bool


class FileNotFound(LookupError):
    def __init__(self, file_id: str):
        super().__init__(f"No such File object: {file_id}")
        self.file_id = file_id


class StorageQuotaExceeded(Exception):
    def __init__(self, used: int, quota: int):
        super().__init__(f"{used} bytes stored, quota {quota}")
        self.used = used
        self.quota = quota


class Upload:
    """Contents being received. `commit` turns them into a file; leaving the `with` block
    without committing (an error, a client gone) deletes them."""

    def __init__(self, files: FileStore):
        self._files = files
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=files.root)
        self._temp = Path(path)
        self._out = os.fdopen(fd, "wb")
        self._committed = False
        self.size = 0

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self.size += len(data)

    def commit(self, owner: str, filename: str, purpose: str, quota: int | None = None) -> FileRecord:
        """Stores the file as `owner`'s; with a `quota`, only if the owner's files then
        hold at most that many bytes (checked in the inserting transaction, so two
        concurrent uploads cannot both slip under it)."""
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        record = FileRecord(
            id=FILE_ID_PREFIX + secrets.token_hex(12),
            owner=owner,
            filename=filename,
            purpose=purpose,
            bytes=self.size,
            created_at=int(time.time()),
        )
        contents = self._files.contents_path(record.id)
        os.replace(self._temp, contents)
        # The temp name is free from here on, and another upload may be given it.
        self._committed = True
        _fsync_dir(self._files.root)
        try:
            with self._files.db.transaction() as conn:
                if quota is not None:
                    used = _stored_bytes(conn, owner)
                    if used + record.bytes > quota:
                        raise StorageQuotaExceeded(used, quota)
                conn.execute(f"INSERT INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", astuple(record))
        except BaseException:
            contents.unlink(missing_ok=True)
            raise
        return record

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc_info) -> None:
        self._out.close()
        if not self._committed:
            self._temp.unlink(missing_ok=True)


class FileStore:
    def __init__(self, db: Database, root: Path):
        self.db = db
        self.root = root
        if not root.is_dir():
            root.mkdir()
            _fsync_dir(root.parent)  # files renamed into it are only durable once the directory itself is

    def contents_path(self, file_id: str) -> Path:
        return self.root / file_id

    def upload(self) -> Upload:
        return Upload(self)

    def stored_bytes(self, owner: str) -> int:
        with self.db.transaction() as conn:
            return _stored_bytes(conn, owner)

    def get(self, owner: str | None, file_id: str) -> FileRecord:
        with self.db.transaction() as conn:
            return _record(conn, owner, file_id)

    def list(
        self,
        owner: str | None,
        *,
        limit: int,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
        purpose: str | None = None,
    ) -> FilePage:
        """Files by creation time; `after` is the id of the last file of the previous page."""
        compare, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, params = [OWNED], [owner, owner]
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        with self.db.transaction() as conn:
            if after is not None:
                cursor = conn.execute(
                    f"SELECT created_at, seq FROM files WHERE {OWNED} AND id = ?", (owner, owner, after)
                ).fetchone()
                if cursor is None:
                    raise FileNotFound(after)
                where.append(f"(created_at, seq) {compare} (?, ?)")
                params.extend(cursor)
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM files WHERE {' AND '.join(where)} "
                f"ORDER BY created_at {direction}, seq {direction} LIMIT ?",
                (*params, limit + 1),  # one more than asked tells whether another page exists
            ).fetchall()
        return FilePage([FileRecord(*row) for row in rows[:limit]], has_more=len(rows) > limit)

    def open(self, owner: str | None, file_id: str) -> tuple[FileRecord, BinaryIO]:
        """The record and its contents, opened. Opening under the database lock means a
        concurrent delete either happens first (FileNotFound) or after the open, and an
        open file stays readable after its name is removed."""
        with self.db.transaction() as conn:
            record = _record(conn, owner, file_id)
            return record, open(self.contents_path(file_id), "rb")

    def delete(self, owner: str | None, file_id: str) -> None:
        with self.db.transaction() as conn:
            _record(conn, owner, file_id)
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.contents_path(file_id).unlink(missing_ok=True)

    def sweep(self) -> None:
        """Removes temp files and contents without a row; run before serving, while no upload is in flight."""
        with self.db.transaction() as conn:
            known = {file_id for (file_id,) in conn.execute("SELECT id FROM files")}
        removed = 0
        for path in self.root.iterdir():
            if path.name.startswith(TEMP_PREFIX) or (path.name.startswith(FILE_ID_PREFIX) and path.name not in known):
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d leftover file(s) of interrupted uploads or deletes from %s", removed, self.root)


def _stored_bytes(conn: sqlite3.Connection, owner: str) -> int:
    return conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM files WHERE owner = ?", (owner,)).fetchone()[0]


def _record(conn: sqlite3.Connection, owner: str | None, file_id: str) -> FileRecord:
    row = conn.execute(f"SELECT {_COLUMNS} FROM files WHERE {OWNED} AND id = ?", (owner, owner, file_id)).fetchone()
    if row is None:
        raise FileNotFound(file_id)
    return FileRecord(*row)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
