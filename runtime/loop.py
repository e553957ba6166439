"""The continuous-batching decode loop: sequences join an engine's slots (runtime/batching.py) at any step, each
samples its next token from its own row of logits with its own generator, and each leaves when it ends (EOS,
a stop, its length, a client that left), its slot free for the next, as in vLLM's scheduler (without
preemption: a sequence that joined keeps its slot to the end).

``Batch`` is the loop with no threads and no queue: ``step(admit)`` puts new sequences into free slots and
advances every running one by a token. The server's scheduler (serve/scheduler.py) drives it from its thread;
``greedy`` drives it for the engines' own check (``Slots.check``), so the check decodes through the loop the
server runs. The static-batch loop for equal prompts decoded together, with no host sync before its end
(what ``llama.generation.generate`` and the latency timings use), is ``llama.generation.decode``; both sample
with the one sampler, ``llama.generation.sample``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llama.generation import sample
from runtime.sampling import SamplingParams


class ClientGone(Exception):
    """A client closed its connection: its decoding stops."""


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


class Batch:
    """The sequences running in ``slots`` (an engine of runtime/batching.py), slot -> sequence."""

    def __init__(self, slots):
        self.slots = slots
        self.running: dict[int, Sequence] = {}
        self.largest_batch = 0  # the most sequences decoded in one step so far
        self.decoded = 0  # tokens drawn so far, every sequence's

    def free(self) -> int:
        """How many sequences may join now."""
        return self.slots.max_batch - len(self.running)

    def step(self, admit: list[Sequence]) -> None:
        """Each of ``admit`` (at most ``free()``) into a free slot, its prompt run alone and its first token
        drawn; then one step of every running sequence together. An engine error propagates: ``fail_all``."""
        t = time.perf_counter()
        for seq in admit:
            if seq.gone is not None and seq.gone.is_set():
                self.fail(seq, ClientGone())  # it left while queued: nothing decoded
                continue
            if seq.how.max_tokens <= 0:
                self._end(None, seq)
                continue
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

    def fail_all(self, error: BaseException, also: list[Sequence] = ()) -> None:
        """The engine failed: every running sequence (and ``also``, not yet ended) ends with ``error``."""
        for seq in list(also) + list(self.running.values()):
            if not seq.done.is_set():
                self.fail(seq, error)
        self.running.clear()

    def _take(self, slot: int, seq: Sequence, logits: torch.Tensor):
        """Sample ``seq``'s next token from its row; end it at EOS (not included), a stop (included), its
        length or a departed client."""
        how = seq.how
        token = int(sample(logits[None], how.temperature, how.top_k, how.top_p, seq.generator)[0])
        self.decoded += 1
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
            return self.fail(seq, e, slot)
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

    def fail(self, seq: Sequence, error: BaseException, slot: int | None = None):
        self._free(slot)
        seq.error = error
        seq.done.set()

    def _free(self, slot: int | None):
        if slot is not None and slot in self.running:
            del self.running[slot]
            self.slots.close(slot)


def greedy(slots, prompts: list[list[int]], n_tokens: list[int], join_every: int = 1) -> list[list[int]]:
    """Greedy continuations of ``prompts`` decoded together in ``slots`` by the loop above: prompt i joins the
    batch at step i * join_every (into the lowest free slot) and leaves after ``n_tokens[i]`` tokens; more
    prompts than slots wait for one."""
    seqs = [Sequence(list(p), SamplingParams(n)) for p, n in zip(prompts, n_tokens, strict=True)]
    batch, waiting, step = Batch(slots), list(range(len(seqs))), 0
    while waiting or batch.running:
        admit = []
        while waiting and step >= waiting[0] * join_every and len(admit) < batch.free():
            admit.append(seqs[waiting.pop(0)])
        batch.step(admit)  # an engine's error propagates from here
        step += 1
    return [seq.tokens for seq in seqs]
