"""A study's learning-rate check (``[tune]``): every run trained at every rate of a grid with the study's first
seeds, at its full budget, and the rate each run then uses chosen by a rule fixed before any run trained.

The rule: the lowest mean training loss over the last ``tail`` of the steps (mean over the check's seeds). Each
of those losses is measured on a batch before the model trains on it, so the choice reads no held-out text: the
held-out split stays the study's scoring set alone. Rates are compared at one seed on the same batches (the data
order depends on the seed only). A run whose loss diverged scores infinity. A best rate at either end of the
grid stops the study in one line: the grid is extended, never trusted at its edge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from common.cli import UserError
from common.files import atomic_write
from runners.study_file import Study
from runners.study_steps import TrainStep, finished
from training.run_files import DIVERGED_FILE, read_jsonl

TUNE_FILE = "tune.json"  # results/<study>/: the check's grid, every run's losses and the chosen rates
MIN_TAIL_POINTS = 10  # logged steps a tail must hold for its mean to choose a rate


def tune_steps(s: Study) -> list[TrainStep]:
    """Every run at every rate of the grid, seeds 0 .. tune.seeds - 1 (seed by seed, so that every rate of a
    seed is done before the next seed starts)."""
    assert s.tune is not None
    return [
        TrainStep(r, s.run_name(r.name, k, lr), k, lr=lr)
        for k in range(s.tune.seeds)
        for lr in sorted({lr for r in s.runs for lr in s.grid(r)})
        for r in s.runs
        if lr in s.grid(r)
    ]


def tail_loss(log_dir: Path, tail: float) -> float:
    """The mean logged training loss over the last ``tail`` of a run's steps; infinity where the run diverged.
    A run without enough logged steps in its tail (its --log-interval too coarse) is one line."""
    if (log_dir / DIVERGED_FILE).is_file():
        return math.inf
    rows = read_jsonl(log_dir / "metrics.jsonl")
    if not rows:
        raise UserError(f"{log_dir / 'metrics.jsonl'} holds no logged steps; train the run again")
    last = max(r["step"] for r in rows)
    losses = [r["loss"] for r in rows if r["step"] > last * (1 - tail)]
    if len(losses) < MIN_TAIL_POINTS:
        raise UserError(
            f"{log_dir.name}: only {len(losses)} logged steps in the last {tail:.0%} of its {last} steps; a rate is "
            f"chosen from at least {MIN_TAIL_POINTS}: give the runs a smaller --log-interval"
        )
    if not all(math.isfinite(x) for x in losses):
        return math.inf
    return float(np.mean(losses))


def choose(s: Study) -> dict[str, float]:
    """Each run's rate, from its check's runs (all finished); writes results/<study>/tune.json. A best rate at
    an end of the grid is one line naming the runs and the rate to add."""
    assert s.tune is not None
    record, edges = {}, []
    for r in s.runs:
        grid, per_rate = s.grid(r), {}
        for lr in grid:
            losses = [tail_loss(Path(s.logs_dir) / s.run_name(r.name, k, lr), s.tune.tail) for k in range(s.tune.seeds)]
            per_rate[lr] = losses
        means = {lr: float(np.mean(v)) for lr, v in per_rate.items()}
        best = min(grid, key=lambda lr: means[lr])
        if not math.isfinite(means[best]):
            raise UserError(f"study {s.name!r}: run {r.name!r} diverged at every rate of [tune] lr {grid}; lower them")
        if best in (grid[0], grid[-1]) and len(grid) > 1:
            edges.append((r.name, best, best / 2 if best == grid[0] else best * 2))
        record[r.name] = {
            "chosen": best,
            "grid": grid,
            "rates": [
                {"lr": lr, "tail_losses": [_finite(x) for x in per_rate[lr]], "mean": _finite(means[lr])} for lr in grid
            ],
        }
    atomic_write(
        s.out / TUNE_FILE,
        json.dumps({"grid": s.tune.lr, "seeds": s.tune.seeds, "tail": s.tune.tail, "runs": record}, indent=2),
    )
    if edges:
        said = "; ".join(f"{name}: best {lr:g}, add {nxt:g}" for name, lr, nxt in edges)
        raise UserError(
            f"study {s.name!r}: the best learning rate sits at an edge of its grid for {len(edges)} run(s) ({said}); "
            f"extend that run's grid (lr_grid = [...] in its [[runs]] entry) and run the study again (the runs "
            f"trained so far are kept); "
            f"losses: {s.out / TUNE_FILE}"
        )
    if s.tune.leave_out:
        check_leave_out(s, record)
    return {name: rec["chosen"] for name, rec in record.items()}


def check_leave_out(s: Study, record: dict) -> None:
    """With ``[tune] leave_out``: stop in one line while the rule fixed before the main runs leaves a run out (a
    richer run whose tail losses at its chosen rate are worse than the plain run's of its depth, at that run's, by
    more than the check's seeds could detect). Richer and depth are read from the check's own runs' summaries."""
    from common.records import TrainingSummary
    from common.stats import leave_out_verdicts

    kinds = {}
    for r in s.runs:
        summary = TrainingSummary.read(Path(s.logs_dir) / s.run_name(r.name, 0, record[r.name]["chosen"]))
        if summary is not None:
            kinds[r.name] = (summary.n_layers, summary.per_head)
    alone = [name for name, (n, rich) in kinds.items() if rich and (n, False) not in kinds.values()]
    if alone:  # the rule asked for and unable to judge a run: never a silent keep
        raise UserError(
            f"study {s.name!r}: [tune] leave_out judges a richer run against the plain run of its depth, and "
            f"{', '.join(map(repr, alone))} has none; add a plain run of that depth to the study file (or set "
            f"[tune] leave_out = false) and run the study again"
        )
    out = [
        f"{v['model']}: {v['difference']:+.4f} against {v['plain']}, detectable {v['mdd']:.4f}"
        for v in leave_out_verdicts(record, kinds)
        if v["left_out"]
    ]
    if out:
        raise UserError(
            f"study {s.name!r}: the rule fixed before the main runs leaves out {len(out)} run(s) ({'; '.join(out)}: "
            f"tail loss at the chosen rates, paired over the check's seeds); remove them from the study file's "
            f"[[runs]] (or set [tune] leave_out = false to train them anyway) and run the study again; losses: "
            f"{s.out / TUNE_FILE}"
        )


def progress(s: Study) -> str:
    """Where the check stands, for ``--status`` (reads only): each run's tail loss at each rate and seed whose
    training finished (its step's marker), "-" for the others, and the mean where every seed has finished. A
    rate is chosen only when the whole check has finished (``choose``); this table chooses nothing."""
    assert s.tune is not None
    done = {st.name for st in tune_steps(s) if finished(s, st)}
    seeds = range(s.tune.seeds)
    lines = [
        f"rate check of study {s.name!r}: {len(done)} of {len(tune_steps(s))} trainings finished "
        f"(tail: the mean training loss over the last {s.tune.tail:.0%} of the steps)",
        "",
        "| run | lr | " + " | ".join(f"seed {k}" for k in seeds) + " | mean |",
        "|---|---|" + "---|" * (len(seeds) + 1),
    ]
    for r in s.runs:
        for lr in s.grid(r):
            names = [s.run_name(r.name, k, lr) for k in seeds]
            losses = [tail_loss(Path(s.logs_dir) / n, s.tune.tail) if n in done else None for n in names]
            cells = ["-" if x is None else f"{x:.4f}" for x in losses]
            mean = f"{np.mean(losses):.4f}" if all(x is not None for x in losses) else "-"
            lines.append(f"| {r.name} | {lr:g} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinity: a diverged rate reads null


def chosen_rates(s: Study) -> dict[str, float]:
    """The rates an earlier run of the check chose (tune.json), for commands that read a tuned study without
    training (--plan); {} where it has not chosen yet."""
    try:
        record = json.loads((s.out / TUNE_FILE).read_text())
        return {name: float(r["chosen"]) for name, r in record["runs"].items() if name in {x.name for x in s.runs}}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
