"""2:4-pruned weights on the GPU's sparse tensor cores: a runtime form of a model compress/prune.py made."""

from __future__ import annotations

import torch
from torch import nn

from common.cli import UserError
from llama.model import Transformer
from models.layout import block_linears, check_n_m


def to_semi_structured(model: Transformer) -> int:
    """On CUDA, store 2:4-pruned fp16/bf16 linear weights as ``SparseSemiStructuredTensor`` so the matmuls
    use the sparse tensor cores; returns how many layers were converted. Whether it is faster is measured,
    not assumed (eval.efficiency --sparse-2of4)."""
    from torch.sparse import to_sparse_semi_structured

    if not torch.cuda.is_available() or model.tok_embeddings.weight.device.type != "cuda":
        raise UserError("2:4 semi-structured kernels need a CUDA device")
    converted = 0
    for layer in model.layers:
        for lin in block_linears(layer).values():
            if lin.weight.dtype in (torch.float16, torch.bfloat16) and check_n_m(lin.weight):
                lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.data), requires_grad=False)
                converted += 1
    return converted
