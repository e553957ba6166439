"""Quantization, applied from outside the model by swapping or converting its linear layers; one class per
scheme, as gpt-fast's quantization handlers: ``convert`` quantizes a model's weights, ``prepare`` gives a model
the quantized layers' structure without computing anything from its weights (to load stored quantized weights
into), and ``save``/``load`` write and read the tensors it stores.

Schemes:
- ``bf16``, ``fp16``: casts of all weights (stored in that dtype, in safetensors);
- ``int8-dynamic``: PyTorch's dynamic int8 quantization of nn.Linear (int8 weights, activations quantized on
  the fly; CPU kernels);
- ``torchao-int8-weight``, ``torchao-int8-dynamic``, ``torchao-int4-weight``: torchao's
  Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig and Int4WeightOnlyConfig (int4: on CUDA in
  tinygemm's layout, PyTorch's own kernel; elsewhere it needs torchao's extra kernel package, and without it
  the scheme reports why it is unavailable);
- ``bnb-nf4``, ``bnb-int8``: bitsandbytes Linear4bit (NF4) and Linear8bitLt, CUDA only.
Embeddings stay in their dtype; every nn.Linear (the output head included) is quantized.

Stored: the casts and the int8 schemes are saved quantized, once (``quantized.safetensors`` for the casts;
``quantized.pt`` for packed int8 weights and their scales, which safetensors cannot hold, read back with
``torch.load(weights_only=True)``), so a folder's size on disk is the quantized model's. int4 and bitsandbytes
(CUDA only, not verifiable here) keep the unquantized weights and are quantized again at every load;
compression.json's ``stored`` says which.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from common.cli import UserError
from llama.model_io import QUANTIZED_PT, QUANTIZED_SAFETENSORS


class QuantizationUnavailable(ValueError):
    pass


class Scheme:
    name = ""
    # activation quantization ranges over the whole input tensor (one per-tensor scale), so one sequence's
    # outputs depend on the others batched with it: evaluators run such a scheme one sequence at a time
    batch_dependent = False
    file: str | None = None  # what the folder stores the quantized weights in; None: unquantized, quantized at load

    def available(self, device: torch.device) -> None:
        """Raise QuantizationUnavailable where this scheme cannot run on ``device``."""

    def convert(self, model: nn.Module) -> nn.Module:
        """Quantize ``model``'s weights (in place, or a quantized copy)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` (the folder's shapes, its weights not loaded: on the meta device for this project's models)
        with the quantized layers' structure, ready for the stored weights; whatever it computes from the
        weights it finds is replaced by the load."""
        return self.convert(model)

    def save(self, model: nn.Module, folder: Path) -> Path:
        path = folder / self.file
        torch.save(model.state_dict(), path)
        return path

    def load(self, skeleton: nn.Module, folder: Path, device: torch.device) -> nn.Module:
        """The stored quantized weights in ``skeleton`` (models.folders.load_skeleton: the folder's shapes), every
        stored tensor checked against what the scheme makes of the folder's model (``check_state``)."""
        path = folder / self.file
        try:
            state = torch.load(path, map_location=device, weights_only=True)  # never runs a pickle's code
        except Exception as e:
            raise UserError(
                f"{path} is damaged or not a saved {self.name} model ({type(e).__name__}); quantize its base again"
            ) from None
        model = self.prepare(skeleton)
        check_state(model.state_dict(), state, path, self.name)
        return assign(model, state, path)


class Cast(Scheme):
    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype, self.file = name, dtype, QUANTIZED_SAFETENSORS

    def convert(self, model):
        return model.to(self.dtype)

    def save(self, model, folder):
        from safetensors.torch import save_model

        path = folder / self.file
        save_model(model, str(path))  # shared tensors (a tied output head) stored once
        return path

    def load(self, skeleton, folder, device):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = folder / self.file
        try:
            state = load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is damaged or not a saved {self.name} model ({type(e).__name__})") from None
        model = skeleton.to(self.dtype)
        check_state(model.state_dict(), state, path, self.name)
        return assign(model, state, path)


class DynamicInt8(Scheme):
    name, batch_dependent, file = "int8-dynamic", True, QUANTIZED_PT

    def available(self, device):
        if device.type != "cpu":
            raise QuantizationUnavailable("int8-dynamic uses PyTorch's CPU kernels; use --device cpu")

    def convert(self, model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of torchao, still the CPU reference path
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)

    def prepare(self, model):
        # quantize_dynamic reads the weights (impossible on meta): swap in empty dynamic int8 layers instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        bias = child.bias is not None
                        setattr(parent, name, DynamicLinear(child.in_features, child.out_features, bias_=bias))
        return model


class TorchAO(Scheme):
    def __init__(self, name: str, config: str, stored: bool):
        self.name, self.config, self.file = name, config, QUANTIZED_PT if stored else None

    def _config(self, device: torch.device):
        import torchao.quantization as tq

        if self.config == "Int4WeightOnlyConfig" and device.type == "cuda":
            # tinygemm's layout runs on PyTorch's own CUDA int4 kernel; torchao's default layout needs its
            # separate kernel package (mslk)
            return tq.Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")
        return getattr(tq, self.config)()

    def convert(self, model):
        from torchao.quantization import quantize_

        device = model.tok_embeddings.weight.device
        if self.config == "Int4WeightOnlyConfig":
            model = model.to(torch.bfloat16)
        try:
            quantize_(model, self._config(device))
        except ImportError as e:
            raise QuantizationUnavailable(f"{self.name} is unavailable here: {e}") from None
        return model

    def prepare(self, model):
        from torchao.quantization import quantize_

        quantize_(model, self._config(torch.device("cpu")))  # on meta: the structure, nothing computed
        return model


class BitsAndBytes(Scheme):
    def __init__(self, name: str):
        self.name = name

    def available(self, device):
        if device.type != "cuda":
            raise QuantizationUnavailable(f"{self.name} needs a CUDA device; run it on a GPU (bitsandbytes kernels)")

    def convert(self, model):
        import bitsandbytes as bnb

        device = model.tok_embeddings.weight.device
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if self.name == "bnb-nf4":
                    new = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=False,
                        quant_type="nf4",
                        compute_dtype=torch.bfloat16,
                    )
                    new.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                else:
                    new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False, has_fp16_weights=False)
                    new.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
                setattr(parent, name, new.to(device))  # moving to the GPU quantizes the weights
        return model


def check_state(expected: dict, state: dict, path: Path, name: str):
    """Every stored tensor of ``state`` is what scheme ``name`` makes of the folder's model: the dtype and shape of
    ``expected``'s (the prepared model's state), looked into the packed tuples of int8 layers, and its values
    finite (a quantized tensor's dequantized ones). A tensor of another dtype (fp32 weights in a bf16 file, one
    fp16 tensor among bf16), another shape (a packed weight cut short) or holding NaN is refused in one line
    naming it, before the model runs, not at its first forward pass."""

    def check(key: str, want, got):
        if isinstance(want, (tuple, list)):
            if not isinstance(got, (tuple, list)) or len(got) != len(want):
                what = f"a {type(got).__name__}"
                raise UserError(f"{path}: {key} is not what {name} stores ({what}); quantize its base again")
            for i, (w, g) in enumerate(zip(want, got, strict=True)):
                check(f"{key}[{i}]", w, g)
            return
        if not isinstance(want, torch.Tensor) or want is None:
            return  # settings stored beside the tensors (dtypes, flags): the load checks them
        if not isinstance(got, torch.Tensor):
            raise UserError(f"{path}: {key} is a {type(got).__name__}, not a tensor; quantize its base again")
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape) or _subclass(got) is not _subclass(want):
            raise UserError(
                f"{path}: {key} is {str(got.dtype).removeprefix('torch.')} {tuple(got.shape)}, where {name} stores "
                f"{str(want.dtype).removeprefix('torch.')} {tuple(want.shape)}; quantize its base again"
            )
        if _subclass(got) is not None:  # torchao's quantized tensors: check their inner tensors
            for inner in want.__tensor_flatten__()[0]:
                check(f"{key}.{inner}", getattr(want, inner), getattr(got, inner, None))
            return
        values = got.dequantize() if got.is_quantized else got
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise UserError(f"{path}: {key} holds NaN or infinite values; quantize its base again")

    for key, want in expected.items():
        if key in state:
            check(key, want, state[key])


def _subclass(t: torch.Tensor):
    """A tensor subclass that holds other tensors (torchao's quantized weights), or None for a plain tensor or
    parameter."""
    return type(t) if hasattr(type(t), "__tensor_flatten__") else None


def assign(model: nn.Module, state: dict, path: Path) -> nn.Module:
    """``state``'s tensors as ``model``'s own (no copy), every name and shape checked; a parameter the model
    shares between two names (a tied output head) may be stored under one of them."""
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    try:
        missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    except RuntimeError as e:  # a shape that differs
        raise UserError(f"{path} does not fit the folder's model ({str(e).splitlines()[-1].strip()[:160]})") from None
    for names in shared.values():
        stored = [n for n in names if n in state]
        for n in names:
            if n not in state and stored and n in missing:
                module, _, attr = n.rpartition(".")
                setattr(model.get_submodule(module), attr, model.get_parameter(stored[0]))
                missing.remove(n)
    if missing or unexpected:
        raise UserError(f"{path} does not fit the folder's model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


SCHEME_LIST = (
    Cast("bf16", torch.bfloat16),
    Cast("fp16", torch.float16),
    DynamicInt8(),
    TorchAO("torchao-int8-weight", "Int8WeightOnlyConfig", stored=True),
    TorchAO("torchao-int8-dynamic", "Int8DynamicActivationInt8WeightConfig", stored=True),
    TorchAO("torchao-int4-weight", "Int4WeightOnlyConfig", stored=False),  # its layout depends on the device
    BitsAndBytes("bnb-nf4"),
    BitsAndBytes("bnb-int8"),
)
SCHEMES = tuple(s.name for s in SCHEME_LIST)
BATCH_DEPENDENT_SCHEMES = tuple(s.name for s in SCHEME_LIST if s.batch_dependent)


def scheme(name: str) -> Scheme:
    for s in SCHEME_LIST:
        if s.name == name:
            return s
    raise UserError(f"unknown quantization scheme {name!r}; use one of {SCHEMES}")


def quantize(model: nn.Module, name: str) -> nn.Module:
    """Quantize ``model`` in place (or return the quantized copy PyTorch's dynamic quantization makes)."""
    s = scheme(name)
    s.available(model.tok_embeddings.weight.device)
    return s.convert(model)
