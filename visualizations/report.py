"""A study's report.md: setup, the comparison table, what the measurements say, and the figures.

Every number in it is read from logs/ and results/; a comparison is only stated where both sides were
measured. Written by ``python -m runners.study``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from visualizations.plot_tradeoffs import pareto_front, usable


def _num(v, fmt):
    return "-" if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, fmt)


def findings(rows: list[dict]) -> list[str]:
    out = []
    q = usable(rows, "bits_per_byte", "bits_per_byte")
    if q:
        best = min(q, key=lambda r: r["bits_per_byte"])
        out.append(f"Lowest bits per byte: **{best['model']}** ({best['bits_per_byte']:.4f}).")
    for key, what in (("decode_ms", "decode latency"), ("j_per_token", "energy per token"), ("params", "parameters")):
        pts = usable(rows, key, "bits_per_byte")
        if len(pts) >= 2:
            front = [pts[i]["model"] for i in pareto_front([(r[key], r["bits_per_byte"]) for r in pts])]
            out.append(f"Pareto front of bits per byte vs {what}: {', '.join(front)}.")
    # the research question: a per-head model with fewer blocks against deeper baselines and their compressions
    trained = [r for r in rows if r.get("compression") == "none" and isinstance(r.get("bits_per_byte"), float)]
    for ph in (r for r in trained if r.get("per_head")):
        for other in rows:
            if other is ph or other.get("per_head") or not isinstance(other.get("bits_per_byte"), float):
                continue
            if (other.get("n_layers") or 0) < (ph.get("n_layers") or 0):
                continue
            better = "better" if ph["bits_per_byte"] < other["bits_per_byte"] else "worse"
            line = (
                f"{ph['model']} ({ph['n_layers']} layers, per-head) vs {other['model']} ({other['n_layers']} "
                f"layers, {other['compression']}): bits per byte {ph['bits_per_byte']:.4f} vs "
                f"{other['bits_per_byte']:.4f} ({better})"
            )
            if isinstance(ph.get("decode_ms"), float) and isinstance(other.get("decode_ms"), float):
                line += f"; decode {ph['decode_ms']:.3f} vs {other['decode_ms']:.3f} ms/token"
            out.append(line + ".")
    if any(isinstance(r.get("decode_ms"), float) for r in rows):
        out.append(
            "Latencies are medians; their p10-p90 spreads are in evals/*-efficiency.json. On a small shared "
            "CPU, differences smaller than those spreads are noise, not findings."
        )
    energies = [r.get("j_per_token") for r in rows]
    if energies and all(e == "unavailable" or e is None for e in energies):
        out.append(
            "Energy per token was not measured on this machine (no NVML or readable RAPL counter): "
            "every J/token field says so, and no energy figure is drawn."
        )
    return out


def write_report(study, rows: list[dict], runs: dict[str, dict], figures: list[str], over_training: dict) -> Path:
    out = study.out
    first = next(iter(sorted((out / "evals").glob("*.json"))), None)  # any result names the device and commit
    meta = json.loads(first.read_text()) if first else {}
    lines = [
        f"# Study `{study.name}`",
        "",
        f"Measured on {meta.get('device', 'unknown device')}, torch {meta.get('torch_version', '?')}, commit "
        f"`{str(meta.get('git_commit', '?'))[:12]}`; report written {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "Does a per-head model with fewer blocks match deeper baselines and their compressed versions on "
        "quality, latency and energy? Every figure below was measured by the commands of this study; "
        "'-' marks what was not measured.",
        "",
        "## Training runs",
        "",
        "| run | runner arguments | params | layers | per-head | tokens | time (s) | tokens/s | final val loss "
        "| unigram val loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in study.runs:
        s = runs.get(r["name"], {}).get("summary") or {}
        lines.append(
            f"| {r['name']} | `{r['runner']} {' '.join(r.get('args', []))}` | {_num(s.get('params'), ',')} | "
            f"{_num(s.get('n_layers'), 'd')} | {'yes' if s.get('per_head') else 'no'} | {_num(s.get('tokens'), ',')} | "
            f"{_num(s.get('train_time_s'), '.0f')} | {_num(s.get('tokens_per_s'), ',.0f')} | "
            f"{_num(s.get('final_val_loss'), '.4f')} | {_num(s.get('unigram_val_loss'), '.4f')} |"
        )
    if study.compress:
        lines += [
            "",
            "Compressed baselines: "
            + "; ".join(f"{c['name']} = `eval.compress {' '.join(c['args'])}` on {c['base']}" for c in study.compress)
            + ".",
        ]
    lines += ["", "## Comparison", "", (out / "table.md").read_text().strip(), "", "## What the measurements say", ""]
    lines += [f"- {f}" for f in findings(rows)] or ["- (no model has been evaluated yet)"]
    captions = {
        "training_curves.png": "Training (solid) and validation (dashed) loss against steps and wall-clock time.",
        "training_costs.png": "Training time and throughput per run.",
        "tradeoff_decode_ms.png": "Bits per byte against decode latency at batch 1.",
        "tradeoff_j_per_token.png": "Bits per byte against energy per decoded token.",
        "tradeoff_params.png": "Bits per byte against parameter count.",
        "over_training.png": "Held-out perplexity of periodic checkpoints against training tokens.",
    }
    lines += ["", "## Figures", ""]
    for f in figures:
        lines += [f"![{f}](plots/{f})", "", captions.get(f, f), ""]
    if over_training:
        lines += [
            "## Checkpoints over training",
            "",
            "| run | step | tokens | perplexity | bits per byte | training energy (J) |",
            "|---|---|---|---|---|---|",
        ]
        for run, pts in over_training.items():
            for p in sorted(pts, key=lambda p: p["step"]):
                lines.append(
                    f"| {run} | {p['step']} | {p['tokens']:,} | {p['perplexity']:.3f} | "
                    f"{_num(p.get('bits_per_byte'), '.4f')} | {_num(p.get('energy_j'), '.1f')} |"
                )
        lines.append("")
    lines += [
        "## Reproduce",
        "",
        "```bash",
        f"python -m runners.study {study.source or study.name}",
        "```",
        "",
        f"Per-step logs are in `{out / 'logs'}`; raw results in `{out / 'evals'}`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
