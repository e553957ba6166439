"""Recovery after compression: a short training of the compressed model by the project's trainer (its progress,
logs, checkpoints, resume, run lock and NaN guard), for this project's models and Hugging Face folders alike.

- ``full``: every weight trained on next-token cross-entropy;
- ``lora``: low-rank adapters (``peft``, as LLM-Pruner recovers) on the attention and MLP projections, the
  base weights frozen; at the end the adapters are merged into the weights (``merge_and_unload``), so the
  output is a plain model folder of the compressed shape;
- ``distill``: knowledge distillation from the uncompressed model as teacher (Hinton et al. 2015): loss =
  alpha * T^2 * KL(teacher || student) at temperature T + (1 - alpha) * cross-entropy; the teacher in eval mode
  without gradients; every weight of the student trained, or only LoRA adapters with ``--distill-lora``. The
  student may be smaller than the teacher (pruned heads or channels, dropped blocks); both must share the
  vocabulary. Quantization-aware distillation is out of scope (quantized models are not trained here).

A sparse model (unstructured or N:M pruning, by its compression record, or any weight matrix over 25% zeros)
stays sparse with exactly the mask its pruning made: full and distill training keep the pruned weights at zero
after every step (the trainer's ``freeze_zeros``); LoRA on a sparse model trains the masked update itself,
each target weight being mask * (W + s B A) in the forward (``MaskedLoRA``), so the model the optimizer sees is
the model that is saved.

The run's folders are marked with ``identity`` (compress/__main__.py: the --out it recovers and its settings,
plus the held-out loss before training), so that only this compression's own run is resumed or replaced.

The training tokens are the base run's own training split for this project's checkpoints, or
``--calib-corpus`` (tokenized with the model's tokenizer; required for Hugging Face folders).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from common.cli import UserError
from common.device import autocast, compute_dtype
from common.files import atomic_write
from common.records import TrainingSummary
from compress import IDENTITY_FILE, PRUNING, RECOVERY, read_compression, read_recovery_mark
from data.config import DataConfig
from data.prepare import BatchSampler, PreparedData, iter_documents, split_documents
from llama.model_io import MODEL_FILE
from models.folders import load_folder
from models.interface import lora_targets
from training import distributed as D
from training.checkpoint import training_data
from training.config import Custom, TrainConfig
from training.run_files import read_jsonl
from training.trainer import evaluate, train


@dataclass
class Recovery:
    method: str  # full, lora or distill
    steps: int = 100
    lr: float | None = None  # default: 1e-4 for full and distill, 2e-4 for LoRA
    batch_size: int = 8
    seq_len: int | None = None  # default: the base run's training length (256 with --calib-corpus)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # default: the model family's (models.interface.lora_targets)
    distill_alpha: float = 0.5  # weight of the KL term (1 - alpha: cross-entropy)
    temperature: float = 2.0
    distill_lora: bool = False  # distill into LoRA adapters instead of every weight
    seed: int = 0

    def __post_init__(self):
        if self.method not in RECOVERY:
            raise UserError(f"--recover {self.method!r}: use one of {RECOVERY}")
        checks = [
            (self.steps > 0, f"--recover-steps must be positive, got {self.steps}"),
            (self.lr is None or self.lr > 0, f"--recover-lr must be positive, got {self.lr}"),
            (self.batch_size > 0, f"--recover-batch-size must be positive, got {self.batch_size}"),
            (self.seq_len is None or self.seq_len > 1, f"--recover-seq-len must be above 1, got {self.seq_len}"),
            (self.lora_rank >= 1, f"--lora-rank must be at least 1, got {self.lora_rank}"),
            (self.lora_alpha > 0, f"--lora-alpha must be positive, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (0 <= self.distill_alpha <= 1, f"--distill-alpha must be in [0, 1], got {self.distill_alpha}"),
            (self.temperature > 0, f"--temperature must be positive, got {self.temperature}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.distill_lora and self.method != "distill":
            raise UserError("--distill-lora applies to --recover distill only")

    @property
    def uses_lora(self) -> bool:
        return self.method == "lora" or self.distill_lora

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.uses_lora else 1e-4)


def recovery_data(base: Path, tokenizer, corpus: DataConfig | None, seq_len: int, tokens_needed: int, seed: int):
    """The tokens a recovery trains on: the base run's prepared data, or ``corpus`` tokenized with the model's
    tokenizer (documents split train/val as the trainer's data are, read until about 4x the tokens the
    recovery uses, so a large corpus is never tokenized whole)."""
    if corpus is None:
        try:
            return training_data(base)[0]
        except FileNotFoundError:
            raise UserError(f"{base} has no training data here (a Hugging Face model?); pass --calib-corpus") from None
    docs, total = [], 0
    for doc in iter_documents(corpus):
        docs.append(doc)
        total += len(doc.text) // 4  # a cheap bound before tokenizing: 4 characters per token or more
        if total >= 4 * tokens_needed + 20 * (seq_len + 1) and len(docs) >= 40:  # enough to hold some out
            break
    train_docs, val_docs = split_documents(docs, corpus.val_fraction)
    if not val_docs:
        val_docs, train_docs = train_docs[-1:], train_docs[:-1]

    def tokens(ds):
        ids = tokenizer.encode_batch([d.text for d in ds], bos=True, eos=True) if ds else []
        return np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]) if ids else np.zeros(0, np.int64)

    train, val = tokens(train_docs), tokens(val_docs)
    if len(train) <= seq_len + 1 or len(val) <= seq_len + 1:
        raise UserError(
            f"--calib-corpus {corpus.corpus}: too little text for windows of {seq_len + 1} tokens "
            f"({len(train)} train, {len(val)} held-out tokens); use a larger corpus or a smaller --recover-seq-len"
        )
    manifest = {"corpus": {"source": corpus.corpus, "docs": len(docs)}, "seed": seed}
    return PreparedData(Path(corpus.corpus or "stdlib"), manifest, tokenizer, train, val)


def with_lora(model: nn.Module, r: Recovery) -> nn.Module:
    """``model`` with LoRA adapters on its projections (peft), the rest frozen."""
    import peft

    targets = r.lora_targets or lora_targets(model)
    config = peft.LoraConfig(
        r=r.lora_rank, lora_alpha=r.lora_alpha, lora_dropout=r.lora_dropout, target_modules=targets, bias="none"
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # a target that names no module
        raise UserError(f"--lora-targets {targets}: {str(e).splitlines()[0][:200]}") from None


class MaskedLoRA(nn.Module):
    """A LoRA update that stays inside a sparse weight's mask, as a parametrization of the weight:
    weight = mask * (W + (alpha / r) B A), W frozen, A and B trained (A as peft initializes it, B zero).
    Written here because peft's LoRA adds B A x beside the frozen layer, so a mask can only be applied after
    merging, which throws away most of what was trained; peft has no masked variant. Dropout on the input has no
    place in this weight-space form, so a masked LoRA trains without it."""

    def __init__(self, mask: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        rows, cols = mask.shape
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)
        self.A = nn.Parameter(torch.empty(rank, cols))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rows, rank))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        update = (self.B @ self.A).to(weight.dtype)
        return torch.where(self.mask, weight + self.scale * update, torch.zeros((), dtype=weight.dtype))


def with_masked_lora(model: nn.Module, r: Recovery, masks: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with a MaskedLoRA on the weight of each target module, everything else frozen."""
    from torch.nn.utils import parametrize

    targets = r.lora_targets or lora_targets(model)
    model.requires_grad_(False)
    found = set()
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        weight = getattr(module, "weight", None)
        if short in targets and isinstance(weight, nn.Parameter) and weight.dim() == 2:
            mask = masks.get(f"{name}.weight", torch.ones_like(weight, dtype=torch.bool))
            parametrize.register_parametrization(
                module, "weight", MaskedLoRA(mask.to(weight.device), r.lora_rank, r.lora_alpha).to(weight.device)
            )
            found.add(short)
    if missing := [t for t in targets if t not in found]:
        raise UserError(f"--lora-targets {targets}: no weight matrix named {missing} in this model")
    return model


def merged(model: nn.Module) -> nn.Module:
    """The plain model with every LoRA adapter merged into its weights (a masked LoRA: its masked weight)."""
    from torch.nn.utils import parametrize

    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    model.requires_grad_(True)
    return model


def distillation_loss(teacher: nn.Module, alpha: float, temperature: float):
    """(model, x, y) -> alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy, per token."""

    def loss(model, x, y):
        logits = model(x).float()
        with torch.no_grad():
            target = teacher(x).float()
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        student = F.log_softmax(logits / temperature, -1).flatten(0, 1)
        teacher_lp = F.log_softmax(target / temperature, -1).flatten(0, 1)
        kl = F.kl_div(student, teacher_lp, log_target=True, reduction="batchmean")  # per token
        return alpha * temperature**2 * kl + (1 - alpha) * ce

    return loss


@torch.no_grad()
def heldout_loss(model: nn.Module, data: PreparedData, cfg: TrainConfig, device: torch.device) -> float:
    """The loss on the validation batches the trainer evaluates (the same windows), by the trainer's own
    evaluation (one process)."""
    sampler = BatchSampler(data.val, cfg.seq_len, cfg.batch_size, cfg.seed + 1)
    one = D.DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    return evaluate(model, sampler, cfg, one, autocast(device, compute_dtype(cfg.dtype, device)))


def write_state(model: nn.Module, folder: Path, state: dict):
    """A recovery checkpoint's model: its full state (adapters included) as safetensors, for --resume; the
    merged model is written to --out at the end."""
    save_file({k: v.detach().clone().contiguous().cpu() for k, v in state.items()}, str(folder / MODEL_FILE))


def read_state(folder: Path) -> dict:
    return load_file(str(folder / MODEL_FILE))


def pruned(info: dict | None) -> bool:
    """Whether a compression record (or one of the records it was built on) made the model sparse."""
    while isinstance(info, dict):
        if info.get("method") in PRUNING:
            return True
        info = info.get("base_compression")
    return False


def distillation_teacher(base: Path, device: torch.device, vocab: int) -> nn.Module:
    """The uncompressed base, frozen, on ``device``: it must share the student's vocabulary."""
    teacher = load_folder(base, device)[0].eval().requires_grad_(False)
    t_vocab = teacher.tok_embeddings.weight.shape[0]
    if t_vocab != vocab:
        raise UserError(
            f"the teacher {base} has a {t_vocab}-token vocabulary, the student {vocab}: they must share one"
        )
    return teacher


@dataclass(frozen=True)
class RecoveryRecord:
    """What compression.json records of a recovery (its "recovery"): the settings asked for, the rate used, what
    was trained on, tokens and trained parameters, the held-out loss before and after, and where the curves are."""

    settings: Recovery
    lr: float  # the rate used (the settings' own, or the method's default)
    lora_targets: list[str] | None
    teacher: str | None  # distillation: the base folder
    data: str
    tokens: int
    trained_params: int | None
    val_loss_before: float | None
    val_loss_after: float
    sparse: bool
    mask: str | None  # how a sparse model's zeros were kept
    run: str
    loss_curve: str
    train_loss: str  # what the curve's "loss" is
    val_curve: str
    first_loss: float | None
    last_loss: float | None
    finite: bool

    def to_json(self) -> dict:
        asked = dataclasses.asdict(self.settings)
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        return {"method": asked.pop("method"), **asked, **rest}


def recovery_record(
    r: Recovery,
    cfg: TrainConfig,
    model,
    summary: TrainingSummary,
    before,
    after,
    sparse: bool,
    distilled: bool,
    base,
    corpus,
) -> RecoveryRecord:
    """The record of a recovery just trained: its settings, data, tokens, losses before and after, curves."""
    log_dir = Path(cfg.log_dir) / cfg.name
    curve = [(x["step"], x["loss"]) for x in read_jsonl(log_dir / "metrics.jsonl")]
    return RecoveryRecord(
        settings=r,
        lr=r.learning_rate,
        lora_targets=(r.lora_targets or lora_targets(model)) if r.uses_lora else None,
        teacher=str(base) if distilled else None,
        data="training data of the base run" if corpus is None else corpus.corpus,
        tokens=summary.tokens,
        trained_params=summary.trained_params,
        val_loss_before=before,
        val_loss_after=after,
        sparse=sparse,
        mask=("inside the LoRA forward: mask x (W + s B A)" if r.uses_lora else "kept at zero during training")
        if sparse
        else None,
        run=str(Path(cfg.out_dir) / cfg.name),
        loss_curve=str(log_dir / "metrics.jsonl"),
        train_loss=(
            f"{r.distill_alpha} x T^2 x KL(teacher || student) + {1 - r.distill_alpha:g} x cross-entropy, "
            f"T = {r.temperature}"
            if distilled
            else "cross-entropy"
        ),
        val_curve=str(log_dir / "val.jsonl"),
        first_loss=curve[0][1] if curve else None,
        last_loss=curve[-1][1] if curve else None,
        finite=all(math.isfinite(x) for _, x in curve),
    )


def recover(
    compressed: Path,
    base: Path,
    r: Recovery,
    cfg: TrainConfig,
    corpus: DataConfig | None,
    device: torch.device,
    resume: bool = False,
    identity: dict | None = None,
) -> tuple[nn.Module, RecoveryRecord]:
    """Train the model in ``compressed`` by ``r`` as the run ``cfg`` names (folders, device, dtype, compile);
    (the recovered model, merged, on the CPU; what compression.json records). ``identity`` marks the run's
    folders (recovery-of.json) at a fresh start; on resume the held-out loss before training is read back
    from that mark."""
    probe, tokenizer, _ = load_folder(compressed, "cpu")
    seq_len = r.seq_len or cfg.seq_len
    needed = r.steps * r.batch_size * (seq_len + 1)
    data = recovery_data(base, tokenizer, corpus, seq_len, needed, r.seed)
    vocab = probe.tok_embeddings.weight.shape[0]
    if int(data.train.max(initial=0)) >= vocab or int(data.val.max(initial=0)) >= vocab:
        raise UserError(
            f"the recovery tokens go past the model's {vocab}-token vocabulary: a corpus of another tokenizer?"
        )
    sparse = pruned(read_compression(compressed)) or any(
        bool((p == 0).float().mean() > 0.25) for p in probe.parameters() if p.dim() == 2
    )
    masks = {n: (p != 0) for n, p in probe.named_parameters() if p.dim() == 2} if sparse else {}

    teacher = distillation_teacher(base, device, vocab) if r.method == "distill" else None

    def build(dev: torch.device) -> nn.Module:  # the folder read once (probe); each build a fresh copy of it
        torch.manual_seed(r.seed)
        model = copy.deepcopy(probe).to(dev)
        if r.uses_lora and masks:
            return with_masked_lora(model, r, masks)
        return with_lora(model, r) if r.uses_lora else model

    cfg = dataclasses.replace(
        cfg,
        seq_len=seq_len,
        batch_size=r.batch_size,
        grad_accum=1,
        max_steps=r.steps,
        max_tokens=None,
        init_from=None,
        resume=resume,
        overwrite=not resume,
        freeze_zeros=sparse and not r.uses_lora,
        seed=r.seed,
        eval_interval=max(1, r.steps // 4),
        ckpt_interval=max(1, r.steps // 4),
        log_interval=1,
    )
    cfg.optim = dataclasses.replace(
        cfg.optim, lr=r.learning_rate, warmup_steps=min(cfg.optim.warmup_steps, r.steps // 10)
    )
    custom = Custom(
        data=lambda: data,
        model=build,
        loss=None if teacher is None else distillation_loss(teacher, r.distill_alpha, r.temperature),
        write_model=write_state,
        read_state=read_state,
    )
    if resume:
        before = ((identity or {}) | (read_recovery_mark(Path(cfg.out_dir, cfg.name)) or {})).get("val_loss_before")
    else:
        before = heldout_loss(build(device), data, cfg, device)
        if identity is not None:
            mark = json.dumps(identity | {"val_loss_before": before}, indent=2)
            custom.started = lambda ckpt, logs: [atomic_write(d / IDENTITY_FILE, mark) for d in (ckpt, logs)]
    summary = train(cfg, custom)
    model = build(torch.device("cpu"))
    last = sorted(Path(cfg.out_dir, cfg.name).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    model.load_state_dict(read_state(last))
    model = merged(model)
    after = heldout_loss(model.to(device), data, cfg, device)  # the model that is saved, mask and merge included
    model = model.cpu()
    record = recovery_record(r, cfg, model, summary, before, after, sparse, teacher is not None, base, corpus)
    return model, record
