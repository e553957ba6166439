"""What every evaluator and compressor shares: a checkpoint's training data and writing results. Loading a
model for evaluation is eval/model.py (it knows about compression; this module must not)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.cli import UserError
from common.files import atomic_write
from common.hardware import run_metadata
from llama.model_io import resolve_checkpoint
from training.checkpoint import STATE_FILE, training_config
from training.config import TrainConfig
from training.data import PreparedData, load_prepared


def training_data(checkpoint: str | os.PathLike) -> tuple[PreparedData, TrainConfig | None]:
    """The prepared data a checkpoint was trained on (its held-out split, calibration windows ...) and the
    config it was trained with (None where it records none)."""
    folder = resolve_checkpoint(checkpoint)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{folder} has no {STATE_FILE}, so its training data is unknown; pass --corpus")
    state = json.loads(state_path.read_text())
    if not state.get("data_dir"):
        raise FileNotFoundError(f"{state_path} names no training data; pass --corpus")
    try:
        return load_prepared(state["data_dir"]), training_config(folder)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the training data of {folder} ({state['data_dir']}) is gone; prepare it again with the run's data "
            "settings (python -m training.data ...) or pass --corpus"
        ) from None


def split_documents_at_bos(tokens: np.ndarray, bos_id: int) -> list[np.ndarray]:
    """The packed stream ``<s> doc </s> <s> doc </s> ...`` back into one array per document (without <s>)."""
    starts = np.flatnonzero(np.asarray(tokens) == bos_id)
    ends = list(starts[1:]) + [len(tokens)]
    return [np.asarray(tokens[s + 1 : e]) for s, e in zip(starts, ends, strict=True)]


def heldout_documents(tokens: np.ndarray, tokenizer) -> list[np.ndarray]:
    """The packed held-out stream back into each document's own tokens, without its <s> and </s>."""
    docs = split_documents_at_bos(tokens, tokenizer.bos_id)
    return [d[:-1] if len(d) and d[-1] == tokenizer.eos_id else d for d in docs]


def kept_layers(n_layers: int, drop: list[int]) -> list[int]:
    """The block indices left after dropping ``drop`` (checked: real indices, at least one block left)."""
    drop = sorted(set(drop))
    if any(not 0 <= i < n_layers for i in drop):
        raise UserError(f"layers to drop {drop} must be in 0..{n_layers - 1}")
    if len(drop) >= n_layers:
        raise UserError(f"cannot drop all {n_layers} layers; keep at least one")
    return [i for i in range(n_layers) if i not in drop]


@dataclass
class HeldOut:
    """Score the held-out documents of ``checkpoint``'s training data, as text: how a model with another
    tokenizer (a Hugging Face model) is measured on the same text as this project's models."""

    checkpoint: str


def heldout_texts(checkpoint: str | os.PathLike) -> list[str]:
    """The held-out documents of a checkpoint's training data, decoded with the checkpoint's tokenizer."""
    from llama.model_io import tokenizer_path
    from llama.tokenizer import Tokenizer

    data, _ = training_data(checkpoint)
    tok = Tokenizer(tokenizer_path(checkpoint))
    return [tok.decode(d) for d in heldout_documents(data.val, tok)]


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
