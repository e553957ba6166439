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

Requests are decoded together, as deployed servers decode them (continuous batching, serve/scheduler.py): a
request's completions join the engine's running batch at the next step while fewer than ``--max-batch``
sequences run, and leave it when they end; each is decoded exactly as it would be alone (greedy answers are
checked against decoding alone at start-up). Engines that cannot batch (ONNX Runtime and OpenVINO with their
batch-1 exports, transformers models with sliding-window layers) decode one sequence at a time, and say so on
/health; ``--max-batch 1``
asks the same of every engine. The model and its engines run in a process of their own, as vLLM's engine core
does (serve/engine_process.py; ``--no-engine-process`` keeps them in the server's), so the event loop and the
decode step never wait for each other's hold on Python. On a CPU the engines' operators use every core but one
(``--threads``): the event loop and HTTP keep the last. The time a request waited for a free slot is
``queue_ms``; ``batched`` says whether it shared steps with other sequences, and then its ``energy`` carries
no figure, since the window's joules are not its own: ``GET /energy`` gives the counter's reading, from which
the load client takes a whole run's J/token. Measurements, beside the OpenAI fields of
each answer (in the last chunk of a stream), follow MLPerf / LLMPerf / GenAI-Perf: ``ttft_ms`` (time to first
token: prompt processing and the first token), ``tpot_ms`` (time per output token after the first:
(e2e - ttft) / (tokens_out - 1)), ``itl_ms`` (each inter-token latency), ``e2e_ms`` (from the start of
processing to the last token; the client adds the HTTP round trip and the queue), ``tokens_in``/``tokens_out``,
and ``energy`` (NVML or RAPL, else "unavailable" with the reason; a request shorter than one second carries no
figure, the counters update too coarsely; idle power is measured once at start-up and the net energy above it
is reported beside the total). With several completions in one request (``n`` > 1 or several prompts), each
choice carries its own ``metrics``; the request's ``tpot_ms`` and ``itl_ms`` are then left out, since they
describe one sequence.

Laid out as vLLM's OpenAI server is: the request types and the text stream in ``serve/api.py``, each request's
plan (its sampling settings, checked and tokenized once) in ``serve/plan.py``, the serving logic (what is
served, decoding in the running batch, measuring) in ``serve/engine.py``, continuous batching in
``serve/scheduler.py``, the answers' shapes (whole or streamed) in ``serve/responses.py``, HTTP transport
(limits, deadlines, error shape) in ``serve/transport.py``, and here only the routes and the command line.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from common.cli import ConfigError, UserError, parse_args, positional, run_main
from common.hardware import run_metadata
from common.load import cores
from runtime.decoding import DECODE_ENGINES
from runtime.loop import ClientGone
from serve.api import ApiError, ChatRequest, CompletionRequest, Sampling
from serve.engine import energy_reading, load_served, run
from serve.engine_process import EngineGone, start_served
from serve.plan import Plan, plan_chat, plan_completion
from serve.responses import completion_body, stream
from serve.served import Served
from serve.transport import MAX_CONNECTIONS, BodyLimit, RequestLimit, create_server, error, first_error

SWITCH_INTERVAL_S = 0.0005

__all__ = ["create_app", "create_server", "load_served", "main"]


def create_app(served: Served, max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="perhead-llama server")
    add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(RequestLimit, limit=served.max_connections)  # outermost: a busy server answers at once
    add_info_routes(app, served)
    add_completion_routes(app, served)
    return app


def add_error_handlers(app: FastAPI):
    """Every error in the OpenAI shape, FastAPI's own included."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error(400, *first_error(exc))

    @app.exception_handler(ApiError)
    async def bad(request: Request, exc: ApiError):
        return JSONResponse(status_code=exc.status, content=exc.body())

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException):  # FastAPI's own: unknown path, unparsable body ...
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # invalid UTF-8, nesting, huge numbers
            return error(400, "the request body is not valid JSON (or nests too deep, or holds a number too long)")
        return error(exc.status_code, str(exc.detail))


def add_info_routes(app: FastAPI, served: Served):
    """/health (what the server serves and how), /energy (its counter now), /v1/models."""

    @app.get("/health")
    def health():
        cpu_s, process = sum(os.times()[:2]), {}
        if served.process is not None:  # the engines' own process: its CPU seconds count as the server's
            pid = served.process.process.pid
            try:
                cpu_s += served.process.status()["cpu_s"]
                process = {"engine_process": {"pid": pid, "state": "running"}}
            except EngineGone as e:
                process = {"engine_process": {"pid": pid, "state": "ended", "why": str(e)}}
            except TimeoutError as e:
                process = {"engine_process": {"pid": pid, "state": "not answering", "why": str(e)}}
        return {
            # the server's own CPU seconds so far: a load client on this machine tells its load from others'
            "process_cpu_s": cpu_s,
            "model": served.name,
            "models": served.models(),
            "architecture": served.architecture,
            "engines": {n: e.note for n, e in served.engines.items()},
            "max_batch": {n: e.max_batch for n, e in served.engines.items()},
            "unavailable": served.unavailable,
            "max_seq_len": served.max_seq_len,
            "max_tokens_limit": served.max_tokens_limit,
            "chat_template": served.chat is not None,
            "threads": served.threads,  # CPU threads of the engines' operators (--threads)
            "energy": served.energy_method,
            **process,
            **(served.process.ready.metadata if served.process else run_metadata(served.device)),
        }

    @app.get("/energy")
    def energy():
        """The energy counter's reading now (joules since an arbitrary start), for a load client to take the
        energy of a whole run (J/token of a batched server) from two readings; or why there is none."""
        if served.process is not None:
            return served.process.status()["energy"]
        return energy_reading(served)

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
                "max_model_len": served.max_seq_len,
            }
            | ({"alias_of": f"{served.name}:{default}"} if mid == served.name else {})
            for mid, engine in served.models().items()
        ]
        return {"object": "list", "data": data}


def add_completion_routes(app: FastAPI, served: Served):
    """/v1/completions and /v1/chat/completions: planned off the event loop, decoded in the engines' batches."""

    async def answer(request: Request, plan: Plan, req: Sampling, chat: bool):
        if req.stream:
            return stream(served, plan, req, chat)
        # The model runs in a worker thread so the server keeps accepting (and queueing) requests meanwhile;
        # a client that leaves stops its decoding at the next token (or before it starts, if it was queued).
        gone = threading.Event()

        def watch(event):
            if gone.is_set():
                raise ClientGone

        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(loop.run_in_executor(served.requests, run, served, plan, watch, gone))
        try:
            while not (await asyncio.wait({task}, timeout=0.05))[0]:
                if await request.is_disconnected():
                    gone.set()
            result = task.result()
        except ClientGone:
            return Response(status_code=499)  # nobody is there to read it
        except EngineGone as e:  # the engines' process died: nothing is served until the server restarts
            raise ApiError(503, str(e)) from None
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
    max_connections: int = MAX_CONNECTIONS  # connections open at once; beyond, requests get 503
    workdir: str | None = None  # where the ONNX export goes (default: a temporary folder)
    served_model_name: str | None = None  # the model id clients name (default: the checkpoint's name)
    max_batch: int = 8  # sequences an engine decodes together (continuous batching); 1: one at a time
    threads: int | None = None  # CPU threads for the engines' operators (default: the cores less one, at least 1)
    engine_process: bool = True  # the model and its engines in a process of their own (--no-engine-process: here)

    def __post_init__(self):
        keys = ("port", "max_tokens_limit", "max_body_bytes", "request_timeout", "max_connections", "max_batch")
        for key in keys + (("threads",) if self.threads is not None else ()):
            if not getattr(self, key) > 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")


def engine_threads(requested: int | None) -> int:
    """CPU threads for the engines' operators: ``requested``, else every core but one. The event loop, the text
    streams and the HTTP layer need a core of their own while a step runs: torch's OpenMP workers that share a
    core with them wait for each other at every operator (one probe each: 8 streams on a 2-core CPU decoded 289
    tokens/s with 2 threads, 779 with 1). Recorded in /health's ``device``."""
    return requested if requested is not None else max(1, cores() - 1)


def main(argv=None):
    a = parse_args(Args(), argv)
    # The decode thread and the event loop share the GIL: at Python's default 5 ms switch interval, a token
    # ready on one side waits up to 5 ms for the other to let go (measured: 8 streams on a 2-core CPU gave
    # ~20% more tokens/s at 0.5 ms).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    threads = engine_threads(a.threads)
    unknown = [e for e in a.engines if e not in DECODE_ENGINES]
    if unknown:
        raise UserError(f"unknown engine(s) {unknown}; use any of {DECODE_ENGINES}")
    load = (a.checkpoint, a.engines, a.device, a.max_tokens_limit, a.workdir, a.served_model_name, a.max_batch)
    if a.engine_process:
        served = start_served(*load, a.max_connections, threads=threads, switch_interval_s=SWITCH_INTERVAL_S)
    else:
        torch.set_num_threads(threads)
        served = load_served(*load, a.max_connections)
    print(f"serving {', '.join(served.models())} on http://{a.host}:{a.port}/v1")
    app = create_app(served, a.max_body_bytes)
    try:
        create_server(app, a.host, a.port, a.request_timeout, a.max_connections).run()
    finally:
        if served.process is not None:  # the engines' process ends with the server (its pipe closes)
            served.process.close()


if __name__ == "__main__":
    run_main(main)
