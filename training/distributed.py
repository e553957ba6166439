"""torchrun environment, DDP and FSDP2. Everything here also works in a plain single process.

torchrun --standalone --nproc_per_node=8 -m runners.baseline_8_layer               # DDP
torchrun --standalone --nproc_per_node=8 -m runners.baseline_8_layer --parallel fsdp
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from common.device import pick_device


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:  # only rank 0 logs and saves
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (RANK/WORLD_SIZE in the environment), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return DistInfo(rank, world, local_rank, device)


def wrap_model(model: nn.Module, parallel: str, info: DistInfo) -> nn.Module:
    """DDP or FSDP2 (fully_shard per block, then the root) around ``model``; the model itself unchanged."""
    if not info.enabled:
        return model
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def grad_sync(wrapped: nn.Module, parallel: str, info: DistInfo, sync: bool):
    """Context for one micro-batch's backward; ``sync=False`` skips the gradient all-reduce (accumulation)."""
    if not info.enabled:
        return nullcontext()
    if parallel == "ddp":
        return nullcontext() if sync else wrapped.no_sync()
    wrapped.set_requires_gradient_sync(sync)
    return nullcontext()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG if x.device.type == "cuda" else dist.ReduceOp.SUM)
        if x.device.type != "cuda":  # gloo has no AVG
            x /= info.world_size
    return x


def local(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``x``'s whole value: FSDP2 returns a sharded DTensor from clip_grad_norm_ (its
    ``full_tensor`` gathers it); any other tensor is returned as it is."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def barrier(info: DistInfo):
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo, ok: bool = True):
    """Leave the process group; after a failure (``ok`` false: a peer may be gone) without waiting for the
    others, who may never come."""
    if info.enabled and dist.is_initialized():
        if ok:
            dist.barrier()  # gloo aborts ("terminate called ...") if a rank tears down while another still talks
        dist.destroy_process_group()


def lost_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because another process of the run is gone (gloo and NCCL say so in text;
    torch's own DistError types are raised by some paths)."""
    text = str(e).lower()
    return isinstance(e, torch.distributed.DistError) or any(
        w in text for w in ("connection reset", "connection closed", "connection refused", "broken pipe", "nccl")
    )
