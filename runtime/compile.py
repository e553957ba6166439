"""Compiled modes of one function (a decode step, a prefill), shared by the decoders, the latency timings and
the benchmarks: eager, compile (torch.compile) and compile+cudagraphs (CUDA: static shapes, as gpt-fast).

On the CPU, a compiled function computes a linear layer of a few rows (a decode step at batch 1 to 8) as an
elementwise product and a sum (``FewRowsLinear``), which Inductor fuses into one pass over the weight, where it
would otherwise call the BLAS's matrix product with those few rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from common.cli import UserError

MODES = ("eager", "compile", "compile+cudagraphs")
FEW_ROWS = 8  # FewRowsLinear's rows at most: a decode step's batches of 1, 2, 4 and 8


def _allow_recompiles(limit: int = 64):
    """Every model, batch size and mode is its own compiled graph of the same decode function, and dynamo
    keeps at most 8 per function by default: a ninth would silently run eager under a "compile" label. Raise
    the limit, and make reaching it an error rather than a silent fallback."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name and the older one
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


class FewRowsLinear(TorchFunctionMode):
    """``F.linear`` of at most FEW_ROWS rows as ``(weight * x[:, None]).sum(-1)``, while a compiled function
    traces: Inductor fuses the product and the sum into one loop that reads each weight once, at the memory's
    streaming rate. A decode step is that: 29 matrices of 20.8 MB per token for a plain Llama of dim 256, 4
    blocks and 8,000 tokens, which the BLAS's matrix product with one row (the extern kernel Inductor otherwise
    calls) reads at about 8 GB/s on this 2-core CPU (2.6 ms) while a plain sum over memory runs at 22-29 GB/s;
    the fused reduction takes about 1 ms (bench/RESULTS.md). With 2 to 8 rows it still beats the BLAS here (this
    project's batching engine alone: x1.1-x2.3 the tokens/s); at 16 the BLAS is ahead, so larger batches and
    prompts keep ``F.linear``. Written by hand: Inductor decomposes a one-row matrix product so only on GPUs and
    only with coordinate-descent tuning (torch/_inductor/decomposition.py ``mm``, what gpt-fast relies on), never
    on the CPU. Same values up to float32 summation order; every compiled engine is still checked token for
    token against eager decoding before it serves. Autocast, and weights that are not plain float tensors of the
    input's dtype, keep ``F.linear``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.shape[:-1].numel()
            if (
                rows <= FEW_ROWS
                and type(weight) in (torch.Tensor, torch.nn.Parameter)
                and weight.is_floating_point()
                and weight.dtype == x.dtype
                and not torch.is_autocast_enabled(x.device.type)
            ):
                y = (weight * x.reshape(rows, 1, -1)).sum(-1).reshape(*x.shape[:-1], weight.shape[0])
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def compiled(fn, mode: str, device: torch.device):
    if mode == "eager":
        return fn
    _allow_recompiles()
    if mode == "compile":
        step = torch.compile(fn, dynamic=False)
        if device.type != "cpu":
            return step

        def one_pass_per_weight(*args, **kwargs):
            with FewRowsLinear():  # traced by dynamo into the graph (and guarded on)
                return step(*args, **kwargs)

        return one_pass_per_weight
    if mode == "compile+cudagraphs":
        if device.type != "cuda":
            raise UserError("compile+cudagraphs needs CUDA; use eager or compile on this device")
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
    raise UserError(f"unknown mode {mode!r}; use one of {MODES}")
