"""The whole serving comparison in one command: start the server on loopback, load it, write table, plots,
report.

    python -m runners.serve_compare checkpoints/tiny                        # every engine this machine has
    python -m runners.serve_compare checkpoints/tiny --engines torch onnxruntime --requests 200 --concurrency 8

The server runs as a child process (``python -m serve.server``, killed with this one however it ends) on a
free port of 127.0.0.1; the load client (serve/client.py) streams HumanEval prompts rotated over the engines
(the model ids ``<model>:<engine>``) and measures TTFT, TPOT and end-to-end from the stream, as a client sees them;
visualizations/serving.py writes ``table.md``, ``plots/serving_boxplots.png`` and ``report.md`` next to
``requests.jsonl/.csv`` and ``summary.json`` in ``--out``. The server's own log is ``server.log`` there.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import parse_args, positional, ranged, run_main
from common.process import die_with_parent
from runtime.decoding import DECODE_ENGINES
from serve.client import Load, run_load
from serve.launch import free_port, wait_ready
from visualizations.serving import write_serving_report


@dataclass
class Args:
    checkpoint: str = positional()  # checkpoints/<run>, a model folder or a HF model folder
    engines: list[str] = field(default_factory=lambda: list(DECODE_ENGINES))  # those that work here are compared
    requests: int = ranged(80, 1)  # requests in all, rotated over the engines
    concurrency: int = ranged(4, 1)  # requests in flight at once
    max_tokens: int = ranged(64, 1)  # new tokens per request
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    out: str = "results/serving"  # folder for the requests, summary, table, plots and report
    startup_timeout: float = ranged(600.0, 0, above=True)  # seconds for the server to build and check its engines
    max_batch: int = ranged(8, 1)  # the server's --max-batch (1: every engine decodes one sequence at a time)


def main(argv=None):
    a = parse_args(Args(), argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = out / "server.log"
    cmd = [sys.executable, "-m", "serve.server", a.checkpoint, "--port", str(port), "--device", a.device]
    cmd += ["--engines", *a.engines, "--max-tokens-limit", str(a.max_tokens), "--workdir", str(out / "export")]
    cmd += ["--max-batch", str(a.max_batch)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
    try:
        wait_ready(url, proc, log, a.startup_timeout)
        summary = run_load(url, Load(a.requests, a.concurrency, a.max_tokens), out)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    report = write_serving_report(out)
    if summary["server"]["unavailable"]:
        print(f"not served here: {summary['server']['unavailable']}")
    print((out / "table.md").read_text())
    print(f"report: {report}")


if __name__ == "__main__":
    run_main(main)
