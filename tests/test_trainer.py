import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import training.trainer as trainer_mod
from common.cli import ConfigError, UserError, apply_overrides
from common.records import TrainingSummary
from data.prepare import BatchSampler
from llama.model import HeadLayerArgs
from llama.model_io import list_checkpoints, load_model
from training.config import OptimConfig, TrainConfig
from training.optim import lr_at
from training.trainer import NonFiniteLoss, train

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_train_logs_checkpoints_and_learns(tmp_path, make_config):
    cfg = make_config(tmp_path, max_steps=12, ckpt_interval=2)
    summary = train(cfg)
    metrics = read_jsonl(tmp_path / "logs/t/metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert set(metrics[0]) >= {"step", "loss", "lr", "tokens", "elapsed_s", "tokens_per_s", "mfu"}
    assert metrics[0]["mfu"] is None  # no known peak on a CPU: not reported rather than guessed
    assert metrics[-1]["tokens"] == 12 * 4 * 32
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    assert [v["step"] for v in read_jsonl(tmp_path / "logs/t/val.jsonl")] == [4, 8, 12]
    # keep the newest two plus multiples of keep_every=4
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt/t")] == [4, 8, 10, 12]
    saved = json.loads((tmp_path / "logs/t/summary.json").read_text())
    assert saved["final_val_loss"] == summary.final_val_loss and saved["per_head"] is True
    assert summary == TrainingSummary.read(tmp_path / "logs/t")  # train() returns the record it wrote, typed
    assert saved["epochs"] == pytest.approx(12 * 4 * 32 / saved["train_tokens_available"]) and saved["epochs"] > 0
    energy = saved["energy"]  # a measured figure or an explicit "unavailable", never a silent guess
    assert (energy["method"] == "unavailable" and "energy_j" not in energy and energy["reason"]) or energy[
        "energy_j"
    ] > 0
    model = load_model(tmp_path / "ckpt/t")
    assert model.params.vocab_size == 500 and model.params.head_layer == HeadLayerArgs()


def test_existing_run_is_never_silently_overwritten(tmp_path, make_config):
    train(make_config(tmp_path, max_steps=2))
    before = (tmp_path / "logs/t/metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="already exists.*--resume.*--overwrite"):
        train(make_config(tmp_path, max_steps=2))
    assert (tmp_path / "logs/t/metrics.jsonl").read_text() == before
    train(make_config(tmp_path, max_steps=3, overwrite=True))
    assert len(read_jsonl(tmp_path / "logs/t/metrics.jsonl")) == 3
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        train(make_config(tmp_path, name="other", resume=True))


def test_resume_equals_uninterrupted_training_bit_exact(tmp_path, make_config, monkeypatch):
    train(make_config(tmp_path / "a"))
    full = read_jsonl(tmp_path / "a/logs/t/metrics.jsonl")

    original = BatchSampler.get

    def interrupt_at_step_5(self, step, *a, **k):
        if step == 5 and self.global_batch == 4:  # a training batch, not a validation one
            raise KeyboardInterrupt
        return original(self, step, *a, **k)

    monkeypatch.setattr(BatchSampler, "get", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tmp_path / "b"))
    assert [s for s, _ in list_checkpoints(tmp_path / "b/ckpt/t")][-1] == 4
    monkeypatch.setattr(BatchSampler, "get", original)
    train(make_config(tmp_path / "b", resume=True))
    resumed = read_jsonl(tmp_path / "b/logs/t/metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, 9))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]  # exactly, not approximately
    a, b = load_model(tmp_path / "a/ckpt/t"), load_model(tmp_path / "b/ckpt/t")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, make_config, monkeypatch):
    calls = {"n": 0}
    original = trainer_mod.loss_fn

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = original(logits, targets)
        return loss * float("nan") if calls["n"] > 5 + 2 else loss  # 5 steps + one 2-batch validation

    monkeypatch.setattr(trainer_mod, "loss_fn", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"loss became nan .*at step 6;.*last good checkpoint is .*step_4"):
        train(make_config(tmp_path))
    model = load_model(tmp_path / "ckpt/t/step_4")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_between_log_steps_is_caught_without_a_sync_per_step_and_never_saved(tmp_path, make_config, monkeypatch):
    # The step does not read its loss on the host: a NaN at step 6 is recorded on the device, its update is
    # skipped by the fused optimizer, and the run stops at its next check (the checkpoint of step 8) naming
    # step 6. No checkpoint is written after it.
    calls = {"n": 0}
    original = trainer_mod.loss_fn
    synced = []
    real_check = trainer_mod.check_finite

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = original(logits, targets)
        return loss * float("nan") if calls["n"] == 6 else loss  # step 6 alone

    def counting(run):
        synced.append(run.tokens_seen // run.tokens_per_step)
        return real_check(run)

    monkeypatch.setattr(trainer_mod, "loss_fn", poisoned)
    monkeypatch.setattr(trainer_mod, "check_finite", counting)
    cfg = make_config(tmp_path, max_steps=12, log_interval=5, ckpt_interval=8, eval_interval=100)
    with pytest.raises(NonFiniteLoss, match=r"loss became nan .*at step 6;.*no checkpoint was written yet"):
        train(cfg)
    assert synced == [5, 8]  # read on the host at log steps and before the checkpoint only (step 8 stops it)
    assert not list_checkpoints(tmp_path / "ckpt/t")  # step 8's checkpoint was refused


def test_lr_schedule():
    cfg = TrainConfig(optim=OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10))
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert all(lr_at(s, cfg, 110) >= lr_at(s + 1, cfg, 110) for s in range(10, 110))


def test_runner_configs_and_overrides():
    import runners.baseline_5_layer as b5
    import runners.perhead_6_layer as p6
    from llama.model import Transformer, count_params

    cfg = apply_overrides(p6.config(), ["--max-steps", "200", "--device", "cpu", "--hidden-dim", "32"])
    assert (cfg.max_steps, cfg.device, cfg.model.head_layer.hidden_dim) == (200, "cpu", 32)
    assert cfg.model.n_layers == 6 and cfg.seq_len == 1024 and cfg.model.dim == 768
    with pytest.raises(ConfigError, match="unknown config key --max-step; did you mean --max-steps") as e:
        apply_overrides(p6.config(), ["--max-step", "2"])
    assert len(str(e.value)) < 200  # one short line, not every option of the runner
    with pytest.raises(ConfigError, match=r"unknown config key --zzz; --help lists the \d+ options"):
        apply_overrides(p6.config(), ["--zzz", "2"])
    # one vocabulary size: the tokenizer's (data.vocab_size); the model's follows it and is not an option
    cfg = apply_overrides(p6.config(), ["--vocab-size", "8000"])
    assert cfg.data.vocab_size == cfg.model.vocab_size == 8000
    with pytest.raises(ConfigError, match="unknown config key --model.vocab-size"):
        apply_overrides(p6.config(), ["--model.vocab-size", "8000"])
    with pytest.raises(ConfigError, match="expects int"):
        apply_overrides(p6.config(), ["--batch-size", "1.5"])
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        apply_overrides(b5.config(), ["--seq-len", "4096"])
    with torch.device("meta"):
        n = count_params(Transformer(b5.config().model))["total"]
    assert 80e6 < n < 90e6


def _run_losses(tmp_path, corpus, nproc, batch_size, parallel):
    folder, cache = corpus
    args = [
        "--name",
        "d",
        "--dim",
        "32",
        "--n-layers",
        "2",
        "--n-heads",
        "4",
        "--multiple-of",
        "16",
        "--max-seq-len",
        "32",
        "--seq-len",
        "32",
        "--corpus",
        str(folder),
        "--cache-dir",
        str(cache),
        "--data.vocab-size",
        "500",
        "--max-steps",
        "4",
        "--batch-size",
        str(batch_size),
        "--eval-interval",
        "4",
        "--eval-iters",
        "2",
        "--log-interval",
        "1",
        "--ckpt-interval",
        "4",
        "--parallel",
        parallel,
        "--out-dir",
        str(tmp_path / "ckpt"),
        "--log-dir",
        str(tmp_path / "logs"),
        "--lr",
        "1e-2",
        "--warmup-steps",
        "2",
        "--device",
        "cpu",  # gloo: the test is about equal results, and one GPU cannot hold two NCCL ranks
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "runners.tiny"] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [m["loss"] for m in read_jsonl(tmp_path / "logs/d/metrics.jsonl")], load_model(tmp_path / "ckpt/d")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp"])  # DDP: the two-node test below (two processes, one per node)
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, corpus, parallel):
    single, m1 = _run_losses(tmp_path / "one", corpus, 1, 4, parallel)
    multi, m2 = _run_losses(tmp_path / "two", corpus, 2, 2, parallel)
    assert len(single) == len(multi) == 4 and all(math.isfinite(x) for x in multi)
    assert multi == pytest.approx(single, abs=1e-4)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=k)


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    # torchrun --nproc_per_node=2 on a one-GPU machine: rank 1 would ask for cuda:1
    from common.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("auto", local_rank=0) == torch.device("cuda:0")
    with pytest.raises(ValueError, match="has 1 GPU.*one process per GPU"):
        pick_device("auto", local_rank=1)
    with pytest.raises(ValueError, match="cuda:3"):
        pick_device("cuda:3")


@pytest.mark.slow
def test_compiled_training_learns_as_eager_training_does(tmp_path, make_config):
    # torch.compile of the model and of the loss (as on GPUs) on the CPU: the same losses up to the float
    # rounding that fused kernels reorder.
    def losses(root, compile_):
        train(make_config(root, max_steps=6, ckpt_interval=6, eval_interval=6, compile=compile_))
        return [m["loss"] for m in read_jsonl(root / "logs/t/metrics.jsonl")]

    eager, compiled = losses(tmp_path / "eager", False), losses(tmp_path / "compiled", True)
    assert len(eager) == len(compiled) == 6
    assert compiled == pytest.approx(eager, rel=1e-3)
    summary = json.loads((tmp_path / "compiled/logs/t/summary.json").read_text())
    assert summary["compile"] is True


def _node_cmd(port: int, args: list[str]) -> list[str]:
    """One "node" of a two-node run: its own torchrun agent, meeting the other by c10d rendezvous on loopback."""
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"),
        *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "loopback-test"),
        *("--max-restarts", "0", "-m", "runners.tiny", *args),
    ]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(args: list[str], logs: Path) -> list[subprocess.Popen]:
    """Two torchrun agents (nodes) on loopback. The first hosts the rendezvous store (as the first node of a
    Slurm job does): it is started, and listening, before the second."""
    import socket
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    nodes = []
    for i in range(2):
        nodes.append(
            subprocess.Popen(
                _node_cmd(port, args),
                cwd=REPO,
                env=env,
                stdout=open(logs / f"node{i}.log", "w"),  # noqa: SIM115 (closed with the process)
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a node is killed as a whole: its agent and its worker
            )
        )
        deadline = time.monotonic() + 60
        while i == 0:  # until the first node's store accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and nodes[0].poll() is None, "the first node did not start"
                time.sleep(0.1)
    return nodes


def _tiny_args(tmp_path, corpus, batch_size: int, steps: int, ckpt: int) -> list[str]:
    folder, cache = corpus
    return [
        *("--name", "d", "--dim", "32", "--n-layers", "2", "--n-heads", "4", "--multiple-of", "16"),
        *("--max-seq-len", "32", "--seq-len", "32", "--corpus", str(folder), "--cache-dir", str(cache)),
        *("--data.vocab-size", "500", "--max-steps", str(steps), "--batch-size", str(batch_size)),
        *("--eval-interval", str(ckpt), "--eval-iters", "2", "--log-interval", "1", "--ckpt-interval", str(ckpt)),
        *("--keep-last", "2", "--out-dir", str(tmp_path / "ckpt"), "--log-dir", str(tmp_path / "logs")),
        *("--lr", "1e-2", "--warmup-steps", "2", "--device", "cpu"),
    ]


@pytest.mark.slow
def test_two_nodes_on_loopback_train_as_one_process_and_resume_after_a_node_dies(tmp_path, corpus):
    # Two torchrun "nodes" (c10d rendezvous on 127.0.0.1, gloo): their first steps equal one process with the
    # same global batch; one node killed mid-run stops the other with a one-line error, and both started again
    # with --resume continue from the last checkpoint.
    import signal
    import time

    steps = 120
    args = _tiny_args(tmp_path, corpus, 2, steps, 10)
    a, b = _two_nodes(args, tmp_path / "first")
    deadline = time.monotonic() + 120
    while not (tmp_path / "ckpt" / "d" / "step_10").is_dir():
        assert time.monotonic() < deadline and a.poll() is None and b.poll() is None, "no first checkpoint"
        time.sleep(0.05)
    for pid in [*_descendants(b.pid), b.pid]:  # one node goes away: its agent and its worker (own session)
        os.kill(pid, signal.SIGKILL)
    b.wait()
    assert a.wait(timeout=120) != 0  # the other stops, and says why in one line
    said = (tmp_path / "first" / "node0.log").read_text()
    assert "error: a process of this run stopped" in said and "--resume" in said, said[-2000:]
    kept = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "ckpt" / "d").glob("step_*"))
    assert kept and kept[-1] < steps
    two_nodes = [m["loss"] for m in read_jsonl(tmp_path / "logs" / "d" / "metrics.jsonl")][:10]
    for p in _two_nodes([*args, "--resume"], tmp_path / "again"):
        assert p.wait(timeout=300) == 0, (tmp_path / "again" / "node0.log").read_text()[-3000:]
    logged = [m["step"] for m in read_jsonl(tmp_path / "logs" / "d" / "metrics.jsonl")]
    assert logged == list(range(1, steps + 1))  # cut back to the checkpoint, then continued: no gap, no repeat
    again = (tmp_path / "again" / "node0.log").read_text() + (tmp_path / "again" / "node1.log").read_text()
    assert f"from {tmp_path / 'ckpt' / 'd' / f'step_{kept[-1]}'}" in again
    one = tmp_path / "one"
    out = subprocess.run(
        [sys.executable, "-m", "runners.tiny", *_tiny_args(one, corpus, 4, steps, steps)],  # the same schedule
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    single = [m["loss"] for m in read_jsonl(one / "logs" / "d" / "metrics.jsonl")][:10]
    assert len(two_nodes) == len(single) == 10 and two_nodes == pytest.approx(single, abs=1e-4)


def test_init_from_takes_the_folders_model_and_refuses_a_model_option_that_disagrees(tmp_path, make_config):
    """--init-from: the model (and its sizes) come with its weights. An explicit model option that disagrees with
    it is one line before any work; without one, the run trains the folder's model and its config.json and
    checkpoints say so (not the runner's default model)."""
    import dataclasses
    import json

    from training.trainer import run

    base = make_config(tmp_path / "a", max_steps=2, ckpt_interval=2)
    base.model = dataclasses.replace(base.model, head_layer=None, attn_gate="elementwise")
    train(base)
    folder = tmp_path / "a" / "ckpt" / "t"
    fresh = make_config(tmp_path / "b", max_steps=2, ckpt_interval=2)  # the runner's model: per-head layers
    with pytest.raises(UserError, match=r"--attn-gate 'headwise' disagrees with --init-from .*'elementwise'"):
        run(fresh, ["--attn-gate", "headwise", "--init-from", str(folder)])
    with pytest.raises(UserError, match=r"--hidden_dim 8 disagrees with --init-from"):
        run(make_config(tmp_path / "b", max_steps=2), ["--hidden_dim", "8", "--init-from", str(folder)])
    assert not (tmp_path / "b" / "ckpt").exists()
    run(make_config(tmp_path / "b", max_steps=2, ckpt_interval=2), ["--init-from", str(folder)])
    config = json.loads((tmp_path / "b" / "logs" / "t" / "config.json").read_text())
    assert config["model"]["attn_gate"] == "elementwise" and config["model"]["head_layer"] is None
    # the same option as the folder's is no conflict
    run(make_config(tmp_path / "c", max_steps=2), ["--attn-gate", "elementwise", "--init-from", str(folder)])


def test_a_bare_resume_continues_the_run_with_its_own_settings(tmp_path, make_config, monkeypatch, capsys):
    """Interrupted at step 5 of 16, a bare --resume from a runner whose default is 300 steps finishes at the
    run's own 16; a resume may extend the run (said), and any other setting that differs is one line."""
    from training.trainer import run

    real = trainer_mod.train_step

    def interrupted_at_step_5(r, step):
        if step == 5:
            raise KeyboardInterrupt
        return real(r, step)

    monkeypatch.setattr(trainer_mod, "train_step", interrupted_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(make_config(tmp_path, max_steps=16, ckpt_interval=4), [])
    assert "run the same command with --resume to continue" in capsys.readouterr().err
    monkeypatch.setattr(trainer_mod, "train_step", real)
    defaults = make_config(tmp_path, max_steps=300, ckpt_interval=100, optim=OptimConfig(lr=3e-4))
    with pytest.raises(UserError, match=r"--lr 0.001: the stopped run 't' trained with 0.01; a resume continues"):
        run(defaults, ["--resume", "--lr", "1e-3"])
    assert run(make_config(tmp_path, max_steps=300), ["--resume"]).steps == 16
    config = json.loads((tmp_path / "logs" / "t" / "config.json").read_text())
    assert config["max_steps"] == 16 and config["optim"]["lr"] == 1e-2  # not rewritten with the defaults
    assert run(make_config(tmp_path, max_steps=300), ["--resume", "--max-steps", "20"]).steps == 20
    assert "as asked, max_steps 16 -> 20" in capsys.readouterr().err


def test_a_run_stopped_before_its_first_checkpoint_names_the_way_out(tmp_path, make_config, monkeypatch, capsys):
    """No advice loop: interrupted before any checkpoint, each message names --overwrite, and it works."""
    from training.trainer import run

    real = trainer_mod.train_step

    def interrupted_at_step_2(r, step):
        if step == 2:
            raise KeyboardInterrupt
        return real(r, step)

    monkeypatch.setattr(trainer_mod, "train_step", interrupted_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(make_config(tmp_path, max_steps=8, ckpt_interval=4), [])
    assert "before the first checkpoint: nothing to resume; run the same command with --overwrite" in (
        capsys.readouterr().err
    )
    monkeypatch.setattr(trainer_mod, "train_step", real)
    with pytest.raises(FileExistsError, match="stopped before its first checkpoint.*pass --overwrite"):
        run(make_config(tmp_path, max_steps=8, ckpt_interval=4), [])
    with pytest.raises(
        FileNotFoundError, match="stopped before its first checkpoint.*--overwrite in place of --resume"
    ):
        run(make_config(tmp_path, max_steps=8, ckpt_interval=4), ["--resume"])
    assert run(make_config(tmp_path, max_steps=8, ckpt_interval=4), ["--overwrite"]).steps == 8
