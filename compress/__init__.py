"""Compressed baselines: layer dropping, pruning (unstructured and structured), quantization, and recovery
after compression (see __main__.py and recover.py); the records each leaves beside the model it writes."""

from __future__ import annotations

import json
from pathlib import Path

from models.compression import COMPRESSION_FILE, COMPRESSION_SCHEMA, read_compression  # noqa: F401 (re-exported)

IDENTITY_FILE = "recovery-of.json"  # in a recovery run's checkpoint and log folders: whose run it is
PRUNING = ("magnitude", "wanda", "sparsegpt")  # the methods that leave a sparse model (a mask of zeros)


RECOVERY = ("full", "lora", "distill")  # recovery after compression (compress/recover.py)


def read_recovery_mark(folder: str | Path) -> dict | None:
    """A recovery run folder's recovery-of.json (whose run it is, its settings, the loss before training), or
    None where it has none or an unreadable one."""
    try:
        mark = json.loads((Path(folder) / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None
