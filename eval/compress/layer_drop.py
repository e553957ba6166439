"""Layer dropping: remove whole transformer blocks, the last ones or those that change their input least.

ShortGPT (Men et al., 2024) ranks blocks by Block Influence, 1 - cos(input, output) of the hidden state;
we report the angular distance arccos(cos) / pi, which orders blocks the same way (Gromov et al., 2024).
"""

from __future__ import annotations

import dataclasses

import torch

from eval.compress.calibration import block_inputs, run_block
from llama.model import Transformer
from training.checkpoint import model_from_state_dict


def drop_layers(model: Transformer, drop: list[int]) -> Transformer:
    """A new, smaller model without the blocks in ``drop``; everything else is copied unchanged."""
    L = model.params.n_layers
    drop = sorted(set(drop))
    if any(not 0 <= i < L for i in drop):
        raise ValueError(f"layers to drop {drop} must be in 0..{L - 1}")
    if len(drop) >= L:
        raise ValueError(f"cannot drop all {L} layers; keep at least one")
    keep = [i for i in range(L) if i not in drop]
    a = model.params

    def per_layer(sizes):
        return None if sizes is None else [sizes[i] for i in keep]

    args = dataclasses.replace(
        a,
        n_layers=len(keep),
        layer_n_heads=per_layer(a.layer_n_heads),
        layer_n_kv_heads=per_layer(a.layer_n_kv_heads),
        layer_ffn_hidden_dim=per_layer(a.layer_ffn_hidden_dim),
    )
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            if int(i) in keep:
                sd[f"layers.{keep.index(int(i))}.{rest}"] = v
        else:
            sd[k] = v
    return model_from_state_dict(args, {k: v.clone() for k, v in sd.items()})


@torch.no_grad()
def angular_distances(model: Transformer, calib: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Mean over calibration tokens of arccos(cos(block input, block output)) / pi, per block."""
    model.eval()
    hs = block_inputs(model, calib, batch_size)
    out = []
    for layer in model.layers:
        total, count, nxt = 0.0, 0, []
        for h in hs:
            o = run_block(layer, h, model.params)
            cos = torch.nn.functional.cosine_similarity(h, o, dim=-1).clamp(-1, 1)
            total += (torch.arccos(cos) / torch.pi).sum().item()
            count += cos.numel()
            nxt.append(o)
        out.append(total / count)
        hs = nxt
    return out


def choose_layers(model: Transformer, k: int, method: str = "last", calib: torch.Tensor | None = None) -> list[int]:
    """Which ``k`` blocks to drop: the last ``k``, or the ``k`` with the smallest angular distance."""
    L = model.params.n_layers
    if method == "last":
        return list(range(L - k, L))
    if method == "angular":
        if calib is None:
            raise ValueError("angular layer selection needs calibration data")
        d = angular_distances(model, calib)
        return sorted(sorted(range(L), key=lambda i: d[i])[:k])
    raise ValueError(f"unknown layer selection {method!r}; use last or angular")
