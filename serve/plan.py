"""A request, checked and tokenized once into a ``Plan``: the engine, each choice's prompt ids and seed, and
the sampling settings (vLLM's ``SamplingParams``), built by the request's type (``plan_completion``,
``plan_chat``) before anything is decoded. Every refusal here is an ``ApiError`` naming the field."""

from __future__ import annotations

import os
from dataclasses import dataclass

from common.cli import failure
from runtime.generate import fit_prompt
from runtime.sampling import SamplingParams
from serve.api import MAX_CHOICES, ApiError, ChatRequest, CompletionRequest, Sampling
from serve.served import Served

TOKENS_PER_CHAR_SLACK = 4  # normalisation may merge characters: the cheap length bound allows 4x for it
DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default
DEFAULT_TEMPERATURE = 1.0  # the OpenAI API's default


@dataclass
class Plan:
    """A checked request, ready to run: the engine, each choice's prompt ids and seed, the settings."""

    engine: str
    prompts: list[list[int]]  # token ids of each distinct prompt
    choices: list[tuple[int, int]]  # (prompt index, seed) of each completion, in the order of the answer
    truncated: list[bool]
    how: SamplingParams  # length, sampler, stop strings, log-probabilities (each choice with its own seed)
    eos: bool
    received: float
    model: str = ""  # the model id as the request named it ("tiny:onnxruntime"), echoed in the answer


def _engine(served: Served, req: Sampling) -> str:
    models = served.models()
    if req.model not in models:
        raise ApiError(
            404,
            f"the model {req.model!r} does not exist; this server serves {list(models)}",
            "model",
            "model_not_found",
        )
    engine = req.engine or models[req.model]
    if req.engine and req.model != served.name and req.engine != models[req.model]:
        raise ApiError(400, f"engine {req.engine!r} contradicts the model id {req.model!r}", "engine")
    if engine not in served.engines:
        known = ", ".join(served.engines)
        why = f" ({served.unavailable[engine]})" if engine in served.unavailable else ""
        raise ApiError(400, f"engine {engine!r} is not served{why}; use one of: {known}", "engine")
    return engine


def _max_tokens(served: Served, req: Sampling) -> int:
    n = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if n > served.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens {n} is over this server's limit of {served.max_tokens_limit} (the model's context holds "
            f"{served.max_seq_len} tokens, prompt included)",
            "max_tokens",
        )
    return n


def most_prompt_chars(served: Served, max_tokens: int) -> int:
    """The most characters a prompt can have and still fit the context beside ``max_tokens``: a token stands for
    at most max_token_bytes bytes (>= characters), with slack for normalisation."""
    room = served.max_seq_len - max_tokens
    return (room + 16) * served.max_token_bytes * TOKENS_PER_CHAR_SLACK


def encode_text(served: Served, text: str, max_tokens: int, truncate: bool, bos: bool = True) -> tuple[list[int], bool]:
    """The ids of a text prompt that fits the context beside ``max_tokens`` (its end kept if ``truncate``)."""
    room = served.max_seq_len - max_tokens
    # A token stands for at most max_token_bytes bytes (>= characters), so a prompt with more characters than
    # room x that (x slack for normalisation) cannot fit: refuse it, or keep only its end, before tokenizing.
    most_chars = most_prompt_chars(served, max_tokens)
    cut = len(text) > most_chars
    if cut and not truncate:
        raise ApiError(
            413,
            f"the prompt has {len(text):,} characters; with max_tokens {max_tokens} at most {room} tokens fit the "
            "context (or pass truncate_prompt)",
            "prompt",
        )
    try:
        text.encode("utf-8")  # a lone surrogate ("a\ud800b") is no text a tokenizer can read
    except UnicodeEncodeError as e:
        raise ApiError(
            400, f"the prompt is not valid Unicode text ({e.reason} at character {e.start})", "prompt"
        ) from None
    ids = served.tokenizer.encode(text[-most_chars:] if cut else text, bos=bos and not cut)
    return fit_ids(served, ids, max_tokens, truncate, cut)


def fit_ids(served: Served, ids: list[int], max_tokens: int, truncate: bool, cut: bool = False):
    S = served.max_seq_len
    room = S - max_tokens
    if not ids:
        raise ApiError(400, "the prompt holds no tokens", "prompt")
    truncated = cut or (len(ids) > room and truncate)
    if truncated:  # the end of the prompt is what the model continues
        ids = fit_prompt(ids, S, max_tokens)
    if len(ids) > room:
        raise ApiError(
            413,
            f"the prompt is {len(ids)} tokens; with max_tokens {max_tokens} at most {room} fit the context",
            "prompt",
        )
    return ids, truncated


def check_choices(n_prompts: int, n: int):
    if n_prompts * n > MAX_CHOICES:
        raise ApiError(
            400, f"{n_prompts} prompts x n={n} is over this server's {MAX_CHOICES} completions per request", "n"
        )


def _plan(
    served: Served,
    req: Sampling,
    engine: str,
    prompts: list[list[int]],
    truncated: list[bool],
    received: float,
    logprobs,
):
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    check_choices(len(prompts), req.n)
    choices = [(p, (seed + j) % 2**64) for p in range(len(prompts)) for j in range(req.n)]
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    how = SamplingParams(_max_tokens(served, req), temperature, req.top_p, req.top_k, seed, req.stops, logprobs)
    return Plan(engine, prompts, choices, truncated, how, not req.ignore_eos, received, req.model)


def plan_completion(served: Served, req: CompletionRequest, received: float) -> Plan:
    engine = _engine(served, req)  # an unknown model is a 404 before anything else is looked at
    max_tokens = _max_tokens(served, req)
    try:
        prompts = req.prompts()
    except ValueError as e:
        raise ApiError(400, str(e), "prompt") from None
    check_choices(len(prompts), req.n)  # before any prompt is tokenized
    ids, truncated = [], []
    vocab = served.tokenizer.vocab_size
    for p in prompts:
        if isinstance(p, str):
            x, t = encode_text(served, p, max_tokens, req.truncate_prompt)
        else:
            if any(not 0 <= i < vocab for i in p):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
            x, t = fit_ids(served, list(p), max_tokens, req.truncate_prompt)
        ids.append(x)
        truncated.append(t)
    return _plan(served, req, engine, ids, truncated, received, req.logprobs)


def plan_chat(served: Served, req: ChatRequest, received: float) -> Plan:
    engine = _engine(served, req)
    chat = served.chat
    if chat is None:
        raise ApiError(
            400,
            f"the model {served.name!r} has no chat template (its tokenizer defines none); use /v1/completions",
            "messages",
        )
    max_tokens = _max_tokens(served, req)
    try:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None
    chars = sum(len(m["content"]) for m in messages)
    room = served.max_seq_len - max_tokens
    if chars > most_prompt_chars(served, max_tokens):
        raise ApiError(
            413, f"the messages have {chars:,} characters; at most {room} tokens fit the context", "messages"
        )
    try:
        ids = chat(messages)
    except Exception as e:  # the template's own complaint (roles out of order, ...)
        raise ApiError(400, f"messages: the chat template refused them ({failure(e, 200)})", "messages") from None
    x, t = fit_ids(served, ids, max_tokens, req.truncate_prompt)
    top = req.top_logprobs or 0
    return _plan(served, req, engine, [x], [t], received, top if req.logprobs else None)
