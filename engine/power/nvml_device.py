"""`NvmlDevice`: one NVIDIA GPU read and clock-locked through NVML (nvidia-ml-py).

Reading clocks, power and energy needs only the driver. Locking clocks needs
privilege, and the card is shared with whatever else runs on it, so every NVML
failure becomes a `PowerControlError` that says what to change (install the
driver, run privileged, or use `power_mode: advise`), never a bare NVML code.
Importing this module never touches the driver: NVML loads on construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pynvml

from engine.power.device import PowerControlError

T = TypeVar("T")

# NVML's clock event ("throttle") reason bits; the names are ours, stable for metrics.
_REASONS = {
    pynvml.nvmlClocksThrottleReasonGpuIdle: "gpu_idle",
    # Application clocks or clocks locked with nvmlDeviceSetGpuLockedClocks.
    pynvml.nvmlClocksThrottleReasonApplicationsClocksSetting: "user_defined_clocks",
    pynvml.nvmlClocksThrottleReasonSwPowerCap: "sw_power_cap",
    pynvml.nvmlClocksThrottleReasonHwSlowdown: "hw_slowdown",
    pynvml.nvmlClocksThrottleReasonSyncBoost: "sync_boost",
    pynvml.nvmlClocksThrottleReasonSwThermalSlowdown: "sw_thermal_slowdown",
    pynvml.nvmlClocksThrottleReasonHwThermalSlowdown: "hw_thermal_slowdown",
    pynvml.nvmlClocksThrottleReasonHwPowerBrakeSlowdown: "hw_power_brake_slowdown",
    pynvml.nvmlClocksThrottleReasonDisplayClockSetting: "display_clock_setting",
}

_NO_DRIVER = (
    "no NVIDIA driver is usable here, so GPU clocks, power and energy cannot be read; "
    "install the driver (and run the container with the GPU exposed) or set power_mode: off"
)
_NO_PERMISSION = (
    "locking GPU clocks needs root (CAP_SYS_ADMIN in a container) on most drivers, or an "
    "administrator opening clock control to users (`nvidia-smi -acp UNRESTRICTED` where "
    "the driver honours it); power_mode: advise computes and exports the target clock "
    "without any privilege"
)
_NOT_SUPPORTED = "this GPU or driver does not support it (clock locking and the energy counter need Volta or newer)"


def _hint(exc: pynvml.NVMLError) -> str:
    if isinstance(exc, (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded)):
        return _NO_DRIVER
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return _NO_PERMISSION
    if isinstance(exc, pynvml.NVMLError_NotSupported):
        return _NOT_SUPPORTED
    return "see nvidia-smi for the GPU's state"


def _error(what: str, exc: pynvml.NVMLError) -> PowerControlError:
    return PowerControlError(f"{what} failed ({exc}): {_hint(exc)}")


def _checked(what: str, fn: Callable[..., T], *args) -> T:
    try:
        return fn(*args)
    except pynvml.NVMLError as exc:
        raise _error(what, exc) from exc


class NvmlDevice:
    def __init__(self, index: int = 0):
        self.index = index
        _checked("initializing NVML", pynvml.nvmlInit)
        try:
            self._handle = _checked(f"opening GPU {index}", pynvml.nvmlDeviceGetHandleByIndex, index)
            self.name = _checked(f"reading GPU {index}'s name", pynvml.nvmlDeviceGetName, self._handle)
            self._clocks = self._read_supported_clocks()
        except PowerControlError:
            pynvml.nvmlShutdown()
            raise

    def _call(self, what: str, fn: Callable[..., T], *args) -> T:
        return _checked(f"{what} on GPU {self.index} ({self.name})", fn, self._handle, *args)

    def _read_supported_clocks(self) -> list[int]:
        # Graphics clocks are listed per memory clock; serving runs at the top one.
        memory = max(self._call("listing memory clocks", pynvml.nvmlDeviceGetSupportedMemoryClocks))
        return sorted(set(self._call("listing SM clocks", pynvml.nvmlDeviceGetSupportedGraphicsClocks, memory)))

    def supported_sm_clocks_mhz(self) -> list[int]:
        return list(self._clocks)

    def current_sm_clock_mhz(self) -> int:
        return self._call("reading the SM clock", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)

    def power_watts(self) -> float:
        return self._call("reading power", pynvml.nvmlDeviceGetPowerUsage) / 1e3  # NVML reports mW

    def total_energy_joules(self) -> float:
        return self._call("reading the energy counter", pynvml.nvmlDeviceGetTotalEnergyConsumption) / 1e3  # mJ

    def lock_sm_clock(self, mhz: int) -> None:
        self._call(f"locking the SM clock at {mhz} MHz", pynvml.nvmlDeviceSetGpuLockedClocks, mhz, mhz)

    def reset_sm_clock(self) -> None:
        self._call("resetting the SM clock", pynvml.nvmlDeviceResetGpuLockedClocks)

    def clock_event_reasons(self) -> list[str]:
        what = "reading clock event reasons"
        try:
            bits = pynvml.nvmlDeviceGetCurrentClocksEventReasons(self._handle)
        except pynvml.NVMLError_FunctionNotFound:
            # Older drivers only know the call by its former name; the bits are the same.
            bits = self._call(what, pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        except pynvml.NVMLError as exc:
            raise _error(f"{what} on GPU {self.index} ({self.name})", exc) from exc
        return [name for bit, name in _REASONS.items() if bits & bit]

    def close(self) -> None:
        """Release this handle's reference on NVML; clocks stay as they are."""
        pynvml.nvmlShutdown()
