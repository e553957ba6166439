"""Latency per mode, engine and batch size, and energy per token, of one checkpoint.

    python -m eval.efficiency checkpoints/tiny
    python -m eval.efficiency checkpoints/baseline_8_layer --batch-sizes 1 8 32 --context 512

- ``prefill``: ms to run a ``--prompt-len`` prompt into the KV cache (time to first token);
- ``decode``: ms per generated token with the KV cache after ``--context`` tokens, and tokens/s (whole batch);
- ``forward``: ms for a full forward without cache over ``--context`` tokens, per runtime engine;
- ``energy``: joules per decoded token (NVML on GPUs, RAPL on CPUs where readable, else "unavailable").

Modes default to eager + compile + compile+cudagraphs on CUDA and eager on CPU (``--modes compile`` works on
CPU too, after a compilation of tens of seconds). Writes results/<model>-efficiency.json.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Literal

import torch

from common.cli import UserError, failure, parse_args, ranged, run_main
from common.energy import find_counter, repeated_energy
from common.load import LoadMeter, describe, timing_threads
from common.progress import Progress
from eval.latency import MODES, DecodeTiming, ForwardTiming, PrefillTiming, time_decode, time_forward, time_prefill
from eval.model import EvalOptions
from llama.model_io import model_file_bytes
from models.interface import capabilities, require, state_dict_bytes
from runtime.engines import DEFAULT_ENGINES, ENGINES, build, check


@dataclass(frozen=True)
class Timings:
    """What ``evaluate_efficiency`` times: prefill of ``prompt_len`` tokens and decode of ``n_tokens`` after
    ``context`` at each of ``batch_sizes`` in each of ``modes``, the full forward of ``context`` tokens in each of
    ``engines``; ``repeats`` timed passes; energy per decode row where a counter reads and ``energy`` is on
    (``energy_runs`` windows of at least ``min_window_s`` after ``idle_s`` of idle power). Checked once, here."""

    batch_sizes: tuple[int, ...]
    context: int
    prompt_len: int
    n_tokens: int
    modes: tuple[str, ...]
    engines: tuple[str, ...]
    energy: bool = True
    min_window_s: float | None = None
    idle_s: float = 1.0
    repeats: int = 5
    energy_runs: int = 1
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        object.__setattr__(self, "modes", tuple(self.modes))
        object.__setattr__(self, "engines", tuple(self.engines))
        check_counts(self, context=self.context, prompt_len=self.prompt_len)


def check_counts(o, **more) -> None:
    """The counts of ``o`` (Timings or the command's options) and ``more`` must be at least 1: one line if not."""
    counts = {"batch_sizes": min(o.batch_sizes, default=0), "n_tokens": o.n_tokens, "repeats": o.repeats}
    for name, v in (counts | {"energy_runs": o.energy_runs} | more).items():
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {v})")


@dataclass(frozen=True)
class EngineForward:
    """The full forward in one engine at one batch size (``timing``), after its check against eager
    (``max_abs_diff``); or, where the engine could not build or pass its check, ``error`` and no timing."""

    engine: str
    note: str = ""
    max_abs_diff: float | None = None
    timing: ForwardTiming | None = None
    error: str | None = None

    def to_json(self) -> dict:
        if self.error is not None:
            return {"engine": self.engine, "error": self.error}
        return {"engine": self.engine, "note": self.note, "max_abs_diff": self.max_abs_diff, **self.timing.to_json()}


@dataclass(frozen=True)
class EfficiencyRun:
    """What ``evaluate_efficiency`` measured; ``to_json`` is the result file's part of it."""

    prefill: list[PrefillTiming]
    decode: list[DecodeTiming]
    forward: list[EngineForward]
    memory_bytes: int

    def to_json(self) -> dict:
        return {
            "prefill": [x.to_json() for x in self.prefill],
            "decode": [x.to_json() for x in self.decode],
            "forward": [x.to_json() for x in self.forward],
            "memory_bytes": self.memory_bytes,
        }


def evaluate_efficiency(model, device, t: Timings) -> EfficiencyRun:
    """Latency (prefill, decode) per mode and batch size, energy per decoded token where measured, and the full
    forward per engine (each checked against eager first; one that fails is reported, not hidden)."""
    batch_sizes, context, prompt_len, n_tokens, repeats = t.batch_sizes, t.context, t.prompt_len, t.n_tokens, t.repeats
    vocab = model.params.vocab_size
    run = EfficiencyRun([], [], [], state_dict_bytes(model))
    counter, reason = find_counter(device) if t.energy else (None, "not requested")
    jobs = [(m, b) for m in t.modes for b in batch_sizes]
    for mode, b in Progress(jobs, desc="latency", disable=not t.progress):
        run.prefill.append(time_prefill(model, b, prompt_len, mode, repeats=max(repeats, 5)))
        measure = None
        if counter is not None:

            def measure(decode, units):
                return repeated_energy(
                    decode, units, device, t.energy_runs, min_window_s=t.min_window_s, idle_s=t.idle_s, counter=counter
                )

        row = time_decode(model, b, context, n_tokens, mode, repeats=repeats, energy=measure)
        if counter is None:
            row = dataclasses.replace(row, energy={"method": "unavailable", "reason": reason})
        run.decode.append(row)
    example = torch.randint(0, vocab, (batch_sizes[0], context), device=device)
    with tempfile.TemporaryDirectory(prefix="engines-") as workdir:  # the exports go when the timing is done
        for name in Progress(t.engines, desc="engines", disable=not t.progress):
            try:
                engine = build(name, model, example, workdir)
                diff = check(engine, model, atol=1e-2 if next(model.parameters()).dtype != torch.float32 else 1e-4)
            except Exception as e:  # an engine that cannot serve this model is reported, not hidden
                run.forward.append(EngineForward(name, error=failure(e)))
                print(f"engine {name} not timed: {type(e).__name__}: {e}", file=sys.stderr)  # the full reason
                continue
            for b in batch_sizes:
                timing = time_forward(engine.run, vocab, b, context, device, repeats=max(repeats, 5))
                run.forward.append(EngineForward(name, engine.note, diff, timing))
            del engine
    return run


def table(r: EfficiencyRun) -> str:
    lines = [
        "| what | mode/engine | batch | median ms | p10-p90 ms | tokens/s | J/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r.prefill:
        s = row.ms
        lines.append(
            f"| prefill {row.prompt_len} | {row.mode} | {row.batch} | {s.median:.3f} | {s.p10:.3f}-{s.p90:.3f} | | |"
        )
    for row in r.decode:
        s, e = row.ms_per_token, row.energy or {}
        j = e.get("j_per_token")
        jtxt = f"{j:.4f}" if j is not None else e.get("method") if e.get("method") == "unavailable" else "n/a"
        lines.append(
            f"| decode @{row.context_len} | {row.mode} | {row.batch} | {s.median:.3f} | "
            f"{s.p10:.3f}-{s.p90:.3f} | {row.tokens_per_s:,.0f} | {jtxt} |"
        )
    for f in r.forward:
        if f.error is not None:
            lines.append(f"| forward | {f.engine} | | failed: {f.error[:60]} | | | |")
            continue
        s = f.timing.ms
        lines.append(
            f"| forward {f.timing.seq_len} | {f.engine} | {f.timing.batch} | {s.median:.3f} | "
            f"{s.p10:.3f}-{s.p90:.3f} | {f.timing.tokens_per_s:,.0f} | |"
        )
    return "\n".join(lines)


Mode = Literal[MODES]
EngineName = Literal[ENGINES]


@dataclass
class Args(EvalOptions):
    EVALUATORS = ("efficiency",)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])  # batch sizes timed
    context: int | None = None  # tokens in the cache before decoding (default: max_seq_len/2); also the forward length
    prompt_len: int | None = None  # prefill length (default: --context)
    n_tokens: int = 32  # decode steps per timed pass
    repeats: int = 5  # timed passes
    modes: list[Mode] | None = None  # decoding modes (default: all on CUDA, eager on CPU and for HF models)
    # engines for the full forward (default: torch, compile, aoti, onnxruntime; torch and compile for a HF
    # model, whose export is not set up here; torchscript: legacy, by name)
    engines: list[EngineName] | None = None
    energy: bool = True  # measure energy per token where a counter exists (--no-energy: skip)
    sparse_2of4: bool = False  # CUDA: run 2:4-pruned weights on sparse tensor cores
    min_window: float | None = ranged(None, 0, above=True)  # seconds per energy window, at least the counter's floor
    idle: float = ranged(1.0, 0)  # seconds of idle power measured before each window
    energy_runs: int = 1  # energy windows per decode row: 3 gives the median and how far the runs spread
    threads: int | None = ranged(None, 1)  # CPU threads; default: the cores other work leaves free (recorded)

    def __post_init__(self):
        super().__post_init__()
        check_counts(self, context=self.context, prompt_len=self.prompt_len)  # at once, before the model loads

    def timings(self, context: int, modes: list[str], engines: list[str]) -> Timings:
        """These options as what evaluate_efficiency times (the defaults that depend on the model filled in)."""
        return Timings(
            self.batch_sizes, context, self.prompt_len or context, self.n_tokens, modes, engines, self.energy,
            self.min_window, self.idle, self.repeats, self.energy_runs,
        )  # fmt: skip


def main(argv=None):
    a = parse_args(Args(), argv)
    ev = a.load()
    # Inference runs in the weights' dtype, no autocast; a quantized model keeps the dtypes its scheme chose.
    model = ev.model if ev.quantized else ev.model.to(ev.dtype)
    if a.sparse_2of4:
        from runtime.sparse import to_semi_structured

        if not to_semi_structured(model):
            raise UserError("--sparse-2of4: no fp16/bf16 linear layer holds a 2:4 pattern; prune with --pattern 2:4")
    context = a.context or model.params.max_seq_len // 2
    can = capabilities(model)
    if a.modes and a.modes != ["eager"]:  # a growing cache has no static shapes for compile / CUDA graphs
        require(model, "static_cache", "--modes compile")
    modes = a.modes or (list(MODES) if ev.device.type == "cuda" and can.static_cache else ["eager"])
    if ev.device.type != "cuda":  # threads other work leaves free: timings that do not oversubscribe (recorded)
        torch.set_num_threads(timing_threads(a.threads))
    with LoadMeter() as meter:  # how busy the machine was while these were timed
        engines = a.engines or (list(DEFAULT_ENGINES) if can.export else ["torch", "compile"])
        r = evaluate_efficiency(model, ev.device, a.timings(context, modes, engines))
    settings = {
        "threads": torch.get_num_threads(),
        "load": meter.result(),  # how busy the machine was while these were timed
        "dtype": str(ev.dtype).removeprefix("torch."),
        "context_len": context,
        "prompt_len": a.prompt_len or context,
        "n_tokens": a.n_tokens,
        "repeats": a.repeats,
        "energy_runs": a.energy_runs,
        "batch_sizes": a.batch_sizes,
        "modes": modes,
        "sparse_2of4": a.sparse_2of4,
    }
    # disk_bytes is the weight file the folder holds (quantized where the scheme stores it so), memory_bytes
    # the weights as loaded
    out = ev.write("efficiency", {"disk_bytes": model_file_bytes(ev.folder), **settings, **r.to_json()}, a)
    print(table(r))
    busy = describe(settings["load"])
    if busy:
        print(f"note: {busy}")
    print(f"-> {out}")


if __name__ == "__main__":
    run_main(main)
