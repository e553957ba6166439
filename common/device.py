"""Which device and dtype a command runs on, and the autocast context for that dtype."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from common.cli import UserError


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return _check_index(torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"), pref)
    try:
        device = torch.device(pref)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"device={pref!r} is unknown; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={pref!r} but CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return _check_index(device, pref)


def _check_index(device: torch.device, pref: str) -> torch.device:
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(
            f"device={pref!r} means cuda:{device.index}, but this machine has {torch.cuda.device_count()} GPU(s); "
            "start at most one process per GPU (torchrun --nproc_per_node), or pass --device cpu"
        )
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype forward passes run in: ``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    choices = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
    }
    if name not in choices:
        raise UserError(f"dtype={name!r} is unknown; use auto, bfloat16 or float32")
    return choices[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for ``dtype`` on ``device``; float32 needs none."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
