"""Autoregressive generation with the KV cache, as small pure functions that eval/ reuses.

Prompts of different lengths are left-padded; padded keys are masked out, and because RoPE depends only on
relative positions, a left-padded prompt attends exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.cli import UserError
from llama.model import Transformer


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Holtzman et al. (2020): keep the smallest set of tokens whose probability reaches top_p.
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # the token that crosses stays
        drop_sorted[..., 0] = False  # and the most likely one always does (a top_p that rounds to 0 in float32)
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token (B,) from the last position's (B, V) logits; temperature 0 is greedy.

    Sampled as gpt-fast does, without a host sync: argmax(p / E) with E ~ Exp(1) drawn per token (the
    "exponential race": the index of the first of independent exponential clocks of rates p_i is distributed as
    p), where torch.multinomial waits for the device."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def prefill(model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, mask=None) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling the cache; (B, V) logits of the last position (the only
    one the output projection computes)."""
    return model(tokens, input_pos, mask, last_only=True)[:, -1]


def decode_one_token(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor, mask=None) -> torch.Tensor:
    """One step: token (B, 1) at position input_pos (1,) -> (B, V) logits for the next one."""
    return model(token, input_pos, mask)[:, -1]


def padding_mask(cache_len: int, first_valid: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, cache_len) mask: causal, minus the left padding before ``first_valid`` of each row.

    A padding query may still see itself, so its (ignored) output stays finite and cannot poison the cache.
    """
    keys = torch.arange(cache_len, device=first_valid.device)
    valid_key = keys[None, :] >= first_valid[:, None]  # (B, cache_len)
    self_key = keys[None, :] == input_pos[:, None]  # (T, cache_len)
    causal = keys[None, :] <= input_pos[:, None]  # (T, cache_len)
    return (causal[None] & (valid_key[:, None, :] | self_key[None]))[:, None]


@torch.no_grad()
def decode(
    logits: torch.Tensor,
    step: Callable[[torch.Tensor, int], torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, list[int]], None] | None = None,
) -> list[list[int]]:
    """The one decode loop: from the last position's (B, V) ``logits``, sample each row's next token and feed the
    tokens (B, 1) to ``step(tokens, i) -> logits`` for the i-th new token, up to ``max_new_tokens``. A row ends
    at ``eos_id`` (not included) or once ``stop(new_tokens)`` is true (included). ``on_token(i, tokens)`` is
    called once new token i of each row is known (``tokens``: a clock for per-token latency, a stream's text).
    With none of eos_id, stop and on_token, nothing needs a token on the host before the end: the tokens stay
    on the device and the pass has one sync, at its end. ``generate`` (batched prompts), the runtime decoders
    (runtime/decoding.py) and the latency timings (eval/latency.py) all decode with it."""
    B = logits.shape[0]
    watch = eos_id is not None or stop is not None or on_token is not None
    out: list[list[int]] = [[] for _ in range(B)]
    done, kept = [False] * B, []
    for i in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, generator)
        if not watch:
            kept.append(nxt)
        else:
            new, row = False, nxt.tolist()
            for b, t in enumerate(row):
                if done[b]:
                    continue
                if eos_id is not None and t == eos_id:
                    done[b] = True
                    continue
                out[b].append(t)
                new = True
                if stop is not None and stop(out[b]):
                    done[b] = True
            if new and on_token is not None:
                on_token(i, row)
            if all(done):
                break
        if i == max_new_tokens - 1:
            break
        logits = step(nxt[:, None], i)
    return torch.stack(kept, 1).tolist() if kept else out


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens of each.

    A sequence ends at ``eos_id`` (not included) or when ``stop(new_tokens)`` is true (included; callers
    trim stop strings themselves). Sets up a KV cache sized for this call.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("generate needs at least one prompt and every prompt needs at least one token")
    device = model.tok_embeddings.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    cache_len = T + max_new_tokens
    model.setup_caches(B, cache_len)
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
    first_valid = torch.tensor([T - len(p) for p in prompts], device=device)
    padded = bool((first_valid > 0).any())

    input_pos = torch.arange(T, device=device)
    mask = padding_mask(cache_len, first_valid, input_pos) if padded else None
    logits = prefill(model, tokens, input_pos, mask)

    def step(nxt: torch.Tensor, i: int) -> torch.Tensor:
        pos = torch.tensor([T + i], device=device)
        return decode_one_token(model, nxt, pos, padding_mask(cache_len, first_valid, pos) if padded else None)

    out = decode(logits, step, max_new_tokens, temperature, top_k, top_p, eos_id, stop, generator, on_token=None)
    model.clear_caches()
    return out
