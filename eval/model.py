"""A model loaded for evaluation: the model (quantized again if its folder says so), its tokenizer, device
and dtype, and what compression made it. Every evaluator loads through ``load_for_eval``, which takes this
project's checkpoints and Hugging Face model folders (models/hf.py) alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from common.cli import positional
from common.device import autocast, compute_dtype, pick_device
from common.results import ModelIdentity, check_result_path, write_result
from compress import read_compression
from compress.quantize import BATCH_DEPENDENT_SCHEMES, quantize
from llama.model import count_params
from llama.tokenizer import Tokenizer
from models.folders import load_folder, model_folder
from models.hf import HFTokenizer
from models.interface import CausalLM


@dataclass
class EvalOptions:
    """What every evaluator command takes: which model, on which device and dtype, and where results go."""

    checkpoint: str = positional()  # checkpoints/<run> (its newest step), a model folder, or a HF model folder
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 elsewhere), bfloat16, float32
    out: str | None = None  # result JSON (default: results/<model>-<evaluator>.json)
    # the evaluator names this command writes: an existing --out is replaced only by the same evaluator's result
    EVALUATORS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        # a user's file, or another evaluator's or model's result, named as --out stops the command now, not
        # after the work
        check_result_path(self.out, self.EVALUATORS, known_folder(self.checkpoint))

    def load(self):
        return load_for_eval(self.checkpoint, self.device, self.dtype)


@dataclass
class Evaluated:
    name: str  # run@step_N, or the model folder's name
    folder: Path
    model: CausalLM  # this project's Transformer or a Hugging Face model (models.interface)
    tokenizer: Tokenizer | HFTokenizer
    device: torch.device
    dtype: torch.dtype  # autocast dtype used for the forward passes
    compression: dict | None = None  # compression.json of a compressed baseline
    n_params: int = 0  # parameters before any quantization (packed int8 weights are not nn.Parameters)

    @property
    def architecture(self) -> str:
        """``perhead-llama`` for this project's models, else the transformers model_type (llama, gpt2 ...)."""
        return self.model.family

    @property
    def head_layer(self) -> dict | None:
        """The per-head layers' settings (ModelArgs.head_layer_spec); None for plain blocks and HF models."""
        spec = getattr(self.model.params, "head_layer_spec", None)
        return spec() if spec else None

    @property
    def quantized(self) -> bool:
        return bool(self.compression and self.compression.get("quantize"))

    def autocast(self):
        return autocast(self.device, self.dtype)

    def write(self, evaluator: str, payload: dict, out: str | os.PathLike | None = None) -> Path:
        """An evaluator's result JSON (default results/<model>-<evaluator>.json): where it was measured,
        which model it is, and ``payload``."""
        identity = ModelIdentity(
            model=self.name,
            checkpoint=str(self.folder),
            params=self.n_params,
            n_layers=self.model.params.n_layers,
            architecture=self.architecture,
            head_layer=self.head_layer,
            compression=self.compression,
        )
        header = {"evaluator": evaluator, **identity.to_json()}
        path = out or Path("results") / f"{self.name}-{evaluator}.json"
        return write_result(path, header | payload, self.device, model=self.folder)

    def batch_size(self, requested: int) -> int:
        """The batch to evaluate with: 1 where a sequence's result would depend on its batch neighbours."""
        return 1 if self.quantized and self.compression["quantize"] in BATCH_DEPENDENT_SCHEMES else requested


def known_folder(checkpoint: str | None) -> Path | None:
    """The folder ``checkpoint`` names (models.folders.model_folder), or None where it cannot be told yet (the
    load will say why)."""
    try:
        return model_folder(checkpoint) if checkpoint else None
    except OSError:
        return None


def model_name(folder: Path) -> str:
    return f"{folder.parent.name}@{folder.name}" if folder.name.startswith("step_") else folder.name


def load_for_eval(checkpoint: str | os.PathLike, device: str = "auto", dtype: str = "auto") -> Evaluated:
    dev = pick_device(device)
    dt = compute_dtype(dtype, dev)
    model, tok, folder = load_folder(checkpoint, dev)
    n_params = count_params(model)["total"]
    compression = read_compression(folder)
    if compression and compression.get("quantize"):
        model = quantize(model, compression["quantize"]).eval()  # stored unquantized; quantized on load
    return Evaluated(model_name(folder), folder, model, tok, dev, dt, compression, n_params)
