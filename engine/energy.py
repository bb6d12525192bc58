"""Who spent an iteration's energy: its requests and its finetuning jobs.

The device measures one number per iteration. We split it in proportion to each
piece of work's predicted seconds under the latency model: a decode costs its
token plus its whole attended context, a prefill chunk its tokens plus causal
attention, a finetuning job its forward chunk and its backward layer-tokens. The
fixed part of the iteration (weights streamed once, launches) is shared in the
same proportion: whoever ran in the iteration caused it. Splitting by token
counts alone would charge a 4k-context decode like a 10-token one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.plan import IterationPlan, attended_context

# Indices into LatencyModel.costs(): see IterationShape.features().
_DECODE, _PREFILL, _DECODE_CONTEXT, _PREFILL_CONTEXT, _FT_FORWARD, _FT_BACKWARD = range(1, 7)


@dataclass
class EnergyShares:
    requests: dict[str, float] = field(default_factory=dict)  # request id -> joules
    jobs: dict[str, float] = field(default_factory=dict)  # finetuning job id -> joules

    @property
    def finetune_joules(self) -> float:
        return sum(self.jobs.values())


def split_energy(
    joules: float, plan: IterationPlan, backward_layer_tokens_by_job: dict[str, int], costs: np.ndarray
) -> EnergyShares:
    """`costs`: seconds per feature unit at the clock the iteration ran (LatencyModel.costs)."""
    weights: dict[tuple[str, str], float] = {}  # (kind, id) -> predicted seconds
    for chunk in plan.chunks:
        if chunk.num_new_tokens == 1:
            seconds = costs[_DECODE] + costs[_DECODE_CONTEXT] * chunk.end
        else:
            seconds = costs[_PREFILL] * chunk.num_new_tokens + costs[_PREFILL_CONTEXT] * attended_context(chunk)
        weights[("request", chunk.seq.request_id)] = seconds
    for chunk in plan.finetune_chunks:
        key = ("job", chunk.seq.job.job_id)
        seconds = costs[_FT_FORWARD] * chunk.num_new_tokens + costs[_PREFILL_CONTEXT] * attended_context(chunk)
        weights[key] = weights.get(key, 0.0) + seconds
    for job_id, layer_tokens in backward_layer_tokens_by_job.items():
        key = ("job", job_id)
        weights[key] = weights.get(key, 0.0) + costs[_FT_BACKWARD] * layer_tokens

    shares = EnergyShares()
    total = sum(weights.values())
    if not weights:
        return shares
    for (kind, key), seconds in weights.items():
        # A model with every cost clamped to zero (a cold fit) predicts nothing: split evenly.
        share = float(joules * (seconds / total if total > 0 else 1 / len(weights)))
        (shares.requests if kind == "request" else shares.jobs)[key] = share
    return shares
