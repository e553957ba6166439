"""A study's definition (``Study``: runs, compressed baselines, external models, evaluations, seeds), read from
a TOML study file or made from runner names, and checked before anything runs (runners/study.py runs it)."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

import compress.__main__ as compress_cli
from common.cli import UserError, apply_overrides, from_table
from common.records import Member, StudyRecord
from llama.model_io import MODEL_FILE, list_checkpoints
from models.hf import hf_config, is_hf_folder
from runners.cluster import resources_of
from training.config import check_run_name

HERE = Path(__file__).resolve().parent
SEED = 1337  # the runners' default seed; seed k of a study trains with SEED + k


@dataclass
class RunSpec:
    """A ``[[runs]]`` entry: a model trained by one runner (one run per seed)."""

    runner: str  # a runner of runners/ (tiny, baseline_8_layer ...)
    name: str  # the run's name (with seeds > 1, seed k is <name>-s<k>)
    args: list[str] = field(default_factory=list)  # the runner's overrides, e.g. ["--max-steps", "120"]
    lr_grid: list[float] = field(default_factory=list)  # this run's learning-rate check (default: [tune] lr)


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
    induction: list[str] | None = None  # eval.induction on every model and seed ([]: its defaults; None: off)


@dataclass
class TuneSpec:
    """The ``[tune]`` table: a learning-rate check before the main runs. Every run is trained at every rate of
    ``lr`` with the study's first ``seeds`` seeds, at its full budget; each run then trains its remaining seeds
    at the rate of lowest loss (runners/study_tune.py), and the check's runs at that rate are its first seeds."""

    lr: list[float]  # peak learning rates, e.g. [1e-3, 2e-3, 4e-3, 8e-3] (a factor 2 apart)
    seeds: int = 2  # seeds per rate
    tail: float = 0.1  # the rate is chosen by the mean training loss over this last fraction of the steps
    # stop before the main runs while a richer run is worse than the plain run of its depth (each at its chosen
    # rate, paired over the check's seeds) by more than the check could detect: the rule fixed before the main runs
    leave_out: bool = False


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
    induction: list[str] | None = None  # extra arguments of eval.induction (None: not run)
    seeds: int = 1  # each run is trained this many times (seeds 1337, 1338 ...: init and data order differ)
    reference: str | None = None  # the model latency ratios are taken to (default: the first run)
    checkpoints_dir: str = "checkpoints"
    logs_dir: str = "logs"
    results_dir: str = "results"
    source: str = ""  # how the study was named on the command line (for the report)
    workers: int = 1  # steps run at once within a phase (each child then gets cores / workers threads)
    cluster: dict = field(default_factory=dict)  # step kind -> runners.cluster.Resources ([cluster.<kind>])
    about: str = ""  # what the study can answer: the report's first paragraph
    tune: TuneSpec | None = None  # the learning-rate check ([tune]); None: every run at its runner's rate
    design: object | None = None  # runners.study_design.DesignSpec ([design]); None: plan from a pilot only
    rates: dict[str, float] = field(default_factory=dict)  # run -> the rate its check chose (study_tune.choose)

    @property
    def out(self) -> Path:
        return Path(self.results_dir) / self.name

    def member(self, group: str, seed: int) -> str:
        """The run or folder name of one seed of a model of the study (the name itself with one seed); a run
        whose rate was chosen by the study's check carries it in its name, as the check's runs do."""
        if group in self.rates:
            return self.run_name(group, seed, self.rates[group])
        return group if self.seeds == 1 else f"{group}-s{seed}"

    def run_name(self, group: str, seed: int, lr: float) -> str:
        """The name of run ``group`` trained at peak rate ``lr`` (a check's run, or a main run at its chosen rate)."""
        return f"{group}-lr{lr:g}" + ("" if self.seeds == 1 else f"-s{seed}")

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
        commands = {r.name: f"{r.runner} {' '.join(self.run_args(r))}".strip() for r in self.runs}
        commands |= {c.name: f"compress {' '.join(c.args)} on {c.base}" for c in self.compress}
        commands |= {e.name: f"external {e.path}" for e in self.external}
        return StudyRecord(self.name, self.source or self.name, self.workers, self.members(), commands, self.about)

    def grid(self, run: RunSpec) -> list[float]:
        """The rates ``run``'s learning-rate check tries: its own ``lr_grid``, else the study's [tune] lr."""
        return run.lr_grid or (self.tune.lr if self.tune else [])

    def run_args(self, run: RunSpec, lr: float | None = None) -> list[str]:
        """The runner options of ``run``: the study file's, then the rate (``lr``, else the one its check chose)."""
        lr = self.rates.get(run.name) if lr is None else lr
        return [*run.args] + ([] if lr is None else ["--lr", repr(float(lr))])

    def evaluation_set(self) -> list[str]:
        """eval.perplexity options that select the text eval.quality scores (its --max-tokens, --stride and text
        options): the checkpoints over training are scored on exactly that set, so the report has one."""
        import eval.quality

        q = apply_overrides(eval.quality.Args(checkpoint="x"), list(self.quality))
        argv = [] if q.max_tokens is None else ["--max-tokens", str(q.max_tokens)]
        argv += [] if q.stride is None else ["--stride", str(q.stride)]
        t = q.text
        for key in ("corpus", "hf_config", "heldout_of", "near_duplicates"):
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
    tune: dict | None = None  # the [tune] table: a learning-rate check before the main runs (TuneSpec)
    design: dict | None = None  # the [design] table: what --plan assumes without a pilot (runners/study_design.py)


# options each step sets itself: a study file that sets them would send outputs where the study never looks
SET_BY_STUDY = {
    "runs": ("--name", "--out-dir", "--log-dir", "--seed", "--resume", "--overwrite"),
    "compress": ("--checkpoint", "--out", "--log-dir"),
    "eval": ("--out",),
    # the checkpoints over training are scored on eval.quality's text (Study.evaluation_set): one set per report
    "over_training": (
        "--out",
        "--max-tokens",
        "--stride",
        "--corpus",
        "--heldout-of",
        "--file-glob",
        "--hf-config",
        "--near-duplicates",
    ),
}


def option_name(arg: str) -> str:
    """``--out_dir``, ``--out-dir=x``, ``--training.out-dir`` and ``--no-out-dir`` (which sets it to None) all name
    ``--out-dir``: the command line takes each spelling, so a check of the options a study sets itself must too."""
    name = arg.split("=")[0].lstrip("-").split(".")[-1].replace("_", "-")
    return "--" + name.removeprefix("no-")


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
    tune = None if top.tune is None else from_table(TuneSpec, top.tune, f"{path} [tune]")
    if top.design is not None:
        from runners.study_design import DesignSpec

        design = from_table(DesignSpec, top.design, f"{path} [design]")
    else:
        design = None
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
        induction=ev.induction,
        seeds=top.seeds,
        reference=top.reference,
        workers=top.workers,
        checkpoints_dir=top.checkpoints_dir,
        logs_dir=top.logs_dir,
        results_dir=top.results_dir,
        cluster=resources_of(top.cluster, str(path), from_table),
        about=top.about,
        tune=tune,
        design=design,
    )
    check_study(study, str(path))
    return study


def check_study(s: Study, where: str):
    """What every step of ``s`` will run, checked now: runners exist and take their options, compressed
    baselines name a run of the study and valid compress options, evaluator options parse, external
    models are model folders. Raises a one-line UserError naming ``where`` and the entry."""
    import eval.efficiency
    import eval.induction
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

    owned_by_study = SET_BY_STUDY["runs"]
    if s.tune is not None:
        check_tune(s.tune, s.seeds, where)
        owned_by_study += ("--lr",)  # each run's rate is the check's
    for r in s.runs:
        if r.lr_grid and s.tune is None:
            raise UserError(f"{where}: run {r.name!r}: lr_grid needs a [tune] table (its seeds and tail)")
        if r.lr_grid:
            check_grid(r.lr_grid, f"{where}: run {r.name!r}: lr_grid")
    for r in s.runs:
        if not re.fullmatch(r"\w+", r.runner) or not (HERE / f"{r.runner}.py").is_file():
            runners = sorted(p.stem for p in HERE.glob("*.py") if _is_runner(p.stem))
            raise UserError(f"{where}: run {r.name!r}: no runner {r.runner!r}; the runners are {', '.join(runners)}")
        module = importlib.import_module(f"runners.{r.runner}")
        if not callable(getattr(module, "config", None)):
            raise UserError(f"{where}: run {r.name!r}: runners/{r.runner}.py is not a runner (it has no config())")
        parses(module.config(), r.args, f"run {r.name!r}", owned_by_study)
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
        ("induction", s.induction or [], eval.induction.Args(checkpoint="x")),
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


def check_grid(rates: list[float], where: str):
    if len(rates) < 3 or any(not 0 < r < 1 for r in rates) or sorted(set(rates)) != rates:
        raise UserError(
            f"{where} = {rates}: give at least three increasing rates between 0 and 1, a factor 2 apart "
            "(e.g. [1e-3, 2e-3, 4e-3, 8e-3]), so that the best can be seen not to sit at an edge"
        )


def check_tune(t: TuneSpec, seeds: int, where: str):
    check_grid(t.lr, f"{where}: [tune] lr")
    if not 1 <= t.seeds <= seeds:
        raise UserError(f"{where}: [tune] seeds = {t.seeds}: give 1 to the study's seeds ({seeds})")
    if not 0 < t.tail <= 1:
        raise UserError(f"{where}: [tune] tail = {t.tail}: give a fraction of the steps in (0, 1]")
    if t.leave_out and t.seeds < 2:  # with one seed the rule has no spread to judge by, and would keep everything
        raise UserError(f"{where}: [tune] leave_out pairs the check's seeds: give [tune] seeds = 2 or more")


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
        if "/" in n or "." in n:  # a path, not a runner's name: a study file whose name is mistyped
            raise UserError(f"{n} is not a study file (a .toml file that exists) nor a runner's name; check the path")
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
