"""A model loaded for inference: the model (a quantized one with its stored quantized weights, or quantized
again where its scheme stores the unquantized ones), its tokenizer, device and dtype, and what compression
made it. The evaluators (eval/), the server (serve/) and the latency timings load through ``load_model``,
which takes this project's checkpoints and Hugging Face model folders (models/hf.py) alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import UserError
from common.device import autocast, compute_dtype, pick_device
from common.results import Compression
from llama.model import count_params
from llama.model_io import quantized_file, verify_checksum
from llama.tokenizer import Tokenizer
from models.compression import COMPRESSION_FILE, read_compression
from models.folders import load_folder, load_skeleton, model_folder
from models.hf_tokenizer import HFTokenizer
from models.interface import CausalLM
from runtime.quantize import BATCH_DEPENDENT_SCHEMES, quantize, scheme


@dataclass
class Loaded:
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
        return self.model.params.head_layer_spec()

    @property
    def quantized(self) -> bool:
        return self.scheme is not None

    @property
    def scheme(self) -> str | None:
        """The quantization scheme the model runs in (compression.json's), None for one not quantized."""
        c = Compression.of(self.compression)
        return c.quantize if c else None

    def autocast(self):
        return autocast(self.device, self.dtype)

    def batch_size(self, requested: int) -> int:
        """The batch to run with: 1 where a sequence's result would depend on its batch neighbours."""
        return 1 if self.scheme in BATCH_DEPENDENT_SCHEMES else requested


def model_name(folder: Path) -> str:
    return f"{folder.parent.name}@{folder.name}" if folder.name.startswith("step_") else folder.name


def load_model(checkpoint: str | os.PathLike, device: str = "auto", dtype: str = "auto") -> Loaded:
    dev = pick_device(device)
    dt = compute_dtype(dtype, dev)
    folder = model_folder(checkpoint) if Path(checkpoint).exists() else None  # (else a Hub name: load_folder)
    if folder is not None and (folder / COMPRESSION_FILE).is_file():
        verify_checksum(folder, COMPRESSION_FILE)  # what it says it is (its scheme, its method) as written
    stored = None if folder is None else quantized_file(folder)
    if stored is not None:  # stored quantized: its weights go into the model of the folder's shapes
        compression = read_compression(folder)
        c = Compression.of(compression)
        if not (c and c.quantize):
            raise UserError(f"{folder} holds {stored.name} but no compression.json naming its scheme")
        s = scheme(c.quantize)
        if s.file != stored.name:
            raise UserError(f"{folder} holds {stored.name}, which {s.name} does not store; quantize its base again")
        s.available(dev)
        verify_checksum(folder, stored.name)
        skeleton, tok = load_skeleton(folder)
        n_params = count_params(skeleton)["total"]
        model = s.load(skeleton, folder, dev).eval()
        return Loaded(model_name(folder), folder, model, tok, dev, dt, compression, n_params)
    model, tok, folder = load_folder(checkpoint, dev)
    n_params = count_params(model)["total"]
    compression = read_compression(folder)
    c = Compression.of(compression)
    if c and c.quantize:  # a scheme that stores the unquantized weights
        model = quantize(model, c.quantize).eval()
    return Loaded(model_name(folder), folder, model, tok, dev, dt, compression, n_params)
