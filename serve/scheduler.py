"""Continuous batching for the server: sequences (a request's completions) wait in arrival order, join the
running batch at the next step while a slot is free (runtime/batching.py), and leave it when they end, as
vLLM's scheduler does (without preemption: a sequence that joined keeps its slot to the end).

One ``Scheduler`` per engine, each a thread that runs its engine's steps; every step holds the server's one
compute lock, so two engines never decode at the same time. Each sequence samples from its own row of logits
with its own generator, as the sequence alone would (runtime/batching's Slots.check checks greedy; a seeded
sample draws the same numbers in the same order). The tokens are the same; a batched row's logits may differ from
alone in the last bits (another summation order), so its log-probabilities agree to about 1e-6, not bit for bit.
``on_token`` and ``on_end`` run on the scheduler's thread; an exception from either (a client that left) ends
that sequence alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.batching import Slots
from runtime.generate import sample
from runtime.sampling import SamplingParams


@dataclass
class Sequence:
    """One completion to decode, and what became of it."""

    prompt: list[int]
    how: SamplingParams  # its length, sampler and seed (its stop strings are found by ``stop``)
    eos_id: int | None = None
    stop: Callable[[list[int]], bool] | None = None
    on_token: Callable[[int, torch.Tensor], None] | None = None  # (token, its (V,) float32 logits)
    on_end: Callable[[], None] | None = None
    gone: threading.Event | None = None  # set: the client left; the sequence ends at its next token
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # seconds from admission to each token
    admitted: float | None = None  # time.perf_counter() when it joined the batch
    error: BaseException | None = None
    shared: bool = False  # decoded beside another sequence at some step (its time and energy are not its own)
    done: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None


class Scheduler:
    def __init__(self, slots: Slots, lock: threading.Lock):
        self.slots, self.lock = slots, lock
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.cv = threading.Condition()
        self.largest_batch = 0  # the most sequences decoded in one step so far
        self.thread = threading.Thread(target=self._loop, name=f"decode-{slots.name}", daemon=True)
        self.thread.start()

    def submit(self, seqs: list[Sequence]):
        with self.cv:
            self.waiting.extend(seqs)
            self.cv.notify()

    def _loop(self):
        while True:
            with self.cv:
                while not self.waiting and not self.running:
                    self.cv.wait()
                admit = []
                while self.waiting and len(self.running) + len(admit) < self.slots.max_batch:
                    seq = self.waiting.popleft()
                    if seq.gone is not None and seq.gone.is_set():
                        self._fail(seq, ClientGone())  # it left while queued: nothing decoded
                    elif seq.how.max_tokens <= 0:
                        self._end(None, seq)
                    else:
                        admit.append(seq)
            with self.lock, torch.no_grad():  # (no_grad is per thread: the decoders' own does not reach here)
                try:
                    self._advance(admit)
                except Exception as e:  # the engine failed: every sequence in the batch ends with the error
                    for seq in admit + list(self.running.values()):
                        if not seq.done.is_set():
                            self._fail(seq, e)
                    self.running.clear()

    def _advance(self, admit: list[Sequence]):
        t = time.perf_counter()
        for seq in admit:  # each prompt into a free slot, as a batch of one
            slot = min(set(range(self.slots.max_batch)) - set(self.running))
            seq.admitted, seq.generator = t, torch.Generator().manual_seed(seq.how.seed)
            self.running[slot] = seq
            self._take(slot, seq, self.slots.open(slot, seq.prompt))
        if not self.running:
            return
        order = sorted(self.running)
        if len(order) > 1:
            for seq in self.running.values():
                seq.shared = True
        self.largest_batch = max(self.largest_batch, len(order))
        positions = [len(self.running[s].prompt) + len(self.running[s].tokens) - 1 for s in order]
        rows = self.slots.step(order, [self.running[s].tokens[-1] for s in order], positions)
        for slot, logits in zip(order, rows, strict=True):
            self._take(slot, self.running[slot], logits)

    def _take(self, slot: int, seq: Sequence, logits: torch.Tensor):
        """Sample ``seq``'s next token from its row; end it at EOS (not included), a stop, its length or a
        departed client."""
        how = seq.how
        token = int(sample(logits[None], how.temperature, how.top_k, how.top_p, seq.generator)[0])
        if seq.eos_id is not None and token == seq.eos_id:
            return self._end(slot, seq)
        seq.tokens.append(token)
        seq.times.append(time.perf_counter() - seq.admitted)
        try:
            if seq.gone is not None and seq.gone.is_set():
                raise ClientGone
            if seq.on_token is not None:
                seq.on_token(token, logits)
        except Exception as e:
            return self._fail(seq, e, slot)
        if (seq.stop is not None and seq.stop(seq.tokens)) or len(seq.tokens) >= how.max_tokens:
            self._end(slot, seq)

    def _end(self, slot: int | None, seq: Sequence):
        self._free(slot)
        try:
            if seq.on_end is not None:
                seq.on_end()
        except Exception as e:
            seq.error = e
        seq.done.set()

    def _fail(self, seq: Sequence, error: BaseException, slot: int | None = None):
        self._free(slot)
        seq.error = error
        seq.done.set()

    def _free(self, slot: int | None):
        if slot is not None and slot in self.running:
            del self.running[slot]
            self.slots.close(slot)


class ClientGone(Exception):
    """A client closed its connection: its decoding stops."""
