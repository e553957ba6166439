"""What a load run measured, summarised: per target p50/p90/p99 of each figure (vLLM's definitions, guidellm's
beside), throughput, goodput under SLOs (vLLM's ``--goodput``), the whole run's energy from the server's counter,
the statistics across targets, and one row per point of a concurrency sweep. serve/client.py runs the load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.cli import UserError
from common.files import atomic_write, write_csv
from common.stats import adjust, kruskal, mann_whitney, paired_ratio

METRICS = ("ttft_ms", "tpot_ms", "e2e_ms")  # client-side, vLLM's definitions, compared across targets
GUIDELLM_METRICS = ("guidellm_ttft_ms", "guidellm_tpot_ms", "guidellm_itl_ms", "guidellm_latency_ms")
DEFINITIONS = {  # written into every summary: which tool's formula each column follows
    "ttft_ms, tpot_ms, itl_ms, e2e_ms": "vLLM bench serve (endpoint_request_func.py, calculate_metrics): the "
    "first/last chunk with a choice, even an empty one; tpot = (e2e - ttft) / (output tokens - 1)",
    "guidellm_*": "guidellm (benchmark.py, GenerativeTextResponseStats): the first/last chunk with text; "
    "tpot = (last - first) / output tokens; itl = (last - first) / (output tokens - 1); latency to [DONE]",
    "energy_j_per_token, j_per_token": "the server's energy counter read before and after the run (GET /energy), "
    "over the tokens of the run; none where the server has no counter",
}
SERVER_METRICS = ("queue_ms", "ttft_ms", "tpot_ms", "e2e_ms")  # the server's own, recorded as server_*

SLO_METRICS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2e_ms"}  # vLLM's --goodput keys


SWEEP_COLUMNS = ("concurrency", "target", "ok", "requests", "tokens_per_s", "requests_per_s", "goodput_requests_per_s",
                 "ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "tpot_ms_p90", "e2e_ms_p50", "guidellm_tpot_ms_p50",
                 "j_per_token")  # fmt: skip


def percentiles(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    p50, p90, p99 = np.percentile(xs, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(np.mean(xs)), "n": len(xs)}


def _pairs(rows: list[dict], a: str, b: str, metric: str) -> tuple[list[float], list[float]]:
    """metric of a and of b on the requests they share a prompt (and round) for."""
    by = {(r["target"], r["prompt_index"], r["round"]): r[metric] for r in rows if r.get(metric)}
    keys = [(p, k) for (t, p, k) in by if t == a and (b, p, k) in by]
    return [by[(a, *k)] for k in keys], [by[(b, *k)] for k in keys]


def parse_slo(specs: list[str] | None) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` (milliseconds, vLLM's ``--goodput`` syntax) -> {"ttft_ms": 200.0, ...}."""
    slo = {}
    for spec in specs or []:
        key, _, value = spec.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if key not in SLO_METRICS or not ms > 0:
            raise UserError(f"--goodput {spec!r}: use KEY:MS with KEY one of {sorted(SLO_METRICS)}, e.g. ttft:200")
        slo[SLO_METRICS[key]] = ms
    return slo


def good(row: dict, slo: dict[str, float]) -> bool:
    """Whether an answered request met every SLO, as vLLM's goodput counts it (a one-token answer's TPOT is 0)."""
    return row["status"] == 200 and all((row.get(m) or 0.0) <= limit for m, limit in slo.items())


def summarize(rows: list[dict], targets: list[str], wall_s: float, slo: dict[str, float] | None = None) -> dict:
    per = {}
    for t in targets:
        mine = [r for r in rows if r["target"] == t]
        ok = [r for r in mine if r["status"] == 200]
        tokens = sum(r["tokens_out"] or 0 for r in ok)
        busy_s = sum(r["e2e_ms"] for r in ok) / 1e3
        energy = [r["energy_j"] for r in ok if r.get("energy_j")]
        reasons = {(r.get("energy") or {}).get("reason") for r in ok} - {None}
        per[t] = {
            "requests": len(mine),
            "ok": len(ok),
            "failed": len(mine) - len(ok),
            "errors": sorted({r.get("error") for r in mine if r["status"] != 200} - {None})[:5],
            "prompts_truncated": sum(bool(r.get("prompt_truncated")) for r in ok),
            **{m: percentiles([r.get(m) for r in ok]) for m in METRICS + GUIDELLM_METRICS},
            **{f"server_{m}": percentiles([r.get(f"server_{m}") for r in ok]) for m in SERVER_METRICS},
            "tokens_out": tokens,
            "tokens_per_s_per_request": tokens / busy_s if busy_s else None,  # its own requests' stream time
            "energy_j_per_request": percentiles(energy),
            "energy_j_per_token": sum(energy) / tokens if energy and len(energy) == len(ok) and tokens else None,
            "energy_reason": sorted(reasons)[0] if reasons and not energy else None,
        }
        if slo:
            per[t]["good"] = sum(good(r, slo) for r in mine)
    ok = [r for r in rows if r["status"] == 200]
    tests = []
    for m in METRICS:
        groups = {t: [r[m] for r in ok if r["target"] == t and r.get(m) is not None] for t in targets}
        tests.append({"metric": m, "pair": None} | kruskal(groups))
        for i, a in enumerate(targets):
            for b in targets[i + 1 :]:
                xa, xb = _pairs(ok, a, b, m)
                if xa:  # the same prompts: a paired test whose interval and verdict agree
                    tests.append({"metric": m, "pair": [a, b]} | paired_ratio(xa, xb))
                else:
                    tests.append({"metric": m, "pair": [a, b]} | mann_whitney(groups[a], groups[b]))
    return {
        "targets": per,
        "requests": len(rows),
        "ok": len(ok),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s else None,
        "tokens_per_s": sum(r["tokens_out"] or 0 for r in ok) / wall_s if wall_s else None,
        # vLLM's goodput: requests that met every SLO, per second of the run
        **({"slo_ms": slo, "goodput_requests_per_s": sum(good(r, slo) for r in rows) / wall_s} if slo else {}),
        "tests": adjust(tests),
    }


def run_energy(before: dict | None, after: dict | None, tokens: int) -> dict:
    """Joules of a whole run from two readings of the server's counter, and per output token: the figure for a
    batched server, where no request's window is its own."""
    if before is None or after is None:
        return {"energy_j": None, "reason": "the server reports no energy counter (GET /energy)"}
    joules = after["energy_j"] - before["energy_j"]
    if not joules > 0:  # a counter that did not advance is a failed window, never 0 J
        return {"energy_j": None, "reason": "the counter did not advance during the run"}
    return {
        "method": after.get("method"),
        "energy_j": joules,
        "window_s": after["time_s"] - before["time_s"],
        "j_per_token": joules / tokens if tokens else None,
    }


def sweep_rows(points: list[tuple[int, dict]]) -> list[dict]:
    """One row per (concurrency, target) of a sweep's summaries: throughput, vLLM's latencies, energy."""
    rows = []
    for c, s in points:
        for t, r in s["targets"].items():
            share = r["ok"] / s["ok"] if s["ok"] else 0.0  # the target's part of the run's tokens and requests
            rows.append({
                "concurrency": c, "target": t, "ok": r["ok"], "requests": r["requests"],
                "tokens_per_s": r["tokens_out"] / s["wall_s"] if s["wall_s"] else None,
                "requests_per_s": r["ok"] / s["wall_s"] if s["wall_s"] else None,
                "goodput_requests_per_s": r["good"] / s["wall_s"] if "good" in r and s["wall_s"] else None,
                "ttft_ms_p50": (r["ttft_ms"] or {}).get("p50"), "ttft_ms_p90": (r["ttft_ms"] or {}).get("p90"),
                "tpot_ms_p50": (r["tpot_ms"] or {}).get("p50"), "tpot_ms_p90": (r["tpot_ms"] or {}).get("p90"),
                "e2e_ms_p50": (r["e2e_ms"] or {}).get("p50"),
                "guidellm_tpot_ms_p50": (r.get("guidellm_tpot_ms") or {}).get("p50"),
                # a target's own requests' energy; with one target, the whole run's (a batched server's figure)
                "j_per_token": r["energy_j_per_token"]
                or ((s.get("energy") or {}).get("j_per_token") if len(s["targets"]) == 1 else None),
                "share": share,
            })  # fmt: skip
    return rows


CSV_FIELDS = (
    "index",
    "target",
    "prompt_index",
    "round",
    "sent_s",
    "status",
    "error",
    "tokens_in",
    "tokens_out",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
    "server_queue_ms",
    "server_ttft_ms",
    "server_tpot_ms",
    "server_e2e_ms",
    "guidellm_ttft_ms",
    "guidellm_tpot_ms",
    "guidellm_itl_ms",
    "guidellm_latency_ms",
    "energy_j",
    "prompt_truncated",
)


def write_rows(rows: list[dict], out: Path):
    atomic_write(out / "requests.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_csv(out / "requests.csv", CSV_FIELDS, rows)
