"""Decode latency, prefill, full-forward per engine, and energy per token of the runner configs.

    python -m bench.decode_latency      # CUDA: baseline_8_layer and perhead_6_layer, bf16; CPU: tiny, float32

Models are freshly initialised (latency does not depend on trained weights). On CUDA the modes are eager,
compile and compile+cudagraphs (static KV cache) at batch 1 and 16 after 512 tokens of context, and every
decode row's energy per token is measured three times (windows of at least 2 s, idle power measured before
each and subtracted) to show how repeatable it is. Writes bench/results/decode_latency.json and prints
the tables, decode in microseconds per token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from bench.train_throughput import load_config
from common.cli import parse_args, run_main
from common.device import pick_device
from common.files import atomic_write
from common.hardware import run_metadata
from eval.efficiency import Timings, evaluate_efficiency, table
from eval.latency import MODES
from llama.model import Transformer, count_params
from runtime.engines import ENGINES


def decode_table(rows: list[dict]) -> str:
    """One line per decode row: µs per token, and the energy per token of each run with their spread."""
    out = [
        "| config | mode | batch | µs/token (median) | p10-p90 | tokens/s | J/token net of idle (3 runs) | spread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for d in r["decode"]:
            s, e = d["ms_per_token"], d["energy"]
            runs = e.get("net_j_per_token_runs")
            energy = (
                ", ".join(f"{v:.4f}" for v in runs)
                if runs
                else "unavailable"
                if e["method"] == "unavailable"
                else "n/a"
            )
            spread = e.get("net_j_per_token_spread")
            verdict = "" if spread is None else f"{100 * spread:.1f}%" + ("" if spread <= e["tolerance"] else " (over)")
            out.append(
                f"| {r['config']} | {d['mode']} | {d['batch']} | {1e3 * s['median']:.0f} | "
                f"{1e3 * s['p10']:.0f}-{1e3 * s['p90']:.0f} | {d['tokens_per_s']:,.0f} | {energy} | {verdict} |"
            )
    return "\n".join(out)


@dataclass
class Args:
    configs: list[str] | None = None  # runner names (default: baseline_8_layer, perhead_6_layer on CUDA; tiny on CPU)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    context: int | None = None  # tokens in the cache (default: max_seq_len / 2, 512 for the 100M configs)
    modes: list[Literal[MODES]] | None = None  # default: all on CUDA, eager and compile on CPU
    n_tokens: int = 64  # decode steps per timed pass
    repeats: int = 10  # timed passes per row
    energy_runs: int = 3  # energy windows per decode row
    min_window: float | None = None  # seconds per energy window, at least the counter's floor (NVML 5, RAPL 2)
    # full forward per runtime engine (default: none on CUDA, where decode is the question; three on CPU)
    engines: list[Literal[ENGINES]] | None = None
    out: str = "bench/results/decode_latency.json"  # result JSON


def main(argv=None):
    a = parse_args(Args(), argv)
    device = pick_device(a.device)
    cuda = device.type == "cuda"
    names = a.configs or (["baseline_8_layer", "perhead_6_layer"] if cuda else ["tiny_baseline", "tiny"])
    modes = a.modes or (list(MODES) if cuda else ["eager", "compile"])
    engines = a.engines if a.engines is not None else ([] if cuda else ["torch", "compile", "onnxruntime"])
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for name in names:
        cfg = load_config(name)
        torch.manual_seed(0)
        model = Transformer(cfg.model).to(device=device, dtype=dtype).eval()
        for layer in model.layers:  # trained per-head layers are not zero: time them doing real work
            if layer.attention.head_layer is not None:
                torch.nn.init.normal_(layer.attention.head_layer.w2, std=0.02)
        context = a.context or cfg.model.max_seq_len // 2
        timings = Timings(
            a.batch_sizes, context, context, a.n_tokens, modes, engines,
            min_window_s=a.min_window, repeats=a.repeats, energy_runs=a.energy_runs,
        )  # fmt: skip
        r = evaluate_efficiency(model, device, timings)
        rows.append(
            {
                "config": name,
                "per_head": cfg.model.head_layer is not None,
                "n_layers": cfg.model.n_layers,
                "params": count_params(model)["total"],
                "dtype": str(dtype).removeprefix("torch."),
                "context_len": context,
                **r.to_json(),
            }
        )
        print(f"\n### {name} ({rows[-1]['params'] / 1e6:.1f}M parameters, {rows[-1]['dtype']}, context {context})")
        print(table(r))
        # written after every config: a run stopped by a time limit keeps what it measured
        result = {**run_metadata(device), "benchmark": "decode_latency", "rows": rows}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(a.out, json.dumps(result, indent=2))
    print(f"\n{result['device']}, torch {result['torch_version']}, commit {result['git_commit'][:12]} -> {a.out}")
    print(decode_table(rows))


if __name__ == "__main__":
    run_main(main)
