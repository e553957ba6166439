"""A study's report.md: setup, the comparison table, what the measurements say, and the figures.

Every number in it is read from logs/ and results/; a comparison is only stated where both sides were
measured. Written by ``python -m runners.study``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from visualizations.grouped import sentence


def _num(v, fmt):
    return "-" if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, fmt)


HOW_TO_READ = """How to read this report. Each model was trained (or compressed) once per seed; quality is the mean over
seeds with the half-width of its 95% t-interval. Latency was measured for one seed of each model, all models in
one process, in rounds of the rotated order A B C, B C A, ... so that a busy machine slows every model alike.
A comparison says **lower** or **higher** only when its test, adjusted for the number of comparisons in this
report (Benjamini-Hochberg), gives q < 0.05: Welch's t-test over seeds for quality, Mann-Whitney over rounds
for latency. Otherwise it says **not distinguishable** at the number of seeds or rounds it had: the difference
may be real, but this study cannot tell it from seed-to-seed or round-to-round variation. Matched tokens:
every run of the study saw the same number of training tokens. Matched FLOPs: each seed's validation loss is
read off its curve at the smaller of the two runs' training FLOP budgets (FLOPs per token x tokens)."""


def write_report(
    study, rows: list[dict], comps: list[dict], runs: dict[str, dict], figures: list[str], over_training: dict
) -> Path:
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
        HOW_TO_READ,
        "",
        "## Training runs",
        "",
        "| run | runner arguments | params | layers | per-head | train FLOPs/token | tokens | epochs | time (s) "
        "| tokens/s | final val loss | unigram val loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    specs = {m["name"]: m for m in study.members() if m["kind"] == "trained"}
    for name, r in runs.items():
        s = r.get("summary") or {}
        spec = next((x for x in study.runs if x.name == specs.get(name, {}).get("group")), None)
        command = f"{spec.runner} {' '.join(spec.args)}" if spec else "?"
        lines.append(
            f"| {name} | `{command}` | {_num(s.get('params'), ',')} | "
            f"{_num(s.get('n_layers'), 'd')} | {'yes' if s.get('per_head') else 'no'} | "
            f"{_num(s.get('flops_per_token'), '.3g')} | {_num(s.get('tokens'), ',')} | "
            f"{_num(s.get('epochs'), '.2f')} | "
            f"{_num(s.get('train_time_s'), '.0f')} | {_num(s.get('tokens_per_s'), ',.0f')} | "
            f"{_num(s.get('final_val_loss'), '.4f')} | {_num(s.get('unigram_val_loss'), '.4f')} |"
        )
    if study.compress:
        lines += [
            "",
            "Compressed baselines: "
            + "; ".join(f"{c.name} = `eval.compress {' '.join(c.args)}` on {c.base}" for c in study.compress)
            + ".",
        ]
    seeds = max((r.get("seeds_measured") or 0 for r in rows), default=0)
    lines += ["", "## Comparison", "", (out / "table.md").read_text().strip(), "", "## What the measurements say", ""]
    lines += [f"- {sentence(c, seeds)}" for c in comps] or [
        "- (nothing to compare: each per-head model is compared with the baselines at least as deep, trained or "
        "compressed from one, and this study has no such pair)"
    ]
    latency = [c for c in comps if "ratio" in c]
    if latency and not any(c.get("distinguishable") for c in latency):
        lines.append(
            "- No latency difference between the compared models is distinguishable on this machine at these "
            "rounds: no latency ranking is stated."
        )
    energies = [r.get("energy") for r in rows if r.get("energy")]
    if energies and all(e["method"] == "unavailable" for e in energies):
        lines.append(
            "- Energy per token was not measured on this machine (no NVML or readable RAPL counter): every "
            "J/token field says so, and no energy figure is drawn."
        )
    captions = {
        "training_curves.png": "Training (solid) and validation (dashed) loss against steps and wall-clock time.",
        "training_costs.png": "Training time and throughput per run.",
        "tradeoff_decode_ms.png": "Bits per byte (mean, 95% CI over seeds) against decode latency at batch 1 "
        "(median, p10-p90 over interleaved rounds).",
        "tradeoff_params.png": "Bits per byte (mean, 95% CI over seeds) against parameter count.",
        "tradeoff_flops_per_token.png": "Bits per byte (mean, 95% CI over seeds) against training FLOPs per token.",
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
