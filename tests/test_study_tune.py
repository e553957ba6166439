"""A study's learning-rate check ([tune]): every run at every rate of its grid with the first seeds, the rate of
lowest tail training loss chosen by the rule fixed in the file, the grid's edges refused, divergence a result, and
the check's runs reused as the main runs' first seeds."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

import runners.study as study_mod
import runners.study_steps as steps_mod
import runners.tiny
from common.cli import apply_overrides
from runners.study import run_study
from runners.study_file import RunSpec, Study, TuneSpec, check_study, load_study
from runners.study_steps import StepFailed, TrainStep, plan, train_cmd
from runners.study_tune import tail_loss, tune_steps
from tests.study_files import q, tiny_run

BEST = {"r1": 2e-3, "r2": 4e-3}  # each fake run's loss is lowest at its own rate


def fake_loss(run: str, lr: float, seed: int) -> float:
    return 3.0 + math.log2(lr / BEST[run]) ** 2 * 0.1 + 0.01 * seed


@pytest.fixture
def study(tmp_path):
    return Study(
        name="s",
        runs=[RunSpec("tiny", "r1", ["--max-steps", "20"]), RunSpec("tiny", "r2", ["--max-steps", "20"])],
        seeds=3,
        tune=TuneSpec(lr=[1e-3, 2e-3, 4e-3], seeds=2),
        checkpoints_dir=str(tmp_path / "ck"),
        logs_dir=str(tmp_path / "logs"),
        results_dir=str(tmp_path / "res"),
    )


def fake_training(calls: list, diverge: set = frozenset(), offsets: dict | None = None, richer: set = frozenset()):
    """In place of the subprocess a step runs: a training command leaves the logs and checkpoint a run leaves,
    with a loss curve flat at fake_loss (plus ``offsets[run][seed]``), or (for the names in ``diverge``) the
    trainer's diverged mark and a failed exit. Its summary says 2 blocks, with a gate for the runs in ``richer``."""

    def python(cmd, log, *rest):
        name = cmd[cmd.index("--name") + 1]
        calls.append(name)
        lr, seed = float(cmd[cmd.index("--lr") + 1]), int(cmd[cmd.index("--seed") + 1]) - 1337
        logs = Path(cmd[cmd.index("--log-dir") + 1]) / name
        logs.mkdir(parents=True, exist_ok=True)
        if name in diverge:
            (logs / "diverged.json").write_text(json.dumps({"step": 7, "loss": None}))
            raise StepFailed("`python -m runners.tiny ...` failed (exit 1): loss became nan")
        run = name.split("-lr")[0]
        loss = fake_loss(run, lr, seed) + (offsets or {}).get(run, [0.0] * 8)[seed]
        rows = [json.dumps({"step": i, "loss": loss}) for i in range(1, 201)]
        (logs / "metrics.jsonl").write_text("\n".join(rows) + "\n")
        head = {"gate": "elementwise"} if run in richer else None
        summary = {
            "name": name,
            "steps": 200,
            "tokens": 1000,
            "final_val_loss": loss,
            "n_layers": 2,
            "head_layer": head,
        }
        (logs / "summary.json").write_text(json.dumps(summary))
        step = Path(cmd[cmd.index("--out-dir") + 1]) / name / "step_200"
        step.mkdir(parents=True)
        config = dataclasses.asdict(apply_overrides(runners.tiny.config(), cmd[1:]))  # what the runner would train
        (step / "state.json").write_text(json.dumps({"step": 200, "config": config}))

    return python


def test_the_check_chooses_each_runs_rate_refuses_an_edge_and_reuses_its_runs(study, monkeypatch):
    calls = []
    monkeypatch.setattr(steps_mod, "_python", fake_training(calls, diverge={"r1-lr0.004-s1"}))
    monkeypatch.setattr(study_mod, "build_outputs", lambda s: s.out / "report.md")
    monkeypatch.setattr(study_mod, "plan", lambda s: [st for st in plan(s) if isinstance(st, TrainStep)])
    # r2's best rate (4e-3) is the grid's largest: the study stops after the check and says what to add
    with pytest.raises(ValueError, match=r"edge of its grid for 1 run\(s\) \(r2: best 0.004, add 0.008\)"):
        run_study(study, progress=False)
    assert sorted(calls) == sorted(f"r{i}-lr{lr}-s{k}" for i in (1, 2) for lr in (0.001, 0.002, 0.004) for k in (0, 1))
    record = json.loads((study.out / "tune.json").read_text())
    assert record["runs"]["r1"]["chosen"] == 2e-3
    diverged = next(r for r in record["runs"]["r1"]["rates"] if r["lr"] == 4e-3)
    assert diverged["tail_losses"][1] is None and diverged["mean"] is None  # a diverged seed: the rate loses
    # extend r2's grid: only its new rate trains; then the main runs' third seed at each chosen rate
    study.runs[1].lr_grid = [1e-3, 2e-3, 4e-3, 8e-3]
    calls.clear()
    run_study(study, progress=False)
    # the new rate's two seeds, then the third seed of each run at its chosen rate (seeds 0 and 1 are the check's)
    assert calls == ["r2-lr0.008-s0", "r2-lr0.008-s1", "r1-lr0.002-s2", "r2-lr0.004-s2"]
    assert study.rates == {"r1": 2e-3, "r2": 4e-3}
    members = [m.name for m in study.members() if m.group == "r1"]
    assert members == ["r1-lr0.002-s0", "r1-lr0.002-s1", "r1-lr0.002-s2"]  # seeds 0 and 1 are the check's runs
    assert study.record().commands["r1"].endswith("--max-steps 20 --lr 0.002")
    assert train_cmd(study, study.runs[0], 2)[train_cmd(study, study.runs[0], 2).index("--lr") + 1] == "0.002"


def test_tail_loss_reads_the_last_fraction_and_needs_enough_points(tmp_path):
    logs = tmp_path / "run"
    logs.mkdir()
    rows = [{"step": i, "loss": 10.0 if i <= 80 else float(i)} for i in range(1, 101)]
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tail_loss(logs, 0.2) == pytest.approx(sum(range(81, 101)) / 20)
    with pytest.raises(ValueError, match="only 5 logged steps in the last 5%.*smaller --log-interval"):
        tail_loss(logs, 0.05)
    (logs / "diverged.json").write_text("{}")
    assert tail_loss(logs, 0.2) == math.inf


def test_a_tuned_study_refuses_a_rate_of_its_own_and_a_bad_grid(study):
    check_study(study, "s")
    study.runs[0].args = ["--lr=0.01"]
    with pytest.raises(ValueError, match="--lr is set by the study itself"):
        check_study(study, "s")
    study.runs[0].args = []
    for grid in ([1e-3, 2e-3], [2e-3, 1e-3, 4e-3], [1e-3, 2e-3, 2.0]):
        study.tune.lr = grid
        with pytest.raises(ValueError, match=r"\[tune\] lr = .*at least three increasing rates"):
            check_study(study, "s")
    study.tune.lr = [1e-3, 2e-3, 4e-3]
    study.tune.seeds = 4
    with pytest.raises(ValueError, match="seeds = 4: give 1 to the study's seeds"):
        check_study(study, "s")
    study.tune.seeds, study.tune.leave_out = 1, True  # one seed: the rule to leave a run out could never fire
    with pytest.raises(ValueError, match=r"leave_out pairs the check's seeds: give \[tune\] seeds = 2 or more"):
        check_study(study, "s")
    study.tune.seeds = 2
    check_study(study, "s")


def test_the_check_trains_each_seed_at_every_rate_before_the_next_seed(study):
    keys = [st.key for st in tune_steps(study)]
    assert keys[:6] == [f"tune-r{i}-lr{lr}-s0" for lr in (0.001, 0.002, 0.004) for i in (1, 2)]
    assert len(keys) == 12 and len(plan(study)) > 0


def test_a_study_file_with_a_tune_table_runs_the_check_for_real(tmp_path, corpus):
    """Three real 20-step runs of one model at three rates, one seed: the check reads their logs, and the best
    (the largest rate: 1e-7 and 1e-5 learn little in 20 steps) sits at the grid's edge, which it refuses."""
    (tmp_path / "study.toml").write_text(
        f"""name = "t"
checkpoints_dir = "{tmp_path / "ck"}"
logs_dir = "{tmp_path / "logs"}"
results_dir = "{tmp_path / "res"}"
[tune]
lr = [1e-7, 1e-5, 1e-2]
seeds = 1
tail = 0.5
[[runs]]
runner = "tiny"
name = "m"
args = {q([*tiny_run(corpus), "--log-interval", "1", "--max-steps", "20", "--warmup-steps", "2"])}
"""
    )
    s = load_study(tmp_path / "study.toml")
    for step in tune_steps(s):
        steps_mod.complete_step(s, step)
    from runners.study_tune import choose

    with pytest.raises(ValueError, match=r"\(m: best 0.01, add 0.02\)"):
        choose(s)
    means = [r["mean"] for r in json.loads((s.out / "tune.json").read_text())["runs"]["m"]["rates"]]
    assert means[0] > means[2] + 0.2  # 20 steps at 1e-2 lower the loss by far more than at 1e-7


def test_status_shows_the_checks_losses_so_far_and_runs_nothing(study, monkeypatch):
    from runners.study import study_status

    before = study_status(study)
    assert "0 of 12 trainings finished" in before and "| r1 | 0.001 | - | - | - |" in before
    assert "wait for the rate check" in before
    calls = []
    monkeypatch.setattr(steps_mod, "_python", fake_training(calls))
    with pytest.raises(ValueError, match="edge of its grid"):
        run_study(study, progress=False)
    trained = len(calls)
    after = study_status(study)
    assert "12 of 12 trainings finished" in after and trained == 12 == len(calls)  # status trained nothing
    assert "| r1 | 0.002 | 3.0000 | 3.0100 | 3.0050 |" in after  # fake_loss at r1's best rate, seeds 0 and 1
    # the rates chosen, the main steps are counted as the study counts them: the check's runs at the chosen rates
    # are the main runs' seeds 0 and 1 (2 runs x 2 seeds), finished already
    assert "study 's': 4 of 15 steps finished" in after


def test_the_rule_for_leaving_a_model_out_stops_the_study_only_when_asked_and_only_beyond_detection(study, monkeypatch):
    """r2 has a gate, r1 is the plain model of its depth: r2 worse by 0.5 nats on both seeds is beyond what two
    seeds could miss, so with [tune] leave_out the study stops before the main runs naming it; worse on one seed
    and better on the other is within the check's noise: kept. Without leave_out nothing stops."""
    monkeypatch.setattr(study_mod, "build_outputs", lambda s: s.out / "report.md")
    monkeypatch.setattr(study_mod, "plan", lambda s: [st for st in plan(s) if isinstance(st, TrainStep)])
    study.runs[1].lr_grid = [2e-3, 4e-3, 8e-3]  # r2's best (4e-3) inside its grid
    study.tune.leave_out = True
    calls = []
    monkeypatch.setattr(steps_mod, "_python", fake_training(calls, offsets={"r2": [0.5, 0.5, 0.5]}, richer={"r2"}))
    with pytest.raises(ValueError, match=r"leaves out 1 run\(s\) \(r2: \+0.5000 against r1, detectable 0.0000"):
        run_study(study, progress=False)
    assert not any(c.endswith("-s2") for c in calls)  # no main run trained
    study.tune.leave_out = False  # the rule not asked for: the main runs go on
    run_study(study, progress=False)
    assert "r2-lr0.004-s2" in calls

    for folder in (study.out, study.logs_dir, study.checkpoints_dir):  # again, r2 worse on one seed only
        shutil.rmtree(folder, ignore_errors=True)
    study.tune.leave_out, calls[:] = True, []
    monkeypatch.setattr(steps_mod, "_python", fake_training(calls, offsets={"r2": [0.5, -0.3, 0.0]}, richer={"r2"}))
    run_study(study, progress=False)
    assert "r2-lr0.004-s2" in calls

    for folder in (study.out, study.logs_dir, study.checkpoints_dir):  # both richer: no plain run to judge r2 by
        shutil.rmtree(folder, ignore_errors=True)
    calls[:] = []
    monkeypatch.setattr(steps_mod, "_python", fake_training(calls, offsets={"r2": [0.0] * 3}, richer={"r1", "r2"}))
    with pytest.raises(ValueError, match=r"leave_out judges a richer run .* 'r1', 'r2' has none; add a plain run"):
        run_study(study, progress=False)
    assert not any(c.endswith("-s2") for c in calls)
