"""Where the bench runs: every side on one CPU, the same one from run to run where it can, and never a busy one."""
from __future__ import annotations

import os
import time

QUIET = 0.5   # the first CPU is taken when at least this share of it was idle


def _idle_ticks() -> dict[int, int]:
    """Idle and iowait ticks of each CPU since boot."""
    with open("/proc/stat") as f:
        return {int(w[0][3:]): int(w[4]) + int(w[5]) for w in (line.split() for line in f)
                if w[0].startswith("cpu") and w[0] != "cpu"}


def idle_shares(allowed: set[int], sample: float = 0.5) -> dict[int, float]:
    """The share of `sample` seconds each CPU of `allowed` was idle."""
    before = _idle_ticks()
    time.sleep(sample)
    after = _idle_ticks()
    return {c: (after.get(c, 0) - before.get(c, 0)) / (sample * os.sysconf("SC_CLK_TCK")) for c in allowed}


def choose_cpu(idle: dict[int, float]) -> int:
    """The first CPU unless it is busy, else the idlest: on the development machine, idle, a memslot add and delete
    cost 27 µs from CPU 0 and 140 µs from CPU 1 (likely SRCU, whose grace-period work for a small srcu_struct
    runs on the boot CPU), so a row that moved between CPUs from run to run would move with it."""
    first = min(idle)
    return first if idle[first] >= QUIET else max(idle, key=lambda c: idle[c])


def pin(cpu: int | None, allowed: set[int]) -> str:
    """Put every thread of the bench, and so the C side started next, on one CPU (chosen among `allowed`, the
    affinity the bench started with, unless given): sides on different CPUs, one shared with an emulator, paid
    several times each other's kernel time for the same memslot change."""
    idle = ""
    if cpu is None:
        shares = idle_shares(allowed)
        cpu = choose_cpu(shares)
        idle = f" ({shares[cpu]:.0%} idle)"
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {cpu})
    return f"{cpu}{idle}"
