"""The engines in a process of their own, as vLLM's V1 server runs its engine core: the HTTP side (event loop,
request plans, server-sent events) in the server's process, the model, its engines and their schedulers of
continuous batching in a child process, the two joined by a pipe.

Why: in one process the decode thread and the event loop share Python's GIL. A small model's step is mostly
Python (transformers' forward), so every token's chunk built and written by the event loop holds the decode
thread back, and 8 streams to a tiny Hugging Face folder got x2.9 the tokens/s of one stream at a time where
the engine alone does x5 (bench/RESULTS.md). Apart, each side has its own interpreter.

The child (``engine_main``) loads the model as ``serve.engine.load_served`` does, checks every engine, and then
runs each request it is sent with ``serve.engine.run`` in a thread of its own, exactly as the one-process server
does: the same schedulers, text streams, stop strings and measurements. What crosses the pipe: a request's
``Plan`` one way; its ``StreamEvent``s (one message per decode step, every sequence's together) and then its
``RunResult`` or its error back; a cancel when its client leaves. The server's ``Served`` keeps only what HTTP
needs (the tokenizer, the model's context, each engine's note) and an ``EngineProcess`` whose ``run`` stands in
for ``serve.engine.run``; ``--no-engine-process`` keeps the engines in the server's process.

A child that dies (killed, out of memory) fails the requests in flight and every later one with a one-line
error naming its exit code (503), and /health says so; the child leaves when the server's end of the pipe
closes (the server exited, however), and ignores Ctrl-C, which the server handles.

The child is a fresh interpreter (``python -m serve.engine_process``, started by ``subprocess``), not a
multiprocessing child: a spawned one would run the caller's main script again, and a forked one would inherit
a started torch (CUDA cannot be forked). Written by hand: the transport is a socket pair read and written by
multiprocessing's ``Connection`` (pickled dataclasses); a library such as ZeroMQ (vLLM's) would add a
dependency for what one pipe between two processes does here.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from common.cli import UserError, failure, silence_known_noise
from common.hardware import run_metadata
from runtime.loop import ClientGone
from serve.engine import energy_reading, load_served, run
from serve.served import EngineInfo, Served

START_POLL_S = 0.5  # how often the server looks whether a starting child is still alive
WAIT_POLL_S = 0.05  # how often a waiting request looks whether its client left
STATUS_TIMEOUT_S = 5.0  # /health and /energy wait this long for the child's answer


USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError)  # bad input, not a bug


class EngineGone(RuntimeError):
    """The engine process ended: nothing more can be decoded until the server restarts."""


@dataclass(frozen=True)
class Ready:
    """The child's answer once its engines are checked: what the HTTP side needs to plan and describe."""

    name: str
    architecture: str
    max_seq_len: int
    device: str
    tokenizer: tuple[type, str]  # (its class, its path): the server loads the same files
    engines: dict[str, EngineInfo]
    unavailable: dict
    max_tokens_limit: int
    max_token_bytes: int
    threads: int
    idle_power_w: float | None
    energy: str  # the energy counter's method, or "unavailable: <why>"
    metadata: dict  # common.hardware.run_metadata of the engines' device


def _sendable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling as itself, else a RuntimeError with its one-line record."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(failure(e, 300))


def engine_main(conn, load: dict, threads: int, switch_interval_s: float) -> None:
    """The child: load and check the engines (``load``: load_served's arguments), say ``Ready`` (or why not),
    then serve requests until the server's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's; the child ends when the pipe closes
    sys.setswitchinterval(switch_interval_s)
    torch.set_num_threads(threads)
    silence_known_noise()
    child = _Child(conn)
    try:
        served = load_served(**load)
    except BaseException as e:  # noqa: BLE001 - the server raises it (a bug's traceback is printed here)
        if not isinstance(e, USER_ERRORS):
            traceback.print_exc()
        child.send(("failed", _sendable(e)))
        return
    child.send(("ready", _ready(served)))
    child.serve(served)


def _ready(served: Served) -> Ready:
    tok = served.ev.tokenizer
    return Ready(
        name=served.name,
        architecture=served.architecture,
        max_seq_len=served.max_seq_len,
        device=served.device,
        tokenizer=(type(tok), str(tok.path)),
        engines=served.engines,
        unavailable=served.unavailable,
        max_tokens_limit=served.max_tokens_limit,
        max_token_bytes=served.max_token_bytes,
        threads=torch.get_num_threads(),
        idle_power_w=served.idle_power_w,
        energy=served.energy_method,
        metadata=run_metadata(served.ev.device),
    )


class _Child:
    """The child's end of the pipe: requests in, each run in a thread of its own; their events out, one message
    per decode step (sent when the step ends: ``flush``), and a request's result after its events."""

    def __init__(self, conn):
        self.conn, self.lock = conn, threading.Lock()
        self.events: list = []  # (request, StreamEvent) of the step running
        self.cancels: dict[int, threading.Event] = {}

    def _flush(self) -> None:  # holding the lock
        if self.events:
            self.conn.send(("events", None, self.events[:]))
            self.events.clear()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def send(self, message) -> None:
        with self.lock:
            self._flush()  # a request's events always go before its result
            self.conn.send(message)

    def serve(self, served: Served) -> None:
        for scheduler in served.schedulers.values():
            scheduler.after_step = self.flush  # one message per step, however many sequences it advanced
        pool = ThreadPoolExecutor(served.max_connections, "request")
        while True:
            try:
                kind, rid, *rest = self.conn.recv()
            except (EOFError, OSError):  # the server is gone: its requests stop, and this process ends
                for gone in list(self.cancels.values()):
                    gone.set()
                pool.shutdown(wait=True, cancel_futures=True)
                return
            if kind == "run":
                self.cancels[rid] = threading.Event()
                pool.submit(self.run, served, rid, rest[0], rest[1], self.cancels[rid])
            elif kind == "cancel" and rid in self.cancels:
                self.cancels[rid].set()
            elif kind == "status":
                self.send(("result", rid, _status(served)))

    def run(self, served: Served, rid: int, plan, streaming: bool, gone: threading.Event) -> None:
        def emit(event):
            if gone.is_set():
                raise ClientGone
            with self.lock:
                self.events.append((rid, event))

        try:
            self.send(("result", rid, run(served, plan, emit if streaming else None, gone)))
        except BaseException as e:  # noqa: BLE001 - the request's error goes back to it
            self.send(("error", rid, _sendable(e)))
        finally:
            self.cancels.pop(rid, None)


def _status(served: Served) -> dict:
    engines = {
        n: {"running": len(s.running), "largest_batch": s.largest_batch, "decoded": s.batch.decoded}
        for n, s in served.schedulers.items()
    }
    return {"cpu_s": sum(os.times()[:2]), "energy": energy_reading(served), "engines": engines}


class _Waiting:
    """The server's record of a call running in the child: where its events go, whether its client left, and
    its result or error once it ends."""

    def __init__(self, emit):
        self.emit, self.left = emit, False
        self.done = threading.Event()
        self.result = self.error = None


class EngineProcess:
    """The server's end of the engine process: starts it, waits until its engines are checked, then runs
    requests in it (``run``, as serve.engine.run) and reads its state (``status``)."""

    def __init__(self, load: dict, threads: int, switch_interval_s: float):
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])  # the project, importable wherever the server was started
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        args = [str(theirs.fileno()), json.dumps(load), str(threads), str(switch_interval_s)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serve.engine_process", *args], pass_fds=(theirs.fileno(),), env=env
        )
        theirs.close()
        self.socket = ours  # shut down by ``close``: closing a descriptor another thread reads would not end it
        self.conn = Connection(os.dup(ours.fileno()))
        try:
            self.ready = self._wait_ready()
        except BaseException:  # it failed, or Ctrl-C while it started: nothing of it is left behind
            self.close()
            raise
        self.send_lock, self.ids = threading.Lock(), itertools.count()
        self.waiting: dict[int, _Waiting] = {}
        self.ended: str | None = None  # why the child is gone, once it is
        threading.Thread(target=self._read, name="engine-reader", daemon=True).start()

    def _wait_ready(self) -> Ready:
        while not self.conn.poll(START_POLL_S):
            if self.process.poll() is not None:
                raise UserError(f"the engine process ended while starting (exit code {self.process.returncode})")
        try:
            kind, what = self.conn.recv()
        except (EOFError, OSError):
            raise UserError(f"the engine process ended while starting (exit code {self._exit_code()})") from None
        if kind != "ready":
            self._exit_code()
            raise what
        return what

    def _send(self, message) -> None:
        with self.send_lock:
            self.conn.send(message)

    def _read(self) -> None:
        """The one reader of the child's messages: a request's events to its stream, its end to its waiter."""
        while True:
            try:
                kind, rid, what = self.conn.recv()
            except (EOFError, OSError):
                break
            if kind == "events":
                for rid, event in what:
                    self._emit(rid, event)
                continue
            waiting = self.waiting.get(rid)
            if waiting is not None:
                waiting.result, waiting.error = (what, None) if kind == "result" else (None, what)
                waiting.done.set()
        self.ended = self._why_ended()
        for waiting in list(self.waiting.values()):
            waiting.error = EngineGone(self.ended)
            waiting.done.set()

    def _emit(self, rid: int, event) -> None:
        waiting = self.waiting.get(rid)
        if waiting is None or waiting.left:
            return
        try:
            waiting.emit(event)
        except Exception:  # the client left (ClientGone) or its stream broke: the child stops the request
            waiting.left = True
            self._cancel(rid)

    def _exit_code(self) -> int | None:
        """The child's exit code once it has ended (waited for up to 5 s), else None."""
        try:
            return self.process.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def _why_ended(self) -> str:
        return f"the engine process ended (exit code {self._exit_code()}); restart the server"

    def _cancel(self, rid: int) -> None:
        try:
            self._send(("cancel", rid))
        except OSError:
            pass  # the child is gone: the reader fails the request

    def _call(self, kind: str, payload=(), emit=None, gone: threading.Event | None = None, timeout_s=None):
        if self.ended:
            raise EngineGone(self.ended)
        rid = next(self.ids)
        waiting = self.waiting[rid] = _Waiting(emit)
        try:
            try:
                self._send((kind, rid, *payload))
            except OSError:
                raise EngineGone(self.ended or self._why_ended()) from None
            cancelled, deadline = False, None if timeout_s is None else time.monotonic() + timeout_s
            while not waiting.done.wait(WAIT_POLL_S):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the engine process did not answer in {timeout_s:g} s")
                if self.ended:  # the reader saw the child end (and may have failed the others before this one)
                    raise EngineGone(self.ended)
                if not cancelled and (waiting.left or (gone is not None and gone.is_set())):
                    cancelled = True
                    self._cancel(rid)
        finally:
            self.waiting.pop(rid, None)
        if waiting.left:
            raise ClientGone
        if waiting.error is not None:
            raise waiting.error
        return waiting.result

    def run(self, plan, emit=None, gone: threading.Event | None = None):
        """serve.engine.run of ``plan`` in the child: ``emit`` hears its StreamEvents; raises ClientGone if the
        client left, else the engine's error."""
        return self._call("run", (plan, emit is not None), emit, gone)

    def status(self) -> dict:
        """The child's CPU seconds, its energy counter's reading and each engine's sequences running, largest
        batch and tokens decoded so far (TimeoutError if it does not answer in STATUS_TIMEOUT_S)."""
        return self._call("status", timeout_s=STATUS_TIMEOUT_S)

    def close(self) -> None:
        """End the child: its end of the pipe closes, its requests stop and it exits (killed after 10 s)."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)  # the child reads the end of its pipe; so does the reader here
        except OSError:
            pass  # the child already ended
        self.conn.close()
        self.socket.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_served(*args, threads: int = 1, switch_interval_s: float = 0.005, **kwargs) -> Served:
    """``load_served(*args, **kwargs)``'s model and engines in a process of their own, with ``threads`` CPU threads
    for their operators; the ``Served`` returned holds what HTTP needs and runs requests there."""
    try:
        bound = inspect.signature(load_served).bind(*args, **kwargs)
    except TypeError as e:  # the same arguments load_served takes, checked here before a process starts
        raise TypeError(f"start_served takes load_served's arguments: {e}") from None
    bound.apply_defaults()
    load = dict(bound.arguments)
    load["workdir"] = None if load["workdir"] is None else str(load["workdir"])  # sent as JSON
    process = EngineProcess(load, threads, switch_interval_s)
    ready = process.ready
    kind, path = ready.tokenizer
    try:
        tokenizer = kind(path)  # the child's tokenizer files, for planning requests here
    except BaseException:
        process.close()
        raise
    return Served(
        None,
        {},
        ready.unavailable,
        ready.max_tokens_limit,
        ready.max_token_bytes,
        max_connections=load["max_connections"],
        energy_method=ready.energy,
        idle_power_w=ready.idle_power_w,
        name=ready.name,
        tokenizer=tokenizer,
        max_seq_len=ready.max_seq_len,
        architecture=ready.architecture,
        device=ready.device,
        engines=ready.engines,
        threads=ready.threads,
        process=process,
    )


if __name__ == "__main__":  # the child: python -m serve.engine_process <fd> <load as JSON> <threads> <interval>
    from serve import engine_process  # this module by its own name: what it sends unpickles in the server

    fd, load, threads, interval = sys.argv[1:]
    engine_process.engine_main(Connection(int(fd)), json.loads(load), int(threads), float(interval))
