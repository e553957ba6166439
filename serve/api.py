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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    top_k: int | None = Field(None, ge=1, description="sample among the k likeliest tokens only (vLLM's extension)")
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


PROMPT_SHAPES = "a text, a list of texts, a list of token ids, or a list of lists of token ids"


def check_prompt(p: Any) -> str | list[str] | list[int] | list[list[int]]:
    """A completion's prompt, checked by its shape in one pass over it. Written here, not as a union of list
    types, because pydantic tries each member of a union over the whole list and collects an error per item:
    a 1 MB body of 250,000 one-token prompts took seconds of the event loop to refuse. More than MAX_CHOICES
    prompts is refused before any of them is looked at."""
    if isinstance(p, str):
        return p
    if isinstance(p, list) and not p:
        raise ValueError("prompt must not be empty")
    if not isinstance(p, list):
        raise ValueError(f"must be {PROMPT_SHAPES}")
    if _is_ids(p):
        return p  # one prompt of token ids
    if len(p) > MAX_CHOICES:
        raise ValueError(f"{len(p):,} prompts is over this server's {MAX_CHOICES} completions per request")
    if all(isinstance(x, str) for x in p) or all(isinstance(x, list) and x and _is_ids(x) for x in p):
        return p
    raise ValueError(f"must be {PROMPT_SHAPES} (one kind throughout; token id lists not empty)")


def _is_ids(xs: list) -> bool:
    return all(type(x) is int and x >= 0 for x in xs)  # type(): a JSON true is not token 1


class CompletionRequest(Sampling):
    prompt: Any = Field(description=PROMPT_SHAPES, json_schema_extra={"examples": ["def add(a, b):", [[1, 2, 3]]]})
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="top log-probabilities per token")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, p):
        return check_prompt(p)

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


# ---- answers -------------------------------------------------------------------------------------------------
# The server's own measurements ride beside the OpenAI fields (extra="allow" on the top level, as vLLM adds its
# own fields); a choice's ``metrics`` is there only when a request has several choices.


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    metrics: dict | None = Field(None, exclude_if=lambda v: v is None)


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: dict | None = None
    finish_reason: str | None = None
    metrics: dict | None = Field(None, exclude_if=lambda v: v is None)


class CompletionResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatCompletionResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict | None = None
    finish_reason: str | None = None


class StreamChunk(BaseModel):
    """One server-sent event of a streamed answer. ``usage`` is null on every chunk but the usage chunk when
    the client asked for usage, and absent otherwise (``dump``)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["text_completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[CompletionStreamChoice | ChatStreamChoice]
    usage: Usage | None = None

    def dump(self, include_usage: bool) -> dict:
        return self.model_dump(exclude=None if include_usage or self.usage is not None else {"usage"})
