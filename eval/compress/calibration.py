"""Calibration data for pruning and layer selection: random windows of the training split a model saw."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from eval.common import training_data
from llama.model import rope_cos_sin
from training.data import BatchSampler


def calibration_tokens(
    checkpoint: str | Path, n_samples: int = 64, seq_len: int | None = None, seed: int = 0
) -> torch.Tensor:
    """(n_samples, seq_len) token windows from the train split of the checkpoint's data (Wanda/SparseGPT use
    128 x 2048 tokens of C4 for 7B models; small models need fewer)."""
    data, trained = training_data(checkpoint)
    if seq_len is None and trained is not None:
        seq_len = trained.seq_len  # the length the model was trained on
    if not seq_len:
        raise ValueError("pass --calib-seq-len: the checkpoint does not record its training sequence length")
    x, _ = BatchSampler(data.train, seq_len, n_samples, seed).get(0)
    return x


@torch.no_grad()
def block_inputs(model, tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Embeddings of the calibration tokens in batches: the inputs of the first transformer block."""
    device = model.tok_embeddings.weight.device
    return [
        model.tok_embeddings(tokens[i : i + batch_size].to(device)).float() for i in range(0, len(tokens), batch_size)
    ]


def run_block(layer, h: torch.Tensor, params) -> torch.Tensor:
    """One transformer block over full sequences (causal, no cache), as the model runs it."""
    cos_sin = rope_cos_sin(torch.arange(h.shape[1], device=h.device), params.head_dim, params.rope_theta)
    dtype = next(layer.parameters()).dtype
    return layer(h.to(dtype), cos_sin, None, None).float()


class BlockPass:
    """One block during block-by-block calibration: its inputs, and its outputs computed on first use."""

    def __init__(self, layer: nn.Module, inputs: list[torch.Tensor], params):
        self.layer, self.inputs, self.params, self._outputs = layer, inputs, params, None

    def outputs(self) -> list[torch.Tensor]:
        if self._outputs is None:
            self._outputs = [run_block(self.layer, h, self.params) for h in self.inputs]
        return self._outputs


@torch.no_grad()
def block_by_block(model, tokens: torch.Tensor, batch_size: int = 8) -> Iterator[tuple[int, BlockPass]]:
    """Walk the blocks in order with the calibration activations that reach each one. The next block's
    inputs are this block's outputs as they are once the caller is done with it: after pruning it, they are
    the pruned block's outputs (as in the Wanda and SparseGPT papers' code)."""
    model.eval()
    hs = block_inputs(model, tokens, batch_size)
    for i, layer in enumerate(model.layers):
        block = BlockPass(layer, hs, model.params)
        yield i, block
        hs = block.outputs()


class InputStats:
    """Running statistics of one linear layer's inputs: the sum of squares per input feature (Wanda's
    ||X_j||^2) and, optionally, SparseGPT's Hessian 2 X X^T / n as a running mean (its add_batch)."""

    def __init__(self, cols: int, hessian: bool, device):
        self.sq = torch.zeros(cols, dtype=torch.float64, device=device)
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=device) if hessian else None
        self.n = 0

    def add(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq += (x.double() ** 2).sum(0)
        if self.H is not None:
            t = x.shape[0]
            self.H *= self.n / (self.n + t)
            self.n += t
            x = math.sqrt(2 / self.n) * x
            self.H += x.T @ x
        else:
            self.n += x.shape[0]


@contextmanager
def input_stats(linears: dict, hessian: bool = False):
    """{key: InputStats} gathered from every forward pass run inside the ``with`` block."""
    stats = {k: InputStats(m.in_features, hessian, m.weight.device) for k, m in linears.items()}
    hooks = [m.register_forward_hook(lambda mod, inp, out, s=stats[k]: s.add(inp[0])) for k, m in linears.items()]
    try:
        yield stats
    finally:
        for h in hooks:
            h.remove()
