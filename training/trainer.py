"""The training loop: one visible function, ``train(config)``, used by every runner.

Outputs: ``checkpoints/<name>/step_N/`` (see training/checkpoint.py) and ``logs/<name>/`` with
``metrics.jsonl`` (step, loss, lr, grad_norm, tokens, elapsed_s, tokens_per_s, mfu), ``val.jsonl``
(step, val_loss, tokens, elapsed_s), ``config.json`` and, at the end, ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from common.cli import UserError, parse_args
from common.device import autocast, compute_dtype
from common.energy import EnergyMeter
from common.files import atomic_write
from common.hardware import peak_flops, run_metadata
from data.prepare import BatchSampler, prepare
from llama.model import Transformer, count_params, flops_per_token
from llama.model_io import list_checkpoints, load_model
from training import distributed as D
from training.checkpoint import load_training_state, prune_checkpoints, remove_leftovers, restore_rng, save_checkpoint
from training.config import TrainConfig, check_run_name


class NonFiniteLoss(FloatingPointError):
    pass


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step (Loshchilov & Hutter, 2017)."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
    min_lr = o.lr * o.min_lr_ratio
    return min_lr + 0.5 * (o.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Weight decay on matrices and embeddings only: decaying norm gains towards 0 would fight RMSNorm.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    o = cfg.optim
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type == "cuda")


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def training_loss(compile_: bool):
    """The loss a training step uses: compiled with the model when the model is, so that the float32 cast and
    the softmax over the vocabulary run as one fused pass over the logits (eager, they write and read
    float32 copies of batch x seq x vocab values, forward and backward); the same function either way."""
    return torch.compile(loss_fn) if compile_ else loss_fn


@contextmanager
def run_lock(cfg: TrainConfig):
    """One process trains a run at a time: an OS file lock next to checkpoints/<name> and one next to
    logs/<name> (a run writes both, and two runs of one name may share either), released by the kernel when
    its holder exits, however it exits (kill -9 included)."""
    check_run_name(cfg.name)
    locks = []
    try:
        for folder in dict.fromkeys(Path(d).resolve() for d in (cfg.out_dir, cfg.log_dir)):
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f".{cfg.name}.lock"
            lock = FileLock(path, timeout=0)
            try:
                lock.acquire()
            except Timeout:
                raise FileExistsError(
                    f"run {cfg.name!r} is already being trained by another process (lock {path}); wait for it "
                    "to finish or stop it, or pick another --name"
                ) from None
            locks.append(lock)
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


def _inside(path: Path, parent: Path) -> bool:
    return path.resolve().parent == parent.resolve()


def prepare_run_dirs(cfg: TrainConfig, info: D.DistInfo) -> tuple[Path, Path]:
    """checkpoints/<name> and logs/<name>; an existing run is never overwritten without --overwrite, and an
    overwrite deletes nothing but these two folders."""
    check_run_name(cfg.name)
    ckpt_dir, log_dir = Path(cfg.out_dir) / cfg.name, Path(cfg.log_dir) / cfg.name
    if not (_inside(ckpt_dir, Path(cfg.out_dir)) and _inside(log_dir, Path(cfg.log_dir))):
        raise UserError(f"run {cfg.name!r} would not be a folder of {cfg.out_dir} and {cfg.log_dir}; rename it")
    exists = any(d.is_dir() and any(d.iterdir()) for d in (ckpt_dir, log_dir))
    if exists and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(
            f"run {cfg.name!r} already exists ({ckpt_dir}, {log_dir}); pass --resume to continue it, "
            "--overwrite to start it over, or --name for a new run"
        )
    if cfg.resume and not list_checkpoints(ckpt_dir):
        raise FileNotFoundError(f"--resume: {ckpt_dir} holds no checkpoint to resume; run without --resume")
    if info.is_main:
        if cfg.overwrite:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            shutil.rmtree(log_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(ckpt_dir)
    D.barrier(info)
    return ckpt_dir, log_dir


def read_jsonl(path: Path) -> list[dict]:
    """The records of a log; a line that is not a JSON record (torn by a kill or a full disk) is skipped
    and named, never fatal."""
    records = []
    if path.is_file():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("no step")
            except ValueError:
                if line.strip():
                    print(f"warning: skipped unreadable {path.name} line {i}: {line[:60]!r}", file=sys.stderr)
                continue
            records.append(record)
    return records


def _truncate_jsonl(path: Path, last_step: int):
    """On resume, drop lines logged after the checkpoint (those steps are trained again) and torn ones."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))  # a kill here must not lose the log


def _append_jsonl(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@torch.no_grad()
def evaluate(model, sampler: BatchSampler, cfg: TrainConfig, info: D.DistInfo, amp) -> float:
    """Mean loss over the same ``eval_iters`` validation batches every time, split across ranks."""
    model.eval()
    losses = []
    for i in range(cfg.eval_iters):
        x, y = sampler.get(i, start=info.rank * cfg.batch_size, count=cfg.batch_size)
        with amp:
            losses.append(loss_fn(model(x.to(info.device)), y.to(info.device)))
    model.train()
    return D.all_reduce_mean(torch.stack(losses).mean(), info).item()


def unigram_losses(train: np.ndarray, val: np.ndarray, vocab_size: int) -> dict:
    """Cross-entropy (nats/token) of a unigram model fit on the training tokens: the bar to clear."""
    counts = np.bincount(np.asarray(train), minlength=vocab_size).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    val_counts = np.bincount(np.asarray(val), minlength=vocab_size)
    return {
        "unigram_train_loss": float(-(counts - 1) @ logp / (counts - 1).sum()),
        "unigram_val_loss": float(-(val_counts @ logp) / val_counts.sum()),
    }


def _finished_summary(log_dir: Path, step: int, total_steps: int) -> dict | None:
    """The summary of a run that already reached its last step, if one was written whole."""
    if step < total_steps:
        return None
    try:
        summary = json.loads((log_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("final_val_loss") is not None else None


def train(cfg: TrainConfig) -> dict:
    info = D.init_distributed(cfg.device)
    try:
        with run_lock(cfg) if info.is_main else nullcontext():
            return _train(cfg, info)
    finally:
        D.cleanup(info)


def _train(cfg: TrainConfig, info: D.DistInfo) -> dict:
    # ---- data: rank 0 prepares (trains the tokenizer once), the others then read the cache
    if info.is_main:
        data = prepare(cfg.data, progress=True)
    D.barrier(info)
    if not info.is_main:
        data = prepare(cfg.data, progress=False)
    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    tokens_per_step = global_batch * cfg.seq_len
    total_steps = math.ceil(cfg.max_tokens / tokens_per_step) if cfg.max_tokens else cfg.max_steps
    train_sampler = BatchSampler(data.train, cfg.seq_len, global_batch, cfg.seed)
    val_sampler = BatchSampler(data.val, cfg.seq_len, cfg.batch_size * info.world_size, cfg.seed + 1)

    # ---- model, optionally restored from the latest checkpoint
    ckpt_dir, log_dir = prepare_run_dirs(cfg, info)
    init = load_model(cfg.init_from) if cfg.init_from else None
    if init is not None:
        model_args = init.params  # sizes come with the weights (a pruned model has its own)
        if model_args.vocab_size != data.vocab_size:
            raise UserError(
                f"--init-from {cfg.init_from} has a {model_args.vocab_size}-token vocabulary, the data "
                f"{data.vocab_size}; fine-tune on the data it was trained on"
            )
    else:
        model_args = dataclasses.replace(cfg.model, vocab_size=data.vocab_size)
    start_step, tokens_seen, elapsed_before, energy_before, optim_state = 0, 0, 0.0, 0.0, None
    if cfg.resume:
        step_dir = list_checkpoints(ckpt_dir)[-1][1]
        state, optim_state, rng = load_training_state(step_dir)
        model = load_model(step_dir, info.device)
        if model.params != model_args:
            raise UserError(f"--resume: {step_dir} holds a different model than this config; use a new --name")
        start_step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        energy_before = state.get("energy_j") or 0.0
        restore_rng(rng)
        finished = _finished_summary(log_dir, start_step, total_steps)
        if finished is not None:
            if info.is_main:
                print(f"{cfg.name} already finished at step {start_step}; its summary is {log_dir / 'summary.json'}")
            return finished
        if info.is_main:
            _truncate_jsonl(log_dir / "metrics.jsonl", start_step)
            _truncate_jsonl(log_dir / "val.jsonl", start_step)
            print(f"resuming {cfg.name} from {step_dir} (step {start_step})")
    elif init is not None:
        model = init.to(info.device)
    else:
        torch.manual_seed(cfg.seed)
        model = Transformer(model_args).to(info.device)
    params = count_params(model)
    # Recovery fine-tuning of a pruned model: the pruned weights stay pruned (re-zeroed after every step).
    keep_masks = [(p, p != 0) for p in model.parameters() if p.dim() == 2] if cfg.freeze_zeros else []

    # ---- distribution, compilation, optimizer
    wrapped = D.wrap_model(model, cfg.parallel, info)
    use_compile = cfg.compile if cfg.compile is not None else info.device.type == "cuda"
    if use_compile:
        wrapped.compile()  # in place: parameter names stay those of the model
    train_loss = training_loss(use_compile)
    optimizer = make_optimizer(wrapped, cfg, info.device)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optim_state is not None:
        set_optimizer_state_dict(wrapped, optimizer, optim_state_dict=optim_state, options=full)
    dtype = compute_dtype(cfg.dtype, info.device)
    amp = autocast(info.device, dtype)
    flops_tok, peak = flops_per_token(model_args, cfg.seq_len), peak_flops(info.device)

    if info.is_main:
        atomic_write(log_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        print(
            f"{cfg.name}: {params['total'] / 1e6:.2f}M parameters ({params['non_embedding'] / 1e6:.2f}M "
            f"non-embedding), {info.world_size} process(es) on {info.device}, {global_batch}x{cfg.seq_len} "
            f"tokens per step, {total_steps} steps = {total_steps * tokens_per_step / len(data.train):.2f} epochs "
            f"over {len(data.train):,} training tokens"
        )

    def checkpoint(step: int):
        # Collective under FSDP (every rank gathers), written by rank 0 only.
        msd = get_model_state_dict(wrapped, options=full)
        osd = get_optimizer_state_dict(wrapped, optimizer, options=full)
        if info.is_main:
            state = {
                "step": step,
                "tokens": tokens_seen,
                "elapsed_s": elapsed_before + time.perf_counter() - t0,
                "config": dataclasses.asdict(cfg),
                "data_dir": str(data.dir),
                # training energy of this device up to here (None where no counter exists)
                "energy_j": None if meter.so_far() is None else energy_before + meter.so_far(),
            }
            save_checkpoint(ckpt_dir / f"step_{step}", model, msd, osd, state, data.tokenizer.path)
            prune_checkpoints(ckpt_dir, cfg.keep_last, cfg.keep_every)
        D.barrier(info)

    # ---- the loop
    t0 = time.perf_counter()
    t_log, tokens_log = t0, tokens_seen
    last_loss = last_val = None
    bar = tqdm(
        range(start_step, total_steps),
        initial=start_step,
        total=total_steps,
        desc=cfg.name,
        disable=not info.is_main,
        unit="step",
    )
    # Energy of the whole loop on this process's device (rank 0 reports it): NVML / RAPL, else unavailable.
    meter = EnergyMeter(info.device, idle_s=1.0 if info.is_main else 0.0)
    try:
        with meter:
            for step in bar:
                lr = lr_at(step, cfg, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=info.device)
                for micro in range(cfg.grad_accum):
                    start = (info.rank * cfg.grad_accum + micro) * cfg.batch_size
                    x, y = train_sampler.get(step, start=start, count=cfg.batch_size)
                    x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
                    with D.grad_sync(wrapped, cfg.parallel, info, sync=micro == cfg.grad_accum - 1):
                        with amp:
                            loss = train_loss(wrapped(x), y) / cfg.grad_accum
                        loss.backward()
                    loss_sum += loss.detach()
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.optim.grad_clip)
                    if cfg.optim.grad_clip > 0
                    else None
                )
                if grad_norm is not None and hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                    grad_norm = grad_norm.full_tensor()
                step_loss = D.all_reduce_mean(loss_sum, info).item()
                if not math.isfinite(step_loss) or (grad_norm is not None and not torch.isfinite(grad_norm)):
                    raise NonFiniteLoss(f"loss became {step_loss} (gradient norm {grad_norm}) at step {step + 1}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for p, keep in keep_masks:
                    p.data.mul_(keep)
                tokens_seen += tokens_per_step
                last_loss = step_loss
                done = step + 1

                if info.is_main and (done % cfg.log_interval == 0 or done == total_steps):
                    now = time.perf_counter()
                    tps = (tokens_seen - tokens_log) / (now - t_log)
                    t_log, tokens_log = now, tokens_seen
                    record = {
                        "step": done,
                        "loss": step_loss,
                        "lr": lr,
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                        "tokens": tokens_seen,
                        "elapsed_s": elapsed_before + now - t0,
                        "tokens_per_s": tps,
                        "mfu": None if peak is None else tps * flops_tok / (peak * info.world_size),
                    }
                    _append_jsonl(log_dir / "metrics.jsonl", record)
                    bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tps:,.0f}")
                if done % cfg.eval_interval == 0 or done == total_steps:
                    last_val = evaluate(wrapped, val_sampler, cfg, info, amp)
                    if info.is_main:
                        _append_jsonl(
                            log_dir / "val.jsonl",
                            {
                                "step": done,
                                "val_loss": last_val,
                                "tokens": tokens_seen,
                                "elapsed_s": elapsed_before + time.perf_counter() - t0,
                            },
                        )
                        bar.write(f"step {done}: val loss {last_val:.4f}")
                if done % cfg.ckpt_interval == 0 or done == total_steps:
                    checkpoint(done)
    except NonFiniteLoss as e:
        kept = list_checkpoints(ckpt_dir)
        where = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
        raise NonFiniteLoss(f"{e}; training stopped and {where}. Lower --lr or check the data, then --resume") from None
    except KeyboardInterrupt:
        kept = list_checkpoints(ckpt_dir)
        if info.is_main:
            print(
                f"\ninterrupted; {'resume from ' + str(kept[-1][1]) + ' with --resume' if kept else 'no checkpoint'}",
                file=sys.stderr,
            )
        raise
    finally:
        bar.close()

    if last_val is None:  # nothing was left to train (killed between the last checkpoint and the summary)
        last_val = evaluate(wrapped, val_sampler, cfg, info, amp)
        logged = [r["loss"] for r in read_jsonl(log_dir / "metrics.jsonl") if r["step"] == start_step]
        last_loss = logged[-1] if logged else None
    summary = {
        "name": cfg.name,
        "params": params["total"],
        "non_embedding_params": params["non_embedding"],
        "n_layers": model_args.n_layers,
        "per_head": model_args.head_layer is not None,
        "head_layer": model_args.head_layer_spec(),
        "steps": total_steps,
        "tokens": tokens_seen,
        "train_tokens_available": int(len(data.train)),
        "epochs": tokens_seen / len(data.train),  # passes over the training split (>1: data repeated)
        "train_time_s": elapsed_before + time.perf_counter() - t0,
        "final_train_loss": last_loss,
        "final_val_loss": last_val,
        "world_size": info.world_size,
        "dtype": str(dtype).removeprefix("torch."),
        "compile": use_compile,
        "flops_per_token": flops_tok,
        **unigram_losses(data.train, data.val, data.vocab_size),
        **run_metadata(info.device),
    }
    trained = tokens_seen - start_step * tokens_per_step
    # this session's rate; a run that had nothing left to train reports its whole run's average
    summary["tokens_per_s"] = trained / (time.perf_counter() - t0) if trained else tokens_seen / elapsed_before
    # per token this device processed; the run used world_size such devices
    summary["energy"] = meter.result(units=trained // info.world_size, unit="token") | {"scope": str(info.device)}
    if info.is_main:
        atomic_write(log_dir / "summary.json", json.dumps(summary, indent=2))
        print(
            f"done: val loss {last_val:.4f} (unigram {summary['unigram_val_loss']:.4f}), "
            f"{summary['train_time_s']:.0f} s, checkpoints in {ckpt_dir}"
        )
    return summary


def run(cfg: TrainConfig, argv: list[str] | None = None) -> dict:
    """What runner scripts call: apply ``--key value`` overrides from the command line, then train."""
    parse_args(cfg, argv)
    return train(cfg)
