"""The optimizer (AdamW, fused where it can be, weight decay on matrices only) and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from training.config import TrainConfig


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
    # Frozen parameters (a LoRA run's base weights) are not the optimizer's.
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    o = cfg.optim
    # Fused AdamW (CUDA and, since torch 2.4, CPU): one kernel for every parameter, and it skips its own update
    # when told a step's loss was not finite (found_inf), with no host sync. FSDP's sharded parameters on a CPU
    # (gloo) take the unfused one.
    fused = device.type == "cuda" or cfg.parallel != "fsdp"
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)
