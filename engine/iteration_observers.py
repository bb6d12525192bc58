"""What watches an engine iteration without changing it: the latency model's fit and the
GPU's power (the governor's clock before the iteration, the energy read and charged
after it). Each is called with the plan, its shape and the elapsed time, and returns
its fields of the iteration's stats (engine/messages.py, IterationStats)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from engine.coserving_policy import CoServingPolicy
from engine.energy import split_energy
from engine.finetune.coordinator import FinetuneCoordinator
from engine.latency_model import IterationShape, LatencyModel
from engine.plan import IterationPlan
from engine.power.governor import LoadState
from engine.power.monitor import PowerMonitor
from engine.sequence import Sequence


class IterationObserver(Protocol):
    def after_iteration(self, plan: IterationPlan, shape: IterationShape, elapsed_s: float) -> dict: ...


class LatencyFit:
    """Scores the latency model on each iteration, then folds the iteration in."""

    def __init__(self, latency: LatencyModel, policy: CoServingPolicy):
        self.latency = latency
        self.policy = policy

    def after_iteration(self, plan: IterationPlan, shape: IterationShape, elapsed_s: float) -> dict:
        predicted = self.latency.predict(shape, self.policy.clock_mhz)
        self.latency.observe(shape, elapsed_s, self.policy.clock_mhz)
        return {"predicted_seconds": predicted, "latency_model_error": self.latency.mean_error}


class PowerAccounting:
    """The GPU's side of an iteration: the governor's control tick and the clock it ran
    at, then the energy it took, charged to its requests and finetuning jobs."""

    def __init__(self, power: PowerMonitor, latency: LatencyModel, policy: CoServingPolicy,
                 sequences: dict[str, Sequence], finetune: FinetuneCoordinator):
        self.power = power
        self.latency = latency
        self.policy = policy
        self.sequences = sequences
        self.finetune = finetune
        self.finetune_forward_tokens = 0  # of the last iteration, for the governor's projection

    def before_iteration(self, load_state: Callable[[], LoadState]) -> int:
        """The SM clock this iteration runs at, after the governor's tick."""
        self.power.tick(time.time(), load_state)
        self.power.begin_iteration()
        return self.power.clock_mhz()

    def after_iteration(self, plan: IterationPlan, shape: IterationShape, elapsed_s: float) -> dict:
        self.finetune_forward_tokens = shape.finetune_forward_tokens
        joules = self.power.end_iteration(shape)
        shares = split_energy(
            joules, plan, self.finetune.backward_work_by_job, self.latency.costs(self.policy.clock_mhz)
        )
        for request_id, share in shares.requests.items():
            self.sequences[request_id].energy_joules += share
        for job_id, share in shares.jobs.items():
            job = self.finetune.jobs.get(job_id)
            if job is not None:
                job.energy_joules = (job.energy_joules or 0.0) + share
        reading = self.power.reading
        return {
            "energy_joules": joules,
            "finetune_energy_joules": shares.finetune_joules,
            "sm_clock_mhz": self.policy.clock_mhz,
            "target_sm_clock_mhz": reading.target_sm_clock_mhz,
            "power_watts": reading.power_watts,
        }
