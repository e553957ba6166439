"""Compressed baselines: layer dropping, pruning (unstructured and structured), quantization, and recovery
after compression (see __main__.py and recover.py); the records each leaves beside the model it writes."""

from __future__ import annotations

import json
from pathlib import Path

from common.cli import UserError
from common.results import read_versioned

COMPRESSION_FILE = "compression.json"
COMPRESSION_SCHEMA = 1  # the version of compression.json's layout (its recovery record included)
IDENTITY_FILE = "recovery-of.json"  # in a recovery run's checkpoint and log folders: whose run it is
PRUNING = ("magnitude", "wanda", "sparsegpt")  # the methods that leave a sparse model (a mask of zeros)


def read_compression(folder: str | Path) -> dict | None:
    """What ``python -m compress`` did to make the model in ``folder`` (None for a trained model). A record of
    another schema version, or one that is not a JSON object, is refused in one line; records written before
    the version was recorded read as version 1."""
    path = Path(folder) / COMPRESSION_FILE
    if not path.is_file():
        return None
    record = read_versioned(path, COMPRESSION_SCHEMA, "compression", "compress the base again with this code")
    if not isinstance(record, dict):
        raise UserError(f"{path} is damaged (not a JSON object); compress the base again")
    return record


RECOVERY = ("full", "lora", "distill")  # recovery after compression (compress/recover.py)


def read_recovery_mark(folder: str | Path) -> dict | None:
    """A recovery run folder's recovery-of.json (whose run it is, its settings, the loss before training), or
    None where it has none or an unreadable one."""
    try:
        mark = json.loads((Path(folder) / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None
