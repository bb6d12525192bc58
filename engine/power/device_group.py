"""`DeviceGroup`: the GPUs of a tensor-parallel engine, governed as one device.

Every rank runs every iteration, and each collective waits for the slowest rank, so
an iteration runs at the pace of the slowest card: clocking one card lower than the
others saves its energy but slows them all. The governor therefore sets one clock for
all of them, and the energy it weighs is theirs together:

  clocks      the ones every card supports; a lock locks all, a reset resets all;
  current     the lowest card's clock (the pace of the group);
  power, energy   summed over the cards;
  clock event reasons   any card's.
"""

from __future__ import annotations

from engine.power.device import GpuDevice


class DeviceGroup:
    def __init__(self, devices: list[GpuDevice]):
        if not devices:
            raise ValueError("a device group needs at least one device")
        self.devices = devices
        self.name = f"{len(devices)} x {devices[0].name}"
        self._clocks = sorted(set.intersection(*(set(d.supported_sm_clocks_mhz()) for d in devices)))
        if not self._clocks:
            raise ValueError(f"the GPUs {[d.name for d in devices]} share no SM clock to lock them at")

    def supported_sm_clocks_mhz(self) -> list[int]:
        return list(self._clocks)

    def current_sm_clock_mhz(self) -> int:
        return min(d.current_sm_clock_mhz() for d in self.devices)

    def power_watts(self) -> float:
        return sum(d.power_watts() for d in self.devices)

    def total_energy_joules(self) -> float:
        return sum(d.total_energy_joules() for d in self.devices)

    def lock_sm_clock(self, mhz: int) -> None:
        for d in self.devices:
            d.lock_sm_clock(mhz)

    def reset_sm_clock(self) -> None:
        for d in self.devices:
            d.reset_sm_clock()

    def clock_event_reasons(self) -> list[str]:
        return sorted({reason for d in self.devices for reason in d.clock_event_reasons()})

    def close(self) -> None:
        for d in self.devices:
            close = getattr(d, "close", None)
            if close is not None:
                close()
