"""`PowerMonitor`: device choice, per-iteration energy, apply-mode start-up checks, and
`split_energy`, which charges an iteration's energy to its requests and jobs."""

from __future__ import annotations

import numpy as np
import pynvml
import pytest

from engine.energy import split_energy
from engine.finetune.backward_work import BackwardWork
from engine.latency_model import (
    FINETUNE_LOSS,
    NUM_FEATURES,
    IterationShape,
    LatencyModel,
)
from engine.messages import SamplingParams
from engine.plan import IterationPlan, ScheduledChunk, iteration_shape
from engine.power.device import PowerControlError
from engine.power.governor import LoadState
from engine.power.monitor import PowerMonitor
from engine.power.simulated_device import SimulatedGpu
from engine.sequence import Sequence
from tests.engine.test_power import FakeNvml

pytestmark = pytest.mark.unit


def monitor(kind: str, mode: str, torch_device: str = "cuda") -> PowerMonitor | None:
    return PowerMonitor.create(kind, mode, torch_device, LatencyModel(), 2000.0, 200.0, 2048)


def test_a_cpu_deployment_watches_no_device_unless_asked():
    assert monitor("auto", "advise", "cpu") is None
    assert monitor("none", "advise", "cuda") is None
    with pytest.raises(PowerControlError, match="apply needs a GPU"):
        monitor("auto", "apply", "cpu")
    simulated = monitor("simulated", "advise", "cpu")
    assert isinstance(simulated.device, SimulatedGpu)
    # The latency model learns clock effects against the device's top clock.
    assert simulated.governor.latency_model.max_clock_mhz == 1980


def test_auto_serves_on_without_readings_where_nvml_is_missing_nvml_by_name_fails(monkeypatch):
    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert monitor("auto", "advise", "cuda:0") is None
    with pytest.raises(PowerControlError, match="no NVIDIA driver"):
        monitor("nvml", "advise", "cuda:0")


def test_iteration_energy_excludes_idle_time_between_iterations():
    power = monitor("simulated", "off", "cpu")
    shape = IterationShape(decode_tokens=32, prefill_tokens=0, context_tokens=32 * 1000)
    power.begin_iteration()
    first = power.end_iteration(shape)
    reference = SimulatedGpu()
    reference.run_iteration(shape)
    assert first == pytest.approx(reference.total_energy_joules()) and first > 0
    total_before = power.device.total_energy_joules()
    power.begin_iteration()  # the gap since the last iteration is idle energy, not this iteration's
    second = power.end_iteration(shape)
    assert second == pytest.approx(first)
    assert power.device.total_energy_joules() - total_before >= second


def test_tick_decides_once_per_interval_and_reads_the_device():
    power = monitor("simulated", "advise", "cpu")
    calls = []

    def load():
        calls.append(1)
        return LoadState(running_context_lens=(300,) * 4)

    power.tick(100.0, load)
    power.tick(100.0 + power.governor.interval_s / 2, load)
    assert len(calls) == 1
    power.tick(100.0 + power.governor.interval_s, load)
    assert len(calls) == 2
    assert power.reading.sm_clock_mhz == 1980  # advise leaves the clock alone
    assert 210 <= power.reading.target_sm_clock_mhz <= 1980
    assert power.reading.power_watts > 0


def test_apply_without_clock_privilege_fails_at_start_with_the_reason(monkeypatch):
    FakeNvml(monkeypatch, lock_error=pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(PowerControlError) as info:
        monitor("nvml", "apply")
    message = str(info.value)
    assert message.startswith("power_mode apply cannot control clocks")
    assert "root" in message and "power_mode: advise" in message


def test_apply_locks_through_nvml_and_close_resets(monkeypatch):
    nvml = FakeNvml(monkeypatch)
    power = monitor("nvml", "apply", "cuda:0")
    assert nvml.locked is None  # the start-up probe gave the clock back
    power.tick(0.0, lambda: LoadState(running_context_lens=(100,)))
    assert nvml.locked is not None
    power.close()
    assert nvml.locked is None and nvml.initialized == 0


# -- split_energy ---------------------------------------------------------------------------


def _seq(request_id: str, prompt: int, computed: int) -> Sequence:
    seq = Sequence(request_id, list(range(prompt)), SamplingParams(max_tokens=4), 0.0)
    seq.num_computed_tokens = computed
    return seq


class _Job:
    def __init__(self, job_id: str):
        self.job_id = job_id


def _predicted(plan: IterationPlan, backward: dict[str, BackwardWork], costs: np.ndarray) -> float:
    """Predicted seconds of all the iteration's work, its fixed part left out."""
    total = sum(backward.values(), BackwardWork())
    return float(costs @ iteration_shape(plan, total).features(iterations=0))


def test_energy_is_split_by_predicted_work_and_sums_to_the_measurement():
    long_decode = ScheduledChunk(_seq("long", 4000, 3999), 1)
    short_decode = ScheduledChunk(_seq("short", 10, 9), 1)
    prefill = ScheduledChunk(_seq("prefill", 256, 0), 256)
    training = _seq("train", 128, 0)
    training.job = _Job("job-1")
    plan = IterationPlan(chunks=[long_decode, short_decode, prefill], finetune_chunks=[ScheduledChunk(training, 128)])
    costs = LatencyModel().costs()
    backward = {"job-1": BackwardWork(layer_tokens=30 * 128), "job-2": BackwardWork(layer_tokens=30 * 64),
                "job-3": BackwardWork(loss_tokens=64)}
    shares = split_energy(10.0, plan, backward, costs)
    assert sum(shares.requests.values()) + shares.finetune_joules == pytest.approx(10.0)
    # A decode over 4000 tokens of context costs more than one over 10.
    assert shares.requests["long"] > shares.requests["short"] > 0
    assert set(shares.jobs) == {"job-1", "job-2", "job-3"}
    assert shares.jobs["job-1"] > shares.jobs["job-2"] > 0
    assert shares.jobs["job-3"] == pytest.approx(10.0 * costs[FINETUNE_LOSS] * 64 / _predicted(plan, backward, costs))


def test_a_model_that_predicts_nothing_splits_evenly():
    plan = IterationPlan(chunks=[ScheduledChunk(_seq("a", 10, 9), 1), ScheduledChunk(_seq("b", 10, 9), 1)])
    shares = split_energy(4.0, plan, {}, np.zeros(NUM_FEATURES))
    assert shares.requests == {"a": 2.0, "b": 2.0}
    assert split_energy(4.0, IterationPlan(), {}, np.zeros(NUM_FEATURES)).requests == {}
