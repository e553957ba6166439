"""What an unlucky or hostile user does to a run, and what must happen: a one-line error naming the problem
and the fix, nothing already written lost, nothing outside the run's own folders touched. The README's
fault table lists these cases."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llama.model_io as model_io
import training.checkpoint as ckpt_mod
import training.trainer as trainer_mod
from common.cli import apply_overrides, run_main
from llama.model_io import list_checkpoints, load_model
from training.checkpoint import prune_checkpoints
from training.config import DataConfig, TrainConfig
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, fn, *args) -> str:
    """Run ``fn`` as a command does (through run_main): it must exit 2 with one line on stderr."""
    with pytest.raises(SystemExit) as e:
        run_main(fn, *args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err, err
    errors = [seg for seg in err.replace("\r", "\n").splitlines() if seg.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # progress bars may come before it
    return errors[0]


# ---- run names and what an overwrite may delete ------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "/abs", " "])
def test_run_names_must_be_plain(name):
    with pytest.raises(ValueError, match="run name"):
        TrainConfig(name=name)
    with pytest.raises(ValueError, match="run name"):
        apply_overrides(TrainConfig(), ["--name", name])


def test_overwrite_deletes_only_the_runs_own_folders(tmp_path, make_config):
    root = tmp_path / "work"
    train(make_config(root, name="keep", max_steps=2))
    sibling = root / "precious.txt"
    sibling.write_text("x")
    for name in ("", ".."):
        cfg = make_config(root, max_steps=2)
        cfg.overwrite = True
        cfg.name = name  # set after construction, as a buggy caller might: the trainer checks again
        with pytest.raises(ValueError, match="run name"):
            train(cfg)
    assert sibling.read_text() == "x" and list_checkpoints(root / "ckpt/keep")


@pytest.mark.parametrize("name", ["..", "", "a/../../b"])
def test_a_study_file_with_a_bad_run_name_is_refused_before_anything_runs(tmp_path, name):
    from runners.study import load_study

    study = tmp_path / "s.toml"
    study.write_text(f'name = "s"\n[[runs]]\nrunner = "tiny"\nname = "{name}"\nargs = []\n')
    with pytest.raises(ValueError, match="run name"):
        load_study(study)


# ---- resuming a finished run, pruning, leftovers ----------------------------------------------------------


def test_resuming_a_finished_run_reports_it_and_keeps_the_summary(tmp_path, make_config):
    first = train(make_config(tmp_path, max_steps=4))
    summary = tmp_path / "logs/t/summary.json"
    (summary).unlink()  # as after a kill between the last checkpoint and the summary
    again = train(make_config(tmp_path, max_steps=4, resume=True))
    saved = json.loads(summary.read_text())
    assert saved["final_val_loss"] == first["final_val_loss"] == again["final_val_loss"]
    assert saved["final_train_loss"] == first["final_train_loss"]
    train(make_config(tmp_path, max_steps=4, resume=True))  # and once more, with the summary present
    assert json.loads(summary.read_text())["final_val_loss"] == first["final_val_loss"]


def test_a_kill_during_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, make_config, monkeypatch):
    train(make_config(tmp_path, max_steps=4, keep_every=0, keep_last=4))
    run = tmp_path / "ckpt/t"
    real_rmtree = ckpt_mod.shutil.rmtree

    def killed_midway(path, *a, **k):
        (Path(path) / "model.safetensors").unlink()  # part of the folder is gone when the kill comes
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(run, keep_last=1, keep_every=0)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", real_rmtree)
    for _, folder in list_checkpoints(run):  # every checkpoint that looks valid is whole
        load_model(folder)
    # leftovers of interrupted saves and prunes are removed when the run is resumed
    (run / ".step_9.tmp4242").mkdir()
    train(make_config(tmp_path, max_steps=6, keep_every=0, keep_last=4, resume=True))
    assert [p.name for p in run.iterdir() if p.name.startswith(".step_")] == []


# ---- one run at a time -----------------------------------------------------------------------------------


def test_a_second_training_of_the_same_run_is_refused(tmp_path, make_config):
    cfg = make_config(tmp_path, max_steps=2)
    with trainer_mod.run_lock(cfg):
        with pytest.raises(FileExistsError, match="already being trained"):
            train(make_config(tmp_path, max_steps=2))
    assert not (tmp_path / "logs/t/metrics.jsonl").exists()
    train(make_config(tmp_path, max_steps=2))  # the lock went with its holder


def test_a_killed_study_takes_its_child_with_it(tmp_path):
    tag = f"study-child-{os.getpid()}-{time.time_ns()}"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from runners.study import _python; from pathlib import Path; "
            f"_python(['timeit', '-n', '1', 'import time; time.sleep(60)  # {tag}'], Path(sys.argv[1]))",
            str(tmp_path / "log"),
        ],
        cwd=REPO,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not set(_pids_with(tag)) - {parent.pid}:
        time.sleep(0.1)
    children = set(_pids_with(tag)) - {parent.pid}
    assert children, "the child never started"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _pids_with(tag):
        time.sleep(0.1)
    survivors = _pids_with(tag)
    for pid in survivors:  # the test's own orphans, by PID
        os.kill(pid, signal.SIGKILL)
    assert survivors == []


def _pids_with(tag: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if tag in (p / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(p.name))
            except OSError:
                pass
    return [pid for pid in out if pid != os.getpid()]


# ---- full disk, torn log lines ---------------------------------------------------------------------------


def test_a_full_disk_is_named_in_one_line(tmp_path, make_config, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(*a, **k):  # what safetensors raises when the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(model_io, "save_file", full)
    err = one_line_error(capsys, train, make_config(tmp_path, max_steps=2))
    assert "disk is full" in err and "--resume" in err
    assert not [p for p in (tmp_path / "ckpt/t").iterdir()]  # no partial checkpoint left


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_really_full_disk_is_named_in_one_line(tmp_path, make_config, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("no tmpfs mount allowed here")
    try:
        cfg = make_config(tmp_path, max_steps=4, ckpt_interval=2)
        cfg.out_dir = str(disk / "ckpt")
        err = one_line_error(capsys, train, cfg)
        assert "disk is full" in err
        assert all(p.name.startswith("step_") for p in (disk / "ckpt/t").iterdir())  # nothing torn, no leftovers
    finally:
        subprocess.run(["umount", str(disk)])


def test_resume_skips_and_names_a_torn_log_line(tmp_path, make_config, capsys):
    train(make_config(tmp_path, max_steps=4))
    metrics = tmp_path / "logs/t/metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "lo')  # what a full disk leaves behind
    train(make_config(tmp_path, max_steps=6, resume=True))
    assert "metrics.jsonl line 5" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---- damaged files: one line, never a traceback ----------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        ("state.json", b"{}"),
        ("state.json", b"not json"),
        ("optimizer.pt", b"garbage" * 10),
        ("rng.pt", None),  # truncated
        ("model.safetensors", "flip"),  # one flipped byte in the weights
    ],
)
def test_damaged_checkpoint_files_give_one_line(tmp_path, make_config, capsys, damage):
    train(make_config(tmp_path, max_steps=2))
    name, content = damage
    path = tmp_path / "ckpt/t/step_2" / name
    data = path.read_bytes()
    if content is None:
        path.write_bytes(data[: len(data) // 2])
    elif content == "flip":
        b = bytearray(data)
        b[-100] ^= 0x01  # inside the tensor data, so the file still parses
        path.write_bytes(bytes(b))
    else:
        path.write_bytes(content)
    err = one_line_error(capsys, train, make_config(tmp_path, max_steps=4, resume=True))
    assert name in err


def test_garbage_tokenizer_gives_one_line(trained_checkpoint, tmp_path, capsys):
    import shutil

    from eval.perplexity import main as perplexity_main

    folder = tmp_path / "m"
    shutil.copytree(trained_checkpoint / "step_30", folder)
    (folder / "tokenizer.model").write_bytes(b"\x00garbage" * 50)
    err = one_line_error(capsys, perplexity_main, [str(folder), "--max-tokens", "200"])
    assert "tokenizer.model" in err


def test_a_corpus_of_nul_bytes_gives_one_line(tmp_path, capsys):
    from training.data import main as data_main

    for i in range(3):
        (tmp_path / f"f{i}.py").write_bytes(b"\x00" * 1000)
    err = one_line_error(capsys, data_main, ["--corpus", str(tmp_path), "--cache-dir", str(tmp_path / "c")])
    assert "no UTF-8 text" in err or "binary" in err


@pytest.mark.parametrize(
    "override, message",
    [
        (["--max-tokens", "-100"], "max_tokens"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--keep-every", "-1"], "keep_every"),
        (["--grad-clip", "-1"], "grad_clip"),
        (["--weight-decay", "-0.1"], "weight_decay"),
        (["--lr", "nan"], "lr"),
        (["--device", "tpu"], "device"),
    ],
)
def test_absurd_values_are_rejected(override, message, capsys):
    err = one_line_error(capsys, apply_overrides, TrainConfig(), override)
    assert message in err


def test_runner_help_lists_the_keys():
    out = subprocess.run(
        [sys.executable, "-m", "runners.tiny", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--max-steps" in out.stdout and "--lr" in out.stdout and "--vocab-size" in out.stdout


def test_checkpoint_checksums_are_recorded_and_checked(tmp_path):
    from llama.model import ModelArgs, Transformer
    from llama.model_io import save_model

    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16))
    folder = save_model(model, tmp_path / "m")
    assert "model.safetensors" in json.loads((folder / "checksums.json").read_text())
    torch.testing.assert_close(load_model(folder).tok_embeddings.weight, model.tok_embeddings.weight)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0x10
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_model(folder)


def test_data_config_rejects_bad_corpus_settings():
    with pytest.raises(ValueError, match="tokenizer_max_chars"):
        DataConfig(tokenizer_max_chars=0)


def test_a_malicious_pickle_in_a_checkpoint_is_never_executed(tmp_path, make_config, capsys):
    import pickle

    train(make_config(tmp_path, max_steps=2))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "ckpt/t/step_2/optimizer.pt").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "ckpt/t/step_2/checksums.json").unlink()  # as if crafted to pass the checksum too
    err = one_line_error(capsys, train, make_config(tmp_path, max_steps=4, resume=True))
    assert "optimizer.pt" in err and not marker.exists()
