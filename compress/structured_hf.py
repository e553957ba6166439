"""Structured pruning of Hugging Face models: whole attention heads (whole key/value groups under GQA) and MLP
channels, optionally leaving the first/last blocks intact (as LLM-Pruner does).

Importance is the one ``prune.prune_structured`` uses for this project's models (Wanda-style: |W| times the
norm of the calibration activations, summed over each head's or channel's inputs to the output projection).
The surgery is Torch-Pruning's: ``prune_linear_out_channels`` / ``prune_linear_in_channels`` cut the rows and
columns (weights and biases) of the coupled layers. Which layers are coupled is written out per
architecture below rather than traced with Torch-Pruning's DependencyGraph, whose trace of a transformers
model did not finish here (it follows the mask and cache code as well as the weights).

Per-layer sizes differ once the first/last blocks are kept, which a transformers config cannot say, so the
folder records each changed layer's shape in ``pruned_shapes.json``; ``models.hf.load_hf`` rebuilds those
layers at their pruned sizes before loading the weights. The attention code of the supported architectures
infers the number of heads from the projections' sizes, so nothing else changes.
"""

from __future__ import annotations

import torch
import torch_pruning as tp

from common.cli import UserError
from compress.calibration import input_sq_norms
from compress.prune import input_importance, kept, unit_rows
from llama.model import count_params

# model_type -> names inside a block: the query/key/value projections (or the fused one), the attention output
# projection, the MLP's input projections and its output projection
LAYOUT = {
    "llama": {
        "q": "self_attn.q_proj",
        "kv": ("self_attn.k_proj", "self_attn.v_proj"),
        "o": "self_attn.o_proj",
        "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp_out": "mlp.down_proj",
    },
    "starcoder2": {
        "q": "self_attn.q_proj",
        "kv": ("self_attn.k_proj", "self_attn.v_proj"),
        "o": "self_attn.o_proj",
        "mlp_in": ("mlp.c_fc",),
        "mlp_out": "mlp.c_proj",
    },
    # one fused projection laid out head by head: rows [h*3*hd, (h+1)*3*hd) are head h's q, k, v
    "gpt_neox": {
        "qkv": "attention.query_key_value",
        "o": "attention.dense",
        "mlp_in": ("mlp.dense_h_to_4h",),
        "mlp_out": "mlp.dense_4h_to_h",
    },
}


def _pruned(keep: torch.Tensor, n: int) -> list[int]:
    """The indices of 0..n-1 not in ``keep``: what Torch-Pruning's functions remove."""
    keep_set = set(keep.tolist())
    return [i for i in range(n) if i not in keep_set]


@torch.no_grad()
def prune_structured_hf(
    model,
    calib: torch.Tensor,
    head_ratio: float = 0.25,
    ffn_ratio: float = 0.25,
    skip_first: int = 0,
    skip_last: int = 0,
    channel_multiple: int = 8,
    batch_size: int = 8,
):
    """Remove the least important head groups and MLP channels of every non-skipped block, in place."""
    cfg = model.hf.config
    if cfg.model_type not in LAYOUT:
        raise UserError(
            f"structured pruning of {cfg.model_type!r} models is not supported; it handles {', '.join(LAYOUT)}"
        )
    if not (0 <= head_ratio < 1 and 0 <= ffn_ratio < 1):
        raise UserError("head_ratio and ffn_ratio must be in [0, 1)")
    lay = LAYOUT[cfg.model_type]
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rep = n_heads // n_kv
    blocks = list(model.layers)
    outs = {(i, k): b.get_submodule(lay[k]) for i, b in enumerate(blocks) for k in ("o", "mlp_out")}
    sq = input_sq_norms(model, outs, calib, batch_size)

    before = count_params(model)["total"]
    sizes = []
    for i, block in enumerate(blocks):
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
        if len(channels) < n_ch:
            for name in lay["mlp_in"]:
                tp.prune_linear_out_channels(block.get_submodule(name), _pruned(channels, n_ch))
            tp.prune_linear_in_channels(down, _pruned(channels, n_ch))
        sizes.append({"heads": len(heads), "kv_heads": len(groups), "mlp_channels": len(channels)})
    return model, {"params_before": before, "params_after": count_params(model)["total"], "layers": sizes}


def pruned_shapes(model) -> dict[str, list[int]]:
    """{name: [out_features, in_features]} of every linear layer whose size differs from what the config
    implies (for ``pruned_shapes.json``)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(model.hf.config)
    ref = dict(reference.named_modules())
    out = {}
    for name, m in model.hf.named_modules():
        if isinstance(m, torch.nn.Linear) and name in ref and tuple(m.weight.shape) != tuple(ref[name].weight.shape):
            out[name] = [m.out_features, m.in_features]
    return out
