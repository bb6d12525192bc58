"""`PowerMonitor`: the engine's accelerator: energy of each iteration and the clock decisions.

The engine brackets every iteration with `begin_iteration` / `end_iteration`; the
monitor answers the joules the iteration spent, read from the device's energy
counter (NVML: the board's cumulative counter; simulated: the energy the model
charges for the iteration's shape at the current clock). Energy spent between
iterations, while the engine idles, belongs to no request and is left out.

Every control interval (`tick`) the governor picks the clock from the engine's
`LoadState` (locks it in `apply`, only reports it in `advise`), and clock and power
are read for the metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.latency_model import IterationShape, LatencyModel
from engine.power.device import GpuDevice, PowerControlError
from engine.power.device_group import DeviceGroup
from engine.power.governor import FrequencyGovernor, LoadState
from engine.power.simulated_device import SimulatedGpu

log = logging.getLogger(__name__)

DEVICES = ("auto", "nvml", "simulated", "none")


@dataclass(frozen=True)
class PowerReading:
    sm_clock_mhz: int
    target_sm_clock_mhz: int
    power_watts: float


def open_device(kind: str, torch_device: str, num_devices: int = 1) -> GpuDevice | None:
    """The device named by the `power_device` setting; `auto` = NVML on a CUDA device where
    NVML opens, else none. `num_devices`: the GPUs of a tensor-parallel engine (from
    `torch_device`'s index on), governed as one (device_group.py); the simulated card
    models the whole engine."""
    if kind not in DEVICES:
        raise ValueError(f"power_device must be one of {', '.join(DEVICES)}; got {kind!r}")
    if kind == "none" or (kind == "auto" and not torch_device.startswith("cuda")):
        return None
    if kind == "simulated":
        return SimulatedGpu()
    # Imported only where a driver is expected.
    from engine.power.nvml_device import NvmlDevice

    _, _, index = torch_device.partition(":")
    first = int(index or 0)
    try:
        if num_devices == 1:
            return NvmlDevice(first)
        return DeviceGroup([NvmlDevice(first + rank) for rank in range(num_devices)])
    except PowerControlError as exc:
        if kind == "nvml":
            raise
        # `auto` serves on without power readings where NVML is missing (a container
        # without the driver's management library); asked for by name, it is an error.
        log.warning("no power readings: %s", exc)
        return None


class PowerMonitor:
    def __init__(self, device: GpuDevice, governor: FrequencyGovernor):
        self.device = device
        self.governor = governor
        self._simulated = isinstance(device, SimulatedGpu)
        self._energy_at_begin = 0.0
        self._last_end: float | None = None
        self._next_tick = 0.0
        if governor.mode == "apply":
            self._check_clock_control()
        # Refreshed every control interval, not every iteration: NVML reads cost time.
        self.reading = self._read()

    @classmethod
    def create(
        cls,
        kind: str,
        mode: str,
        torch_device: str,
        latency_model: LatencyModel,
        ttft_slo_ms: float,
        tpot_slo_ms: float,
        max_num_batched_tokens: int,
        num_devices: int = 1,
    ) -> PowerMonitor | None:
        """None when there is no device to watch (a CPU deployment)."""
        device = open_device(kind, torch_device, num_devices)
        if device is None:
            if mode == "apply":
                raise PowerControlError("power_mode apply needs a GPU (power_device nvml or auto on CUDA)")
            return None
        latency_model.max_clock_mhz = device.supported_sm_clocks_mhz()[-1]
        governor = FrequencyGovernor(
            device, latency_model, ttft_slo_ms, tpot_slo_ms, mode=mode, max_num_batched_tokens=max_num_batched_tokens
        )
        return cls(device, governor)

    def _check_clock_control(self) -> None:
        """Fail at start-up, with NVML's reason and what to do, when clocks cannot be locked."""
        top = self.governor.top_mhz
        try:
            self.device.lock_sm_clock(top)
            self.device.reset_sm_clock()
        except PowerControlError as exc:
            raise PowerControlError(f"power_mode apply cannot control clocks: {exc}") from exc
        log.info("power_mode apply: locking SM clocks of %s works", self.device.name)

    @property
    def mode(self) -> str:
        return self.governor.mode

    def clock_mhz(self) -> int:
        return self.device.current_sm_clock_mhz()

    def begin_iteration(self) -> None:
        if self._simulated:
            # Simulated time only moves when told: the wall-clock gap since the last
            # iteration is idle time on the simulated card.
            now = time.perf_counter()
            if self._last_end is not None:
                self.device.idle(now - self._last_end)
        self._energy_at_begin = self.device.total_energy_joules()

    def end_iteration(self, shape: IterationShape) -> float:
        """Joules spent since `begin_iteration`."""
        if self._simulated:
            self.device.run_iteration(shape)
            self._last_end = time.perf_counter()
        return float(max(0.0, self.device.total_energy_joules() - self._energy_at_begin))

    def tick(self, now: float, load: Callable[[], LoadState]) -> None:
        """Once per control interval: a clock decision (unless off) and fresh readings."""
        if now < self._next_tick:
            return
        self._next_tick = now + self.governor.interval_s
        if self.governor.mode != "off":
            self.governor.decide(load())
        self.reading = self._read()

    def _read(self) -> PowerReading:
        return PowerReading(self.clock_mhz(), self.governor.target_mhz, float(self.device.power_watts()))

    def close(self) -> None:
        """Give the clock back to the driver (apply mode) and release the device."""
        self.governor.close()
        if self.governor.mode == "apply":
            log.info("SM clocks of %s reset to the driver's control", self.device.name)
        close = getattr(self.device, "close", None)
        if close is not None:
            close()
