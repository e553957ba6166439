"""Latency of a model: prefill (time to first token), per-token decode with the KV cache, and a full forward
without cache, at stated batch sizes and lengths. Prefill and decode are timed in the engine the server decodes
with (runtime/batching.py: ``timed_engine``), through its device-level calls: the same cache, positions and
compiled step as a served request, without the server's host-side sampling.

Modes: ``eager``; ``compile`` (torch.compile, default mode); ``compile+cudagraphs`` (CUDA only:
mode="reduce-overhead", static KV cache and fixed shapes, as gpt-fast does). Every measurement warms up
first, synchronises the device before each clock read and reports median, p10 and p90 over repeats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common.results import Spread
from common.timing import spread, time_repeats
from llama.generation import decode
from runtime.batching import timed_engine
from runtime.compile import MODES  # noqa: F401  (the modes a timing takes)


@dataclass(frozen=True)
class PrefillTiming:
    """Milliseconds to run a (batch, prompt_len) prompt into the cache, in ``mode``."""

    ms: Spread
    batch: int
    prompt_len: int
    mode: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DecodeTiming:
    """Milliseconds per decoded token after ``context_len`` tokens, ``n_tokens`` per timed pass, ``repeats``
    passes; ``tokens_per_s`` counts the whole batch; ``energy``: the energy callback's record, if measured."""

    ms_per_token: Spread
    tokens_per_s: float
    batch: int
    context_len: int
    n_tokens: int
    repeats: int
    mode: str
    energy: dict | None = None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return d if self.energy is not None else {k: v for k, v in d.items() if k != "energy"}


@dataclass(frozen=True)
class ForwardTiming:
    """Milliseconds of a full (batch, seq_len) forward without cache; tokens/s over all its tokens."""

    ms: Spread
    tokens_per_s: float
    batch: int
    seq_len: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _device(model: nn.Module) -> torch.device:
    return model.tok_embeddings.weight.device


@torch.no_grad()
def time_prefill(
    model: nn.Module, batch: int, prompt_len: int, mode: str = "eager", warmup: int = 3, repeats: int = 10
) -> PrefillTiming:
    """Milliseconds to run a (batch, prompt_len) prompt into the KV cache of the server's engine
    (runtime.batching.timed_engine), its prompt's forward in ``mode``."""
    device = _device(model)
    engine = timed_engine(model, device, batch, prompt_len + 1, prefill_mode=mode)
    tokens = torch.randint(0, model.params.vocab_size, (batch, prompt_len), device=device)
    try:
        times = time_repeats(lambda: engine.fill(tokens), device, warmup, repeats)
    finally:
        engine.release()
    return PrefillTiming(Spread.of(spread([1e3 * t for t in times])), batch, prompt_len, mode)


def decode_run(model: nn.Module, batch: int, context_len: int, n_tokens: int, mode: str = "eager"):
    """One callable that decodes ``n_tokens`` tokens in a row after a ``context_len``-token prompt, in the engine
    the server decodes with (runtime.batching.timed_engine: ``batch`` sequences, a cache of context_len +
    n_tokens positions, the decode step in ``mode``), through its device-level step, with the one decode loop
    every generator uses (llama.generation.decode: greedy sampling, each token fed back), the steps queued one
    after another with no device sync between them. Returns the callable and the engine (``engine.release()``
    frees its cache afterwards)."""
    device = _device(model)
    engine = timed_engine(model, device, batch, context_len + n_tokens, mode)
    logits = engine.fill(torch.randint(0, model.params.vocab_size, (batch, context_len), device=device))
    positions = [engine.positions(context_len + i) for i in range(n_tokens)]

    def run():
        # n_tokens decode steps (positions context_len ...): the first new token comes from the prefill
        decode(logits, lambda tokens, i: engine.advance(tokens, positions[i]), n_tokens + 1)

    return run, engine


def time_decode(
    model: nn.Module,
    batch: int,
    context_len: int,
    n_tokens: int = 32,
    mode: str = "eager",
    warmup: int = 2,
    repeats: int = 5,
    energy: Callable[[Callable[[], None], int], dict] | None = None,
) -> DecodeTiming:
    """Per-token decode latency with the KV cache, after a ``context_len``-token prefill.

    Each of ``repeats`` timed passes decodes ``n_tokens`` tokens at positions context_len.. with one device
    sync at its end (a sync after every token would add its own cost to each, which a generation loop does
    not pay); ms_per_token is a pass's time over ``n_tokens``, its spread over the passes. ``warmup`` untimed
    passes first: compilation and CUDA graph capture happen there. tokens_per_s counts the whole batch.
    ``energy(run, tokens_per_run)``, if given, measures the same warmed-up decode (its dict lands in
    ``energy``).
    """
    device = _device(model)
    run, engine = decode_run(model, batch, context_len, n_tokens, mode)
    try:
        times = time_repeats(run, device, warmup, repeats)
        s = Spread.of(spread([1e3 * t / n_tokens for t in times]))
        measured = energy(run, batch * n_tokens) if energy is not None else None
    finally:
        engine.release()
    return DecodeTiming(s, batch * 1e3 / s.median, batch, context_len, n_tokens, repeats, mode, measured)


@torch.no_grad()
def time_forward(
    fn, vocab_size: int, batch: int, seq_len: int, device: torch.device, warmup: int = 3, repeats: int = 10
) -> ForwardTiming:
    """A full forward pass without cache, ``fn(tokens) -> logits``: any model or runtime engine."""
    tokens = torch.randint(0, vocab_size, (batch, seq_len), device=device)
    times = time_repeats(lambda: fn(tokens), device, warmup, repeats)
    s = Spread.of(spread([1e3 * t for t in times]))
    return ForwardTiming(s, batch * seq_len * 1e3 / s.median, batch, seq_len)
