"""What a block is made of, as the tools that edit or read its weights see it: its linear layers, and whether a
weight holds an N:M pattern of zeros. Used by pruning (compress/) and by the sparse kernels that run pruned
weights (runtime/), so it lives below both."""

from __future__ import annotations

import torch
from torch import nn


def block_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer of a block: wq, wk, wv, wo, w1, w2, w3 here; q/k/v/o and the MLP's in a transformers
    model (GPT-2's Conv1D layers are nn.Linear once loaded, models/hf.py)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def check_n_m(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Does every group of ``m`` consecutive inputs of every row hold at least ``n`` zeros?"""
    rows, cols = weight.shape
    return bool(((weight.view(rows, cols // m, m) == 0).sum(-1) >= n).all())
