"""Backward prices measured on the units themselves."""

from __future__ import annotations

import pytest

from engine.finetune.backward_costs import WINDOW, BackwardCosts

pytestmark = pytest.mark.unit


def test_the_prior_holds_until_a_unit_is_timed():
    costs = BackwardCosts()
    assert costs.per_layer_token(prior=3e-4) == 3e-4
    assert costs.per_loss_token(prior=4e-3) == 4e-3
    costs.record_layer(0.025, tokens=200)
    assert costs.per_layer_token(prior=3e-4) == pytest.approx(0.025 / 200)
    assert costs.per_loss_token(prior=4e-3) == 4e-3  # the two kinds are priced apart


def test_a_stalled_unit_does_not_move_the_price():
    costs = BackwardCosts()
    for _ in range(WINDOW - 1):
        costs.record_layer(0.025, tokens=200)
        costs.record_loss(0.060, tokens=32)
    costs.record_layer(2.0, tokens=200)  # the host took the cores for two seconds
    costs.record_loss(1.5, tokens=32)
    assert costs.per_layer_token(prior=1.0) == pytest.approx(0.025 / 200)
    assert costs.per_loss_token(prior=1.0) == pytest.approx(0.060 / 32)


def test_the_price_follows_the_recent_units():
    """Only the last WINDOW units count: a longer sequence's layers reprice at once."""
    costs = BackwardCosts()
    for _ in range(WINDOW):
        costs.record_layer(0.025, tokens=200)
    for _ in range(WINDOW // 2 + 1):
        costs.record_layer(0.300, tokens=1000)
    assert costs.per_layer_token(prior=1.0) == pytest.approx(0.300 / 1000)
