"""Training checkpoints: a model folder (llama/model_io.py) plus the optimizer, RNG states and ``state.json``
that resuming needs, written atomically and checksummed; pruning of old checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch

from common.cli import UserError
from common.files import atomic_dir
from data.heldout import HeldOut, heldout_texts, model_data  # noqa: F401 (their home is data/; re-exported)
from data.prepare import PreparedData
from llama.model import Transformer
from llama.model_io import (
    STATE_FILE,
    list_checkpoints,
    resolve_checkpoint,
    verify_checksum,
    write_checksums,
    write_model_files,
)
from training.config import TrainConfig, train_config_from_dict

# What interrupted saves (.tmp), replacements (.old) and prunes (.del) can leave in a run folder.
_LEFTOVER = re.compile(r"^\.step_\d+\.(tmp|old|del)\d+$")


OPTIM_FILE, RNG_FILE = "optimizer.pt", "rng.pt"


def save_checkpoint(
    folder: Path,
    model: Transformer,
    model_state: dict,
    optim_state: dict,
    state: dict,
    tokenizer: Path,
    write_model=None,
) -> Path:
    """Model (safetensors), optimizer, RNG states and ``state`` (step, tokens, config ...) in one atomic folder.
    ``write_model(model, folder, state dict)`` writes the model files instead, for a model that is not this
    project's own (training.config.Custom)."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with atomic_dir(folder) as tmp:
        if write_model is not None:
            write_model(model, tmp, model_state)
        else:
            write_model_files(model, tmp, model_state, tokenizer)
        torch.save(optim_state, tmp / OPTIM_FILE)
        torch.save(rng, tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        write_checksums(tmp, [OPTIM_FILE, RNG_FILE, STATE_FILE])
    return folder


def load_training_state(folder: Path) -> tuple[dict, dict, dict]:
    """(state, optimizer state, RNG states) of a training checkpoint, loaded with weights_only=True."""
    for name in (STATE_FILE, OPTIM_FILE, RNG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}; it is a model, not a training checkpoint to resume")
    fix = f"move {folder} aside to resume from the checkpoint before it"
    for name in (STATE_FILE, OPTIM_FILE, RNG_FILE):
        try:
            verify_checksum(folder, name)
        except ValueError as e:
            raise UserError(f"{e}; {fix}") from None
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        missing = {"step", "tokens", "elapsed_s"} - set(state)
    except (ValueError, TypeError):
        state, missing = None, {"a JSON object"}
    if missing:
        raise UserError(f"{folder / STATE_FILE} is damaged (missing {sorted(missing)}); {fix}")
    loaded = []
    for name in (OPTIM_FILE, RNG_FILE):
        try:
            loaded.append(torch.load(folder / name, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
            why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise UserError(f"{folder / name} is unreadable ({why}); {fix}") from None
    return state, loaded[0], loaded[1]


def training_config(folder: str | os.PathLike) -> TrainConfig | None:
    """The TrainConfig a checkpoint (or a compressed model made from one) was trained with; None where its
    state.json records none."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text()).get("config")
        return train_config_from_dict(saved) if saved else None
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path} holds no readable training config ({e}); it is damaged") from None


def restore_rng(rng: dict):
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: int):
    """Delete all but the newest ``keep_last`` checkpoints and those at multiples of ``keep_every``. Each is
    renamed out of the ``step_N`` namespace first, so a kill midway never leaves a half-deleted checkpoint
    under a valid name."""
    ckpts = list_checkpoints(run_dir)
    newest = {step for step, _ in ckpts[-keep_last:]}
    for step, path in ckpts:
        if step not in newest and not (keep_every and step % keep_every == 0):
            doomed = path.with_name(f".{path.name}.del{os.getpid()}")
            os.replace(path, doomed)
            shutil.rmtree(doomed)


def remove_leftovers(run_dir: Path) -> list[str]:
    """Remove what interrupted saves and prunes left in ``run_dir`` (only hidden ``.step_N.tmp|old|delPID``
    folders of this run; call it while holding the run's lock, so no live save is among them)."""
    removed = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if _LEFTOVER.match(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                removed.append(p.name)
    if removed:
        print(f"removed {len(removed)} leftover(s) of interrupted saves in {run_dir}: {removed}", file=sys.stderr)
    return removed


def training_data(checkpoint: str | os.PathLike) -> tuple[PreparedData, TrainConfig | None]:
    """The prepared data a checkpoint was trained on (its held-out split, calibration windows ...) and the
    config it was trained with (None where it records none)."""
    return model_data(checkpoint), training_config(resolve_checkpoint(checkpoint))
