"""What differs from one model family to another, each family defined in one place (as torchtitan bundles a
model's spec): what it can do, where the parts of its blocks are (structured pruning), its default LoRA
targets, how blocks are dropped and how per-layer sizes are recorded after pruning, and how its folder is
written. ``family_of(model)`` gives a model's family; nothing above this layer branches on a family's name.

Two kinds: this project's ``llama.model.Transformer`` (``ProjectLlama``) and the transformers models behind
``models.hf.HFModel`` (``Transformers``, one per supported ``model_type``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from common.cli import UserError
from llama.model_io import write_model_files
from models.hf import save_hf


@dataclass(frozen=True)
class Capabilities:
    static_cache: bool  # a fixed-size KV cache, so torch.compile and CUDA graphs can capture a decode step
    export: bool  # exports through torch.export (ONNX Runtime / OpenVINO decoding, AOTInductor)
    trainable: bool  # this project's trainer trains it (recovery after compression: compress/recover.py)
    structured_pruning: bool  # whole heads and MLP channels can be removed (compress.structured)
    # a transformers model whose forward takes a prepared 4D attention mask as it is (masking_utils passes one
    # on unchanged) and reads positions from position_ids alone (not ALiBi from the 2D mask): runtime.batching
    # hands each batched step its mask so (tested against the family's own generate)
    prepared_mask: bool = False


@dataclass(frozen=True)
class Family:
    """One family's definition. ``layout`` names the parts of a block that structured pruning removes rows and
    columns of: the query/key/value projections (or ``qkv``, one fused projection laid out head by head), the
    attention output, the MLP's input projections and its output, and this project's per-head layers and
    attention gate; None where no layout is known (structured pruning then refuses the model)."""

    name: str
    capabilities: Capabilities
    lora_targets: tuple[str, ...]  # LLM-Pruner's: the attention and MLP projections of every block
    layout: dict | None = field(default=None, hash=False)

    def keep_blocks(self, model, keep: list[int]) -> None:
        """Keep only the blocks ``keep`` (in place), and the model's own record of its depth."""
        raise NotImplementedError

    def head_counts(self, model, block: int) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim) of one block as it is now."""
        raise NotImplementedError

    def record_sizes(self, model, sizes: list[dict]) -> None:
        """After structured pruning changed blocks in place: the model's own record of its per-layer sizes."""
        raise NotImplementedError

    def save(self, model, tokenizer, out: Path) -> None:
        """The model and its tokenizer into ``out`` (a folder being written), in the family's own format."""
        raise NotImplementedError


class ProjectLlama(Family):
    """This project's Llama-2 with optional per-head layers and attention gate (llama/model.py)."""

    def keep_blocks(self, model, keep):
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

    def head_counts(self, model, block):
        att = model.layers[block].attention
        return att.n_heads, att.n_kv_heads, att.head_dim

    def record_sizes(self, model, sizes):
        # the attention reads its head counts from attributes, and the args say every layer's sizes
        for layer, s in zip(model.layers, sizes, strict=True):
            layer.attention.n_heads, layer.attention.n_kv_heads = s["heads"], s["kv_heads"]
        model.params = dataclasses.replace(
            model.params,
            layer_n_heads=[s["heads"] for s in sizes],
            layer_n_kv_heads=[s["kv_heads"] for s in sizes],
            layer_ffn_hidden_dim=[s["mlp_channels"] for s in sizes],
        )

    def save(self, model, tokenizer, out):
        write_model_files(model, out, tokenizer=tokenizer.path)


class Transformers(Family):
    """A transformers model (models/hf.py): transformers' own code runs it; a growing cache, exported by
    nobody here, trained here only to recover after compression."""

    def keep_blocks(self, model, keep):
        model.keep_blocks(keep)

    def head_counts(self, model, block):
        return model.head_counts(block)

    def record_sizes(self, model, sizes):
        pass  # transformers infers heads from the projections; the folder records the shapes at save

    def save(self, model, tokenizer, out):
        save_hf(model, tokenizer, out)


_HF = Capabilities(static_cache=False, export=False, trainable=True, structured_pruning=True, prepared_mask=True)
_LLAMA_ATTENTION = {"q": "self_attn.q_proj", "kv": ("self_attn.k_proj", "self_attn.v_proj"), "o": "self_attn.o_proj"}

FAMILIES = {
    f.name: f
    for f in (
        ProjectLlama(
            "perhead-llama",
            Capabilities(static_cache=True, export=True, trainable=True, structured_pruning=True),
            ("wq", "wk", "wv", "wo", "w1", "w2", "w3"),
            {
                "q": "attention.wq",
                "kv": ("attention.wk", "attention.wv"),
                "o": "attention.wo",
                "mlp_in": ("feed_forward.w1", "feed_forward.w3"),
                "mlp_out": "feed_forward.w2",
                "per_head": "attention.head_layer",
                "gate": "attention.wg",  # gated attention's projection (None in a model without the gate)
                "head_norm": "attention.head_norm",  # per-head RMSNorm's gains, head by head (None without it)
            },
        ),
        Transformers(
            "llama",
            _HF,
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            _LLAMA_ATTENTION | {"mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "mlp_out": "mlp.down_proj"},
        ),
        Transformers(
            "starcoder2",
            _HF,
            ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
            _LLAMA_ATTENTION | {"mlp_in": ("mlp.c_fc",), "mlp_out": "mlp.c_proj"},
        ),
        Transformers(
            "gpt_neox",
            _HF,
            ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            # one fused projection laid out head by head: rows [h*3*hd, (h+1)*3*hd) are head h's q, k, v
            {
                "qkv": "attention.query_key_value",
                "o": "attention.dense",
                "mlp_in": ("mlp.dense_h_to_4h",),
                "mlp_out": "mlp.dense_4h_to_h",
            },
        ),
        # GPT-2's Conv1D layers (nn.Linear here) have no layout written for them: no structured pruning
        Transformers("gpt2", dataclasses.replace(_HF, structured_pruning=False), ("c_attn", "c_proj", "c_fc")),
    )
}


def family_of(model) -> Family:
    try:
        return FAMILIES[model.family]
    except KeyError:
        raise UserError(f"no family definition for a {model.family} model; known: {sorted(FAMILIES)}") from None
