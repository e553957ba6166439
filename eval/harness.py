"""lm-evaluation-harness tasks on one model, one task at a time, with each task's time and energy.

    python -m eval.harness checkpoints/tiny --tasks my_task --include-path my_tasks/
    python -m eval.harness hf/pythia-160m --tasks lambada_openai hellaswag --limit 200     # (needs the network)

Each task runs through ``lm_eval.simple_evaluate`` with the ``perhead-llama`` adapter (eval/lm_eval_model.py)
inside its own energy window (NVML on GPUs, RAPL on CPUs where readable, else "unavailable" with the
reason), so the joules of a task are those of its own requests. Windows shorter than one second carry no
figure (the counters update too coarsely), only their length. Writes results/<model>-harness.json: the
harness's metrics per task, requests served by type, seconds, energy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UserError, failure, parse_args, ranged, run_main
from common.energy import EnergyMeter, min_window_for
from eval.model import EvalOptions


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager, after checking what it is asked for: the include path is a folder and every task
    name is one the harness knows (a one-line error otherwise, before any model is loaded)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path} is not a folder of task YAML files")
    manager = TaskManager(include_path=include_path)
    check_tasks(manager, tasks)
    return manager


def check_tasks(manager, tasks: list[str]):
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in {manager.include_path})" if manager.include_path else "; local tasks need --include-path"
        raise UserError(f"unknown task(s) {unknown}: not among lm-eval's {len(manager.all_tasks)} tasks{where}")


def load_task(task: str, manager):
    """The task with its documents read: data that does not load (a missing file, one that is not a data file)
    is a one-line error naming the task."""
    try:
        return manager.load([task])
    except Exception as e:  # datasets and lm-eval raise many kinds for unreadable data
        cause = e.__cause__ or e
        raise UserError(f"task {task!r}: its data does not load ({failure(cause)})") from None


def run_tasks(lm, tasks: list[str], manager, limit: int | None, num_fewshot: int | None, idle_s: float):
    """{task: {metrics, requests, time_s, energy}} for each task of ``manager`` (task_manager), run on its own."""
    from lm_eval import simple_evaluate

    out = {}
    for task in tasks:
        load_task(task, manager)  # its data read once here (then cached), so a bad file is one line
        before = dict(lm.requests)
        t0 = time.perf_counter()
        with EnergyMeter(lm.ev.device, idle_s=idle_s) as meter:
            r = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, num_fewshot=num_fewshot)
        served = {k: lm.requests[k] - before[k] for k in before}
        energy = meter.result(
            units=sum(served.values()) or None, unit="request", min_window_s=min_window_for(meter.counter)
        )
        metrics = {
            name: {k: v for k, v in values.items() if k != "alias" and isinstance(v, (int, float, str))}
            for name, values in r["results"].items()
        }
        out[task] = {
            "metrics": metrics,
            "requests": served,
            "n_samples": r.get("n-samples", {}).get(task),
            "time_s": time.perf_counter() - t0,
            "energy": energy,
        }
    return out


@dataclass
class Args(EvalOptions):
    EVALUATORS = ("harness",)
    tasks: list[str] = field(default_factory=list)  # harness task names (required)
    include_path: str | None = None  # a folder of task YAML files (local tasks)
    limit: int | None = ranged(None, 1)  # documents per task (default: all)
    num_fewshot: int | None = ranged(None, 0)  # few-shot examples (default: the task's)
    batch_size: int = ranged(8, 1)  # sequences per forward pass for loglikelihood requests
    max_length: int | None = ranged(None, 1)  # tokens of context (default: the model's max_seq_len)
    idle: float = ranged(1.0, 0)  # seconds of idle power measured before each task's window


def main(argv=None):
    from eval.lm_eval_model import ProjectLM

    a = parse_args(Args(), argv)
    if not a.tasks:
        raise UserError("eval.harness needs --tasks (harness task names; local ones with --include-path)")
    manager = task_manager(a.tasks, a.include_path)  # unknown tasks fail now, not after the model has loaded
    lm = ProjectLM(a.checkpoint, a.device, a.dtype, a.batch_size, a.max_length)
    results = run_tasks(lm, a.tasks, manager, a.limit, a.num_fewshot, a.idle)
    settings = {"tasks": a.tasks, "limit": a.limit, "num_fewshot": a.num_fewshot, "max_length": lm.max_length}
    out = lm.ev.write("harness", {**settings, "results": results}, a)
    for task, r in results.items():
        e = r["energy"]
        joules = f"{e['energy_j']:.1f} J" if e.get("energy_j") else f"energy {e.get('reason', e['method'])}"
        shown = ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].get(task, {}).items() if isinstance(v, float))
        print(f"{task}: {shown}; {sum(r['requests'].values())} requests in {r['time_s']:.1f} s, {joules}")
    print(f"-> {out}")


if __name__ == "__main__":
    run_main(main)
