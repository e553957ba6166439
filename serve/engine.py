"""The serving logic of serve/server.py, apart from HTTP: what is served (``Served``: the model, its checked
engines, each with its scheduler of continuous batching, the energy counter), each request checked and
tokenized into a ``Plan`` (engine, prompt ids, seeds, sampling settings), and ``run``, which decodes a plan's
choices in the engine's running batch and measures them (latency per token, energy)."""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from common.cli import UserError, failure
from common.energy import EnergyMeter, find_counter, min_window_for
from runtime.batching import build_slots
from runtime.decoding import build_decoder
from runtime.engines import Slots, check
from runtime.loading import load_model
from runtime.loop import ClientGone, Sequence
from serve.detokenize import LogprobsHeld, TextStream, logprob_entry
from serve.plan import Plan
from serve.scheduler import Scheduler
from serve.served import Served
from serve.transport import MAX_CONNECTIONS

IDLE_S = 2.0  # idle power measured this long when the server starts
CHECK_PROMPTS = ("def add(a, b):\n", "import os\n", "class Stack:\n    def __init__(self):")
DEFAULT_MAX_BATCH = 8  # sequences decoded together by an engine that batches


def load_served(
    checkpoint: str,
    engines: list[str],
    device: str,
    max_tokens_limit: int,
    workdir: Path | None,
    name: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_connections: int = MAX_CONNECTIONS,
) -> Served:
    ev = load_model(checkpoint, device, "float32")  # numerics as the ONNX / OpenVINO exports (float32)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="serve-"))
    S = ev.model.params.max_seq_len
    n_check = max(1, min(16, S // 4))  # new tokens compared per check prompt; prompts cut to leave room
    prompts = [ev.tokenizer.encode(p)[-(S - n_check) :] for p in CHECK_PROMPTS]
    slots, unavailable = {}, {}
    for engine in engines:  # exports and compilation take most of the start-up: each says what it is doing
        t0 = time.perf_counter()
        print(f"engine {engine}: building and checking against eager decoding ...", flush=True)
        try:
            decoder = build_decoder(engine, ev.model, ev.device, workdir)
            check(decoder, ev.model, prompts, n_check)
            slots[engine] = build_slots(decoder, ev.model, ev.device, max_batch)
            # the engine served (a batching one, or the decoder itself), through the server's decode loop:
            # sequences joining and leaving a full batch, each as if alone
            Slots.check(slots[engine], ev.model, prompts, n_check)
            print(f"engine {engine}: ready ({time.perf_counter() - t0:.0f} s; {slots[engine].note})", flush=True)
        except Exception as e:  # reported on /health and in every answer, never hidden
            unavailable[engine] = failure(e, 200)
            print(f"engine {engine}: not served ({unavailable[engine]})", flush=True)
    if not slots:
        raise UserError(f"no engine could serve {checkpoint}: {unavailable}")
    counter, reason = find_counter(ev.device)
    longest = max(1, int(ev.tokenizer.token_bytes().max()))
    max_tokens_limit = min(max_tokens_limit, S - 1)  # at least one prompt token must fit beside the completion
    # the id clients name: the folder the user gave (checkpoints/tiny -> "tiny"), a step folder by its run and step
    given = Path(checkpoint).name
    name = name or (given if given and not given.startswith("step_") else ev.name)
    lock = threading.Lock()
    schedulers = {engine: Scheduler(s, lock) for engine, s in slots.items()}
    served = Served(
        ev,
        schedulers,
        unavailable,
        max_tokens_limit,
        longest,
        lock,
        threads=torch.get_num_threads(),
        max_connections=max_connections,
        counter=counter,
        counter_reason=reason,
        name=name,
    )
    if counter is not None:  # idle power once, at start: a request is too short to measure it beside
        with EnergyMeter(ev.device, idle_s=IDLE_S, counter=counter) as meter:
            pass
        served.idle_power_w = meter.idle_power_w
    return served


@dataclass(frozen=True)
class ChoiceResult:
    """One choice decoded: its text and finish reason, the log-probability entries sent with it, and its own
    clock (``start_s``: when it joined the batch, from the first choice's start; latencies from there)."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: list[dict]
    start_s: float
    tokens_out: int
    ttft_ms: float | None
    tpot_ms: float | None
    itl_ms: list[float]
    e2e_ms: float

    def metrics(self) -> dict:
        return {k: getattr(self, k) for k in ("tokens_out", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")}


@dataclass(frozen=True)
class Measures:
    """The server's own figures about a request, sent beside the answer (its fields are the response's)."""

    engine: str
    engine_note: str
    device: str
    tokens_in: int
    tokens_out: int
    prompt_truncated: bool
    queue_ms: float
    batched: bool
    ttft_ms: float | None  # one choice: its own clock; several: from the start of the first
    tpot_ms: float | None
    itl_ms: list[float] | None
    e2e_ms: float
    energy: dict

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunResult:
    choices: list[ChoiceResult]
    measures: Measures


def _metrics(times: list[float], n_out: int) -> dict:
    e2e = 1e3 * times[-1] if times else 0.0
    return {
        "tokens_out": n_out,
        "ttft_ms": 1e3 * times[0] if times else None,
        "tpot_ms": (e2e - 1e3 * times[0]) / (n_out - 1) if n_out > 1 else None,
        "itl_ms": [1e3 * (b - a) for a, b in zip(times, times[1:], strict=False)],
        "e2e_ms": e2e,
    }


@dataclass(frozen=True)
class StreamEvent:
    """What a stream hears of choice ``index`` as it decodes: ``kind`` "token" (a token's text, ``delta``: what
    may be sent now), "last" (a token that ends the choice, with its ``finish`` reason) or "end" (the choice ended
    after its last token, at EOS or a departed client: the text held back until then, and the finish reason);
    ``logprobs``: the log-probability entries released with it (tokens whose text has been sent whole)."""

    kind: Literal["token", "last", "end"]
    index: int
    delta: str
    logprobs: list[dict]
    finish: str | None = None


def _sequence(served: Served, plan: Plan, index: int, emit, gone) -> tuple[Sequence, dict]:
    """Choice ``index`` of ``plan`` as a sequence for the scheduler, and the record its callbacks fill."""
    tok = served.ev.tokenizer
    p, seed = plan.choices[index]
    how = dataclasses.replace(plan.how, seed=seed)
    text, held = TextStream(tok.decode, list(how.stop), tok.cleans_spaces), LogprobsHeld()
    record = {"index": index, "text": "", "finish_reason": None, "logprobs": []}
    seq = Sequence(
        plan.prompts[p],
        how,
        eos_id=tok.eos_id if plan.eos else None,
        # the text stream finds stop strings as it goes, so the sequence never decodes its whole text again
        stop=(lambda tokens: text.hit) if how.stop else None,
        gone=gone,
    )

    def on_token(token, logits):
        if how.logprobs is not None:
            held.add(logprob_entry(tok, text.ids, token, logits, how.logprobs))
        delta = text.push(token)
        held.settle(text.settled)
        released = held.release(len(text.sent))  # the tokens whose text has been sent whole
        record["logprobs"] += released
        if text.hit or len(seq.tokens) >= how.max_tokens:
            # this token ends the choice (a stop string, or its length): its text and the finish reason go out as
            # one event, so a stream of n tokens is n chunks, as vLLM sends it (the scheduler's on_end then adds
            # nothing); an end at EOS comes a step later, in a chunk of its own, as in vLLM
            last, finish, more = finished()
            if emit is not None:
                emit(StreamEvent("last", index, delta + last, released + more, finish))
        elif emit is not None:
            emit(StreamEvent("token", index, delta, released))

    def finished():
        last = text.finish()
        held.settle(text.settled)
        released = held.release(len(text.sent))  # the rest (cut by the stop string, or into): dropped
        record["logprobs"] += released
        finish = "stop" if text.stopped() or len(seq.tokens) < how.max_tokens else "length"
        record.update(text=text.sent, finish_reason=finish)
        return last, finish, released

    def on_end():
        if record["finish_reason"] is not None:
            return  # ended with its last token (on_token)
        last, finish, released = finished()
        if emit is not None:
            emit(StreamEvent("end", index, last, released, finish))

    seq.on_token, seq.on_end = on_token, on_end
    return seq, record


def run(served: Served, plan: Plan, emit=None, gone: threading.Event | None = None) -> RunResult:
    """Decode every choice of ``plan`` in its engine's running batch (serve/scheduler.py) and measure them.
    ``emit(event)``, if given, hears a ``StreamEvent`` per token ("token"; "last" for a token that ends its
    choice) and one per choice that ends after its last token ("end"), from the scheduler's thread; it raises
    ``ClientGone`` to stop. Raises ``ClientGone`` if the client left, or the engine's error."""
    if served.process is not None:  # the engines run in their own process: this function runs there
        return served.process.run(plan, emit, gone)
    ev = served.ev
    scheduler = served.schedulers[plan.engine]
    made = [_sequence(served, plan, i, emit, gone) for i in range(len(plan.choices))]
    seqs = [s for s, _ in made]
    meter = EnergyMeter(ev.device, idle_s=0, counter=served.counter, reason=served.counter_reason)
    with meter:
        scheduler.submit(seqs)
        for s in seqs:
            s.done.wait()
    errors = [s.error for s in seqs if s.error is not None]
    if any(isinstance(e, ClientGone) for e in errors):
        raise ClientGone
    if errors:
        raise errors[0]
    started = min((s.admitted for s in seqs if s.admitted is not None), default=plan.received)
    results = [
        ChoiceResult(**record, start_s=(s.admitted or started) - started, **_metrics(s.times, len(s.tokens)))
        for s, record in made
    ]
    meter.idle_power_w = served.idle_power_w
    n_out = sum(r.tokens_out for r in results)
    batched = any(s.shared for s in seqs)  # decoded beside other sequences (its own or others')
    if batched and served.counter is not None:
        # other requests decoded in the same steps: the window's energy is theirs too (the load client's
        # J/token over a whole run, from /energy, is the figure for a batched server)
        energy = {"method": served.counter.method, "energy_j": None, "reason": "decoded in a batch with others"}
    else:
        energy = meter.result(units=n_out or None, unit="token", min_window_s=min_window_for(meter.counter))
    first, single = results[0], len(results) == 1
    ends = [s.admitted + s.times[-1] for s in seqs if s.times]
    measures = Measures(
        engine=plan.engine,
        engine_note=scheduler.slots.note,
        device=str(ev.device),
        tokens_in=sum(len(p) for p in plan.prompts),
        tokens_out=n_out,
        prompt_truncated=any(plan.truncated),
        queue_ms=1e3 * (started - plan.received),
        batched=batched,
        # one choice: its own clock (from its prompt to its tokens); several: from the start of the first
        ttft_ms=None if first.ttft_ms is None else first.ttft_ms + (0 if single else 1e3 * first.start_s),
        tpot_ms=first.tpot_ms if single else None,
        itl_ms=first.itl_ms if single else None,
        e2e_ms=first.e2e_ms if single else 1e3 * (max(ends, default=started) - started),
        energy=energy,
    )
    return RunResult(results, measures)


def energy_reading(served: Served) -> dict:
    """The energy counter's reading now (GET /energy), or why there is none."""
    if served.counter is None:
        return {"method": "unavailable", "reason": served.counter_reason, "energy_j": None}
    return {
        "method": served.counter.method,
        "energy_j": served.counter.read_j(),
        "time_s": time.perf_counter(),
        "idle_power_w": served.idle_power_w,
    }


def usage(plan: Plan, measures: Measures) -> dict:
    prompt = measures.tokens_in
    return {
        "prompt_tokens": prompt,
        "completion_tokens": measures.tokens_out,
        "total_tokens": prompt + measures.tokens_out,
    }
