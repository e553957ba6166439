"""Box plots, table and report of a serving comparison (serve/client.py's requests.jsonl and summary.json).

    python -m visualizations.serving results/serving

Reads results only; the same for this project's server and any other OpenAI-compatible one (the server's own
figures appear where it sent them). The report states a difference between targets only where its test
supports it (Benjamini-Hochberg q < 0.05 over every test of the report, and for paired tests an interval
that excludes 1), else "not distinguishable".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.cli import parse_args, positional, run_main
from common.files import atomic_write
from common.load import describe

LABELS = {
    "ttft_ms": "time to first token, client side (ms)",
    "tpot_ms": "time per output token after the first, client side (ms)",
    "e2e_ms": "end-to-end latency, client side (ms)",
}


def box_plots(rows: list[dict], targets: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LABELS), figsize=(4.2 * len(LABELS), 4))
    ok = [r for r in rows if r["status"] == 200]
    for ax, (metric, label) in zip(axes, LABELS.items(), strict=True):
        data = [[r[metric] for r in ok if r["target"] == t and r.get(metric) is not None] for t in targets]
        ax.boxplot(data, tick_labels=targets, showfliers=True)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def _p(d: dict | None, key: str) -> str:
    return f"{d[key]:.2f}" if d else "n/a"


def table(summary: dict) -> str:
    lines = [
        "| target | ok / sent | TTFT (vLLM) p50 / p90 / p99 ms | TPOT (vLLM) p50 / p90 / p99 ms | e2e p50 / p99 ms "
        "| server TTFT p50 ms | tokens/s per request | J/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, r in summary["targets"].items():
        ttft, tpot, e2e = r["ttft_ms"], r["tpot_ms"], r["e2e_ms"]
        j = f"{r['energy_j_per_token']:.4f}" if r["energy_j_per_token"] else "unavailable"
        tps = f"{r['tokens_per_s_per_request']:,.0f}" if r["tokens_per_s_per_request"] else "n/a"
        lines.append(
            f"| {t} | {r['ok']} / {r['requests']} | {_p(ttft, 'p50')} / {_p(ttft, 'p90')} / {_p(ttft, 'p99')} | "
            f"{_p(tpot, 'p50')} / {_p(tpot, 'p90')} / {_p(tpot, 'p99')} | {_p(e2e, 'p50')} / {_p(e2e, 'p99')} | "
            f"{_p(r.get('server_ttft_ms'), 'p50')} | {tps} | {j} |"
        )
    return "\n".join(lines)


def statements(summary: dict) -> list[str]:
    out = []
    for t in summary["tests"]:
        label = LABELS[t["metric"]]
        why = f"q = {t['q']:.3g}" if t.get("q") is not None else t.get("reason", "")
        if t["pair"] is None:
            verdict = "differ" if t["distinguishable"] else "are not distinguishable"
            out.append(f"- {label}: the targets {verdict} (Kruskal-Wallis, {why}).")
            continue
        a, b = t["pair"]
        if t.get("ci_low") is not None:  # paired by prompt: the ratio, its interval and its test agree
            r = f"{a}/{b} = x{t['median']:.3f} [{t['ci_low']:.3f}, {t['ci_high']:.3f}] over {t['n']} prompts"
            if t["distinguishable"]:
                lower = a if t["median"] < 1 else b
                out.append(f"  - {a} vs {b}: {lower} is lower ({r}; Wilcoxon signed-rank {why}).")
            else:
                out.append(f"  - {a} vs {b}: not distinguishable ({r}; {why}).")
        elif t["distinguishable"]:
            lower = a if t["effect"] > 0.5 else b
            out.append(f"  - {a} vs {b}: {lower} is lower (Mann-Whitney {why}, P({a} < {b}) = {t['effect']:.2f}).")
        else:
            out.append(f"  - {a} vs {b}: not distinguishable ({why}).")
    return out


def sweep_figure(rows: list[dict]):
    """Output tokens/s, TTFT and TPOT (vLLM's, p50) and J/token against concurrency, a line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("tokens_per_s", "output tokens/s"), ("ttft_ms_p50", "TTFT p50 (ms)"), ("tpot_ms_p50", "TPOT p50 (ms)")]
    if any(r.get("j_per_token") for r in rows):
        keys.append(("j_per_token", "J / token"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        for i, t in enumerate(dict.fromkeys(r["target"] for r in rows)):
            pts = sorted((r["concurrency"], r[key]) for r in rows if r["target"] == t and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=f"C{i}", label=t)
        ax.set(xlabel="requests in flight (concurrency)", ylabel=label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_sweep_report(folder: Path) -> Path:
    """sweep.md and plots/sweep.png from a concurrency sweep's sweep.json."""
    from visualizations import save_figures

    rows = json.loads((folder / "sweep.json").read_text())["rows"]
    save_figures({"sweep.png": sweep_figure(rows)}, folder / "plots")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [
        "# Concurrency sweep",
        "",
        "The same load at each concurrency, one run after another (the runs: `concurrency-N/`). Latencies as "
        "vLLM's bench serve defines them (p50), and TPOT as guidellm defines it beside (the first token's share "
        "counted in: (last - first token) / tokens); tokens/s: the target's output tokens over the run's wall time; "
        "J/token: the server's counter over the whole run (GET /energy).",
        "",
        "| concurrency | target | ok / sent | output tokens/s | TTFT (vLLM) p50 / p90 ms | TPOT (vLLM) p50 / p90 ms "
        "| TPOT (guidellm) p50 ms | goodput req/s | J/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['target']} | {r['ok']} / {r['requests']} | {f(r['tokens_per_s'], '.1f')} | "
            f"{f(r['ttft_ms_p50'], '.1f')} / {f(r['ttft_ms_p90'], '.1f')} | {f(r['tpot_ms_p50'], '.2f')} / "
            f"{f(r['tpot_ms_p90'], '.2f')} | {f(r.get('guidellm_tpot_ms_p50'), '.2f')} | "
            f"{f(r['goodput_requests_per_s'], '.2f')} | {f(r['j_per_token'], '.3g')} |"
        )
    lines += ["", "![sweep](plots/sweep.png)", ""]
    return atomic_write(folder / "sweep.md", "\n".join(lines))


def write_serving_report(folder: str | Path) -> Path:
    from visualizations import save_figures

    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines() if line]
    targets = list(summary["targets"])
    save_figures({"serving_boxplots.png": box_plots(rows, targets)}, folder / "plots")
    atomic_write(folder / "table.md", table(summary) + "\n")
    s, srv = summary["settings"], summary["server"]
    energy = {r.get("energy_reason") for r in summary["targets"].values()} - {None}
    schedule = f"Poisson arrivals at {s['rate']} requests/s" if s.get("rate") else "all sent at once"
    if s.get("duration_s"):
        schedule += f", none sent after {s['duration_s']} s ({s['sent']} of {s['requests']} sent)"
    ours = "max_tokens_limit" in srv
    batch = srv.get("max_batch") or {}
    how = (
        "served with continuous batching (" + ", ".join(f"{e} up to {n}" for e, n in batch.items()) + " sequences)"
        if any(n > 1 for n in batch.values())
        else "served one sequence at a time"
    )
    where = (
        f"{how} on {srv.get('device')}, torch {srv.get('torch_version')}, commit {srv.get('git_commit', 'unknown')}"
        if ours
        else f"an OpenAI-compatible server at {srv['base_url']} (it says nothing more about itself)"
    )
    lines = [
        f"# Serving comparison: {srv.get('model') or ', '.join(targets)}",
        "",
        f"{summary['requests']} requests ({schedule}; {s['concurrency']} in flight at most, {s['max_tokens']} new "
        f"tokens at most, temperature {s['temperature']}, {s['prompts']} prompts), rotated over the targets so each "
        f"served the same prompts under the same load; {where}. {summary['ok']} answered in "
        f"{summary['wall_s']:.1f} s ({summary['requests_per_s']:.2f} requests/s, {summary['tokens_per_s']:.0f} "
        "tokens/s).",
        "",
        (
            "Every engine was checked token for token against eager greedy decoding before it served. "
            + (f"Not served: {srv['unavailable']}." if srv.get("unavailable") else "")
            if ours
            else ""
        ),
        "",
        table(summary),
        "",
        f"Prompts longer than the context minus max_tokens kept their end: "
        f"{sum(r.get('prompts_truncated', 0) for r in summary['targets'].values())} requests.",
        "",
        "Measured by the client from each streamed answer, as vLLM's bench serve defines them: TTFT from sending"
        " the request to the first chunk with a choice (even an empty one); end-to-end to the last such chunk;"
        " TPOT = (end-to-end - TTFT) / (tokens - 1); the server's queue included. The server's own TTFT"
        " (prompt processing and the first token, without HTTP or queue) is"
        " shown where the server reports it.",
        "" if not energy else f"Energy: unavailable ({sorted(energy)[0]}).",
        "",
        load_line(summary.get("load")),
        "",
        "## What the measurements support",
        "",
        "Kruskal-Wallis across all targets first, then each pair on the requests that share a prompt: the median"
        " ratio with the interval of the Wilcoxon signed-rank test and its p-value; Benjamini-Hochberg over"
        " every test here. A difference is stated only at q < 0.05 with an interval that excludes 1. Each interval"
        " is a 95% interval of that comparison alone; q also counts how many comparisons were made, so with few"
        " requests an interval can exclude 1 while q stays above 0.05: then more requests are needed.",
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
    folder = Path(a.folder)
    if (folder / "sweep.json").is_file() and not (folder / "summary.json").is_file():
        print(f"-> {write_sweep_report(folder)}")
        return
    print(f"-> {write_serving_report(folder)}")


if __name__ == "__main__":
    run_main(main)


def load_line(load: dict | None) -> str:
    """What the report says of the machine during the run: a busy machine in bold (its latencies are slower and
    noisier), a quiet one as measured, or that it was not measured."""
    if not load or load.get("other_processes_cores") is None:
        return "Machine load during the run: not measured."
    busy = describe(load)
    if busy:
        return f"**Busy machine**: {busy}."
    counted = " (the server's own CPU counted among them)" if load.get("server_counted_as_other") else ""
    return (
        f"Machine load during the run: other processes used {load['other_processes_cores']:.2f} of its "
        f"{load['cores']} cores on average{counted}: quiet enough for its timings."
    )
