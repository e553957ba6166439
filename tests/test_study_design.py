"""A study planned from its [design] alone (no pilot): the cost arithmetic, the expected depth gap from the stated
scaling law, the power from statsmodels, and the shipped ~100M design meeting its own bar."""

import math

import pytest
from statsmodels.stats.power import TTestIndPower

from llama.model import flops_per_token
from runners.study_design import DesignSpec, design_plan, expected_gap, run_cost
from runners.study_file import HERE, load_study


def design(**kw) -> DesignSpec:
    base = {"seed_sd": 0.005, "seed_sd_source": "stated", "loss_ref": 1.0, "loss_ref_source": "stated"}
    return DesignSpec(**(base | kw))


def test_the_cost_of_a_run_is_its_flops_over_the_stated_throughput():
    import runners.tiny
    from common.cli import apply_overrides

    args = ["--n-layers", "2", "--max-steps", "100", "--batch-size", "8"]
    r = run_cost("tiny", args, "t")
    cfg = apply_overrides(runners.tiny.config(), list(args))
    assert r.tokens == 100 * 8 * cfg.seq_len and r.n_layers == 2
    assert r.flops_per_token == flops_per_token(cfg.model, cfg.seq_len)
    d = design(mfu=0.5, peak_flops=1e12)
    assert r.gpu_hours(d) == pytest.approx(r.flops_per_token * r.tokens / (0.5e12) / 3600)
    # Kaplan's N: the blocks only (no embedding, no output projection)
    d128 = cfg.model.dim
    assert r.non_embedding == r.params - 2 * cfg.data.vocab_size * d128
    assert r.tokens_per_param == pytest.approx(r.tokens / r.params)


def test_the_expected_gap_is_the_scaling_law_by_hand():
    deep = run_cost("tiny", ["--n-layers", "4"], "d")
    shallow = run_cost("tiny", ["--n-layers", "2"], "s")
    d = design(loss_ref=2.0, alpha=0.1)
    assert expected_gap(d, deep, shallow) == pytest.approx(
        2.0 * ((deep.non_embedding / shallow.non_embedding) ** 0.1 - 1)
    )


def test_the_shipped_100m_design_meets_its_own_bar_and_its_mdd_is_statsmodels():
    s = load_study(HERE / "study_100m.toml")
    text, ok = design_plan(s, s.design)
    assert ok and "the design MEETS its bar" in text
    mdd = TTestIndPower().solve_power(effect_size=None, nobs1=s.seeds, ratio=1.0, alpha=0.05, power=0.8) * 0.005
    assert f"MDD at {s.seeds} seeds {mdd:.4f}" in text
    # fewer seeds would not: the plan says so, and by how much
    s.seeds = 6
    s.tune.seeds = 2
    text, ok = design_plan(s, s.design)
    assert not ok and "MORE than a third" in text and "seeds for a third: 9" in text
    assert math.isfinite(float(text.split("training: ")[1].split(" GPU-hours")[0]))


def test_a_design_without_its_sources_or_with_absurd_figures_is_one_line():
    with pytest.raises(ValueError, match="must say where those figures come from"):
        design(seed_sd_source=" ")
    with pytest.raises(ValueError, match=r"mfu = 1.5 out of range"):
        design(mfu=1.5)
