"""An HTTP endpoint (FastAPI + uvicorn) that completes prompts with a chosen runtime engine and returns, with
each completion, its measurements.

    python -m serve.server checkpoints/tiny --engines torch onnxruntime openvino      # http://127.0.0.1:8000
    curl -s 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"prompt": "def add(a, b):", "max_tokens": 32, "engine": "onnxruntime"}'

Serves this project's checkpoints and Hugging Face model folders (torch engine), each engine checked token
for token against eager greedy decoding at start-up (an engine that fails to build or differs is listed
under ``unavailable`` with the reason). Binds to 127.0.0.1 unless told otherwise.

Limits, so that no client can exhaust the server: a request body is at most ``--max-body-bytes`` (413 above
it, counted as it arrives), a prompt far longer than the context is refused (or cut, with ``truncate_prompt``)
before it is tokenized, and a client has ``--request-timeout`` seconds from its first byte to send a whole
request (a connection that sends nothing, or a byte at a time, is closed).

Requests are served one at a time, in arrival order, so that a request's latency and energy are its own;
the time a request waited for the ones before it is ``queue_ms``. Measurements follow MLPerf / LLMPerf /
GenAI-Perf: ``ttft_ms`` (time to first token: prompt processing and the first token), ``tpot_ms`` (time per
output token after the first: (e2e - ttft) / (tokens_out - 1)), ``itl_ms`` (each inter-token latency),
``e2e_ms`` (from the start of processing to the last token; the client adds the HTTP round trip and the
queue), ``tokens_in``/``tokens_out``, and ``energy`` (NVML or RAPL, else "unavailable" with the reason; a
request shorter than one second carries no figure, the counters update too coarsely; idle power is measured
once at start-up and the net energy above it is reported beside the total).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from common.cli import ConfigError, UserError, failure, parse_args, positional, run_main
from common.energy import MIN_WINDOW_S as MIN_ENERGY_WINDOW_S
from common.energy import EnergyMeter, find_counter
from common.hardware import run_metadata
from eval.generate import cut_at_stops, fit_prompt, stop_check
from eval.model import load_for_eval
from runtime.decoding import DECODE_ENGINES, build_decoder, check

IDLE_S = 2.0  # idle power measured this long when the server starts
TOKENS_PER_CHAR_SLACK = 4  # normalisation may merge characters: the cheap length bound allows 4x for it
CHECK_PROMPTS = ("def add(a, b):\n", "import os\n", "class Stack:\n    def __init__(self):")


class CompletionRequest(BaseModel):
    prompt: str = Field(min_length=1, description="text to continue")
    max_tokens: int = Field(32, gt=0, description="new tokens at most")
    engine: str = Field("torch", description="runtime engine; GET /health lists those served")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling (with temperature > 0)")
    stop: list[str] = Field(default_factory=list, description="stop strings (the completion ends before them)")
    seed: int = Field(0, ge=-(2**63), le=2**64 - 1, description="sampling seed (torch.Generator's range)")
    truncate_prompt: bool = Field(False, description="keep the end of a prompt too long for the context (else 413)")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def error(status: int, message: str) -> JSONResponse:
    """Every error the server answers, in one shape."""
    return JSONResponse(status_code=status, content={"error": message})


def _first_error(exc: RequestValidationError) -> str:
    e = exc.errors()[0]
    where = ".".join(str(x) for x in e.get("loc", []) if x != "body") or "body"
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    return f"{where}: {e.get('msg', 'invalid')}"


@dataclass
class Served:
    """The model, its engines and what the server was asked to do."""

    ev: object
    decoders: dict
    unavailable: dict
    max_tokens_limit: int
    max_token_bytes: int = 1  # the longest token's UTF-8 bytes: a prompt's length bounds its token count
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: object = None
    counter_reason: str | None = None
    idle_power_w: float | None = None  # measured at start-up; each request's net energy subtracts it


def load_served(
    checkpoint: str, engines: list[str], device: str, max_tokens_limit: int, workdir: Path | None
) -> Served:
    ev = load_for_eval(checkpoint, device, "float32")  # numerics as the ONNX / OpenVINO exports (float32)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="serve-"))
    S = ev.model.params.max_seq_len
    n_check = max(1, min(16, S // 4))  # new tokens compared per check prompt; prompts cut to leave room
    prompts = [ev.tokenizer.encode(p)[-(S - n_check) :] for p in CHECK_PROMPTS]
    decoders, unavailable = {}, {}
    for name in engines:  # exports and compilation take most of the start-up: each says what it is doing
        t0 = time.perf_counter()
        print(f"engine {name}: building and checking against eager decoding ...", flush=True)
        try:
            decoder = build_decoder(name, ev.model, ev.device, workdir)
            check(decoder, ev.model, prompts, n_check)
            decoders[name] = decoder
            print(f"engine {name}: ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        except Exception as e:  # reported on /health and in every answer, never hidden
            unavailable[name] = failure(e, 200)
            print(f"engine {name}: not served ({unavailable[name]})", flush=True)
    if not decoders:
        raise UserError(f"no engine could serve {checkpoint}: {unavailable}")
    counter, reason = find_counter(ev.device)
    longest = max(1, int(ev.tokenizer.token_bytes().max()))
    max_tokens_limit = min(max_tokens_limit, S - 1)  # at least one prompt token must fit beside the completion
    served = Served(ev, decoders, unavailable, max_tokens_limit, longest, counter=counter, counter_reason=reason)
    if counter is not None:  # idle power once, at start: a request is too short to measure it beside
        with EnergyMeter(ev.device, idle_s=IDLE_S, counter=counter) as meter:
            pass
        served.idle_power_w = meter.idle_power_w
    return served


def complete(served: Served, req: CompletionRequest, received: float) -> dict:
    """Run one request (the caller holds no lock; this takes the server's)."""
    ev = served.ev
    if req.engine not in served.decoders:
        known = ", ".join(served.decoders)
        why = f" ({served.unavailable[req.engine]})" if req.engine in served.unavailable else ""
        raise BadRequest(400, f"engine {req.engine!r} is not served{why}; use one of: {known}")
    if req.max_tokens > served.max_tokens_limit:
        raise BadRequest(
            400,
            f"max_tokens {req.max_tokens} is over this server's limit of {served.max_tokens_limit} (the model's "
            f"context holds {ev.model.params.max_seq_len} tokens, prompt included)",
        )
    room = ev.model.params.max_seq_len - req.max_tokens
    # A token stands for at most max_token_bytes bytes (>= characters), so a prompt with more characters than
    # room x that (x slack for normalisation) cannot fit: refuse it, or keep only its end, before tokenizing.
    most_chars = (room + 16) * served.max_token_bytes * TOKENS_PER_CHAR_SLACK
    cut = len(req.prompt) > most_chars
    if cut and not req.truncate_prompt:
        raise BadRequest(
            413,
            f"the prompt has {len(req.prompt):,} characters; with max_tokens {req.max_tokens} at most {room} "
            "tokens fit the context (or pass truncate_prompt)",
        )
    ids = ev.tokenizer.encode(req.prompt[-most_chars:] if cut else req.prompt, bos=not cut)
    truncated = cut or (len(ids) > room and req.truncate_prompt)
    if truncated:  # the end of the prompt is what the model continues
        ids = fit_prompt(ids, ev.model.params.max_seq_len, req.max_tokens)
    if len(ids) > room:
        raise BadRequest(
            413, f"the prompt is {len(ids)} tokens; with max_tokens {req.max_tokens} at most {room} fit the context"
        )
    decoder = served.decoders[req.engine]
    tok = ev.tokenizer
    stop = stop_check(tok, req.stop)
    with served.lock:
        started = time.perf_counter()
        meter = EnergyMeter(ev.device, idle_s=0, counter=served.counter, reason=served.counter_reason)
        with meter:
            out, times = decoder.generate(ids, req.max_tokens, req.temperature, req.top_p, tok.eos_id, stop, req.seed)
        meter.idle_power_w = served.idle_power_w
        energy = meter.result(units=len(out) or None, unit="token", min_window_s=MIN_ENERGY_WINDOW_S)
    text = cut_at_stops(tok.decode(out), req.stop)
    itl = [1e3 * (b - a) for a, b in zip(times, times[1:], strict=False)]
    e2e = 1e3 * times[-1] if times else 0.0
    return {
        "completion": text,
        "engine": req.engine,
        "engine_note": decoder.note,
        "device": str(ev.device),
        "model": ev.name,
        "tokens_in": len(ids),
        "prompt_truncated": truncated,
        "tokens_out": len(out),
        "queue_ms": 1e3 * (started - received),
        "ttft_ms": 1e3 * times[0] if times else None,
        "tpot_ms": (e2e - 1e3 * times[0]) / (len(out) - 1) if len(out) > 1 else None,
        "itl_ms": itl,
        "e2e_ms": e2e,
        "energy": energy,
    }


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
        return error(400, _first_error(exc))

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest):
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException):  # FastAPI's own: unknown path, unparsable body ...
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # invalid UTF-8, nesting, huge numbers
            return error(400, "the request body is not valid JSON (or nests too deep, or holds a number too long)")
        return error(exc.status_code, str(exc.detail))

    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.get("/health")
    def health():
        return {
            "model": served.ev.name,
            "architecture": served.ev.architecture,
            "engines": {n: d.note for n, d in served.decoders.items()},
            "unavailable": served.unavailable,
            "max_seq_len": served.ev.model.params.max_seq_len,
            "max_tokens_limit": served.max_tokens_limit,
            "energy": "unavailable: " + served.counter_reason if served.counter is None else served.counter.method,
            **run_metadata(served.ev.device),
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        received = time.perf_counter()
        # the model runs in a worker thread so the server keeps accepting (and queueing) requests meanwhile
        return await asyncio.to_thread(complete, served, req, received)

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

    def __post_init__(self):
        for key in ("port", "max_tokens_limit", "max_body_bytes", "request_timeout", "max_connections"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")


def main(argv=None):
    a = parse_args(Args(), argv)
    unknown = [e for e in a.engines if e not in DECODE_ENGINES]
    if unknown:
        raise UserError(f"unknown engine(s) {unknown}; use any of {DECODE_ENGINES}")
    served = load_served(a.checkpoint, a.engines, a.device, a.max_tokens_limit, a.workdir)
    print(f"serving {served.ev.name} with {', '.join(served.decoders)} on http://{a.host}:{a.port}")
    app = create_app(served, a.max_body_bytes)
    create_server(app, a.host, a.port, a.request_timeout, a.max_connections).run()


if __name__ == "__main__":
    run_main(main)
