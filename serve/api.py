"""The OpenAI API as this server speaks it: request bodies, answers, errors and the text of a stream.

Follows the OpenAI reference for ``POST /v1/completions``, ``POST /v1/chat/completions`` and ``GET /v1/models``
(the shapes the official ``openai`` client parses, and vLLM's server answers). Fields the API defines that this
server does not implement (``echo``, ``suffix``, ``best_of``, penalties, ``logit_bias``, tools...) are refused
with a 400 naming the field when set to anything but their neutral value; a field the API does not define is
refused too (a misspelt ``max_token`` would otherwise be ignored). This server's own additions: ``engine``
(also chosen by the model id ``<model>:<engine>``), ``truncate_prompt`` and vLLM's ``ignore_eos``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from eval.generate import cut_at_stops

MAX_CHOICES = 64  # prompts x n in one request
MAX_STOPS = 16
MAX_LOGPROBS = 20


class ApiError(Exception):
    """An answer in the OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # a last chunk with the usage of the whole answer
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


class Sampling(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="a model id from GET /v1/models")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default 16)")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1; 0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="completions per prompt")
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings; the text ends before them")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="sampling seed (else a random one)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored, as the API allows
    # this server's own fields
    engine: str | None = Field(None, description="runtime engine (else the one the model id names)")
    truncate_prompt: bool = Field(False, description="keep the end of a prompt too long for the context (else 413)")
    ignore_eos: bool = Field(False, description="vLLM's: decode past the end-of-sequence token (fixed lengths)")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("a stop string must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server; leave it at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        return self

    @property
    def stops(self) -> list[str]:
        return self.stop or []


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text, texts, or token ids")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="top log-probabilities per token")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_only(self):
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported by this server (leave it unset)")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _chat_only(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree")
            self.max_tokens = self.max_completion_tokens
        return self


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class TextStream:
    """The text of one completion as its tokens arrive. ``push`` returns what may be sent now; ``finish`` the
    rest. Held back until the next token: a stop string's possible beginning (the text ends before a stop
    string and the stream must never show part of one), an incomplete UTF-8 character (decoded as U+FFFD) and,
    with a tokenizer that cleans up spaces when it decodes (``hold_space``: " ." becomes "."), trailing
    whitespace. So the pieces always add up to exactly the text a non-streaming request returns.

    Decoding is incremental, as vLLM's ``detokenize_incrementally`` does it: each new token is decoded after the
    tokens of the previous step as context, and the new text is what that adds to the context's own text; the
    whole completion is never decoded again per token (which made a long completion quadratic)."""

    def __init__(self, decode, stops: list[str], hold_space: bool = False):
        self.decode, self.stops, self.hold_space = decode, stops, hold_space
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read], settled
        self.prefix = self.read = 0  # ids[prefix:read]: the context the next tokens are decoded after
        self.sent = ""

    def _advance(self, final: bool) -> str:
        """Settle the text of the tokens past ``read`` when it decodes to whole characters (or at the end); the
        text so far, with an unsettled tail at the end."""
        context = self.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        now = self.decode(self.ids[self.prefix :])
        if not now.startswith(context):  # the context decodes otherwise with what follows: decode it all once
            self.text, self.prefix, self.read = self.decode(self.ids), len(self.ids), len(self.ids)
            return self.text
        tail = now[len(context) :]
        if final or (tail and not tail.endswith("\ufffd")):
            self.text += tail
            self.prefix, self.read = self.read, len(self.ids)
            return self.text
        return self.text + tail

    def _visible(self, final: bool) -> str:
        text = self._advance(final)
        cut = cut_at_stops(text, self.stops)
        if final or len(cut) < len(text):
            return cut
        keep = len(text)
        for s in self.stops:  # the longest end of the text that begins a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = min(keep, len(text) - k)
                    break
        text = text[:keep].rstrip("\ufffd")
        return text.rstrip() if self.hold_space else text

    def _delta(self, visible: str) -> str:
        if not visible.startswith(self.sent):
            return ""  # the decoding of what was sent changed: wait until it is stable again
        delta, self.sent = visible[len(self.sent) :], visible
        return delta

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(self._visible(False))

    def finish(self) -> str:
        final = self._visible(True)
        whole = cut_at_stops(self.decode(self.ids), self.stops)  # once per completion: the text is the decode's
        if whole != final and whole.startswith(self.sent):
            final = whole
        if not final.startswith(self.sent):
            raise RuntimeError("the streamed text is not a prefix of the completion's text")
        return self._delta(final)

    def stopped(self) -> bool:
        """Whether a stop string ended the text."""
        text = self.decode(self.ids)
        return len(cut_at_stops(text, self.stops)) < len(text)


def token_text(tok, before: list[int], token: int) -> str:
    """What ``token`` adds to the text of ``before`` (a token's own text can depend on what precedes it)."""
    before = before[-8:]  # enough context for how a token joins the text, at a cost that does not grow
    a, b = tok.decode(before), tok.decode(before + [token])
    return b[len(a) :] if b.startswith(a) else tok.decode([token])


def logprob_entry(tok, before: list[int], token: int, logits: torch.Tensor, top: int) -> dict:
    lp = torch.log_softmax(logits.float(), -1)
    alts = torch.topk(lp, top) if top else None
    return {
        "token": token_text(tok, before, token),
        "logprob": float(lp[token]),
        "top": []
        if alts is None
        else [(token_text(tok, before, int(i)), float(v)) for v, i in zip(alts.values, alts.indices, strict=True)],
    }


class LogprobsHeld:
    """Log-probabilities of tokens whose text is not sent yet (a possible stop string held back): released
    once the text reaches where the token begins, so that logprobs never run past the text a client gets."""

    def __init__(self):
        self.pending: list[tuple[int, dict]] = []  # (where the token's text begins, its entry)
        self.chars = 0

    def add(self, entry: dict):
        self.pending.append((self.chars, entry))
        self.chars += len(entry["token"])

    def release(self, sent_chars: int) -> list[dict]:
        out = [e for start, e in self.pending if start < sent_chars]
        self.pending = [(start, e) for start, e in self.pending if start >= sent_chars]
        return out
