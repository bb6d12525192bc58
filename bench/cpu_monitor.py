"""How much CPU processes outside the benchmark took while it measured.

The machine is shared (test suites may run beside the benchmark), and on 2 cores any
foreign load skews both backends unequally. So each measured phase records the
machine's busy time (/proc/stat) minus the time of this process's own tree
(/proc/<pid>/stat, reaped children included), as a fraction of all cores.
"""

from __future__ import annotations

import os
import time

NCPU = os.cpu_count() or 1
HZ = os.sysconf("SC_CLK_TCK")


def _machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    return sum(fields[:8]) - fields[3] - fields[4]


def process_stats() -> dict[int, list[str]]:
    """pid -> the fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # The command name may hold spaces; the fields after ')' are fixed.
                    stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited while we looked
    return stats


def _own_tree_ticks() -> int:
    """CPU ticks of this process and its live descendants, plus all they have reaped."""
    stats = {pid: (int(rest[1]), sum(int(x) for x in rest[11:15])) for pid, rest in process_stats().items()}  # ppid, u+s+cu+cs
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(stats[pid][1] for pid in tree if pid in stats)


class ForeignCpu:
    """`with ForeignCpu() as fc: ...` then `fc.share`: foreign busy cores / all cores."""

    def __enter__(self) -> "ForeignCpu":
        self._t0 = time.monotonic()
        self._machine0 = _machine_busy_ticks()
        self._own0 = _own_tree_ticks()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self._t0
        foreign = (_machine_busy_ticks() - self._machine0) - (_own_tree_ticks() - self._own0)
        self.share = max(0.0, foreign / HZ / (wall * NCPU))


def wait_for_quiet(max_wait: float, threshold: float = 0.15, sample: float = 3.0) -> float:
    """Wait (at most `max_wait` s) until foreign load is below `threshold`; return the last share."""
    deadline = time.monotonic() + max_wait
    while True:
        with ForeignCpu() as fc:
            time.sleep(sample)
        if fc.share < threshold or time.monotonic() >= deadline:
            return fc.share
        print(f"[quiet] {fc.share:.0%} of the CPU busy with other processes; waiting", flush=True)
