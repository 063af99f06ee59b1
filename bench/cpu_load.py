"""How busy other processes keep the CPUs around a benchmark, from /proc/stat.

The load average counts threads waiting on IO (here: many) as well as running ones, so a machine can show a load of
2 with idle cores. /proc/stat's CPU times say what ran: the cores busy (user, nice, system, irq, softirq, steal)
minus the CPU time this process and its finished workers used is what the others took.
"""
from __future__ import annotations

import os
import resource
import time

BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system [idle iowait] irq softirq steal (guest is inside user)


def busy_cpu_seconds() -> float | None:
    """CPU-seconds all cores have spent busy since boot (None without /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    return sum(ticks[i] for i in BUSY_FIELDS if i < len(ticks)) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU-seconds used by this process and its waited-for children (the benchmark's workers)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


class OthersBusy:
    """Average cores other processes keep busy between `start()` (or construction) and `cores()`."""

    def __init__(self):
        self.start()

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.monotonic(), busy_cpu_seconds(), own_cpu_seconds()

    def cores(self) -> float | None:
        busy = busy_cpu_seconds()
        elapsed = time.monotonic() - self.t0
        if busy is None or self.busy0 is None or elapsed <= 0:
            return None
        return max(0.0, (busy - self.busy0) - (own_cpu_seconds() - self.own0)) / elapsed


def others_busy_now(seconds: float = 1.0) -> float | None:
    """Cores other processes keep busy over the next `seconds` (this process sleeps meanwhile)."""
    probe = OthersBusy()
    time.sleep(seconds)
    return probe.cores()
