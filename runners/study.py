"""The whole study in one command: train, compress, evaluate, tabulate, plot, report.

    python -m runners.study --tiny                              # CPU, 3 seeds, about 13 minutes on 2 cores
    python -m runners.study runners/study_100m.toml             # the 100M configs (GPU)
    python -m runners.study baseline_8_layer perhead_6_layer    # runner names, default baselines and evaluations

A study file may also name ``[[external]]`` models (Hugging Face folders such as codeparrot-small or
pythia-160m): each is evaluated on the held-out text of the study's reference run and timed side by side
with the rest; with ``checkpoints`` and ``tokens`` its checkpoints over training are plotted with the runs'.

Every step is a command a user could type (``python -m runners.X``, ``python -m compress``,
``python -m eval.quality`` ...), run in a subprocess with its output in ``results/<study>/logs/``. A finished
step leaves a marker in ``results/<study>/steps/``; running the study again skips finished steps, resumes an
interrupted training run from its checkpoint, and reuses runs trained before. The table, plots and report are
rebuilt from the results every time.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from filelock import FileLock, Timeout

from common.cli import UserError, from_table, parse_args, positional, ranged, run_main
from common.files import atomic_write
from common.progress import Progress
from common.records import StudyRecord
from common.results import PerplexityResult, read_typed
from runners.cluster import resources_of
from runners.study_file import HERE, Study, load_study, study_from_runners
from runners.study_steps import (
    SideBySideStep,
    Step,
    StepFailed,
    changed_steps,
    complete_step,
    finished,
    last_error,
    plan,
    stop_child,
)
from runners.study_tune import choose, chosen_rates, tune_steps
from runners.study_tune import progress as tune_progress

# ---------------------------------------------------------------------------------------------------------
# Running the steps


def run_study(s: Study, progress: bool = True, executor: str = "local") -> Path:
    """Run every unfinished step, phase by phase (training, compression, quality, side-by-side timing, over
    training); with ``workers`` > 1 the independent steps of a phase run at once, each child with its share
    of the cores. The side-by-side timing always runs alone. With ``executor`` slurm (or submitit-local), each
    step of a phase is a cluster job instead (runners/cluster.py)."""
    s.out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(s.out / ".study.lock", timeout=0)  # released by the OS however this process ends
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"study {s.name!r} is already running in another process (lock {s.out / '.study.lock'}); wait for it "
            "to finish or stop it"
        ) from None
    try:
        if executor != "local":
            return _run_on_cluster(s, progress, executor)
        return _run_locally(s, progress)
    finally:
        lock.release()


def _check_unchanged(s: Study, steps: list[Step]):
    changed = changed_steps(s, steps)
    if changed:
        raise UserError(
            f"study {s.name!r}: {len(changed)} step(s) finished before were run with other settings than the study "
            f"file now gives ({', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}); give the edited study "
            f"a new name, or delete their markers in {s.out / 'steps'} (and their runs) to redo them"
        )


def _run_locally(s: Study, progress: bool) -> Path:
    if s.tune is not None:  # the learning-rate check first: the main runs train at the rates it chooses
        check = tune_steps(s)
        _check_unchanged(s, check)
        _run_steps_locally(s, check, progress, f"{s.name} rate check")
        s.rates = choose(s)
    steps = plan(s)
    _check_unchanged(s, steps)
    s.record().write(s.out)  # what the table and report group by (study.json)
    _run_steps_locally(s, steps, progress, s.name)
    return build_outputs(s)


def _run_steps_locally(s: Study, steps: list[Step], progress: bool, desc: str):
    markers = s.out / "steps"
    markers.mkdir(parents=True, exist_ok=True)
    phases: dict[str, list[Step]] = {}
    for step in steps:
        phases.setdefault(step.key.split("-")[0], []).append(step)
    running: dict[str, str] = {}
    children: set = set()  # the steps' commands running now: what Ctrl-C stops
    # steps finished before count as the bar's start, so its rate and ETA are this run's, not 9,000 steps/s
    before = sum(finished(s, st) for st in steps)
    with Progress(total=len(steps), initial=before, desc=desc, unit="step", disable=not progress) as bar:

        def show():
            bar.set_postfix_str(" | ".join(f"{k}: {v}" if v else k for k, v in running.items())[:150])

        def one(step: Step, threads: int | None):
            key = step.key
            running[key] = ""
            show()

            def watch(status: str):
                running[key] = status
                show()

            try:
                complete_step(s, step, watch, threads, children)
            finally:
                running.pop(key, None)
            bar.update(1)
            show()

        try:
            for phase in phases.values():
                todo = [st for st in phase if not finished(s, st)]
                workers = 1 if isinstance(phase[0], SideBySideStep) else min(s.workers, len(todo))
                if workers <= 1:
                    for step in todo:
                        one(step, None)
                    continue
                threads = max(1, (os.cpu_count() or 1) // workers)
                pool = ThreadPoolExecutor(workers)
                try:
                    for future in [pool.submit(one, step, threads) for step in todo]:
                        future.result()  # the first failure stops the study once the steps under way end
                except KeyboardInterrupt:  # Ctrl-C: the steps under way stop too, as each would on its own
                    pool.shutdown(wait=False, cancel_futures=True)
                    for proc in list(children):
                        stop_child(proc)
                    raise
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)  # steps not started yet never start
        except KeyboardInterrupt:
            bar.close()
            done = sum(finished(s, st) for st in steps)
            print(
                f"\ninterrupted: {done} of {len(steps)} steps are finished and kept (a training stopped mid-way keeps "
                f"its last checkpoint); run `python -m runners.study {s.source or s.name}` again to continue",
                file=sys.stderr,
            )
            raise


def _run_on_cluster(s: Study, progress: bool, executor: str) -> Path:
    """run_study with each step a cluster job: every unfinished step of a phase submitted at once (side by side
    too: it has a node to itself), the phase's jobs waited for, then the next phase."""
    from runners.cluster import Jobs

    jobs = Jobs(executor, s.out / "jobs", s.cluster or resources_of({}, "defaults", from_table))
    if s.tune is not None:
        check = tune_steps(s)
        _check_unchanged(s, check)
        _run_steps_on_cluster(s, check, jobs, progress, f"{s.name} rate check ({executor})")
        s.rates = choose(s)
    steps = plan(s)
    _check_unchanged(s, steps)
    s.record().write(s.out)
    _run_steps_on_cluster(s, steps, jobs, progress, f"{s.name} ({executor})")
    return build_outputs(s)


def _run_steps_on_cluster(s: Study, steps: list[Step], jobs, progress: bool, desc: str):
    markers = s.out / "steps"
    markers.mkdir(parents=True, exist_ok=True)
    phases: dict[str, list[Step]] = {}
    for step in steps:
        phases.setdefault(step.key.split("-")[0], []).append(step)
    with Progress(total=len(steps), desc=desc, unit="step", disable=not progress) as bar:
        for kind, phase in phases.items():
            todo = [st for st in phase if not finished(s, st)]
            bar.update(len(phase) - len(todo))
            if not todo:
                continue
            bar.set_postfix_str(f"{kind}: {len(todo)} job(s)")
            resources = "train" if kind == "tune" else kind  # a check's runs are trainings
            failed = jobs.run_phase(
                todo, resources, partial(_job, s), lambda st: markers / f"{st.key}.json", lambda st: bar.update(1)
            )
            if failed:
                step, record = failed[0]
                log = s.out / "logs" / f"{step.key}.log"
                why = last_error(log) if log.is_file() else "it never started its command"
                raise StepFailed(
                    f"step {step.key} failed in {record['executor']} job {record['job_id']}: {why}; step log: {log}, "
                    f"job log: {record['stderr']}" + (f" ({len(failed) - 1} more failed)" if len(failed) > 1 else "")
                )


def _job(s: Study, step: Step):
    """What a cluster job runs: the step as the local executor runs it, marker included."""
    complete_step(s, step)


# ---------------------------------------------------------------------------------------------------------
# Table, plots, report (from results only)


def build_outputs(s: Study) -> Path:
    from visualizations import save_figures
    from visualizations.grouped import comparisons, depth_answers, group_rows, write_documents, write_grouped_table
    from visualizations.plot_tradeoffs import family_color, grouped_tradeoff_figures
    from visualizations.plot_training import load_runs, training_figures
    from visualizations.plot_training import over_training as over_training_fig
    from visualizations.report import write_report

    rows = group_rows(s.out, Path(s.logs_dir))
    write_grouped_table(rows, s.out)
    write_documents(rows, s.out)
    comps = comparisons(rows, Path(s.logs_dir))
    atomic_write(s.out / "comparisons.json", json.dumps(comps, indent=2))
    answers = depth_answers(rows)
    atomic_write(s.out / "answer.json", json.dumps(answers, indent=2))
    trained = [m.run for m in s.members() if m.kind == "trained"]
    runs = load_runs(s.logs_dir, [r for r in trained if (Path(s.logs_dir) / r / "metrics.jsonl").is_file()])
    groups = {run: {"model": r["model"], "color": family_color(r)} for r in rows for run in r.get("runs", [])}
    figures = training_figures(runs, timed_alone=s.workers == 1, groups=groups) | grouped_tradeoff_figures(rows)
    if s.workers > 1:  # not drawn (see training_figures); one from an earlier build with one worker goes too
        (s.out / "plots" / "training_costs.png").unlink(missing_ok=True)
    points = {}
    for path in sorted((s.out / "over_training").glob("*.json")):
        point = read_typed(path)
        if isinstance(point, PerplexityResult) and point.run is not None:
            points.setdefault(point.run, []).append(point)
    token_ppl = all(p.figures.perplexity is not None for ps in points.values() for p in ps)  # lm-eval has none
    if points and (any(e.checkpoints for e in s.external) or not token_ppl):  # only bits per byte compare then
        figures["over_training.png"] = over_training_fig(
            points, "bits_per_byte", "held-out bits per byte", note="seed 0 of each model", groups=groups
        )
    elif points:
        figures["over_training.png"] = over_training_fig(points, note="seed 0 of each model", groups=groups)
    save_figures(figures, s.out / "plots")
    return write_report(StudyRecord.read(s.out), s.out, rows, comps, runs, sorted(figures), points, answers)


def power_plan(s: Study, pilot: Path, difference: float | None = None) -> str:
    """What each comparison of study ``s`` could detect, from the per-seed spread an earlier run of it (or a
    pilot study with the same model names) measured in ``pilot``: the minimum detectable difference at the
    report's level and 80% power with the pilot's seeds and with the study's, and the seeds a difference of
    ``difference`` (default: a third of the pilot's depth gap) would need. Nothing is trained."""
    import statistics

    from common.stats import ALPHA, POWER, mdd_of, mdd_paired, pairs_needed, pooled_sd, seeds_needed
    from visualizations.grouped import comparisons, group_rows

    if not (pilot / "study.json").is_file():
        raise UserError(f"--pilot {pilot}: no study.json there; name the results folder of a study that has run")
    rows = group_rows(pilot, Path(s.logs_dir))
    comps = comparisons(rows, Path(s.logs_dir))
    if not any(c.get("a_stat") for c in comps) and (pilot / "comparisons.json").is_file():
        # a committed study (docs/results/...) keeps its comparisons with every seed's figure, not its evaluations
        try:
            comps = json.loads((pilot / "comparisons.json").read_text())
        except ValueError:
            raise UserError(f"{pilot / 'comparisons.json'} is not valid JSON; run the study to rebuild it") from None
    if not any(c.get("a_stat") for c in comps):
        raise UserError(
            f"--pilot {pilot}: no measured comparison there (no quality results in evals/, no comparisons.json); "
            "run the pilot first (the study with --seeds 2)"
        )
    planned = {r.name for r in s.runs} | {c.name for c in s.compress} | {e.name for e in s.external}
    depth = [c for c in comps if c.get("depth_check") and c.get("diff") is not None]
    lines = [f"Power plan for {s.name} ({s.seeds} seed(s) per model) from the pilot {pilot}:"]
    for c in depth:
        verdict = "passes" if c["distinguishable"] and c["diff"] < 0 else "does NOT pass"
        lines.append(
            f"  depth check {c['a']} vs {c['b']}: gap {-c['diff']:.4f} bits per byte in the pilot, q = {c['q']:.3g}: "
            f"{verdict} there"
        )
    if difference is None and depth:
        difference = abs(depth[0]["diff"]) / 3
        lines.append(
            f"  difference to detect: {difference:.4f} (a third of the pilot's depth gap; --difference sets it)"
        )
    lines.append(
        f"  {'comparison':<60} {'pilot n':>8} {'sd':>8} {'MDD pilot':>10} {'MDD study':>10} {'seeds for diff':>14}"
    )
    for c in comps:
        if c["a"] not in planned or c["b"] not in planned or not (c.get("a_stat") and c.get("b_stat")):
            continue
        a, b = c["a_stat"]["values"], c["b_stat"]["values"]
        paired = c.get("test") == "paired t" and c.get("pairs")
        what = f"{c['a']} vs {c['b']}: {c['what']}"[:58] + (" P" if paired else "")
        if paired:  # the pilot's per-seed differences: the spread a paired test sees
            diffs = [x - y for x, y in zip(c["pairs"], c["pairs_b"], strict=True)]
            sd = statistics.stdev(diffs) if len(diffs) >= 2 else None
        else:
            sd = pooled_sd(a, b)
        if not sd:
            lines.append(f"  {what:<60} {len(a)},{len(b):>6}  needs 2+ pilot seeds on each side that differ")
            continue
        if paired:
            mdd_pilot, need = mdd_paired(sd, len(diffs)), pairs_needed(difference, sd) if difference else None
            mdd_study = mdd_paired(sd, s.seeds) if s.seeds >= 2 else None
        else:
            mdd_pilot = mdd_of(sd, len(a), len(b))  # a pooled SD exists only with 2+ seeds on each side
            mdd_study = mdd_of(sd, s.seeds, s.seeds) if s.seeds >= 2 else None
            need = seeds_needed(difference, sd) if difference else None
        lines.append(
            f"  {what:<60} {f'{len(a)},{len(b)}':>8} {sd:>8.4f} {_fmt(mdd_pilot):>10} {_fmt(mdd_study):>10} "
            f"{need if need is not None else '-':>14}"
        )
    lines.append(
        f"  (two-sided t-tests at alpha = {ALPHA}, power = {POWER}: P marks a paired test over seeds (statsmodels' "
        "TTestPower on the per-seed differences, whose SD is shown), the rest Welch's (TTestIndPower, pooled SD); "
        "MDD = minimum detectable difference in the comparison's units, before the adjustment over the report's "
        "comparisons)"
    )
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def study_status(s: Study) -> str:
    """Where ``s`` stands, from its markers and logs (nothing is run or written): the rate check's losses so
    far, then, once it has chosen the rates, how many of the main steps have finished."""
    out = [tune_progress(s)] if s.tune is not None else []
    if s.tune is not None:
        s.rates = chosen_rates(s)  # {} until the check has chosen
    if s.tune is None or s.rates:
        steps = plan(s)
        done = sum(finished(s, st) for st in steps)
        out.append(f"study {s.name!r}: {done} of {len(steps)} steps finished")
    else:
        out.append("the main runs wait for the rate check to finish (it chooses each run's rate)")
    return "\n\n".join(out)


@dataclass
class Args:
    what: list[str] = positional(required=False, default_factory=list)  # a study .toml file, or runner names
    tiny: bool = False  # the CPU study of runners/study_tiny.toml
    executor: str = "local"  # local (here), slurm (a job per step, through submitit), submitit-local (the same, here)
    seeds: int | None = ranged(None, 1, 100)  # this many seeds instead of the file's (e.g. 2 for a pilot)
    plan: bool = False  # train nothing: print each comparison's minimum detectable difference from --pilot's spread
    pilot: str | None = None  # with --plan: results folder of an earlier run or a pilot (default: the study's own)
    difference: float | None = ranged(None, 0, above=True)  # with --plan: the difference to detect (default: gap / 3)
    status: bool = False  # train nothing: where the study stands (the rate check's losses so far, steps finished)


def main(argv=None):
    a = parse_args(Args(), argv)
    if a.tiny:
        study = load_study(HERE / "study_tiny.toml")
        study.source = "--tiny"
    elif len(a.what) == 1 and a.what[0].endswith(".toml"):
        study = load_study(a.what[0])
    elif a.what:
        study = study_from_runners(a.what)
    else:
        raise UserError("name a study .toml file or runner names, or pass --tiny (see --help)")
    study.source = study.source or " ".join(a.what)
    if a.seeds is not None:
        if not 1 <= a.seeds <= 100:
            raise UserError(f"--seeds {a.seeds}: give a whole number from 1 to 100")
        if (a.seeds == 1) != (study.seeds == 1):  # one seed names runs <name>, several <name>-s<k>
            raise UserError(f"--seeds {a.seeds}: the study has {study.seeds} seed(s); one and several name runs apart")
        if study.tune is not None and study.tune.seeds > a.seeds:
            raise UserError(
                f"--seeds {a.seeds}: the study's [tune] trains {study.tune.seeds} seeds per rate; give as many"
            )
        study.seeds = a.seeds
        study.source += f" --seeds {a.seeds}"
    from runners.cluster import EXECUTORS

    if a.executor not in EXECUTORS:
        raise UserError(f"--executor {a.executor!r}: use one of {EXECUTORS}")
    if a.status:
        print(study_status(study))
        return
    if a.plan:
        if study.tune is not None:
            study.rates = chosen_rates(study)  # the rates its check chose (if it has run) name its runs
        pilot = Path(a.pilot) if a.pilot else study.out
        if study.design is not None and a.pilot is None:
            from runners.study_design import design_plan

            print(design_plan(study, study.design)[0])
            if not (pilot / "study.json").is_file():
                return  # no pilot yet: the design is the plan
        print(power_plan(study, pilot, a.difference))
        return
    report = run_study(study, executor=a.executor)
    print(f"table: {study.out / 'table.md'}\nplots: {study.out / 'plots'}\nreport: {report}")


if __name__ == "__main__":
    run_main(main)
