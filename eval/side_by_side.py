"""Latency (and energy, where a counter exists) of several models measured side by side in one process.

    python -m eval.side_by_side checkpoints/a checkpoints/b checkpoints/c --reference a --rounds 30

Models measured minutes apart in separate processes see different machines (another job starts, the clock
boosts): their difference is not theirs. Here every model is loaded into one process and timed in rounds,
round-robin, with the order rotated each round (A B C, B C A, C A B ...), so load on the machine hits every
model alike. Each round gives one sample per model: milliseconds per decoded token over ``--n-tokens``
steps with the KV cache after ``--context`` tokens, and the prefill of ``--prompt-len`` tokens.

Results per model: median and p10/p90 of its samples; against the reference: the median of per-round
ratios with a bootstrap 95% interval, and a Mann-Whitney test with its effect size, Benjamini-Hochberg
adjusted over the models. A model is called faster or slower only when that adjusted p-value is below
0.05; on a machine too noisy to separate the models the result says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from common.cli import UserError, parse_args, positional, run_main
from common.device import compute_dtype, pick_device
from common.energy import find_counter, measure_energy
from common.progress import Progress
from common.results import check_result_path, write_result
from common.stats import adjust, paired_ratio
from common.timing import spread, time_repeats
from eval.latency import MODES, decode_run
from eval.model import load_for_eval
from llama.generation import prefill


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
    min_window: float = 1.0  # seconds; energy windows are at least this
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # weights dtype: auto (bfloat16 on CUDA), bfloat16, float32
    out: str = "results/side_by_side.json"  # result JSON

    def __post_init__(self):
        if self.rounds < 3 or self.n_tokens < 1 or self.batch < 1 or self.context < 1 or self.prompt_len < 1:
            raise UserError("need --rounds >= 3 and positive --n-tokens, --batch, --context, --prompt-len")
        check_result_path(self.out)


@dataclass
class _Entry:
    name: str
    model: torch.nn.Module
    decode: Callable[[], None] | None = None  # decodes n_tokens tokens
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
    entries = []
    for name, model in models.items():
        e = _Entry(name, model)
        e.decode = decode_run(model, a.batch, a.context, a.n_tokens, a.mode)
        for _ in range(2):  # warm up before any timing: compilation, then CUDA graph recording
            e.decode()
        entries.append(e)
    counter, reason = find_counter(device) if a.energy else (None, "not requested")
    prompt = torch.randint(0, min(m.params.vocab_size for m in models.values()), (a.batch, a.prompt_len), device=device)
    pos = torch.arange(a.prompt_len, device=device)
    try:
        for r in Progress(range(a.rounds), desc="side by side", unit="round", disable=not progress):
            for e in _rotated(entries, r):
                e.decode_ms.append(1e3 * _once(e.decode, device) / a.n_tokens)
                if counter is not None:
                    units = a.batch * a.n_tokens
                    e.energy.append(measure_energy(e.decode, units, device, a.min_window, 0.0, counter=counter))
        # prefill needs its own cache length: timed after decoding, in rounds again
        for e in entries:
            e.model.clear_caches()
            e.model.setup_caches(a.batch, a.prompt_len + 1)
        with torch.no_grad():
            for e in entries:
                prefill(e.model, prompt, pos)
            for r in range(a.rounds):
                for e in _rotated(entries, r):
                    e.prefill_ms.append(1e3 * _once(lambda e=e: prefill(e.model, prompt, pos), device))
    finally:
        for e in entries:
            e.model.clear_caches()
    return _summarise(entries, reference, counter, reason)


def _summarise(entries: list[_Entry], reference: str, counter, reason) -> dict:
    ref = next(e for e in entries if e.name == reference)
    out, tests = {}, []
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
                ratio = paired_ratio(mine, theirs) | {"model": e.name, "what": what}
                row[f"{what}_ratio_to_reference"] = ratio | {"test": ratio}
                tests.append(ratio)
        out[e.name] = row
    adjust(tests)
    for t in tests:
        t["verdict"] = (
            ("faster" if t["median"] < 1 else "slower") + " than the reference"
            if t["distinguishable"]
            else f"not distinguishable from the reference at {len(ref.decode_ms)} rounds"
        )
    cv = spread(ref.decode_ms)
    noisy = (cv["p90"] - cv["p10"]) / cv["median"] if cv["median"] else None
    return {
        "reference": reference,
        "models": out,
        "reference_decode_spread": noisy,  # (p90 - p10) / median of the reference's own samples
        "separated": any(t["distinguishable"] for t in tests),
        "note": None
        if any(t["distinguishable"] for t in tests)
        else "no model's latency is distinguishable from the reference's here: the machine is too noisy, or "
        "the models are equally fast; no ranking is stated",
    }


def main(argv=None):
    a = parse_args(Args(), argv)
    if len(a.checkpoints) < 2:
        raise UserError("name at least two models to compare side by side")
    if a.names is not None and len(a.names) != len(a.checkpoints):
        raise UserError(f"--names gives {len(a.names)} names for {len(a.checkpoints)} models")
    device = pick_device(a.device)
    dtype = compute_dtype(a.dtype, device)
    models = {}
    for i, ckpt in enumerate(a.checkpoints):
        ev = load_for_eval(ckpt, a.device, a.dtype)
        name = a.names[i] if a.names else ev.name
        if name in models:
            raise UserError(f"two models are named {name!r}; pass --names")
        models[name] = ev.model if ev.quantized else ev.model.to(dtype)  # as eval.efficiency runs them
    r = side_by_side(models, device, a)
    settings = {k: getattr(a, k) for k in ("rounds", "batch", "context", "prompt_len", "n_tokens", "mode", "dtype")}
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
    print(f"-> {path}")


if __name__ == "__main__":
    run_main(main)
