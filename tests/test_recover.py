"""Recovery after compression (compress/recover.py): LoRA and distillation through the trainer, for this
project's checkpoints and Hugging Face folders."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from compress.__main__ import main as compress_main
from compress.recover import Recovery, distillation_loss, merged, recover, with_lora
from llama.model_io import load_model
from models.families import FAMILIES
from models.folders import load_folder
from tests.hf_models import ARCHITECTURES

STRUCT = ["--method", "structured", "--head-ratio", "0.5", "--ffn-ratio", "0.5", "--calib-samples", "8"]


def run(checkpoint, out: Path, *extra) -> dict:
    """compress + recovery; the compression.json of the output."""
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--log-dir", str(out.parent / "logs"), *extra]
    folder = compress_main(argv)
    return json.loads((folder / "compression.json").read_text())


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tests.hf_models import make_hf_model

    return make_hf_model("llama", tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A small local text corpus (the json package's sources)."""
    folder = tmp_path_factory.mktemp("corpus")
    for p in sorted(Path(json.__file__).parent.glob("*.py")):
        shutil.copy(p, folder / p.name)
    return folder


@pytest.mark.parametrize("method", ["lora", "distill"])
def test_recovery_lowers_the_heldout_loss_of_a_pruned_tiny_model(trained_checkpoint, tmp_path, method):
    drops = []
    for seed in (0, 1):
        rec = run(
            trained_checkpoint,
            tmp_path / f"{method}{seed}",
            *STRUCT,
            *("--recover", method, "--recover-steps", "40", "--recover-lr", "1e-2", "--seed", str(seed)),
        )["recovery"]
        assert rec["method"] == method and rec["tokens"] == 40 * 8 * 32 and rec["finite"]
        assert rec["trained_params"] > 0 and Path(rec["loss_curve"]).is_file()
        drops.append(rec["val_loss_before"] - rec["val_loss_after"])
    # both seeds: a pruned model of a 30-step run loses 0.3-0.6 nats here; recovery wins back well over 0.05
    # seeds 0 and 1 won back 0.09 / 0.06 nats (LoRA) and 0.28 / 0.32 (distillation) in 40 steps
    assert min(drops) > {"lora": 0.03, "distill": 0.1}[method], drops
    model = load_model(tmp_path / f"{method}0")  # a plain model folder of the pruned shape (LoRA merged)
    assert max(model.params.layer_n_heads) < 4 and not any("lora" in k for k in model.state_dict())


@pytest.mark.parametrize("method", ["lora", "distill"])
def test_recovery_lowers_the_heldout_loss_of_a_pruned_hugging_face_folder(hf_folder, text_folder, tmp_path, method):
    drops = []
    for seed in (0, 1):
        rec = run(
            hf_folder,
            tmp_path / f"{method}{seed}",
            *STRUCT,
            *("--calib-corpus", str(text_folder), "--calib-seq-len", "64", "--recover-seq-len", "64"),
            *("--recover", method, "--recover-steps", "12", "--recover-lr", "5e-3", "--seed", str(seed)),
        )["recovery"]
        assert rec["data"] == str(text_folder)
        drops.append(rec["val_loss_before"] - rec["val_loss_after"])
    assert min(drops) > 0.04, drops  # 0.08-0.09 nats with both seeds at 12 steps
    model, _, _ = load_folder(tmp_path / f"{method}0")  # the pruned shape, LoRA merged
    assert model.family == "llama" and not any("lora" in k for k in model.state_dict())
    assert model.hf.model.layers[0].mlp.up_proj.out_features < 128


@pytest.mark.parametrize("arch", ["perhead-llama", *ARCHITECTURES])
def test_a_merged_lora_model_gives_the_peft_models_outputs(trained_checkpoint, tmp_path, arch):
    from tests.hf_models import make_hf_model

    folder = trained_checkpoint if arch == "perhead-llama" else make_hf_model(arch, tmp_path / arch)
    x = torch.randint(0, 400, (2, 16))
    model = load_folder(folder)[0].eval()
    peft_model = with_lora(model, Recovery("lora", lora_rank=4, lora_dropout=0.0))
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == set(FAMILIES[arch].lora_targets)  # every default target exists in this architecture
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # peft starts B at zero: make the adapters matter
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(x)
        plain = merged(copy.deepcopy(peft_model))
        got = plain(x)
    assert not any("lora" in k for k in plain.state_dict())
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize(
    ("prune", "recover_with"),
    [(["--sparsity", "0.5"], "lora"), (["--sparsity", "0.2"], "full"), (["--pattern", "2:4"], "lora")],
)
def test_a_recovered_sparse_model_keeps_exactly_its_pruning_mask(trained_checkpoint, tmp_path, prune, recover_with):
    """At any sparsity (20% included, under the 25% a model needs to look sparse by its zeros alone) the saved
    model's zeros are exactly the pruning's, LoRA (trained inside the mask) and full training alike."""
    argv = ["--method", "magnitude", *prune]
    info = run(trained_checkpoint, tmp_path / "rec", *argv, "--recover", recover_with, "--recover-steps", "4")
    pruned = load_model(compress_main(["--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "p"), *argv]))
    tuned = load_model(tmp_path / "rec")
    assert info["recovery"]["sparse"] and info["recovery"]["mask"].startswith(
        "inside the LoRA" if recover_with == "lora" else "kept at zero"
    )
    masked, changed = 0, 0
    for (n, w_t), w_p in zip(tuned.named_parameters(), pruned.parameters(), strict=True):
        if w_t.dim() == 2:
            assert torch.equal(w_t == 0, w_p == 0), n
            masked += int((w_p == 0).sum())
        changed += not torch.equal(w_t, w_p)
    assert masked > 0 and changed > 0


def test_sparse_lora_saves_the_model_it_trained(trained_checkpoint, tmp_path):
    """Sparse LoRA trains mask * (W + s B A): the saved model's held-out loss is the trained model's (not a
    re-masked merge that loses most of the update), and both are below the pruned model's."""
    argv = ["--method", "magnitude", "--sparsity", "0.7", "--recover", "lora", "--recover-steps", "24"]
    rec = run(trained_checkpoint, tmp_path / "m70", *argv, "--recover-lr", "5e-3")["recovery"]
    summary = json.loads((Path(rec["loss_curve"]).parent / "summary.json").read_text())
    trained_gain = rec["val_loss_before"] - summary["final_val_loss"]
    saved_gain = rec["val_loss_before"] - rec["val_loss_after"]
    assert trained_gain > 0.02, trained_gain
    assert abs(saved_gain - trained_gain) < 0.05 * trained_gain + 1e-4, (saved_gain, trained_gain)


def test_val_loss_after_is_the_saved_models(trained_checkpoint, tmp_path):
    from compress.recover import heldout_loss
    from training.checkpoint import training_config, training_data

    argv = ["--method", "magnitude", "--sparsity", "0.6", "--recover", "lora", "--recover-steps", "4"]
    rec = run(trained_checkpoint, tmp_path / "s", *argv)["recovery"]
    cfg = training_config(trained_checkpoint / "step_30")
    cfg.batch_size, cfg.seed = 8, 0  # the recovery's batch and seed (its validation windows)
    saved = load_folder(tmp_path / "s", "cpu")[0]
    expected = heldout_loss(saved, training_data(trained_checkpoint)[0], cfg, torch.device("cpu"))
    assert rec["val_loss_after"] == pytest.approx(expected, abs=1e-5)


def test_distillation_trains_the_student_only():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20)).eval().requires_grad_(False)
    before = copy.deepcopy(teacher.state_dict())
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    x, y = torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (2, 5))
    kl_only = distillation_loss(teacher, 1.0, 2.0)(student, x, y)
    assert kl_only.abs() < 1e-6  # a student equal to its teacher: no divergence
    with torch.no_grad():
        student[1].weight.add_(0.5 * torch.randn_like(student[1].weight))
    loss = distillation_loss(teacher, 0.5, 2.0)(student, x, y)
    loss.backward()
    assert loss > 0 and student[1].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_a_killed_recovery_resumes_exactly(trained_checkpoint, tmp_path, monkeypatch):
    import training.trainer as T

    argv = [*STRUCT, "--recover", "lora", "--recover-steps", "8", "--lora-dropout", "0.1", "--recover-lr", "5e-3"]
    run(trained_checkpoint, tmp_path / "whole", *argv)
    real = T.train_step

    def dies_at_step_6(r, step):
        if step == 5:
            raise KeyboardInterrupt  # as Ctrl-C, after the checkpoint at step 4
        return real(r, step)

    monkeypatch.setattr(T, "train_step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(trained_checkpoint, tmp_path / "killed", *argv)
    assert not (tmp_path / "killed").exists()
    monkeypatch.setattr(T, "train_step", real)
    run(trained_checkpoint, tmp_path / "killed", *argv, "--resume")
    a, b = load_model(tmp_path / "whole").state_dict(), load_model(tmp_path / "killed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_recovery_settings_are_one_line_errors(trained_checkpoint, hf_folder, tmp_path):
    base = ["--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "o"), *STRUCT]
    for extra, message in (
        (["--recover", "lora", "--lora-rank", "0"], "--lora-rank must be at least 1"),
        (["--recover", "lora", "--lora-alpha", "-1"], "--lora-alpha must be positive"),
        (["--recover", "distill", "--distill-alpha", "1.5"], "--distill-alpha must be in"),
        (["--recover", "prune-more"], "use one of"),
        (["--recover", "lora", "--resume"], "no recovery run"),
        (["--resume"], "needs --recover"),
        (["--recover", "lora", "--lora-targets", "nothing_here"], "--lora-targets"),
        (["--recover", "lora", "--finetune-steps", "3"], "cannot go with --recover lora"),
    ):
        with pytest.raises(ValueError, match=message):
            compress_main([*base, *extra])
    with pytest.raises(ValueError, match="quantized weights are not trained here"):
        compress_main([*base[:4], "--method", "quantize", "--scheme", "int8-dynamic", "--recover", "lora"])
    assert not (tmp_path / "o").exists()


def test_a_teacher_of_another_vocabulary_is_refused(hf_folder, text_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.config import DataConfig
    from tests.hf_models import config
    from training.config import TrainConfig

    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(config("llama", 512)).save_pretrained(other)
    AutoTokenizer.from_pretrained(hf_folder).save_pretrained(other)
    cfg = TrainConfig(name="r", out_dir=str(tmp_path / "ck"), log_dir=str(tmp_path / "lg"), seq_len=32, device="cpu")
    with pytest.raises(ValueError, match="512-token vocabulary, the student 400"):
        recover(
            hf_folder,
            other,
            Recovery("distill", steps=2),
            cfg,
            DataConfig(corpus=str(text_folder)),
            torch.device("cpu"),
        )


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_stranger_run_at_the_recovery_folder_is_never_adopted(trained_checkpoint, make_config, tmp_path):
    """A training run that happens to sit at <out>-recover (or at its log folder) is refused in one line, with
    or without --resume, and nothing of it changes."""
    from training.trainer import train

    stranger = make_config(tmp_path, name="x-recover", out_dir=str(tmp_path), log_dir=str(tmp_path / "logs"))
    stranger.max_steps = 2
    train(stranger)
    (tmp_path / "logs" / "x-recover" / "NOTES.txt").write_text("mine")
    before = files_of(tmp_path / "x-recover") | {Path("logs") / k: v for k, v in files_of(tmp_path / "logs").items()}
    argv = ["--method", "magnitude", "--recover", "full", "--recover-steps", "2"]
    for extra in ([], ["--resume"]):
        with pytest.raises(ValueError, match="is not a recovery that compress started for"):
            run(trained_checkpoint, tmp_path / "x", *argv, *extra)
    # the logs alone: another --log-dir whose folder of that name is someone else's
    elsewhere = tmp_path / "other"
    shutil.copytree(tmp_path / "logs", elsewhere / "logs")
    with pytest.raises(ValueError, match="is not a recovery that compress started for"):
        compress_main(["--checkpoint", str(trained_checkpoint), "--out", str(elsewhere / "x"), *argv,
                       "--log-dir", str(elsewhere / "logs")])  # fmt: skip
    after = files_of(tmp_path / "x-recover") | {Path("logs") / k: v for k, v in files_of(tmp_path / "logs").items()}
    assert after == before and not (tmp_path / "x").exists() and not (elsewhere / "x").exists()
    assert (elsewhere / "logs" / "x-recover" / "NOTES.txt").read_text() == "mine"


def test_a_resume_with_other_settings_is_refused_and_a_resume_keeps_the_loss_before(
    trained_checkpoint, tmp_path, monkeypatch
):
    import training.trainer as T

    argv = ["--method", "magnitude", "--sparsity", "0.5", "--recover", "full", "--recover-steps", "8"]
    real = T.train_step

    def dies_at_step_6(r, step):
        if step == 5:
            raise KeyboardInterrupt
        return real(r, step)

    monkeypatch.setattr(T, "train_step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(trained_checkpoint, tmp_path / "k", *argv)
    monkeypatch.setattr(T, "train_step", real)
    kept = files_of(tmp_path / "k-recover")
    for change, named in (
        (["--sparsity", "0.7"], "sparsity 0.5 -> 0.7"),
        (["--method", "wanda"], "method 'magnitude' -> 'wanda'"),
        (["--recover", "distill"], "method 'full' -> 'distill'"),
        (["--recover-steps", "9"], "steps 8 -> 9"),
        (["--recover-seq-len", "16"], "seq_len None -> 16"),
    ):
        with pytest.raises(ValueError, match=f"had other settings.*{re.escape(named)}"):
            run(trained_checkpoint, tmp_path / "k", *argv, *change, "--resume")
    assert files_of(tmp_path / "k-recover") == kept and not (tmp_path / "k").exists()
    # resumed with another --log-dir: its loss curve would cover the resumed half only; refused before any work
    elsewhere = [
        "--checkpoint",
        str(trained_checkpoint),
        "--out",
        str(tmp_path / "k"),
        "--log-dir",
        str(tmp_path / "l2"),
    ]
    with pytest.raises(ValueError, match="logged to .*, not .*l2.*resume it with the --log-dir it was started with"):
        compress_main([*elsewhere, *argv, "--resume"])
    # its mark edited: the loss before training is not a number; refused before training the remaining steps
    mark_path = tmp_path / "k-recover" / "recovery-of.json"
    original = mark_path.read_text()
    mark = json.loads(original)
    for bad in ("abc", True, float("nan")):
        mark_path.write_text(json.dumps(mark | {"val_loss_before": bad}))
        with pytest.raises(ValueError, match="records val_loss_before = .*, not a number"):
            run(trained_checkpoint, tmp_path / "k", *argv, "--resume")
    mark_path.write_text(original)
    assert files_of(tmp_path / "k-recover") == kept
    resumed = run(trained_checkpoint, tmp_path / "k", *argv, "--resume")["recovery"]
    whole = run(trained_checkpoint, tmp_path / "w", *argv)["recovery"]
    assert resumed["val_loss_before"] == whole["val_loss_before"] is not None
    assert resumed["val_loss_after"] == pytest.approx(whole["val_loss_after"], abs=1e-6)


def test_calibration_and_recovery_windows_follow_a_short_context(hf_folder, text_folder, tmp_path):
    """Hugging Face folders of 128 positions: the default windows fit the context (GPT-2's once ended in an
    IndexError), and a length beyond it is one line before any work."""
    from tests.hf_models import make_hf_model

    gpt2 = make_hf_model("gpt2", tmp_path / "gpt2")
    corpus = ["--calib-corpus", str(text_folder), "--calib-samples", "4"]
    info = run(hf_folder, tmp_path / "w", "--method", "wanda", *corpus)
    assert info["calibration"]["windows"] == [4, 128]
    rec = run(gpt2, tmp_path / "g", "--method", "magnitude", *corpus, "--recover", "lora", "--recover-steps", "2")
    assert rec["recovery"]["tokens"] == 2 * 8 * 128 and rec["recovery"]["finite"]
    for option in ("--calib-seq-len", "--recover-seq-len"):
        with pytest.raises(ValueError, match=f"{option} 512 is over the model's context of 128 tokens"):
            run(gpt2, tmp_path / "x", "--method", "wanda", *corpus, "--recover", "lora", option, "512")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x-recover").exists()


def test_a_recovery_record_is_typed_and_writes_the_flat_json_compression_json_keeps():
    from compress.recover import Recovery, RecoveryRecord

    rec = RecoveryRecord(
        Recovery("lora", steps=5), 2e-4, ["wq"], None, "training data of the base run", 640, 1024, 3.2, 2.9,
        False, None, "ck/r", "lg/r/metrics.jsonl", "cross-entropy", "lg/r/val.jsonl", 3.1, 2.95, True,
    )  # fmt: skip
    d = rec.to_json()
    assert list(d)[:3] == ["method", "steps", "lr"] and d["method"] == "lora" and d["steps"] == 5
    assert d["lr"] == 2e-4  # the rate used, in the place of the settings' None (the method's default)
    assert d["lora_rank"] == 8 and d["tokens"] == 640 and d["val_loss_after"] == 2.9 and "settings" not in d
