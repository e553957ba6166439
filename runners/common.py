"""The ~100M configurations shared by the baseline, per-head and gated runners (dim 768, 12 heads, vocab 32000)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from common.cli import run_main
from data.config import DataConfig
from llama.model import HeadLayerArgs, ModelArgs
from training.config import OptimConfig, TrainConfig
from training.trainer import run


def config_100m(n_layers: int, per_head: bool, gate: bool = False) -> TrainConfig:
    kind = "gated" if gate else "perhead" if per_head else "baseline"
    return TrainConfig(
        name=f"{kind}_{n_layers}_layer",
        model=ModelArgs(
            dim=768,
            n_layers=n_layers,
            n_heads=12,
            max_seq_len=1024,
            head_layer=HeadLayerArgs(hidden_dim=64, activation="silu") if per_head else None,
            attn_gate="elementwise" if gate else None,  # gated attention (Qiu et al., 2025), their best variant
        ),
        # every .py of the standard library and installed packages: 80M training tokens with this project's
        # requirements (the standard library alone, 8M, would be repeated about ten times)
        data=DataConfig(corpus="python-sources", vocab_size=32000),
        optim=OptimConfig(lr=6e-4, warmup_steps=200, weight_decay=0.1),
        max_steps=5000,  # 5000 x 16 x 1024 = 82M tokens; summary.json reports the epochs this makes
        batch_size=16,
        seq_len=1024,
        eval_interval=250,
        eval_iters=20,
        ckpt_interval=500,
        keep_last=2,
        keep_every=1000,  # kept for checkpoints-over-training studies
    )


def hundred_m(
    n_layers: int, per_head: bool, gate: bool = False
) -> tuple[Callable[[], TrainConfig], Callable[[], None]]:
    """(config, main) of one ~100M runner: its whole file is this one line and ``main()`` when run."""
    config = functools.partial(config_100m, n_layers=n_layers, per_head=per_head, gate=gate)
    return config, runner_main(config)


def runner_main(config: Callable[[], TrainConfig]) -> Callable[[], None]:
    """A runner's ``main``: its config, the command line's overrides on top, then training; errors in one line."""
    return lambda: run_main(lambda: run(config()))
