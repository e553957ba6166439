"""Box plots, table and report of a serving comparison (serve/client.py's requests.jsonl and summary.json).

    python -m visualizations.serving results/serving

Reads results only. The report states a difference between engines only where its test supports it
(Benjamini-Hochberg q < 0.05 over every test of the report), else "not distinguishable".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.cli import parse_args, positional, run_main
from common.files import atomic_write

LABELS = {
    "ttft_ms": "time to first token (ms)",
    "tpot_ms": "time per output token after the first (ms)",
    "e2e_ms": "end-to-end latency on the server (ms)",
    "client_ms": "round trip seen by the client, queue included (ms)",
}


def box_plots(rows: list[dict], engines: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LABELS), figsize=(4.2 * len(LABELS), 4))
    ok = [r for r in rows if r["status"] == 200]
    for ax, (metric, label) in zip(axes, LABELS.items(), strict=True):
        data = [[r[metric] for r in ok if r["engine"] == e and r.get(metric) is not None] for e in engines]
        ax.boxplot(data, tick_labels=engines, showfliers=True)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def _p(d: dict | None, key: str) -> str:
    return f"{d[key]:.2f}" if d else "n/a"


def table(summary: dict) -> str:
    lines = [
        "| engine | ok / sent | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | e2e p50 / p99 ms | tokens/s "
        "| J/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for e, r in summary["engines"].items():
        ttft, tpot, e2e = r["ttft_ms"], r["tpot_ms"], r["e2e_ms"]
        j = f"{r['energy_j_per_token']:.4f}" if r["energy_j_per_token"] else "unavailable"
        tps = f"{r['tokens_per_s_while_serving']:,.0f}" if r["tokens_per_s_while_serving"] else "n/a"
        lines.append(
            f"| {e} | {r['ok']} / {r['requests']} | {_p(ttft, 'p50')} / {_p(ttft, 'p90')} / {_p(ttft, 'p99')} | "
            f"{_p(tpot, 'p50')} / {_p(tpot, 'p90')} / {_p(tpot, 'p99')} | {_p(e2e, 'p50')} / {_p(e2e, 'p99')} | "
            f"{tps} | {j} |"
        )
    return "\n".join(lines)


def statements(summary: dict) -> list[str]:
    out = []
    for t in summary["tests"]:
        label = LABELS[t["metric"]]
        if t["pair"] is None:
            verdict = "differ" if t["distinguishable"] else "are not distinguishable"
            p = f"q = {t['q']:.3g}" if t.get("q") is not None else t.get("reason", "")
            out.append(f"- {label}: the engines {verdict} (Kruskal-Wallis, {p}).")
            continue
        a, b = t["pair"]
        ratio = t.get("ratio") or {}
        r = (
            f" {a}/{b} = x{ratio['median']:.3f} [{ratio['ci_low']:.3f}, {ratio['ci_high']:.3f}] per prompt"
            if ratio.get("ci_low") is not None
            else ""
        )
        if not t["distinguishable"]:
            why = f"q = {t['q']:.3g}" if t.get("q") is not None else t.get("reason", "")
            out.append(f"  - {a} vs {b}: not distinguishable ({why});{r}")
        else:
            lower = a if t["effect"] > 0.5 else b
            test = f"Mann-Whitney q = {t['q']:.3g}, P({a} < {b}) = {t['effect']:.2f}"
            out.append(f"  - {a} vs {b}: {lower} is lower ({test});{r}")
    return out


def write_serving_report(folder: str | Path) -> Path:
    from visualizations import save_figures

    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines() if line]
    engines = list(summary["engines"])
    save_figures({"serving_boxplots.png": box_plots(rows, engines)}, folder / "plots")
    atomic_write(folder / "table.md", table(summary) + "\n")
    s, srv = summary["settings"], summary["server"]
    energy = {r.get("energy_reason") for r in summary["engines"].values()} - {None}
    lines = [
        f"# Serving comparison: {srv['model']}",
        "",
        f"{summary['requests']} requests ({s['concurrency']} in flight at once, {s['max_tokens']} new tokens at most, "
        f"temperature {s['temperature']}, {s['prompts']} prompts), rotated over the engines so each engine served "
        f"the same prompts under the same load; served one at a time on {srv.get('device')}, "
        f"torch {srv.get('torch_version')}, commit {srv.get('git_commit', 'unknown')}. {summary['ok']} answered in "
        f"{summary['wall_s']:.1f} s ({summary['requests_per_s']:.2f} requests/s, {summary['tokens_per_s']:.0f} "
        "tokens/s).",
        "",
        "Every engine was checked token for token against eager greedy decoding before it served. "
        + (f"Not served: {srv['unavailable']}." if srv.get("unavailable") else ""),
        "",
        table(summary),
        "",
        f"Prompts longer than the context minus max_tokens kept their end: "
        f"{sum(r.get('prompts_truncated', 0) for r in summary['engines'].values())} requests.",
        "",
        "TTFT: prompt processing and the first token; TPOT: (end-to-end - TTFT) / (tokens - 1); end-to-end on the"
        " server excludes the HTTP round trip and the queue, which the client's figure includes.",
        "" if not energy else f"Energy: unavailable ({sorted(energy)[0]}).",
        "",
        "## What the measurements support",
        "",
        "Kruskal-Wallis across all engines first, then each pair with Mann-Whitney (effect: the probability that a"
        " request of the first engine is faster than one of the second; 0.5 = no difference) and the median"
        " per-prompt ratio with its bootstrap interval; Benjamini-Hochberg over every test here. A difference is"
        " stated only at q < 0.05.",
        "",
        *statements(summary),
        "",
        "![box plots](plots/serving_boxplots.png)",
        "",
    ]
    return atomic_write(folder / "report.md", "\n".join(lines))


@dataclass
class Args:
    folder: str = positional()  # the load client's output folder (summary.json, requests.jsonl)


def main(argv=None):
    a = parse_args(Args(), argv)
    print(f"-> {write_serving_report(a.folder)}")


if __name__ == "__main__":
    run_main(main)
