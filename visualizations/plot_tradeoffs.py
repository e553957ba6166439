"""Quality against latency, energy and size, one point per evaluated model (reads results/ only).

    python -m visualizations.plot_tradeoffs results/ --out results/plots

Bits per byte (lower is better) on the y axis; bubble area is proportional to the model's weights in memory;
per-head models in orange, gated attention in green, baselines in blue, compressed baselines hollow. No front is
drawn: one measurement per model cannot say which differences are noise (a study's report says, with its tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from common.cli import parse_args, positional, run_main  # noqa: E402
from visualizations import save_figures  # noqa: E402
from visualizations.compare import collect, say_skipped  # noqa: E402

AXES = {
    "decode_ms": "decode latency (ms/token, batch 1)",
    "j_per_token": "energy (J/token)",
    "params": "parameters",
}


def family_color(row: dict) -> str:
    """Plain blocks blue, per-head layers orange, gated attention green (both: the per-head colour)."""
    spec = row.get("head_layer") or {}
    if spec.get("gate") and "hidden_dim" not in spec:
        return "C2"
    return "C1" if row.get("per_head") else "C0"


def _legend(ax, title: str | None = None):
    handles = [
        Line2D([], [], marker="o", ls="", color="C0", label="baseline"),
        Line2D([], [], marker="o", ls="", color="C1", label="per-head layers"),
        Line2D([], [], marker="o", ls="", color="C2", label="gated attention"),
        Line2D([], [], marker="o", ls="", mfc="none", color="gray", label="compressed"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="best", title=title, title_fontsize=8)


def _label_offsets(points: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """Text offsets (points) that keep labels of nearby markers apart: a label is as wide as a fifth of the
    axis, so markers within that in x and 8% of the span in y get their labels stacked a line apart, above and
    below in turn."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    offsets, placed = [], []
    for x, y in points:
        near = sum(1 for px, py in placed if abs(px - x) < 0.2 * span_x and abs(py - y) < 0.08 * span_y)
        step = (near + 1) // 2 * 11
        offsets.append((6, 4 + step if near % 2 else 4 - step))
        placed.append((x, y))
    return offsets


def usable(rows: list[dict], x_key: str, y_key: str) -> list[dict]:
    return [r for r in rows if isinstance(r.get(x_key), (int, float)) and isinstance(r.get(y_key), (int, float))]


def tradeoff_figure(rows: list[dict], x_key: str, y_key: str = "bits_per_byte"):
    """The scatter for one cost axis, or None where no model has that cost measured."""
    pts = usable(rows, x_key, y_key)
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    sizes = [r.get("memory_bytes") or 4 * (r.get("params") or 0) for r in pts]
    scale = 1500 / max(sizes) if max(sizes) else 1
    for r, s in zip(pts, sizes, strict=True):
        color = family_color(r)
        compressed = r.get("compression", "none") != "none"
        ax.scatter(
            r[x_key],
            r[y_key],
            s=max(20, s * scale),
            alpha=0.6,
            edgecolors=color,
            linewidths=2,
            facecolors="none" if compressed else color,
        )
        ax.annotate(r["model"], (r[x_key], r[y_key]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(
        xlabel=AXES.get(x_key, x_key),
        ylabel="bits per byte (lower is better)",
        title=f"Quality vs {AXES.get(x_key, x_key).split(' (')[0]}",
    )
    if x_key == "params":
        ax.set_xscale("log")
    _legend(ax, title="bubble area = weights in memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


GROUPED_AXES = {
    "decode_ms": "decode latency (ms/token, batch 1; median, bars p10-p90)",
    "decode_ms_compile": "decode latency, compiled (ms/token, batch 1; median, bars p10-p90)",
    "params": "parameters",
    "flops_per_token": "training FLOPs per token",
}


def grouped_tradeoff_figure(rows: list[dict], x_key: str):
    """Bits per byte (mean, bars: 95% CI over seeds) against one cost, one point per model of a study. No
    front is drawn: which model beats which is for the report's tests to say, not for the eye."""
    pts = [r for r in rows if r.get("bits_per_byte") and r.get(x_key)]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    xs = [r[x_key]["median"] if isinstance(r[x_key], dict) else r[x_key] for r in pts]
    offsets = _label_offsets(list(zip(xs, [r["bits_per_byte"]["mean"] for r in pts], strict=True)))
    for r, x, offset in zip(pts, xs, offsets, strict=True):
        xerr = [[x - r[x_key]["p10"]], [r[x_key]["p90"] - x]] if isinstance(r[x_key], dict) else None
        b = r["bits_per_byte"]
        yerr = [[b["mean"] - b["ci_low"]], [b["ci_high"] - b["mean"]]] if b.get("ci_low") is not None else None
        color = family_color(r)
        face = "none" if r.get("kind") == "compressed" else color
        ax.errorbar(x, b["mean"], xerr=xerr, yerr=yerr, fmt="o", color=color, mfc=face, ms=8, capsize=3)
        ax.annotate(r["model"], (x, b["mean"]), fontsize=7, xytext=offset, textcoords="offset points")
    ax.set(xlabel=GROUPED_AXES[x_key], ylabel="bits per byte (lower is better)")
    ax.set_title(f"Quality vs {GROUPED_AXES[x_key].split(' (')[0]} ({max(r['seeds_measured'] for r in pts)} seeds)")
    if not x_key.startswith("decode_ms"):
        ax.set_xscale("log")
    else:  # latency: the axis spans the medians; a p90 bar far beyond them is cut at the edge and its value written
        right = min(max(r[x_key]["p90"] for r in pts), 1.5 * max(xs))
        left = min(r[x_key]["p10"] for r in pts)
        ax.set_xlim(left - 0.05 * (right - left), right + 0.05 * (right - left))
        for r in pts:
            if r[x_key]["p90"] > right:
                y = r["bits_per_byte"]["mean"]
                ax.annotate(f"p90 {r[x_key]['p90']:.3g} →", (right, y), fontsize=7, ha="right", va="bottom")
    _legend(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def grouped_tradeoff_figures(rows: list[dict]) -> dict:
    figures = {f"tradeoff_{key}.png": grouped_tradeoff_figure(rows, key) for key in GROUPED_AXES}
    return {name: fig for name, fig in figures.items() if fig is not None}


def tradeoff_figures(rows: list[dict]) -> dict:
    """{file name: figure} for every cost axis that at least one model has measured."""
    figures = {f"tradeoff_{key}.png": tradeoff_figure(rows, key) for key in AXES}
    return {name: fig for name, fig in figures.items() if fig is not None}


@dataclass
class Args:
    results: str = positional("results", required=False)  # folder of evaluator result JSONs
    out: str = "results/plots"  # where the PNGs go
    mode: str | None = None  # decoding mode for latency and energy (default: first measured)


def main(argv=None):
    a = parse_args(Args(), argv)
    skipped = []
    rows = collect(a.results, a.mode, skipped=skipped)
    say_skipped(skipped)
    if not rows:
        raise FileNotFoundError(f"no evaluator results in {a.results}")
    figures = tradeoff_figures(rows)
    for key in AXES:
        if f"tradeoff_{key}.png" not in figures:
            print(f"no model has {key} measured: no plot (see the table for why)")
    for path in save_figures(figures, a.out):
        print(path)


if __name__ == "__main__":
    run_main(main)
