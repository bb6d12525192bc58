"""Load projection for the governor: arrival rate over a window, and the LoadState."""

from __future__ import annotations

import pytest

from engine.power.load_projection import ArrivalTracker, project_load

pytestmark = pytest.mark.unit


def test_no_arrivals_seen_projects_none():
    assert ArrivalTracker().project(now=5.0, interval_s=0.1) == (0, 0)


def test_projects_the_window_rate_with_the_mean_prompt_so_far():
    tracker = ArrivalTracker(window_s=2.0)
    # Seen long ago: out of the window, but it still counts towards the mean prompt.
    tracker.record(0.0, prompt_tokens=3000)
    for i in range(9):  # 9 arrivals in the last 2 s: 4.5 req/s
        tracker.record(8.1 + 0.2 * i, prompt_tokens=1000)
    mean_prompt = (3000 + 9 * 1000) / 10
    # 4.5 req/s x 0.4 s = 1.8 requests expected: 2 counted, 1.8 prompts of tokens.
    assert tracker.project(now=10.0, interval_s=0.4) == (2, round(1.8 * mean_prompt))
    # A fraction of a request still counts as one, carrying its expected tokens.
    assert tracker.project(now=10.0, interval_s=0.1) == (1, round(0.45 * mean_prompt))


def test_arrivals_older_than_the_window_expire():
    tracker = ArrivalTracker(window_s=1.0)
    tracker.record(0.0, prompt_tokens=500)
    tracker.record(0.5, prompt_tokens=500)
    assert tracker.project(now=1.2, interval_s=1.0) == (1, 500)
    assert tracker.project(now=1.6, interval_s=1.0) == (0, 0)
    tracker.record(3.0, prompt_tokens=2000)
    assert tracker.project(now=3.0, interval_s=1.0) == (1, 1000)


def test_project_load_turns_the_queue_into_a_load_state():
    tracker = ArrivalTracker(window_s=2.0)
    for t in (9.0, 9.5, 10.0, 10.5):  # 2 req/s
        tracker.record(t, prompt_tokens=600)
    load = project_load(
        now=11.0,
        running_context_lens=[700, 1200, 90],
        waiting=[(400, 10.0), (600, 10.5)],
        arrivals=tracker,
        interval_s=0.1,
        tpot_slo_s=0.03,
        finetune_tokens=64,
    )
    assert load.running_context_lens == (700, 1200, 90)
    assert load.waiting_prompt_tokens == (400, 600)
    assert load.waiting_seconds == pytest.approx((1.0, 0.5))
    assert (load.arriving_requests, load.arriving_prompt_tokens) == (1, 120)
    # 3 sequences, each decoding at SLO pace: ceil(0.1 / 0.03) = 4 tokens each.
    assert load.context_growth_tokens == 12
    assert load.finetune_tokens == 64


def test_an_idle_engine_projects_an_empty_load():
    load = project_load(0.0, [], [], ArrivalTracker(), interval_s=0.1, tpot_slo_s=0.03)
    assert load.running_context_lens == () and load.waiting_prompt_tokens == ()
    assert load.arriving_requests == load.context_growth_tokens == 0


@pytest.mark.parametrize("interval_s, tpot_slo_s", [(0.0, 0.03), (0.1, 0.0)])
def test_rejects_non_positive_spans(interval_s, tpot_slo_s):
    with pytest.raises(ValueError, match="positive"):
        project_load(0.0, [], [], ArrivalTracker(), interval_s, tpot_slo_s)
    with pytest.raises(ValueError, match="positive"):
        ArrivalTracker(window_s=0.0)
