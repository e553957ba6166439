"""Structured pruning: remove whole attention heads (whole key/value groups under GQA) and MLP channels, leaving
the first/last blocks intact if asked (as LLM-Pruner does). One path for every family with a known block
layout (each family's ``layout``, models/families.py: this project's models, Llama, GPT-NeoX, Starcoder2).

Importance is Wanda-style (|W| times the norm of the calibration activations), summed over each head's or
channel's inputs to the attention or MLP output projection. The surgery is Torch-Pruning's:
``prune_linear_out_channels`` / ``prune_linear_in_channels`` cut the rows and columns (weights and biases) of
the coupled layers, in place; this project's per-head layers lose the same heads. Which layers are coupled
comes from the layout rather than Torch-Pruning's DependencyGraph, whose trace of a transformers model did not
finish here (it follows the mask and cache code as well as the weights).

Blocks then differ in size: this project's models record it in their arguments (``models.interface.resized``);
a transformers folder records each changed layer's shape in ``pruned_shapes.json`` (``models.hf.pruned_shapes``), which
``models.hf.load_hf`` reads back.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from common.cli import UserError
from compress.calibration import input_sq_norms
from compress.prune import input_importance, kept, unit_rows
from llama.model import count_params
from models.interface import block_layout, head_counts, resized


def _pruned(keep: torch.Tensor, n: int) -> list[int]:
    """The indices of 0..n-1 not in ``keep``: what Torch-Pruning's functions remove."""
    keep_set = set(keep.tolist())
    return [i for i in range(n) if i not in keep_set]


def _optional(block: nn.Module, path: str | None) -> nn.Module | None:
    """The submodule at ``path`` in ``block``, or None where the layout has no such part or this block's model
    was built without it (a plain block's ``head_layer`` and ``wg`` are None)."""
    if not path:
        return None
    parent, _, attr = path.rpartition(".")
    return getattr(block.get_submodule(parent) if parent else block, attr, None)


@torch.no_grad()
def prune_structured(
    model,
    calib: torch.Tensor,
    head_ratio: float = 0.25,
    ffn_ratio: float = 0.25,
    skip_first: int = 0,
    skip_last: int = 0,
    channel_multiple: int = 8,
    batch_size: int = 8,
):
    """Remove the least important head groups and MLP channels of every non-skipped block, in place; returns
    the model and a report (parameters before and after, each block's heads, key/value heads and channels)."""
    lay = block_layout(model)  # one line where the family has no known layout (GPT-2)
    if not (0 <= head_ratio < 1 and 0 <= ffn_ratio < 1):
        raise UserError("head_ratio and ffn_ratio must be in [0, 1)")
    blocks = list(model.layers)
    outs = {(i, k): b.get_submodule(lay[k]) for i, b in enumerate(blocks) for k in ("o", "mlp_out")}
    sq = input_sq_norms(model.eval(), outs, calib, batch_size)

    before = count_params(model)["total"]
    sizes = []
    for i, block in enumerate(blocks):
        n_heads, n_kv, hd = head_counts(model, i)
        rep = n_heads // n_kv
        skip = i < skip_first or i >= len(blocks) - skip_last
        o, down = outs[(i, "o")], outs[(i, "mlp_out")]
        per_group = input_importance(o.weight, sq[(i, "o")]).view(n_kv, rep * hd).sum(-1)
        per_channel = input_importance(down.weight, sq[(i, "mlp_out")])
        n_ch = down.in_features
        groups, channels = kept(per_group, per_channel, skip, head_ratio, ffn_ratio, channel_multiple)
        heads = unit_rows(groups, rep)

        if len(groups) < n_kv:
            if "qkv" in lay:  # GPT-NeoX: no GQA, one fused projection
                qkv = block.get_submodule(lay["qkv"])
                tp.prune_linear_out_channels(qkv, _pruned(unit_rows(heads, 3 * hd), qkv.out_features))
            else:
                q = block.get_submodule(lay["q"])
                tp.prune_linear_out_channels(q, _pruned(unit_rows(heads, hd), q.out_features))
                for name in lay["kv"]:
                    kv = block.get_submodule(name)
                    tp.prune_linear_out_channels(kv, _pruned(unit_rows(groups, hd), kv.out_features))
            tp.prune_linear_in_channels(o, _pruned(unit_rows(heads, hd), o.in_features))
            per_head = _optional(block, lay.get("per_head"))
            if per_head is not None:  # this project's per-head layers: (H, Dh, Dm) and (H, Dm, Dh), by head
                per_head.w1 = nn.Parameter(per_head.w1.data[heads].clone())
                per_head.w2 = nn.Parameter(per_head.w2.data[heads].clone())
            gate = _optional(block, lay.get("gate"))
            if gate is not None:  # gated attention: rows of wg are laid out head by head, like wq's
                width = gate.out_features // n_heads  # head_dim (elementwise) or 1 (headwise)
                tp.prune_linear_out_channels(gate, _pruned(unit_rows(heads, width), gate.out_features))
            head_norm = _optional(block, lay.get("head_norm"))
            if head_norm is not None:  # per-head RMSNorm: its flat gains are laid out head by head, like wo's inputs
                head_norm.weight = nn.Parameter(head_norm.weight.data[unit_rows(heads, hd)].clone())
        if len(channels) < n_ch:
            for name in lay["mlp_in"]:
                tp.prune_linear_out_channels(block.get_submodule(name), _pruned(channels, n_ch))
            tp.prune_linear_in_channels(down, _pruned(channels, n_ch))
        sizes.append({"heads": len(heads), "kv_heads": len(groups), "mlp_channels": len(channels)})
    resized(model, sizes)
    return model, {"params_before": before, "params_after": count_params(model)["total"], "layers": sizes}
