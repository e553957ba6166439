"""Pruning of the transformer blocks' linear layers (embeddings and the output head are kept dense).

Unstructured and 2:4 semi-structured, with three scores:
- ``magnitude``: |W|, compared across the whole matrix;
- ``wanda`` (Sun et al., 2023): |W_ij| * ||X_j||_2 over calibration activations, compared within each
  output row;
- ``sparsegpt`` (Frantar & Alistarh, 2023): OBS-style pruning column by column with a damped Hessian
  H = 2 X X^T, the remaining weights of each row updated to compensate.
Wanda and SparseGPT calibrate block by block: each block sees the outputs of the already-pruned blocks
before it, as in both papers' code.

Structured: remove whole attention heads (whole key/value groups under GQA) and SwiGLU channels of least
importance (Wanda-style: weight norm times activation norm), optionally keeping the first/last blocks
intact. The result is a physically smaller model with per-layer sizes in its ModelArgs.
"""

from __future__ import annotations

import torch

from common.cli import UserError
from compress.calibration import block_by_block, input_stats, run_block
from llama.model import Transformer, count_params
from models.layout import block_linears, check_n_m  # noqa: F401 (re-exported)

# ---------------------------------------------------------------------------------------------------------
# Masks from scores


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """True where a weight is pruned: exactly int(sparsity * n) lowest scores per row (or per matrix)."""
    if per_row:
        k = int(score.shape[1] * sparsity)
        idx = torch.argsort(score, dim=1)[:, :k]
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    k = int(score.numel() * sparsity)
    idx = torch.argsort(score.flatten())[:k]
    return torch.zeros(score.numel(), dtype=torch.bool, device=score.device).scatter_(0, idx, True).view_as(score)


def n_m_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """True for the ``n`` lowest scores in every group of ``m`` consecutive inputs of each row (2:4 sparsity)."""
    rows, cols = score.shape
    if cols % m:
        raise UserError(f"{n}:{m} sparsity needs the input size ({cols}) to be a multiple of {m}")
    groups = score.view(rows, cols // m, m)
    idx = torch.argsort(groups, dim=-1)[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).view(rows, cols)


# ---------------------------------------------------------------------------------------------------------
# SparseGPT


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """The pruned W (rows, cols) given H (cols, cols); follows SparseGPT's ``fasterprune`` (Algorithm 1)."""
    W, H = W.clone().float(), H.clone().float()
    rows, cols = W.shape
    dead = torch.diag(H) == 0  # inputs that never fired: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        if n_m is None:  # adaptive mask for the block: the lowest w^2 / [H^-1]_ii^2 (eq. 3 of the paper)
            mask1 = unstructured_mask(W1**2 / d[None, :] ** 2, sparsity, per_row=False)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                score = W1[:, i : i + n_m[1]] ** 2 / d[i : i + n_m[1]][None, :] ** 2
                mask1[:, i : i + n_m[1]] = n_m_mask(score, *n_m)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]  # compensate with the not-yet-visited columns
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


# ---------------------------------------------------------------------------------------------------------
# Unstructured / N:M pruning of a whole model


@torch.no_grad()
def prune_model(
    model: Transformer,
    method: str,
    sparsity: float = 0.5,
    n_m: tuple[int, int] | None = None,
    calib: torch.Tensor | None = None,
    batch_size: int = 8,
    group: str | None = None,
) -> dict:
    """Prune every block's linear layers in place; returns the achieved sparsity per layer and overall.

    ``group``: which weights compete for pruning, ``row`` (each output row loses the same share) or
    ``matrix``; by default what each paper used: matrix for magnitude, row for Wanda.
    """
    group = group or ("row" if method == "wanda" else "matrix")
    if group not in ("row", "matrix"):
        raise ValueError(f"group={group!r} must be row or matrix")
    if method not in ("magnitude", "wanda", "sparsegpt"):
        raise UserError(f"unknown pruning method {method!r}; use magnitude, wanda or sparsegpt")
    if n_m is None and not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity={sparsity} must be in [0, 1)")
    if method != "magnitude" and calib is None:
        raise UserError(f"{method} needs calibration data")
    if method == "magnitude":  # no calibration: each block on its own
        for layer in model.layers:
            _prune_block(block_linears(layer), {}, method, sparsity, n_m, group)
        return sparsity_report(model)
    for _, block in block_by_block(model, calib, batch_size):
        linears = block_linears(block.layer)
        with input_stats(linears, hessian=method == "sparsegpt") as stats:  # one pass through the dense block
            for x in block.inputs:
                run_block(block.layer, x)
        _prune_block(linears, stats, method, sparsity, n_m, group)
    return sparsity_report(model)


def _prune_block(linears: dict, stats: dict, method: str, sparsity: float, n_m, group: str):
    for name, lin in linears.items():
        W = lin.weight.data.float()
        if method == "sparsegpt":
            new = sparsegpt_prune(W, stats[name].H, sparsity, n_m)
        else:
            score = W.abs()
            if method == "wanda":
                score = score * torch.sqrt(stats[name].sq).float()[None, :]
            mask = n_m_mask(score, *n_m) if n_m else unstructured_mask(score, sparsity, per_row=group == "row")
            new = W.masked_fill(mask, 0.0)
        lin.weight.data.copy_(new.to(lin.weight.dtype))


def sparsity_report(model: Transformer) -> dict:
    per_layer, zeros, total = {}, 0, 0
    for i, layer in enumerate(model.layers):
        for name, lin in block_linears(layer).items():
            z, n = int((lin.weight == 0).sum()), lin.weight.numel()
            per_layer[f"layers.{i}.{name}"] = z / n
            zeros, total = zeros + z, total + n
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {
        "linear_sparsity": zeros / total,
        "model_sparsity": all_zeros / count_params(model)["total"],
        "per_layer": per_layer,
    }


# ---------------------------------------------------------------------------------------------------------
# Structured pruning: heads and channels


def input_importance(weight: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """Wanda's |W_ij| ||X_j|| summed over a layer's outputs: one importance per input (per head dimension of
    an attention output projection, per channel of an MLP output projection)."""
    return (weight.float().abs() * sq.sqrt().float()[None, :]).sum(0)


def kept(
    groups: torch.Tensor, channels: torch.Tensor, skip: bool, head_ratio: float, ffn_ratio: float, multiple: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (sorted) of the key/value head groups and MLP channels a block keeps: all of them in a skipped
    block, else the most important (1 - ratio), channels rounded down to a multiple of ``multiple``."""
    n_g, n_c = len(groups), len(channels)
    keep_g = n_g if skip else max(1, round(n_g * (1 - head_ratio)))
    keep_c = n_c if skip else max(multiple, int(n_c * (1 - ffn_ratio)) // multiple * multiple)
    g = torch.topk(groups, keep_g).indices.sort().values
    c = torch.topk(channels, keep_c).indices.sort().values
    return g, c


def unit_rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """The indices covered by ``units`` of ``size`` consecutive entries each: the query heads of key/value
    groups (size = heads per group), the rows of heads in a projection (size = head_dim)."""
    return (units[:, None] * size + torch.arange(size, device=units.device)[None, :]).flatten()
