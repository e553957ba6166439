"""Continuous batching against one request at a time, side by side under the same streamed load.

    python -m bench.batched_serving checkpoints/tiny                      # concurrency 1 2 4 8 16, 3 rounds
    python -m bench.batched_serving checkpoints/tiny --engines torch compile onnxruntime --rounds 5

Two servers of the same checkpoint run at once on loopback (``python -m serve.server``): one with
``--max-batch 1`` (every engine decodes one sequence at a time, requests queue) and one with ``--max-batch
16`` (continuous batching where the engine allows it). For each concurrency, in rounds, the load client
(serve/client.py) sends the same HumanEval prompts to each engine of each server in turn, the order of the two
servers alternating from round to round, so both meet the same machine state. Per (engine, concurrency):
output tokens/s of each server, their ratio per round (median and range over rounds), TTFT and TPOT as vLLM's
``bench serve`` defines them, TPOT as guidellm does, and J/token over each run from the server's counter
(GET /energy; "unavailable" where the machine has none). The goal: at least 3x the tokens/s at 8 concurrent
streams. Every answer of the batched server is compared with the one-at-a-time server's (greedy: equal).
Writes bench/results/batched_serving.json and prints the table.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common.cli import UserError, parse_args, positional, ranged, run_main
from common.files import atomic_write
from common.load import LoadMeter
from common.process import die_with_parent
from serve.client import Load, humaneval_prompts, run_load
from serve.launch import free_port, wait_ready


@dataclass
class Args:
    checkpoint: str = positional()  # checkpoints/<run> or a model folder
    engines: list[str] = field(default_factory=lambda: ["torch", "compile", "onnxruntime"])
    concurrency: list[int] = ranged(low=1, default_factory=lambda: [1, 2, 4, 8, 16])
    rounds: int = ranged(3, 1)  # alternating runs of the two servers at each concurrency
    requests_per_stream: int = ranged(2, 1)  # requests per run = this x concurrency (at least 8)
    max_tokens: int = ranged(128, 1)  # new tokens per request (a longer prompt keeps its end)
    max_batch: int = ranged(16, 1)  # the batched server's --max-batch
    threads: int | None = ranged(None, 1)  # the servers' --threads (default: every core but one); the engines alone too
    out: str = "bench/results/batched_serving.json"
    work: str = "results/batched_serving"  # the runs' own folders and the servers' logs


def start(a: Args, max_batch: int, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = work / f"server-max-batch-{max_batch}.log"
    cmd = [sys.executable, "-m", "serve.server", a.checkpoint, "--port", str(port), "--engines", *a.engines]
    cmd += ["--max-batch", str(max_batch), "--max-tokens-limit", str(a.max_tokens), "--workdir", str(work / "export")]
    cmd += ["--threads", str(a.threads)] if a.threads is not None else []
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log, 900)
    return proc, url


def read_run(folder: Path, c: int, r: int, engine: str, mb: int) -> dict | None:
    """One finished run (the load client's summary.json and requests.jsonl in ``folder``), or None."""
    try:
        s = json.loads((folder / "summary.json").read_text())
        rows = [json.loads(x) for x in (folder / "requests.jsonl").read_text().splitlines() if x]
    except (OSError, ValueError):
        return None
    [t] = s["targets"].values()
    return {
        "concurrency": c, "round": r, "engine": engine, "max_batch": mb, "ok": t["ok"], "requests": t["requests"],
        "tokens_per_s": t["tokens_out"] / s["wall_s"], "ttft_ms_p50": (t["ttft_ms"] or {}).get("p50"),
        "tpot_ms_p50": (t["tpot_ms"] or {}).get("p50"),
        "guidellm_tpot_ms_p50": (t.get("guidellm_tpot_ms") or {}).get("p50"),
        "j_per_token": (s.get("energy") or {}).get("j_per_token"),
        "energy_reason": (s.get("energy") or {}).get("reason"), "texts": [x.get("text") for x in rows],
    }  # fmt: skip


def main(argv=None):
    a = parse_args(Args(), argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    # A run that stopped part-way resumes: finished runs are kept, but only under the same settings
    settings = {k: getattr(a, k) for k in ("checkpoint", "engines", "rounds", "requests_per_stream", "max_tokens",
                                           "max_batch", "threads")}  # fmt: skip
    mark = work / "settings.json"
    if mark.is_file() and json.loads(mark.read_text()) != settings:
        raise UserError(f"{work} holds runs made with other settings ({mark}); give another --work")
    atomic_write(mark, json.dumps(settings))
    plan = [
        (c, r, engine, mb)
        for c in a.concurrency
        for r in range(a.rounds)
        for engine in a.engines
        for mb in ([1, a.max_batch] if r % 2 == 0 else [a.max_batch, 1])  # the servers' order alternates
    ]
    servers = {}
    try:
        for mb in (1, a.max_batch):
            servers[mb] = start(a, mb, work)
        health = httpx.get(servers[a.max_batch][1] + "/health", trust_env=False).json()
        model = health["model"]
        prompts = humaneval_prompts()
        # the servers are this bench's own children, so a meter around the runs would count them as other work:
        # the machine's load is taken over a few idle seconds before, with the servers up and waiting
        with LoadMeter() as load:
            time.sleep(5)
        for c, r, engine, mb in plan:
            out = work / f"c{c}-r{r}-{engine}-mb{mb}"
            if engine not in health["engines"] or read_run(out, c, r, engine, mb) is not None:
                continue  # not served here, or done before this resume
            n = max(8, a.requests_per_stream * c)
            run_load(servers[mb][1], Load(n, c, a.max_tokens, [f"{model}:{engine}"]), out, prompts, progress=False)
            got = read_run(out, c, r, engine, mb)
            print(f"c={c} round {r} {engine} max-batch {mb}: {got['tokens_per_s']:.0f} tokens/s", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    runs = [x for c, r, e, mb in plan if (x := read_run(work / f"c{c}-r{r}-{e}-mb{mb}", c, r, e, mb))]
    rows = table_rows(runs, a.max_batch)
    engine_alone = engine_rows(a, health["threads"])
    result = {
        "command": "python -m bench.batched_serving " + " ".join(argv or sys.argv[1:]),
        "settings": settings,
        "server": {
            k: health.get(k) for k in ("device", "threads", "torch_version", "git_commit", "engines", "max_batch")
        },
        "machine_load_before": load.result(),
        "rows": rows,
        "engine_alone": engine_alone,
        "runs": [{k: v for k, v in r.items() if k != "texts"} for r in runs],
    }
    atomic_write(Path(a.out), json.dumps(result, indent=2))
    print(markdown(rows, a.max_batch))
    for r in engine_alone:
        spread = f"[{r['vs_batch_1_min']:.2f}, {r['vs_batch_1_max']:.2f}]"
        print(f"{r['engine']} alone, batch {r['batch']}: {r['tokens_per_s']:.0f} tokens/s, "
              f"x{r['vs_batch_1_median']:.2f} {spread} of batch 1")  # fmt: skip
    print(f"-> {a.out}")


def engine_rows(a: Args, threads: int, sizes=(1, 8, 16), steps: int = 24) -> list[dict]:
    """The batching engines alone, in this process (no HTTP, no load client beside them), on the servers'
    ``threads``: ms per decode step at each batch size, interleaved over rounds, each size's output tokens/s and
    its ratio to batch 1."""
    import torch

    from models.interface import capabilities
    from runtime.batching import build_slots
    from runtime.decoding import TorchDecoder
    from runtime.loading import load_model

    torch.set_num_threads(threads)
    ev = load_model(a.checkpoint, "auto", "float32")
    ids = ev.tokenizer.encode(humaneval_prompts()[0])[-(ev.model.params.max_seq_len - a.max_tokens) :]
    rows = []
    for engine in [e for e in a.engines if e in ("torch", "compile")]:
        if engine == "compile" and not capabilities(ev.model).static_cache:
            continue  # the server has no compile engine for it either
        decoder = TorchDecoder(ev.model, ev.device, compiled=engine == "compile")
        slots = build_slots(decoder, ev.model, ev.device, max(sizes))  # the server's engine (HFSlots for HF)
        per = {b: [] for b in sizes}
        for r in range(a.rounds + 1):  # round 0 warms up (and compiles)
            for b in sizes if r % 2 else sizes[::-1]:
                for i in range(b):
                    slots.open(i, ids)
                t0 = time.perf_counter()
                for k in range(steps):
                    slots.step(list(range(b)), [5] * b, [len(ids) + k] * b)
                if r:
                    per[b].append(b * steps / (time.perf_counter() - t0))
                for i in range(b):
                    slots.close(i)
        for b in sizes:
            ratios = [x / y for x, y in zip(per[b], per[sizes[0]], strict=True)]
            rows.append({
                "engine": engine, "batch": b, "tokens_per_s": statistics.median(per[b]),
                "vs_batch_1_median": statistics.median(ratios), "vs_batch_1_min": min(ratios),
                "vs_batch_1_max": max(ratios), "rounds": len(ratios),
            })  # fmt: skip
    return rows


def table_rows(runs: list[dict], max_batch: int) -> list[dict]:
    rows = []
    for engine in dict.fromkeys(r["engine"] for r in runs):
        for c in dict.fromkeys(r["concurrency"] for r in runs):
            one = [r for r in runs if r["engine"] == engine and r["concurrency"] == c and r["max_batch"] == 1]
            many = [r for r in runs if r["engine"] == engine and r["concurrency"] == c and r["max_batch"] == max_batch]
            ratios = [b["tokens_per_s"] / x["tokens_per_s"] for x, b in zip(one, many, strict=True)]
            same = all(x["texts"] == b["texts"] for x, b in zip(one, many, strict=True))
            med = {k: {mb: statistics.median([r[k] for r in rs if r[k] is not None] or [float("nan")])
                       for mb, rs in ((1, one), (max_batch, many))}
                   for k in ("tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "guidellm_tpot_ms_p50")}  # fmt: skip
            rows.append({
                "engine": engine, "concurrency": c, "rounds": len(ratios), "answers_equal": same,
                "ok": sum(r["ok"] for r in one + many), "requests": sum(r["requests"] for r in one + many),
                "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                **{f"{k}_{'one' if mb == 1 else 'batched'}": v for k, d in med.items() for mb, v in d.items()},
                "j_per_token_batched": next((r["j_per_token"] for r in many if r["j_per_token"]), None),
                "energy_reason": next((r["energy_reason"] for r in many if r["energy_reason"]), None),
            })  # fmt: skip
    return rows


def markdown(rows: list[dict], max_batch: int) -> str:
    def f(v, fmt=".1f"):
        return "-" if v is None or v != v else format(v, fmt)

    lines = [
        f"| engine | concurrency | tokens/s one at a time | tokens/s batched (<= {max_batch}) | batched / one, median "
        "[min, max] | TTFT p50 ms one / batched | TPOT p50 ms one / batched | guidellm TPOT p50 ms batched "
        "| J/token | answers equal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['concurrency']} | {f(r['tokens_per_s_one'], ',.0f')} | "
            f"{f(r['tokens_per_s_batched'], ',.0f')} | x{r['speedup_median']:.2f} [{r['speedup_min']:.2f}, "
            f"{r['speedup_max']:.2f}] | {f(r['ttft_ms_p50_one'])} / {f(r['ttft_ms_p50_batched'])} | "
            f"{f(r['tpot_ms_p50_one'], '.2f')} / {f(r['tpot_ms_p50_batched'], '.2f')} | "
            f"{f(r['guidellm_tpot_ms_p50_batched'], '.2f')} | "
            f"{f(r['j_per_token_batched'], '.3g') if r['j_per_token_batched'] else 'unavailable'} | "
            f"{'yes' if r['answers_equal'] else 'NO'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
