"""Timing helpers shared by the benchmarks: warm-up, device sync before every clock read, median and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def spread(values: list[float]) -> dict:
    """Median with the 10th and 90th percentiles (nearest rank)."""
    s = sorted(values)

    def pct(q):
        return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]

    return {"median": statistics.median(s), "p10": pct(0.1), "p90": pct(0.9), "n": len(s)}
