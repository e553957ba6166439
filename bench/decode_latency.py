"""Decode latency, prefill, full-forward per engine, and energy per token of the runner configs.

    python -m bench.decode_latency          # CUDA: 8-layer baseline and per-head, bf16; CPU: tiny, float32

Models are freshly initialised (latency does not depend on trained weights). On CUDA the modes are eager,
compile and compile+cudagraphs at batch 1, 8 and 32, and the energy per token of compile+cudagraphs decoding
at batch 1 is measured three times to show how repeatable it is. Writes bench/results/decode_latency.json.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from bench.train_throughput import load_config
from common.cli import parse_args, run_main
from common.device import pick_device
from common.energy import find_counter, measure_energy
from common.hardware import run_metadata
from eval.efficiency import evaluate_efficiency, table
from eval.latency import MODES, decode_fn
from llama.model import Transformer, count_params


def energy_repeats(model, device, batch, context, n_tokens, mode, runs=3) -> dict:
    counter, reason = find_counter(device)
    if counter is None:
        return {"method": "unavailable", "reason": reason}
    run, cleanup = decode_fn(model, batch, context, n_tokens, mode)
    results = [
        measure_energy(run, batch * n_tokens, device, min_window_s=2.0, idle_s=1.0, counter=counter)
        for _ in range(runs)
    ]
    cleanup()
    per_token = [r.get("j_per_token") for r in results]
    out = {"method": counter.method, "mode": mode, "batch": batch, "runs": results}
    if all(v is not None for v in per_token):
        med = statistics.median(per_token)
        out |= {"j_per_token": per_token, "median": med, "max_rel_spread": (max(per_token) - min(per_token)) / med}
    return out


@dataclass
class Args:
    configs: list[str] | None = None  # runner names (default: the 8-block pair on CUDA, tiny on CPU)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    batch_sizes: list[int] | None = None  # default: 1 8 32
    context: int | None = None  # tokens in the cache (default: max_seq_len / 2)
    modes: list[Literal[MODES]] | None = None  # default: all on CUDA, eager and compile on CPU
    out: str = "bench/results/decode_latency.json"  # result JSON


def main(argv=None):
    a = parse_args(Args(), argv)
    device = pick_device(a.device)
    cuda = device.type == "cuda"
    names = a.configs or (["baseline_8_layer", "perhead_8_layer"] if cuda else ["tiny_baseline", "tiny"])
    modes = a.modes or (["eager", "compile", "compile+cudagraphs"] if cuda else ["eager", "compile"])
    batch_sizes = a.batch_sizes or [1, 8, 32]
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
        r = evaluate_efficiency(
            model,
            device,
            batch_sizes,
            context,
            context,
            32,
            modes,
            ["torch", "compile", "torchscript", "onnxruntime"],
            energy=True,
            repeats=3,
        )
        r["energy_repeatability"] = energy_repeats(model, device, 1, context, 32, modes[-1])
        rows.append(
            {
                "config": name,
                "per_head": cfg.model.head_layer is not None,
                "n_layers": cfg.model.n_layers,
                "params": count_params(model)["total"],
                "dtype": str(dtype).removeprefix("torch."),
                "context_len": context,
                **r,
            }
        )
        print(f"\n### {name} ({rows[-1]['params'] / 1e6:.1f}M parameters, {rows[-1]['dtype']}, context {context})")
        print(table(r))
        e = r["energy_repeatability"]
        print("energy per token, 3 runs:", e.get("j_per_token", e.get("reason")))
    result = {**run_metadata(device), "benchmark": "decode_latency", "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}, torch {result['torch_version']}, commit {result['git_commit'][:12]} -> {a.out}")


if __name__ == "__main__":
    run_main(main)
