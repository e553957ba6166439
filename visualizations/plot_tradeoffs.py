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


FAMILIES = {  # colour -> what it marks, in every plot of a study
    "C0": "baseline",
    "C1": "per-head layers",
    "C2": "gated attention",
    "C4": "per-head RMSNorm",
}


def family_color(row: dict) -> str:
    """Plain blocks blue, per-head layers orange, gated attention green, per-head RMSNorm purple (a model with
    per-head layers and something else: the per-head colour)."""
    spec = row.get("head_layer") or {}
    if "hidden_dim" in spec or (row.get("per_head") and not spec):
        return "C1"
    if spec.get("gate"):
        return "C2"
    if spec.get("head_norm"):
        return "C4"
    return "C0"


def _legend(ax, rows: list[dict], title: str | None = None):
    """A legend of the families the plotted models belong to (and "compressed" where one is), none other."""
    colors = {family_color(r) for r in rows}
    handles = [Line2D([], [], marker="o", ls="", color=c, label=label) for c, label in FAMILIES.items() if c in colors]
    if any(r.get("kind") == "compressed" or r.get("compression", "none") != "none" for r in rows):
        handles.append(Line2D([], [], marker="o", ls="", mfc="none", color="gray", label="compressed"))
    ax.legend(handles=handles, fontsize=8, loc="best", title=title, title_fontsize=8)


def place_labels(ax, xy: list[tuple[float, float]], labels: list[str], fontsize: float = 7):
    """Annotate each point with its label where it overlaps no label placed before (in display space, so log axes
    and the figure's size count): beside the point, else a line above or below, further each time, else on its
    left. Points at one place share one label ("a, b")."""
    ax.autoscale_view()
    pix = ax.transData.transform(xy)
    merged: list[tuple[tuple[float, float], tuple[float, float], str]] = []
    for (px, py), point, label in zip(pix, xy, labels, strict=True):
        same = next((i for i, (q, _, _) in enumerate(merged) if abs(q[0] - px) < 2 and abs(q[1] - py) < 2), None)
        if same is None:
            merged.append(((px, py), point, label))
        else:
            q, p0, text = merged[same]
            merged[same] = (q, p0, f"{text}, {label}")
    char_w, line_h = 0.62 * fontsize * ax.figure.dpi / 72, 1.3 * fontsize * ax.figure.dpi / 72
    boxes: list[tuple[float, float, float, float]] = []
    tries = [(6, 4)] + [(6, 4 + k * dy) for k in range(1, 6) for dy in (line_h, -line_h)] + [(-6, 4)]
    for (px, py), point, text in sorted(merged, key=lambda m: -m[0][1]):
        width = char_w * len(text)
        for dx, dy in tries:
            x0 = px + dx if dx > 0 else px + dx - width
            box = (x0, py + dy, x0 + width, py + dy + line_h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        ha = "left" if dx > 0 else "right"
        ax.annotate(
            text,
            point,
            fontsize=fontsize,
            xytext=(dx * 72 / ax.figure.dpi, dy * 72 / ax.figure.dpi),
            textcoords="offset points",
            ha=ha,
        )


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
    ax.set(
        xlabel=AXES.get(x_key, x_key),
        ylabel="bits per byte (lower is better)",
        title=f"Quality vs {AXES.get(x_key, x_key).split(' (')[0]}",
    )
    if x_key == "params":
        cost_axis(ax, [r[x_key] for r in pts])
    place_labels(ax, [(r[x_key], r[y_key]) for r in pts], [r["model"] for r in pts])
    _legend(ax, pts, title="bubble area = weights in memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def cost_axis(ax, values: list[float]) -> None:
    """A count axis (parameters, FLOPs) in engineering units (2.1M, 5.3G): logarithmic where the values span more
    than a factor of 10, linear otherwise (a log axis over a narrow range prints crowded ×10^n minor labels)."""
    from matplotlib.ticker import EngFormatter, NullFormatter

    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decades labelled, not every minor tick
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


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
    for r, x in zip(pts, xs, strict=True):
        xerr = [[x - r[x_key]["p10"]], [r[x_key]["p90"] - x]] if isinstance(r[x_key], dict) else None
        b = r["bits_per_byte"]
        yerr = [[b["mean"] - b["ci_low"]], [b["ci_high"] - b["mean"]]] if b.get("ci_low") is not None else None
        color = family_color(r)
        face = "none" if r.get("kind") == "compressed" else color
        ax.errorbar(x, b["mean"], xerr=xerr, yerr=yerr, fmt="o", color=color, mfc=face, ms=8, capsize=3)
    ax.set(xlabel=GROUPED_AXES[x_key], ylabel="bits per byte (lower is better)")
    ax.set_title(f"Quality vs {GROUPED_AXES[x_key].split(' (')[0]} ({max(r['seeds_measured'] for r in pts)} seeds)")
    if not x_key.startswith("decode_ms"):
        cost_axis(ax, xs)
    else:  # latency: the axis spans the medians; a p90 bar far beyond them is cut at the edge and its value written
        right = min(max(r[x_key]["p90"] for r in pts), 1.5 * max(xs))
        left = min(r[x_key]["p10"] for r in pts)
        ax.set_xlim(left - 0.05 * (right - left), right + 0.05 * (right - left))
        for r in pts:
            if r[x_key]["p90"] > right:
                y = r["bits_per_byte"]["mean"]
                ax.annotate(f"p90 {r[x_key]['p90']:.3g} →", (right, y), fontsize=7, ha="right", va="bottom")
    place_labels(ax, [(x, r["bits_per_byte"]["mean"]) for r, x in zip(pts, xs, strict=True)], [r["model"] for r in pts])
    _legend(ax, pts)
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
