"""What every evaluator shares: loading a checkpoint for evaluation, its held-out data, and writing results."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.compress import read_compression
from eval.compress.quantize import BATCH_DEPENDENT_SCHEMES, quantize
from llama.model import Transformer, count_params
from llama.tokenizer import Tokenizer
from training.checkpoint import STATE_FILE, load_model, resolve_checkpoint, tokenizer_path
from training.data import PreparedData, load_prepared
from training.distributed import autocast, compute_dtype, pick_device
from training.hardware import run_metadata


@dataclass
class Evaluated:
    name: str  # run@step_N, or the model folder's name
    folder: Path
    model: Transformer
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype  # autocast dtype used for the forward passes
    compression: dict | None = None  # compression.json of a compressed baseline
    n_params: int = 0  # parameters before any quantization (packed int8 weights are not nn.Parameters)

    @property
    def quantized(self) -> bool:
        return bool(self.compression and self.compression.get("quantize"))

    def autocast(self):
        return autocast(self.device, self.dtype)

    def batch_size(self, requested: int) -> int:
        """The batch to evaluate with: 1 where a sequence's result would depend on its batch neighbours."""
        return 1 if self.quantized and self.compression["quantize"] in BATCH_DEPENDENT_SCHEMES else requested


def model_name(folder: Path) -> str:
    return f"{folder.parent.name}@{folder.name}" if folder.name.startswith("step_") else folder.name


def load_for_eval(checkpoint: str | os.PathLike, device: str = "auto", dtype: str = "auto") -> Evaluated:
    folder = resolve_checkpoint(checkpoint)
    dev = pick_device(device)
    dt = compute_dtype(dtype, dev)
    model = load_model(folder, dev).eval()
    n_params = count_params(model)["total"]
    compression = read_compression(folder)
    if compression and compression.get("quantize"):
        model = quantize(model, compression["quantize"]).eval()  # stored unquantized; quantized on load
    tok = Tokenizer(tokenizer_path(folder))
    if tok.vocab_size != model.params.vocab_size:
        raise ValueError(f"{folder}: tokenizer has {tok.vocab_size} tokens, the model {model.params.vocab_size}")
    return Evaluated(model_name(folder), folder, model, tok, dev, dt, compression, n_params)


def training_data(checkpoint: str | os.PathLike) -> tuple[PreparedData, dict]:
    """The prepared data a checkpoint was trained on (its held-out split, calibration windows ...) and the
    checkpoint's state.json."""
    folder = resolve_checkpoint(checkpoint)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{folder} has no {STATE_FILE}, so its training data is unknown; pass --corpus")
    state = json.loads(state_path.read_text())
    if not state.get("data_dir"):
        raise FileNotFoundError(f"{state_path} names no training data; pass --corpus")
    try:
        return load_prepared(state["data_dir"]), state
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


def write_result(path: str | os.PathLike, payload: dict, device: torch.device) -> Path:
    """Write ``payload`` plus where it was measured (commit, device, torch) as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**run_metadata(device), **payload}, indent=2))
    os.replace(tmp, path)
    return path
