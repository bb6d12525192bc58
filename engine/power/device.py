"""`GpuDevice`: what the governor and the metrics need from an accelerator.

Kept to clocks, power and energy so that a real card (NVML) and the simulated one
are interchangeable, and so that nothing outside this package imports pynvml.
"""

from __future__ import annotations

from typing import Protocol


class PowerControlError(RuntimeError):
    """The device cannot be read or controlled; the message says what to do about it."""


class GpuDevice(Protocol):
    name: str

    def supported_sm_clocks_mhz(self) -> list[int]:
        """SM clocks the device can be locked to, ascending."""
        ...

    def current_sm_clock_mhz(self) -> int: ...

    def power_watts(self) -> float: ...

    def total_energy_joules(self) -> float:
        """Monotonic energy counter; differences between two reads are what was spent."""
        ...

    def lock_sm_clock(self, mhz: int) -> None: ...

    def reset_sm_clock(self) -> None:
        """Undo `lock_sm_clock`: the driver picks clocks again."""
        ...

    def clock_event_reasons(self) -> list[str]:
        """Why the clock is below its maximum right now (to confirm a lock holds,
        or to see thermal or power throttling override it); empty when it is not."""
        ...
