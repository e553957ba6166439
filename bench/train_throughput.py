"""Training throughput (tokens/s), MFU and peak memory of the runner configs, timed side by side.

    python -m bench.train_throughput                        # CUDA: the 5- to 8-block 100M configs; CPU: tiny
    python -m bench.train_throughput --configs tiny tiny_baseline --rounds 5
    python -m bench.train_throughput --configs baseline_8_layer --profile   # where a step's time goes

One step is what the trainer does: forward under autocast, loss, backward, gradient clipping, AdamW (fused
on CUDA) and zero_grad, on random tokens (throughput does not depend on the text). Every model is built,
compiled and warmed up first (its peak memory is read then), then all are timed in interleaved rounds, the
order rotated each round, ``--steps-per-round`` steps each, so that the machine's state hits every model
alike. Per model: tokens/s median and p10-p90 over rounds; MFU = tokens/s x training FLOPs per token
(llama.model.flops_per_token, the PaLM/nanoGPT convention) / the device's dense bf16 peak (989e12 on
H100/H200; no MFU on a CPU). Per-head against the baseline of the same depth: the median of per-round ratios
of time per token with a bootstrap 95% interval. ``--profile`` adds torch.profiler's top operations of three
steps per model. Writes bench/results/train_throughput.json after every phase.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import UserError, parse_args, run_main
from common.device import autocast, compute_dtype, pick_device
from common.files import atomic_write
from common.hardware import peak_flops, run_metadata
from common.progress import Progress
from common.stats import ratio_ci
from common.timing import spread, sync, time_repeats
from llama.model import Transformer, count_params, flops_per_token
from training.optim import make_optimizer
from training.trainer import training_loss

GPU_CONFIGS = [f"{kind}_{n}_layer" for n in (5, 6, 7, 8) for kind in ("baseline", "perhead")]
CPU_CONFIGS = ["tiny_baseline", "tiny"]


def load_config(name: str):
    return importlib.import_module(f"runners.{name}").config()


class Bench:
    """One config's model, optimizer and batch, and a ``step`` that trains on it exactly as the trainer does."""

    def __init__(self, name: str, device: torch.device, batch_size: int | None, compile_: bool | None):
        cfg = load_config(name)
        self.name, self.args, self.device = name, cfg.model, device
        self.batch, self.seq_len = batch_size or cfg.batch_size, cfg.seq_len
        torch.manual_seed(0)
        self.model = Transformer(self.args).to(device)
        self.compile = compile_ if compile_ is not None else device.type == "cuda"
        if self.compile:
            self.model.compile()
        self.loss = training_loss(self.compile)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.dtype = compute_dtype("auto", device)  # as the trainer runs on this device
        self.amp = autocast(device, self.dtype)
        self.x = torch.randint(0, self.args.vocab_size, (self.batch, self.seq_len), device=device)
        self.y = torch.randint(0, self.args.vocab_size, (self.batch, self.seq_len), device=device)
        self.seconds: list[float] = []  # per step, one sample per round
        self.first_step_s: float | None = None

    def step(self):
        with self.amp:
            loss = self.loss(self.model(self.x), self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def warm_up(self, steps: int) -> float | None:
        """Steps before the timed rounds: the first one timed alone (with torch.compile its compilation happens
        there: ``first_step_s``), the rest untimed; the GB of device memory this model added at its peak."""
        cuda = self.device.type == "cuda"
        sync(self.device)
        if cuda:
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        self.first_step_s = time.perf_counter() - t0
        if steps > 1:
            time_repeats(self.step, self.device, steps - 1, 0)
        return (torch.cuda.max_memory_allocated(self.device) - before) / 1e9 if cuda else None


def profile(b: Bench, steps: int = 3, top: int = 15) -> list[dict]:
    """torch.profiler over ``steps`` steps: the operations taking the most device (or CPU) time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = b.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            b.step()
        sync(b.device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda and not hasattr(events[0], key):  # older name
        key = "self_cuda_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [
        {"op": e.key, "self_ms_per_step": getattr(e, key) / 1e3 / steps, "share": getattr(e, key) / total} for e in rows
    ]


def summarise(b: Bench, warmup: int, steps_per_round: int, peak_gb: float | None) -> dict:
    tokens = b.batch * b.seq_len
    tps = [tokens / t for t in b.seconds]
    flops_tok, peak = flops_per_token(b.args, b.seq_len), peak_flops(b.device)
    s = spread(tps)
    return {
        "config": b.name,
        "n_layers": b.args.n_layers,
        "per_head": b.args.head_layer is not None,
        "head_layer": b.args.head_layer_spec(),
        "params": count_params(b.model)["total"],
        "batch": b.batch,
        "seq_len": b.seq_len,
        "dtype": "bfloat16-autocast" if b.dtype == torch.bfloat16 else "float32",
        "compile": b.compile,
        "fused_adamw": b.device.type == "cuda",
        "warmup_steps": warmup,
        # the first step's seconds: with torch.compile, compilation included (minus one step_ms: its cost)
        "first_step_s": b.first_step_s,
        "steps_per_round": steps_per_round,
        "rounds": len(b.seconds),
        "tokens_per_s": s,
        "step_ms": spread([1e3 * t for t in b.seconds]),
        "flops_per_token": flops_tok,
        "mfu": None if peak is None else {k: (v * flops_tok / peak if k != "n" else v) for k, v in s.items()},
        "peak_flops": peak,
        "peak_memory_gb": peak_gb,
    }


def per_head_cost(benches: list[Bench]) -> list[dict]:
    """Per-head model against the baseline of the same depth: time per token, per-round ratios."""
    by = {(b.args.n_layers, b.args.head_layer is not None): b for b in benches}
    out = []
    for (n, per_head), b in sorted(by.items()):
        base = by.get((n, False))
        if not per_head or base is None:
            continue
        ratios = [mine / theirs for mine, theirs in zip(b.seconds, base.seconds, strict=True)]
        out.append({"per_head": b.name, "baseline": base.name, "time_per_token_ratio": ratio_ci(ratios)})
    return out


def table(rows: list[dict]) -> str:
    out = [
        "| config | layers | per-head | params | batch x seq | tokens/s (median) | p10-p90 | MFU | step ms | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["tokens_per_s"]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']['median']:.1f}%"
        mem = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        out.append(
            f"| {r['config']} | {r['n_layers']} | {'yes' if r['per_head'] else 'no'} | {r['params'] / 1e6:.1f}M | "
            f"{r['batch']}x{r['seq_len']} | {t['median']:,.0f} | {t['p10']:,.0f}-{t['p90']:,.0f} | "
            f"{mfu} | {r['step_ms']['median']:.1f} | {mem} |"
        )
    return "\n".join(out)


def cost_table(costs: list[dict]) -> str:
    out = ["| per-head | baseline | time per token, ratio [95% CI] |", "|---|---|---|"]
    for c in costs:
        r = c["time_per_token_ratio"]
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r.get("ci_low") is not None else "(no interval)"
        out.append(f"| {c['per_head']} | {c['baseline']} | x{r['median']:.3f} {ci} |")
    return "\n".join(out)


@dataclass
class Args:
    configs: list[str] | None = None  # runner names (default: the 5- to 8-block 100M configs on CUDA, tiny on CPU)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    rounds: int = 10  # interleaved rounds: one sample per model each
    steps_per_round: int = 3  # timed steps per model per round
    warmup: int = 5  # untimed steps per model first (compilation happens here)
    batch_size: int | None = None  # default: the runner's
    compile: bool | None = None  # torch.compile (default: on CUDA only)
    profile: bool = False  # also torch.profiler's top operations per model
    out: str = "bench/results/train_throughput.json"  # result JSON

    def __post_init__(self):
        if self.rounds < 3 or self.steps_per_round < 1 or self.warmup < 1:
            raise UserError("need --rounds >= 3, --steps-per-round >= 1 and --warmup >= 1")


def main(argv=None):
    a = parse_args(Args(), argv)
    device = pick_device(a.device)
    names = a.configs or (GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    result = {**run_metadata(device), "benchmark": "train_throughput", "rows": [], "per_head_cost": []}

    def write():  # after every phase: a run stopped by a time limit keeps what it measured
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(a.out, json.dumps(result, indent=2))

    benches, peaks = [], {}
    for name in Progress(names, desc="build, compile, warm up"):
        b = Bench(name, device, a.batch_size, a.compile)
        peaks[name] = b.warm_up(a.warmup)
        benches.append(b)
    for r in Progress(range(a.rounds), desc="rounds"):
        k = r % len(benches)
        for b in benches[k:] + benches[:k]:
            b.seconds.append(sum(time_repeats(b.step, device, 0, a.steps_per_round)) / a.steps_per_round)
        result["rows"] = [summarise(b, a.warmup, a.steps_per_round, peaks[b.name]) for b in benches]
        result["per_head_cost"] = per_head_cost(benches)
        write()
    if a.profile:
        for b, row in zip(benches, result["rows"], strict=True):
            row["profile"] = profile(b)
            write()
    print(f"{result['device']}, torch {result['torch_version']}, commit {result['git_commit'][:12]}")
    print(table(result["rows"]))
    print(cost_table(result["per_head_cost"]))
    for row in result["rows"] if a.profile else []:
        print(f"\n{row['config']}: top operations by self time per step")
        for op in row["profile"][:10]:
            print(f"  {op['self_ms_per_step']:8.2f} ms  {100 * op['share']:5.1f}%  {op['op'][:90]}")
    print(f"-> {a.out}")


if __name__ == "__main__":
    run_main(main)
