"""Device backends: NVML error translation and readings (faked NVML), the simulated GPU."""

from __future__ import annotations

import itertools

import pynvml
import pytest

from engine.latency_model import IterationShape
from engine.power.device import PowerControlError
from engine.power.nvml_device import NvmlDevice
from engine.power.simulated_device import SimulatedGpu, SimulatedGpuConfig

pytestmark = pytest.mark.unit

# -- NVML ----------------------------------------------------------------------------------


def test_nvml_device_works_or_says_why():
    """On a GPU machine it reads the card; elsewhere (this CI) it fails with advice."""
    try:
        device = NvmlDevice(0)
    except PowerControlError as exc:
        message = str(exc)
        assert "driver" in message and "power_mode" in message
        return
    try:
        clocks = device.supported_sm_clocks_mhz()
        assert clocks == sorted(clocks) and clocks[0] > 0
        before = device.total_energy_joules()
        assert device.power_watts() > 0
        assert device.total_energy_joules() >= before
        assert isinstance(device.clock_event_reasons(), list)
    finally:
        device.close()


@pytest.mark.parametrize("error", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_missing_driver_is_a_clear_error(monkeypatch, error):
    def init():
        raise pynvml.NVMLError(error)

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    with pytest.raises(PowerControlError, match="no NVIDIA driver.*power_mode: off"):
        NvmlDevice(0)


class FakeNvml:
    """The NVML calls NvmlDevice makes, answering like an H100 would."""

    def __init__(self, monkeypatch, lock_error: int | None = None):
        self.locked: tuple[int, int] | None = None
        self.initialized = 0
        self.lock_error = lock_error
        calls = {
            "nvmlInit": self.init,
            "nvmlShutdown": self.shutdown,
            "nvmlDeviceGetHandleByIndex": lambda index: ("handle", index),
            "nvmlDeviceGetName": lambda handle: "NVIDIA H100 80GB HBM3",
            "nvmlDeviceGetSupportedMemoryClocks": lambda handle: [1593, 2619],
            # Listed top-down and per memory clock, as NVML does.
            "nvmlDeviceGetSupportedGraphicsClocks": lambda handle, mem: [1980, 1965, 1950, 210] if mem == 2619 else [1],
            "nvmlDeviceGetClockInfo": lambda handle, kind: 1755 if kind == pynvml.NVML_CLOCK_SM else -1,
            "nvmlDeviceGetPowerUsage": lambda handle: 312_500,  # mW
            "nvmlDeviceGetTotalEnergyConsumption": lambda handle: 9_876_543,  # mJ
            "nvmlDeviceSetGpuLockedClocks": self.lock,
            "nvmlDeviceResetGpuLockedClocks": self.reset,
            "nvmlDeviceGetCurrentClocksEventReasons": self.no_such_function,
            "nvmlDeviceGetCurrentClocksThrottleReasons": lambda handle: (
                pynvml.nvmlClocksThrottleReasonApplicationsClocksSetting
                | pynvml.nvmlClocksThrottleReasonSwThermalSlowdown
            ),
        }
        for name, fn in calls.items():
            monkeypatch.setattr(pynvml, name, fn)

    def init(self):
        self.initialized += 1

    def shutdown(self):
        self.initialized -= 1

    def lock(self, handle, low, high):
        if self.lock_error is not None:
            raise pynvml.NVMLError(self.lock_error)
        self.locked = (low, high)

    def reset(self, handle):
        self.locked = None

    def no_such_function(self, handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)


def test_nvml_readings_in_our_units(monkeypatch):
    nvml = FakeNvml(monkeypatch)
    device = NvmlDevice(0)
    assert device.name == "NVIDIA H100 80GB HBM3"
    assert device.supported_sm_clocks_mhz() == [210, 1950, 1965, 1980]
    assert device.current_sm_clock_mhz() == 1755
    assert device.power_watts() == pytest.approx(312.5)
    assert device.total_energy_joules() == pytest.approx(9876.543)
    # Falls back to the older call on drivers without the new one.
    assert device.clock_event_reasons() == ["user_defined_clocks", "sw_thermal_slowdown"]
    device.lock_sm_clock(1200)
    assert nvml.locked == (1200, 1200)
    device.reset_sm_clock()
    assert nvml.locked is None
    device.close()
    assert nvml.initialized == 0


def test_lock_without_privilege_points_to_root_and_advise(monkeypatch):
    FakeNvml(monkeypatch, lock_error=pynvml.NVML_ERROR_NO_PERMISSION)
    device = NvmlDevice(0)
    with pytest.raises(PowerControlError) as info:
        device.lock_sm_clock(1200)
    message = str(info.value)
    assert "1200 MHz" in message and "NVIDIA H100" in message
    assert "root" in message and "nvidia-smi -acp UNRESTRICTED" in message and "power_mode: advise" in message


def test_lock_on_an_old_card_says_it_is_unsupported(monkeypatch):
    FakeNvml(monkeypatch, lock_error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    with pytest.raises(PowerControlError, match="does not support"):
        NvmlDevice(0).lock_sm_clock(1200)


def test_failed_open_releases_nvml(monkeypatch):
    nvml = FakeNvml(monkeypatch)

    def no_gpu(index):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", no_gpu)
    with pytest.raises(PowerControlError, match="opening GPU 3"):
        NvmlDevice(3)
    assert nvml.initialized == 0


# -- simulated GPU -------------------------------------------------------------------------

DECODE = IterationShape(decode_tokens=8, prefill_tokens=0, context_tokens=8 * 300)
PREFILL = IterationShape(0, 2048, 2048 * 2049 // 2, prefill_context_tokens=2048 * 2049 // 2)


def energy_of(gpu: SimulatedGpu, shape: IterationShape, mhz: int) -> float:
    gpu.lock_sm_clock(mhz)
    before = gpu.total_energy_joules()
    gpu.run_iteration(shape)
    return gpu.total_energy_joules() - before


def test_simulated_clocks_are_the_h100_range():
    clocks = SimulatedGpu().supported_sm_clocks_mhz()
    assert clocks[0] == 210 and clocks[-1] == 1980 and len(clocks) == 119
    assert all(b - a == 15 for a, b in itertools.pairwise(clocks))


def test_compute_bound_work_slows_with_the_clock_memory_bound_work_hardly():
    gpu = SimulatedGpu()
    assert gpu.iteration_seconds(PREFILL, 990) / gpu.iteration_seconds(PREFILL, 1980) > 1.7
    assert gpu.iteration_seconds(DECODE, 990) / gpu.iteration_seconds(DECODE, 1980) < 1.1


def test_power_matches_its_published_calibration_points():
    config = SimulatedGpuConfig()
    gpu = SimulatedGpu(config)
    gpu.idle(1.0)
    assert gpu.power_watts() == pytest.approx(config.idle_watts)
    # Pure weight streaming: the memory-bound decode power, and its saving at the lowest clock.
    streaming = IterationShape(0, 0, 0)
    energy_of(gpu, streaming, 1980)
    assert gpu.power_watts() == pytest.approx(config.memory_bound_watts)
    energy_of(gpu, streaming, 210)
    assert gpu.power_watts() == pytest.approx(config.memory_bound_watts * (1 - config.memory_bound_saving_at_min_clock))
    # A huge prefill is compute-bound: it runs at the board limit at the top clock.
    energy_of(gpu, IterationShape(0, 200_000, 200_000), 1980)
    assert gpu.power_watts() == pytest.approx(config.tdp_watts, rel=0.01)


def test_energy_counter_integrates_power_over_simulated_time():
    config = SimulatedGpuConfig()
    gpu = SimulatedGpu(config)
    runs = [(1980, PREFILL), (600, DECODE), (1200, PREFILL)]
    for mhz, shape in runs:
        gpu.lock_sm_clock(mhz)
        before = gpu.total_energy_joules()
        seconds = gpu.run_iteration(shape)
        spent = gpu.total_energy_joules() - before
        assert spent == pytest.approx(gpu.power_watts() * seconds)
        assert config.idle_watts * seconds < spent <= config.tdp_watts * seconds
    before = gpu.total_energy_joules()
    gpu.idle(0.5)
    assert gpu.total_energy_joules() - before == pytest.approx(config.idle_watts * 0.5)
    assert gpu.elapsed_s == pytest.approx(sum(gpu.iteration_seconds(s, mhz) for mhz, s in runs) + 0.5)


def test_compute_bound_energy_is_u_shaped_in_the_clock_memory_bound_falls():
    gpu = SimulatedGpu()
    lowest, middle, top = (energy_of(gpu, PREFILL, mhz) for mhz in (210, 990, 1980))
    assert middle < top and middle < lowest
    lowest, middle, top = (energy_of(gpu, DECODE, mhz) for mhz in (210, 990, 1980))
    assert lowest < middle < top


def test_simulated_lock_and_reset():
    gpu = SimulatedGpu()
    assert gpu.current_sm_clock_mhz() == 1980 and gpu.clock_event_reasons() == []
    gpu.lock_sm_clock(1005)
    assert gpu.current_sm_clock_mhz() == 1005 and gpu.locked_mhz == 1005
    assert gpu.clock_event_reasons() == ["user_defined_clocks"]
    assert gpu.run_iteration(PREFILL) == pytest.approx(gpu.iteration_seconds(PREFILL, 1005))
    gpu.reset_sm_clock()
    assert gpu.current_sm_clock_mhz() == 1980 and gpu.locked_mhz is None
    with pytest.raises(ValueError):
        gpu.lock_sm_clock(1000)  # not on the 15 MHz grid
