"""What an unlucky or hostile user does to a run, and what must happen: a one-line error naming the problem
and the fix, nothing already written lost, nothing outside the run's own folders touched. The README's
fault table lists these cases."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llama.model_io as model_io
import training.checkpoint as ckpt_mod
from common.cli import apply_overrides, run_main
from data.config import DataConfig
from llama.model_io import list_checkpoints, load_model
from training.checkpoint import prune_checkpoints
from training.config import TrainConfig
from training.run_files import run_lock
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
    from runners.study_file import load_study

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
    assert saved["final_val_loss"] == first.final_val_loss == again.final_val_loss
    assert saved["final_train_loss"] == first.final_train_loss
    train(make_config(tmp_path, max_steps=4, resume=True))  # and once more, with the summary present
    assert json.loads(summary.read_text())["final_val_loss"] == first.final_val_loss


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
    with run_lock(cfg):
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
            "import sys; from runners.study_steps import _python; from pathlib import Path; "
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
    from data.prepare import main as data_main

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


# ---- outputs of the newer commands: never delete what they did not write (issue: compression --out) -------


def _compress_argv(checkpoint, out, *extra):
    return ["--checkpoint", str(checkpoint), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), *extra]


@pytest.mark.parametrize("target", ["notes", "checkpoints"])
def test_compress_never_replaces_a_folder_it_did_not_write(trained_checkpoint, tmp_path, capsys, target):
    from compress.__main__ import main as compress_main

    folder = tmp_path / target
    folder.mkdir()
    if target == "notes":
        (folder / "thesis.txt").write_text("three years of work")
    else:  # a checkpoints/ folder holding a run
        import shutil

        shutil.copytree(trained_checkpoint, folder / "t")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    err = one_line_error(capsys, compress_main, _compress_argv(trained_checkpoint, folder))
    assert "did not write" in err and str(folder) in err
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    # a file as --out is refused too, and kept
    note = tmp_path / "note.txt"
    note.write_text("keep")
    err = one_line_error(capsys, compress_main, _compress_argv(trained_checkpoint, note))
    assert "not a folder" in err and note.read_text() == "keep"


def test_compress_replaces_its_own_earlier_output_only_with_overwrite(trained_checkpoint, tmp_path, capsys):
    """One rule with training: an earlier output is never replaced silently; --overwrite replaces it whole."""
    from compress.__main__ import main as compress_main

    out = tmp_path / "m50"
    compress_main(_compress_argv(trained_checkpoint, out))
    (out / "leftover").write_text("from the first run")
    err = one_line_error(capsys, compress_main, _compress_argv(trained_checkpoint, out))
    assert "pass --overwrite" in err and (out / "leftover").is_file()
    compress_main([*_compress_argv(trained_checkpoint, out), "--overwrite"])  # its own folder: replaced whole
    assert not (out / "leftover").exists() and (out / "compression.json").is_file()


def test_a_study_cannot_point_a_compression_elsewhere(tmp_path):
    from runners.study_file import load_study

    study = tmp_path / "s.toml"
    body = 'name = "s"\n[[runs]]\nrunner = "tiny"\nname = "r"\n[[compress]]\nbase = "r"\nname = "c"\nargs = [{}]\n'
    for args in ('"--method", "magnitude", "--out", "/home"', '"--method", "magnitude", "--checkpoint=x"'):
        study.write_text(body.format(args))
        with pytest.raises(ValueError, match="is set by the study itself"):
            load_study(study)


def test_convert_never_replaces_a_folder_it_did_not_write(hf_llama, tmp_path, capsys):
    from llama.convert import main as convert_main

    imported = tmp_path / "imported"
    convert_main(["import", str(hf_llama), str(imported)])
    err = one_line_error(capsys, convert_main, ["import", str(hf_llama), str(imported)])
    assert "pass --overwrite" in err  # its own output: replaced only when asked
    convert_main(["import", str(hf_llama), str(imported), "--overwrite"])
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    for argv in (["import", str(hf_llama), str(folder)], ["export", str(imported), str(folder)]):
        err = one_line_error(capsys, convert_main, argv)
        assert "did not write" in err and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_an_evaluator_never_overwrites_a_file_that_is_not_its_result(trained_checkpoint, tmp_path, capsys):
    from eval.perplexity import main as perplexity_main

    notes = tmp_path / "notes.txt"
    notes.write_text("not a result")
    err = one_line_error(capsys, perplexity_main, [str(trained_checkpoint), "--max-tokens", "200", "--out", str(notes)])
    assert "is not a result an evaluator wrote" in err and notes.read_text() == "not a result"
    result = tmp_path / "r.json"
    perplexity_main([str(trained_checkpoint), "--max-tokens", "200", "--out", str(result)])
    perplexity_main([str(trained_checkpoint), "--max-tokens", "200", "--out", str(result)])  # its own: replaced
    mine = json.loads(result.read_text())
    assert mine["evaluator"] == "perplexity"
    # a training run's summary, another evaluator's result, another model's result: kept, one line each
    other_model = tmp_path / "other-model"
    shutil.copytree(trained_checkpoint / "step_30", other_model)
    for name, content, argv, message in (
        ("summary.json", {"git_commit": "abc", "torch_version": "2", "final_val_loss": 4.0}, [], "is not a result"),
        ("quality.json", mine | {"evaluator": "quality"}, [], "holds a 'quality' result, not a 'perplexity' one"),
        ("theirs.json", mine, ["--checkpoint-override"], "holds the result of another model"),
    ):
        path = tmp_path / name
        path.write_text(json.dumps(content))
        model = str(other_model) if argv else str(trained_checkpoint)
        err = one_line_error(capsys, perplexity_main, [model, "--max-tokens", "200", "--out", str(path)])
        assert message in err and json.loads(path.read_text()) == content, err


# ---- one run at a time, whatever folders it shares --------------------------------------------------------


def test_two_runs_of_one_name_sharing_a_log_folder_cannot_run_at_once(tmp_path, make_config):
    first = make_config(tmp_path, max_steps=2)
    second = make_config(tmp_path, max_steps=2, overwrite=True)
    second.out_dir = str(tmp_path / "elsewhere")  # another checkpoint folder, the same logs/<name>
    with run_lock(first):
        (tmp_path / "logs" / "t").mkdir(parents=True)
        (tmp_path / "logs" / "t" / "metrics.jsonl").write_text('{"step": 1}\n')
        with pytest.raises(FileExistsError, match="already being trained"):
            train(second)
        assert (tmp_path / "logs" / "t" / "metrics.jsonl").read_text() == '{"step": 1}\n'  # not deleted


# ---- Hugging Face folders: no foreign code, no silent random weights, one line for a damaged folder --------


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from tests.hf_models import make_hf_model

    return make_hf_model("llama", tmp_path_factory.mktemp("hf") / "llama")


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


def test_code_in_a_model_folder_is_never_run(hf_llama, tmp_path):
    folder = _copy(hf_llama, tmp_path / "remote")
    marker = tmp_path / "pwned"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTok(PreTrainedTokenizerFast):\n    pass\n"
    )
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg |= {"auto_map": {"AutoTokenizer": ["evil.EvilTok", None]}, "tokenizer_class": "EvilTok"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    # what once ran it: transformers asked "run the custom code? [y/N]" and read y from stdin
    out = subprocess.run(
        [sys.executable, "-m", "eval.perplexity", str(folder), "--corpus", str(REPO / "common"), "--max-tokens", "50"],
        cwd=REPO,
        input="y\ny\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not marker.exists()
    assert out.returncode == 2 and "never runs a model folder's code" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("damage", ["missing-tensor", "more-blocks", "extra-tensor"])
def test_missing_or_unexpected_weights_are_named(hf_llama, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from models.hf import load_hf

    folder = _copy(hf_llama, tmp_path / damage)
    sd = load_file(folder / "model.safetensors")
    if damage == "missing-tensor":
        del sd["model.layers.1.mlp.down_proj.weight"]
    elif damage == "extra-tensor":
        sd["model.layers.1.mlp.extra.weight"] = torch.zeros(3)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    if damage == "more-blocks":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 5}))
    with pytest.raises(ValueError) as e:
        load_hf(folder)
    message = str(e.value)
    expected = {
        "missing-tensor": "missing model.layers.1.mlp.down_proj.weight",
        "extra-tensor": "unexpected model.layers.1.mlp.extra.weight",
        "more-blocks": "says 5 blocks, but the weights hold 3",
    }[damage]
    assert expected in message and "\n" not in message


@pytest.mark.parametrize(
    "damage", ["truncated", "empty", "garbage", "symlink-to-dev-zero", "symlink-to-folder", "pickle-only"]
)
def test_a_damaged_weight_file_is_one_line(hf_llama, tmp_path, capsys, damage):
    from eval.perplexity import main as perplexity_main

    folder = _copy(hf_llama, tmp_path / damage)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) - 1000])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "garbage":
        weights.write_bytes(os.urandom(4000))
    elif damage == "symlink-to-dev-zero":
        weights.unlink()
        weights.symlink_to("/dev/zero")
    elif damage == "symlink-to-folder":
        weights.unlink()
        weights.symlink_to(tmp_path)
    else:  # a pickle that would run a command when unpickled, and no safetensors
        import pickle

        marker = tmp_path / "pwned"

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    err = one_line_error(capsys, perplexity_main, [str(folder), "--corpus", str(REPO / "common"), "--max-tokens", "50"])
    assert ("safetensors" in err or "model.safetensors" in err) and str(folder) in err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "change, key",
    [
        ({"vocab_size": "400"}, "vocab_size"),
        ({"num_hidden_layers": 10**6}, "blocks"),
        ({"hidden_size": -64}, "hidden_size"),
    ],
)
def test_absurd_hf_configs_are_one_line_before_anything_is_allocated(hf_llama, tmp_path, capsys, change, key):
    from eval.perplexity import main as perplexity_main

    folder = _copy(hf_llama, tmp_path / "cfg")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | change))
    t0 = time.perf_counter()
    err = one_line_error(capsys, perplexity_main, [str(folder), "--corpus", str(REPO / "common"), "--max-tokens", "50"])
    assert key in err and time.perf_counter() - t0 < 60  # the 10**6-block config once ran for minutes


def test_weights_larger_than_memory_are_refused_before_loading(hf_llama, monkeypatch):
    import models.hf as hf_mod

    monkeypatch.setattr(hf_mod, "available_memory", lambda: 1000)
    with pytest.raises(ValueError, match="GiB of memory is available"):
        hf_mod.load_hf(hf_llama)


# ---- study files: every key, type, name and reference checked when the file is loaded ----------------------

STUDY = """name = "s"
[[runs]]
runner = "tiny"
name = "r"
args = ["--max-steps", "4"]
[[compress]]
base = "r"
name = "c"
args = ["--method", "magnitude"]
"""


@pytest.mark.parametrize(
    "edit, message",
    [
        (('name = "s"', 'name = "../../../../tmp/x"'), "run name"),
        (('name = "s"', 'name = ""'), "run name"),
        (('args = ["--max-steps", "4"]', 'arg = ["--max-steps", "4"]'), "unknown key(s) ['arg']"),
        (('args = ["--max-steps", "4"]', 'args = "--max-steps 4"'), "is not a list of strings"),
        (('args = ["--max-steps", "4"]', 'args = ["--max-stepz", "4"]'), "unknown config key --max-stepz"),
        (('args = ["--max-steps", "4"]', 'args = ["--max-steps", "4", "--name", "x"]'), "--name is set by the study"),
        (('name = "s"', 'name = "s"\nseeds = true'), "seeds = True is not a whole number"),
        (('name = "s"', 'name = "s"\nworkers = [1]'), "workers = [1] is not a whole number"),
        (('name = "s"', 'name = "s"\n[eval]\nqualty = ["--n-docs", "2"]'), "unknown key(s) ['qualty']"),
        (('name = "s"', 'name = "s"\n[eval]\nquality = ["--n-dox", "2"]'), "unknown config key --n-dox"),
        (('args = ["--method", "magnitude"]', 'args = ["--method", "magnitude"]\nsparsity = 0.9'), "['sparsity']"),
        (
            ('args = ["--method", "magnitude"]', 'args = ["--method", "magnitude", "--sparsity", "lots"]'),
            "expects float",
        ),
        (('base = "r"', 'base = "nope"'), "base 'nope' is none of the runs"),
        (('runner = "tiny"', 'runner = "nope"'), "no runner 'nope'"),
        (('runner = "tiny"', 'runner = "../tiny"'), "no runner '../tiny'"),
        (('runner = "tiny"\n', ""), "missing runner"),
        (
            ('[[runs]]\nrunner = "tiny"\nname = "r"\nargs = ["--max-steps", "4"]\n', "runs = [1, 2]\n"),
            "must be [[runs]] tables",
        ),
        (('name = "s"', 'name = "s"\n[[external]]\nname = "e"\npath = "/etc"'), "/etc is not a model folder"),
        (('name = "s"', 'name = "s\n'), "not a TOML file"),
        (
            ('name = "s"', 'name = "s"\n[eval]\nover_training = ["--max-tokens", "9"]'),
            "--max-tokens is set by the study",
        ),
    ],
)
def test_a_bad_study_file_is_one_line_before_anything_runs(tmp_path, capsys, edit, message):
    from runners.study import main as study_main

    old, new = edit
    assert old in STUDY
    path = tmp_path / "s.toml"
    path.write_text(STUDY.replace(old, new, 1))
    err = one_line_error(capsys, study_main, [str(path)])
    assert message in err, err
    assert not (tmp_path / "results").exists() and not (REPO / "results" / "s").exists()


def test_a_failing_study_step_is_one_line_naming_its_log(tmp_path, capsys, monkeypatch):
    import runners.study as study_mod
    import runners.study_steps as steps_mod

    path = tmp_path / "s.toml"
    folders = f'checkpoints_dir = "{tmp_path}/ck"\nlogs_dir = "{tmp_path}/logs"\nresults_dir = "{tmp_path}/res"\n'
    path.write_text(folders + STUDY)

    def failing_train(s, step, log, *rest):  # the step's command itself fails (a RuntimeError inside it)
        steps_mod._python(["runpy", "--nonexistent"], log)

    monkeypatch.setattr(steps_mod, "run_step", failing_train)
    err = one_line_error(capsys, study_mod.main, [str(path)])
    assert "failed (exit" in err and "train-r.log" in err


# ---- lm-evaluation-harness: bad tasks, paths, data and model arguments are one line ----------------------


def test_harness_tasks_paths_and_data_are_checked_in_one_line(hf_llama, tmp_path, capsys):
    from eval.harness import check_tasks, load_task, task_manager
    from eval.harness import main as harness_main

    err = one_line_error(capsys, harness_main, [str(hf_llama), "--tasks", "x", "--include-path", "/nonexistent"])
    assert "--include-path /nonexistent is not a folder" in err
    (tmp_path / "passwd.yaml").write_text(
        "task: not_data\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /etc/passwd\ntest_split: test\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n"
    )
    manager = task_manager(["not_data"], str(tmp_path))
    err = one_line_error(capsys, load_task, "not_data", manager)
    assert "task 'not_data': its data does not load" in err
    err = one_line_error(capsys, check_tasks, manager, ["no_such_task"])
    assert "unknown task(s) ['no_such_task']" in err


def test_lm_eval_model_args_are_checked(hf_llama, tmp_path, capsys, monkeypatch):
    from lm_eval.__main__ import cli_evaluate

    from eval.lm_eval_model import ProjectLM

    err = one_line_error(capsys, lambda: ProjectLM(str(hf_llama), device="cpu", bogus="1"))
    assert "unknown --model_args key(s) ['bogus']" in err
    (tmp_path / "t.yaml").write_text(
        "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /etc/passwd\ntest_split: test\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n"
    )
    argv = ["lm_eval", "run", "--model", "perhead-llama", "--model_args", "checkpoint=/nonexistent"]
    monkeypatch.setattr(sys, "argv", argv + ["--tasks", "t", "--include_path", str(tmp_path), "--device", "cpu"])
    err = one_line_error(capsys, cli_evaluate)  # eval.lm_eval_cli runs lm-eval's command line through run_main
    assert "checkpoint /nonexistent does not exist" in err
