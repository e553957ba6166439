"""Model folders of either kind: this project's (model_args.json, model.safetensors, tokenizer.model) and
Hugging Face's (config.json, safetensors, tokenizer files), loaded and saved by one pair of functions. A
quantized folder holds its quantized weights instead (runtime/quantize.py): ``load_skeleton`` gives the model
to load them into, and runtime.loading.load_model loads it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.cli import UserError
from llama.model_io import load_model, model_skeleton, quantized_file, resolve_checkpoint, tokenizer_path
from llama.tokenizer import Tokenizer
from models.families import family_of
from models.hf import from_hub, hf_skeleton, is_hf_folder, load_hf


def model_folder(path: str | os.PathLike) -> Path:
    """The folder a model argument names, without loading it: a Hugging Face folder as it is, else a model
    folder or the newest step of a checkpoints/<run> folder (FileNotFoundError where there is none)."""
    return Path(path) if is_hf_folder(path) else resolve_checkpoint(path)


def load_folder(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(model in eval mode, tokenizer, the folder it came from) of a checkpoints/<run> folder (its newest
    step), a model folder, a Hugging Face folder, or a Hub name where the network allows."""
    path = from_hub(path) or path
    folder = model_folder(path)
    if (quantized := quantized_file(folder)) is not None:
        raise UserError(
            f"{folder} holds a quantized model ({quantized.name}); evaluate or serve it (they load it "
            "quantized), or compress its unquantized base"
        )
    if is_hf_folder(folder):
        model, tok = load_hf(folder, device)
        return model, tok, folder
    model = load_model(folder, device).eval()
    tok = Tokenizer(tokenizer_path(folder))
    if tok.vocab_size != model.params.vocab_size:
        raise UserError(f"{folder}: tokenizer has {tok.vocab_size} tokens, the model {model.params.vocab_size}")
    return model, tok, folder


def save_folder(model, tokenizer, out: Path):
    """The model and its tokenizer into ``out`` (a folder being written), in its own family's format."""
    family_of(model).save(model, tokenizer, out)


def load_skeleton(folder: Path):
    """(the folder's model at its sizes without its weights, its tokenizer): on the meta device for this
    project's models, randomly initialised for transformers' (whose init computes buffers a load does not
    restore); the quantized weights a folder holds go into it."""
    if is_hf_folder(folder):
        return hf_skeleton(folder)
    return model_skeleton(folder), Tokenizer(tokenizer_path(folder))


# The files that make a model what it is (weights, sizes, tokenizer, how it was compressed); not a training run's
# optimizer, RNG or timing state.
_DEFINING = ("*.safetensors", "quantized.pt", "model_args.json", "config.json", "compression.json", "tokenizer*")


def fingerprint(path: str | os.PathLike) -> str:
    """A model folder's identity: the SHA-256 over the names and contents of the files that define the model (a
    weight file's checksum recorded at save is taken as its content: loading verifies it). Two folders with the
    same fingerprint hold the same model; a retrained, recompressed or edited one has another. What results and
    compressed models record of the model they were made from."""
    import hashlib
    import json

    from llama.model_io import CHECKSUM_FILE, _sha256

    folder = model_folder(path)
    try:
        recorded = json.loads((folder / CHECKSUM_FILE).read_text()) if (folder / CHECKSUM_FILE).is_file() else {}
    except ValueError:
        recorded = {}
    names = sorted({p.name for pattern in _DEFINING for p in folder.glob(pattern) if p.is_file()})
    h = hashlib.sha256()
    for name in names:
        digest = recorded.get(name) if isinstance(recorded, dict) else None
        h.update(f"{name}\0{digest or _sha256(folder / name)}\0".encode())
    return h.hexdigest()[:32]
