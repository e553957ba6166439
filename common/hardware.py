"""What a result was measured on: git commit, device, versions, and the device's peak FLOP/s."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity). MFU is only reported for these devices:
# a guessed peak would make the figure meaningless.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def peak_flops(device: torch.device | str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


RESULTS = ("bench/results", "docs/results")  # result folders committed beside the code


def git_commit() -> str:
    """HEAD (+dirty); in a copy of the tree without git (a remote machine), $GIT_COMMIT if set."""
    if not (Path(__file__).parent.parent / ".git").exists() and os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            # results committed beside the code (bench/results, docs/results) do not make the code dirty: a
            # benchmark that rewrote one would otherwise mark every later one of the same commit
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/"]
            + [f":(top,exclude){d}" for d in RESULTS],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(device: torch.device | str) -> dict:
    """The fields every result JSON carries about where and with what it was measured."""
    return {
        "git_commit": git_commit(),
        "device": device_name(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
