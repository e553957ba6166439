"""Typed training configs. A runner builds its config in Python and passes ``sys.argv`` through
common.cli.apply_overrides: ``--max-steps 200`` sets the one field of that name anywhere in the config tree,
``--data.vocab-size 8000`` names the path when a name appears twice."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.cli import UserError
from data.config import DataConfig
from data.prepare import PreparedData
from llama.model import ModelArgs
from llama.model_io import list_checkpoints, model_skeleton, resolve_checkpoint


@dataclass
class OptimConfig:
    lr: float = 6e-4  # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.1  # AdamW decay on matrices and embeddings; never on norm weights
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off

    def __post_init__(self):
        # "not x > 0" rather than "x <= 0", so that NaN is rejected too
        checks = {
            "lr": 0 < self.lr < math.inf,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "weight_decay": 0 <= self.weight_decay < math.inf,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "eps": 0 < self.eps < 1,
            "grad_clip": 0 <= self.grad_clip < math.inf,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise UserError(
                f"optim: {', '.join(f'{k}={getattr(self, k)}' for k in bad)} out of range; need lr > 0, "
                "0 <= min_lr_ratio <= 1, warmup_steps >= 0, weight_decay >= 0, betas in [0, 1), eps in (0, 1), "
                "grad_clip >= 0 (0: off)"
            )


@dataclass
class TrainConfig:
    name: str = "run"  # run name: checkpoints/<name>/ and logs/<name>/
    model: ModelArgs = field(default_factory=ModelArgs)  # its vocab_size follows data.vocab_size (not an option)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str = "checkpoints"
    log_dir: str = "logs"
    max_steps: int = 1000  # optimizer steps (ignored when max_tokens is set)
    max_tokens: int | None = None  # token budget; the number of steps is derived from it
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # training context; at most model.max_seq_len
    eval_interval: int = 100  # steps between validation losses (and at the end)
    eval_iters: int = 20  # validation batches, the same ones every time
    log_interval: int = 10  # steps between lines in metrics.jsonl
    ckpt_interval: int = 500  # steps between checkpoints (and at the end)
    keep_last: int = 2  # checkpoints kept, newest first ...
    keep_every: int = 0  # ... plus every checkpoint whose step is a multiple of this (0: none)
    seed: int = 1337
    device: str = "auto"  # auto (cuda if present), cpu, cuda, cuda:N
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float32
    compile: bool | None = None  # torch.compile the model; None: on for CUDA, off for CPU
    parallel: str = "ddp"  # with torchrun and >1 process: ddp or fsdp (FSDP2, fully_shard)
    init_from: str | None = None  # start from this model folder's weights and sizes (e.g. recovery fine-tuning)
    freeze_zeros: bool = False  # keep weights that are exactly zero at the start at zero (pruned models)
    resume: bool = False  # continue checkpoints/<name> from its latest checkpoint
    overwrite: bool = False  # delete an existing run of this name and start over

    # Fields that are derived here, never set directly (the command-line layer does not offer them): the
    # model's vocabulary is the tokenizer's, whose size is data.vocab_size.
    DERIVED = ("model.vocab_size",)

    def __post_init__(self):
        self.model.vocab_size = self.data.vocab_size
        check_run_name(self.name)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise UserError(f"device={self.device!r} is unknown; use auto, cpu, cuda or cuda:N")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise UserError(f"dtype={self.dtype!r} is unknown; use auto, bfloat16 or float32")
        if self.parallel not in ("ddp", "fsdp"):
            raise UserError(f"parallel={self.parallel!r} is unknown; use ddp or fsdp")
        if self.freeze_zeros and self.parallel == "fsdp":
            raise UserError("freeze_zeros works with ddp or one process, not with fsdp's sharded parameters")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one")
        if self.seq_len > self.model.max_seq_len:
            raise UserError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "eval_interval",
            "eval_iters",
            "log_interval",
            "ckpt_interval",
            "keep_last",
        ):
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)} must be positive")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise UserError(f"max_tokens={self.max_tokens} must be positive (or None: train max_steps steps)")
        if self.keep_every < 0:
            raise UserError(f"keep_every={self.keep_every} must be >= 0 (0: keep only the newest keep_last)")


def check_run_name(name: str) -> str:
    """A run name becomes a folder under checkpoints/ and logs/ that --overwrite deletes: only a plain name,
    never one that points elsewhere ("", ".", "..", "a/b", "/x")."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]*", name or "") or name in (".", ".."):
        raise UserError(
            f"run name {name!r} is not a plain folder name; use letters, digits and _ - . + = @ "
            "(starting with a letter, digit or _)"
        )
    return name


def train_config_from_dict(d: dict) -> TrainConfig:
    """Rebuild a TrainConfig saved as ``dataclasses.asdict`` (state.json, config.json)."""
    d = dict(d)
    return TrainConfig(
        model=ModelArgs.from_dict(d.pop("model")),
        data=DataConfig(**d.pop("data")),
        optim=OptimConfig(**d.pop("optim")),
        **d,
    )


@dataclass
class Custom:
    """Parts of a run that code above the trainer supplies (compress's recovery: LoRA, distillation, Hugging Face
    models), while the loop, logs, checkpoints, resume, lock and NaN guard stay the trainer's. Each is optional;
    with none, a run is the ordinary one. ``cfg`` still names the run and its folders, so a resumed run is given
    the same Custom again."""

    data: Callable[[], PreparedData] | None = None  # the run's tokens, instead of prepare(cfg.data)
    model: Callable[[torch.device], torch.nn.Module] | None = None  # the model to train, on the device
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (model, x, y)
    write_model: Callable[[torch.nn.Module, Path, dict], None] | None = None  # a checkpoint's model files
    read_state: Callable[[Path], dict] | None = None  # a checkpoint's model state dict, to resume
    # called with (checkpoint folder, log folder) once a fresh run's folders are ready, before its first
    # step (not on resume): to mark the folders as this run's
    started: Callable[[Path, Path], None] | None = None


def check_init_options(cfg: TrainConfig, given: dict[str, str]):
    """Each model option the command line set (``given``: field path -> as spelled) must agree with the model of
    ``--init-from``: the model comes with its weights."""
    init = model_skeleton(resolve_checkpoint(cfg.init_from)).params  # its sizes, weights not read
    for path, spelled in given.items():
        if not path.startswith("model."):
            continue
        mine, theirs = cfg.model, init
        for part in path.split(".")[1:]:
            mine, theirs = getattr(mine, part, None), getattr(theirs, part, None)
        if mine != theirs:
            raise UserError(
                f"--{spelled} {mine!r} disagrees with --init-from {cfg.init_from}, whose model has {theirs!r}: the "
                "model comes with its weights; leave the option out, or train from scratch without --init-from"
            )


# Settings a resume may change (stated when it does): how long the run goes on and how it logs and keeps
# checkpoints, not what it trains or how. Any other option given with --resume must equal the stopped run's.
RESUMABLE_CHANGES = (
    "max_steps",
    "max_tokens",
    "eval_interval",
    "log_interval",
    "ckpt_interval",
    "keep_last",
    "keep_every",
    "device",
)
WHERE = ("name", "out_dir", "log_dir", "resume", "overwrite")  # which run, and how it starts: not its settings


def resumed_config(cfg: TrainConfig, given: dict[str, str]) -> TrainConfig:
    """What a ``--resume`` trains: the stopped run's own settings (its newest checkpoint records them), with the
    options given on the command line that may change on a resume (``RESUMABLE_CHANGES``) applied and stated; any
    other given option that differs from the run's is one line. A bare ``--resume`` never falls back to the
    runner's defaults. Where the run has no checkpoint yet, ``cfg`` as it is (the trainer says why)."""
    kept = list_checkpoints(Path(cfg.out_dir) / cfg.name)
    try:
        recorded = json.loads((kept[-1][1] / "state.json").read_text())["config"] if kept else None
        old = train_config_from_dict(recorded) if isinstance(recorded, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        old = None
    if old is None:
        return cfg
    changed = []
    for path, spelled in given.items():
        if path in WHERE:
            continue
        mine, theirs = _at(cfg, path), _at(old, path)
        if mine == theirs:
            continue
        if path not in RESUMABLE_CHANGES:
            raise UserError(
                f"--{spelled} {mine!r}: the stopped run {cfg.name!r} trained with {theirs!r}; a resume continues with "
                f"the run's own settings (only {', '.join(RESUMABLE_CHANGES)} may change): leave it out, or train a "
                "new --name"
            )
        changed.append(f"{path} {theirs!r} -> {mine!r}")
        setattr(old, path, mine)
    if changed:
        print(f"resume of {cfg.name}: as asked, {'; '.join(changed)}", file=sys.stderr)
    where = {k: getattr(cfg, k) for k in WHERE}
    return dataclasses.replace(old, **where)


def _at(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part, None)
    return cfg
