"""What a server serves: the model, its engines (each with its scheduler of continuous batching), the energy
counter, and the limits it was started with. Built by serve.engine.load_served."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from serve.api import now
from serve.scheduler import Scheduler
from serve.transport import MAX_CONNECTIONS


@dataclass(frozen=True)
class EngineInfo:
    """What the server says of one engine (on /health): how it decodes and how many sequences at once."""

    note: str
    max_batch: int


@dataclass
class Served:
    """The model, its engines (each with its scheduler) and what the server was asked to do. With the engines in
    a process of their own (serve/engine_process.py), ``ev`` is None, ``schedulers`` is empty and ``process``
    runs the requests; the fields HTTP needs (``tokenizer``, ``max_seq_len``, ``engines`` ...) are the same."""

    ev: object  # the loaded model (runtime.loading.Loaded); None where the engines run in another process
    schedulers: dict[str, Scheduler]  # engine name -> its scheduler of continuous batching (in this process)
    unavailable: dict
    max_tokens_limit: int
    max_token_bytes: int = 1  # the longest token's UTF-8 bytes: a prompt's length bounds its token count
    lock: threading.Lock = field(default_factory=threading.Lock)  # one engine step at a time, all engines
    # one thread tokenizes every request's prompts, off the event loop (tokenizers are not all thread-safe)
    tokenizing: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "tokenize"))
    max_connections: int = MAX_CONNECTIONS  # connections the server accepts at once
    # a thread per request in flight waits for its sequences (serve.engine.run), up to max_connections:
    # asyncio's default pool (cores + 4 threads) would let only 6 requests into a batch on 2 cores
    requests: ThreadPoolExecutor = field(init=False)
    counter: object = None
    counter_reason: str | None = None
    idle_power_w: float | None = None  # measured at start-up; each request's net energy subtracts it
    name: str = ""  # the model id (default: the checkpoint's name)
    created: int = field(default_factory=now)
    # what HTTP needs of the model, taken from ``ev`` when it is here
    tokenizer: object = None
    max_seq_len: int = 0
    architecture: str = ""
    device: str = ""
    engines: dict[str, EngineInfo] = field(default_factory=dict)  # engine -> what /health says of it
    threads: int = 0  # CPU threads of the engines' operators
    energy_method: str = ""  # what /health says of energy: the counter's method, or "unavailable: <why>"
    process: object = None  # serve.engine_process.EngineProcess where the engines run apart (None: here)

    def __post_init__(self):
        ev = self.ev
        self.name = self.name or getattr(ev, "name", "")
        if ev is not None and hasattr(ev, "model"):
            self.tokenizer = self.tokenizer or ev.tokenizer
            self.max_seq_len = self.max_seq_len or ev.model.params.max_seq_len
            self.architecture = self.architecture or ev.architecture
            self.device = self.device or str(ev.device)
        if not self.energy_method:
            self.energy_method = self.counter.method if self.counter else f"unavailable: {self.counter_reason}"
        if not self.engines:
            self.engines = {n: EngineInfo(s.slots.note, s.slots.max_batch) for n, s in self.schedulers.items()}
        self.requests = ThreadPoolExecutor(self.max_connections, "request")

    def models(self) -> dict[str, str]:
        """Model id -> engine: ``<name>`` is served by the first engine, ``<name>:<engine>`` by each."""
        engines = list(self.engines)
        return {self.name: engines[0]} | {f"{self.name}:{e}": e for e in engines}

    @property
    def chat(self):
        """The tokenizer's chat template as a function of messages -> token ids, or None without one."""
        return self.tokenizer.chat_ids if self.tokenizer.chat_template else None
