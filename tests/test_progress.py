"""Progress on a terminal is tqdm's bar; in a log file it is plain lines, never a carriage return."""

import io
import subprocess
import sys
from pathlib import Path

import common.progress as progress
from common.progress import Progress

REPO = Path(__file__).resolve().parents[1]


def test_a_log_file_gets_a_line_per_tenth_of_the_work_and_the_last_state(monkeypatch):
    clock = iter(range(0, 100_000))  # 0.01 s per reading: 30 s never pass between two tenths of the work
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock) / 100)
    log = io.StringIO()
    with Progress(total=200, desc="work", file=log) as bar:
        for i in range(200):
            bar.update(1)
            bar.set_postfix(loss=i)  # tqdm would redraw at once; a log file waits for the next line due
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 12  # 0%, 10% ... 100%, and the end with its last postfix
    assert lines[-1].startswith("work: 100%") and "200/200" in lines[-1] and "loss=199" in lines[-1]


def test_a_log_file_also_gets_a_line_every_30_seconds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    bar = Progress(total=1000, desc="slow", file=log)
    for _ in range(5):  # 5 updates, 40 s apart, all inside the first tenth
        now[0] += 40
        bar.update(1)
    bar.close()
    assert len(log.getvalue().splitlines()) == 1 + 5 + 0  # the start, one per 40 s, nothing new at close


def test_a_training_run_logged_to_a_file_writes_no_carriage_return(tmp_path, corpus):
    from tests.study_files import tiny_run

    log = tmp_path / "train.log"
    args = [*tiny_run(corpus), "--out-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "logs")]
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "runners.tiny", *args], cwd=REPO, stderr=f, stdout=f, check=True)
    text = log.read_text()
    assert "\r" not in text and "tiny: 100%" in text and "4/4" in text


def test_a_log_line_is_never_cut_and_work_done_before_does_not_inflate_the_rate():
    log = io.StringIO()
    with Progress(total=100, initial=90, desc="study", file=log) as bar:
        bar.set_postfix_str("train-a-very-long-step-name: " + "x" * 150)
        bar.update(1)
    last = log.getvalue().splitlines()[-1]
    assert last.endswith("x" * 150 + "]")  # the whole postfix, however long
    assert "91/100" in last
