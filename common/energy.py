"""Energy of a piece of work: GPU from NVML's energy counter, CPU from RAPL, or "unavailable" with the reason.

    with EnergyMeter(device) as meter:     # idle power is measured first (idle_s), then the window opens
        run_the_work()
    meter.result(units=n_tokens)           # joules, idle power, net joules, joules per unit, method

``measure_energy(fn, units)`` repeats ``fn`` until the window lasts at least ``min_window_s``: NVML's counter
updates coarsely (a 96 ms window read 0 J on an H100), so short windows are extended rather than trusted.
A counter that did not advance gives no figure, never a zero.
"""

from __future__ import annotations

import glob
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common.timing import sync

RAPL_ROOT = "/sys/class/powercap"
MIN_WINDOW_S = 1.0  # shorter windows get no figure: the counters update too coarsely
# Each counter's shortest trusted window (ML.ENERGY's methodology): NVML's energy counter updates about every
# 100 ms (a 96 ms window read 0 J on an H100, windows under about 2 s read low), so 5 s; RAPL's about every
# millisecond, 2 s. A window asked shorter is lengthened to these.
MIN_WINDOW_BY_METHOD = {"nvml-energy-counter": 5.0, "nvml-power-sampling": 5.0, "rapl": 2.0}


def min_window_for(counter, requested: float | None = None) -> float:
    """The window a measurement on ``counter`` lasts at least: ``requested``, never under the counter's floor."""
    floor = MIN_WINDOW_BY_METHOD.get(getattr(counter, "method", ""), MIN_WINDOW_S)
    return max(floor, requested or 0.0)


class NvmlEnergyCounter:
    """Total energy since the driver loaded (mJ), Volta and newer."""

    method = "nvml-energy-counter"

    def __init__(self, handle, pynvml):
        self.handle, self.nvml = handle, pynvml
        self.read_j()  # raises NVMLError_NotSupported on GPUs without the counter

    def read_j(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3


class NvmlPowerSampler:
    """Fallback for GPUs without the counter: power (mW) sampled in a thread, integrated by trapezoids."""

    method = "nvml-power-sampling"

    def __init__(self, handle, pynvml, interval_s: float = 0.01):
        self.handle, self.nvml, self.interval_s = handle, pynvml, interval_s
        self._energy, self._last, self._lock, self._stop, self._thread = 0.0, None, threading.Lock(), None, None

    def _sample(self):
        p, t = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3, time.perf_counter()
        with self._lock:
            if self._last is not None:
                self._energy += 0.5 * (p + self._last[0]) * (t - self._last[1])
            self._last = (p, t)

    def start(self):
        self._stop = threading.Event()
        self._sample()

        def loop():
            while not self._stop.wait(self.interval_s):
                try:
                    self._sample()
                except Exception as e:  # the GPU stopped answering: the next read says so (EnergyMeter)
                    self._failed = e
                    return

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def read_j(self) -> float:
        if getattr(self, "_failed", None) is not None:
            raise RuntimeError(f"power sampling failed: {self._failed}")
        self._sample()
        with self._lock:
            return self._energy


class RaplCounter:
    """Sum of the CPU package domains (intel-rapl:N, not their subdomains), unwrapping counter overflow."""

    method = "rapl"

    def __init__(self, root: str = RAPL_ROOT):
        self.domains = sorted(d for d in glob.glob(os.path.join(root, "intel-rapl:*")) if d.count(":") == 1)
        if not self.domains:
            raise OSError(f"no RAPL package domains under {root}")
        self.ranges = [int(Path(d, "max_energy_range_uj").read_text()) for d in self.domains]
        self.last = [self._raw(d) for d in self.domains]  # raises PermissionError where not readable
        self.total_uj = 0

    @staticmethod
    def _raw(domain: str) -> int:
        return int(Path(domain, "energy_uj").read_text())

    def read_j(self) -> float:
        for i, d in enumerate(self.domains):
            now = self._raw(d)
            delta = now - self.last[i]
            self.total_uj += delta if delta >= 0 else delta + self.ranges[i]  # the counter wrapped around
            self.last[i] = now
        return self.total_uj / 1e6


def find_counter(device: torch.device | str, rapl_root: str = RAPL_ROOT):
    """(counter, None) for the best counter of ``device``, or (None, why there is none)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import pynvml  # from the nvidia-ml-py package

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            try:  # NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES may renumber them, the UUID does not
                uuid = str(torch.cuda.get_device_properties(index).uuid)
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            except Exception:  # older torch without .uuid, or an NVML that wants the UUID in another form
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, driver problems ...
            return None, f"NVML unavailable ({type(e).__name__}: {e})"
        try:
            return NvmlEnergyCounter(handle, pynvml), None
        except pynvml.NVMLError as e:
            counter_error = e
        try:  # no energy counter: power samples, if the GPU reads power at all (MIG slices and vGPUs may not)
            pynvml.nvmlDeviceGetPowerUsage(handle)
            return NvmlPowerSampler(handle, pynvml), None
        except pynvml.NVMLError as e:
            return None, (
                f"NVML reads neither energy ({type(counter_error).__name__}) nor power ({type(e).__name__}) on this "
                "GPU (a MIG slice or a vGPU?)"
            )
    try:
        return RaplCounter(rapl_root), None
    except (OSError, ValueError) as e:
        return None, f"no readable RAPL energy counter for the CPU ({type(e).__name__}: {e})"


class EnergyMeter:
    """Context manager: idle power for ``idle_s`` just before, then the energy of the ``with`` body."""

    def __init__(
        self,
        device: torch.device | str,
        idle_s: float = 1.0,
        counter=None,
        reason: str | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.device = torch.device(device)
        if counter is None and reason is None:
            counter, reason = find_counter(self.device)
        self.counter, self.reason, self.idle_s, self.clock, self.sleep = counter, reason, idle_s, clock, sleep
        self.idle_power_w = self.energy_j = self.window_s = None

    def _read(self) -> float | None:
        """The counter's joules, or None once it failed: a counter that stops answering (an NVML error mid-run)
        makes the energy "unavailable" with the reason, and the work it measures goes on."""
        if self.counter is None:
            return None
        try:
            return self.counter.read_j()
        except Exception as e:  # NVMLError_NotSupported, a driver reset, a RAPL file gone ...
            self._give_up(e)
            return None

    def _give_up(self, e: Exception):
        if hasattr(self.counter, "stop"):
            try:
                self.counter.stop()
            except Exception:
                pass
        self.reason = f"the {self.counter.method} counter failed while measuring ({type(e).__name__}: {e})"
        self.counter = None
        print(f"energy: {self.reason}; energy is unavailable for this run", file=sys.stderr)

    def __enter__(self):
        if self.counter is None:
            return self
        if hasattr(self.counter, "start"):
            try:
                self.counter.start()
            except Exception as e:
                self._give_up(e)
                return self
        if self.idle_s > 0:
            sync(self.device)
            e0, t0 = self._read(), self.clock()
            self.sleep(self.idle_s)
            e1, t1 = self._read(), self.clock()
            ok = e0 is not None and e1 is not None and e1 > e0
            self.idle_power_w = (e1 - e0) / (t1 - t0) if ok else None
        sync(self.device)
        self._e0, self._t0 = self._read(), self.clock()
        return self

    def __exit__(self, *exc):
        if self.counter is None:
            return False
        sync(self.device)
        now = self._read()
        if now is None or self._e0 is None:
            return False
        self.energy_j, self.window_s = now - self._e0, self.clock() - self._t0
        if hasattr(self.counter, "stop"):
            self.counter.stop()
        return False

    def so_far(self) -> float | None:
        """Joules since the window opened (None without a counter): for progress inside a long window."""
        if self.counter is None or getattr(self, "_e0", None) is None:
            return None
        now = self._read()
        return None if now is None else now - self._e0

    def result(self, units: int | None = None, unit: str = "token", min_window_s: float = 0.0) -> dict:
        """Joules of the window (and per unit); a window shorter than ``min_window_s`` (for work that cannot
        be repeated to fill one, e.g. a served request) gets no figure, only its length and why."""
        if self.counter is None:
            return {"method": "unavailable", "reason": self.reason}
        if self.window_s is not None and self.window_s < min_window_s:
            return {
                "method": self.counter.method,
                "window_s": self.window_s,
                "energy_j": None,
                "reason": f"the window lasted {self.window_s:.3f} s, under the {min_window_s:g} s a reading needs",
            }
        out = {
            "method": self.counter.method,
            "window_s": self.window_s,
            "idle_s": self.idle_s,
            "idle_power_w": self.idle_power_w,
        }
        if not self.energy_j or self.energy_j <= 0:  # a zero reading is a failed window, never 0 J
            return {
                **out,
                "energy_j": None,
                "failed_window": True,
                "reason": "the counter did not advance during the window (a failed window, not 0 J); lengthen it",
            }
        out["energy_j"] = self.energy_j
        out["avg_power_w"] = self.energy_j / self.window_s
        if self.idle_power_w is not None:
            out["idle_energy_j"] = self.idle_power_w * self.window_s
            out["net_energy_j"] = self.energy_j - out["idle_energy_j"]  # above idle: what the work itself cost
        if units:
            out["units"], out["unit"] = units, unit
            out[f"j_per_{unit}"] = self.energy_j / units
            if "net_energy_j" in out:
                out[f"net_j_per_{unit}"] = out["net_energy_j"] / units
        return out


def measure_energy(
    fn: Callable[[], object],
    units_per_call: int,
    device: torch.device | str,
    min_window_s: float | None = None,
    idle_s: float = 1.0,
    unit: str = "token",
    cooldown_s: float = 0.0,
    **meter_kw,
) -> dict:
    """Energy of ``fn`` per unit: ``fn`` is repeated until the window lasts at least ``min_window_s``, and never
    less than the counter's own floor (5 s on NVML, 2 s on RAPL: ``min_window_for``). ``cooldown_s`` of rest
    first (between models, so one model's heat is not the next one's power), then the idle power."""
    meter = EnergyMeter(device, idle_s=idle_s, **meter_kw)
    if meter.counter is None:
        return meter.result()
    min_window_s = min_window_for(meter.counter, min_window_s)
    if cooldown_s > 0:
        meter.sleep(cooldown_s)
    device = torch.device(device)
    calls = 0
    with meter:
        start = meter.clock()
        while True:
            fn()
            calls += 1
            sync(device)
            if meter.clock() - start >= min_window_s:
                break
    return {
        **meter.result(calls * units_per_call, unit),
        "calls": calls,
        "min_window_s": min_window_s,
        "cooldown_s": cooldown_s,
    }


def repeated_energy(
    fn: Callable[[], object],
    units_per_call: int,
    device: torch.device | str,
    runs: int = 3,
    tolerance: float = 0.05,
    unit: str = "token",
    **measure_kw,
) -> dict:
    """``measure_energy`` ``runs`` times over: the median J per unit (gross and net of idle), every run's
    figure, and their spread, (max - min) / median, judged against ``tolerance``. One run's dict is under
    ``runs``; a figure any run lacks is left out rather than taken from the others."""
    results = [measure_energy(fn, units_per_call, device, unit=unit, **measure_kw) for _ in range(runs)]
    if results[0]["method"] == "unavailable":
        return results[0]
    out = {"method": results[0]["method"], "runs": results, "tolerance": tolerance}
    for key in (f"j_per_{unit}", f"net_j_per_{unit}"):
        values = [r.get(key) for r in results]
        if any(v is None for v in values):
            continue
        med = statistics.median(values)
        out[key], out[f"{key}_runs"] = med, values
        if runs >= 2 and med > 0:
            out[f"{key}_spread"] = (max(values) - min(values)) / med
            out[f"{key}_within_tolerance"] = out[f"{key}_spread"] <= tolerance
    if f"j_per_{unit}" not in out:
        out["reason"] = next(r.get("reason") for r in results if r.get(f"j_per_{unit}") is None)
    return out
