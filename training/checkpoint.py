"""One save and one load for models (and, in the trainer, everything needed to resume).

A model folder holds ``model.safetensors`` and ``model_args.json`` (``asdict(ModelArgs)``); the model is
rebuilt with ``Transformer(ModelArgs(**saved))``. Folders are written under a temporary name and renamed
into place, so an interrupted save never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llama.model import ModelArgs, Transformer

MODEL_FILE, ARGS_FILE = "model.safetensors", "model_args.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary folder next to ``final``; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():  # replacing: move the old one aside first so a crash here loses neither
            old = final.with_name(f".{final.name}.old{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_files(model: Transformer, folder: Path):
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.params.tie_embeddings:
        sd.pop("output.weight")  # the same tensor as tok_embeddings.weight; safetensors refuses shared memory
    save_file(sd, str(folder / MODEL_FILE), metadata={"format": "pt"})
    (folder / ARGS_FILE).write_text(json.dumps(model.params.to_dict(), indent=2))


def save_model(model: Transformer, out_dir: str | os.PathLike) -> Path:
    with atomic_dir(out_dir) as tmp:
        write_model_files(model, tmp)
    return Path(out_dir)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A model folder, or a run folder (``checkpoints/<run>``) whose latest ``step_N`` is taken."""
    p = Path(path)
    if (p / MODEL_FILE).is_file():
        return p
    if p.is_dir():
        steps = [(int(m.group(1)), c) for c in p.iterdir() if (m := _STEP_DIR.match(c.name)) and c.is_dir()]
        if steps:
            return max(steps)[1]
        raise FileNotFoundError(f"{p} holds no {MODEL_FILE} and no step_N checkpoints; train first")
    raise FileNotFoundError(f"checkpoint {p} does not exist; pass a checkpoints/<run> or step_N folder")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Transformer:
    folder = resolve_checkpoint(path)
    args_path = folder / ARGS_FILE
    if not args_path.is_file():
        raise FileNotFoundError(f"{folder} has no {ARGS_FILE}; it was not written by save_model")
    args = ModelArgs.from_dict(json.loads(args_path.read_text()))
    try:
        sd = load_file(str(folder / MODEL_FILE), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{folder / MODEL_FILE} is unreadable ({e}); the checkpoint is damaged") from None
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")
    if set(sd) != set(expected):
        missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        raise ValueError(f"{folder} does not match its model_args.json: missing {missing[:3]}, extra {extra[:3]}")
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise ValueError(f"{folder}: {k} has shape {tuple(sd[k].shape)}, model_args.json implies {tuple(shape)}")
    model.load_state_dict(sd, strict=not args.tie_embeddings, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device)
