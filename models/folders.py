"""Model folders of either kind: this project's (model_args.json, model.safetensors, tokenizer.model) and
Hugging Face's (config.json, safetensors, tokenizer files), loaded and saved by one pair of functions."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.cli import UserError
from llama.model_io import load_model, resolve_checkpoint, tokenizer_path
from llama.tokenizer import Tokenizer
from models.families import family_of
from models.hf import from_hub, is_hf_folder, load_hf


def model_folder(path: str | os.PathLike) -> Path:
    """The folder a model argument names, without loading it: a Hugging Face folder as it is, else a model
    folder or the newest step of a checkpoints/<run> folder (FileNotFoundError where there is none)."""
    return Path(path) if is_hf_folder(path) else resolve_checkpoint(path)


def load_folder(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(model in eval mode, tokenizer, the folder it came from) of a checkpoints/<run> folder (its newest
    step), a model folder, a Hugging Face folder, or a Hub name where the network allows."""
    path = from_hub(path) or path
    folder = model_folder(path)
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
