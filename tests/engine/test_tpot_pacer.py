"""The TPOT pacer: per-iteration budgets that hold each request's mean interval at its
target."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from engine.tpot_pacer import BURST, TpotPacer, target

pytestmark = pytest.mark.unit

SLO = 0.2
TARGET = target(SLO)


def _pacer_after(*intervals: float, requests=("r",)) -> TpotPacer:
    """A pacer that has seen decoding iterations of these lengths, back to back, for
    `requests` all along."""
    pacer, now = TpotPacer(), 0.0
    decoding = dict.fromkeys(requests, SLO)
    pacer.tick(now, decoding)
    for interval in intervals:
        now += interval
        pacer.tick(now, decoding)
    return pacer


def test_a_fresh_pacer_budgets_the_target():
    assert TpotPacer().budget(SLO) == pytest.approx(TARGET)
    assert _pacer_after().budget(SLO) == pytest.approx(TARGET)  # a first decode, no gap yet


def test_time_an_iteration_left_unused_goes_to_the_next():
    pacer = _pacer_after(TARGET - 0.004)
    assert pacer.budget(SLO) == pytest.approx(TARGET + 0.004)


def test_an_overrun_is_paid_back_by_the_next():
    pacer = _pacer_after(TARGET + 0.03)
    assert pacer.budget(SLO) == pytest.approx(TARGET - 0.03)


def test_the_budget_stays_between_zero_and_a_burst_past_the_slo():
    assert _pacer_after(*[0.01] * 20).budget(SLO) == pytest.approx((1 + BURST) * SLO)
    assert _pacer_after(*[2 * SLO] * 20).budget(SLO) == 0.0


def test_a_host_stall_is_charged_in_full_and_paid_back():
    """A 3 s stall: the client counts it in the request's mean, so the pacer budgets
    nothing until short iterations have paid it back, then the target again."""
    pacer = _pacer_after(3.0)
    assert pacer.balances["r"][1] == pytest.approx(3.0 - TARGET)
    now, decode_only = 3.0, 0.04  # an iteration without finetuning
    while pacer.budget(SLO) == 0.0:
        now += decode_only
        pacer.tick(now, {"r": SLO})
    # Budgeted again once less than one target is owed: ~18 iterations (0.7 s) here.
    iterations = round((now - 3.0) / decode_only)
    assert iterations == math.floor((3.0 - 2 * TARGET) / (TARGET - decode_only)) + 1
    assert 0 < pacer.budget(SLO) < TARGET


def test_a_newcomer_does_not_inherit_the_credit_of_those_before_it():
    pacer = _pacer_after(*[0.05] * 10, requests=("old",))
    assert pacer.budget(SLO) == pytest.approx((1 + BURST) * SLO)
    pacer.tick(0.55, {"old": SLO, "new": SLO})
    assert pacer.budget(SLO) == pytest.approx(TARGET)  # the new request has nothing in hand
    pacer.tick(0.55 + TARGET - 0.01, {"new": SLO})  # the old one finished
    assert pacer.budget(SLO) == pytest.approx(TARGET + 0.01)


def test_the_strictest_request_sets_the_budget():
    pacer = TpotPacer()
    pacer.tick(0.0, {"loose": 1.0, "tight": SLO})
    pacer.tick(0.17, {"loose": 1.0, "tight": SLO})
    assert pacer.budget(1.0) == pytest.approx(TARGET + (TARGET - 0.17))


def test_with_no_request_decoding_the_plan_sets_the_budget():
    pacer = _pacer_after(TARGET + 0.05)
    pacer.tick(10.0, {})
    assert pacer.budget(SLO) == pytest.approx(TARGET)
    assert pacer.budget(1.0) == pytest.approx(target(1.0))


def _simulate(budget_of, rng: random.Random, iterations: int = 2000):
    """An engine like the 2-core co-serving one: a decode step of 45-55 ms, then whole
    backward layers of ~25 ms each while the (over-estimated, 30 ms) price fits the
    budget; yields each iteration's interval."""
    for _ in range(iterations):
        budget = budget_of()
        decode = rng.uniform(0.045, 0.055)
        layers = max(0, int((budget - decode) // 0.030))
        yield decode + sum(rng.gauss(0.025, 0.002) for _ in range(layers))


def test_every_request_mean_holds_the_target_where_a_fixed_budget_falls_short():
    """Requests of 128 tokens arrive every 16 iterations; each one's mean gap is its TPOT."""
    rng = random.Random(0)
    fixed = list(_simulate(lambda: TARGET, rng))
    pacer, now, gaps = TpotPacer(), 0.0, {}

    def live(i: int) -> dict[str, float]:  # request j decodes in iterations 16j .. 16j + 127
        return {f"r{j}": SLO for j in range(max(0, (i - 128) // 16 + 1), i // 16 + 1)}

    pacer.tick(now, live(0))
    for i, interval in enumerate(_simulate(lambda: pacer.budget(SLO), rng), start=1):
        now += interval
        for request_id in live(i - 1).keys() & live(i).keys():
            gaps.setdefault(request_id, []).append(interval)
        pacer.tick(now, live(i))
    tpots = [statistics.mean(g) for g in gaps.values() if len(g) >= 100]
    assert statistics.mean(fixed) < 0.88 * TARGET  # whole layers and a high price waste ~15%
    assert len(tpots) > 100
    assert min(tpots) > 0.97 * TARGET
    assert max(tpots) < SLO
