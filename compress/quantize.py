"""Quantization, applied from outside the model by swapping or converting its linear layers.

Schemes:
- ``bf16``, ``fp16``: casts of all weights;
- ``int8-dynamic``: PyTorch's dynamic int8 quantization of nn.Linear (int8 weights, activations quantized on
  the fly; CPU kernels);
- ``torchao-int8-weight``, ``torchao-int8-dynamic``, ``torchao-int4-weight``: torchao's
  Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig and Int4WeightOnlyConfig (int4: on CUDA in
  tinygemm's layout, PyTorch's own kernel; elsewhere it needs torchao's extra kernel package, and without it
  the scheme reports why it is unavailable);
- ``bnb-nf4``, ``bnb-int8``: bitsandbytes Linear4bit (NF4) and Linear8bitLt, CUDA only.
Embeddings stay in their dtype; every nn.Linear (the output head included) is quantized.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from common.cli import UserError

SCHEMES = (
    "bf16",
    "fp16",
    "int8-dynamic",
    "torchao-int8-weight",
    "torchao-int8-dynamic",
    "torchao-int4-weight",
    "bnb-nf4",
    "bnb-int8",
)


# Schemes whose activation quantization range is taken over the whole input tensor (PyTorch's dynamic int8:
# one per-tensor scale), so one sequence's outputs depend on the others batched with it. Evaluators run
# these one sequence at a time; torchao's dynamic int8 uses per-token scales and is batch-independent.
BATCH_DEPENDENT_SCHEMES = ("int8-dynamic",)


class QuantizationUnavailable(ValueError):
    pass


def _needs_cuda(scheme: str, device: torch.device):
    if device.type != "cuda":
        raise QuantizationUnavailable(f"{scheme} needs a CUDA device; run it on a GPU (bitsandbytes kernels)")


def _bnb_swap(model: nn.Module, scheme: str) -> nn.Module:
    import bitsandbytes as bnb

    device = model.tok_embeddings.weight.device
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if scheme == "bnb-nf4":
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16
                )
                new.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False, has_fp16_weights=False)
                new.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
            setattr(parent, name, new.to(device))  # moving to the GPU quantizes the weights
    return model


def quantize(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize ``model`` in place (or return the quantized copy PyTorch's dynamic quantization makes)."""
    device = model.tok_embeddings.weight.device
    if scheme == "bf16":
        return model.to(torch.bfloat16)
    if scheme == "fp16":
        return model.to(torch.float16)
    if scheme == "int8-dynamic":
        if device.type != "cpu":
            raise QuantizationUnavailable("int8-dynamic uses PyTorch's CPU kernels; use --device cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of torchao, still the CPU reference path
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    if scheme.startswith("torchao-"):
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )

        config = {
            "torchao-int8-weight": Int8WeightOnlyConfig,
            "torchao-int8-dynamic": Int8DynamicActivationInt8WeightConfig,
            "torchao-int4-weight": Int4WeightOnlyConfig,
        }[scheme]()
        if scheme == "torchao-int4-weight" and device.type == "cuda":
            # tinygemm's layout runs on PyTorch's own CUDA int4 kernel; torchao's default layout needs its
            # separate kernel package (mslk)
            config = Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")
        if scheme == "torchao-int4-weight":
            model = model.to(torch.bfloat16)
        try:
            quantize_(model, config)
        except ImportError as e:
            raise QuantizationUnavailable(f"{scheme} is unavailable here: {e}") from None
        return model
    if scheme in ("bnb-nf4", "bnb-int8"):
        _needs_cuda(scheme, device)
        return _bnb_swap(model, scheme)
    raise UserError(f"unknown quantization scheme {scheme!r}; use one of {SCHEMES}")
