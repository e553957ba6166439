"""Starting a server as a child process and waiting until it serves: what serve_compare and the serving benchmark
do before they send load."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from common.cli import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Until the server answers /health (it checks every engine first), or its death, or the timeout."""
    import httpx

    deadline = time.monotonic() + timeout_s
    shown, building = 0, None
    while time.monotonic() < deadline:
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        for line in lines[shown:]:  # the server's own account of its start-up (engine exports, checks)
            if line.startswith(("engine ", "serving ")):
                print(f"server: {line}", flush=True)
            if line.startswith("engine ") and "building" in line:
                building = line.split(":")[0].removeprefix("engine ")
            elif line.startswith("engine "):
                building = None
        shown = len(lines)
        if proc.poll() is not None:
            tail = log.read_text()[-600:] if log.is_file() else ""
            last = ([x for x in tail.splitlines() if x.strip()] or ["(no output)"])[-1][:200]
            raise UserError(f"the server exited ({proc.returncode}) before it was ready: {last}; its log: {log}")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    doing = f"engine {building!r} was still building" if building else "it was still starting"
    raise UserError(
        f"the server did not answer within --startup-timeout {timeout_s:.0f} s ({doing}; a busy machine builds "
        f"slowly): pass a larger --startup-timeout, or leave that engine out with --engines; its log: {log}"
    )
