"""The co-serving policy: how much finetuning work an iteration carries beside inference.

Finetuning fills what inference leaves of each iteration's time budget (the FlexLLM
idea). The budget is the strictest TPOT SLO among the requests the iteration serves,
paced over iterations (tpot_pacer.py), and the work is priced by the latency model
before anything runs, so a plan is complete, backward included, when it is handed to
the runner; the pacer absorbs the prediction's error on the next iteration.

- forward tokens (`finetune_tokens`): all that is left when no inference runs, else
  what keeps the predicted iteration time (with the backward it brings) in the budget;
- backward (`backward_allowance`): whole backwards when no inference waits, else at
  most the configured slice of layers, and only what the budget has left after the
  plan's predicted forward time;
- neither when the scheduler's prefill packing held prompt tokens back for later
  iterations: the time finetuning would take is time those prompts wait for their
  first token;
- warm-up: until the latency model has seen a few iterations its predictions are the
  prior's, so finetuning next to inference is held to a few tokens and one layer.
"""

from __future__ import annotations

from engine.finetune.backward_costs import BackwardCosts
from engine.finetune.backward_work import BackwardAllowance, BackwardWork
from engine.latency_model import FINETUNE_BACKWARD, FINETUNE_LOSS, LatencyModel
from engine.plan import IterationPlan, iteration_shape
from engine.tpot_pacer import TpotPacer

WARMUP_ITERATIONS = 20
WARMUP_FINETUNE_TOKENS = 16
WARMUP_BACKWARD_LAYERS = 1


class CoServingPolicy:
    def __init__(self, latency: LatencyModel, default_tpot_slo_s: float, backward_layers_per_iteration: int):
        self.latency = latency
        self.pacer = TpotPacer()
        self.default_tpot_slo_s = default_tpot_slo_s
        self.backward_layers_per_iteration = backward_layers_per_iteration
        self.clock_mhz: int | None = None  # the GPU's SM clock this iteration; None on the CPU

    def begin_iteration(self, started: float, decoding_tpot_slos: dict[str, float], clock_mhz: int | None) -> None:
        """An iteration starts at `started` (perf_counter seconds), decoding for the
        requests in `decoding_tpot_slos` (request id -> TPOT SLO in seconds)."""
        self.pacer.tick(started, decoding_tpot_slos)
        self.clock_mhz = clock_mhz

    def tpot_budget_s(self, plan: IterationPlan) -> float:
        """Seconds this iteration may take: the plan's strictest TPOT SLO, paced."""
        slo = min((c.seq.tpot_slo_s for c in plan.chunks), default=self.default_tpot_slo_s)
        return self.pacer.budget(slo)

    def finetune_tokens(self, plan: IterationPlan, tokens_left: int, expected_backward: BackwardWork) -> int:
        """Finetuning forward tokens the plan (its inference chunks scheduled) may add, of
        `tokens_left`; `expected_backward` is the backward the iteration is expected to run."""
        if not plan.chunks:
            return tokens_left
        if plan.prefill_held_back:
            return 0
        if self.latency.num_observations < WARMUP_ITERATIONS:
            return min(tokens_left, WARMUP_FINETUNE_TOKENS)
        shape = iteration_shape(plan, expected_backward)
        return self.latency.max_finetune_tokens(shape, self.tpot_budget_s(plan), self.clock_mhz, limit=tokens_left)

    def backward_allowance(
        self, plan: IterationPlan, inference_pending: bool, costs: BackwardCosts
    ) -> BackwardAllowance:
        """The backward the planned iteration may run. `inference_pending`: requests are
        running or waiting; `costs`: the backward units as measured so far."""
        if not inference_pending:
            return BackwardAllowance()
        if not plan.chunks:
            return BackwardAllowance(max_layers=self.backward_layers_per_iteration)
        if self.latency.num_observations < WARMUP_ITERATIONS and not plan.prefill_held_back:
            return BackwardAllowance(max_layers=min(self.backward_layers_per_iteration, WARMUP_BACKWARD_LAYERS))
        forward_s = self.latency.predict(iteration_shape(plan), self.clock_mhz)
        prior = self.latency.costs(self.clock_mhz)
        spare_s = 0.0 if plan.prefill_held_back else max(0.0, self.tpot_budget_s(plan) - forward_s)
        return BackwardAllowance(
            max_layers=self.backward_layers_per_iteration,
            seconds=spare_s,
            seconds_per_layer_token=costs.per_layer_token(prior=float(prior[FINETUNE_BACKWARD])),
            seconds_per_loss_token=costs.per_loss_token(prior=float(prior[FINETUNE_LOSS])),
        )
