"""How a completion's tokens are drawn, as one typed value (vLLM's ``SamplingParams``, the fields this project
uses): the server's requests (serve/plan.py), its scheduler's sequences, the decoders' ``generate``, the
evaluators' batched generation (runtime/generate.py), HumanEval and the lm-eval adapter all take one, so a
setting is named and checked in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """``max_tokens`` new tokens at most; ``temperature`` 0 is greedy, else the tokens are drawn after top-k and
    nucleus (top-p) filtering from a generator seeded with ``seed``; generation stops after any of ``stop``
    (strings, included in the tokens, cut from the text by the caller) and at the tokenizer's EOS; ``logprobs``:
    how many alternatives' log-probabilities to return per token (0: the chosen token's only; None: none).
    Hashable: requests with equal settings batch together (the lm-eval adapter groups by it)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))  # a list given is kept as a tuple (hashable)
        problems = []
        if type(self.max_tokens) is not int or self.max_tokens < 0:
            problems.append(f"max_tokens {self.max_tokens!r} must be a whole number >= 0")
        t = self.temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            problems.append(f"temperature {self.temperature!r} must be a finite number >= 0")
        if self.top_p is not None and not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            problems.append(f"top_p {self.top_p!r} must be in (0, 1]")
        if self.top_k is not None and (type(self.top_k) is not int or self.top_k < 1):
            problems.append(f"top_k {self.top_k!r} must be a whole number >= 1")
        if self.logprobs is not None and (type(self.logprobs) is not int or self.logprobs < 0):
            problems.append(f"logprobs {self.logprobs!r} must be a whole number >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop {list(self.stop)!r} must hold non-empty strings")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Completion:
    """What a decode gave for one prompt: its new ``tokens``, the time each was ready (``times``, seconds from
    the call: the first is the time to first token) and why it ended (``finish``, as OpenAI and vLLM say it:
    "stop" at EOS or a stop string, "length" at ``max_tokens``)."""

    tokens: list[int]
    times: list[float]
    finish: str
