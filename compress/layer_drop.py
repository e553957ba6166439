"""Layer dropping: remove whole transformer blocks, the last ones or those that change their input least.

Two published scores of how much a block changes its input, from the cosine between each token's hidden
state before and after the block on calibration data:
- ``bi``: ShortGPT's Block Influence (Men et al., 2024), 1 - mean cos;
- ``angular``: the mean angular distance arccos(cos) / pi (Gromov et al., 2024 use it between blocks).
Per token the two are monotone in each other, but their means over tokens can order blocks differently
(cosines {1, 0} against {0.6, 0.6}), so each is offered under its own name.
"""

from __future__ import annotations

import torch

from common.cli import UserError
from compress.calibration import block_by_block
from llama.model import Transformer

SCORES = ("angular", "bi")


def block_scores(cos: torch.Tensor) -> dict[str, float]:
    """Both scores of one block from its tokens' cosines between block input and output."""
    cos = cos.double().clamp(-1, 1)
    return {"angular": (torch.arccos(cos) / torch.pi).mean().item(), "bi": 1.0 - cos.mean().item()}


@torch.no_grad()
def block_cosines(model: Transformer, calib: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Per block, cos(block input, block output) of every calibration token."""
    out = []
    for _, block in block_by_block(model, calib, batch_size):
        pairs = zip(block.inputs, block.outputs(), strict=True)
        out.append(torch.cat([torch.nn.functional.cosine_similarity(x.h, o, dim=-1).flatten() for x, o in pairs]))
    return out


def block_importance(model: Transformer, calib: torch.Tensor, score: str = "angular") -> list[float]:
    if score not in SCORES:
        raise UserError(f"unknown block score {score!r}; use one of {SCORES}")
    return [block_scores(c)[score] for c in block_cosines(model, calib)]


def angular_distances(model: Transformer, calib: torch.Tensor) -> list[float]:
    return block_importance(model, calib, "angular")


def choose_layers(model: Transformer, k: int, method: str = "last", calib: torch.Tensor | None = None) -> list[int]:
    """Which ``k`` blocks to drop: the last ``k``, or the ``k`` that change their input least by a score."""
    L = model.params.n_layers
    if method == "last":
        return list(range(L - k, L))
    if method in SCORES:
        if calib is None:
            raise UserError(f"{method} layer selection needs calibration data")
        d = block_importance(model, calib, method)
        return sorted(sorted(range(L), key=lambda i: d[i])[:k])
    raise UserError(f"unknown layer selection {method!r}; use last, {' or '.join(SCORES)}")
