"""A study designed before any of it runs (``[design]`` in the study file; ``python -m runners.study FILE --plan``
reads it when there is no pilot): from a stated per-seed spread and a stated scaling law, what each comparison
could detect, the seeds a third of the expected depth gap needs, the tokens per parameter, and what the study costs
in GPU-hours. For a study whose own pilot would cost GPU-hours (the ~100M design), this is the plan a referee reads
first; a pilot, where one runs, replaces the stated spread with a measured one.

The expected depth gap: a loss that follows Kaplan et al. (2020), L(N) = L_ref (N_ref / N)^alpha in non-embedding
parameters N, at the token budget the runs share (a stated ``loss_ref`` at the deepest baseline's N), so the gap
between N_deep and N_shallow is loss_ref * ((N_deep / N_shallow)^alpha - 1). Written here because no library
plans a study of this kind; the power itself is statsmodels'.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

from common.cli import UserError, apply_overrides
from common.stats import ALPHA, POWER, mdd_of, seeds_needed
from llama.model import Transformer, count_params, flops_per_token

CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. (2022): compute-optimal tokens per parameter


@dataclass
class DesignSpec:
    """The ``[design]`` table: what the plan assumes, each with where it comes from."""

    seed_sd: float  # SD of a model's final held-out loss over seeds (nats/token)
    seed_sd_source: str  # where that figure comes from (a pilot scaled, a published run's spread ...)
    loss_ref: float  # expected held-out loss of the deepest baseline at the study's budget (nats/token)
    loss_ref_source: str
    alpha: float = 0.076  # the exponent of L(N) in non-embedding parameters (Kaplan et al., 2020: 0.076)
    mfu: float = 0.35  # model FLOPs utilisation assumed for the cost (nanoGPT reaches ~0.39 at this size on an H100)
    peak_flops: float = 989e12  # the GPU's dense bf16 peak (H100 SXM: 989e12)
    eval_gpu_hours: float = 0.0  # the evaluations' own cost (quality, HumanEval, timing), stated by the file
    notes: list[str] = field(default_factory=list)  # further assumptions, printed with the plan

    def __post_init__(self):
        checks = {
            "seed_sd": 0 < self.seed_sd < 10,
            "loss_ref": 0 < self.loss_ref < 50,
            "alpha": 0 < self.alpha < 1,
            "mfu": 0 < self.mfu <= 1,
            "peak_flops": self.peak_flops > 0,
            "eval_gpu_hours": self.eval_gpu_hours >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise UserError(f"[design] {', '.join(f'{k} = {getattr(self, k)}' for k in bad)} out of range")
        if not self.seed_sd_source.strip() or not self.loss_ref_source.strip():
            raise UserError("[design] seed_sd_source and loss_ref_source must say where those figures come from")


@dataclass
class RunCost:
    name: str
    n_layers: int
    non_embedding: int  # the blocks' parameters: Kaplan's N (no embedding, no output projection)
    params: int
    tokens: int
    flops_per_token: float
    per_head: bool

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    def gpu_hours(self, d: DesignSpec) -> float:
        return self.flops_per_token * self.tokens / (d.peak_flops * d.mfu) / 3600


def run_cost(runner: str, args: list[str], name: str) -> RunCost:
    """A run's sizes, tokens and training FLOPs per token from its runner's config (the model is built on the
    meta device: nothing is allocated)."""
    import torch

    cfg = apply_overrides(importlib.import_module(f"runners.{runner}").config(), list(args))
    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = count_params(model)
    steps = cfg.max_steps if cfg.max_tokens is None else math.ceil(cfg.max_tokens / (cfg.batch_size * cfg.seq_len))
    # Kaplan et al.'s N leaves out the embedding matrices, the output projection included (an untied one counts
    # as one): the blocks' parameters
    head = 0 if cfg.model.tie_embeddings else model.output.weight.numel()
    return RunCost(
        name,
        cfg.model.n_layers,
        counts["non_embedding"] - head,
        counts["total"],
        steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        flops_per_token(cfg.model, cfg.seq_len),
        cfg.model.head_layer is not None or cfg.model.attn_gate is not None or cfg.model.head_norm,
    )


def expected_gap(d: DesignSpec, deep: RunCost, shallow: RunCost) -> float:
    return d.loss_ref * ((deep.non_embedding / shallow.non_embedding) ** d.alpha - 1)


def design_plan(s, d: DesignSpec) -> tuple[str, bool]:
    """The plan of study ``s`` from its design alone, and whether it meets its own bar: every richer model's
    minimum detectable difference against the plain model of its depth at most a third of the expected gap."""
    runs = [run_cost(r.runner, s.run_args(r), r.name) for r in s.runs]
    plain = {r.n_layers: r for r in runs if not r.per_head}
    depths = sorted(plain)
    lines = [f"Design plan for {s.name} ({s.seeds} seeds per model), from its [design] table (no pilot):"]
    lines.append(f"  seed SD {d.seed_sd:g} nats ({d.seed_sd_source})")
    lines.append(f"  loss at the deepest baseline {d.loss_ref:g} nats ({d.loss_ref_source}); L(N) ~ N^-{d.alpha:g}")
    # trainings per model: the learning-rate check's (every rate, its seeds) and the main runs' other seeds
    per_model = {r.name: len(s.grid(r)) * s.tune.seeds + s.seeds - s.tune.seeds if s.tune else s.seeds for r in s.runs}
    lines.append(
        f"  {'run':<28} {'layers':>6} {'params':>12} {'blocks N':>11} {'tokens':>14} {'tok/param':>9} "
        f"{'GPU-h/run':>9} {'runs':>5}"
    )
    train_h = 0.0
    for r in runs:
        h = r.gpu_hours(d)
        train_h += h * per_model[r.name]
        lines.append(
            f"  {r.name:<28} {r.n_layers:>6} {r.params:>12,} {r.non_embedding:>11,} {r.tokens:>14,} "
            f"{r.tokens_per_param:>9.2f} {h:>9.2f} {per_model[r.name]:>5}"
        )
    lines.append(
        f"  training: {train_h:.1f} GPU-hours ({sum(per_model.values())} runs: the learning-rate check's and the main "
        f"seeds) at MFU {d.mfu:g} of {d.peak_flops:.3g} FLOP/s; evaluations {d.eval_gpu_hours:g}; in all "
        f"{train_h + d.eval_gpu_hours:.1f} GPU-hours. Chinchilla's compute-optimal budget is "
        f"{CHINCHILLA_TOKENS_PER_PARAM:g} tokens per parameter."
    )
    ok = True
    mdd = mdd_of(d.seed_sd, s.seeds, s.seeds) if s.seeds >= 2 else math.inf
    for shallow_n, deep_n in zip(depths, depths[1:], strict=False):
        shallow, deep = plain[shallow_n], plain[deep_n]
        gap = expected_gap(d, deep, shallow)
        need = seeds_needed(gap / 3, d.seed_sd)
        meets = mdd <= gap / 3
        ok &= meets
        lines.append(
            f"  depth {deep.name} vs {shallow.name}: expected gap {gap:.4f} nats ({gap / d.loss_ref:.1%} of the loss); "
            f"MDD at {s.seeds} seeds {mdd:.4f} = {mdd / gap:.2f} of the gap ({'within' if meets else 'MORE than'} "
            f"a third); seeds for a third: {need}"
        )
        richer = [r for r in runs if r.per_head and r.n_layers == shallow_n]
        for r in richer:
            share = (r.non_embedding - shallow.non_embedding) / (deep.non_embedding - shallow.non_embedding)
            lines.append(f"    {r.name}: adds {share:.2f} of the parameters the deeper baseline's extra blocks add")
    if len(depths) < 2:
        ok = False
        lines.append("  no two plain baselines of different depth: no depth gap to plan for")
    lines += [f"  note: {n}" for n in d.notes]
    lines.append(
        f"  (two-sided two-sample t-test at alpha = {ALPHA}, power = {POWER}, statsmodels' TTestIndPower, before the "
        "adjustment over the report's comparisons; the study's paired tests, where seeds share their batches, detect "
        "as small a difference or a smaller one)"
    )
    lines.append(f"  the design {'MEETS' if ok else 'does NOT meet'} its bar: MDD <= a third of every expected gap")
    return "\n".join(lines), ok
