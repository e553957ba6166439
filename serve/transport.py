"""HTTP transport for serve/server.py: error answers in the OpenAI shape, a body-size limit, and a uvicorn
protocol with a deadline for receiving a whole request (pipelined requests included)."""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.api import ApiError

STOP_GRACE_S = 5  # seconds requests in flight get to finish once the server is asked to stop (Ctrl-C, SIGTERM)
MAX_CONNECTIONS = 256  # connections open at once (serve.server --max-connections); beyond, requests get 503


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """Every error the server answers, in the OpenAI shape."""
    return JSONResponse(status_code=status, content=ApiError(status, message, param, code).body())


def first_error(exc: RequestValidationError) -> tuple[str, str | None]:
    e = exc.errors()[0]
    loc = [str(x) for x in e.get("loc", []) if x != "body"]
    where = ".".join(loc) or "body"
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if e.get("type") == "extra_forbidden":
        return f"{where}: unknown field (see the OpenAI API reference; misspelt?)", where
    msg = e.get("msg", "invalid").removeprefix("Value error, ")
    return f"{where}: {msg}", (loc[0] if loc else None)


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


class RequestLimit:
    """ASGI middleware: at most ``limit`` requests in flight; one more is answered 503 in the OpenAI error shape at
    once (uvicorn's own limit, kept above this one for idle connections, answers in plain text)."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            busy = f"the server has {self.limit} requests in flight (--max-connections); try again shortly"
            return await error(503, busy, code="overloaded")(scope, receive, send)
        self.in_flight += 1  # one event loop: no other coroutine runs between the check and this
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


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


def create_server(
    app: FastAPI, host: str, port: int, request_timeout_s: float = 10.0, max_connections: int = MAX_CONNECTIONS
):
    """The uvicorn server: requests must arrive within ``request_timeout_s``; beyond ``max_connections`` requests
    in flight, new ones get 503 in the OpenAI shape (the app's RequestLimit); uvicorn itself refuses connections
    beyond twice that many (idle ones included), in plain text."""
    protocol = type("Deadline", (DeadlineProtocol,), {"request_timeout_s": request_timeout_s})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=protocol,
        limit_concurrency=2 * max_connections,
        timeout_graceful_shutdown=STOP_GRACE_S,  # then streams still open are cut (their decoding stops with them)
    )
    return Server(config)


class Server(uvicorn.Server):
    """uvicorn's server, saying when it stops and how long it waits (its own log level is warnings only)."""

    def handle_exit(self, sig, frame):
        if not self.should_exit:
            print(f"stopping: requests in flight get {STOP_GRACE_S} s to finish", file=sys.stderr, flush=True)
        super().handle_exit(sig, frame)
