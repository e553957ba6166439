"""Latency of a model: prefill (time to first token), per-token decode with the KV cache, and a full forward
without cache, at stated batch sizes and lengths.

Modes: ``eager``; ``compile`` (torch.compile, default mode); ``compile+cudagraphs`` (CUDA only:
mode="reduce-overhead", static KV cache and fixed shapes, as gpt-fast does). Every measurement warms up
first, synchronises the device before each clock read and reports median, p10 and p90 over repeats.
"""

from __future__ import annotations

import torch

from common.timing import spread, time_repeats
from llama.generation import decode_one_token, prefill
from llama.model import Transformer

MODES = ("eager", "compile", "compile+cudagraphs")


def compiled(fn, mode: str, device: torch.device):
    if mode == "eager":
        return fn
    if mode == "compile":
        return torch.compile(fn, dynamic=False)
    if mode == "compile+cudagraphs":
        if device.type != "cuda":
            raise ValueError("compile+cudagraphs needs CUDA; use eager or compile on this device")
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
    raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")


@torch.no_grad()
def time_prefill(
    model: Transformer, batch: int, prompt_len: int, mode: str = "eager", warmup: int = 3, repeats: int = 10
) -> dict:
    """Milliseconds to run a (batch, prompt_len) prompt through the model into the KV cache."""
    device = model.tok_embeddings.weight.device
    model.setup_caches(batch, prompt_len + 1)
    tokens = torch.randint(0, model.params.vocab_size, (batch, prompt_len), device=device)
    pos = torch.arange(prompt_len, device=device)
    fn = compiled(prefill, mode, device)
    times = time_repeats(lambda: fn(model, tokens, pos), device, warmup, repeats)
    model.clear_caches()
    return {"ms": spread([1e3 * t for t in times]), "batch": batch, "prompt_len": prompt_len, "mode": mode}


def decode_steps(model: Transformer, batch: int, context_len: int, n_tokens: int, mode: str = "eager") -> list:
    """A KV cache filled by a random ``context_len``-token prompt, and one callable per decode step at positions
    context_len, context_len + 1, ... (remove the cache with ``model.clear_caches()`` afterwards)."""
    device = model.tok_embeddings.weight.device
    model.setup_caches(batch, context_len + n_tokens)
    with torch.no_grad():
        prefill(
            model,
            torch.randint(0, model.params.vocab_size, (batch, context_len), device=device),
            torch.arange(context_len, device=device),
        )
    step = compiled(decode_one_token, mode, device)
    token = torch.randint(0, model.params.vocab_size, (batch, 1), device=device)

    def at(pos):
        @torch.no_grad()
        def one():
            return step(model, token, pos)

        return one

    return [at(torch.tensor([context_len + i], device=device)) for i in range(n_tokens)]


def time_decode(
    model: Transformer,
    batch: int,
    context_len: int,
    n_tokens: int = 32,
    mode: str = "eager",
    warmup: int = 3,
    repeats: int = 3,
) -> dict:
    """Per-token decode latency with the KV cache, after a ``context_len``-token prefill.

    Each of ``repeats`` passes decodes ``n_tokens`` tokens at positions context_len.. and every step is timed
    on its own; the spread is over all timed steps. tokens_per_s counts the whole batch.
    """
    device = model.tok_embeddings.weight.device
    steps = decode_steps(model, batch, context_len, n_tokens, mode)
    for i in range(warmup):  # compilation and CUDA graph capture happen here
        steps[i % n_tokens]()
    times = [t for _ in range(repeats) for one in steps for t in time_repeats(one, device, 0, 1)]
    model.clear_caches()
    s = spread([1e3 * t for t in times])
    return {
        "ms_per_token": s,
        "tokens_per_s": batch * 1e3 / s["median"],
        "batch": batch,
        "context_len": context_len,
        "n_tokens": n_tokens,
        "repeats": repeats,
        "mode": mode,
    }


def decode_fn(model: Transformer, batch: int, context_len: int, n_tokens: int, mode: str = "eager"):
    """A callable that decodes ``n_tokens`` tokens per call (for energy measurements), and its cleanup."""
    steps = decode_steps(model, batch, context_len, n_tokens, mode)

    def run():
        for one in steps:
            one()

    return run, model.clear_caches


@torch.no_grad()
def time_forward(
    fn, vocab_size: int, batch: int, seq_len: int, device: torch.device, warmup: int = 3, repeats: int = 10
) -> dict:
    """A full forward pass without cache, ``fn(tokens) -> logits``: any model or runtime engine."""
    tokens = torch.randint(0, vocab_size, (batch, seq_len), device=device)
    times = time_repeats(lambda: fn(tokens), device, warmup, repeats)
    s = spread([1e3 * t for t in times])
    return {"ms": s, "tokens_per_s": batch * seq_len * 1e3 / s["median"], "batch": batch, "seq_len": seq_len}
