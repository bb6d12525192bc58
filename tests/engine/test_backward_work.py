"""The backward allowance: how much loss head and how many layers fit an iteration's spare time."""

from __future__ import annotations

import pytest

from engine.finetune.backward_work import BackwardAllowance, BackwardWork

pytestmark = pytest.mark.unit

PRICED = BackwardAllowance(max_layers=8, seconds=1.0, seconds_per_layer_token=1e-3, seconds_per_loss_token=1e-2,
                           loss_tokens_per_pass=32)


def test_without_a_time_limit_everything_pending_runs():
    unlimited = BackwardAllowance()
    assert unlimited.loss_tokens(None, 500) == 500
    assert unlimited.layers(None, None, 200) is None
    assert unlimited.layers(None, 8, 200) == 8


def test_loss_tokens_come_in_whole_passes_unless_the_rest_fits():
    assert PRICED.loss_tokens(1.0, 500) == 96  # 100 fit: three passes of 32
    assert PRICED.loss_tokens(1.0, 100) == 100  # all that is left fits
    assert PRICED.loss_tokens(0.3, 100) == 0  # 30 fit: not one pass
    assert PRICED.loss_tokens(0.3, 20) == 20
    assert PRICED.loss_tokens(-0.1, 20) == 0


def test_layers_fit_the_time_and_the_cap():
    assert PRICED.layers(1.0, 8, 200) == 5  # 0.2 s per layer of 200 tokens
    assert PRICED.layers(1.0, 3, 200) == 3
    assert PRICED.layers(1.0, None, 100) == 10
    assert PRICED.layers(0.1, 8, 200) == 0


def test_work_adds_up():
    assert BackwardWork(10, 2) + BackwardWork(5, 1) == BackwardWork(15, 3)


def test_work_is_priced_at_the_allowance_costs():
    assert PRICED.seconds_for(BackwardWork(layer_tokens=200, loss_tokens=10)) == 200 * 1e-3 + 10 * 1e-2
