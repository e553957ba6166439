"""Calibration data for pruning and layer selection: random windows of the training split a model saw."""

from __future__ import annotations

from pathlib import Path

import torch

from eval.common import training_data
from llama.model import rope_cos_sin
from training.data import BatchSampler


def calibration_tokens(
    checkpoint: str | Path, n_samples: int = 64, seq_len: int | None = None, seed: int = 0
) -> torch.Tensor:
    """(n_samples, seq_len) token windows from the train split of the checkpoint's data (Wanda/SparseGPT use
    128 x 2048 tokens of C4 for 7B models; small models need fewer)."""
    data, state = training_data(checkpoint)
    if seq_len is None and state.get("config"):
        seq_len = state["config"]["seq_len"]  # the length the model was trained on
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
