"""Result files: what every evaluator writes, and what every reader may take for one. A result is a JSON object
carrying where it was measured (git commit, device, torch and Python versions) beside its figures; it is
written whole (atomically), and replaces only an earlier result, never another file named as its path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from common.cli import UserError
from common.files import atomic_write
from common.hardware import run_metadata


def check_result_path(path: str | os.PathLike | None):
    """A result may replace only an earlier result (a JSON object carrying where it was measured): never a
    user's file that happens to be named as --out. A one-line error otherwise, raised before any work."""
    if path is None or not os.path.lexists(path):
        return
    path = Path(path)
    try:
        old = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and {"git_commit", "torch_version"} <= set(old)):
        raise UserError(
            f"--out {path} exists and is not a result this project wrote; nothing was changed: name a new file"
        )


def write_result(path: str | os.PathLike, payload: dict, device: torch.device) -> Path:
    """Write ``payload`` plus where it was measured (commit, device, torch) as JSON, atomically; an existing
    file is replaced only if it is an earlier result (check_result_path)."""
    check_result_path(path)
    return atomic_write(path, json.dumps({**run_metadata(device), **payload}, indent=2))
