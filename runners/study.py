"""The whole study in one command: train, compress, evaluate, tabulate, plot, report.

    python -m runners.study --tiny                              # CPU, 3 seeds, about 13 minutes on 2 cores
    python -m runners.study runners/study_100m.toml             # the 100M configs (GPU)
    python -m runners.study baseline_8_layer perhead_6_layer    # runner names, default baselines and evaluations

A study file may also name ``[[external]]`` models (Hugging Face folders such as codeparrot-small or
pythia-160m): each is evaluated on the held-out text of the study's reference run and timed side by side
with the rest; with ``checkpoints`` and ``tokens`` its checkpoints over training are plotted with the runs'.

Every step is a command a user could type (``python -m runners.X``, ``python -m eval.compress``,
``python -m eval.quality`` ...), run in a subprocess with its output in ``results/<study>/logs/``. A finished
step leaves a marker in ``results/<study>/steps/``; running the study again skips finished steps, resumes an
interrupted training run from its checkpoint, and reuses runs trained before. The table, plots and report are
rebuilt from the results every time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
from tqdm import tqdm

import eval.compress.__main__ as compress_cli
from common.cli import apply_overrides, parse_args, positional, run_main
from common.files import atomic_write
from common.process import die_with_parent
from llama.model_io import list_checkpoints
from training.config import check_run_name

HERE = Path(__file__).resolve().parent


@dataclass
class Study:
    name: str
    runs: list[dict]  # {runner, name, args}
    compress: list[dict] = field(default_factory=list)  # {base, name, args}
    # models not trained here (Hugging Face folders, e.g. codeparrot-small, pythia-160m), compared as rows:
    # {name, path, and optionally checkpoints = [folders over training] with tokens = [tokens each had seen]}
    external: list[dict] = field(default_factory=list)
    quality: list[str] = field(default_factory=list)  # extra arguments of eval.quality
    efficiency: list[str] = field(default_factory=list)  # extra arguments of eval.efficiency
    over_training: list[str] = field(default_factory=list)  # extra arguments of eval.perplexity per checkpoint
    side_by_side: list[str] = field(default_factory=list)  # extra arguments of eval.side_by_side
    seeds: int = 1  # each run is trained this many times (seeds 1337, 1338 ...: init and data order differ)
    reference: str | None = None  # the model latency ratios are taken to (default: the first run)
    checkpoints_dir: str = "checkpoints"
    logs_dir: str = "logs"
    results_dir: str = "results"
    source: str = ""  # how the study was named on the command line (for the report)
    workers: int = 1  # steps run at once within a phase (each child then gets cores / workers threads)

    @property
    def out(self) -> Path:
        return Path(self.results_dir) / self.name

    def member(self, group: str, seed: int) -> str:
        """The run or folder name of one seed of a model of the study (the name itself with one seed)."""
        return group if self.seeds == 1 else f"{group}-s{seed}"

    def members(self) -> list[dict]:
        """Every model the study trains or builds, one entry per seed: what the table and report group by."""
        out = []
        for k in range(self.seeds):
            for r in self.runs:
                name = self.member(r["name"], k)
                out.append({"group": r["name"], "seed": k, "name": name, "kind": "trained", "run": name})
            for c in self.compress:
                name = self.member(c["name"], k)
                out.append({"group": c["name"], "seed": k, "name": name, "kind": "compressed", "base": c["base"]})
        for e in self.external:  # one model each: no seeds
            out.append({"group": e["name"], "seed": 0, "name": e["name"], "kind": "external", "path": e["path"]})
        return out

    def heldout_reference(self) -> list[str]:
        """Extra evaluator arguments for external models: score the held-out text of the reference run's
        first seed, so they see the same text as the trained models (bits per byte compare across
        tokenizers). None without trained runs: then the study's evaluator arguments must name a corpus."""
        trained = [r["name"] for r in self.runs]
        if not trained:
            return []
        ref = self.reference if self.reference in trained else trained[0]
        return ["--heldout-of", str(Path(self.checkpoints_dir) / self.member(ref, 0))]


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {path} does not exist")
    d = tomllib.loads(path.read_text())
    folders = ("checkpoints_dir", "logs_dir", "results_dir")
    keys = {"name", "runs", "compress", "external", "eval", "seeds", "reference", "workers", *folders}
    unknown = set(d) - keys
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
    if not d.get("runs") and not d.get("external"):
        raise ValueError(f"{path} names no [[runs]] and no [[external]] models; add a runner to train")
    external = d.get("external", [])
    for e in external:
        check_external(path, e)
    names = [r.get("name") for r in d.get("runs", [])] + [c.get("name") for c in d.get("compress", [])]
    names += [e["name"] for e in external]
    for n in names:
        try:
            check_run_name(n)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: run and compressed model names must be unique, got {names}")
    ev = d.get("eval", {})
    seeds = d.get("seeds", 1)
    if not isinstance(seeds, int) or not 1 <= seeds <= 100:
        raise ValueError(f"{path}: seeds = {seeds!r}; give a whole number from 1 to 100")
    if d.get("reference") is not None and d["reference"] not in names:
        raise ValueError(f"{path}: reference {d['reference']!r} is none of the study's models {names}")
    return Study(
        name=d.get("name", path.stem),
        runs=d.get("runs", []),
        compress=d.get("compress", []),
        external=external,
        quality=ev.get("quality", []),
        efficiency=ev.get("efficiency", []),
        over_training=ev.get("over_training", []),
        side_by_side=ev.get("side_by_side", []),
        seeds=seeds,
        reference=d.get("reference"),
        workers=max(1, int(d.get("workers", 1))),
        **{k: d[k] for k in folders if k in d},
    )


def check_external(path: Path, e: dict):
    unknown = set(e) - {"name", "path", "checkpoints", "tokens"}
    if unknown or "name" not in e or "path" not in e:
        raise ValueError(f"{path}: an [[external]] model takes name, path, checkpoints, tokens; got {sorted(e)}")
    for folder in [e["path"], *e.get("checkpoints", [])]:
        if not Path(folder).is_dir():
            raise ValueError(f"{path}: external model {e['name']!r}: folder {folder} does not exist")
    if len(e.get("tokens", [])) != len(e.get("checkpoints", [])):
        raise ValueError(
            f"{path}: external model {e['name']!r}: give one tokens value per checkpoint "
            f"({len(e.get('checkpoints', []))} checkpoints, {len(e.get('tokens', []))} tokens)"
        )


def study_from_runners(names: list[str]) -> Study:
    """Runner names with the default baselines: the deepest baseline pruned, 2:4, quantized, one block shorter."""
    for n in names:
        if not (HERE / f"{n}.py").is_file():
            raise ValueError(f"no runner runners/{n}.py; pass runner names (e.g. baseline_8_layer) or a .toml file")
    runs = [{"runner": n, "name": n, "args": []} for n in names]
    baselines = [n for n in names if n.startswith("baseline_")]
    compress = []
    if baselines:
        base = max(baselines, key=lambda n: int(n.split("_")[1]))
        compress = [
            {"base": base, "name": f"{base}-wanda50", "args": ["--method", "wanda", "--sparsity", "0.5"]},
            {"base": base, "name": f"{base}-sparsegpt24", "args": ["--method", "sparsegpt", "--pattern", "2:4"]},
            {"base": base, "name": f"{base}-drop1", "args": ["--method", "drop-angular", "--layers", "1"]},
            {"base": base, "name": f"{base}-int8", "args": ["--method", "quantize", "--scheme", "torchao-int8-weight"]},
        ]
    return Study(name="study_" + "_".join(names), runs=runs, compress=compress)


# ---------------------------------------------------------------------------------------------------------
# Steps


SEED = 1337  # the runners' default seed; seed k of a study trains with SEED + k


def train_cmd(s: Study, run: dict, seed: int = 0) -> list[str]:
    name = s.member(run["name"], seed)
    ckpt, logs = Path(s.checkpoints_dir) / name, Path(s.logs_dir) / name
    cmd = [
        f"runners.{run['runner']}",
        "--name",
        name,
        "--out-dir",
        s.checkpoints_dir,
        "--log-dir",
        s.logs_dir,
        *run.get("args", []),
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

    run: dict
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
    """Build one compressed baseline (one seed of its base) with eval.compress; its output is the folder
    eval.compress says."""

    name: str
    argv: list[str]  # eval.compress's command line
    options: compress_cli.Args  # the same, parsed by eval.compress's own options class

    @classmethod
    def of(cls, s: Study, spec: dict, seed: int = 0) -> CompressStep:
        name = s.member(spec["name"], seed)
        out = Path(s.checkpoints_dir) / f"{s.name}-compressed" / name
        base = Path(s.checkpoints_dir) / s.member(spec["base"], seed)
        argv = ["--checkpoint", str(base), "--out", str(out), *spec["args"]]
        try:
            return cls(name, argv, apply_overrides(compress_cli.Args(), list(argv)))
        except ValueError as e:
            raise ValueError(f"study {s.name}, compressed model {spec['name']!r}: {e}") from None

    @property
    def key(self) -> str:
        return f"compress-{self.name}"

    def output(self, s: Study) -> Path:
        return compress_cli.model_folder(self.options)

    def done(self, s: Study) -> bool:
        return not self.options.finetune_steps and (Path(self.options.out) / "compression.json").is_file()

    def execute(self, s: Study, run: Callable[[list[str]], None]):
        run(["eval.compress", *self.argv])


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

    @property
    def key(self) -> str:
        return "side_by_side"

    def output(self, s: Study) -> Path:
        return s.out / "side_by_side.json"

    def done(self, s: Study) -> bool:
        return False

    def execute(self, s: Study, run: Callable[[list[str]], None]):
        cmd = ["eval.side_by_side", *map(str, self.models.values()), "--names", *self.models]
        run([*cmd, "--reference", self.reference, "--out", str(self.output(s)), *s.side_by_side])


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
    train = [TrainStep(r, s.member(r["name"], k), k) for k in range(s.seeds) for r in s.runs]
    compress = [CompressStep.of(s, c, k) for k in range(s.seeds) for c in s.compress]
    models = [(t.name, t.output(s)) for t in train] + [(c.name, c.output(s)) for c in compress]
    steps: list[Step] = [*train, *compress]
    steps += [EvaluateStep("quality", name, folder, s.quality) for name, folder in models]
    steps += [
        EvaluateStep("quality", e["name"], Path(e["path"]), s.quality + s.heldout_reference()) for e in s.external
    ]
    first = {t.run["name"]: t.output(s) for t in train if t.seed == 0}
    first |= {spec["name"]: c.output(s) for spec, c in zip(s.compress, compress[: len(s.compress)], strict=True)}
    first |= {e["name"]: Path(e["path"]) for e in s.external}
    if s.efficiency:  # the per-model efficiency evaluator (all modes, batch sizes, engines), seed 0
        steps += [EvaluateStep("efficiency", s.member(g, 0), folder, s.efficiency) for g, folder in first.items()]
    if len(first) >= 2:
        steps.append(SideBySideStep(first, s.reference or next(iter(first))))
    steps += [OverTrainingStep(s.member(r["name"], 0)) for r in s.runs]
    return steps + [OverTrainingStep(e["name"]) for e in s.external if e.get("checkpoints")]


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
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(
            f"`python -m {' '.join(cmd)}` failed (exit {proc.returncode}); see {log}:\n" + "\n".join(tail)
        )


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
    external = {e["name"]: e for e in s.external}.get(run_name)
    if external:
        points = [
            (i, Path(f), {"tokens": t})
            for i, (f, t) in enumerate(zip(external["checkpoints"], external["tokens"], strict=True))
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
            run(["eval.perplexity", str(folder), "--out", str(target), *s.over_training, *extra])
        r = json.loads(target.read_text())
        r |= {"run": run_name, "step": step, "tokens": state["tokens"], "energy_j": state.get("energy_j")}
        atomic_write(target, json.dumps(r, indent=2))


def run_study(s: Study, progress: bool = True) -> Path:
    """Run every unfinished step, phase by phase (training, compression, quality, side-by-side timing, over
    training); with ``workers`` > 1 the independent steps of a phase run at once, each child with its share
    of the cores. The side-by-side timing always runs alone."""
    markers = s.out / "steps"
    markers.mkdir(parents=True, exist_ok=True)
    steps = plan(s)
    atomic_write(s.out / "members.json", json.dumps(s.members(), indent=2))  # what the report groups by
    phases: dict[str, list[Step]] = {}
    for step in steps:
        phases.setdefault(step.key.split("-")[0], []).append(step)
    running: dict[str, str] = {}
    with tqdm(total=len(steps), desc=s.name, unit="step", disable=not progress) as bar:

        def show():
            bar.set_postfix_str(" | ".join(f"{k}: {v}" if v else k for k, v in running.items())[:150])

        def one(step: Step, threads: int | None):
            key = step.key
            running[key] = ""
            show()

            def watch(status: str):
                running[key] = status
                show()

            t0 = time.perf_counter()
            try:
                run_step(s, step, s.out / "logs" / f"{key}.log", watch, threads)
            finally:
                running.pop(key, None)
            record = {"step": key, "seconds": time.perf_counter() - t0, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write(markers / f"{key}.json", json.dumps(record))
            bar.update(1)
            show()

        for phase in phases.values():
            todo = [st for st in phase if not finished(s, st, markers / f"{st.key}.json")]
            bar.update(len(phase) - len(todo))
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


# ---------------------------------------------------------------------------------------------------------
# Table, plots, report (from results only)


def build_outputs(s: Study) -> Path:
    from visualizations import save_figures
    from visualizations.grouped import comparisons, group_rows, write_grouped_table
    from visualizations.plot_tradeoffs import grouped_tradeoff_figures
    from visualizations.plot_training import load_runs, training_figures
    from visualizations.plot_training import over_training as over_training_fig
    from visualizations.report import write_report

    rows = group_rows(s.out, Path(s.logs_dir))
    write_grouped_table(rows, s.out)
    comps = comparisons(rows, Path(s.logs_dir))
    atomic_write(s.out / "comparisons.json", json.dumps(comps, indent=2))
    trained = [m["run"] for m in s.members() if m["kind"] == "trained"]
    runs = load_runs(s.logs_dir, [r for r in trained if (Path(s.logs_dir) / r / "metrics.jsonl").is_file()])
    figures = training_figures(runs) | grouped_tradeoff_figures(rows)
    points = {}
    for path in sorted((s.out / "over_training").glob("*.json")):
        r = json.loads(path.read_text())
        points.setdefault(r["run"], []).append(r)
    if points and any(e.get("checkpoints") for e in s.external):  # other tokenizers: only bits per byte compare
        figures["over_training.png"] = over_training_fig(points, "bits_per_byte", "held-out bits per byte")
    elif points:
        figures["over_training.png"] = over_training_fig(points)
    save_figures(figures, s.out / "plots")
    return write_report(s, rows, comps, runs, sorted(figures), points)


@dataclass
class Args:
    what: list[str] = positional(required=False, default_factory=list)  # a study .toml file, or runner names
    tiny: bool = False  # the CPU study of runners/study_tiny.toml


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
        raise ValueError("name a study .toml file or runner names, or pass --tiny (see --help)")
    study.source = study.source or " ".join(a.what)
    report = run_study(study)
    print(f"table: {study.out / 'table.md'}\nplots: {study.out / 'plots'}\nreport: {report}")


if __name__ == "__main__":
    run_main(main)
