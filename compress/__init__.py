"""Compressed baselines: layer dropping, pruning (unstructured and structured), quantization, and recovery
after compression (see __main__.py and recover.py); the records each leaves beside the model it writes."""

from __future__ import annotations

import json
from pathlib import Path

COMPRESSION_FILE = "compression.json"
IDENTITY_FILE = "recovery-of.json"  # in a recovery run's checkpoint and log folders: whose run it is
PRUNING = ("magnitude", "wanda", "sparsegpt")  # the methods that leave a sparse model (a mask of zeros)


def read_compression(folder: str | Path) -> dict | None:
    """What ``python -m compress`` did to make the model in ``folder`` (None for a trained model)."""
    path = Path(folder) / COMPRESSION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


RECOVERY = ("full", "lora", "distill")  # recovery after compression (compress/recover.py)


def read_recovery_mark(folder: str | Path) -> dict | None:
    """A recovery run folder's recovery-of.json (whose run it is, its settings, the loss before training), or
    None where it has none or an unreadable one."""
    try:
        mark = json.loads((Path(folder) / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None
