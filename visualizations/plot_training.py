"""Training curves and costs from logs/ (never runs a model).

python -m visualizations.plot_training                       # every run under logs/
python -m visualizations.plot_training --runs tiny tiny_baseline --out results/plots
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.cli import parse_args, run_main  # noqa: E402
from common.records import TrainingSummary  # noqa: E402
from common.results import PerplexityResult  # noqa: E402
from visualizations import save_figures  # noqa: E402


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def load_runs(log_dir: str | Path, names: list[str] | None = None) -> dict[str, dict]:
    log_dir = Path(log_dir)
    names = names or sorted(p.name for p in log_dir.iterdir() if (p / "metrics.jsonl").is_file())
    runs = {}
    for name in names:
        d = log_dir / name
        if not (d / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{d} has no metrics.jsonl; train the run first or check --log-dir")
        runs[name] = {
            "metrics": _jsonl(d / "metrics.jsonl"),
            "val": _jsonl(d / "val.jsonl"),
            "summary": TrainingSummary.read(d),  # None until the run finished
        }
    return runs


STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")  # models of one colour (two baselines) apart by their line and their dots


def model_styles(names: list[str], groups: dict[str, dict]) -> dict[str, tuple[str, str, str]]:
    """Model -> (colour, line style, marker): the colour its family's in every plot of a study, the style and
    marker telling apart the models of one family, the same for every seed of a model."""
    styles, used = {}, {}
    for name in names:
        g = groups.get(name) or {"model": name, "color": "gray"}
        if g["model"] not in styles:
            k = used.get(g["color"], 0)
            used[g["color"]] = k + 1
            styles[g["model"]] = (g["color"], STYLES[k % len(STYLES)], MARKERS[k % len(MARKERS)])
    return styles


def training_curves(runs: dict[str, dict], groups: dict[str, dict] | None = None, timed_alone: bool = True):
    """Loss against steps (and against wall-clock time where the runs had the machine to themselves):
    training loss as lines, validation loss as dots. With ``groups`` (run -> {"model": name, "color": "C1"}),
    the seeds of one model share its colour and line style and one legend entry, the colours meaning what they
    mean in the trade-off plots (baseline blue, per-head orange, gated green); the legend sits beside the
    axes, not over the data."""
    groups = groups or {name: {"model": name, "color": f"C{i % 10}"} for i, name in enumerate(runs)}
    styles = model_styles(list(runs), groups)
    panels = 2 if timed_alone else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 2.2, 4.5), sharey=True, squeeze=False)
    a_step = axes[0, 0]
    labelled = set()
    for name, r in runs.items():
        model = (groups.get(name) or {"model": name})["model"]
        color, style, marker = styles[model]
        label = None if model in labelled else model
        labelled.add(model)
        m, v = r["metrics"], r["val"]
        xs = [("step", a_step)] + ([("elapsed_s", axes[0, 1])] if timed_alone else [])
        for key, ax in xs:
            ax.plot([x[key] for x in m], [x["loss"] for x in m], style, color=color, alpha=0.6, lw=1, label=label)
            if v:
                ax.plot([x[key] for x in v], [x["val_loss"] for x in v], marker, color=color, ms=4, ls="")
    a_step.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="Loss vs step (lines: train, dots: val)")
    if timed_alone:
        axes[0, 1].set(xlabel="wall-clock training time (s)", title="Loss vs time")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    handles, labels = a_step.get_legend_handles_labels()
    right = 1 - 2.0 / fig.get_figwidth()  # a margin for the legend, inside the figure (saved PNGs keep it)
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(right, 0.5), frameon=False)
    return fig


def training_costs(runs: dict[str, dict]):
    """Training time and throughput of each finished run (from summary.json)."""
    done = {n: r["summary"] for n, r in runs.items() if r["summary"]}
    fig, (a_time, a_tps) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(done)
    a_time.bar(names, [s.train_time_s for s in done.values()], color="C0")
    a_tps.bar(names, [s.tokens_per_s for s in done.values()], color="C1")
    a_time.set(ylabel="training time (s)", title="Training time")
    a_tps.set(ylabel="tokens / s", title="Training throughput")
    for ax in (a_time, a_tps):
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def over_training(
    points: dict[str, list[PerplexityResult]],
    key: str = "perplexity",
    label: str = "held-out perplexity",
    note: str = "",
    groups: dict[str, dict] | None = None,
):
    """Quality (``key``: a figure of eval.perplexity, "perplexity" or "bits_per_byte") of a run's periodic
    checkpoints against the tokens they had seen (and the training energy spent by then, where it was measured);
    ``note`` (e.g. "seed 0 of each model") goes into the title. With ``groups`` (run -> {"model", "color"}) each
    run is drawn in its family's colour, style and marker, as in the training curves."""
    has_energy = any(p.energy_j is not None for ps in points.values() for p in ps)
    fig, axes = plt.subplots(1, 2 if has_energy else 1, figsize=(12 if has_energy else 6.5, 4.5), squeeze=False)
    groups = groups or {name: {"model": name, "color": f"C{i % 10}"} for i, name in enumerate(points)}
    styles = model_styles(list(points), groups)
    for name, ps in points.items():
        ps = sorted(ps, key=lambda p: p.tokens)
        quality = [getattr(p.figures, key) for p in ps]
        model = (groups.get(name) or {"model": name})["model"]
        color, style, marker = styles[model]
        fmt = {"color": color, "ls": style, "marker": marker, "label": model}
        axes[0, 0].plot([p.tokens for p in ps], quality, **fmt)
        if has_energy:
            e = [(p.energy_j, q) for p, q in zip(ps, quality, strict=True) if p.energy_j is not None]
            axes[0, 1].plot([x for x, _ in e], [q for _, q in e], **fmt)
    suffix = f" ({note})" if note else ""
    axes[0, 0].set(xlabel="training tokens", ylabel=label, title=f"{label} over training{suffix}")
    if has_energy:
        axes[0, 1].set(xlabel="training energy so far (J)", ylabel=label, title=f"{label} vs training energy")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def training_figures(runs: dict[str, dict], timed_alone: bool = True, groups: dict[str, dict] | None = None) -> dict:
    """The loss curves, and the training times and throughputs where the runs had the machine to themselves
    (timed beside other runs, wall-clock figures measure the machine's load, not the models: not drawn)."""
    figures = {"training_curves.png": training_curves(runs, groups, timed_alone)}
    if timed_alone:
        figures["training_costs.png"] = training_costs(runs)
    return figures


@dataclass
class Args:
    log_dir: str = "logs"  # folder of logs/<run>/
    runs: list[str] | None = None  # runs to plot (default: all under --log-dir)
    out: str = "results/plots"  # where the PNGs go


def main(argv=None):
    a = parse_args(Args(), argv)
    runs = load_runs(a.log_dir, a.runs)
    if not runs:
        raise FileNotFoundError(f"no runs with metrics.jsonl under {a.log_dir}")
    for path in save_figures(training_figures(runs), a.out):
        print(path)


if __name__ == "__main__":
    run_main(main)
