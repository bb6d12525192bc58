"""Finetuning jobs from request to servable model.

    create      validating_files: render the training (and validation) file into token
                ids and loss masks; a bad file fails the job naming the line
    queued      handed to the engine (StartFinetune); jobs train concurrently, the
                engine shares its finetuning budget between them
    running     engine reports arrive per optimizer step: step events, checkpoints
                (each served at once as `<model>:ckpt-step-<n>`)
    succeeded   the final adapter is served as `fine_tuned_model` before the status says so

Everything is written to the store first, so a restart finds each job where it was: a
job that was validating is validated again, one that was queued, running or paused is
restarted from its newest checkpoint, and every finished model is served again.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from engine.messages import (
    FINISHED_STATUSES,
    ControlFinetune,
    FinetuneAction,
    FinetuneExample,
    FinetuneReport,
    FinetuneStep,
    StartFinetune,
)
from server.adapters import AdapterRegistry
from server.engine_client import EngineClient
from server.finetune.job_request import CreateJobRequest, engine_settings
from server.finetune.training_data import (
    TrainingDataError,
    render_training_file,
    summarize,
)
from server.store import Store
from server.store.jobs import InvalidTransition, JobError, JobRecord

log = logging.getLogger(__name__)

# At shutdown, how long recording the engine's last reports may take.
_LAST_REPORTS_TIMEOUT_S = 10.0


def owner_label(owner: str) -> str:
    """The owner as it appears in model names: short, and never the key itself."""
    return owner if ":" not in owner else owner.split(":", 1)[1][:12]


def model_name(record: JobRecord) -> str:
    return f"ft:{record.model}:{owner_label(record.owner)}:{record.suffix or ''}:{record.id}"


def checkpoint_name(record: JobRecord, step: int) -> str:
    return f"{model_name(record)}:ckpt-step-{step}"


class JobManager:
    def __init__(
        self,
        store: Store,
        engine: EngineClient,
        adapters: AdapterRegistry,
        tokenizer: PreTrainedTokenizerBase,
        base_model: str,
        base_model_dir: Path,
        data_dir: Path,
    ):
        self.store = store
        self.engine = engine
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.base_model_dir = base_model_dir
        self.jobs_dir = data_dir / "jobs"
        self._tasks: set[asyncio.Task] = set()
        # Reports are handled in arrival order, one at a time, off the engine reader.
        self._reports: asyncio.Queue[FinetuneReport] = asyncio.Queue()
        # For the metrics: latest (loss, progress 0-1, energy so far or None) of each
        # running or paused job that has stepped since start-up, and optimizer steps
        # reported since start-up.
        self.progress: dict[str, tuple[float, float, float | None]] = {}
        self.steps_reported = 0
        # Per job, the steps reported since its last checkpoint: a checkpoint is reported
        # once written, which may be a few steps after its own step's event.
        self._uncheckpointed: dict[str, dict[int, FinetuneStep]] = {}

    # -- start-up ----------------------------------------------------------------------

    async def start(self) -> None:
        self.engine.on_finetune_report = self._reports.put_nowait
        self._spawn(self._handle_reports())
        for record in await self._db(self.store.jobs.succeeded):
            await self._serve_outputs(record)
            if record.fine_tuned_model:
                await self.adapters.register_own(
                    record.fine_tuned_model, self._output_dir(record) / "final", record.owner
                )
        for record in await self._db(self.store.jobs.unfinished):
            if record.status == "validating_files":
                self._spawn(self._validate_and_start(record))
            else:
                await self._serve_outputs(record)
                self._spawn(self._resume(record))

    async def _serve_outputs(self, record: JobRecord) -> None:
        page = await self._db(self.store.jobs.list_checkpoints, None, record.id, limit=10_000)
        for checkpoint in page.records:
            await self.adapters.register_own(checkpoint.fine_tuned_model_checkpoint, checkpoint.path, record.owner)

    async def _resume(self, record: JobRecord) -> None:
        rendered = await self._render(record)
        if rendered is None:
            return
        self._send_start(record, *rendered, resume=True)
        if record.status == "paused":
            self.engine.send_finetune(ControlFinetune(record.id, "pause"))
        message = "Server restarted; the job continues from its last checkpoint"
        await self._db(self.store.jobs.add_event, record.id, "info", message)

    # -- requests ----------------------------------------------------------------------

    async def create(self, owner: str, request: CreateJobRequest, max_active: int | None = None) -> JobRecord:
        """Raises TooManyActiveJobs when the owner already has `max_active` unfinished jobs."""
        record = await self._db(
            self.store.jobs.create,
            owner,
            model=request.model,
            training_file=request.training_file,
            validation_file=request.validation_file,
            hyperparameters=request.resolved_hyperparameters(),
            lora=request.lora.model_dump(),
            seed=request.seed if request.seed is not None else 42,
            suffix=request.suffix,
            metadata=request.metadata,
            max_active=max_active,
        )
        await self._db(self.store.jobs.add_event, record.id, "info", f"Created fine-tuning job: {record.id}")
        self._spawn(self._validate_and_start(record))
        return record

    async def control(self, record: JobRecord, action: FinetuneAction) -> JobRecord:
        """pause / resume / cancel: the store changes now (it refuses a wrong state), the engine follows."""
        status = {"pause": "paused", "resume": "running", "cancel": "cancelled"}[action]
        updated = await self._db(self.store.jobs.set_status, record.id, status)
        if record.status in ("running", "paused"):
            self.engine.send_finetune(ControlFinetune(record.id, action))
        message = {"pause": "Job paused", "resume": "Job resumed", "cancel": "Job cancelled"}[action]
        await self._db(self.store.jobs.add_event, record.id, "info", message)
        if status == "cancelled":
            self.progress.pop(record.id, None)
            self._uncheckpointed.pop(record.id, None)
        return updated

    # -- the pipeline ------------------------------------------------------------------

    async def _render(self, record: JobRecord):
        """(training examples, validation examples) of the job, or None after failing it
        with the file's problem."""
        max_len = record.lora["max_seq_len"]
        try:
            examples = {"training_file": [], "validation_file": []}
            for param, file_id in (("training_file", record.training_file), ("validation_file", record.validation_file)):
                if file_id is None:
                    continue
                stored = await self._db(self.store.files.get, None, file_id)
                path = self.store.files.contents_path(stored.id)
                try:
                    rendered = await asyncio.to_thread(render_training_file, path, self.tokenizer, max_len)
                except TrainingDataError as exc:
                    raise _Invalid(param, f"{param} {file_id}: {exc}") from None
                examples[param] = rendered
        except _Invalid as exc:
            code = "invalid_training_file" if exc.param == "training_file" else "invalid_validation_file"
            await self._fail(record, code, str(exc), exc.param)
            return None
        except LookupError:
            await self._fail(record, "file_not_found", "a file of this job no longer exists", "training_file")
            return None
        return examples["training_file"], examples["validation_file"]

    async def _validate_and_start(self, record: JobRecord) -> None:
        await self._db(self.store.jobs.add_event, record.id, "info", "Validating training file")
        rendered = await self._render(record)
        if rendered is None:
            return
        examples, validation = rendered
        summary = summarize(examples)
        try:
            record = await self._db(self.store.jobs.set_status, record.id, "queued")
        except InvalidTransition:
            return  # cancelled while its files were validated
        message = f"Files validated: {summary.examples} examples, {summary.target_tokens} trained tokens per epoch"
        if validation:
            held_out = summarize(validation)
            message += f"; validation: {held_out.examples} examples, {held_out.target_tokens} scored tokens"
        await self._db(self.store.jobs.add_event, record.id, "info", message)
        self._send_start(record, examples, validation, resume=False)
        await self._db(self.store.jobs.set_status, record.id, "running")
        await self._db(self.store.jobs.add_event, record.id, "info", "Fine-tuning job started")

    def _send_start(self, record: JobRecord, examples, validation, resume: bool) -> None:
        settings = engine_settings(record.hyperparameters, record.lora, record.seed, len(examples))
        self.engine.send_finetune(
            StartFinetune(
                job_id=record.id,
                examples=[FinetuneExample(e.token_ids, e.target) for e in examples],
                settings=settings,
                output_dir=str(self._output_dir(record)),
                base_model=str(self.base_model_dir),
                resume=resume,
                validation=[FinetuneExample(e.token_ids, e.target) for e in validation],
            )
        )

    def _output_dir(self, record: JobRecord) -> Path:
        return self.jobs_dir / record.id

    async def _fail(self, record: JobRecord, code: str, message: str, param: str | None = None) -> None:
        log.warning("finetuning job %s failed: %s", record.id, message)
        await self._db(self.store.jobs.set_status, record.id, "failed", error=JobError(code, message, param))
        await self._db(self.store.jobs.add_event, record.id, "error", message)

    # -- engine reports ----------------------------------------------------------------

    async def _handle_reports(self) -> None:
        while True:
            report = await self._reports.get()
            try:
                await self._apply(report)
            except Exception:
                log.exception("handling the report of finetuning job %s", report.job_id)
            finally:
                self._reports.task_done()

    async def _apply(self, report: FinetuneReport) -> None:
        record = next((r for r in await self._db(self.store.jobs.unfinished) if r.id == report.job_id), None)
        if record is None:
            return  # cancelled or failed here first
        for step in report.steps:
            data = {"step": step.step, "total_steps": step.total_steps, "train_loss": step.loss,
                    "learning_rate": step.learning_rate, "tokens_trained": step.tokens_trained,
                    "tokens_per_second": step.tokens_per_second}
            message = f"Step {step.step}/{step.total_steps}: training loss={step.loss:.4f}"
            if step.energy_joules is not None:
                data["energy_joules"] = step.energy_joules
            if step.valid_loss is not None:
                data["valid_loss"] = step.valid_loss
                message += f", validation loss={step.valid_loss:.4f}"
            await self._db(self.store.jobs.add_event, record.id, "info", message, data)
            await self._db(self.store.jobs.update, record.id, trained_tokens=step.tokens_trained)
            self.progress[record.id] = (step.loss, step.step / step.total_steps, step.energy_joules)
            self.steps_reported += 1
        # A checkpoint comes with or after its step's event (the engine validates first).
        events = self._uncheckpointed.setdefault(record.id, {})
        events.update((s.step, s) for s in report.steps)
        for step, path in report.checkpoints:
            name = checkpoint_name(record, step)
            await self.adapters.register_own(name, Path(path), record.owner)
            metrics = _checkpoint_metrics(step, events.get(step))
            await self._db(self.store.jobs.add_checkpoint, record.id, step, name, metrics, path)
            await self._db(self.store.jobs.add_event, record.id, "info", f"Checkpoint created at step {step}: {name}")
            for done in [s for s in events if s <= step]:
                del events[done]
        if report.status in FINISHED_STATUSES:
            self.progress.pop(record.id, None)
            self._uncheckpointed.pop(record.id, None)
        if report.status == "succeeded" and report.final_path:
            name = model_name(record)
            await self.adapters.register_own(name, Path(report.final_path), record.owner)
            await self._db(self.store.jobs.set_status, record.id, "succeeded", fine_tuned_model=name)
            await self._db(self.store.jobs.add_event, record.id, "info", f"The job has successfully completed: {name}")
        elif report.status == "failed":
            await self._fail(record, "training_failed", report.error or "training failed")

    async def _db(self, call, *args, **kwargs):
        """A store call, run in a worker thread: SQLite commits with a full fsync, which
        must not stall the event loop that streams everyone's tokens."""
        return await asyncio.to_thread(call, *args, **kwargs)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """After the engine stopped: records what it reported on its way out (the last
        steps of running jobs), then stops the job tasks."""
        try:
            await asyncio.wait_for(self._reports.join(), _LAST_REPORTS_TIMEOUT_S)
        except TimeoutError:
            log.warning("stopping with %d finetuning report(s) not recorded", self._reports.qsize())
        for task in list(self._tasks):
            task.cancel()


def _checkpoint_metrics(step: int, event: FinetuneStep | None) -> dict:
    metrics = {"step": step, "train_loss": event.loss if event else None}
    if event is not None and event.valid_loss is not None:
        metrics["valid_loss"] = event.valid_loss
    return metrics


class _Invalid(Exception):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
