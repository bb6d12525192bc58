"""Runs finetuning jobs inside the engine step, around the inference that comes first.

Per engine iteration:
  before scheduling   each idle job hands its next training sequence to the scheduler;
  after the forward   the layer inputs the runner captured for training chunks are
                      kept with their sequence; a completed forward starts its backward
                      (or waits for the job's running one: a job forwards its next
                      sequence during a backward of the same optimizer batch);
  after the update    backward slices run within the iteration's allowance (time left
                      in the TPOT budget, at most `backward_layers_per_iteration` layers),
                      shared round robin by the jobs with backward work; after an
                      optimizer step the job's compute slot gets the new weights.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.finetune.backward_costs import BackwardCosts
from engine.finetune.backward_work import BackwardAllowance, BackwardWork
from engine.finetune.job import FinetuneJob, TrainingSequence
from engine.lora.manager import AdapterEntry, LoRAManager
from engine.plan import IterationPlan
from engine.scheduler import Scheduler


class FinetuneCoordinator:
    def __init__(
        self,
        loras: LoRAManager,
        scheduler: Scheduler,
        backward_layers_per_iteration: int,
    ):
        self.loras = loras
        self.scheduler = scheduler
        self.backward_layers_per_iteration = backward_layers_per_iteration
        self.jobs: dict[str, FinetuneJob] = {}
        self._adapters: dict[str, AdapterEntry] = {}
        self._turn = 0
        self.backward_work = BackwardWork()  # of the last iteration, for the latency model
        self.backward_work_by_job: dict[str, BackwardWork] = {}  # the same per job, for energy
        self.backward_costs = BackwardCosts()  # measured on every job's units: one model
        self.paused: set[str] = set()

    def add_job(self, job: FinetuneJob) -> None:
        self.jobs[job.job_id] = job
        self._adapters[job.job_id] = self.loras.add_trainable(
            f"finetune:{job.job_id}", job.lora.serving_weights(self.loras.dtype), job.job_id
        )

    def remove_job(self, job_id: str) -> FinetuneJob:
        job = self.jobs.pop(job_id)
        self.paused.discard(job_id)
        for seq in job.forwarding:
            self.scheduler.drop_finetune(seq)
        job.forget()
        self.loras.release_trainable(self._adapters.pop(job_id))
        return job

    def pause(self, job_id: str) -> None:
        """No new training sequences; the one in flight finishes."""
        self.paused.add(job_id)

    def resume(self, job_id: str) -> None:
        self.paused.discard(job_id)

    def has_work(self) -> bool:
        return any(
            not job.done and (job_id not in self.paused or job.forwarding or job.backward or job.ready)
            for job_id, job in self.jobs.items()
        )

    def before_schedule(self) -> None:
        for job_id, job in self.jobs.items():
            if job_id in self.paused:
                continue
            seq = job.next_sequence()
            if seq is not None:
                seq.lora = self._adapters[job_id]
                self.scheduler.add_finetune(seq)

    def after_forward(self, plan: IterationPlan, captured: dict[str, list[torch.Tensor]]) -> None:
        for chunk in plan.finetune_chunks:
            seq: TrainingSequence = chunk.seq
            seq.job.keep(seq, captured[seq.request_id])
        for seq in self.scheduler.update_finetune(plan):
            seq.job.forward_finished(seq)

    def expected_backward(self) -> BackwardWork:
        """The most backward work the next `run_backward` can do under the configured
        layer slice (reserved in the latency budget before forward tokens are sized)."""
        running = [job for job in self.jobs.values() if job.backward is not None]
        if not running:
            return BackwardWork()
        longest = max(len(job.backward.token_ids) for job in running)
        return BackwardWork(self.backward_layers_per_iteration * longest, sum(j.pending_loss_tokens for j in running))

    def run_backward(self, allowance: BackwardAllowance) -> None:
        """Backward slices for this iteration within `allowance`, split fairly between the
        jobs with backward work (each gets an even share of what the ones before it left);
        refresh the slots of jobs that stepped."""
        self.backward_work = BackwardWork()
        self.backward_work_by_job = {}
        active = [job for job in self.jobs.values() if job.backward is not None]
        if not active:
            return
        start = self._turn % len(active)
        self._turn += 1
        seconds, layers = allowance.seconds, allowance.max_layers
        for i, job in enumerate(active[start:] + active[:start]):
            left = len(active) - i
            share = dataclasses.replace(
                allowance,
                seconds=None if seconds is None else seconds / left,
                max_layers=None if layers is None else -(-layers // left),  # ceil: a lone layer still runs
            )
            step_before, tokens = job.step, len(job.backward.token_ids)
            work = job.backward_slice(share, self.backward_costs)
            self.backward_work += work
            self.backward_work_by_job[job.job_id] = work
            if seconds is not None:
                seconds -= allowance.seconds_for(work)
            if layers is not None:
                layers -= work.layer_tokens // tokens
            if job.step != step_before:
                self.loras.refresh(self._adapters[job.job_id], job.lora.serving_weights(self.loras.dtype))
