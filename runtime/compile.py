"""Compiled modes of one function (a decode step, a prefill), shared by the decoders, the latency timings and
the benchmarks: eager, compile (torch.compile) and compile+cudagraphs (CUDA: static shapes, as gpt-fast)."""

from __future__ import annotations

import torch

from common.cli import UserError

MODES = ("eager", "compile", "compile+cudagraphs")


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


def compiled(fn, mode: str, device: torch.device):
    if mode == "eager":
        return fn
    _allow_recompiles()
    if mode == "compile":
        return torch.compile(fn, dynamic=False)
    if mode == "compile+cudagraphs":
        if device.type != "cuda":
            raise UserError("compile+cudagraphs needs CUDA; use eager or compile on this device")
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
    raise UserError(f"unknown mode {mode!r}; use one of {MODES}")
