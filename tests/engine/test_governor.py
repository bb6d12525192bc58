"""Frequency governor on the simulated GPU: decisions, modes, and a bursty request trace.

The trace test serves a generated Azure-like trace (bench/power_what_if.py) on
`SimulatedGpu`, once with the governor locking clocks and once at the top clock,
and compares SLO attainment and energy.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.power_what_if import ServingSetup, azure_like_trace, governed_against_top_clock
from engine.latency_model import IterationShape, LatencyModel
from engine.power.governor import FrequencyGovernor, LoadState
from engine.power.simulated_device import SimulatedGpu

pytestmark = pytest.mark.unit

TTFT_SLO_MS = 600.0
TPOT_SLO_MS = 30.0
TOP_MHZ = 1980


def calibrated_model(gpu: SimulatedGpu) -> LatencyModel:
    """A latency model that has seen the GPU run mixed iterations at many clocks."""
    rng = np.random.default_rng(0)
    clocks = gpu.supported_sm_clocks_mhz()
    model = LatencyModel(max_clock_mhz=clocks[-1])
    for _ in range(200):
        decode = int(rng.integers(0, 64))
        prefill = int(rng.integers(0, 512))
        start = int(rng.integers(0, 1024))
        prefill_context = prefill * start + prefill * (prefill + 1) // 2
        decode_context = decode * int(rng.integers(64, 2048))
        context = decode_context + prefill_context
        shape = IterationShape(
            decode, prefill, context, prefill_context_tokens=prefill_context
        )
        mhz = int(rng.choice(clocks))
        model.observe(shape, gpu.iteration_seconds(shape, mhz), mhz)
    return model


def governor(
    mode: str, gpu: SimulatedGpu | None = None, interval_s: float = 0.1
) -> FrequencyGovernor:
    gpu = gpu or SimulatedGpu()
    return FrequencyGovernor(
        gpu,
        calibrated_model(gpu),
        TTFT_SLO_MS,
        TPOT_SLO_MS,
        margin=0.1,
        mode=mode,
        interval_s=interval_s,
    )


LIGHT = LoadState(
    running_context_lens=(400,) * 6,
    waiting_prompt_tokens=(300,),
    waiting_seconds=(0.01,),
)
BURST = LoadState(
    running_context_lens=(600,) * 24,
    waiting_prompt_tokens=(1500,) * 40,
    waiting_seconds=tuple(0.01 * i for i in range(40, 0, -1)),
)


class CountingGpu(SimulatedGpu):
    def __init__(self):
        super().__init__()
        self.locks: list[int] = []

    def lock_sm_clock(self, mhz: int) -> None:
        super().lock_sm_clock(mhz)
        self.locks.append(mhz)


def test_light_load_runs_below_the_top_clock_and_more_load_needs_more_clock():
    gov = governor("advise")
    light = gov.decide(LIGHT)
    assert 210 <= light < TOP_MHZ
    heavier = LoadState(
        running_context_lens=(1500,) * 48,
        waiting_prompt_tokens=(300,),
        waiting_seconds=(0.01,),
    )
    assert light < gov.decide(heavier)


def test_the_chosen_clock_meets_the_slos_and_the_next_lower_one_would_not():
    gpu = SimulatedGpu()
    # A long interval, so that the TPOT test binds, not the longest iteration's.
    chosen = governor("advise", gpu, interval_s=1.0).decide(
        LoadState(running_context_lens=(2000,) * 64)
    )
    decode = IterationShape(
        decode_tokens=64, prefill_tokens=0, context_tokens=64 * 2000
    )
    budget = TPOT_SLO_MS / 1e3 * 0.9
    assert 210 < chosen < TOP_MHZ
    assert gpu.iteration_seconds(decode, chosen) <= budget * 1.02
    assert gpu.iteration_seconds(decode, chosen - 15) > budget * 0.98


def test_the_longest_iteration_fits_in_one_interval_and_not_one_step_lower():
    gpu = SimulatedGpu()
    gov = governor("advise", gpu)
    # Four short decodes would allow the lowest clock; a prompt arriving next would
    # then run a full token budget of prefill beside them.
    chosen = gov.decide(LoadState(running_context_lens=(500,) * 4))
    chunk = gov.max_num_batched_tokens - 4
    longest = IterationShape(
        decode_tokens=4,
        prefill_tokens=chunk,
        context_tokens=4 * 500 + chunk * (chunk + 1) // 2,
        prefill_context_tokens=chunk * (chunk + 1) // 2,
    )
    assert 210 < chosen < TOP_MHZ
    assert gpu.iteration_seconds(longest, chosen) <= gov.interval_s * 1.02
    assert gpu.iteration_seconds(longest, chosen - 15) > gov.interval_s * 0.98


def test_a_burst_returns_to_the_top_clock_within_one_interval():
    gov = governor("advise")
    assert gov.decide(LIGHT) < TOP_MHZ
    assert gov.decide(BURST) == TOP_MHZ
    assert gov.decide(LIGHT) < TOP_MHZ


def test_apply_locks_only_on_change_and_close_resets():
    gpu = CountingGpu()
    gov = governor("apply", gpu)
    target = gov.decide(LIGHT)
    gov.decide(LIGHT)
    assert gpu.locks == [target] and gpu.current_sm_clock_mhz() == target
    gov.decide(BURST)
    assert gpu.locks == [target, TOP_MHZ]
    gov.close()
    assert gpu.locked_mhz is None and gpu.current_sm_clock_mhz() == TOP_MHZ


def test_advise_computes_the_target_but_leaves_the_clock_alone():
    gpu = CountingGpu()
    gov = governor("advise", gpu)
    assert gov.decide(LIGHT) == gov.target_mhz < TOP_MHZ
    gov.close()
    assert gpu.locks == [] and gpu.current_sm_clock_mhz() == TOP_MHZ


def test_off_answers_the_top_clock_and_touches_nothing():
    gpu = CountingGpu()
    gov = governor("off", gpu)
    assert gov.decide(LIGHT) == TOP_MHZ and gov.target_mhz == TOP_MHZ
    gov.close()
    assert gpu.locks == []


def test_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode"):
        governor("turbo")


# -- a bursty, Azure-like trace through a continuous-batching loop ----------------------


@pytest.mark.parametrize("seed", [4, 7])
def test_bursty_trace_meets_slos_with_less_energy_than_the_top_clock(seed):
    setup = ServingSetup(TTFT_SLO_MS, TPOT_SLO_MS, max_batched_tokens=1024, max_seqs=64)
    what_if = governed_against_top_clock(azure_like_trace(seed, duration_s=75.0), setup)

    attainment = what_if.governed.attainment(setup)["both"]
    saving = what_if.energy_saved()
    top_attainment = what_if.top_clock.attainment(setup)["both"]
    print(
        f"seed {seed}: {len(what_if.governed.requests)} requests, attainment "
        f"{attainment:.4f} (top clock {top_attainment:.4f}), energy saved {saving:.1%}"
    )
    assert len(what_if.governed.requests) > 250
    assert attainment >= 0.99
    assert saving > 0.15
    assert what_if.governed.gpu.locked_mhz is None


def test_a_request_with_a_tighter_slo_needs_a_faster_clock():
    # A long interval, so that the TPOT test binds, not the longest iteration's.
    gov = governor("advise", interval_s=1.0)
    decoding = LoadState(running_context_lens=(2000,) * 64)
    relaxed = gov.decide(decoding)
    strict = gov.decide(dataclasses.replace(decoding, tpot_slo_ms=TPOT_SLO_MS / 2))
    lenient = gov.decide(dataclasses.replace(decoding, tpot_slo_ms=TPOT_SLO_MS * 2))
    assert lenient < relaxed < strict
