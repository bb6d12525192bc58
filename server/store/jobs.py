"""Finetuning jobs, their events and their checkpoints: one SQLite row per object.

A job's status moves only along `TRANSITIONS`, checked and written in one transaction,
so of two racing writers (a user's cancel, the engine's "succeeded") exactly one wins
and the other gets InvalidTransition. Whatever else a status change records (the error
of a failure, the model a success produced) commits with it, so a restart never finds a
job that succeeded without its model. `unfinished` lists the jobs a restart must pick up.

Reads name an owner, as in FileStore: another owner's job reads as absent (owner None
reads every owner's). Writes come from the job runner, which already holds the
record, so they take the job id alone. Lists are newest first and page by the id of
the previous page's last item, as OpenAI's do; every table pages by its insertion order (`seq`), which no clock change can reorder.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Generic, Literal, TypeVar

from server.store.db import OWNED, Database

JOB_ID_PREFIX = "ftjob-"
EVENT_ID_PREFIX = "ftevent-"
CHECKPOINT_ID_PREFIX = "ftckpt-"

JobStatus = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
EventLevel = Literal["info", "warn", "error"]
EVENT_LEVELS = ("info", "warn", "error")

TRANSITIONS: dict[str, frozenset[str]] = {
    "validating_files": frozenset({"queued", "failed", "cancelled"}),
    "queued": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"paused", "succeeded", "failed", "cancelled"}),
    "paused": frozenset({"running", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
FINISHED = frozenset(status for status, following in TRANSITIONS.items() if not following)

T = TypeVar("T")


@dataclass(frozen=True)
class JobError:
    code: str
    message: str
    param: str | None = None


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    model: str
    training_file: str
    validation_file: str | None
    status: JobStatus
    hyperparameters: dict
    lora: dict  # coserve's adapter settings: rank, alpha, target modules, learning rate, max_seq_len
    suffix: str | None  # as the user gave it (OpenAI's `user_provided_suffix`)
    seed: int
    metadata: dict | None
    created_at: int
    started_at: int | None  # first entered "running"
    finished_at: int | None  # entered succeeded, failed or cancelled
    fine_tuned_model: str | None
    error: JobError | None
    trained_tokens: int | None


@dataclass(frozen=True)
class EventRecord:
    id: str
    job_id: str
    created_at: int
    level: EventLevel
    message: str
    data: dict | None


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    job_id: str
    step: int
    created_at: int
    fine_tuned_model_checkpoint: str  # the name it is served under
    metrics: dict
    path: Path


@dataclass(frozen=True)
class Page(Generic[T]):
    records: list[T]
    has_more: bool


class JobNotFound(LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"No such fine-tuning job: {job_id}")
        self.job_id = job_id


class CursorNotFound(LookupError):
    """An `after` that names no event or checkpoint of the job being listed."""

    def __init__(self, cursor: str):
        super().__init__(f"No such item to list after: {cursor}")
        self.cursor = cursor


class TooManyActiveJobs(Exception):
    def __init__(self, owner: str, limit: int):
        super().__init__(f"owner {owner!r} already has {limit} unfinished jobs")
        self.owner = owner
        self.limit = limit


class InvalidTransition(ValueError):
    def __init__(self, job_id: str, current: str, requested: str):
        super().__init__(f"fine-tuning job {job_id} is {current} and cannot become {requested}")
        self.job_id = job_id
        self.current = current
        self.requested = requested


class JobStore:
    def __init__(self, db: Database):
        self.db = db

    def create(
        self,
        owner: str,
        *,
        model: str,
        training_file: str,
        hyperparameters: dict,
        lora: dict,
        seed: int,
        validation_file: str | None = None,
        suffix: str | None = None,
        metadata: dict | None = None,
        max_active: int | None = None,
    ) -> JobRecord:
        """A new job, validating its files. With `max_active`, only while the owner has
        fewer unfinished jobs (counted in the inserting transaction)."""
        record = JobRecord(
            id=JOB_ID_PREFIX + secrets.token_hex(12),
            owner=owner,
            model=model,
            training_file=training_file,
            validation_file=validation_file,
            status="validating_files",
            hyperparameters=hyperparameters,
            lora=lora,
            suffix=suffix,
            seed=seed,
            metadata=metadata,
            created_at=int(time.time()),
            started_at=None,
            finished_at=None,
            fine_tuned_model=None,
            error=None,
            trained_tokens=None,
        )
        row = _encode_row(record)
        with self.db.transaction() as conn:
            if max_active is not None:
                marks = ", ".join("?" * len(FINISHED))
                (active,) = conn.execute(
                    f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND status NOT IN ({marks})", (owner, *FINISHED)
                ).fetchone()
                if active >= max_active:
                    raise TooManyActiveJobs(owner, max_active)
            conn.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({_placeholders(row)})", row)
        # Decoded from what was stored, so it equals what `get` returns later.
        return _job(row)

    def get(self, owner: str | None, job_id: str) -> JobRecord:
        with self.db.transaction() as conn:
            return _owned_job(conn, owner, job_id)

    def list(self, owner: str | None, *, limit: int, after: str | None = None) -> Page[JobRecord]:
        with self.db.transaction() as conn:
            rows, has_more = _page(conn, "jobs", _JOB_COLUMNS, OWNED, (owner, owner), limit, after, JobNotFound)
        return Page([_job(row) for row in rows], has_more)

    def unfinished(self) -> list[JobRecord]:
        """Every owner's jobs not yet succeeded, failed or cancelled, oldest first (queue order)."""
        marks = ", ".join("?" * len(FINISHED))
        with self.db.transaction() as conn:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status NOT IN ({marks}) ORDER BY seq", tuple(FINISHED)
            ).fetchall()
        return [_job(row) for row in rows]

    def succeeded(self) -> list[JobRecord]:
        """Every owner's succeeded jobs, oldest first: their models are served again after a restart."""
        with self.db.transaction() as conn:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'succeeded' ORDER BY seq"
            ).fetchall()
        return [_job(row) for row in rows]

    def count_by_status(self) -> dict[str, int]:
        """Jobs of every owner per status (statuses without jobs are absent)."""
        with self.db.transaction() as conn:
            return dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    def set_status(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: JobError | None = None,
        fine_tuned_model: str | None = None,
        trained_tokens: int | None = None,
    ) -> JobRecord:
        """Moves the job to `status`, with the other fields given, or raises InvalidTransition."""
        if (status == "failed") != (error is not None):
            raise ValueError("a job that fails needs an error, and only a job that fails has one")
        changes = _given(status=status, error=error, fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens)
        with self.db.transaction() as conn:
            job = _job_by_id(conn, job_id)
            if status not in TRANSITIONS[job.status]:
                raise InvalidTransition(job_id, job.status, status)
            now = int(time.time())
            if status == "running" and job.started_at is None:
                changes["started_at"] = now
            if status in FINISHED:
                changes["finished_at"] = now
            return _update(conn, job, changes)

    def update(
        self, job_id: str, *, fine_tuned_model: str | None = None, trained_tokens: int | None = None
    ) -> JobRecord:
        """Records progress that changes no status, such as the tokens trained so far."""
        with self.db.transaction() as conn:
            job = _job_by_id(conn, job_id)
            return _update(conn, job, _given(fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens))

    def add_event(self, job_id: str, level: EventLevel, message: str, data: dict | None = None) -> EventRecord:
        if level not in EVENT_LEVELS:
            raise ValueError(f"event level must be one of {', '.join(EVENT_LEVELS)}, not {level!r}")
        event = EventRecord(EVENT_ID_PREFIX + secrets.token_hex(12), job_id, int(time.time()), level, message, data)
        return _insert(self.db, "job_events", _EVENT_COLUMNS, event, _event)

    def list_events(
        self, owner: str | None, job_id: str, *, limit: int, after: str | None = None
    ) -> Page[EventRecord]:
        with self.db.transaction() as conn:
            _owned_job(conn, owner, job_id)
            rows, has_more = _page(
                conn, "job_events", _EVENT_COLUMNS, "job_id = ?", (job_id,), limit, after, CursorNotFound
            )
        return Page([_event(row) for row in rows], has_more)

    def add_checkpoint(self, job_id: str, step: int, name: str, metrics: dict, path: Path) -> CheckpointRecord:
        """`name` is the model name the checkpoint is served under; `path` holds its adapter."""
        checkpoint = CheckpointRecord(
            CHECKPOINT_ID_PREFIX + secrets.token_hex(12), job_id, step, int(time.time()), name, metrics, path
        )
        return _insert(self.db, "job_checkpoints", _CHECKPOINT_COLUMNS, checkpoint, _checkpoint)

    def list_checkpoints(
        self, owner: str | None, job_id: str, *, limit: int, after: str | None = None
    ) -> Page[CheckpointRecord]:
        with self.db.transaction() as conn:
            _owned_job(conn, owner, job_id)
            rows, has_more = _page(
                conn, "job_checkpoints", _CHECKPOINT_COLUMNS, "job_id = ?", (job_id,), limit, after, CursorNotFound
            )
        return Page([_checkpoint(row) for row in rows], has_more)


def _names(record_type: type) -> tuple[str, ...]:
    return tuple(field.name for field in fields(record_type))


_JOB_FIELDS = _names(JobRecord)
_EVENT_FIELDS = _names(EventRecord)
_CHECKPOINT_FIELDS = _names(CheckpointRecord)
_JOB_COLUMNS = ", ".join(_JOB_FIELDS)
_EVENT_COLUMNS = ", ".join(_EVENT_FIELDS)
_CHECKPOINT_COLUMNS = ", ".join(_CHECKPOINT_FIELDS)


def _job(row: tuple) -> JobRecord:
    job = dict(zip(_JOB_FIELDS, row))
    error = _loads(job["error"])
    job.update(
        hyperparameters=json.loads(job["hyperparameters"]),
        lora=json.loads(job["lora"]),
        metadata=_loads(job["metadata"]),
        error=JobError(**error) if error is not None else None,
    )
    return JobRecord(**job)


def _event(row: tuple) -> EventRecord:
    event = dict(zip(_EVENT_FIELDS, row))
    event.update(data=_loads(event["data"]))
    return EventRecord(**event)


def _checkpoint(row: tuple) -> CheckpointRecord:
    checkpoint = dict(zip(_CHECKPOINT_FIELDS, row))
    checkpoint.update(metrics=json.loads(checkpoint["metrics"]), path=Path(checkpoint["path"]))
    return CheckpointRecord(**checkpoint)


def _encode(value: object) -> object:
    """A record field as SQLite stores it: structured values as JSON, paths as text."""
    if isinstance(value, JobError):
        return json.dumps(asdict(value))
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _encode_row(record: object) -> tuple:
    return tuple(_encode(getattr(record, name)) for name in _names(type(record)))


def _loads(text: str | None) -> object:
    return None if text is None else json.loads(text)


def _placeholders(row: tuple) -> str:
    return ", ".join("?" * len(row))


def _given(**values: object) -> dict[str, object]:
    """The keyword arguments that were passed: None means "leave as it is"."""
    return {name: value for name, value in values.items() if value is not None}


def _owned_job(conn: sqlite3.Connection, owner: str | None, job_id: str) -> JobRecord:
    row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {OWNED} AND id = ?", (owner, owner, job_id)).fetchone()
    if row is None:
        raise JobNotFound(job_id)
    return _job(row)


def _job_by_id(conn: sqlite3.Connection, job_id: str) -> JobRecord:
    row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFound(job_id)
    return _job(row)


def _update(conn: sqlite3.Connection, job: JobRecord, changes: dict[str, object]) -> JobRecord:
    if changes:
        assignments = ", ".join(f"{name} = ?" for name in changes)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*map(_encode, changes.values()), job.id))
    return replace(job, **changes)


def _insert(db: Database, table: str, columns: str, record: T, decode: Callable[[tuple], T]) -> T:
    """Stores an event or checkpoint of an existing job; returns it as `decode` reads it back."""
    row = _encode_row(record)
    with db.transaction() as conn:
        # Checked here rather than by a foreign key: SQLite enforces those only when a
        # connection turns them on, and the shared connection does not.
        _job_by_id(conn, record.job_id)
        conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({_placeholders(row)})", row)
    return decode(row)


def _page(
    conn: sqlite3.Connection,
    table: str,
    columns: str,
    where: str,
    params: tuple,
    limit: int,
    after: str | None,
    not_found: type[LookupError],
) -> tuple[list[tuple], bool]:
    """Rows newest first after the row with id `after`, and whether more follow."""
    if after is not None:
        cursor = conn.execute(f"SELECT seq FROM {table} WHERE {where} AND id = ?", (*params, after)).fetchone()
        if cursor is None:
            raise not_found(after)
        where, params = f"{where} AND seq < ?", (*params, cursor[0])
    rows = conn.execute(
        f"SELECT {columns} FROM {table} WHERE {where} ORDER BY seq DESC LIMIT ?",
        (*params, limit + 1),  # one more than asked tells whether another page exists
    ).fetchall()
    return rows[:limit], len(rows) > limit
