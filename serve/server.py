"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) that completes prompts with a chosen runtime engine and
returns, with each completion, its measurements.

    python -m serve.server checkpoints/tiny --engines torch onnxruntime openvino      # http://127.0.0.1:8000
    curl -s 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "tiny:onnxruntime", "prompt": "def add(a, b):", "max_tokens": 32, "temperature": 0}'

Speaks the OpenAI API (serve/api.py): ``GET /v1/models``, ``POST /v1/completions`` and, for Hugging Face folders
whose tokenizer has a chat template, ``POST /v1/chat/completions``; ``stream: true`` answers with server-sent
events, one chunk per decoded token, then ``data: [DONE]``. So the official ``openai`` client and the load
generators of the field drive it as they drive vLLM. The model ids are ``<model>:<engine>`` for each engine
served, and ``<model>`` for the first one; ``GET /health`` says what is served and why an engine is not.

Serves this project's checkpoints and Hugging Face model folders (torch engine), each engine checked token
for token against eager greedy decoding at start-up (an engine that fails to build or differs is listed
under ``unavailable`` with the reason). Binds to 127.0.0.1 unless told otherwise.

Limits, so that no client can exhaust the server: a request body is at most ``--max-body-bytes`` (413 above
it, counted as it arrives), a prompt far longer than the context is refused (or cut, with ``truncate_prompt``)
before it is tokenized, a request holds at most 64 completions (prompts x n), and a client has
``--request-timeout`` seconds from its first byte to send a whole request (a connection that sends nothing,
or a byte at a time, is closed). A streaming client that goes away stops its decoding at the next token.

Requests are served one at a time, in arrival order, so that a request's latency and energy are its own;
the time a request waited for the ones before it is ``queue_ms``. Measurements, beside the OpenAI fields of
each answer (in the last chunk of a stream), follow MLPerf / LLMPerf / GenAI-Perf: ``ttft_ms`` (time to first
token: prompt processing and the first token), ``tpot_ms`` (time per output token after the first:
(e2e - ttft) / (tokens_out - 1)), ``itl_ms`` (each inter-token latency), ``e2e_ms`` (from the start of
processing to the last token; the client adds the HTTP round trip and the queue), ``tokens_in``/``tokens_out``,
and ``energy`` (NVML or RAPL, else "unavailable" with the reason; a request shorter than one second carries no
figure, the counters update too coarsely; idle power is measured once at start-up and the net energy above it
is reported beside the total). With several completions in one request (``n`` > 1 or several prompts), each
choice carries its own ``metrics``; the request's ``tpot_ms`` and ``itl_ms`` are then left out, since they
describe one sequence.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from common.cli import ConfigError, UserError, failure, parse_args, positional, run_main
from common.energy import EnergyMeter, find_counter, min_window_for
from common.hardware import run_metadata
from eval.generate import fit_prompt, stop_check
from eval.model import load_for_eval
from runtime.decoding import DECODE_ENGINES, build_decoder, check
from serve.api import MAX_CHOICES, ApiError, ChatRequest, CompletionRequest, Sampling, TextStream, new_id, now

IDLE_S = 2.0  # idle power measured this long when the server starts
TOKENS_PER_CHAR_SLACK = 4  # normalisation may merge characters: the cheap length bound allows 4x for it
CHECK_PROMPTS = ("def add(a, b):\n", "import os\n", "class Stack:\n    def __init__(self):")
DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default
DEFAULT_TEMPERATURE = 1.0  # the OpenAI API's default


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """Every error the server answers, in the OpenAI shape."""
    return JSONResponse(status_code=status, content=ApiError(status, message, param, code).body())


def _first_error(exc: RequestValidationError) -> tuple[str, str | None]:
    e = exc.errors()[0]
    loc = [str(x) for x in e.get("loc", []) if x != "body"]
    where = ".".join(loc) or "body"
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if e.get("type") == "extra_forbidden":
        return f"{where}: unknown field (see the OpenAI API reference; misspelt?)", where
    msg = e.get("msg", "invalid").removeprefix("Value error, ")
    return f"{where}: {msg}", (loc[0] if loc else None)


@dataclass
class Served:
    """The model, its engines and what the server was asked to do."""

    ev: object
    decoders: dict
    unavailable: dict
    max_tokens_limit: int
    max_token_bytes: int = 1  # the longest token's UTF-8 bytes: a prompt's length bounds its token count
    lock: threading.Lock = field(default_factory=threading.Lock)
    # one thread tokenizes every request's prompts, off the event loop (tokenizers are not all thread-safe)
    tokenizing: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "tokenize"))
    counter: object = None
    counter_reason: str | None = None
    idle_power_w: float | None = None  # measured at start-up; each request's net energy subtracts it
    name: str = ""  # the model id (default: the checkpoint's name)
    created: int = field(default_factory=now)

    def __post_init__(self):
        self.name = self.name or self.ev.name

    def models(self) -> dict[str, str]:
        """Model id -> engine: ``<name>`` is served by the first engine, ``<name>:<engine>`` by each."""
        engines = list(self.decoders)
        return {self.name: engines[0]} | {f"{self.name}:{e}": e for e in engines}

    @property
    def chat(self):
        """The tokenizer's chat template as a function of messages -> token ids, or None without one."""
        return (
            getattr(self.ev.tokenizer, "chat_ids", None) if getattr(self.ev.tokenizer, "chat_template", None) else None
        )


def load_served(
    checkpoint: str,
    engines: list[str],
    device: str,
    max_tokens_limit: int,
    workdir: Path | None,
    name: str | None = None,
) -> Served:
    ev = load_for_eval(checkpoint, device, "float32")  # numerics as the ONNX / OpenVINO exports (float32)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="serve-"))
    S = ev.model.params.max_seq_len
    n_check = max(1, min(16, S // 4))  # new tokens compared per check prompt; prompts cut to leave room
    prompts = [ev.tokenizer.encode(p)[-(S - n_check) :] for p in CHECK_PROMPTS]
    decoders, unavailable = {}, {}
    for engine in engines:  # exports and compilation take most of the start-up: each says what it is doing
        t0 = time.perf_counter()
        print(f"engine {engine}: building and checking against eager decoding ...", flush=True)
        try:
            decoder = build_decoder(engine, ev.model, ev.device, workdir)
            check(decoder, ev.model, prompts, n_check)
            decoders[engine] = decoder
            print(f"engine {engine}: ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        except Exception as e:  # reported on /health and in every answer, never hidden
            unavailable[engine] = failure(e, 200)
            print(f"engine {engine}: not served ({unavailable[engine]})", flush=True)
    if not decoders:
        raise UserError(f"no engine could serve {checkpoint}: {unavailable}")
    counter, reason = find_counter(ev.device)
    longest = max(1, int(ev.tokenizer.token_bytes().max()))
    max_tokens_limit = min(max_tokens_limit, S - 1)  # at least one prompt token must fit beside the completion
    # the id clients name: the folder the user gave (checkpoints/tiny -> "tiny"), a step folder by its run and step
    given = Path(checkpoint).name
    name = name or (given if given and not given.startswith("step_") else ev.name)
    served = Served(
        ev, decoders, unavailable, max_tokens_limit, longest, counter=counter, counter_reason=reason, name=name
    )
    if counter is not None:  # idle power once, at start: a request is too short to measure it beside
        with EnergyMeter(ev.device, idle_s=IDLE_S, counter=counter) as meter:
            pass
        served.idle_power_w = meter.idle_power_w
    return served


@dataclass
class Plan:
    """A checked request, ready to run: the engine, each choice's prompt ids and seed, the settings."""

    engine: str
    prompts: list[list[int]]  # token ids of each distinct prompt
    choices: list[tuple[int, int]]  # (prompt index, seed) of each completion, in the order of the answer
    truncated: list[bool]
    max_tokens: int
    temperature: float
    top_p: float | None
    stops: list[str]
    eos: bool
    logprobs: int | None  # top alternatives per token (0: the chosen token's only), None: no log-probabilities
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
    if engine not in served.decoders:
        known = ", ".join(served.decoders)
        why = f" ({served.unavailable[engine]})" if engine in served.unavailable else ""
        raise ApiError(400, f"engine {engine!r} is not served{why}; use one of: {known}", "engine")
    return engine


def _max_tokens(served: Served, req: Sampling) -> int:
    n = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if n > served.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens {n} is over this server's limit of {served.max_tokens_limit} (the model's context holds "
            f"{served.ev.model.params.max_seq_len} tokens, prompt included)",
            "max_tokens",
        )
    return n


def most_prompt_chars(served: Served, max_tokens: int) -> int:
    """The most characters a prompt can have and still fit the context beside ``max_tokens``: a token stands for
    at most max_token_bytes bytes (>= characters), with slack for normalisation."""
    room = served.ev.model.params.max_seq_len - max_tokens
    return (room + 16) * served.max_token_bytes * TOKENS_PER_CHAR_SLACK


def encode_text(served: Served, text: str, max_tokens: int, truncate: bool, bos: bool = True) -> tuple[list[int], bool]:
    """The ids of a text prompt that fits the context beside ``max_tokens`` (its end kept if ``truncate``)."""
    ev = served.ev
    room = ev.model.params.max_seq_len - max_tokens
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
    ids = ev.tokenizer.encode(text[-most_chars:] if cut else text, bos=bos and not cut)
    return fit_ids(served, ids, max_tokens, truncate, cut)


def fit_ids(served: Served, ids: list[int], max_tokens: int, truncate: bool, cut: bool = False):
    S = served.ev.model.params.max_seq_len
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
    return Plan(
        engine,
        prompts,
        choices,
        truncated,
        _max_tokens(served, req),
        temperature,
        req.top_p,
        req.stops,
        not req.ignore_eos,
        logprobs,
        received,
        req.model,
    )


def plan_completion(served: Served, req: CompletionRequest, received: float) -> Plan:
    engine = _engine(served, req)  # an unknown model is a 404 before anything else is looked at
    max_tokens = _max_tokens(served, req)
    try:
        prompts = req.prompts()
    except ValueError as e:
        raise ApiError(400, str(e), "prompt") from None
    check_choices(len(prompts), req.n)  # before any prompt is tokenized
    ids, truncated = [], []
    vocab = served.ev.tokenizer.vocab_size
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
    room = served.ev.model.params.max_seq_len - max_tokens
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


def _metrics(times: list[float], n_out: int) -> dict:
    e2e = 1e3 * times[-1] if times else 0.0
    return {
        "tokens_out": n_out,
        "ttft_ms": 1e3 * times[0] if times else None,
        "tpot_ms": (e2e - 1e3 * times[0]) / (n_out - 1) if n_out > 1 else None,
        "itl_ms": [1e3 * (b - a) for a, b in zip(times, times[1:], strict=False)],
        "e2e_ms": e2e,
    }


class ClientGone(Exception):
    """A streaming client closed its connection: its decoding stops."""


def _token_text(tok, before: list[int], token: int) -> str:
    """What ``token`` adds to the text of ``before`` (a token's own text can depend on what precedes it)."""
    before = before[-8:]  # enough context for how a token joins the text, at a cost that does not grow
    a, b = tok.decode(before), tok.decode(before + [token])
    return b[len(a) :] if b.startswith(a) else tok.decode([token])


def _logprob_entry(tok, before: list[int], token: int, logits: torch.Tensor, top: int) -> dict:
    lp = torch.log_softmax(logits.float(), -1)
    alts = torch.topk(lp, top) if top else None
    return {
        "token": _token_text(tok, before, token),
        "logprob": float(lp[token]),
        "top": []
        if alts is None
        else [(_token_text(tok, before, int(i)), float(v)) for v, i in zip(alts.values, alts.indices, strict=True)],
    }


def run(served: Served, plan: Plan, emit=None, gone: threading.Event | None = None) -> dict:
    """Decode every choice of ``plan`` (holding the server's lock: one request at a time). ``emit(event)``, if
    given, hears ``("token", index, delta, [logprob entries released])`` per token and ``("end", index, delta,
    (finish_reason, [logprob entries released]))`` per choice, from this thread; it raises ``ClientGone`` to stop."""
    ev, tok = served.ev, served.ev.tokenizer
    decoder = served.decoders[plan.engine]
    stop = stop_check(tok, plan.stops)
    hold_space = bool(getattr(getattr(tok, "tok", None), "clean_up_tokenization_spaces", False))
    results = []
    with served.lock:
        if gone is not None and gone.is_set():
            raise ClientGone  # it left while queued: nothing decoded
        started = time.perf_counter()
        meter = EnergyMeter(ev.device, idle_s=0, counter=served.counter, reason=served.counter_reason)
        with meter:
            for index, (p, seed) in enumerate(plan.choices):
                text = TextStream(tok.decode, plan.stops, hold_space)
                entries, held = [], LogprobsHeld()
                t_choice = time.perf_counter() - started

                def on_token(token, logits, text=text, entries=entries, held=held, index=index):
                    if plan.logprobs is not None:
                        held.add(_logprob_entry(tok, text.ids, token, logits, plan.logprobs))
                    delta = text.push(token)
                    released = held.release(len(text.sent))  # the tokens whose text has been sent
                    entries += released
                    if emit is not None:
                        emit(("token", index, delta, released))

                out, times = decoder.generate(
                    plan.prompts[p],
                    plan.max_tokens,
                    plan.temperature,
                    plan.top_p,
                    tok.eos_id if plan.eos else None,
                    stop,
                    seed,
                    on_token,
                )
                last = text.finish()
                released = held.release(len(text.sent))  # the rest was cut with the stop string: dropped
                entries += released
                finish = "stop" if text.stopped() or len(out) < plan.max_tokens else "length"
                if emit is not None:
                    emit(("end", index, last, (finish, released)))
                results.append(
                    {
                        "index": index,
                        "text": text.sent,
                        "finish_reason": finish,
                        "logprobs": entries,
                        "start_s": t_choice,
                    }
                    | _metrics(times, len(out))
                )
        meter.idle_power_w = served.idle_power_w
        n_out = sum(r["tokens_out"] for r in results)
        energy = meter.result(units=n_out or None, unit="token", min_window_s=min_window_for(meter.counter))
    first = results[0]
    single = len(results) == 1
    measures = {
        "engine": plan.engine,
        "engine_note": decoder.note,
        "device": str(ev.device),
        "tokens_in": sum(len(plan.prompts[p]) for p in range(len(plan.prompts))),
        "tokens_out": n_out,
        "prompt_truncated": any(plan.truncated),
        "queue_ms": 1e3 * (started - plan.received),
        # one choice: its own clock (from its prompt to its tokens); several: from the start of the first
        "ttft_ms": None if first["ttft_ms"] is None else first["ttft_ms"] + (0 if single else 1e3 * first["start_s"]),
        "tpot_ms": first["tpot_ms"] if single else None,
        "itl_ms": first["itl_ms"] if single else None,
        "e2e_ms": 1e3 * (time.perf_counter() - started) if not single else first["e2e_ms"],
        "energy": energy,
    }
    return {"choices": results, "measures": measures}


def usage(plan: Plan, measures: dict) -> dict:
    prompt = measures["tokens_in"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": measures["tokens_out"],
        "total_tokens": prompt + measures["tokens_out"],
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


def _completion_logprobs(entries: list[dict], start: int = 0) -> dict:
    """OpenAI's completion logprobs; ``text_offset`` counts from ``start`` (a stream's earlier chunks)."""
    offsets, at = [], start
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        # two alternatives may read the same (broken bytes): the likelier one keeps the key
        "top_logprobs": [dict(reversed(e["top"])) for e in entries],
        "text_offset": offsets,
    }


def _chat_logprobs(entries: list[dict]) -> dict:
    def one(t, lp):
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {
        "content": [one(e["token"], e["logprob"]) | {"top_logprobs": [one(t, v) for t, v in e["top"]]} for e in entries]
    }


def _choice_metrics(c: dict) -> dict:
    return {k: c[k] for k in ("tokens_out", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")}


def completion_body(served: Served, plan: Plan, result: dict, chat: bool) -> dict:
    several = len(result["choices"]) > 1
    choices = []
    for c in result["choices"]:
        choice = {"index": c["index"], "finish_reason": c["finish_reason"]}
        if chat:
            choice["message"] = {"role": "assistant", "content": c["text"]}
            choice["logprobs"] = _chat_logprobs(c["logprobs"]) if plan.logprobs is not None else None
        else:
            choice["text"] = c["text"]
            choice["logprobs"] = _completion_logprobs(c["logprobs"]) if plan.logprobs is not None else None
        if several:
            choice["metrics"] = _choice_metrics(c)
        choices.append(choice)
    return {
        "id": new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion" if chat else "text_completion",
        "created": now(),
        "model": plan.model or served.name,
        "choices": choices,
        "usage": usage(plan, result["measures"]),
        **result["measures"],
    }


def sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def stream(served: Served, plan: Plan, req: Sampling, chat: bool) -> StreamingResponse:
    """The answer as server-sent events: a chunk per token (its text may be empty while a possible stop string
    or an incomplete character is held back), a last chunk per choice with its finish reason, then the
    measurements (with ``usage`` when ``stream_options.include_usage``), then ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()
    rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
    kind = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    running = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    prompt_tokens = sum(len(p) for p in plan.prompts)

    def emit(event):
        if gone.is_set():
            raise ClientGone
        loop.call_soon_threadsafe(queue.put_nowait, event)

    offsets = [0] * len(plan.choices)  # each choice's text so far: streamed text_offset is cumulative

    def chunk(choices: list[dict], **extra) -> dict:
        # with include_usage, every chunk but the usage one says "usage": null (the OpenAI spec)
        base = {"usage": None} if include_usage else {}
        return {
            "id": rid,
            "object": kind,
            "created": created,
            "model": plan.model or served.name,
            "choices": choices,
            **base,
            **extra,
        }

    def choice(index: int, delta: str, finish: str | None, released: list[dict]) -> dict:
        if chat:
            c = {
                "index": index,
                "delta": {"content": delta} if delta or finish is None else {},
                "finish_reason": finish,
            }
            c["logprobs"] = _chat_logprobs(released) if released else None
        else:
            c = {"index": index, "text": delta, "finish_reason": finish}
            c["logprobs"] = _completion_logprobs(released, offsets[index]) if released else None
            offsets[index] += sum(len(e["token"]) for e in released)
        return c

    async def events():
        task = asyncio.ensure_future(asyncio.to_thread(run, served, plan, emit))
        task.add_done_callback(lambda t: queue.put_nowait(None) or t.cancelled() or t.exception())
        try:
            if chat:
                yield sse(
                    chunk(
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                            for i in range(len(plan.choices))
                        ]
                    )
                )
            n_out, last = 0, None
            while (event := await queue.get()) is not None:
                what, index, delta, x = event
                n_out += what == "token"
                so_far = {"prompt_tokens": prompt_tokens, "completion_tokens": n_out}
                so_far = {"usage": so_far | {"total_tokens": prompt_tokens + n_out}} if running else {}
                if what == "token":
                    yield sse(chunk([choice(index, delta, None, x)], **so_far))
                elif index == len(plan.choices) - 1:
                    last = (chunk([choice(index, delta, *x)], **so_far), so_far)  # sent with the measures
                else:
                    yield sse(chunk([choice(index, delta, *x)], **so_far))
            try:
                result = task.result()
            except Exception as e:  # after the first byte the status is sent: the error goes in the stream
                yield sse(ApiError(500, f"decoding failed: {failure(e, 200)}").body())
            else:
                # The server's own figures ride on the last chunk: the usage chunk (choices empty) when usage
                # was asked for, else the last choice's final chunk, so no empty-choices chunk is sent unasked.
                if include_usage:
                    if last is not None:
                        yield sse(last[0])
                    yield sse(chunk([], usage=usage(plan, result["measures"]), **result["measures"]))
                elif last is not None:
                    yield sse(last[0] | result["measures"])
            yield sse(b"[DONE]")
        finally:
            gone.set()  # however the stream ends (the client may have left), the decoding stops

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


class TooLarge(HTTPException):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413, by its Content-Length before
    it is read, or as soon as its streamed chunks pass the limit (uvicorn and FastAPI read any size)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await error(413, f"the request body is over this server's limit of {self.limit:,} bytes")(
                scope, receive, send
            )
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise TooLarge(413, f"the request body is over this server's limit of {self.limit:,} bytes")
            return message

        await self.app(scope, limited, send)


class DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for receiving a whole request. uvicorn's own keep-alive timer
    starts only after a response and stops at the first byte of the next request, so a client that connects
    and sends nothing, or a byte at a time, would hold its connection (and a file descriptor) forever."""

    request_timeout_s = 10.0  # set by create_server

    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline = None
        self._arm()

    def _arm(self):
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout_s, self._expire)

    def _expire(self):
        self._deadline = None
        receiving = self.cycle is None or self.cycle.response_complete or self.cycle.more_body
        if receiving and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes):
        if self.cycle is None or self.cycle.response_complete:
            self._arm()  # a new request starts arriving
        super().data_received(data)
        if self.cycle is not None and not self.cycle.more_body and self._deadline is not None:
            self._deadline.cancel()  # the whole request is in: the model's time is not the client's
            self._deadline = None

    def on_response_complete(self):
        super().on_response_complete()  # may start a pipelined request already in the buffer, whole or not
        receiving = self.cycle is None or self.cycle.response_complete or self.cycle.more_body
        if receiving and not self.transport.is_closing():
            self._arm()  # the next request has its own deadline, however its bytes arrived

    def connection_lost(self, exc):
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)


def create_server(app: FastAPI, host: str, port: int, request_timeout_s: float = 10.0, max_connections: int = 256):
    """The uvicorn server: requests must arrive within ``request_timeout_s``; beyond ``max_connections`` open at
    once, new requests get 503."""
    import uvicorn

    protocol = type("Deadline", (DeadlineProtocol,), {"request_timeout_s": request_timeout_s})
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", http=protocol, limit_concurrency=max_connections
    )
    return uvicorn.Server(config)


def create_app(served: Served, max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="perhead-llama server")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error(400, *_first_error(exc))

    @app.exception_handler(ApiError)
    async def bad(request: Request, exc: ApiError):
        return JSONResponse(status_code=exc.status, content=exc.body())

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException):  # FastAPI's own: unknown path, unparsable body ...
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # invalid UTF-8, nesting, huge numbers
            return error(400, "the request body is not valid JSON (or nests too deep, or holds a number too long)")
        return error(exc.status_code, str(exc.detail))

    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.get("/health")
    def health():
        return {
            "model": served.name,
            "models": served.models(),
            "architecture": served.ev.architecture,
            "engines": {n: d.note for n, d in served.decoders.items()},
            "unavailable": served.unavailable,
            "max_seq_len": served.ev.model.params.max_seq_len,
            "max_tokens_limit": served.max_tokens_limit,
            "chat_template": served.chat is not None,
            "energy": "unavailable: " + served.counter_reason if served.counter is None else served.counter.method,
            **run_metadata(served.ev.device),
        }

    @app.get("/v1/models")
    def models():
        default = served.models()[served.name]
        data = [
            {
                "id": mid,
                "object": "model",
                "created": served.created,
                "owned_by": "perhead-llama",
                "engine": engine,
                "max_model_len": served.ev.model.params.max_seq_len,
            }
            | ({"alias_of": f"{served.name}:{default}"} if mid == served.name else {})
            for mid, engine in served.models().items()
        ]
        return {"object": "list", "data": data}

    async def answer(request: Request, plan: Plan, req: Sampling, chat: bool):
        if req.stream:
            return stream(served, plan, req, chat)
        # The model runs in a worker thread so the server keeps accepting (and queueing) requests meanwhile;
        # a client that leaves stops its decoding at the next token (or before it starts, if it was queued).
        gone = threading.Event()

        def watch(event):
            if gone.is_set():
                raise ClientGone

        task = asyncio.ensure_future(asyncio.to_thread(run, served, plan, watch, gone))
        try:
            while not (await asyncio.wait({task}, timeout=0.05))[0]:
                if await request.is_disconnected():
                    gone.set()
            result = task.result()
        except ClientGone:
            return Response(status_code=499)  # nobody is there to read it
        finally:
            gone.set()
        return completion_body(served, plan, result, chat)

    async def planned(make, req, received: float) -> Plan:
        """The request's plan (its prompts tokenized) in the tokenizer's own thread, never on the event loop:
        a large prompt list must not stall /health and every other client."""
        return await asyncio.get_running_loop().run_in_executor(served.tokenizing, make, served, req, received)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        received = time.perf_counter()
        return await answer(request, await planned(plan_completion, req, received), req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest):
        received = time.perf_counter()
        return await answer(request, await planned(plan_chat, req, received), req, chat=True)

    return app


@dataclass
class Args:
    checkpoint: str = positional()  # checkpoints/<run>, a model folder or a HF model folder
    engines: list[str] = field(default_factory=lambda: list(DECODE_ENGINES))  # engines to serve (those that work)
    host: str = "127.0.0.1"  # interface to bind (loopback by default)
    port: int = 8000
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    max_tokens_limit: int = 512  # the largest max_tokens a request may ask for (at most the context - 1)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    request_timeout: float = 10.0  # seconds a client has to send a whole request (then its connection closes)
    max_connections: int = 256  # connections open at once; beyond, requests get 503
    workdir: str | None = None  # where the ONNX export goes (default: a temporary folder)
    served_model_name: str | None = None  # the model id clients name (default: the checkpoint's name)

    def __post_init__(self):
        for key in ("port", "max_tokens_limit", "max_body_bytes", "request_timeout", "max_connections"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")


def main(argv=None):
    a = parse_args(Args(), argv)
    unknown = [e for e in a.engines if e not in DECODE_ENGINES]
    if unknown:
        raise UserError(f"unknown engine(s) {unknown}; use any of {DECODE_ENGINES}")
    served = load_served(a.checkpoint, a.engines, a.device, a.max_tokens_limit, a.workdir, a.served_model_name)
    print(f"serving {', '.join(served.models())} on http://{a.host}:{a.port}/v1")
    app = create_app(served, a.max_body_bytes)
    create_server(app, a.host, a.port, a.request_timeout, a.max_connections).run()


if __name__ == "__main__":
    run_main(main)
