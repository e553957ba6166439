"""A study's steps (train, compress, evaluate, time side by side, over-training) and how they run: each a
command a user could type, run in a subprocess with its log, a marker when finished, locally (a few at a
time) or on a cluster through submitit (runners/cluster.py). Used by runners/study.py."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import compress.__main__ as compress_cli
from common.cli import UserError, apply_overrides
from common.files import atomic_write
from common.identity import options_identity
from common.process import die_with_parent
from common.results import parse_result, read_result, read_typed, same_model
from llama.model_io import list_checkpoints
from models.folders import fingerprint, model_folder
from runners.study_file import SEED, CompressSpec, RunSpec, Study
from training.config import train_config_from_dict
from training.run_files import DIVERGED_FILE

# ---------------------------------------------------------------------------------------------------------
# Steps


def train_cmd(s: Study, run: RunSpec, seed: int = 0, lr: float | None = None) -> list[str]:
    """The runner's command for seed ``seed`` of ``run``: at rate ``lr`` (a learning-rate check's run), else at the
    rate the check chose for it, else at its runner's own."""
    name = s.member(run.name, seed) if lr is None else s.run_name(run.name, seed, lr)
    ckpt, logs = Path(s.checkpoints_dir) / name, Path(s.logs_dir) / name
    cmd = [
        f"runners.{run.runner}",
        "--name",
        name,
        "--out-dir",
        s.checkpoints_dir,
        "--log-dir",
        s.logs_dir,
        *s.run_args(run, lr),
    ]
    if s.seeds > 1:
        cmd += ["--seed", str(SEED + seed)]
    if list_checkpoints(ckpt):
        cmd.append("--resume")  # interrupted before: continue from the newest checkpoint
    elif logs.exists() or ckpt.exists():
        cmd.append("--overwrite")  # interrupted before its first checkpoint: nothing worth keeping
    return cmd


@dataclass
class TrainStep:
    """Train (or resume) one seed of one run; its output is the run folder checkpoints/<name>. A step of the
    learning-rate check (``lr`` set) counts a run whose loss diverged as done: that is its result."""

    run: RunSpec
    name: str  # the run's name for this seed
    seed: int = 0
    lr: float | None = None  # the learning-rate check's rate; None: the main run (at the chosen rate, if any)

    @property
    def key(self) -> str:
        return f"{'tune' if self.lr is not None else 'train'}-{self.name}"

    def output(self, s: Study) -> Path:
        return Path(s.checkpoints_dir) / self.name

    def done(self, s: Study) -> bool:  # a run trained before the study (summary and a checkpoint) is reused
        logs = Path(s.logs_dir) / self.name
        if self.lr is not None and (logs / DIVERGED_FILE).is_file():
            return True
        return (logs / "summary.json").is_file() and bool(list_checkpoints(self.output(s)))

    def kept(self, s: Study) -> bool:  # checkpoints deleted for disk space after the study used them stay so
        return True

    def execute(self, s: Study, run: Callable[[list[str]], None]):
        try:
            run(train_cmd(s, self.run, self.seed, self.lr))
        except StepFailed:
            if self.lr is None or not (Path(s.logs_dir) / self.name / DIVERGED_FILE).is_file():
                raise  # a check's run that diverged (the trainer says so in its logs) is a result, not a failure


@dataclass
class CompressStep:
    """Build one compressed baseline (one seed of its base) with compress; its output is the folder
    compress says."""

    name: str
    argv: list[str]  # compress's command line
    options: compress_cli.Args  # the same, parsed by compress's own options class

    @classmethod
    def of(cls, s: Study, spec: CompressSpec, seed: int = 0) -> CompressStep:
        name = s.member(spec.name, seed)
        out = Path(s.checkpoints_dir) / f"{s.name}-compressed" / name
        base = Path(s.checkpoints_dir) / s.member(spec.base, seed)
        argv = ["--checkpoint", str(base), "--out", str(out), "--log-dir", s.logs_dir, *spec.args]
        options = apply_overrides(compress_cli.Args(), list(argv))  # checked by check_study
        if options.recover and list_checkpoints(compress_cli.recovery_run(options)[0]):
            argv.append("--resume")  # a recovery stopped before: continue from its newest checkpoint
            options.resume = True
        if out.is_dir() and any(out.iterdir()):
            argv.append("--overwrite")  # the study runs this step only when that output is not this step's own
            options.overwrite = True
        return cls(name, argv, options)

    @property
    def key(self) -> str:
        return f"compress-{self.name}"

    def output(self, s: Study) -> Path:
        return Path(self.options.out)  # the final model, fine-tuned or not

    def done(self, s: Study) -> bool:
        """compression.json (written last, with the model) records the options this step would run with, and the
        fingerprint of the base it would compress now: a model compressed with other settings, or from a base
        retrained since, is made again (compress replaces only its own folders)."""
        record = read_compression_record(Path(self.options.out))
        if record is None:
            return False
        base = Path(self.argv[self.argv.index("--checkpoint") + 1])
        return record.get("options") == compress_cli.options_of(self.options) and record.get(
            "base_fingerprint"
        ) == _fingerprint_or_none(base)

    def kept(self, s: Study) -> bool:  # as a trained run's checkpoints: the study's results were taken from it
        return True

    def execute(self, s: Study, run: Callable[[list[str]], None]):
        run(["compress", *self.argv])


@dataclass
class EvaluateStep:
    """One evaluator (eval.quality, eval.efficiency or eval.induction) on one model, writing results/<study>/evals/."""

    evaluator: str
    name: str
    model: Path
    extra: list[str]

    @property
    def key(self) -> str:
        return f"{self.evaluator}-{self.name}"

    def output(self, s: Study) -> Path:
        return s.out / "evals" / f"{self.name}-{self.evaluator}.json"

    def done(self, s: Study) -> bool:
        return False  # results are written atomically, but only the marker says all of a step finished

    def kept(self, s: Study) -> bool:
        """The result is there, about this model as it is now, measured with the options this step would use: a
        deleted result, one of a model retrained or recompressed since, or one of other options is measured
        again. A result about another model (copied or edited into place) stops the study in one line."""
        path = self.output(s)
        r = read_typed(path)
        if r is None or r.identity is None:
            return False
        folder = model_folder(self.model) if self.model.exists() else None
        if folder is None or not same_model(r.identity.checkpoint, folder):
            raise UserError(
                f"{path} is a result about {r.identity.model} ({r.identity.checkpoint or 'no folder recorded'}), "
                f"not {self.name}: it was copied or edited; delete it and run the study again"
            )
        expected = options_identity(self.options(), drop=("checkpoint", "out"))
        return r.identity.fingerprint == fingerprint(folder) and r.record.get("options") == expected

    def options(self):
        """This step's evaluator options, parsed by the evaluator's own options class."""
        module = importlib.import_module(f"eval.{self.evaluator}")
        return apply_overrides(module.Args(checkpoint=str(self.model)), list(self.extra))

    def execute(self, s: Study, run: Callable[[list[str]], None]):
        run([f"eval.{self.evaluator}", str(self.model), "--out", str(self.output(s)), *self.extra])


@dataclass
class SideBySideStep:
    """Latency (and energy) of every model of the study, one seed each, timed in one process, interleaved."""

    models: dict[str, Path]  # model name in the study -> its folder
    reference: str
    mode: str | None = None  # a further decoding mode ([eval] side_by_side_modes); None: side_by_side's own

    @property
    def key(self) -> str:
        return "side_by_side" if self.mode is None else f"side_by_side-{self.mode}"

    def output(self, s: Study) -> Path:
        return s.out / f"{self.key}.json"

    def done(self, s: Study) -> bool:
        return False

    def kept(self, s: Study) -> bool:  # the table and report read it: a deleted result is measured again
        return self.output(s).is_file()

    def execute(self, s: Study, run: Callable[[list[str]], None]):
        cmd = ["eval.side_by_side", *map(str, self.models.values()), "--names", *self.models]
        mode = [] if self.mode is None else ["--mode", self.mode]  # after side_by_side's own options: it wins
        run([*cmd, "--reference", self.reference, "--out", str(self.output(s)), *s.side_by_side, *mode])


@dataclass
class OverTrainingStep:
    """Held-out perplexity of every kept checkpoint of one run."""

    run: str

    @property
    def key(self) -> str:
        return f"over_training-{self.run}"

    def output(self, s: Study) -> Path:
        return s.out / "over_training"

    def done(self, s: Study) -> bool:
        return False

    def kept(self, s: Study) -> bool:  # a run whose points were all deleted is measured again
        return any(self.output(s).glob(f"{self.run}@step_*-perplexity.json"))

    def execute(self, s: Study, run: Callable[[list[str]], None]):
        over_training(s, self.run, run)


Step = TrainStep | CompressStep | EvaluateStep | SideBySideStep | OverTrainingStep


def plan(s: Study) -> list[Step]:
    """Every step of the study in order: train each seed, compress each seed, evaluate the quality of each,
    time seed 0 of every model side by side, then the checkpoints over training of seed 0."""
    train = [TrainStep(r, s.member(r.name, k), k) for k in range(s.seeds) for r in s.runs]
    compress = [CompressStep.of(s, c, k) for k in range(s.seeds) for c in s.compress]
    models = [(t.name, t.output(s)) for t in train] + [(c.name, c.output(s)) for c in compress]
    steps: list[Step] = [*train, *compress]
    steps += [EvaluateStep("quality", name, folder, s.quality) for name, folder in models]
    steps += [EvaluateStep("quality", e.name, Path(e.path), s.quality + s.heldout_reference()) for e in s.external]
    if s.induction is not None:  # the probe of in-context repetition, every model and seed
        steps += [EvaluateStep("induction", name, folder, s.induction) for name, folder in models]
        steps += [EvaluateStep("induction", e.name, Path(e.path), s.induction) for e in s.external]
    first = {t.run.name: t.output(s) for t in train if t.seed == 0}
    first |= {spec.name: c.output(s) for spec, c in zip(s.compress, compress[: len(s.compress)], strict=True)}
    first |= {e.name: Path(e.path) for e in s.external}
    if s.efficiency:  # the per-model efficiency evaluator (all modes, batch sizes, engines), seed 0
        steps += [EvaluateStep("efficiency", s.member(g, 0), folder, s.efficiency) for g, folder in first.items()]
    if len(first) >= 2:
        reference = s.reference or next(iter(first))
        steps.append(SideBySideStep(first, reference))
        steps += [SideBySideStep(first, reference, mode) for mode in s.side_by_side_modes]
    steps += [OverTrainingStep(s.member(r.name, 0)) for r in s.runs]
    return steps + [OverTrainingStep(e.name) for e in s.external if e.checkpoints]


def run_step(
    s: Study,
    step: Step,
    log: Path,
    watch: Callable[[str], None] | None = None,
    threads: int | None = None,
    children: set | None = None,
):
    """Run one step, its subprocesses logging to ``log``; ``threads`` caps each child's CPU threads; ``children``,
    where given, holds each child while it runs (what an interrupted study stops)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    step.execute(s, lambda cmd: _python(cmd, log, watch, env, children))


def _python(
    cmd: list[str],
    log: Path,
    watch: Callable[[str], None] | None = None,
    env: dict | None = None,
    children: set | None = None,
):
    log.parent.mkdir(parents=True, exist_ok=True)
    preexec = die_with_parent() if sys.platform == "linux" else None
    with open(log, "a") as f:
        f.write(f"$ {sys.executable} -m {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", *cmd], stdout=f, stderr=subprocess.STDOUT, preexec_fn=preexec, env=env
        )
        if children is not None:
            children.add(proc)
        try:
            while proc.poll() is None:  # show what the child is doing (its own progress line) while it runs
                time.sleep(1.0)
                if watch is not None:
                    watch(_last_status(log))
        except KeyboardInterrupt:  # Ctrl-C here (one step at a time): the child stops as it would on its own
            stop_child(proc)
            raise
        finally:
            if children is not None:
                children.discard(proc)
    if proc.returncode != 0:
        raise StepFailed(
            f"`python -m {' '.join(cmd[:2])} ...` failed (exit {proc.returncode}): {last_error(log)}; full log: {log}"
        )


def stop_child(proc: subprocess.Popen, grace_s: float = 60.0):
    """Stop a step's command as Ctrl-C stops it (a training keeps its last checkpoint and says so in its log):
    SIGINT, unless the terminal's own Ctrl-C already reached it; then, past ``grace_s``, kill it."""
    import signal

    try:
        proc.wait(timeout=2.0)  # the same Ctrl-C may have reached it: let it end on its own first
        return
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class StepFailed(UserError):
    """A step's command failed: its log holds the traceback; the study says which step and where in one line."""


def last_error(log: Path) -> str:
    """The line of a failed step's log that says why: its "error: ..." line, or the last line of a traceback."""
    lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("error: ")]
    return (said or lines or ["(no output)"])[-1][:300]


def _last_status(log: Path) -> str:
    """The child's latest progress line: the last piece of its log after a newline or a carriage return."""
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 400))
        tail = f.read().decode(errors="replace")
    parts = [p.strip() for p in tail.replace("\r", "\n").splitlines() if p.strip()]
    return parts[-1][:70] if parts else ""


def over_training(s: Study, run_name: str, run: Callable[[list[str]], None]):
    """Held-out perplexity of each kept checkpoint of ``run`` (or of an external model's list of checkpoint
    folders, e.g. Pythia revisions), with the tokens (and energy) it had seen."""
    out = s.out / "over_training"
    external = {e.name: e for e in s.external}.get(run_name)
    if external:
        points = [
            (i, Path(f), {"tokens": t})
            for i, (f, t) in enumerate(zip(external.checkpoints, external.tokens, strict=True))
        ]
        extra = s.heldout_reference()
    else:
        points = [
            (step, folder, json.loads((folder / "state.json").read_text()))
            for step, folder in list_checkpoints(Path(s.checkpoints_dir) / run_name)
        ]
        extra = []
    for step, folder, state in points:
        target = out / f"{run_name}@step_{step}-perplexity.json"
        if not target.is_file():
            run(["eval.perplexity", str(folder), "--out", str(target), *s.evaluation_set(), *s.over_training, *extra])
        r = read_result(target)  # another schema version: one line naming it
        if not isinstance(r, dict):
            raise UserError(f"{target} is not a result eval.perplexity wrote; delete it and run the study again")
        r |= {"run": run_name, "step": step, "tokens": state["tokens"], "energy_j": state.get("energy_j")}
        parse_result(r)  # still reads as a perplexity result (PerplexityResult: run, step, tokens, energy_j)
        atomic_write(target, json.dumps(r, indent=2))


def complete_step(
    s: Study,
    step: Step,
    watch: Callable[[str], None] | None = None,
    threads: int | None = None,
    children: set | None = None,
):
    """Run one step and leave its marker (what a later start of the study skips): here, or in a cluster job. The
    marker records the step's command, so a study whose file was edited since can tell which steps changed."""
    t0 = time.perf_counter()
    command = step_command(s, step)
    run_step(s, step, s.out / "logs" / f"{step.key}.log", watch, threads, children)
    record = {"step": step.key, "seconds": time.perf_counter() - t0, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write(s.out / "steps" / f"{step.key}.json", json.dumps(record | {"command": command}))


def step_command(s: Study, step: Step) -> list[str]:
    """What a step runs, without the flags that only say how far it had got (--resume, --overwrite)."""
    if isinstance(step, OverTrainingStep):
        return ["eval.perplexity", "<each checkpoint of>", step.run, *s.evaluation_set(), *s.over_training]
    commands: list[list[str]] = []
    step.execute(s, commands.append)
    return [a for cmd in commands for a in cmd if a not in ("--resume", "--overwrite")]


def finished(s: Study, step: Step) -> bool:
    """A step is finished once its marker is written, while what the report reads of it is still there (a result
    deleted since is measured again), or where its output was made before the study (a run trained already)."""
    return ((s.out / "steps" / f"{step.key}.json").is_file() and step.kept(s)) or step.done(s)


def changed_steps(s: Study, steps: list[Step]) -> list[str]:
    """Finished steps whose command is no longer what the study file says (the file was edited since), and runs
    trained before the study with other settings than its file gives them: reusing either would put the new
    file's commands beside the old models in the report."""
    out = []
    for step in steps:
        marker = s.out / "steps" / f"{step.key}.json"
        if isinstance(step, TrainStep):  # the run's own config.json says what it trained, marker or not
            if (marker.is_file() or step.done(s)) and not _same_training(s, step):
                out.append(step.key)
        elif marker.is_file():
            try:
                recorded = json.loads(marker.read_text()).get("command")
            except (OSError, ValueError, AttributeError):
                recorded = None  # a damaged marker: the step is simply run again
                marker.unlink(missing_ok=True)
            if recorded is not None and recorded != step_command(s, step):
                out.append(step.key)
    return out


def _same_training(s: Study, step: TrainStep) -> bool:
    """Whether run ``step.name``, trained before, has the settings the study gives it: the config its newest
    checkpoint records (what trained those weights), and its logs' config.json where that is still there. A run
    whose checkpoints record no config cannot be told apart: it counts as changed."""
    argv = [a for a in train_cmd(s, step.run, step.seed, step.lr)[1:] if a not in ("--resume", "--overwrite")]
    expected = dataclasses.asdict(apply_overrides(importlib.import_module(f"runners.{step.run.runner}").config(), argv))
    where = ("name", "out_dir", "log_dir", "resume", "overwrite")  # where it ran, not what it trained

    def what(config) -> dict | None:
        if not isinstance(config, dict):
            return None
        try:  # read back through the config classes: a field added since a run trained reads as its default
            config = dataclasses.asdict(train_config_from_dict(config))
        except (TypeError, ValueError, KeyError):
            pass  # a record the config classes refuse: compared as it is (it will differ)
        return {k: v for k, v in config.items() if k not in where}

    recorded = []
    checkpoints = list_checkpoints(step.output(s))
    if checkpoints:
        recorded.append(_read_json(checkpoints[-1][1] / "state.json").get("config"))
    logs = Path(s.logs_dir) / step.name / "config.json"
    if logs.is_file():
        recorded.append(_read_json(logs))
    if not recorded:
        return True  # nothing trained yet under this name: the step starts it
    return all(what(r) == what(expected) for r in recorded)


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _fingerprint_or_none(folder: Path) -> str | None:
    try:
        return fingerprint(folder)
    except (OSError, ValueError):
        return None  # no model there (yet): nothing compressed from it can be current


def read_compression_record(folder: Path) -> dict | None:
    record = _read_json(folder / "compression.json")
    return record or None
