"""Continuous batching for the server: sequences (a request's completions) wait in arrival order, join the
running batch at the next step while a slot is free (runtime/batching.py), and leave it when they end, as
vLLM's scheduler does (without preemption: a sequence that joined keeps its slot to the end).

One ``Scheduler`` per engine, each a thread that runs the one decode loop (runtime/loop.py) over its engine;
every step holds the server's one compute lock, so two engines never decode at the same time. Each sequence
samples from its own row of logits with its own generator, as the sequence alone would (runtime/batching's
Slots.check checks greedy through the same loop; a seeded sample draws the same numbers in the same order). The
tokens are the same; a batched row's logits may differ from alone in the last bits (another summation order),
so its log-probabilities agree to about 1e-6, not bit for bit. ``on_token`` and ``on_end`` run on the
scheduler's thread; an exception from either (a client that left) ends that sequence alone.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import torch

from runtime.engines import Slots
from runtime.loop import Batch, Sequence


class Scheduler:
    """A queue in arrival order and a thread that runs the one decode loop (``runtime.loop.Batch``) over its
    engine's slots: at each step the waiting sequences join while slots are free."""

    def __init__(self, slots: Slots, lock: threading.Lock):
        self.slots, self.lock = slots, lock
        self.batch = Batch(slots)
        self.waiting: deque[Sequence] = deque()
        self.after_step: Callable[[], None] | None = None  # called after each step (serve/engine_process.py)
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=f"decode-{slots.name}", daemon=True)
        self.thread.start()

    @property
    def running(self) -> dict[int, Sequence]:
        return self.batch.running

    @property
    def largest_batch(self) -> int:
        """The most sequences decoded in one step so far."""
        return self.batch.largest_batch

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
                while self.waiting and len(admit) < self.batch.free():
                    admit.append(self.waiting.popleft())
            with self.lock, torch.no_grad():  # (no_grad is per thread: the decoders' own does not reach here)
                try:
                    self.batch.step(admit)
                except Exception as e:  # the engine failed: every sequence in the batch ends with the error
                    self.batch.fail_all(e, admit)
            if self.after_step is not None:
                self.after_step()
