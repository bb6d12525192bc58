"""The co-serving policy on its own: plans of made-up sequences, a latency model fitted
to a known cost per unit of work. No model, no engine."""

from __future__ import annotations

import random

import pytest

from engine.coserving_policy import WARMUP_BACKWARD_LAYERS, WARMUP_FINETUNE_TOKENS, WARMUP_ITERATIONS, CoServingPolicy
from engine.finetune.backward_costs import BackwardCosts
from engine.finetune.backward_work import BackwardWork
from engine.latency_model import IterationShape, LatencyModel
from engine.messages import SamplingParams
from engine.plan import IterationPlan, ScheduledChunk, iteration_shape
from engine.sequence import Sequence
from engine.tpot_pacer import target

pytestmark = pytest.mark.unit

TPOT_SLO_S = 0.2
BACKWARD_LAYERS = 8
# Seconds per unit of each feature of the "true" machine the latency model learns.
SECONDS = {"base": 0.01, "decode": 0.002, "prefill": 0.0006, "finetune": 0.0008}


def true_seconds(shape: IterationShape) -> float:
    return (SECONDS["base"] + SECONDS["decode"] * shape.decode_tokens + SECONDS["prefill"] * shape.prefill_tokens
            + SECONDS["finetune"] * shape.finetune_forward_tokens)


def fitted_latency(iterations: int = 400) -> LatencyModel:
    rng = random.Random(0)
    model = LatencyModel()
    for _ in range(iterations):
        shape = IterationShape(decode_tokens=rng.randint(0, 64), prefill_tokens=rng.choice((0, 0, 64, 256)),
                               context_tokens=0, finetune_forward_tokens=rng.choice((0, 32, 128)))
        if shape.decode_tokens or shape.prefill_tokens or shape.finetune_forward_tokens:
            model.observe(shape, true_seconds(shape))
    return model


def decoding_plan(num_decodes: int, tpot_slo_s: float = TPOT_SLO_S) -> IterationPlan:
    plan = IterationPlan()
    for i in range(num_decodes):
        seq = Sequence(f"r{i}", [7, 7, 7], SamplingParams(max_tokens=8), 0.0)
        seq.tpot_slo_s = tpot_slo_s
        seq.num_computed_tokens = 2  # the prompt is in the cache but for its last token
        plan.chunks.append(ScheduledChunk(seq, 1))
    return plan


def policy(latency: LatencyModel | None = None) -> CoServingPolicy:
    p = CoServingPolicy(latency or fitted_latency(), TPOT_SLO_S, BACKWARD_LAYERS)
    p.begin_iteration(0.0, {}, None)
    return p


def test_without_inference_finetuning_takes_everything():
    p = policy()
    plan = IterationPlan()
    assert p.finetune_tokens(plan, 2048, BackwardWork()) == 2048
    allowance = p.backward_allowance(plan, inference_pending=False, costs=BackwardCosts())
    assert allowance.max_layers is None and allowance.seconds is None


def test_during_warm_up_finetuning_gets_a_few_tokens_and_one_layer():
    p = policy(LatencyModel())
    plan = decoding_plan(4)
    assert p.latency.num_observations < WARMUP_ITERATIONS
    assert p.finetune_tokens(plan, 2048, BackwardWork()) == WARMUP_FINETUNE_TOKENS
    assert p.backward_allowance(plan, True, BackwardCosts()).max_layers == WARMUP_BACKWARD_LAYERS


@pytest.mark.parametrize("decodes", [1, 16, 48])
def test_finetuning_fills_what_the_decodes_leave_of_the_budget(decodes):
    p = policy()
    plan = decoding_plan(decodes)
    granted = p.finetune_tokens(plan, 4096, BackwardWork())
    budget = target(TPOT_SLO_S)
    assert p.tpot_budget_s(plan) == pytest.approx(budget)
    # Within the budget on the machine the model learned, and not far under it.
    shape = iteration_shape(plan)
    with_finetuning = IterationShape(shape.decode_tokens, 0, shape.context_tokens, finetune_forward_tokens=granted)
    assert true_seconds(with_finetuning) <= budget * 1.02
    assert true_seconds(with_finetuning) >= budget - 4 * SECONDS["finetune"] - 0.01


def test_more_decodes_leave_fewer_finetuning_tokens_and_a_full_iteration_none():
    p = policy()
    grants = [p.finetune_tokens(decoding_plan(n), 4096, BackwardWork()) for n in (1, 16, 48, 100)]
    assert grants == sorted(grants, reverse=True) and grants[0] > grants[-2]
    assert grants[-1] == 0  # 100 decodes alone take longer than the budget


def test_the_expected_backward_takes_its_share_of_the_budget():
    p = policy()
    plan = decoding_plan(8)
    without = p.finetune_tokens(plan, 4096, BackwardWork())
    with_backward = p.finetune_tokens(plan, 4096, BackwardWork(layer_tokens=30 * 64, loss_tokens=64))
    assert with_backward < without


def test_backward_gets_the_budget_left_after_the_predicted_forward():
    p = policy()
    costs = BackwardCosts()
    small, large = decoding_plan(4), decoding_plan(40)
    small_allowance = p.backward_allowance(small, True, costs)
    large_allowance = p.backward_allowance(large, True, costs)
    assert small_allowance.max_layers == large_allowance.max_layers == BACKWARD_LAYERS
    forward_s = true_seconds(iteration_shape(small))
    assert small_allowance.seconds == pytest.approx(target(TPOT_SLO_S) - forward_s, abs=0.005)
    assert large_allowance.seconds < small_allowance.seconds
    assert p.backward_allowance(decoding_plan(120), True, costs).seconds == 0.0  # never negative


def test_no_finetuning_beside_prompts_that_packing_held_back():
    """A plan that left prompt tokens for later (prefill packing) gets no finetuning, in
    warm-up or not, though its predicted time leaves room."""
    for latency in (fitted_latency(), LatencyModel()):
        p = policy(latency)
        plan = decoding_plan(4)
        assert p.finetune_tokens(plan, 4096, BackwardWork()) > 0
        assert p.backward_allowance(plan, True, BackwardCosts()).max_layers > 0
        plan.prefill_held_back = True
        assert p.finetune_tokens(plan, 4096, BackwardWork()) == 0
        allowance = p.backward_allowance(plan, True, BackwardCosts())
        assert allowance.seconds == 0.0
        assert allowance.layers(allowance.seconds, allowance.max_layers, 64) == 0
        assert allowance.loss_tokens(allowance.seconds, 64) == 0


def test_a_late_iteration_shrinks_the_next_budget_and_the_work_with_it():
    p = policy()
    plan = decoding_plan(8)
    decoding = {c.seq.request_id: TPOT_SLO_S for c in plan.chunks}
    p.begin_iteration(0.0, decoding, None)
    on_time = p.finetune_tokens(plan, 4096, BackwardWork())
    p.begin_iteration(0.3, decoding, None)  # the previous iteration took 300 ms against a 200 ms SLO
    assert p.tpot_budget_s(plan) < target(TPOT_SLO_S)
    assert p.finetune_tokens(plan, 4096, BackwardWork()) < on_time


def test_the_strictest_request_sets_the_budget():
    p = policy()
    plan = decoding_plan(4)
    plan.chunks[0].seq.tpot_slo_s = 0.1
    assert p.tpot_budget_s(plan) == pytest.approx(target(0.1))
