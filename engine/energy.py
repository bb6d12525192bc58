"""Who spent an iteration's energy: its requests and its finetuning jobs.

The device measures one number per iteration. We split it in proportion to each
piece of work's predicted seconds under the latency model: a decode costs its
token plus its whole attended context, a prefill chunk its tokens plus causal
attention, a finetuning job its forward chunk, its backward layer-tokens and its
loss-head tokens. The fixed part of the iteration (weights streamed once,
launches) is shared in the same proportion: whoever ran in the iteration caused
it. Splitting by token counts alone would charge a 4k-context decode like a
10-token one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.finetune.backward_work import BackwardWork
from engine.latency_model import (
    DECODE,
    DECODE_CONTEXT,
    FINETUNE_BACKWARD,
    FINETUNE_FORWARD,
    FINETUNE_LOSS,
    PREFILL,
    PREFILL_CONTEXT,
)
from engine.plan import IterationPlan, attended_context


@dataclass
class EnergyShares:
    requests: dict[str, float] = field(default_factory=dict)  # request id -> joules
    jobs: dict[str, float] = field(default_factory=dict)  # finetuning job id -> joules

    @property
    def finetune_joules(self) -> float:
        return sum(self.jobs.values())


def split_energy(
    joules: float, plan: IterationPlan, backward_by_job: dict[str, BackwardWork], costs: np.ndarray
) -> EnergyShares:
    """`costs`: seconds per feature unit at the clock the iteration ran (LatencyModel.costs)."""
    weights: dict[tuple[str, str], float] = {}  # (kind, id) -> predicted seconds
    for chunk in plan.chunks:
        if chunk.num_new_tokens == 1:
            seconds = costs[DECODE] + costs[DECODE_CONTEXT] * chunk.end
        else:
            seconds = costs[PREFILL] * chunk.num_new_tokens + costs[PREFILL_CONTEXT] * attended_context(chunk)
        weights[("request", chunk.seq.request_id)] = seconds
    for chunk in plan.finetune_chunks:
        key = ("job", chunk.seq.job.job_id)
        seconds = costs[FINETUNE_FORWARD] * chunk.num_new_tokens + costs[PREFILL_CONTEXT] * attended_context(chunk)
        weights[key] = weights.get(key, 0.0) + seconds
    for job_id, work in backward_by_job.items():
        key = ("job", job_id)
        seconds = costs[FINETUNE_BACKWARD] * work.layer_tokens + costs[FINETUNE_LOSS] * work.loss_tokens
        weights[key] = weights.get(key, 0.0) + seconds

    shares = EnergyShares()
    total = sum(weights.values())
    if not weights:
        return shares
    for (kind, key), seconds in weights.items():
        # A model with every cost clamped to zero (a cold fit) predicts nothing: split evenly.
        share = float(joules * (seconds / total if total > 0 else 1 / len(weights)))
        (shares.requests if kind == "request" else shares.jobs)[key] = share
    return shares
