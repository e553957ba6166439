"""Text in, text out: batched generation from a loaded model with stop strings (the evaluators), and the
prompt and stop helpers the server shares."""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.progress import Progress
from llama.generation import generate, sample  # noqa: F401 (sample: the one sampler, for serve/)
from runtime.loading import Loaded
from runtime.sampling import SamplingParams


def fit_prompt(ids: list[int], max_seq_len: int, max_new_tokens: int) -> list[int]:
    """Keep the end of a prompt that would not leave room for the continuation within the trained context."""
    keep = max(1, max_seq_len - max_new_tokens)
    return ids if len(ids) <= keep else ids[-keep:]


def stop_check(tokenizer, stop_strings: list[str] | None) -> Callable[[list[int]], bool]:
    """For generation's ``stop``: true once the decoded new tokens contain any of ``stop_strings``."""

    def stop(ids: list[int]) -> bool:
        return bool(stop_strings) and any(s in tokenizer.decode(ids) for s in stop_strings)

    return stop


def cut_at_stops(text: str, stop_strings: list[str]) -> str:
    """``text`` before the first stop string it contains (generation stops after one, included)."""
    return text[: min((i for s in stop_strings if (i := text.find(s)) != -1), default=len(text))]


def complete(
    ev: Loaded,
    prompts: list[str],
    sampling: SamplingParams,
    batch_size: int = 8,
    n_samples: int = 1,
    progress: bool = True,
) -> list[list[str]]:
    """``n_samples`` continuations of each prompt (texts of the new tokens, up to and including a stop string)."""
    tok = ev.tokenizer
    limit = ev.model.params.max_seq_len
    encoded = [fit_prompt(tok.encode(p, bos=True), limit, sampling.max_tokens) for p in prompts]
    new = generate_ids(ev, encoded, sampling, batch_size, n_samples, progress)
    return [[tok.decode(ids) for ids in samples] for samples in new]


def generate_ids(
    ev: Loaded,
    prompts: list[list[int]],
    sampling: SamplingParams,
    batch_size: int = 8,
    n_samples: int = 1,
    progress: bool = False,
) -> list[list[list[int]]]:
    """``n_samples`` lists of new token ids for each already-encoded prompt, batched by length (left padding:
    each row decoded as it would be alone), drawn as ``sampling`` says from one generator seeded with its
    seed, ending at the tokenizer's EOS or after a stop string."""
    tok = ev.tokenizer
    batch_size = ev.batch_size(batch_size)
    stop = stop_check(tok, list(sampling.stop))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[list[list[int]]] = [[] for _ in prompts]
    gen = torch.Generator(device=ev.device).manual_seed(sampling.seed)
    total = n_samples * len(prompts)
    with Progress(total=total, desc="generate", unit="seq", disable=not progress) as bar, ev.autocast():
        for _ in range(n_samples):
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                new = generate(
                    ev.model,
                    [prompts[i] for i in idx],
                    sampling.max_tokens,
                    temperature=sampling.temperature,
                    top_k=sampling.top_k,
                    top_p=sampling.top_p,
                    eos_id=tok.eos_id,
                    stop=stop,
                    generator=gen,
                )
                for i, ids in zip(idx, new, strict=True):
                    out[i].append(ids)
                bar.update(len(idx))
    return out


def prompts_truncated(ev: Loaded, prompts: list[str], max_new_tokens: int) -> int:
    limit = max(1, ev.model.params.max_seq_len - max_new_tokens)
    return sum(len(ev.tokenizer.encode(p, bos=True)) > limit for p in prompts)
