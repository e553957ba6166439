"""The interface every causal language model of the project offers, and what may be asked of it.

Two implementations: this project's ``llama.model.Transformer`` (family ``perhead-llama``) and the Hugging Face
wrapper ``models.hf.HFModel`` (family = the transformers ``model_type``: llama, gpt_neox, gpt2, starcoder2),
with their tokenizers (``Tokenizer``: SentencePiece's and transformers'). Everything above this layer
(compression, runtimes, evaluation, serving) uses a model through ``CausalLM`` and asks ``capabilities(model)``
what it can do; what differs by family is defined once per family (models/families.py), never by a branch on
its name or class. Where a capability is missing, ``require`` stops the command with one line.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from common.cli import UserError
from llama.model import ModelArgs
from models.families import Capabilities, family_of
from models.hf import HFParams


@runtime_checkable
class CausalLM(Protocol):
    """What every model offers."""

    family: str  # "perhead-llama" or a transformers model_type: its definition is models.families.FAMILIES'
    params: ModelArgs | HFParams  # both say n_layers, vocab_size, max_seq_len, head_layer
    layers: nn.ModuleList  # the blocks, in order
    tok_embeddings: nn.Embedding

    def __call__(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) tokens -> (B, T, V) logits ((B, 1, V) with ``last_only``; (N, V) for the N True positions of a
        (B, T) boolean ``keep``, in row order); with a cache (setup_caches), ``input_pos`` are their positions."""

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None: ...

    def clear_caches(self) -> None: ...


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer offers (``llama.tokenizer.Tokenizer``, SentencePiece; ``models.hf.HFTokenizer``)."""

    bos_id: int  # the token a document is scored after (EOS where the tokenizer has no BOS)
    eos_id: int | None
    vocab_size: int
    cleans_spaces: bool  # decoding removes the space before punctuation (" ." -> "."): a stream holds spaces back
    chat_template: str | None  # None: no chat format

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def chat_ids(self, messages: list[dict]) -> list[int]: ...

    def token_bytes(self) -> np.ndarray: ...


NEEDS = {  # capability -> what it means, for the one-line error
    "static_cache": "a static KV cache (this project's models)",
    "export": "an export through torch.export (this project's models)",
    "trainable": "this project's trainer",
    "structured_pruning": "a known block layout (this project's models, Llama, GPT-NeoX, Starcoder2)",
}


def capabilities(model: CausalLM) -> Capabilities:
    return family_of(model).capabilities


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
    the model's own record of its depth and per-layer sizes follows (its family's ``keep_blocks``)."""
    family_of(model).keep_blocks(model, kept_layers(model.params.n_layers, drop))
    return model


def block_layout(model: CausalLM) -> dict:
    """Where the parts of a block are that structured pruning removes rows and columns of."""
    require(model, "structured_pruning", "structured pruning")
    return family_of(model).layout


def head_counts(model: CausalLM, block: int) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of one block as it is now (after pruning, blocks differ)."""
    return family_of(model).head_counts(model, block)


def resized(model: CausalLM, sizes: list[dict]):
    """After structured pruning changed blocks in place: the model's own record of its per-layer sizes."""
    family_of(model).record_sizes(model, sizes)


def lora_targets(model: CausalLM) -> list[str]:
    """The family's default LoRA targets (LLM-Pruner's: the attention and MLP projections of every block)."""
    return list(family_of(model).lora_targets)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as they are in memory, serialized (torch.save of the state dict): counts
    packed int8/int4/NF4 storage and quantization scales, which parameter counts times element sizes would
    miss. This is not the size of a model folder on disk (llama.model_io's ``model_file_bytes``: int4 and
    bitsandbytes models are stored unquantized); results name the two ``memory_bytes`` and ``disk_bytes``."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()
