"""Calibration data for pruning and layer selection: random windows of the training split a model saw."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.cli import UserError
from data.config import DataConfig
from data.prepare import BatchSampler, load_documents
from training.checkpoint import training_data


def calibration_tokens(
    checkpoint: str | Path, n_samples: int = 64, seq_len: int | None = None, seed: int = 0
) -> torch.Tensor:
    """(n_samples, seq_len) token windows from the train split of the checkpoint's data (Wanda/SparseGPT use
    128 x 2048 tokens of C4 for 7B models; small models need fewer)."""
    data, trained = training_data(checkpoint)
    if seq_len is None and trained is not None:
        seq_len = trained.seq_len  # the length the model was trained on
    if not seq_len:
        raise UserError("pass --calib-seq-len: the checkpoint does not record its training sequence length")
    x, _ = BatchSampler(data.train, seq_len, n_samples, seed).get(0)
    return x


def corpus_calibration_tokens(
    corpus: DataConfig, tokenizer, n_samples: int = 64, seq_len: int = 512, seed: int = 0
) -> torch.Tensor:
    """(n_samples, seq_len) random windows of a text corpus, for models whose training data is not at hand
    (Hugging Face models): documents in a seeded random order, tokenized with the model's tokenizer and packed
    until there are four times the tokens drawn (or the corpus ends)."""
    docs = load_documents(corpus)
    parts, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(docs)):
        parts.append(np.asarray(tokenizer.encode(docs[i].text, bos=True, eos=True), dtype=np.int64))
        total += len(parts[-1])
        if total >= 4 * n_samples * (seq_len + 1):
            break
    x, _ = BatchSampler(np.concatenate(parts), seq_len, n_samples, seed).get(0)
    return x


class _FirstBlockReached(Exception):
    pass


@torch.no_grad()
def block_inputs(model, tokens: torch.Tensor, batch_size: int) -> list[BlockInput]:
    """What the first block receives for each batch of calibration tokens: its hidden states and every other
    argument the model passes it (rotary tables, masks, positions), caught by a hook that stops the forward
    there, as the "Catcher" of the Wanda and SparseGPT code does. The same code serves this project's
    Transformer and any transformers model, whose blocks take different arguments."""
    device = model.tok_embeddings.weight.device
    caught = []

    def catch(module, args, kwargs):
        if args:
            h, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            h, rest = kwargs.pop("hidden_states"), ()
        caught.append(BlockInput(h.float(), rest, kwargs))
        raise _FirstBlockReached

    handle = model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(0, len(tokens), batch_size):
            try:
                model(tokens[i : i + batch_size].to(device))
            except _FirstBlockReached:
                pass
    finally:
        handle.remove()
    return caught


@dataclass
class BlockInput:
    """One batch at the input of a block: hidden states (float32) and the block's other arguments."""

    h: torch.Tensor
    args: tuple
    kwargs: dict

    def with_hidden(self, h: torch.Tensor) -> BlockInput:
        return BlockInput(h, self.args, self.kwargs)


def run_block(layer: nn.Module, x: BlockInput) -> torch.Tensor:
    """One block over full sequences (causal, no cache), called as the model calls it; float32 outputs."""
    dtype = next(layer.parameters()).dtype
    out = layer(x.h.to(dtype), *x.args, **x.kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


class BlockPass:
    """One block during block-by-block calibration: its inputs, and its outputs computed on first use."""

    def __init__(self, layer: nn.Module, inputs: list[BlockInput]):
        self.layer, self.inputs, self._outputs = layer, inputs, None

    def outputs(self) -> list[torch.Tensor]:
        if self._outputs is None:
            self._outputs = [run_block(self.layer, x) for x in self.inputs]
        return self._outputs


@torch.no_grad()
def block_by_block(model, tokens: torch.Tensor, batch_size: int = 8) -> Iterator[tuple[int, BlockPass]]:
    """Walk the blocks in order with the calibration activations that reach each one. The next block's
    inputs are this block's outputs as they are once the caller is done with it: after pruning it, they are
    the pruned block's outputs (as in the Wanda and SparseGPT papers' code)."""
    model.eval()
    xs = block_inputs(model, tokens, batch_size)
    for i, layer in enumerate(model.layers):
        block = BlockPass(layer, xs)
        yield i, block
        xs = [x.with_hidden(h) for x, h in zip(xs, block.outputs(), strict=True)]


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


@torch.no_grad()
def input_sq_norms(model, linears: dict, calib: torch.Tensor, batch_size: int = 8) -> dict[object, torch.Tensor]:
    """{key: ||X_j||^2 per input feature} of each linear layer over the calibration windows, run through the
    whole (unpruned) model in batches: the activation term of structured-pruning importance."""
    device = model.tok_embeddings.weight.device
    with input_stats(linears) as stats:
        for i in range(0, len(calib), batch_size):
            model(calib[i : i + batch_size].to(device))
    return {k: st.sq for k, st in stats.items()}
