"""What ``python -m compress`` records beside a model it writes (compression.json), read by whoever loads that model:
the loader (runtime), the evaluators' identities, the study's tables. Below compress/ and runtime/, so that
neither imports the other to read it."""

from __future__ import annotations

from pathlib import Path

from common.cli import UserError
from common.results import read_versioned

COMPRESSION_FILE = "compression.json"
COMPRESSION_SCHEMA = 1  # the version of compression.json's layout (its recovery record included)


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
