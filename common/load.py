"""How busy the machine was while something was timed: the load average, and the CPU time that other processes
took during the measurement (from /proc/stat, less this process's own CPU time). Every timing result records it,
and a report built from timings taken on a busy machine says so beside them.

Threads: a timing that asks for every core while other work holds some of them oversubscribes the machine (a
compile measured 136 ms with the default threads against 1 ms with one thread beside other work).
``timing_threads`` picks the cores the other work leaves free.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

BUSY_CORES = 0.25  # other processes took more than a quarter of a core on average: the machine was busy


def _busy_jiffies() -> float | None:
    """CPU seconds spent busy by all processes since boot (/proc/stat), or None where the OS does not say."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def timing_threads(requested: int | None = None, sample_s: float = 0.5) -> int:
    """Threads for a timing: ``requested`` if given, else the cores that other work leaves free, measured over
    ``sample_s`` seconds while this process sleeps (the load average would still count work that ended a minute
    ago), at least one."""
    if requested is not None:
        return max(1, requested)
    with LoadMeter() as m:
        time.sleep(sample_s)
    others = m.result()["other_processes_cores"] or 0.0
    return max(1, cores() - math.ceil(others - 0.5))


@dataclass
class LoadMeter:
    """``with LoadMeter() as m: ...`` then ``m.result()``: the machine's load during the block."""

    t0: float = 0.0
    busy0: float | None = None
    own0: float = 0.0
    load0: tuple = ()
    _result: dict | None = None

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.monotonic(), _busy_jiffies(), _own_cpu()
        self.load0 = os.getloadavg() if hasattr(os, "getloadavg") else ()
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.t0
        busy1, own = _busy_jiffies(), _own_cpu() - self.own0
        load1 = os.getloadavg() if hasattr(os, "getloadavg") else ()
        others = None
        if self.busy0 is not None and busy1 is not None and wall > 0:
            others = max(0.0, (busy1 - self.busy0 - own) / wall)  # cores other processes kept busy, on average
        self._result = {
            "cores": cores(),
            "load_avg_1m_before": self.load0[0] if self.load0 else None,
            "load_avg_1m_after": load1[0] if load1 else None,
            "other_processes_cores": others,  # None where /proc/stat is not there
            "busy": None if others is None else others > BUSY_CORES,
            "busy_threshold_cores": BUSY_CORES,
            "seconds": wall,
        }
        return False

    def result(self) -> dict:
        if self._result is None:
            raise RuntimeError("LoadMeter.result() before the measured block ended")
        return self._result


def describe(load: dict | None) -> str | None:
    """One line for a report beside timings taken on a busy machine; None when it was quiet or unknown."""
    if not load or not load.get("busy"):
        return None
    return (
        f"the machine was busy while these were timed: other processes kept {load['other_processes_cores']:.2f} of "
        f"its {load['cores']} cores busy on average (load average {load.get('load_avg_1m_before') or 0:.1f} before, "
        f"{load.get('load_avg_1m_after') or 0:.1f} after); timings are slower and noisier than on a quiet machine"
    )
