import json
import math

import pytest
import torch

import runners.study as study_mod
import runners.study_steps as steps_mod
from common.results import write_result
from runners.study import run_study
from runners.study_file import CompressSpec, RunSpec, Study, check_study, load_study
from runners.study_steps import plan, train_cmd


@pytest.fixture
def study(tmp_path):
    return Study(
        name="s",
        runs=[RunSpec("tiny", "r1", ["--max-steps", "5"])],
        compress=[CompressSpec("r1", "r1-w50", ["--method", "wanda"])],
        checkpoints_dir=str(tmp_path / "ck"),
        logs_dir=str(tmp_path / "logs"),
        results_dir=str(tmp_path / "res"),
    )


def test_the_tiny_study_file_is_valid():
    from runners.study_file import HERE

    s = load_study(HERE / "study_tiny.toml")
    assert [r.name for r in s.runs] == ["tiny_baseline_4l", "tiny_baseline_3l", "tiny_perhead_3l"]
    assert s.seeds == 3 and s.reference == "tiny_baseline_4l"
    # 3 seeds x (3 trainings + 5 compressions + 8 quality evaluations), one side-by-side, 3 over-training
    assert len(plan(s)) == 3 * (3 + 5 + 8) + 1 + 3
    recovered = [c for c in s.compress if "--recover" in c.args]
    assert [c.name for c in recovered] == ["tiny_baseline_4l-drop1-lora"]
    load_study(HERE / "study_100m.toml")


def test_bad_study_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nrunz = []\n')
    with pytest.raises(ValueError, match="unknown key"):
        load_study(bad)
    bad.write_text('name = "x"\n')
    with pytest.raises(ValueError, match="names no"):
        load_study(bad)


def test_study_resumes_without_redoing_finished_steps(study, monkeypatch):
    calls = []

    def fake_step(s, step, log, *rest):
        calls.append(step.key)
        if step.key == "quality-r1-w50" and calls.count("quality-r1-w50") == 1:
            raise KeyboardInterrupt  # interrupted in the middle of the study
        out = step.output(s)  # what the step leaves for the report: a result file, or a folder of them
        if out.suffix == ".json":
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("{}")
        elif step.key.startswith("over_training"):
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{step.run}@step_2-perplexity.json").write_text("{}")

    monkeypatch.setattr(steps_mod, "run_step", fake_step)
    monkeypatch.setattr(study_mod, "build_outputs", lambda s: s.out / "report.md")
    # the fake results are empty files: whether a result is this model's own is tested on real ones (below)
    monkeypatch.setattr(steps_mod.EvaluateStep, "kept", lambda self, s: self.output(s).is_file())
    with pytest.raises(KeyboardInterrupt):
        run_study(study, progress=False)
    first = list(calls)
    assert first == ["train-r1", "compress-r1-w50", "quality-r1", "quality-r1-w50"]
    run_study(study, progress=False)
    # finished steps are skipped; the interrupted one runs again, then the rest
    assert calls[len(first) :] == ["quality-r1-w50", "side_by_side", "over_training-r1"]
    marker = json.loads((study.out / "steps" / "train-r1.json").read_text())
    assert marker["step"] == "train-r1"
    calls.clear()
    run_study(study, progress=False)
    assert calls == []
    # a result deleted since (or cut, and deleted as its error says) is measured again: its step alone runs
    (study.out / "evals" / "r1-quality.json").unlink()
    (study.out / "side_by_side.json").unlink()
    run_study(study, progress=False)
    assert calls == ["quality-r1", "side_by_side"]


def test_training_step_resumes_or_restarts(study, tmp_path):
    from pathlib import Path

    assert "--resume" not in train_cmd(study, study.runs[0]) and "--overwrite" not in train_cmd(study, study.runs[0])
    (Path(study.logs_dir) / "r1").mkdir(parents=True)
    assert train_cmd(study, study.runs[0])[-1] == "--overwrite"  # died before any checkpoint
    (Path(study.checkpoints_dir) / "r1" / "step_2").mkdir(parents=True)
    assert train_cmd(study, study.runs[0])[-1] == "--resume"


def test_runner_names_build_a_default_study():
    from runners.study_file import study_from_runners

    s = study_from_runners(["baseline_8_layer", "perhead_6_layer"])
    assert {c.base for c in s.compress} == {"baseline_8_layer"} and len(s.compress) == 4
    with pytest.raises(ValueError, match="no runner runners/nope.py"):
        study_from_runners(["nope"])


def test_steps_are_typed_and_return_their_outputs(study, tmp_path):
    from pathlib import Path

    from runners.study_steps import CompressStep, EvaluateStep, OverTrainingStep, SideBySideStep, TrainStep

    study.compress.append(CompressSpec("r1", "r1-m50ft", ["--method", "magnitude", "--finetune-steps", "3"]))
    steps = plan(study)
    kinds = [type(s) for s in steps]
    assert kinds[:3] == [TrainStep, CompressStep, CompressStep] and kinds[-1] is OverTrainingStep
    ft = steps[2]
    assert ft.options.finetune_steps == 3 and ft.options.method == "magnitude"
    # the fine-tuned model's folder comes from compress itself, and the evaluations use it
    assert ft.output(study) == Path(study.checkpoints_dir) / "s-compressed" / "r1-m50ft"
    evals = {s.key: s for s in steps if isinstance(s, EvaluateStep)}
    assert evals["quality-r1-m50ft"].model == ft.output(study)
    side = next(s for s in steps if isinstance(s, SideBySideStep))
    assert side.models == {"r1": steps[0].output(study), "r1-w50": steps[1].output(study), "r1-m50ft": ft.output(study)}
    assert side.reference == "r1"  # the first run, as no reference is named
    study.compress.append(CompressSpec("r1", "bad", ["--method", "prune-everything"]))
    with pytest.raises(ValueError, match="compressed model 'bad'.*must be one of"):
        check_study(study, "s")


def test_seeds_make_one_run_per_seed_and_compress_each(study):
    from runners.study_steps import CompressStep, TrainStep, train_cmd

    study.seeds = 2
    steps = plan(study)
    trains = [s for s in steps if isinstance(s, TrainStep)]
    assert [t.name for t in trains] == ["r1-s0", "r1-s1"]
    assert train_cmd(study, study.runs[0], 1)[-2:] == ["--seed", "1338"]  # different init and data order
    comps = [s for s in steps if isinstance(s, CompressStep)]
    assert [c.options.checkpoint.rsplit("/", 1)[-1] for c in comps] == ["r1-s0", "r1-s1"]  # each seed compressed
    members = study.members()
    assert {(m.group, m.seed) for m in members} == {("r1", 0), ("r1", 1), ("r1-w50", 0), ("r1-w50", 1)}
    # each seed's actual value is recorded: 1337 + k, and a compressed model carries its base's
    assert {(m.name, m.seed_value) for m in members} == {
        ("r1-s0", 1337),
        ("r1-s1", 1338),
        ("r1-w50-s0", 1337),
        ("r1-w50-s1", 1338),
    }


def test_workers_run_a_phase_at_once_but_timing_alone(study, monkeypatch):
    import time

    study.seeds, study.workers = 2, 2
    live, peak, threads_seen = set(), {}, {}

    def fake_step(s, step, log, watch, threads, children=None):
        live.add(step.key)
        peak[step.key.split("-")[0]] = max(peak.get(step.key.split("-")[0], 0), len(live))
        threads_seen[step.key] = threads
        time.sleep(0.3)
        live.discard(step.key)

    monkeypatch.setattr(steps_mod, "run_step", fake_step)
    monkeypatch.setattr(study_mod, "build_outputs", lambda s: s.out / "report.md")
    run_study(study, progress=False)
    assert peak["train"] == 2 and peak["quality"] == 2  # two seeds trained, two models evaluated at once
    assert peak["side_by_side"] == 1 and threads_seen["side_by_side"] is None  # timing never shares the machine
    assert len(list((study.out / "steps").glob("*.json"))) == len(plan(study))  # every step left its marker


def test_external_models_join_the_study(tmp_path):
    from runners.study_steps import EvaluateStep, OverTrainingStep, SideBySideStep, over_training

    for name in ("ext", "ext-a", "ext-b"):  # Hugging Face folders as far as the study checks them (config.json)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "gpt_neox"}')
    toml = tmp_path / "s.toml"
    body = f"""
name = "s"
checkpoints_dir = "{tmp_path / "ck"}"
results_dir = "{tmp_path / "res"}"
[[runs]]
runner = "tiny"
name = "r1"
[[external]]
name = "pythia"
path = "{tmp_path / "ext"}"
checkpoints = ["{tmp_path / "ext-a"}", "{tmp_path / "ext-b"}"]
tokens = [1000, 2000]
"""
    toml.write_text(body)
    s = load_study(toml)
    steps = {st.key: st for st in plan(s)}
    quality = steps["quality-pythia"]
    assert isinstance(quality, EvaluateStep) and quality.model == tmp_path / "ext"
    assert quality.extra[-2:] == ["--heldout-of", str(tmp_path / "ck" / "r1")]  # the same text as the runs
    assert isinstance(steps["side_by_side"], SideBySideStep) and "pythia" in steps["side_by_side"].models
    assert isinstance(steps["over_training-pythia"], OverTrainingStep)
    assert [m.kind for m in s.members()] == ["trained", "external"]

    ran = []

    def fake_run(cmd):
        ran.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        (tmp_path / "res" / "s" / "over_training").mkdir(parents=True, exist_ok=True)
        open(out, "w").write(json.dumps({"bits_per_byte": 1.0}))

    over_training(s, "pythia", fake_run)
    assert [c[1] for c in ran] == [str(tmp_path / "ext-a"), str(tmp_path / "ext-b")]
    points = sorted((s.out / "over_training").glob("pythia@*.json"))
    assert [json.loads(p.read_text())["tokens"] for p in points] == [1000, 2000]

    toml.write_text(body.replace("tokens = [1000, 2000]", "tokens = [1000]"))
    with pytest.raises(ValueError, match="one tokens value per checkpoint"):
        load_study(toml)
    toml.write_text(body.replace(f'path = "{tmp_path / "ext"}"', 'path = "/nonexistent/hf"'))
    with pytest.raises(ValueError, match="folder /nonexistent/hf does not exist"):
        load_study(toml)


@pytest.mark.parametrize("toml", ["study_tiny.toml", "study_cpu.toml", "study_100m.toml", "study_100m_lease.toml"])
def test_every_command_of_the_shipped_studies_parses(toml):
    # A typo in a study file should fail here, not minutes into a run on a rented GPU.
    import importlib

    import compress.__main__ as compress_cli
    from common.cli import parse_args
    from eval.efficiency import Args as EfficiencyArgs
    from eval.perplexity import Args as PerplexityArgs
    from eval.quality import Args as QualityArgs
    from eval.side_by_side import Args as SideBySideArgs
    from runners.study_file import HERE

    s = load_study(HERE / toml)
    for run in s.runs:
        cfg = parse_args(importlib.import_module(f"runners.{run.runner}").config(), run.args)
        assert cfg.max_steps > 0
    for c in s.compress:
        a = parse_args(compress_cli.Args(), ["--checkpoint", "x", "--out", "y", *c.args])
        assert a.method is not None
    parse_args(QualityArgs(), ["x", *s.quality])
    parse_args(SideBySideArgs(), ["x", "y", *s.side_by_side])
    parse_args(EfficiencyArgs(), ["x", *s.efficiency])
    parse_args(PerplexityArgs(), ["x", *s.over_training])
    assert len(plan(s)) >= len(s.runs) + len(s.compress)


def test_checkpoints_over_training_are_scored_on_the_quality_evaluation_set(study, tmp_path):
    from pathlib import Path

    from runners.study_steps import over_training

    study.quality = ["--max-tokens", "4000", "--stride", "64", "--n-docs", "2"]
    assert study.evaluation_set() == ["--max-tokens", "4000", "--stride", "64"]
    step = Path(study.checkpoints_dir) / "r1" / "step_2"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"tokens": 100}))
    ran = []

    def fake_run(cmd):
        ran.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"perplexity": 9.0}))

    over_training(study, "r1", fake_run)
    assert ran[0][-4:] == ["--max-tokens", "4000", "--stride", "64"]


@pytest.mark.slow
def test_a_small_study_runs_end_to_end(tmp_path, corpus, sandbox, capsys):
    # Everything for real, as a user runs it: training (2 seeds), compression, quality (HumanEval in the
    # sandbox), side-by-side timing, checkpoints over training, table, plots and report. No step is mocked.
    from runners.study import main as study_main
    from tests.study_files import QUALITY, q, tiny_run

    common, quality = tiny_run(corpus), QUALITY
    toml = tmp_path / "small.toml"
    toml.write_text(
        f"""name = "small"
about = "A demonstration at toy sizes."
seeds = 2
workers = 2
reference = "base2"
checkpoints_dir = "{tmp_path / "ck"}"
logs_dir = "{tmp_path / "logs"}"
results_dir = "{tmp_path / "res"}"
[[runs]]
runner = "tiny"
name = "base2"
args = {q(["--no-head-layer", "--n-layers", "2", *common])}
[[runs]]
runner = "tiny"
name = "ph1"
args = {q(["--n-layers", "1", *common])}
[[runs]]
runner = "tiny"
name = "base1"
args = {q(["--no-head-layer", "--n-layers", "1", *common])}
[[runs]]
runner = "tiny"
name = "gated1"
args = {q(["--no-head-layer", "--attn-gate", "elementwise", "--n-layers", "1", *common])}
[[compress]]
base = "base2"
name = "base2-drop1"
args = ["--method", "drop-last", "--layers", "1"]
[eval]
quality = {q(quality)}
side_by_side = ["--rounds", "3", "--context", "8", "--prompt-len", "8", "--n-tokens", "2"]
"""
    )
    study_main([str(toml)])
    out = tmp_path / "res" / "small"
    record = json.loads((out / "study.json").read_text())
    assert {(m["name"], m["seed_value"]) for m in record["members"] if m["kind"] == "trained"} == {
        (f"{run}-s{k}", 1337 + k) for run in ("base2", "ph1", "base1", "gated1") for k in (0, 1)
    }
    table = (out / "table.md").read_text()
    assert all(f"| {m} |" in table for m in ("base2", "ph1", "base2-drop1", "gated1"))
    assert "gate elementwise" in table  # the gated model is its own variant, not "per-head yes"
    # the answer: each richer 1-block model's fraction of the 2-vs-1-block gap, with the depth check
    answers = json.loads((out / "answer.json").read_text())
    assert {(a["rich"], a["shallow"], a["deep"]) for a in answers} == {
        ("ph1", "base1", "base2"),
        ("gated1", "base1", "base2"),
    }
    report = (out / "report.md").read_text()
    assert "## The answer" in report and "Depth check" in report
    # a fraction is printed only of a gap that passed its depth check (at toy sizes it rarely does)
    passed = "**distinguishably better**" in report
    assert ("fraction of the depth gap recovered" in report) == passed
    assert ("no fraction of its gap is stated" in report) == (not passed)
    head = report.split("## The answer")[0]
    assert "A demonstration at toy sizes." in head and "Smallest differences this study could detect" in head
    comps = json.loads((out / "comparisons.json").read_text())
    tested = [c for c in comps if c.get("p") is not None and "a_stat" in c]
    assert tested and all(c["power"]["mdd"] > 0 for c in tested)  # every tested comparison states its power
    if any(not c["distinguishable"] for c in tested):
        assert "the smallest difference it could have detected is" in report
    # --plan reads the finished study and prints each comparison's detectable difference and the seeds needed
    capsys.readouterr()
    study_main([str(toml), "--plan", "--difference", "0.01"])
    printed = capsys.readouterr().out
    assert "Power plan for small (2 seed(s) per model)" in printed and "depth check base2 vs base1" in printed
    assert "gated1 vs base1: bits per byte" in printed and "MDD study" in printed
    with pytest.raises(ValueError, match="no study.json there"):
        study_main([str(toml), "--plan", "--pilot", str(tmp_path / "nowhere")])
    assert "## What was evaluated" in report and "HumanEval: 1 of the 164 problems" in report
    assert "decode ms/token (side by side)" in report and "bits per byte" in report
    assert (out / "plots" / "training_curves.png").is_file() and (out / "over_training").is_dir()
    assert len(list((out / "steps").glob("*.json"))) == len(plan_of(toml))
    # every scored document's figures are written beside the table: rescored from them alone, each model's bits
    # per byte per seed is the table's (and any subset of documents can be scored the same way)
    import csv

    docs = {d["sha256"]: int(d["bytes"]) for d in csv.DictReader((out / "documents.csv").open())}
    nats: dict[tuple[str, int], float] = {}
    for r in csv.DictReader((out / "document_nats.csv").open()):
        nats[r["model"], int(r["seed"])] = nats.get((r["model"], int(r["seed"])), 0.0) + float(r["nats"])
    table_rows = {r["model"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert {m for m, _ in nats} == set(table_rows) and docs
    for model, r in table_rows.items():
        per_seed = [float(v) for v in r["bpb_per_seed"].split()]
        rescored = [nats[model, k] / math.log(2) / sum(docs.values()) for k in range(2)]
        assert rescored == pytest.approx(per_seed, abs=5e-6)  # the table prints 5 decimals


def plan_of(toml):
    return plan(load_study(toml))


def test_further_decoding_modes_are_timed_side_by_side_each_in_its_own_step(study, tmp_path):
    from runners.study_steps import SideBySideStep
    from visualizations.grouped import group_rows

    study.side_by_side_modes = ["compile"]
    sides = [s for s in plan(study) if isinstance(s, SideBySideStep)]
    assert [s.key for s in sides] == ["side_by_side", "side_by_side-compile"]
    ran = []
    sides[1].execute(study, ran.append)
    assert ran[0][ran[0].index("--mode") + 1] == "compile"
    assert ran[0][ran[0].index("--out") + 1].endswith("side_by_side-compile.json")
    study.side_by_side_modes = ["turbo"]
    with pytest.raises(ValueError, match="'turbo' is not a decoding mode"):
        check_study(study, "s")
    study.side_by_side_modes, study.side_by_side = ["compile"], ["--mode", "compile"]
    with pytest.raises(ValueError, match="repeats a mode"):
        check_study(study, "s")
    study.side_by_side_modes = ["eager"]  # side_by_side times compile, the further step eager: its --mode is last
    check_study(study, "s")
    ran = []
    SideBySideStep({"r1": tmp_path}, "r1", "eager").execute(study, ran.append)
    assert ran[0][-2:] == ["--mode", "eager"]
    # the table's rows carry each mode's latency, for the frontier plot of that mode
    study.side_by_side, study.seeds = [], 1
    study.out.mkdir(parents=True)
    study.record().write(study.out)
    lat = {"median": 2.0, "p10": 1.9, "p90": 2.2, "n": 3}
    timed = {"decode_ms_per_token": lat, "decode_ms_samples": [1.9, 2.0, 2.2]}
    side = {"evaluator": "side_by_side", "reference": "r1", "mode": "compile", "models": {"r1": timed}}
    write_result(study.out / "side_by_side-compile.json", side, torch.device("cpu"))
    rows = {r["model"]: r for r in group_rows(study.out, tmp_path / "logs")}
    assert rows["r1"]["decode_ms_compile"] == lat and "decode_ms_compile" not in rows["r1-w50"]


def test_options_the_study_sets_are_refused_in_any_spelling(study):
    for spelling in ("--out_dir", "--out-dir=x", "--training.out_dir"):
        study.runs[0].args = [spelling, "elsewhere"] if "=" not in spelling else [spelling]
        with pytest.raises(ValueError, match="is set by the study itself"):
            check_study(study, "s")
    study.runs[0].args = ["--max-steps", "5"]
    study.over_training = ["--max_tokens", "40"]
    with pytest.raises(ValueError, match="--max_tokens is set by the study itself"):
        check_study(study, "s")


def test_two_runs_of_one_study_at_once_are_refused(study):
    from filelock import FileLock

    study.out.mkdir(parents=True)
    with FileLock(study.out / ".study.lock"):  # another process is running this study
        with pytest.raises(ValueError, match="already running in another process"):
            run_study(study, progress=False)


def test_a_study_edited_after_its_steps_finished_names_the_changed_steps(study):
    import dataclasses
    import importlib
    from pathlib import Path

    from runners.study_steps import EvaluateStep, TrainStep, changed_steps, complete_step, step_command

    study.quality = ["--n-docs", "2"]
    steps = plan(study)
    quality = next(st for st in steps if isinstance(st, EvaluateStep))
    train = next(st for st in steps if isinstance(st, TrainStep))
    # a quality step finished with the file as it was (its marker records its command)
    (study.out / "steps").mkdir(parents=True)
    monkey_run = steps_mod.run_step
    steps_mod.run_step = lambda *a, **k: None
    try:
        complete_step(study, quality)
    finally:
        steps_mod.run_step = monkey_run
    assert json.loads((study.out / "steps" / f"{quality.key}.json").read_text())["command"] == step_command(
        study, quality
    )
    # a run trained with the file as it was: its config.json is what the runner made of the same options
    run_dir = Path(study.logs_dir) / train.name
    run_dir.mkdir(parents=True)
    cfg = steps_mod.apply_overrides(importlib.import_module("runners.tiny").config(), ["--max-steps", "5"])
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (run_dir / "summary.json").write_text("{}")
    step = Path(study.checkpoints_dir) / train.name / "step_5"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_text("x")
    (step / "state.json").write_text(json.dumps({"step": 5, "config": dataclasses.asdict(cfg)}))  # what trained it
    assert changed_steps(study, plan(study)) == []
    # the run's own checkpoint says what trained it: with its logs' config.json moved away, an edit is still seen
    (run_dir / "config.json").rename(run_dir / "moved.json")
    study.runs[0].args = ["--max-steps", "5", "--n-layers", "3"]
    assert changed_steps(study, plan(study)) == [train.key]
    (run_dir / "moved.json").rename(run_dir / "config.json")
    study.runs[0].args = ["--max-steps", "5"]
    assert changed_steps(study, plan(study)) == []
    # a run recorded before a field existed (here the model's head_norm) trained with that field's default: same
    older = dataclasses.asdict(cfg)
    del older["model"]["head_norm"]
    (step / "state.json").write_text(json.dumps({"step": 5, "config": older}))
    (run_dir / "config.json").write_text(json.dumps(older))
    assert changed_steps(study, plan(study)) == []
    # the file is edited: more documents for quality, more steps for the run
    study.quality = ["--n-docs", "3"]
    study.runs[0].args = ["--max-steps", "6"]
    assert set(changed_steps(study, plan(study))) == {quality.key, train.key}
    with pytest.raises(ValueError, match=r"2 step\(s\) finished before were run with other settings.*new name"):
        run_study(study, progress=False)


def test_the_induction_probe_is_a_step_of_every_model_and_its_figures_reach_the_rows(study, tmp_path):
    from pathlib import Path

    from common.records import Member, StudyRecord
    from runners.study_steps import EvaluateStep
    from visualizations.grouped import group_rows

    study.induction = ["--sequences", "8"]
    check_study(study, "s")
    probes = [st for st in plan(study) if isinstance(st, EvaluateStep) and st.evaluator == "induction"]
    assert [st.key for st in probes] == ["induction-r1", "induction-r1-w50"]
    assert steps_mod.step_command(study, probes[0])[:1] == ["eval.induction"]
    study.induction = ["--out", "x.json"]
    with pytest.raises(ValueError, match="--out is set by the study itself"):
        check_study(study, "s")
    # a result of the probe fills its model's row, as the mean over seeds
    out = tmp_path / "res" / "s"
    out.mkdir(parents=True)
    StudyRecord("s", "s", 1, [Member("m", k, f"m-s{k}", "trained", run=f"m-s{k}") for k in range(2)], {}).write(out)
    for k, gain in enumerate((0.1, 0.3)):
        rep = {"loss_first": 3.0, "loss_second": 3.0 - gain, "induction_nats": {"mean": gain, "n": 8}}
        record = {"evaluator": "induction", "model": f"m-s{k}", "checkpoint": "", "params": 1, "n_layers": 2}
        record |= {"random": rep, "heldout": None, "sequences": 8, "length": 10}
        write_result(out / "evals" / f"m-s{k}-induction.json", record, torch.device("cpu"))
    (row,) = group_rows(out, Path(tmp_path / "logs"))
    assert row["induction_random"]["mean"] == pytest.approx(0.2) and row["induction_random"]["seeds"] == [0, 1]
    assert row["induction_heldout"] is None
    # the table shows the induction columns when some model was probed, and not when none was
    from visualizations.grouped import write_grouped_table

    assert "induction, random tokens" in write_grouped_table([row], out).read_text()
    bare = {k: v for k, v in row.items() if not k.startswith("induction")}
    table = write_grouped_table([bare], out).read_text()
    assert "induction" not in table.lower() and "| m |" in table


@pytest.mark.slow
def test_one_ctrl_c_stops_a_study_of_several_runs_and_says_how_to_continue(tmp_path, corpus):
    """Two of four trainings running at once; Ctrl-C (SIGINT to the study's process group, as a terminal sends
    it) stops the study and both trainings within seconds, starts neither queued training, keeps the started
    runs' checkpoints, and says how to continue, without a traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from llama.model_io import list_checkpoints
    from tests.study_files import QUALITY, q, tiny_run

    common = [*tiny_run(corpus, interval=20), "--max-steps", "100000", "--batch-size", "8"]
    runs = "".join(f'[[runs]]\nrunner = "tiny"\nname = "r{i}"\nargs = {q(common)}\n' for i in range(4))
    toml = tmp_path / "long.toml"
    toml.write_text(
        f'name = "long"\nworkers = 2\ncheckpoints_dir = "{tmp_path / "ck"}"\nlogs_dir = "{tmp_path / "logs"}"\n'
        f'results_dir = "{tmp_path / "res"}"\n{runs}[eval]\nquality = {q(QUALITY)}\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "runners.study", str(toml)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        # as from a terminal: a suite started in the background (`pytest &`) passes SIGINT on ignored, and a
        # Python whose SIGINT is ignored at start keeps ignoring it (the convention nohup relies on)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # both first trainings have a checkpoint
            if all(list_checkpoints(tmp_path / "ck" / f"r{i}") for i in (0, 1)):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the first two trainings never wrote a checkpoint")
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
    finally:  # whatever failed, no training of this test outlives it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert time.monotonic() - t0 < 60 and proc.returncode == 130
    assert "interrupted: 0 of" in err and "again to continue" in err and "Traceback" not in err
    assert all(list_checkpoints(tmp_path / "ck" / f"r{i}") for i in (0, 1))
    assert not (tmp_path / "ck" / "r2").exists() and not (tmp_path / "ck" / "r3").exists()  # never started
    assert not list((tmp_path / "res" / "long" / "steps").glob("*.json"))


def test_the_plan_reads_a_committed_study_and_refuses_a_folder_with_nothing_measured(tmp_path, capsys):
    """--plan --pilot docs/results/study_cpu (the committed study: its comparisons, not its evaluations) prints a
    row per comparison; a folder whose study measured nothing is one line, not an empty table."""
    import shutil

    from runners.study import main as study_main

    study_main(["runners/study_cpu.toml", "--plan", "--pilot", "docs/results/study_cpu"])
    printed = capsys.readouterr().out
    assert "depth check cpu_baseline_2l vs cpu_baseline_1l: gap 0.0869" in printed
    assert printed.count("cpu_gated_1l vs cpu_baseline_1l: bits per byte") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy("docs/results/study_cpu/study.json", empty / "study.json")
    with pytest.raises(ValueError, match="no measured comparison there"):
        study_main(["runners/study_cpu.toml", "--plan", "--pilot", str(empty)])


def test_a_mistyped_study_file_is_named_as_a_path():
    from runners.study import main as study_main

    with pytest.raises(ValueError, match=r"runners/study_cpu.tml is not a study file .* check the path"):
        study_main(["runners/study_cpu.tml"])
