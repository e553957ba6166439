"""The interface every causal language model of the project offers, and what may be asked of it.

Two implementations: this project's ``llama.model.Transformer`` (family ``perhead-llama``) and the Hugging Face
wrapper ``models.hf.HFModel`` (family = the transformers ``model_type``: llama, gpt_neox, gpt2, starcoder2).
Everything above this layer (compression, runtimes, evaluation, serving) uses a model through ``CausalLM`` and
asks ``capabilities(model)`` what it can do; behaviour follows the model's ``family`` field and the tables
below, never its class. Where a capability is missing, ``require`` stops the command with one line.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from common.cli import UserError


class CausalLM(Protocol):
    """What every model offers."""

    family: str  # "perhead-llama" or a transformers model_type
    params: Any  # n_layers, vocab_size, max_seq_len, head_layer (ModelArgs, or models.hf.HFParams)
    layers: nn.ModuleList  # the blocks, in order
    tok_embeddings: nn.Embedding

    def __call__(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """(B, T) tokens -> (B, T, V) logits ((B, 1, V) with ``last_only``); with a cache (setup_caches),
        ``input_pos`` are their positions."""

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None: ...

    def clear_caches(self) -> None: ...


@dataclass(frozen=True)
class Capabilities:
    family: str
    static_cache: bool  # a fixed-size KV cache, so torch.compile and CUDA graphs can capture a decode step
    export: bool  # exports through torch.export (ONNX Runtime / OpenVINO decoding, AOTInductor)
    trainable: bool  # this project's trainer trains it (recovery after compression: compress/recover.py)
    structured_pruning: bool  # whole heads and MLP channels can be removed (compress.structured)


# transformers models: a growing cache, exported by nobody here, trained here only to recover after compression
_TRANSFORMERS = {"static_cache": False, "export": False, "trainable": True}
CAPABILITIES = {
    "perhead-llama": Capabilities("perhead-llama", True, True, True, structured_pruning=True),
    "llama": Capabilities("llama", **_TRANSFORMERS, structured_pruning=True),
    "gpt_neox": Capabilities("gpt_neox", **_TRANSFORMERS, structured_pruning=True),
    "starcoder2": Capabilities("starcoder2", **_TRANSFORMERS, structured_pruning=True),
    "gpt2": Capabilities("gpt2", **_TRANSFORMERS, structured_pruning=False),  # Conv1D layers: no layout here
}

NEEDS = {  # capability -> what it means, for the one-line error
    "static_cache": "a static KV cache (this project's models)",
    "export": "an export through torch.export (this project's models)",
    "trainable": "this project's trainer",
    "structured_pruning": "a known block layout (this project's models, Llama, GPT-NeoX, Starcoder2)",
}


def capabilities(model: CausalLM) -> Capabilities:
    return CAPABILITIES[model.family]


def require(model: CausalLM, capability: str, doing: str):
    """Stop in one line where ``model`` lacks ``capability`` for ``doing``."""
    if not getattr(capabilities(model), capability):
        raise UserError(f"{doing} needs {NEEDS[capability]}; a {model.family} model does not have it")


# ---------------------------------------------------------------------------------------------------------
# Blocks


def kept_layers(n_layers: int, drop: list[int]) -> list[int]:
    """The block indices left after dropping ``drop`` (checked: real indices, at least one block left)."""
    drop = sorted(set(drop))
    if any(not 0 <= i < n_layers for i in drop):
        raise UserError(f"layers to drop {drop} must be in 0..{n_layers - 1}")
    if len(drop) >= n_layers:
        raise UserError(f"cannot drop all {n_layers} layers; keep at least one")
    return [i for i in range(n_layers) if i not in drop]


def drop_blocks(model: CausalLM, drop: list[int]) -> CausalLM:
    """``model`` without the blocks in ``drop`` (in place): the blocks are removed from the model's list and
    the model's own record of its depth and per-layer sizes follows (KEPT_BLOCKS, by family)."""
    keep = kept_layers(model.params.n_layers, drop)
    KEPT_BLOCKS.get(model.family, _keep_hf_blocks)(model, keep)
    return model


def _keep_project_blocks(model, keep: list[int]):
    a = model.params

    def per_layer(sizes):
        return None if sizes is None else [sizes[i] for i in keep]

    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    model.params = dataclasses.replace(
        a,
        n_layers=len(keep),
        layer_n_heads=per_layer(a.layer_n_heads),
        layer_n_kv_heads=per_layer(a.layer_n_kv_heads),
        layer_ffn_hidden_dim=per_layer(a.layer_ffn_hidden_dim),
    )


def _keep_hf_blocks(model, keep: list[int]):
    kept = nn.ModuleList([model.layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for m in layer.modules():  # each attention finds its slot in the KV cache by its layer index
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_index
    model.hf.set_submodule(model.blocks_path, kept)
    cfg = model.hf.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]


KEPT_BLOCKS = {"perhead-llama": _keep_project_blocks}  # every other family is a transformers model


# ---------------------------------------------------------------------------------------------------------
# The parts of a block that structured pruning removes rows and columns of, by family: the query/key/value
# projections (or one fused projection laid out head by head), the attention output projection, the MLP's
# input projections and its output projection, and this project's per-head layers (stacked per head).

LAYOUT = {
    "perhead-llama": {
        "q": "attention.wq",
        "kv": ("attention.wk", "attention.wv"),
        "o": "attention.wo",
        "mlp_in": ("feed_forward.w1", "feed_forward.w3"),
        "mlp_out": "feed_forward.w2",
        "per_head": "attention.head_layer",
        "gate": "attention.wg",  # gated attention's projection (None in a model without the gate)
    },
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


def block_layout(model: CausalLM) -> dict:
    require(model, "structured_pruning", "structured pruning")
    return LAYOUT[model.family]


def head_counts(model: CausalLM, block: int) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of one block as it is now (after pruning, blocks differ)."""
    if model.family == "perhead-llama":
        att = model.layers[block].attention
        return att.n_heads, att.n_kv_heads, att.head_dim
    cfg = model.hf.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    return n_heads, n_kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads


def resized(model: CausalLM, sizes: list[dict]):
    """After structured pruning changed blocks in place: the model's own record of its per-layer sizes. This
    project's attention reads its head counts from attributes and its args say every layer's sizes; a
    transformers model infers heads from the projections, and its folder records the shapes at save."""
    if model.family != "perhead-llama":
        return
    for layer, s in zip(model.layers, sizes, strict=True):
        layer.attention.n_heads, layer.attention.n_kv_heads = s["heads"], s["kv_heads"]
    model.params = dataclasses.replace(
        model.params,
        layer_n_heads=[s["heads"] for s in sizes],
        layer_n_kv_heads=[s["kv_heads"] for s in sizes],
        layer_ffn_hidden_dim=[s["mlp_channels"] for s in sizes],
    )


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as they are in memory, serialized (torch.save of the state dict): counts
    packed int8/int4/NF4 storage and quantization scales, which parameter counts times element sizes would
    miss. This is not the size of a model folder on disk: quantized models are stored unquantized (see
    compress.quantize's ``model_file_bytes``); results name the two ``memory_bytes`` and ``disk_bytes``."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()
