"""The serving logic of serve/server.py, apart from HTTP: what is served (``Served``: the model, its checked
engines, each with its scheduler of continuous batching, the energy counter), each request checked and
tokenized into a ``Plan`` (engine, prompt ids, seeds, sampling settings), and ``run``, which decodes a plan's
choices in the engine's running batch and measures them (latency per token, energy)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UserError, failure
from common.energy import EnergyMeter, find_counter, min_window_for
from eval.generate import fit_prompt, stop_check
from eval.model import load_for_eval
from runtime.batching import build_slots, check_slots
from runtime.decoding import build_decoder, check
from serve.api import (
    MAX_CHOICES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    LogprobsHeld,
    Sampling,
    TextStream,
    logprob_entry,
    now,
)
from serve.scheduler import ClientGone, Scheduler, Sequence

IDLE_S = 2.0  # idle power measured this long when the server starts
TOKENS_PER_CHAR_SLACK = 4  # normalisation may merge characters: the cheap length bound allows 4x for it
CHECK_PROMPTS = ("def add(a, b):\n", "import os\n", "class Stack:\n    def __init__(self):")
DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default
DEFAULT_TEMPERATURE = 1.0  # the OpenAI API's default
DEFAULT_MAX_BATCH = 8  # sequences decoded together by an engine that batches


@dataclass
class Served:
    """The model, its engines (each with its scheduler) and what the server was asked to do."""

    ev: object
    schedulers: dict[str, Scheduler]  # engine name -> its scheduler of continuous batching
    unavailable: dict
    max_tokens_limit: int
    max_token_bytes: int = 1  # the longest token's UTF-8 bytes: a prompt's length bounds its token count
    lock: threading.Lock = field(default_factory=threading.Lock)  # one engine step at a time, all engines
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
        engines = list(self.schedulers)
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
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Served:
    ev = load_for_eval(checkpoint, device, "float32")  # numerics as the ONNX / OpenVINO exports (float32)
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
            if slots[engine].max_batch > 1:  # sequences joining and leaving a full batch, each as if alone
                check_slots(slots[engine], ev.model, prompts, n_check)
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
        ev, schedulers, unavailable, max_tokens_limit, longest, lock, counter=counter, counter_reason=reason, name=name
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
    if engine not in served.schedulers:
        known = ", ".join(served.schedulers)
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


def _sequence(served: Served, plan: Plan, index: int, emit, gone) -> tuple[Sequence, dict]:
    """Choice ``index`` of ``plan`` as a sequence for the scheduler, and the record its callbacks fill."""
    tok = served.ev.tokenizer
    p, seed = plan.choices[index]
    hold_space = bool(getattr(getattr(tok, "tok", None), "clean_up_tokenization_spaces", False))
    text, held = TextStream(tok.decode, plan.stops, hold_space), LogprobsHeld()
    record = {"index": index, "text": "", "finish_reason": None, "logprobs": []}
    seq = Sequence(
        plan.prompts[p],
        plan.max_tokens,
        plan.temperature,
        plan.top_p,
        tok.eos_id if plan.eos else None,
        stop_check(tok, plan.stops),
        seed,
        gone=gone,
    )

    def on_token(token, logits):
        if plan.logprobs is not None:
            held.add(logprob_entry(tok, text.ids, token, logits, plan.logprobs))
        delta = text.push(token)
        released = held.release(len(text.sent))  # the tokens whose text has been sent
        record["logprobs"] += released
        if emit is not None:
            emit(("token", index, delta, released))

    def on_end():
        last = text.finish()
        released = held.release(len(text.sent))  # the rest was cut with the stop string: dropped
        record["logprobs"] += released
        finish = "stop" if text.stopped() or len(seq.tokens) < plan.max_tokens else "length"
        record.update(text=text.sent, finish_reason=finish)
        if emit is not None:
            emit(("end", index, last, (finish, released)))

    seq.on_token, seq.on_end = on_token, on_end
    return seq, record


def run(served: Served, plan: Plan, emit=None, gone: threading.Event | None = None) -> dict:
    """Decode every choice of ``plan`` in its engine's running batch (serve/scheduler.py) and measure them.
    ``emit(event)``, if given, hears ``("token", index, delta, [logprob entries released])`` per token and
    ``("end", index, delta, (finish_reason, [logprob entries released]))`` per choice, from the scheduler's
    thread; it raises ``ClientGone`` to stop. Raises ``ClientGone`` if the client left, or the engine's error."""
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
    started = min(s.admitted for s in seqs if s.admitted is not None) if any(s.admitted for s in seqs) else None
    started = plan.received if started is None else started
    results = [
        record | {"start_s": (s.admitted or started) - started} | _metrics(s.times, len(s.tokens)) for s, record in made
    ]
    meter.idle_power_w = served.idle_power_w
    n_out = sum(r["tokens_out"] for r in results)
    if any(s.shared for s in seqs) and served.counter is not None:
        # other requests decoded in the same steps: the window's energy is theirs too (the load client's
        # J/token over a whole run, from /energy, is the figure for a batched server)
        energy = {"method": served.counter.method, "energy_j": None, "reason": "decoded in a batch with others"}
    else:
        energy = meter.result(units=n_out or None, unit="token", min_window_s=min_window_for(meter.counter))
    first, single = results[0], len(results) == 1
    ends = [s.admitted + s.times[-1] for s in seqs if s.times]
    return {
        "choices": results,
        "measures": {
            "engine": plan.engine,
            "engine_note": scheduler.slots.note,
            "device": str(ev.device),
            "tokens_in": sum(len(p) for p in plan.prompts),
            "tokens_out": n_out,
            "prompt_truncated": any(plan.truncated),
            "queue_ms": 1e3 * (started - plan.received),
            "batched": any(s.shared for s in seqs),  # decoded beside other sequences (its own or others')
            # one choice: its own clock (from its prompt to its tokens); several: from the start of the first
            "ttft_ms": None
            if first["ttft_ms"] is None
            else first["ttft_ms"] + (0 if single else 1e3 * first["start_s"]),
            "tpot_ms": first["tpot_ms"] if single else None,
            "itl_ms": first["itl_ms"] if single else None,
            "e2e_ms": first["e2e_ms"] if single else 1e3 * (max(ends, default=started) - started),
            "energy": energy,
        },
    }


def usage(plan: Plan, measures: dict) -> dict:
    prompt = measures["tokens_in"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": measures["tokens_out"],
        "total_tokens": prompt + measures["tokens_out"],
    }
