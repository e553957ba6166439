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

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import tomllib
from filelock import FileLock, Timeout

import compress.__main__ as compress_cli
from common.cli import UserError, apply_overrides, from_table, parse_args, positional, run_main
from common.files import atomic_write
from common.process import die_with_parent
from common.progress import Progress
from common.results import Member, StudyRecord
from llama.model_io import MODEL_FILE, list_checkpoints
from models.hf import hf_config, is_hf_folder
from runners.cluster import resources_of
from training.config import check_run_name

HERE = Path(__file__).resolve().parent


@dataclass
class RunSpec:
    """A ``[[runs]]`` entry: a model trained by one runner (one run per seed)."""

    runner: str  # a runner of runners/ (tiny, baseline_8_layer ...)
    name: str  # the run's name (with seeds > 1, seed k is <name>-s<k>)
    args: list[str] = field(default_factory=list)  # the runner's overrides, e.g. ["--max-steps", "120"]


@dataclass
class CompressSpec:
    """A ``[[compress]]`` entry: a compressed baseline built from every seed of one run of the study."""

    base: str  # the [[runs]] name it is built from
    name: str
    args: list[str] = field(default_factory=list)  # compress's options (the study sets --checkpoint and --out)


@dataclass
class ExternalSpec:
    """An ``[[external]]`` entry: a model not trained here (a Hugging Face folder such as pythia-160m)."""

    name: str
    path: str  # its folder
    checkpoints: list[str] = field(default_factory=list)  # optional: its folders over training
    tokens: list[int] = field(default_factory=list)  # the tokens each of those had seen


@dataclass
class EvalSpec:
    """The ``[eval]`` table: extra options of each evaluator the study runs."""

    quality: list[str] = field(default_factory=list)  # eval.quality
    efficiency: list[str] = field(default_factory=list)  # eval.efficiency (per model; off when empty)
    over_training: list[str] = field(default_factory=list)  # eval.perplexity on each kept checkpoint
    side_by_side: list[str] = field(default_factory=list)  # eval.side_by_side
    # more decoding modes timed side by side, each in its own run (e.g. ["compile"]): quality against compiled latency
    side_by_side_modes: list[str] = field(default_factory=list)


@dataclass
class Study:
    name: str
    runs: list[RunSpec]
    compress: list[CompressSpec] = field(default_factory=list)
    # models not trained here (Hugging Face folders, e.g. codeparrot-small, pythia-160m), compared as rows
    external: list[ExternalSpec] = field(default_factory=list)
    quality: list[str] = field(default_factory=list)  # extra arguments of eval.quality
    efficiency: list[str] = field(default_factory=list)  # extra arguments of eval.efficiency
    over_training: list[str] = field(default_factory=list)  # extra arguments of eval.perplexity per checkpoint
    side_by_side: list[str] = field(default_factory=list)  # extra arguments of eval.side_by_side
    side_by_side_modes: list[str] = field(default_factory=list)  # further decoding modes timed side by side
    seeds: int = 1  # each run is trained this many times (seeds 1337, 1338 ...: init and data order differ)
    reference: str | None = None  # the model latency ratios are taken to (default: the first run)
    checkpoints_dir: str = "checkpoints"
    logs_dir: str = "logs"
    results_dir: str = "results"
    source: str = ""  # how the study was named on the command line (for the report)
    workers: int = 1  # steps run at once within a phase (each child then gets cores / workers threads)
    cluster: dict = field(default_factory=dict)  # step kind -> runners.cluster.Resources ([cluster.<kind>])
    about: str = ""  # what the study can answer: the report's first paragraph

    @property
    def out(self) -> Path:
        return Path(self.results_dir) / self.name

    def member(self, group: str, seed: int) -> str:
        """The run or folder name of one seed of a model of the study (the name itself with one seed)."""
        return group if self.seeds == 1 else f"{group}-s{seed}"

    def members(self) -> list[Member]:
        """Every model the study trains or builds, one entry per seed, with the seed it was trained with: what
        the table and report group by."""
        out = []
        for k in range(self.seeds):
            seeds = {r.name: self.seed_value(r, k) for r in self.runs}
            for r in self.runs:
                name = self.member(r.name, k)
                out.append(Member(r.name, k, name, "trained", seed_value=seeds[r.name], run=name))
            for c in self.compress:
                name = self.member(c.name, k)
                out.append(Member(c.name, k, name, "compressed", seed_value=seeds.get(c.base), base=c.base))
        for e in self.external:  # one model each: no seeds
            out.append(Member(e.name, 0, e.name, "external", path=e.path))
        return out

    def seed_value(self, run: RunSpec, k: int) -> int:
        """The seed seed k of ``run`` trains with: SEED + k with several seeds, else the runner's own."""
        if self.seeds > 1:
            return SEED + k
        return apply_overrides(importlib.import_module(f"runners.{run.runner}").config(), list(run.args)).seed

    def record(self) -> StudyRecord:
        """What the report reads about this study (study.json): no object of this module crosses into
        visualizations."""
        commands = {r.name: f"{r.runner} {' '.join(r.args)}".strip() for r in self.runs}
        commands |= {c.name: f"compress {' '.join(c.args)} on {c.base}" for c in self.compress}
        commands |= {e.name: f"external {e.path}" for e in self.external}
        return StudyRecord(self.name, self.source or self.name, self.workers, self.members(), commands, self.about)

    def evaluation_set(self) -> list[str]:
        """eval.perplexity options that select the text eval.quality scores (its --max-tokens, --stride and text
        options): the checkpoints over training are scored on exactly that set, so the report has one."""
        import eval.quality

        q = apply_overrides(eval.quality.Args(checkpoint="x"), list(self.quality))
        argv = [] if q.max_tokens is None else ["--max-tokens", str(q.max_tokens)]
        argv += [] if q.stride is None else ["--stride", str(q.stride)]
        t = q.text
        for key in ("corpus", "hf_config", "heldout_of"):
            if getattr(t, key) is not None:
                argv += [f"--{key.replace('_', '-')}", str(getattr(t, key))]
        if t.corpus is not None:
            argv += ["--file-glob", t.file_glob, "--text-field", t.text_field, "--hf-split", t.hf_split]
        return argv

    def heldout_reference(self) -> list[str]:
        """Extra evaluator arguments for external models: score the held-out text of the reference run's
        first seed, so they see the same text as the trained models (bits per byte compare across
        tokenizers). None without trained runs: then the study's evaluator arguments must name a corpus."""
        trained = [r.name for r in self.runs]
        if not trained:
            return []
        ref = self.reference if self.reference in trained else trained[0]
        return ["--heldout-of", str(Path(self.checkpoints_dir) / self.member(ref, 0))]


@dataclass
class StudyFile:
    """The top level of a study .toml file (every key it may hold; see runners/study_tiny.toml)."""

    name: str | None = None  # default: the file's name
    runs: list = field(default_factory=list)  # [[runs]] tables
    compress: list = field(default_factory=list)  # [[compress]] tables
    external: list = field(default_factory=list)  # [[external]] tables
    eval: dict = field(default_factory=dict)  # the [eval] table
    seeds: int = 1
    reference: str | None = None
    workers: int = 1
    checkpoints_dir: str = "checkpoints"
    logs_dir: str = "logs"
    results_dir: str = "results"
    cluster: dict = field(default_factory=dict)  # [cluster.<kind>] tables: resources of cluster jobs
    about: str = ""  # what the study can answer (a demonstration, the answer at some scale): the report opens with it


# options each step sets itself: a study file that sets them would send outputs where the study never looks
SET_BY_STUDY = {
    "runs": ("--name", "--out-dir", "--log-dir", "--seed", "--resume", "--overwrite"),
    "compress": ("--checkpoint", "--out", "--log-dir"),
    "eval": ("--out",),
    # the checkpoints over training are scored on eval.quality's text (Study.evaluation_set): one set per report
    "over_training": ("--out", "--max-tokens", "--stride", "--corpus", "--heldout-of", "--file-glob", "--hf-config"),
}


def option_name(arg: str) -> str:
    """``--out_dir``, ``--out-dir=x`` and ``--training.out-dir`` all name ``--out-dir``: the command line takes each
    spelling, so a check of the options a study sets itself must too."""
    return "--" + arg.split("=")[0].lstrip("-").split(".")[-1].replace("_", "-")


def load_study(path: str | Path) -> Study:
    """A study file, checked whole before anything runs: every key and type, every name, every runner and its
    options, every compression and evaluator option, every external folder. A mistake anywhere is one line
    naming the file and the entry, not a failure an hour into the study."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file {path} does not exist")
    try:
        d = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a TOML file ({e})") from None
    top = from_table(StudyFile, d, str(path))
    for key in ("runs", "compress", "external"):
        if not all(isinstance(t, dict) for t in getattr(top, key)):
            raise UserError(f"{path}: {key} must be [[{key}]] tables, got {getattr(top, key)!r}")
    runs = [from_table(RunSpec, t, f"{path} [[runs]] #{i + 1}") for i, t in enumerate(top.runs)]
    compress = [from_table(CompressSpec, t, f"{path} [[compress]] #{i + 1}") for i, t in enumerate(top.compress)]
    external = [from_table(ExternalSpec, t, f"{path} [[external]] #{i + 1}") for i, t in enumerate(top.external)]
    ev = from_table(EvalSpec, top.eval, f"{path} [eval]")
    if not runs and not external:
        raise UserError(f"{path} names no [[runs]] and no [[external]] models; add a runner to train")
    name = top.name if top.name is not None else path.stem
    names = [r.name for r in runs] + [c.name for c in compress] + [e.name for e in external]
    for n in [name, *names]:  # each becomes a folder (results/<study>, checkpoints/<run> ...)
        try:
            check_run_name(n)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
    if len(set(names)) != len(names):
        raise UserError(f"{path}: run and compressed model names must be unique, got {names}")
    if not 1 <= top.seeds <= 100:
        raise UserError(f"{path}: seeds = {top.seeds}; give a whole number from 1 to 100")
    if not 1 <= top.workers <= 64:
        raise UserError(f"{path}: workers = {top.workers}; give a whole number from 1 to 64")
    if top.reference is not None and top.reference not in names:
        raise UserError(f"{path}: reference {top.reference!r} is none of the study's models {names}")
    study = Study(
        name=name,
        runs=runs,
        compress=compress,
        external=external,
        quality=ev.quality,
        efficiency=ev.efficiency,
        over_training=ev.over_training,
        side_by_side=ev.side_by_side,
        side_by_side_modes=ev.side_by_side_modes,
        seeds=top.seeds,
        reference=top.reference,
        workers=top.workers,
        checkpoints_dir=top.checkpoints_dir,
        logs_dir=top.logs_dir,
        results_dir=top.results_dir,
        cluster=resources_of(top.cluster, str(path), from_table),
        about=top.about,
    )
    check_study(study, str(path))
    return study


def check_study(s: Study, where: str):
    """What every step of ``s`` will run, checked now: runners exist and take their options, compressed
    baselines name a run of the study and valid compress options, evaluator options parse, external
    models are model folders. Raises a one-line UserError naming ``where`` and the entry."""
    import eval.efficiency
    import eval.perplexity
    import eval.quality
    import eval.side_by_side

    def parses(options, argv: list[str], what: str, forbidden: tuple[str, ...]):
        for arg in argv:
            if arg.startswith("--") and option_name(arg) in forbidden:
                raise UserError(f"{where}: {what}: {arg.split('=')[0]} is set by the study itself; leave it out")
        try:
            return apply_overrides(options, list(argv))
        except ValueError as e:
            raise UserError(f"{where}: {what}: {e}") from None

    for r in s.runs:
        if not re.fullmatch(r"\w+", r.runner) or not (HERE / f"{r.runner}.py").is_file():
            runners = sorted(p.stem for p in HERE.glob("*.py") if _is_runner(p.stem))
            raise UserError(f"{where}: run {r.name!r}: no runner {r.runner!r}; the runners are {', '.join(runners)}")
        module = importlib.import_module(f"runners.{r.runner}")
        if not callable(getattr(module, "config", None)):
            raise UserError(f"{where}: run {r.name!r}: runners/{r.runner}.py is not a runner (it has no config())")
        parses(module.config(), r.args, f"run {r.name!r}", SET_BY_STUDY["runs"])
    trained = [r.name for r in s.runs]
    for c in s.compress:
        if c.base not in trained:
            raise UserError(f"{where}: compressed model {c.name!r}: base {c.base!r} is none of the runs {trained}")
        options = parses(compress_cli.Args(), c.args, f"compressed model {c.name!r}", SET_BY_STUDY["compress"])
        if options.method is None:
            raise UserError(f"{where}: compressed model {c.name!r}: args name no --method")
    for e in s.external:
        check_external(where, e)
    for evaluator, argv, options in (
        ("quality", s.quality, eval.quality.Args(checkpoint="x")),
        ("efficiency", s.efficiency, eval.efficiency.Args(checkpoint="x")),
        ("over_training", s.over_training, eval.perplexity.Args(checkpoint="x")),
        ("side_by_side", s.side_by_side, eval.side_by_side.Args(checkpoints=["x", "y"])),
    ):
        parses(options, argv, f"[eval] {evaluator}", SET_BY_STUDY.get(evaluator, SET_BY_STUDY["eval"]))
    modes = eval.side_by_side.MODES
    for mode in s.side_by_side_modes:
        if mode not in modes:
            raise UserError(f"{where}: [eval] side_by_side_modes: {mode!r} is not a decoding mode; use {list(modes)}")
    primary = apply_overrides(eval.side_by_side.Args(checkpoints=["x", "y"]), list(s.side_by_side)).mode
    if primary in s.side_by_side_modes or len(set(s.side_by_side_modes)) < len(s.side_by_side_modes):
        raise UserError(
            f"{where}: [eval] side_by_side_modes {s.side_by_side_modes} repeats a mode (side_by_side itself times "
            f"{primary!r}); name each further mode once"
        )


def _is_runner(stem: str) -> bool:
    return stem not in ("__init__", "common", "study", "serve_compare")


def check_external(where: str, e: ExternalSpec):
    for folder in [e.path, *e.checkpoints]:
        if not Path(folder).is_dir():
            raise UserError(f"{where}: external model {e.name!r}: folder {folder} does not exist")
        if is_hf_folder(folder):
            hf_config(folder)  # a supported architecture with sane sizes, or one line now
        elif not list_checkpoints(Path(folder)) and not (Path(folder) / MODEL_FILE).is_file():
            raise UserError(
                f"{where}: external model {e.name!r}: {folder} is not a model folder (no config.json, "
                f"{MODEL_FILE} or step_N checkpoints)"
            )
    if len(e.tokens) != len(e.checkpoints):
        raise UserError(
            f"{where}: external model {e.name!r}: give one tokens value per checkpoint "
            f"({len(e.checkpoints)} checkpoints, {len(e.tokens)} tokens)"
        )


def study_from_runners(names: list[str]) -> Study:
    """Runner names with the default baselines: the deepest baseline pruned, 2:4, quantized, one block shorter."""
    for n in names:
        if not _is_runner(n) or not (HERE / f"{n}.py").is_file():
            raise UserError(f"no runner runners/{n}.py; pass runner names (e.g. baseline_8_layer) or a .toml file")
    runs = [RunSpec(runner=n, name=n) for n in names]
    baselines = [n for n in names if n.startswith("baseline_")]
    compress = []
    if baselines:
        base = max(baselines, key=lambda n: int(n.split("_")[1]))
        compress = [
            CompressSpec(base, f"{base}-wanda50", ["--method", "wanda", "--sparsity", "0.5"]),
            CompressSpec(base, f"{base}-sparsegpt24", ["--method", "sparsegpt", "--pattern", "2:4"]),
            CompressSpec(base, f"{base}-drop1", ["--method", "drop-angular", "--layers", "1"]),
            CompressSpec(base, f"{base}-int8", ["--method", "quantize", "--scheme", "torchao-int8-weight"]),
        ]
    study = Study(name="study_" + "_".join(names), runs=runs, compress=compress)
    check_study(study, "runner names")
    return study


# ---------------------------------------------------------------------------------------------------------
# Steps


SEED = 1337  # the runners' default seed; seed k of a study trains with SEED + k


def train_cmd(s: Study, run: RunSpec, seed: int = 0) -> list[str]:
    name = s.member(run.name, seed)
    ckpt, logs = Path(s.checkpoints_dir) / name, Path(s.logs_dir) / name
    cmd = [
        f"runners.{run.runner}",
        "--name",
        name,
        "--out-dir",
        s.checkpoints_dir,
        "--log-dir",
        s.logs_dir,
        *run.args,
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
    """Train (or resume) one seed of one run; its output is the run folder checkpoints/<name>."""

    run: RunSpec
    name: str  # the run's name for this seed
    seed: int = 0

    @property
    def key(self) -> str:
        return f"train-{self.name}"

    def output(self, s: Study) -> Path:
        return Path(s.checkpoints_dir) / self.name

    def done(self, s: Study) -> bool:  # a run trained before the study (summary and a checkpoint) is reused
        return (Path(s.logs_dir) / self.name / "summary.json").is_file() and bool(list_checkpoints(self.output(s)))

    def execute(self, s: Study, run: Callable[[list[str]], None]):
        run(train_cmd(s, self.run, self.seed))


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
        return cls(name, argv, options)

    @property
    def key(self) -> str:
        return f"compress-{self.name}"

    def output(self, s: Study) -> Path:
        return Path(self.options.out)  # the final model, fine-tuned or not

    def done(self, s: Study) -> bool:
        return (Path(self.options.out) / "compression.json").is_file()  # written last, with the model

    def execute(self, s: Study, run: Callable[[list[str]], None]):
        run(["compress", *self.argv])


@dataclass
class EvaluateStep:
    """One evaluator (eval.quality or eval.efficiency) on one model, writing results/<study>/evals/."""

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


def run_step(s: Study, step: Step, log: Path, watch: Callable[[str], None] | None = None, threads: int | None = None):
    """Run one step, its subprocesses logging to ``log``; ``threads`` caps each child's CPU threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    step.execute(s, lambda cmd: _python(cmd, log, watch, env))


def _python(cmd: list[str], log: Path, watch: Callable[[str], None] | None = None, env: dict | None = None):
    log.parent.mkdir(parents=True, exist_ok=True)
    preexec = die_with_parent() if sys.platform == "linux" else None
    with open(log, "a") as f:
        f.write(f"$ python -m {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", *cmd], stdout=f, stderr=subprocess.STDOUT, preexec_fn=preexec, env=env
        )
        while proc.poll() is None:  # show what the child is doing (its own progress line) while it runs
            time.sleep(1.0)
            if watch is not None:
                watch(_last_status(log))
    if proc.returncode != 0:
        raise StepFailed(
            f"`python -m {' '.join(cmd[:2])} ...` failed (exit {proc.returncode}): {_last_error(log)}; full log: {log}"
        )


class StepFailed(UserError):
    """A step's command failed: its log holds the traceback; the study says which step and where in one line."""


def _last_error(log: Path) -> str:
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
        r = json.loads(target.read_text())
        r |= {"run": run_name, "step": step, "tokens": state["tokens"], "energy_j": state.get("energy_j")}
        atomic_write(target, json.dumps(r, indent=2))


def complete_step(s: Study, step: Step, watch: Callable[[str], None] | None = None, threads: int | None = None):
    """Run one step and leave its marker (what a later start of the study skips): here, or in a cluster job. The
    marker records the step's command, so a study whose file was edited since can tell which steps changed."""
    t0 = time.perf_counter()
    command = step_command(s, step)
    run_step(s, step, s.out / "logs" / f"{step.key}.log", watch, threads)
    record = {"step": step.key, "seconds": time.perf_counter() - t0, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write(s.out / "steps" / f"{step.key}.json", json.dumps(record | {"command": command}))


def step_command(s: Study, step: Step) -> list[str]:
    """What a step runs, without the flags that only say how far it had got (--resume, --overwrite)."""
    if isinstance(step, OverTrainingStep):
        return ["eval.perplexity", "<each checkpoint of>", step.run, *s.evaluation_set(), *s.over_training]
    commands: list[list[str]] = []
    step.execute(s, commands.append)
    return [a for cmd in commands for a in cmd if a not in ("--resume", "--overwrite")]


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
    """Whether run ``step.name``, trained before, has the settings the study gives it (its logs' config.json)."""
    try:
        saved = json.loads((Path(s.logs_dir) / step.name / "config.json").read_text())
    except (OSError, ValueError):
        return True  # nothing to compare with: the run's own summary and checkpoint are what the study reuses
    argv = [a for a in train_cmd(s, step.run, step.seed)[1:] if a not in ("--resume", "--overwrite")]
    expected = dataclasses.asdict(apply_overrides(importlib.import_module(f"runners.{step.run.runner}").config(), argv))
    where = ("name", "out_dir", "log_dir", "resume", "overwrite")  # where it ran, not what it trained
    return {k: v for k, v in expected.items() if k not in where} == {k: v for k, v in saved.items() if k not in where}


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
    markers = s.out / "steps"
    markers.mkdir(parents=True, exist_ok=True)
    steps = plan(s)
    _check_unchanged(s, steps)
    s.record().write(s.out)  # what the table and report group by (study.json)
    phases: dict[str, list[Step]] = {}
    for step in steps:
        phases.setdefault(step.key.split("-")[0], []).append(step)
    running: dict[str, str] = {}
    # steps finished before count as the bar's start, so its rate and ETA are this run's, not 9,000 steps/s
    before = sum(finished(s, st, markers / f"{st.key}.json") for st in steps)
    with Progress(total=len(steps), initial=before, desc=s.name, unit="step", disable=not progress) as bar:

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
                complete_step(s, step, watch, threads)
            finally:
                running.pop(key, None)
            bar.update(1)
            show()

        for phase in phases.values():
            todo = [st for st in phase if not finished(s, st, markers / f"{st.key}.json")]
            workers = 1 if isinstance(phase[0], SideBySideStep) else min(s.workers, len(todo))
            if workers <= 1:
                for step in todo:
                    one(step, None)
                continue
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ThreadPoolExecutor(workers) as pool:
                for future in [pool.submit(one, step, threads) for step in todo]:
                    future.result()  # the first failure stops the study once the steps under way end
    return build_outputs(s)


def finished(s: Study, step: Step, marker: Path) -> bool:
    return marker.is_file() or step.done(s)


def _run_on_cluster(s: Study, progress: bool, executor: str) -> Path:
    """run_study with each step a cluster job: every unfinished step of a phase submitted at once (side by side
    too: it has a node to itself), the phase's jobs waited for, then the next phase."""
    from runners.cluster import Jobs, resources_of

    markers = s.out / "steps"
    markers.mkdir(parents=True, exist_ok=True)
    jobs = Jobs(executor, s.out / "jobs", s.cluster or resources_of({}, "defaults", from_table))
    steps = plan(s)
    _check_unchanged(s, steps)
    s.record().write(s.out)
    phases: dict[str, list[Step]] = {}
    for step in steps:
        phases.setdefault(step.key.split("-")[0], []).append(step)
    with Progress(total=len(steps), desc=f"{s.name} ({executor})", unit="step", disable=not progress) as bar:
        for kind, phase in phases.items():
            todo = [st for st in phase if not finished(s, st, markers / f"{st.key}.json")]
            bar.update(len(phase) - len(todo))
            if not todo:
                continue
            bar.set_postfix_str(f"{kind}: {len(todo)} job(s)")
            failed = jobs.run_phase(
                todo, kind, partial(_job, s), lambda st: markers / f"{st.key}.json", lambda st: bar.update(1)
            )
            if failed:
                step, record = failed[0]
                log = s.out / "logs" / f"{step.key}.log"
                why = _last_error(log) if log.is_file() else "it never started its command"
                raise StepFailed(
                    f"step {step.key} failed in {record['executor']} job {record['job_id']}: {why}; step log: {log}, "
                    f"job log: {record['stderr']}" + (f" ({len(failed) - 1} more failed)" if len(failed) > 1 else "")
                )
    return build_outputs(s)


def _job(s: Study, step: Step):
    """What a cluster job runs: the step as the local executor runs it, marker included."""
    complete_step(s, step)


# ---------------------------------------------------------------------------------------------------------
# Table, plots, report (from results only)


def build_outputs(s: Study) -> Path:
    from visualizations import save_figures
    from visualizations.grouped import comparisons, depth_answers, group_rows, write_grouped_table
    from visualizations.plot_tradeoffs import family_color, grouped_tradeoff_figures
    from visualizations.plot_training import load_runs, training_figures
    from visualizations.plot_training import over_training as over_training_fig
    from visualizations.report import write_report

    rows = group_rows(s.out, Path(s.logs_dir))
    write_grouped_table(rows, s.out)
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
        r = json.loads(path.read_text())
        points.setdefault(r["run"], []).append(r)
    token_ppl = all("perplexity" in r for ps in points.values() for r in ps)  # lm-eval mode has none
    if points and (any(e.checkpoints for e in s.external) or not token_ppl):  # only bits per byte compare then
        figures["over_training.png"] = over_training_fig(
            points, "bits_per_byte", "held-out bits per byte", note="seed 0 of each model"
        )
    elif points:
        figures["over_training.png"] = over_training_fig(points, note="seed 0 of each model")
    save_figures(figures, s.out / "plots")
    return write_report(StudyRecord.read(s.out), s.out, rows, comps, runs, sorted(figures), points, answers)


def power_plan(s: Study, pilot: Path, difference: float | None = None) -> str:
    """What each comparison of study ``s`` could detect, from the per-seed spread an earlier run of it (or a
    pilot study with the same model names) measured in ``pilot``: the minimum detectable difference at the
    report's level and 80% power with the pilot's seeds and with the study's, and the seeds a difference of
    ``difference`` (default: a third of the pilot's depth gap) would need. Nothing is trained."""
    from common.stats import ALPHA, POWER, mdd_of, pooled_sd, seeds_needed
    from visualizations.grouped import comparisons, group_rows

    if not (pilot / "study.json").is_file():
        raise UserError(f"--pilot {pilot}: no study.json there; name the results folder of a study that has run")
    rows = group_rows(pilot, Path(s.logs_dir))
    comps = comparisons(rows, Path(s.logs_dir))
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
        sd = pooled_sd(a, b)
        what = f"{c['a']} vs {c['b']}: {c['what']}"[:60]
        if sd is None:
            lines.append(f"  {what:<60} {len(a)},{len(b):>6}  needs 2+ pilot seeds on each side")
            continue
        mdd_pilot = mdd_of(sd, len(a), len(b))  # a pooled SD exists only with 2+ seeds on each side
        mdd_study = mdd_of(sd, s.seeds, s.seeds) if s.seeds >= 2 else None
        need = seeds_needed(difference, sd) if difference else None
        lines.append(
            f"  {what:<60} {f'{len(a)},{len(b)}':>8} {sd:>8.4f} {_fmt(mdd_pilot):>10} {_fmt(mdd_study):>10} "
            f"{need if need is not None else '-':>14}"
        )
    lines.append(
        f"  (two-sided Welch/t-test at alpha = {ALPHA}, power = {POWER}, statsmodels' TTestIndPower; MDD = minimum "
        "detectable difference in the comparison's units, before the adjustment over the report's comparisons)"
    )
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


@dataclass
class Args:
    what: list[str] = positional(required=False, default_factory=list)  # a study .toml file, or runner names
    tiny: bool = False  # the CPU study of runners/study_tiny.toml
    executor: str = "local"  # local (here), slurm (a job per step, through submitit), submitit-local (the same, here)
    seeds: int | None = None  # run the study with this many seeds instead of its file's (e.g. 2 for a pilot)
    plan: bool = False  # train nothing: print each comparison's minimum detectable difference from --pilot's spread
    pilot: str | None = None  # with --plan: results folder of an earlier run or a pilot (default: the study's own)
    difference: float | None = None  # with --plan: the difference to detect (default: a third of the depth gap)


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
        study.seeds = a.seeds
        study.source += f" --seeds {a.seeds}"
    from runners.cluster import EXECUTORS

    if a.executor not in EXECUTORS:
        raise UserError(f"--executor {a.executor!r}: use one of {EXECUTORS}")
    if a.plan:
        print(power_plan(study, Path(a.pilot) if a.pilot else study.out, a.difference))
        return
    report = run_study(study, executor=a.executor)
    print(f"table: {study.out / 'table.md'}\nplots: {study.out / 'plots'}\nreport: {report}")


if __name__ == "__main__":
    run_main(main)
