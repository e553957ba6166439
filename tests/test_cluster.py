"""Studies as cluster jobs (runners/cluster.py) through submitit, its local executor standing in for Slurm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runners.cluster import KINDS, Resources, resources_of
from runners.study_file import load_study
from runners.study_steps import plan
from tests.study_files import QUALITY, q, tiny_run

REPO = Path(__file__).resolve().parents[1]


def small_study(tmp_path: Path, corpus, extra_run_args=(), cluster: str = "") -> Path:
    quality = QUALITY
    toml = tmp_path / "small.toml"
    toml.write_text(
        f"""name = "small"
seeds = 2
checkpoints_dir = "{tmp_path / "ck"}"
logs_dir = "{tmp_path / "logs"}"
results_dir = "{tmp_path / "res"}"
[[runs]]
runner = "tiny"
name = "base1"
args = {q(["--no-head-layer", "--n-layers", "1", *tiny_run(corpus, interval=4), *extra_run_args])}
[eval]
quality = {q(quality)}
{cluster}
"""
    )
    return toml


def test_cluster_tables_are_checked_and_become_submitit_parameters(tmp_path, corpus):
    from common.cli import from_table

    r = resources_of({"default": {"partition": "gpu"}, "train": {"gpus_per_node": 1}}, "x.toml", from_table)
    assert set(r) == set(KINDS)
    assert r["train"].parameters() | {} == {
        "gpus_per_node": 1,
        "cpus_per_task": 4,
        "timeout_min": 240,
        "tasks_per_node": 1,
        "nodes": 1,
        "slurm_partition": "gpu",
    }
    assert r["quality"].gpus_per_node == 0 and r["quality"].partition == "gpu"  # the default applies
    for table, message in (
        ({"trian": {}}, "unknown \\[cluster\\] kind"),
        ({"train": {"gpu": 1}}, "unknown key"),
        ({"train": {"gpus_per_node": -1}}, "gpus_per_node = -1"),
        ({"train": {"timeout_min": "2h"}}, "timeout_min"),
        ({"train": 3}, "must be a table"),
    ):
        with pytest.raises(ValueError, match=message):
            resources_of(table, "x.toml", from_table)
    toml = small_study(tmp_path, corpus, cluster="[cluster.train]\ngpus_per_node = 2\ntimeout_min = 30")
    s = load_study(toml)
    assert s.cluster["train"] == Resources(gpus_per_node=2, timeout_min=30)


def _study(toml: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "runners.study", str(toml), "--executor", "submitit-local"]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # noqa: SIM115
    )


@pytest.mark.slow
def test_a_study_killed_while_its_jobs_run_resumes_without_running_finished_steps_again(tmp_path, corpus, sandbox):
    toml = small_study(tmp_path, corpus)
    out = tmp_path / "res" / "small"
    first = _study(toml, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 240
        while len(list((out / "jobs" / "records").glob("quality-*.json"))) < 2:  # both evaluation jobs submitted
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no evaluation job was submitted"
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGKILL)  # the study, not its jobs: they run on, as on a cluster
        first.wait()
        assert not list((out / "steps").glob("quality-*.json"))  # killed while its jobs ran
        done_before = {p.name: p.read_text() for p in (out / "steps").glob("*.json")}
        records = {p.stem: json.loads(p.read_text()) for p in (out / "jobs" / "records").glob("*.json")}
        assert records and all(r["executor"] == "submitit-local" for r in records.values())
        again = _study(toml, tmp_path / "again.log")
        assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-3000:]
        said = (tmp_path / "again.log").read_text()
        assert said.count("from an earlier start still runs; waiting for it") == 2  # not submitted twice
    finally:
        for p in (first,):
            try:
                os.killpg(p.pid, signal.SIGKILL)  # anything of the first start still running
            except ProcessLookupError:
                pass
    markers = {p.name: p.read_text() for p in (out / "steps").glob("*.json")}
    assert len(markers) == len(plan(load_study(toml)))
    assert all(markers[name] == text for name, text in done_before.items())  # finished steps kept, not redone
    assert set(done_before) == {"train-base1-s0.json", "train-base1-s1.json"}
    for name in markers:
        log = (out / "logs" / name.replace(".json", ".log")).read_text()
        assert log.count(" -m ") == 1, name  # every command ran once, across the two starts (its interpreter named)
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_a_failed_job_names_its_logs(tmp_path, corpus):
    from runners.study import run_study
    from runners.study_steps import StepFailed

    (tmp_path / "empty").mkdir()  # a corpus with no documents: the training fails when it runs, not before
    toml = small_study(tmp_path, corpus, extra_run_args=["--corpus", str(tmp_path / "empty")])
    with pytest.raises(StepFailed) as e:
        run_study(load_study(toml), progress=False, executor="submitit-local")
    line = str(e.value)
    assert "step train-base1-s" in line and "submitit-local job" in line and "more failed" in line
    assert "no documents" in line or "empty" in line, line  # the step's own reason, from its log
    log = Path(line.split("step log: ")[1].split(",")[0])
    job_log = Path(line.split("job log: ")[1].split(" (")[0])
    assert f"$ {sys.executable} -m runners.tiny" in log.read_text() and job_log.is_file()
    assert not list((tmp_path / "res" / "small" / "steps").glob("*.json"))  # no marker for a failed step


@pytest.mark.parametrize("damage", ['{"job_id": "12', "{}", "[1, 2]"])
def test_a_damaged_job_record_is_one_line_naming_it(tmp_path, damage):
    from runners.cluster import _read_record

    path = tmp_path / "train-r1.json"
    path.write_text(damage)
    with pytest.raises(ValueError, match=r"job record .*train-r1.json is damaged.*delete the record"):
        _read_record(path)
    assert _read_record(tmp_path / "absent.json") is None
