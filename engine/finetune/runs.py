"""The lifecycle of finetuning jobs in the engine: start, pause, resume, cancel,
checkpoints on schedule, the final adapter, and reports for the server.

`FinetuneCoordinator` does the training work each iteration; this module turns the
server's `StartFinetune` / `ControlFinetune` messages into jobs and their steps back
into `FinetuneReport`s. A job that raises is failed with its error, and the engine
and the other jobs go on.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from engine.finetune.checkpoint import (
    TRAINER_STATE,
    CheckpointSnapshot,
    load_checkpoint,
    take_snapshot,
    write_checkpoint,
)
from engine.finetune.coordinator import FinetuneCoordinator
from engine.finetune.job import FinetuneJob, Hyperparameters, TrainingExample
from engine.finetune.lora_params import LoRAConfig, write_peft
from engine.parallel.tensor_parallel import TensorParallel
from engine.messages import (
    FINISHED_STATUSES,
    ControlFinetune,
    FinetuneReport,
    FinetuneStatus,
    FinetuneStep,
    StartFinetune,
)

log = logging.getLogger(__name__)


@dataclass
class _Run:
    job: FinetuneJob
    output_dir: Path
    base_model: str
    checkpoint_every: int
    reported_steps: int = 0  # events already sent
    checked_step: int = 0  # last step considered for a checkpoint
    saved_step: int = 0  # step of the newest checkpoint on disk (or being written)
    unreported_checkpoints: list[tuple[int, str]] = field(default_factory=list)
    writing: list[tuple[int, str, Future]] = field(default_factory=list)  # checkpoints being written
    snapshot: CheckpointSnapshot | None = None  # the latest one, refilled by the next
    status: FinetuneStatus = "running"
    status_reported: bool = False
    final_path: str | None = None
    error: str | None = None


def _checkpoint_dir(run: _Run) -> Path:
    """Where the checkpoint of the run's current step goes."""
    return run.output_dir / "checkpoints" / f"step-{run.job.step}"


def remove_unfinished_checkpoints(output_dir: Path) -> None:
    """Staging directories of checkpoint writes that a crash interrupted (checkpoint.py
    writes aside, then renames)."""
    for staging in (output_dir / "checkpoints").glob(".step-*"):
        shutil.rmtree(staging, ignore_errors=True)
        log.info("removed the unfinished checkpoint %s", staging)


def newest_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in (output_dir / "checkpoints").glob("step-*") if (p / TRAINER_STATE).is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


class FinetuneRuns:
    def __init__(self, coordinator: FinetuneCoordinator, model, layout,
                 tensor_parallel: TensorParallel | None = None, send: Callable[[tuple], None] | None = None):
        """tensor_parallel, send: this rank's place and how job operations reach the other
        ranks (engine/parallel/workers.py), under tensor parallelism."""
        self.coordinator = coordinator
        self.model = model
        self.layout = layout
        self.tensor_parallel, self.send = tensor_parallel, send
        self.runs: dict[str, _Run] = {}
        # Checkpoints are written off the engine loop (see checkpoint.py), one at a time.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")

    def start(self, msg: StartFinetune) -> None:
        s = msg.settings
        examples = [TrainingExample(e.token_ids, e.target) for e in msg.examples]
        validation = [TrainingExample(e.token_ids, e.target) for e in msg.validation]
        hyperparameters = Hyperparameters(
            n_epochs=s.n_epochs, batch_size=s.batch_size, learning_rate=s.learning_rate,
            warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
        )
        lora = LoRAConfig(rank=s.rank, alpha=s.alpha, target_modules=tuple(s.target_modules), use_rslora=s.use_rslora)
        output_dir = Path(msg.output_dir)
        checkpoint_every = max(1, s.checkpoint_every_steps)
        run = None
        try:
            # Validation runs on the checkpoint steps, so each checkpoint carries its score.
            job = FinetuneJob(msg.job_id, self.model, self.layout, examples, hyperparameters, lora, s.seed,
                              validation, validate_every=checkpoint_every, tensor_parallel=self.tensor_parallel,
                              send=self.send)
            run = _Run(job, output_dir, msg.base_model, checkpoint_every)
            if msg.resume:
                remove_unfinished_checkpoints(output_dir)
            if msg.resume and (checkpoint := newest_checkpoint(output_dir)) is not None:
                load_checkpoint(job, checkpoint)
                run.checked_step = run.saved_step = job.step
                log.info("finetuning job %s resumes from %s (step %d)", msg.job_id, checkpoint, job.step)
            self.coordinator.add_job(job)
        except (ValueError, OSError, RuntimeError) as exc:
            run = run or _Run(None, output_dir, msg.base_model, 1)
            self._fail(msg.job_id, run, exc)
            return
        self.runs[msg.job_id] = run

    def control(self, msg: ControlFinetune) -> None:
        run = self.runs.get(msg.job_id)
        if run is None or run.status not in ("running", "paused"):
            return
        if msg.action == "cancel":
            self.coordinator.remove_job(msg.job_id)
            self._set_status(run, "cancelled")
        elif msg.action == "pause":
            self.coordinator.pause(msg.job_id)
            self._set_status(run, "paused")
        elif msg.action == "resume":
            self.coordinator.resume(msg.job_id)
            self._set_status(run, "running")

    def after_iteration(self) -> None:
        """Checkpoints for jobs that stepped, the final adapter for jobs that finished;
        checkpoints written since are reported (a paused job's too). An idle engine calls
        it too, for the checkpoints that finish writing while no iteration runs."""
        for job_id, run in list(self.runs.items()):
            if run.status not in ("running", "paused"):
                continue
            job, running = run.job, run.status == "running"
            try:
                # A job steps at most once per iteration, right at a batch boundary, and
                # stays there while it validates: once validated, its state is a clean
                # checkpoint and the step's event has been emitted.
                if running and job.step > run.checked_step and not job.validating:
                    run.checked_step = job.step
                    if job.step % run.checkpoint_every == 0 or job.done:
                        path = _checkpoint_dir(run)
                        self._collect_written(run, wait=True)  # the snapshot's buffers are free again
                        run.snapshot = take_snapshot(job, run.base_model, reuse=run.snapshot)
                        write = self._writer.submit(write_checkpoint, run.snapshot, path)
                        run.writing.append((job.step, str(path), write))
                        run.saved_step = job.step
                self._collect_written(run, wait=running and job.done)
                if running and job.done:
                    final = run.output_dir / "final"
                    write_peft(final, job.peft_state(), job.lora.peft_config(run.base_model))
                    run.final_path = str(final)
                    self.coordinator.remove_job(job_id)
                    self._set_status(run, "succeeded")
            except (OSError, RuntimeError) as exc:
                self.coordinator.remove_job(job_id)
                self._fail(job_id, run, exc)

    def writing(self) -> bool:
        """Some checkpoint is still being written."""
        return any(run.writing for run in self.runs.values())

    @staticmethod
    def _collect_written(run: _Run, wait: bool) -> None:
        """Checkpoints whose write has finished become reportable, in step order (with
        `wait`: all of them, once written); a failed write raises its error."""
        while run.writing and (wait or run.writing[0][2].done()):
            step, path, future = run.writing.pop(0)
            future.result()
            run.unreported_checkpoints.append((step, path))

    def save_progress(self) -> None:
        """The engine is stopping: each job that stepped since its newest checkpoint gets
        one of its last step boundary, written before this returns, so that a restart
        goes on from there rather than redoing the steps since the scheduled one. It is
        not reported: it exists for the resume, not to be served. A job in the middle of
        a validation pass keeps its scheduled checkpoint (it would owe the score)."""
        for job_id, run in self.runs.items():
            job = run.job
            if run.status not in ("running", "paused") or job.validating or job.step <= run.saved_step:
                continue
            try:
                self._collect_written(run, wait=True)
                path = _checkpoint_dir(run)
                write_checkpoint(take_snapshot(job, run.base_model, reuse=run.snapshot), path)
                run.saved_step = job.step
                log.info("finetuning job %s saved at step %d for its resume", job_id, job.step)
            except (OSError, RuntimeError) as exc:
                log.error("finetuning job %s: progress not saved: %s", job_id, exc)

    def close(self) -> None:
        """Let checkpoints being written finish (the engine is exiting)."""
        self._writer.shutdown(wait=True)

    def _set_status(self, run: _Run, status: FinetuneStatus) -> None:
        run.status = status
        run.status_reported = False

    def _fail(self, job_id: str, run: _Run, exc: Exception) -> None:
        log.error("finetuning job %s failed: %s", job_id, exc)
        run.error = f"{type(exc).__name__}: {exc}"
        self._set_status(run, "failed")
        self.runs[job_id] = run

    def idle_reports(self) -> list[FinetuneReport]:
        """With no iteration to run: the checkpoints written since the last report."""
        self.after_iteration()
        return self.reports()

    def reports(self) -> list[FinetuneReport]:
        """What changed since the last call; finished runs are forgotten once reported."""
        out = []
        for job_id, run in list(self.runs.items()):
            events = run.job.events[run.reported_steps :] if run.job is not None else []
            if not events and not run.unreported_checkpoints and run.status_reported:
                continue
            out.append(
                FinetuneReport(
                    job_id=job_id,
                    status=run.status,
                    steps=[FinetuneStep(e.step, e.total_steps, e.loss, e.learning_rate, e.tokens_trained,
                                        e.tokens_per_second, e.energy_joules, e.valid_loss) for e in events],
                    checkpoints=run.unreported_checkpoints,
                    final_path=run.final_path,
                    error=run.error,
                )
            )
            run.reported_steps += len(events)
            run.unreported_checkpoints = []
            run.status_reported = True
            if run.status in FINISHED_STATUSES:
                del self.runs[job_id]
        return out
