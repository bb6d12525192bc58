"""The GPUs of a tensor-parallel engine governed as one device (engine/power/device_group.py),
on simulated cards; and which GPU each rank takes."""

from __future__ import annotations

import pytest

from engine.latency_model import IterationShape
from engine.parallel.workers import rank_device
from engine.power.device_group import DeviceGroup
from engine.power.monitor import open_device
from engine.power.simulated_device import SimulatedGpu, SimulatedGpuConfig

pytestmark = pytest.mark.unit


def test_one_clock_for_all_cards_and_their_energy_summed():
    first, second = SimulatedGpu(), SimulatedGpu(SimulatedGpuConfig(max_clock_mhz=1755))
    group = DeviceGroup([first, second])
    clocks = group.supported_sm_clocks_mhz()
    assert clocks == sorted(set(first.supported_sm_clocks_mhz()) & set(second.supported_sm_clocks_mhz()))
    assert clocks[-1] == 1755 and group.name == f"2 x {first.name}"

    group.lock_sm_clock(1200)
    assert first.current_sm_clock_mhz() == second.current_sm_clock_mhz() == group.current_sm_clock_mhz() == 1200
    shape = IterationShape(decode_tokens=32, prefill_tokens=0, context_tokens=32 * 512)
    assert group.total_energy_joules() == 0.0
    for card in (first, second):
        card.run_iteration(shape)
    spent_by_card = [first.total_energy_joules(), second.total_energy_joules()]  # each from 0 J
    assert all(joules > 0 for joules in spent_by_card) and spent_by_card[0] != spent_by_card[1]
    assert group.total_energy_joules() == pytest.approx(sum(spent_by_card))
    assert group.power_watts() == pytest.approx(first.power_watts() + second.power_watts())

    second.lock_sm_clock(900)  # a card held lower sets the group's pace
    assert group.current_sm_clock_mhz() == 900
    group.reset_sm_clock()
    assert first.current_sm_clock_mhz() == 1980 and second.current_sm_clock_mhz() == 1755


def test_cards_without_a_common_clock_are_refused():
    low = SimulatedGpu(SimulatedGpuConfig(min_clock_mhz=210, max_clock_mhz=600))
    high = SimulatedGpu(SimulatedGpuConfig(min_clock_mhz=1005, max_clock_mhz=1980))
    with pytest.raises(ValueError, match="share no SM clock"):
        DeviceGroup([low, high])


def test_each_rank_takes_the_next_gpu_and_the_cpu_is_shared():
    assert [rank_device("cuda", r) for r in range(3)] == ["cuda:0", "cuda:1", "cuda:2"]
    assert rank_device("cuda:2", 1) == "cuda:3"
    assert rank_device("cpu", 2) == "cpu"
    # The simulated card models the whole engine, however many ranks.
    assert isinstance(open_device("simulated", "cpu", num_devices=2), SimulatedGpu)
