"""One save and one load for model folders (the trainer adds what resuming needs: training/checkpoint.py).

A model folder holds ``model.safetensors`` and ``model_args.json`` (``asdict(ModelArgs)``); the model is
rebuilt with ``Transformer(ModelArgs(**saved))``. Folders are written under a temporary name and renamed
into place, so an interrupted save never leaves a folder that looks complete; ``checksums.json`` holds the
SHA-256 of every weight, optimizer and RNG file, checked on load, so a damaged byte is found, not trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.cli import UserError
from common.files import atomic_dir
from llama.model import ModelArgs, Transformer

MODEL_FILE, ARGS_FILE, TOKENIZER_FILE = "model.safetensors", "model_args.json", "tokenizer.model"
CHECKSUM_FILE = "checksums.json"
STATE_FILE = "state.json"  # a checkpoint's training state: step, tokens, config, the data it was trained on
# a quantized model's weights as its scheme stores them (runtime/quantize.py): cast weights in safetensors,
# packed int8 weights and scales through torch.save (read back with weights_only=True)
QUANTIZED_SAFETENSORS, QUANTIZED_PT = "quantized.safetensors", "quantized.pt"
QUANTIZED_FILES = (QUANTIZED_SAFETENSORS, QUANTIZED_PT)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path, names: list[str]):
    """Record the checksums of ``names`` beside those already recorded, of files the folder still holds."""
    sums = json.loads((folder / CHECKSUM_FILE).read_text()) if (folder / CHECKSUM_FILE).is_file() else {}
    sums = {n: v for n, v in sums.items() if (folder / n).is_file()}
    sums |= {n: _sha256(folder / n) for n in names if (folder / n).is_file()}
    (folder / CHECKSUM_FILE).write_text(json.dumps(sums, indent=2))


def verify_checksum(folder: Path, name: str):
    """Raise a one-line ValueError if ``folder/name`` differs from the checksum recorded when it was saved.
    Folders saved before checksums were recorded are read as they are."""
    path = folder / CHECKSUM_FILE
    if not path.is_file():
        return
    try:
        expected = json.loads(path.read_text()).get(name)
    except (ValueError, AttributeError):
        raise UserError(
            f"{path} is damaged (not a JSON object of checksums); the checkpoint cannot be checked"
        ) from None
    if expected is not None and _sha256(folder / name) != expected:
        raise UserError(
            f"{folder / name} does not match its recorded checksum: the file is damaged; use another checkpoint"
        )


def write_model_files(model: Transformer, folder: Path, state_dict: dict | None = None, tokenizer: Path | None = None):
    """``state_dict`` defaults to the model's; the trainer passes the full one gathered from FSDP shards.
    A copy of the tokenizer makes the folder self-contained for evaluation."""
    sd = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    if model.params.tie_embeddings:
        sd.pop("output.weight")  # the same tensor as tok_embeddings.weight; safetensors refuses shared memory
    save_file(sd, str(folder / MODEL_FILE), metadata={"format": "pt"})
    (folder / ARGS_FILE).write_text(json.dumps(model.params.to_dict(), indent=2))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / TOKENIZER_FILE)
    write_checksums(folder, [MODEL_FILE, TOKENIZER_FILE])


def save_model(
    model: Transformer, out_dir: str | os.PathLike, tokenizer: Path | None = None, owner: str | None = None
) -> Path:
    """A model folder at ``out_dir``; with ``owner`` (the command writing it), an existing ``out_dir`` is
    replaced only if that command wrote it (common.files.atomic_dir)."""
    with atomic_dir(out_dir, owner=owner) as tmp:
        write_model_files(model, tmp, tokenizer=tokenizer)
    return Path(out_dir)


def quantized_file(folder: Path) -> Path | None:
    """The quantized weights a model folder holds in place of its weights, if it holds them (else None)."""
    return next((folder / n for n in QUANTIZED_FILES if (folder / n).is_file()), None)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A model folder, or a run folder (``checkpoints/<run>``) whose latest ``step_N`` is taken."""
    p = Path(path)
    if (p / MODEL_FILE).is_file() or quantized_file(p) is not None:
        return p
    if p.is_dir():
        steps = list_checkpoints(p)
        if steps:
            return steps[-1][1]
        raise FileNotFoundError(f"{p} holds no {MODEL_FILE} and no step_N checkpoints; train first")
    raise FileNotFoundError(f"checkpoint {p} does not exist; pass a checkpoints/<run> or step_N folder")


def model_file_bytes(folder: str | os.PathLike) -> int:
    """Bytes of a model folder's weight files on disk (a Hugging Face folder may hold several shards; a
    quantized model, its quantized weights)."""
    p = Path(folder)
    shards = sorted(p.glob("*.safetensors")) + ([p / QUANTIZED_PT] if (p / QUANTIZED_PT).is_file() else [])
    if p.is_dir() and shards:
        return sum(s.stat().st_size for s in shards)
    return (resolve_checkpoint(folder) / MODEL_FILE).stat().st_size


def model_from_state_dict(args: ModelArgs, sd: dict[str, torch.Tensor], source: str = "state dict") -> Transformer:
    """The model for ``args`` around the tensors of ``sd`` (no random init, no copy), after checking that the
    names and shapes are exactly those ``args`` implies. A tied output weight may be absent from ``sd``."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")
        sd = {k: v for k, v in sd.items() if k != "output.weight"}
    if set(sd) != set(expected):
        missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        raise UserError(f"{source} does not match the model arguments: missing {missing[:3]}, extra {extra[:3]}")
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise UserError(f"{source}: {k} has shape {tuple(sd[k].shape)}, the model arguments imply {tuple(shape)}")
    model.load_state_dict(sd, strict=not args.tie_embeddings, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def tokenizer_path(path: str | os.PathLike) -> Path:
    """The tokenizer saved with a checkpoint (or model folder)."""
    folder = resolve_checkpoint(path)
    if not (folder / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {TOKENIZER_FILE}; save the model with its tokenizer")
    return folder / TOKENIZER_FILE


def read_args(folder: Path) -> ModelArgs:
    args_path = folder / ARGS_FILE
    if not args_path.is_file():
        raise FileNotFoundError(f"{folder} has no {ARGS_FILE}; it was not written by save_model")
    try:
        return ModelArgs.from_dict(json.loads(args_path.read_text()))
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{args_path} is damaged or not model arguments ({e}); use another checkpoint") from None


def model_skeleton(folder: Path) -> Transformer:
    """The folder's model on the meta device (its shapes, no weights): what stored quantized weights go into."""
    with torch.device("meta"):
        return Transformer(read_args(folder))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Transformer:
    folder = resolve_checkpoint(path)
    args = read_args(folder)
    quantized = quantized_file(folder)
    if quantized is not None and not (folder / MODEL_FILE).is_file():
        raise UserError(
            f"{folder} holds a quantized model ({quantized.name}), not its weights: evaluate or serve it (they load "
            "it quantized), or use its unquantized base"
        )
    verify_checksum(folder, MODEL_FILE)
    try:
        sd = load_file(str(folder / MODEL_FILE), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{folder / MODEL_FILE} is unreadable ({e}); the checkpoint is damaged") from None
    return model_from_state_dict(args, sd, f"{folder} (with its {ARGS_FILE})").to(device)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), c) for c in run_dir.iterdir() if (m := _STEP_DIR.match(c.name)) and c.is_dir()]
    return sorted(found)
