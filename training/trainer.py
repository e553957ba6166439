"""The training loop: one visible function, ``train(config)``, used by every runner.

Outputs: ``checkpoints/<name>/step_N/`` (see training/checkpoint.py) and ``logs/<name>/`` with
``metrics.jsonl`` (step, loss, lr, grad_norm, tokens, elapsed_s, tokens_per_s, mfu), ``val.jsonl``
(step, val_loss, tokens, elapsed_s), ``config.json`` and, at the end, ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from common.cli import UserError, apply_overrides
from common.device import autocast, compute_dtype
from common.energy import EnergyMeter
from common.files import atomic_write
from common.hardware import peak_flops, run_metadata
from common.progress import Progress
from common.records import TrainingSummary
from data.prepare import BatchSampler, Prefetcher, PreparedData, prepare, unigram_losses
from llama.model import Transformer, count_params, flops_per_token
from llama.model_io import list_checkpoints, load_model
from training import distributed as D
from training import run_files
from training.checkpoint import load_training_state, prune_checkpoints, restore_rng, save_checkpoint
from training.config import Custom, TrainConfig, check_init_options, resumed_config
from training.optim import lr_at, make_optimizer
from training.run_files import append_jsonl, finished_summary, prepare_run_dirs, read_jsonl, run_lock, truncate_jsonl


class NonFiniteLoss(FloatingPointError):
    pass


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def training_loss(compile_: bool):
    """The loss a training step uses: compiled with the model when the model is, so that the float32 cast and
    the softmax over the vocabulary run as one fused pass over the logits (eager, they write and read
    float32 copies of batch x seq x vocab values, forward and backward); the same function either way."""
    return torch.compile(loss_fn) if compile_ else loss_fn


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


def train(cfg: TrainConfig, custom: Custom | None = None) -> TrainingSummary:
    """Train ``cfg``'s run (resumed where it says so); what it wrote to logs/<run>/summary.json, typed."""
    info = D.init_distributed(cfg.device)
    ok = False
    try:
        with run_lock(cfg) if info.is_main else nullcontext():
            summary = _train(cfg, info, custom or Custom())
        ok = True
        return summary
    finally:
        D.cleanup(info, ok)


@dataclass
class Run:
    """Everything one training run holds between its steps."""

    cfg: TrainConfig
    info: D.DistInfo
    data: PreparedData
    train_sampler: BatchSampler
    val_sampler: BatchSampler
    ckpt_dir: Path
    log_dir: Path
    model: Transformer  # the unwrapped model: what is saved
    wrapped: torch.nn.Module  # the same, distributed and compiled: what is trained
    optimizer: torch.optim.Optimizer
    loss: Callable  # (model, x, y) -> loss
    amp: object  # autocast context
    dtype: torch.dtype
    compiled: bool
    total_steps: int
    tokens_per_step: int
    flops_per_token: float | None  # None for a model this formula does not describe (then no MFU)
    peak_flops: float | None
    keep_masks: list  # (parameter, mask) kept at zero where it was pruned (freeze_zeros)
    custom: Custom = field(default_factory=Custom)
    start_step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # seconds of training before this session (resume)
    energy_before: float = 0.0
    finished: dict | None = None  # the summary of a run that had already reached its last step
    t0: float = 0.0
    t_log: float = 0.0
    tokens_log: int = 0
    last_loss: float | torch.Tensor | None = None  # on the device between log steps (no host sync per step)
    last_val: float | None = None
    fused: bool = False  # the optimizer skips a non-finite step itself (found_inf): no host sync per step
    bad_step: torch.Tensor | None = None  # on the device: the first step whose loss or gradient was not finite
    bad_loss: torch.Tensor | None = None  # ... and its loss
    prefetch: Prefetcher | None = None

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0


def setup(cfg: TrainConfig, info: D.DistInfo, custom: Custom | None = None) -> Run:
    """Data, run folders, the model (new, from --init-from, or restored with --resume), distribution,
    compilation and the optimizer."""
    custom = custom or Custom()
    # rank 0 prepares the data (trains the tokenizer once), the others then read the cache
    if custom.data is not None:
        data = custom.data()
    elif info.is_main:
        data = prepare(cfg.data, progress=True)
    D.barrier(info)
    if custom.data is None and not info.is_main:
        data = prepare(cfg.data, progress=False)
    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    tokens_per_step = global_batch * cfg.seq_len
    total_steps = math.ceil(cfg.max_tokens / tokens_per_step) if cfg.max_tokens else cfg.max_steps
    ckpt_dir, log_dir = prepare_run_dirs(cfg, info)
    if custom.started is not None and info.is_main and not cfg.resume:
        custom.started(ckpt_dir, log_dir)

    model, model_args, restored = build_model(cfg, info, data, ckpt_dir, custom)
    wrapped = D.wrap_model(model, cfg.parallel, info)
    compiled = cfg.compile if cfg.compile is not None else info.device.type == "cuda"
    if compiled:
        wrapped.compile()  # in place: parameter names stay those of the model
    optimizer = make_optimizer(wrapped, cfg, info.device)
    dtype = compute_dtype(cfg.dtype, info.device)
    run = Run(
        cfg=cfg,
        info=info,
        data=data,
        train_sampler=BatchSampler(data.train, cfg.seq_len, global_batch, cfg.seed),
        val_sampler=BatchSampler(data.val, cfg.seq_len, cfg.batch_size * info.world_size, cfg.seed + 1),
        ckpt_dir=ckpt_dir,
        log_dir=log_dir,
        model=model,
        wrapped=wrapped,
        optimizer=optimizer,
        loss=custom.loss or plain_loss(training_loss(compiled)),
        amp=autocast(info.device, dtype),
        dtype=dtype,
        compiled=compiled,
        total_steps=total_steps,
        tokens_per_step=tokens_per_step,
        flops_per_token=None if model_args is None else flops_per_token(model_args, cfg.seq_len),
        peak_flops=peak_flops(info.device),
        # recovery fine-tuning of a pruned model: the pruned weights stay pruned (re-zeroed after every step)
        keep_masks=[(p, p != 0) for p in model.parameters() if p.dim() == 2] if cfg.freeze_zeros else [],
        custom=custom,
        fused=bool(optimizer.defaults.get("fused")),
        bad_step=torch.zeros((), dtype=torch.long, device=info.device),
        bad_loss=torch.zeros((), device=info.device),
    )
    run.prefetch = Prefetcher(run.train_sampler, info.device)
    if restored is not None:
        restore(run, *restored)
    return run


def plain_loss(loss: Callable) -> Callable:
    """The ordinary training loss as a function of (model, x, y): cross-entropy of the next token."""

    def run(model, x, y):
        return loss(model(x), y)

    return run


def build_model(cfg: TrainConfig, info: D.DistInfo, data: PreparedData, ckpt_dir: Path, custom: Custom | None = None):
    """(model on the device, its arguments (None for a supplied model), (step folder, state, optimizer state,
    RNG) when resuming)."""
    if custom is not None and custom.model is not None:
        model = custom.model(info.device)
        if not cfg.resume:
            return model, None, None
        step_dir = list_checkpoints(ckpt_dir)[-1][1]
        state, optim_state, rng = load_training_state(step_dir)
        try:
            model.load_state_dict(custom.read_state(step_dir))
        except RuntimeError as e:
            raise UserError(f"--resume: {step_dir} holds a different model ({str(e).splitlines()[0][:150]})") from None
        return model, None, (step_dir, state, optim_state, rng)
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
    if cfg.resume:
        step_dir = list_checkpoints(ckpt_dir)[-1][1]
        state, optim_state, rng = load_training_state(step_dir)
        model = load_model(step_dir, info.device)
        if model.params != model_args:
            raise UserError(f"--resume: {step_dir} holds a different model than this config; use a new --name")
        return model, model_args, (step_dir, state, optim_state, rng)
    if init is not None:
        cfg.model = model_args  # config.json and the checkpoints record the model trained, not the runner's
        return init.to(info.device), model_args, None
    torch.manual_seed(cfg.seed)
    return Transformer(model_args).to(info.device), model_args, None


def restore(run: Run, step_dir: Path, state: dict, optim_state: dict, rng: dict):
    """Continue from a checkpoint: its step, tokens, time and energy so far, the optimizer and RNG states, and
    the logs cut back to that step (or the summary, if the run had already finished)."""
    run.start_step, run.tokens_seen, run.elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
    run.energy_before = state.get("energy_j") or 0.0
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    set_optimizer_state_dict(run.wrapped, run.optimizer, optim_state_dict=optim_state, options=full)
    restore_rng(rng)
    run.finished = finished_summary(run.log_dir, run.start_step, run.total_steps)
    if run.info.is_main and run.finished is None:
        truncate_jsonl(run.log_dir / "metrics.jsonl", run.start_step)
        truncate_jsonl(run.log_dir / "val.jsonl", run.start_step)
        print(f"resuming {run.cfg.name} from {step_dir} (step {run.start_step})")


def _batch_key(run: Run, step: int, micro: int) -> tuple[int, int, int] | None:
    """(step, first row, rows) of this process's micro-batch ``micro`` of ``step``; None past the last step."""
    cfg, info = run.cfg, run.info
    if micro == cfg.grad_accum:
        step, micro = step + 1, 0
    if step >= run.total_steps:
        return None
    return step, (info.rank * cfg.grad_accum + micro) * cfg.batch_size, cfg.batch_size


def train_step(run: Run, step: int) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """One optimizer step (its micro-batches, clipping, the NaN guard, pruned weights kept at zero):
    (mean loss over the processes, learning rate, gradient norm), the loss and norm still on the device.

    No host sync (torchtitan's way): a non-finite loss or gradient norm is recorded on the device and, with the
    fused optimizer, that step's update is skipped on the device too; ``check_finite`` reads the record at log
    steps, validations and checkpoints, so no checkpoint is written after a bad step."""
    cfg, info = run.cfg, run.info
    lr = lr_at(step, cfg, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=info.device)
    for micro in range(cfg.grad_accum):
        x, y = run.prefetch.get(_batch_key(run, step, micro), _batch_key(run, step, micro + 1))
        with D.grad_sync(run.wrapped, cfg.parallel, info, sync=micro == cfg.grad_accum - 1):
            with run.amp:
                loss = run.loss(run.wrapped, x, y) / cfg.grad_accum
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = (
        torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(), cfg.optim.grad_clip)
        if cfg.optim.grad_clip > 0
        else None
    )
    if grad_norm is not None:
        grad_norm = D.local(grad_norm)  # FSDP2's is a DTensor
    step_loss = D.all_reduce_mean(loss_sum, info)  # a collective, not a host sync
    finite = torch.isfinite(step_loss)
    if grad_norm is not None:
        finite = finite & torch.isfinite(grad_norm)
    first = ~finite & (run.bad_step == 0)
    run.bad_step = torch.where(first, step + 1, run.bad_step)
    run.bad_loss = torch.where(first, step_loss.detach(), run.bad_loss)
    if run.fused:
        run.optimizer.found_inf = (~finite).float()  # the fused kernel leaves weights and moments as they were
    else:
        check_finite(run)  # an unfused optimizer cannot skip a step itself: a host sync every step
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    for p, keep in run.keep_masks:
        p.data.mul_(keep)
    run.tokens_seen += run.tokens_per_step
    run.last_loss = step_loss
    return step_loss, lr, grad_norm


def check_finite(run: Run):
    """Raise NonFiniteLoss if any step so far had a non-finite loss or gradient norm (one host sync)."""
    bad = int(run.bad_step)
    if bad:
        raise NonFiniteLoss(
            f"loss became {float(run.bad_loss)} (or its gradient norm did) at step {bad}; "
            "its update and any after it were not applied"
        )


def log_step(run: Run, done: int, loss: torch.Tensor, lr: float, grad_norm, bar):
    """A line of metrics.jsonl every log_interval steps (rank 0): loss, rate, MFU. The one place a step's loss
    comes to the host, and where a non-finite one stops the run."""
    if not (done % run.cfg.log_interval == 0 or done == run.total_steps):
        return
    check_finite(run)  # every process: each stops, not only rank 0
    if not run.info.is_main:
        return
    loss = float(loss)
    now = time.perf_counter()
    tps = (run.tokens_seen - run.tokens_log) / (now - run.t_log)
    run.t_log, run.tokens_log = now, run.tokens_seen
    peak = run.peak_flops
    record = {
        "step": done,
        "loss": loss,
        "lr": lr,
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens": run.tokens_seen,
        "elapsed_s": run.elapsed_before + now - run.t0,
        "tokens_per_s": tps,
        "mfu": None
        if peak is None or not run.flops_per_token
        else tps * run.flops_per_token / (peak * run.info.world_size),
    }
    append_jsonl(run.log_dir / "metrics.jsonl", record)
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")


def validate(run: Run, done: int, bar):
    """The validation loss (the same batches every time), logged to val.jsonl by rank 0."""
    check_finite(run)
    run.last_val = evaluate(run.wrapped, run.val_sampler, run.cfg, run.info, run.amp)
    if run.info.is_main:
        record = {"step": done, "val_loss": run.last_val, "tokens": run.tokens_seen, "elapsed_s": run.elapsed()}
        append_jsonl(run.log_dir / "val.jsonl", record)
        bar.write(f"step {done}: val loss {run.last_val:.4f}")


def checkpoint(run: Run, step: int, meter: EnergyMeter):
    """checkpoints/<name>/step_N: collective under FSDP (every rank gathers), written by rank 0 only. Never
    after a non-finite step (check_finite): the weights saved are ones every applied step was finite for."""
    check_finite(run)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(run.wrapped, options=full)
    osd = get_optimizer_state_dict(run.wrapped, run.optimizer, options=full)
    if run.info.is_main:
        state = {
            "step": step,
            "tokens": run.tokens_seen,
            "elapsed_s": run.elapsed(),
            "config": dataclasses.asdict(run.cfg),
            "data_dir": str(run.data.dir),
            # training energy of this device up to here (None where no counter exists)
            "energy_j": None if meter.so_far() is None else run.energy_before + meter.so_far(),
        }
        save_checkpoint(
            run.ckpt_dir / f"step_{step}", run.model, msd, osd, state, run.data.tokenizer.path, run.custom.write_model
        )
        prune_checkpoints(run.ckpt_dir, run.cfg.keep_last, run.cfg.keep_every)
    D.barrier(run.info)


def finish(run: Run, meter: EnergyMeter) -> TrainingSummary:
    """summary.json: sizes, tokens, epochs, time, final losses against the unigram bar, rate, energy."""
    cfg, info, data = run.cfg, run.info, run.data
    if run.last_val is None:  # nothing was left to train (killed between the last checkpoint and the summary)
        run.last_val = evaluate(run.wrapped, run.val_sampler, cfg, info, run.amp)
        logged = [r["loss"] for r in read_jsonl(run.log_dir / "metrics.jsonl") if r["step"] == run.start_step]
        run.last_loss = logged[-1] if logged else None
    params, args = count_params(run.model), run.model.params  # every model says its sizes (models.interface)
    trained = run.tokens_seen - run.start_step * run.tokens_per_step
    # this session's rate; a run that had nothing left to train reports its whole run's average
    seconds = time.perf_counter() - run.t0
    summary = TrainingSummary(
        name=cfg.name,
        steps=run.total_steps,
        tokens=run.tokens_seen,
        final_val_loss=run.last_val,
        params=params["total"],
        trained_params=sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        non_embedding_params=params["non_embedding"],
        n_layers=args.n_layers,
        head_layer=args.head_layer_spec(),
        train_tokens_available=int(len(data.train)),
        epochs=run.tokens_seen / len(data.train),
        train_time_s=run.elapsed(),
        final_train_loss=None if run.last_loss is None else float(run.last_loss),
        world_size=info.world_size,
        dtype=str(run.dtype).removeprefix("torch."),
        compile=run.compiled,
        flops_per_token=run.flops_per_token,
        tokens_per_s=trained / seconds if trained else run.tokens_seen / run.elapsed_before,
        # per token this device processed; the run used world_size such devices
        energy=meter.result(units=trained // info.world_size, unit="token") | {"scope": str(info.device)},
        **unigram_losses(data.train, data.val, data.vocab_size),
        extra=run_metadata(info.device),
    )
    if info.is_main:
        summary.write(run.log_dir)
        print(
            f"done: val loss {run.last_val:.4f} (unigram {summary.unigram_val_loss:.4f}), "
            f"{summary.train_time_s:.0f} s, checkpoints in {run.ckpt_dir}"
        )
    return summary


def _train(cfg: TrainConfig, info: D.DistInfo, custom: Custom) -> TrainingSummary:
    run = setup(cfg, info, custom)
    if run.finished is not None:
        if info.is_main:
            print(
                f"{cfg.name} already finished at step {run.start_step}; its summary is {run.log_dir / 'summary.json'}"
            )
        return run.finished
    if info.is_main:
        atomic_write(run.log_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        (run.log_dir / run_files.DIVERGED_FILE).unlink(missing_ok=True)  # an earlier attempt diverged, not this one
        params = count_params(run.model)
        print(
            f"{cfg.name}: {params['total'] / 1e6:.2f}M parameters ({params['non_embedding'] / 1e6:.2f}M "
            f"non-embedding), {info.world_size} process(es) on {info.device}, "
            f"{run.tokens_per_step // cfg.seq_len}x{cfg.seq_len} tokens per step, {run.total_steps} steps = "
            f"{run.total_steps * run.tokens_per_step / len(run.data.train):.2f} epochs over "
            f"{len(run.data.train):,} training tokens"
        )
    steps = range(run.start_step, run.total_steps)
    bar = Progress(
        steps, initial=run.start_step, total=run.total_steps, desc=cfg.name, disable=not info.is_main, unit="step"
    )
    # Energy of the whole loop on this process's device (rank 0 reports it): NVML / RAPL, else unavailable.
    meter = EnergyMeter(info.device, idle_s=1.0 if info.is_main else 0.0)
    run.t0 = run.t_log = time.perf_counter()
    run.tokens_log = run.tokens_seen
    try:
        with meter:
            for step in bar:
                loss, lr, grad_norm = train_step(run, step)
                done = step + 1
                log_step(run, done, loss, lr, grad_norm, bar)
                if done % cfg.eval_interval == 0 or done == run.total_steps:
                    validate(run, done, bar)
                if done % cfg.ckpt_interval == 0 or done == run.total_steps:
                    checkpoint(run, done, meter)
    except NonFiniteLoss as e:
        kept = list_checkpoints(run.ckpt_dir)
        where = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
        if info.is_main:
            run_files.mark_diverged(run.log_dir, int(run.bad_step), float(run.bad_loss), str(e))
        raise NonFiniteLoss(f"{e}; training stopped and {where}. Lower --lr or check the data, then --resume") from None
    except RuntimeError as e:  # a peer process (another node) went away mid-collective
        if info.world_size == 1 or not D.lost_peer(e):
            raise
        kept = list_checkpoints(run.ckpt_dir)
        where = f"the last checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written yet"
        raise UserError(
            f"a process of this run stopped (rank {info.rank} of {info.world_size} lost a peer: "
            f"{str(e).strip().splitlines()[0][:160]}); {where}: start every node again with --resume"
        ) from None
    except KeyboardInterrupt:
        kept = list_checkpoints(run.ckpt_dir)
        if info.is_main:
            print(
                f"\ninterrupted; its last checkpoint is {kept[-1][1]}: run the same command with --resume to continue"
                if kept
                else "\ninterrupted before the first checkpoint: nothing to resume; run the same command with "
                "--overwrite to start it over",
                file=sys.stderr,
            )
        raise
    finally:
        bar.close()
        run.prefetch.close()
    return finish(run, meter)


def run(cfg: TrainConfig, argv: list[str] | None = None) -> TrainingSummary:
    """What runner scripts call: apply ``--key value`` overrides from the command line, then train. With
    ``--init-from``, the model is the folder's (its sizes come with its weights): a model option given that
    disagrees with it is one line, never silently overridden."""
    given: dict[str, str] = {}
    apply_overrides(cfg, sys.argv[1:] if argv is None else argv, given)
    if cfg.resume:
        cfg = resumed_config(cfg, given)  # the stopped run's own settings, not the runner's defaults
    if cfg.init_from:
        check_init_options(cfg, given)
    return train(cfg)
