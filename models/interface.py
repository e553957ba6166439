"""The interface every causal language model of the project offers (this project's ``Transformer`` and the
Hugging Face wrapper ``models.hf.HFModel``), and what may be asked of it."""

from __future__ import annotations

from common.cli import UserError


def kept_layers(n_layers: int, drop: list[int]) -> list[int]:
    """The block indices left after dropping ``drop`` (checked: real indices, at least one block left)."""
    drop = sorted(set(drop))
    if any(not 0 <= i < n_layers for i in drop):
        raise UserError(f"layers to drop {drop} must be in 0..{n_layers - 1}")
    if len(drop) >= n_layers:
        raise UserError(f"cannot drop all {n_layers} layers; keep at least one")
    return [i for i in range(n_layers) if i not in drop]
