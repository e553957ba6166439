"""Latency (and energy, where a counter exists) of several models measured side by side in one process.

    python -m eval.side_by_side checkpoints/a checkpoints/b checkpoints/c --reference a --rounds 30

Models measured minutes apart in separate processes see different machines (another job starts, the clock
boosts): their difference is not theirs. Here every model is loaded into one process and timed in rounds,
round-robin, with the order rotated each round (A B C, B C A, C A B ...), so load on the machine hits every
model alike. Each round gives one sample per model: milliseconds per decoded token over ``--n-tokens``
steps with the KV cache after ``--context`` tokens, and the prefill of ``--prompt-len`` tokens.

Interleaving does not make a busy machine slow every model alike: two models of identical shape once came out
12.7% apart (p = 0.0015) beside other work. So every run also times an A/A control, a copy of the reference
timed as if it were one more model: its ratio to the reference is the noise floor of this run, and while the
control itself is distinguishable from 1 (its 95% interval excludes 1) no latency verdict is stated.

Results per model: median and p10/p90 of its samples; against the reference: the Hodges-Lehmann estimate of
the ratio (from the per-round log ratios, which are pairs) with the interval that inverts the Wilcoxon
signed-rank test at the level adjusted for the models compared (Bonferroni over the comparisons), and that
test's p-value, Benjamini-Hochberg adjusted. A model is called faster or slower only when the adjusted p-value
is below 0.05 and its interval excludes 1, which then agree. The machine's load during the timing (load
average, the cores other processes kept busy) and the threads used are recorded; a run on a busy machine
says so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from common.cli import UserError, parse_args, positional, ranged, run_main
from common.device import compute_dtype, pick_device
from common.energy import find_counter, measure_energy
from common.load import LoadMeter, describe, timing_threads
from common.progress import Progress
from common.results import check_result_path, write_result
from common.stats import ALPHA, adjust, paired_ratio
from common.timing import spread, time_repeats
from eval.latency import MODES, decode_run
from eval.model import load_for_eval
from runtime.batching import timed_engine
from runtime.engines import DeviceSteps


@dataclass
class Args:
    checkpoints: list[str] = positional(default_factory=list)  # the models (checkpoints/<run> or model folders)
    names: list[str] | None = None  # a name per model (default: each model's own name)
    reference: str | None = None  # the model ratios are taken to (default: the first)
    rounds: int = 20  # samples per model, one per round
    batch: int = 1  # sequences decoded together
    context: int = 128  # tokens in the KV cache before decoding
    prompt_len: int = 128  # prefill length
    n_tokens: int = 16  # decode steps per sample
    mode: Literal[MODES] = "eager"  # decoding mode
    energy: bool = True  # measure energy per token in each round where a counter exists
    min_window: float | None = ranged(None, 0, above=True)  # seconds per energy window, at least the counter's floor
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # weights dtype: auto (bfloat16 on CUDA), bfloat16, float32
    cooldown: float = ranged(2.0, 0)  # seconds of rest before each energy window: one model's heat not the next's
    threads: int | None = ranged(None, 1)  # CPU threads; default: the cores other work leaves free (recorded)
    control: bool = True  # time a copy of the reference as an A/A control: the run's noise floor, gating verdicts
    out: str = "results/side_by_side.json"  # result JSON

    def __post_init__(self):
        if self.rounds < 3 or self.n_tokens < 1 or self.batch < 1 or self.context < 1 or self.prompt_len < 1:
            raise UserError("need --rounds >= 3 and positive --n-tokens, --batch, --context, --prompt-len")
        check_result_path(self.out, ("side_by_side",))


@dataclass
class _Entry:
    name: str
    model: torch.nn.Module
    decode: Callable[[], None] | None = None  # decodes n_tokens tokens
    engine: DeviceSteps | None = None  # the engine decode runs in (runtime.batching.timed_engine)
    prompt_engine: DeviceSteps | None = None  # the engine its prompt is timed in (a cache of prompt_len + 1)
    prefill_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)  # per token
    energy: list[dict] = field(default_factory=list)


def _rotated(entries: list, r: int) -> list:
    """Round ``r``'s order: A B C, then B C A, then C A B ... so no model is always timed first."""
    k = r % len(entries)
    return entries[k:] + entries[:k]


def _once(fn, device) -> float:
    return time_repeats(fn, device, warmup=0, repeats=1)[0]


def side_by_side(models: dict[str, torch.nn.Module], device, a: Args, progress: bool = True) -> dict:
    names = list(models)
    reference = a.reference or names[0]
    if reference not in models:
        raise UserError(f"--reference {reference!r} is not one of the models {names}")
    models = dict(models)
    if a.control:  # the A/A control: the reference once more, as its own copy in memory
        models[CONTROL] = copy.deepcopy(models[reference])
    entries = []
    for name, model in models.items():
        e = _Entry(name, model)
        e.decode, e.engine = decode_run(model, a.batch, a.context, a.n_tokens, a.mode)
        for _ in range(2):  # warm up before any timing: compilation, then CUDA graph recording
            e.decode()
        entries.append(e)
    counter, reason = find_counter(device) if a.energy else (None, "not requested")
    prompt = torch.randint(0, min(m.params.vocab_size for m in models.values()), (a.batch, a.prompt_len), device=device)
    with LoadMeter() as meter:  # the machine's load while the models were timed
        try:
            for r in Progress(range(a.rounds), desc="side by side", unit="round", disable=not progress):
                for e in _rotated(entries, r):
                    e.decode_ms.append(1e3 * _once(e.decode, device) / a.n_tokens)
                    if counter is not None:
                        units = a.batch * a.n_tokens
                        e.energy.append(
                            measure_energy(
                                e.decode, units, device, a.min_window, 0.0, cooldown_s=a.cooldown, counter=counter
                            )
                        )
            # prefill needs its own cache length: timed after decoding, in rounds again
            for e in entries:
                e.engine.release()
                e.prompt_engine = timed_engine(e.model, device, a.batch, a.prompt_len + 1)
                e.prompt_engine.fill(prompt)
            for r in range(a.rounds):
                for e in _rotated(entries, r):
                    e.prefill_ms.append(1e3 * _once(lambda e=e: e.prompt_engine.fill(prompt), device))
        finally:
            for e in entries:
                for engine in (e.engine, e.prompt_engine):
                    if engine is not None:
                        engine.release()
    return _summarise(entries, reference, counter, reason) | {"load": meter.result()}


CONTROL = "A/A control"  # the name of the reference's copy in a result


def _summarise(entries: list[_Entry], reference: str, counter, reason) -> dict:
    ref = next(e for e in entries if e.name == reference)
    out, tests = {}, []
    compared = [e for e in entries if e is not ref and e.name != CONTROL]
    # each interval at the level its verdict is adjusted to (Bonferroni over the models' decode and prefill
    # comparisons, which Benjamini-Hochberg never exceeds): an interval that excludes 1 with q >= 0.05 cannot be
    # printed beside a "not distinguishable"
    level = 1 - ALPHA / max(1, 2 * len(compared))
    for e in entries:
        row = {"decode_ms_per_token": spread(e.decode_ms), "prefill_ms": spread(e.prefill_ms)}
        row["decode_ms_samples"], row["prefill_ms_samples"] = e.decode_ms, e.prefill_ms
        if counter is None:
            row["energy"] = {"method": "unavailable", "reason": reason}
        else:
            j = [x.get("j_per_token") for x in e.energy if x.get("j_per_token") is not None]
            row["energy"] = {"method": counter.method, "j_per_token_samples": j, **(spread(j) if j else {})}
        if e is not ref:
            for what, mine, theirs in (
                ("decode", e.decode_ms, ref.decode_ms),
                ("prefill", e.prefill_ms, ref.prefill_ms),
            ):
                # the same round, so the same machine state: paired by round
                ratio = paired_ratio(mine, theirs, confidence=level) | {"model": e.name, "what": what}
                row[f"{what}_ratio_to_reference"] = ratio | {"test": ratio}
                if e.name != CONTROL:
                    tests.append(ratio)
        out[e.name] = row
    adjust(tests)
    control = out.pop(CONTROL, None)
    gate = None
    if control is not None:
        c = paired_ratio(control["decode_ms_samples"], ref.decode_ms)  # 95%: the gate is as strict as can be
        control["decode_control"] = c
        if c.get("ci_low") is not None and not c["ci_low"] <= 1 <= c["ci_high"]:
            gate = (
                f"the A/A control (the reference timed twice) came out x{c['median']:.3f} "
                f"[{c['ci_low']:.3f}, {c['ci_high']:.3f}] apart: this run cannot tell models apart, no verdict "
                "is stated"
            )
    rounds = len(ref.decode_ms)
    for t in tests:
        if gate is not None:
            t["distinguishable"], t["gated"] = False, True
        if t.get("p") is None:
            t["verdict"] = f"not tested ({t.get('reason', 'too few rounds')})"
        elif t["distinguishable"]:
            t["verdict"] = ("faster" if t["median"] < 1 else "slower") + " than the reference"
        elif gate is not None:
            t["verdict"] = "no verdict: the A/A control was distinguishable from 1"
        else:
            t["verdict"] = f"not distinguishable from the reference at {rounds} rounds"
            if t.get("ci_low") == 0.0 or t.get("ci_high") == float("inf"):
                t["verdict"] += f" (at {rounds} rounds the test cannot reject at this level: use more rounds)"
    cv = spread(ref.decode_ms)
    noisy = (cv["p90"] - cv["p10"]) / cv["median"] if cv["median"] else None
    separated = any(t["distinguishable"] for t in tests)
    return {
        "reference": reference,
        "models": out,
        "control": control,  # the reference's copy: its ratio to the reference is this run's noise floor
        "gated": gate,  # why no verdict is stated (None: the control was not distinguishable from 1)
        "interval_level": level,
        "reference_decode_spread": noisy,  # (p90 - p10) / median of the reference's own samples
        "separated": separated,
        "note": gate
        or (
            None
            if separated
            else "no model's latency is distinguishable from the reference's here: the machine is too noisy, or "
            "the models are equally fast; no ranking is stated"
        ),
    }


def reference_name(reference: str | None, checkpoints: list[str], names: list[str]) -> str | None:
    """The model --reference means: its name as reported (``run@step_N``), or the checkpoint as it was given
    on the command line (``checkpoints/run``), its folder's name or its run's name."""
    if reference is None or reference in names:
        return reference
    for ckpt, name in zip(checkpoints, names, strict=True):
        if reference in (ckpt, Path(ckpt).name, name.split("@")[0]):
            return name
    return reference  # side_by_side names the models it has


def main(argv=None):
    a = parse_args(Args(), argv)
    if len(a.checkpoints) < 2:
        raise UserError("name at least two models to compare side by side")
    if a.names is not None and len(a.names) != len(a.checkpoints):
        raise UserError(f"--names gives {len(a.names)} names for {len(a.checkpoints)} models")
    device = pick_device(a.device)
    dtype = compute_dtype(a.dtype, device)
    threads = torch.get_num_threads() if device.type == "cuda" else timing_threads(a.threads)
    torch.set_num_threads(threads)  # recorded in the result's device line and below
    models = {}
    for i, ckpt in enumerate(a.checkpoints):
        ev = load_for_eval(ckpt, a.device, a.dtype)
        name = a.names[i] if a.names else ev.name
        if name in models or name == CONTROL:
            raise UserError(f"two models are named {name!r}; pass --names")
        models[name] = ev.model if ev.quantized else ev.model.to(dtype)  # as eval.efficiency runs them
    a.reference = reference_name(a.reference, a.checkpoints, list(models))
    r = side_by_side(models, device, a)
    settings = {k: getattr(a, k) for k in ("rounds", "batch", "context", "prompt_len", "n_tokens", "mode", "dtype")}
    settings["threads"] = threads
    path = write_result(a.out, {"evaluator": "side_by_side", "checkpoints": a.checkpoints, **settings, **r}, device)
    for name, row in r["models"].items():
        d = row["decode_ms_per_token"]
        ratio = row.get("decode_ratio_to_reference")
        verdict = (
            f", x{ratio['median']:.3f} [{ratio['ci_low']:.3f}, {ratio['ci_high']:.3f}]: {ratio['test']['verdict']}"
            if ratio
            else " (reference)"
        )
        print(f"{name}: decode {d['median']:.3f} ms/token (p10-p90 {d['p10']:.3f}-{d['p90']:.3f}){verdict}")
    if r["control"]:
        c = r["control"]["decode_control"]
        print(f"A/A control (the reference again): x{c['median']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]")
    for line in filter(None, (r["gated"], describe(r["load"]))):
        print(f"note: {line}")
    print(f"-> {path}")


if __name__ == "__main__":
    run_main(main)
