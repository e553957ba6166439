"""Training throughput (tokens/s) and MFU of the runner configs: forward, backward and AdamW step.

    python -m bench.train_throughput                        # CUDA: the 5- and 8-layer 100M configs; CPU: tiny
    python -m bench.train_throughput --configs tiny tiny_baseline --steps 10

MFU = tokens/s x training FLOPs per token (llama.model.flops_per_token, the PaLM/nanoGPT convention)
divided by the device's dense bf16 peak (989e12 on H100/H200); on a CPU there is no known peak and no MFU.
Batches are random tokens: throughput does not depend on the text. Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import parse_args, run_main
from common.device import autocast, compute_dtype, pick_device
from common.hardware import peak_flops, run_metadata
from common.timing import spread, sync, time_repeats
from llama.model import Transformer, count_params, flops_per_token
from training.trainer import loss_fn, make_optimizer

GPU_CONFIGS = ["baseline_5_layer", "perhead_5_layer", "baseline_8_layer", "perhead_8_layer"]
CPU_CONFIGS = ["tiny_baseline", "tiny"]


def load_config(name: str):
    return importlib.import_module(f"runners.{name}").config()


def measure(name: str, device: torch.device, steps: int, warmup: int, batch_size: int | None, compile_: bool | None):
    cfg = load_config(name)
    args = cfg.model
    B, T = batch_size or cfg.batch_size, cfg.seq_len
    torch.manual_seed(0)
    model = Transformer(args).to(device)
    use_compile = compile_ if compile_ is not None else device.type == "cuda"
    if use_compile:
        model.compile()
    optimizer = make_optimizer(model, cfg, device)
    dtype = compute_dtype("auto", device)  # as the trainer runs on this device
    amp = autocast(device, dtype)
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)

    def step():
        with amp:
            loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_repeats(step, device, warmup, steps)
    sync(device)
    tps = [B * T / t for t in times]
    flops_tok, peak = flops_per_token(args, T), peak_flops(device)
    s = spread(tps)
    return {
        "config": name,
        "n_layers": args.n_layers,
        "per_head": args.head_layer is not None,
        "params": count_params(model)["total"],
        "batch": B,
        "seq_len": T,
        "dtype": "bfloat16-autocast" if dtype == torch.bfloat16 else "float32",
        "compile": use_compile,
        "warmup_steps": warmup,
        "repeats": steps,
        "tokens_per_s": s,
        "step_ms": spread([1e3 * t for t in times]),
        "flops_per_token": flops_tok,
        "mfu": None if peak is None else {k: (v * flops_tok / peak if k != "n" else v) for k, v in s.items()},
        "peak_flops": peak,
        "max_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }


def table(rows: list[dict]) -> str:
    out = [
        "| config | layers | per-head | params | batch x seq | tokens/s (median) | p10-p90 | MFU | step ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["tokens_per_s"]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']['median']:.1f}%"
        out.append(
            f"| {r['config']} | {r['n_layers']} | {'yes' if r['per_head'] else 'no'} | {r['params'] / 1e6:.1f}M | "
            f"{r['batch']}x{r['seq_len']} | {t['median']:,.0f} | {t['p10']:,.0f}-{t['p90']:,.0f} | "
            f"{mfu} | {r['step_ms']['median']:.1f} |"
        )
    return "\n".join(out)


@dataclass
class Args:
    configs: list[str] | None = None  # runner names (default: 100M configs on CUDA, tiny on CPU)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    steps: int = 20  # timed steps
    warmup: int = 5  # untimed steps first (compilation happens here)
    batch_size: int | None = None  # default: the runner's
    compile: bool | None = None  # torch.compile (default: on CUDA only)
    out: str = "bench/results/train_throughput.json"  # result JSON


def main(argv=None):
    a = parse_args(Args(), argv)
    device = pick_device(a.device)
    names = a.configs or (GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    rows = [measure(n, device, a.steps, a.warmup, a.batch_size, a.compile) for n in names]
    result = {**run_metadata(device), "benchmark": "train_throughput", "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"{result['device']}, torch {result['torch_version']}, commit {result['git_commit'][:12]}")
    print(table(rows))


if __name__ == "__main__":
    run_main(main)
