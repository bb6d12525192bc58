"""The TPOT pacer: per-iteration budgets that hold the mean interval at the target."""

from __future__ import annotations

import random
import statistics

import pytest

from engine.tpot_pacer import BURST, MAX_ERROR, SLO_MARGIN, TpotPacer

SLO = 0.2
TARGET = SLO * (1 - SLO_MARGIN)


def _pacer_after(*intervals: float) -> TpotPacer:
    """A pacer that has seen decoding iterations of these lengths, back to back."""
    pacer, now = TpotPacer(), 0.0
    pacer.tick(now, SLO)
    for interval in intervals:
        now += interval
        pacer.tick(now, SLO)
    return pacer


def test_a_fresh_pacer_budgets_the_target():
    assert TpotPacer().budget(SLO) == pytest.approx(TARGET)


def test_time_an_iteration_left_unused_goes_to_the_next():
    pacer = _pacer_after(TARGET - 0.004)
    assert pacer.budget(SLO) == pytest.approx(TARGET + 0.004)


def test_an_overrun_is_paid_back_by_the_next():
    pacer = _pacer_after(TARGET + 0.03)
    assert pacer.budget(SLO) == pytest.approx(TARGET - 0.03)


def test_the_budget_stays_between_zero_and_a_burst_past_the_slo():
    assert _pacer_after(*[0.01] * 20).budget(SLO) == pytest.approx((1 + BURST) * SLO)
    assert _pacer_after(*[2 * SLO] * 20).budget(SLO) == 0.0


def test_a_host_stall_is_charged_only_in_part():
    """A 3 s stall costs at most MAX_ERROR targets, repaid within a few iterations."""
    pacer = _pacer_after(3.0)
    assert pacer.balance_s == pytest.approx(MAX_ERROR * TARGET)
    now = 3.0
    for _ in range(8):
        now += pacer.budget(SLO)
        pacer.tick(now, SLO)
    assert pacer.budget(SLO) > 0.95 * TARGET


def test_an_iteration_that_decodes_for_no_one_clears_the_balance():
    pacer = _pacer_after(TARGET + 0.05)
    pacer.tick(10.0, None)
    assert pacer.budget(SLO) == pytest.approx(TARGET)
    pacer.tick(10.1, SLO)  # the first decoding iteration after it has no interval yet
    assert pacer.budget(SLO) == pytest.approx(TARGET)


def _simulate(budget_of, rng: random.Random, iterations: int = 2000):
    """An engine like the 2-core co-serving one: a decode step of 45-55 ms, then whole
    backward layers of ~25 ms each while the (over-estimated, 30 ms) price fits the
    budget; yields each iteration's interval."""
    for _ in range(iterations):
        budget = budget_of()
        decode = rng.uniform(0.045, 0.055)
        layers = max(0, int((budget - decode) // 0.030))
        yield decode + sum(rng.gauss(0.025, 0.002) for _ in range(layers))


def test_the_mean_interval_holds_the_target_where_a_fixed_budget_falls_short():
    rng = random.Random(0)
    fixed = list(_simulate(lambda: TARGET, rng))
    pacer, now = TpotPacer(), 0.0
    pacer.tick(now, SLO)
    paced = []
    for interval in _simulate(lambda: pacer.budget(SLO), rng):
        paced.append(interval)
        now += interval
        pacer.tick(now, SLO)
    assert statistics.mean(fixed) < 0.88 * TARGET  # whole layers and a high price waste ~15%
    assert statistics.mean(paced) == pytest.approx(TARGET, rel=0.02)
    # What a request sees: the mean over its own ~128 gaps stays inside the SLO everywhere.
    windows = [statistics.mean(paced[i : i + 128]) for i in range(0, len(paced) - 128, 16)]
    assert max(windows) < SLO
