"""The job store on real SQLite files: records, owner isolation, the status machine,
events and checkpoints with cursor pagination, and everything surviving a reopen."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from server.store import InvalidTransition, JobNotFound, Store
from server.store import jobs as jobs_module
from server.store.jobs import FINISHED, TRANSITIONS, CursorNotFound, JobError, JobRecord

pytestmark = pytest.mark.unit

HYPERPARAMETERS = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
LORA = {"rank": 16, "alpha": 32.0, "target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-3, "max_seq_len": 1024}
STATUSES = tuple(TRANSITIONS)


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store.open(tmp_path)
    yield store
    store.close()


def new_job(store: Store, owner: str = "alice", **fields) -> JobRecord:
    defaults = {"model": "base", "training_file": "file-x", "hyperparameters": HYPERPARAMETERS, "lora": LORA, "seed": 7}
    return store.jobs.create(owner, **{**defaults, **fields})


def drive(store: Store, job: JobRecord, *statuses: str) -> JobRecord:
    """Moves a job through `statuses`, failing with an error where asked to fail."""
    for status in statuses:
        error = JobError("engine_error", "the engine stopped") if status == "failed" else None
        job = store.jobs.set_status(job.id, status, error=error)
    return job


# The allowed path into each status from a fresh job.
PATH_TO = {
    "validating_files": (),
    "queued": ("queued",),
    "running": ("queued", "running"),
    "paused": ("queued", "running", "paused"),
    "succeeded": ("queued", "running", "succeeded"),
    "failed": ("queued", "running", "failed"),
    "cancelled": ("queued", "cancelled"),
}


def test_create_and_get(store):
    before = int(time.time())
    job = new_job(store, validation_file="file-v", suffix="mine", metadata={"team": "search"})
    assert job.id.startswith("ftjob-") and job.owner == "alice" and job.status == "validating_files"
    assert (job.model, job.training_file, job.validation_file, job.suffix, job.seed) == (
        "base",
        "file-x",
        "file-v",
        "mine",
        7,
    )
    assert job.hyperparameters == HYPERPARAMETERS and job.lora == LORA and job.metadata == {"team": "search"}
    assert before <= job.created_at <= time.time()
    assert (job.started_at, job.finished_at, job.fine_tuned_model, job.error, job.trained_tokens) == (None,) * 5
    assert store.jobs.get("alice", job.id) == job
    bare = new_job(store)
    assert (bare.validation_file, bare.suffix, bare.metadata) == (None, None, None)
    assert store.jobs.get("alice", bare.id) == bare


def test_list_pages_newest_first(store):
    ids = [new_job(store).id for _ in range(5)]
    new_job(store, owner="bob")
    everything = store.jobs.list("alice", limit=10)
    assert [j.id for j in everything.records] == ids[::-1] and not everything.has_more

    pages, after = [], None
    while True:
        page = store.jobs.list("alice", limit=2, after=after)
        pages.append([j.id for j in page.records])
        if not page.has_more:
            break
        after = page.records[-1].id
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]
    exact = store.jobs.list("alice", limit=5)
    assert len(exact.records) == 5 and not exact.has_more
    assert store.jobs.list("alice", limit=10, after=ids[0]).records == []
    with pytest.raises(JobNotFound):
        store.jobs.list("alice", limit=10, after="ftjob-nope")


def test_owners_are_isolated(store):
    mine, theirs = new_job(store, "alice"), new_job(store, "bob")
    for call in (store.jobs.get, lambda owner, job_id: store.jobs.list_events(owner, job_id, limit=10)):
        with pytest.raises(JobNotFound) as raised:
            call("alice", theirs.id)
        assert raised.value.job_id == theirs.id and theirs.id in str(raised.value)
    with pytest.raises(JobNotFound):
        store.jobs.list_checkpoints("alice", theirs.id, limit=10)
    with pytest.raises(JobNotFound):
        store.jobs.list("alice", limit=10, after=theirs.id)
    assert [j.id for j in store.jobs.list("alice", limit=10).records] == [mine.id]
    assert [j.id for j in store.jobs.list("bob", limit=10).records] == [theirs.id]


@pytest.mark.parametrize("current", STATUSES)
def test_every_transition_is_allowed_or_refused(store, current):
    for requested in STATUSES:
        job = new_job(store)
        drive(store, job, *PATH_TO[current])
        if requested in TRANSITIONS[current]:
            assert drive(store, job, requested).status == requested
        else:
            with pytest.raises(InvalidTransition) as raised:
                drive(store, job, requested)
            assert (raised.value.current, raised.value.requested) == (current, requested)
            assert store.jobs.get("alice", job.id).status == current


def test_the_documented_transitions():
    assert TRANSITIONS == {
        "validating_files": {"queued", "failed", "cancelled"},
        "queued": {"running", "failed", "cancelled"},
        "running": {"paused", "succeeded", "failed", "cancelled"},
        "paused": {"running", "failed", "cancelled"},
        "succeeded": set(),
        "failed": set(),
        "cancelled": set(),
    }
    assert FINISHED == {"succeeded", "failed", "cancelled"}


def test_status_changes_stamp_times_and_carry_their_fields(store, monkeypatch):
    clock = iter(range(1000, 2000, 10))
    monkeypatch.setattr(jobs_module, "time", SimpleNamespace(time=lambda: next(clock)))
    job = new_job(store)
    with pytest.raises(JobNotFound):
        store.jobs.set_status("ftjob-nope", "queued")
    running = drive(store, job, "queued", "running")
    assert (job.created_at, running.started_at, running.finished_at) == (1000, 1020, None)
    resumed = drive(store, job, "paused", "running")
    assert resumed.started_at == 1020  # the first start is the one that counts
    progress = store.jobs.update(job.id, trained_tokens=1200)
    assert progress.trained_tokens == 1200 and progress.status == "running"
    done = store.jobs.set_status(job.id, "succeeded", fine_tuned_model="base:ft-abc", trained_tokens=3600)
    assert (done.fine_tuned_model, done.trained_tokens, done.error) == ("base:ft-abc", 3600, None)
    assert done.finished_at == 1050 and store.jobs.get("alice", job.id) == done

    failing = new_job(store)
    with pytest.raises(ValueError, match="needs an error"):
        store.jobs.set_status(failing.id, "failed")
    with pytest.raises(ValueError, match="needs an error"):
        store.jobs.set_status(failing.id, "cancelled", error=JobError("x", "y"))
    error = JobError("invalid_training_file", "line 3: invalid JSON", "training_file")
    failed = store.jobs.set_status(failing.id, "failed", error=error)
    assert failed.error == error and failed.finished_at is not None and failed.started_at is None
    assert store.jobs.get("alice", failing.id) == failed


def test_events_newest_first_with_pages(store):
    job = new_job(store)
    other = new_job(store)
    events = [store.jobs.add_event(job.id, "info", f"step {i}", {"step": i, "loss": 1.0 / (i + 1)}) for i in range(5)]
    store.jobs.add_event(other.id, "info", "elsewhere")
    warning = store.jobs.add_event(job.id, "warn", "slow")
    assert warning.id.startswith("ftevent-") and warning.data is None and warning.job_id == job.id
    assert events[2].data == {"step": 2, "loss": 1.0 / 3} and events[2].level == "info"

    newest_first = [warning, *events[::-1]]
    assert store.jobs.list_events("alice", job.id, limit=100).records == newest_first
    first = store.jobs.list_events("alice", job.id, limit=4)
    assert first.records == newest_first[:4] and first.has_more
    rest = store.jobs.list_events("alice", job.id, limit=4, after=first.records[-1].id)
    assert rest.records == newest_first[4:] and not rest.has_more
    with pytest.raises(CursorNotFound):  # an event of another job is no cursor here
        store.jobs.list_events(
            "alice", job.id, limit=4, after=store.jobs.list_events("alice", other.id, limit=1).records[0].id
        )
    with pytest.raises(ValueError, match="level"):
        store.jobs.add_event(job.id, "debug", "x")
    with pytest.raises(JobNotFound):
        store.jobs.add_event("ftjob-nope", "info", "x")


def test_checkpoints_newest_first_with_pages(store, tmp_path):
    job = new_job(store)
    saved = [
        store.jobs.add_checkpoint(
            job.id, step, f"base:ft-abc:ckpt-step-{step}", {"train_loss": 2.0 - step / 10}, tmp_path / f"step-{step}"
        )
        for step in (10, 20, 30)
    ]
    assert saved[0].id.startswith("ftckpt-") and saved[0].path == tmp_path / "step-10"
    assert saved[0].fine_tuned_model_checkpoint == "base:ft-abc:ckpt-step-10" and saved[0].metrics == {
        "train_loss": 1.0
    }
    page = store.jobs.list_checkpoints("alice", job.id, limit=2)
    assert page.records == saved[:0:-1] and page.has_more
    last = store.jobs.list_checkpoints("alice", job.id, limit=2, after=page.records[-1].id)
    assert last.records == saved[:1] and not last.has_more
    with pytest.raises(CursorNotFound):
        store.jobs.list_checkpoints("alice", job.id, limit=2, after="ftckpt-nope")
    with pytest.raises(JobNotFound):
        store.jobs.add_checkpoint("ftjob-nope", 1, "x", {}, tmp_path)
    assert store.jobs.list_checkpoints("alice", new_job(store).id, limit=2).records == []


def test_unfinished_lists_every_owner_oldest_first(store):
    jobs = {status: new_job(store, owner=f"owner-{status}") for status in STATUSES}
    for status, job in jobs.items():
        drive(store, job, *PATH_TO[status])
    unfinished = store.jobs.unfinished()
    assert [j.id for j in unfinished] == [jobs[s].id for s in ("validating_files", "queued", "running", "paused")]
    assert [j.status for j in unfinished] == ["validating_files", "queued", "running", "paused"]


def test_everything_survives_a_reopen(tmp_path):
    store = Store.open(tmp_path)
    job = new_job(store, metadata={"k": "v"})
    drive(store, job, "queued", "running")
    job = store.jobs.update(job.id, trained_tokens=50)
    event = store.jobs.add_event(job.id, "info", "Step 1/10", {"step": 1})
    checkpoint = store.jobs.add_checkpoint(job.id, 1, "base:ft-x:ckpt-step-1", {"loss": 0.5}, Path("/data/ckpt"))
    store.close()

    store = Store.open(tmp_path)
    try:
        assert store.jobs.get("alice", job.id) == job
        assert store.jobs.unfinished() == [job]
        assert store.jobs.list_events("alice", job.id, limit=10).records == [event]
        assert store.jobs.list_checkpoints("alice", job.id, limit=10).records == [checkpoint]
        # The job goes on where it was: its status machine is durable too.
        assert store.jobs.set_status(job.id, "succeeded", fine_tuned_model="base:ft-x").status == "succeeded"
    finally:
        store.close()
