"""The statistics behind every stated comparison, and the side-by-side latency measurement."""

import numpy as np
import pytest
import torch

from common.stats import adjust, mann_whitney, mean_ci, ratio_ci, welch


def test_mean_ci_matches_the_t_interval_by_hand():
    r = mean_ci([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.302653: half-width 4.302653 / sqrt(3)
    assert r["mean"] == pytest.approx(2.0) and r["ci_high"] - 2.0 == pytest.approx(4.302653 / 3**0.5, rel=1e-5)
    one = mean_ci([5.0])
    assert one["mean"] == 5.0 and one["ci_low"] is None  # one seed: no interval, never a zero-width one


def test_welch_separates_clear_differences_and_not_noise():
    assert welch([1.0, 1.01, 0.99, 1.0], [2.0, 2.01, 1.99, 2.0])["p"] < 1e-6
    assert welch([1.0, 1.2, 0.8], [1.05, 0.85, 1.15])["p"] > 0.5
    assert welch([1.0], [2.0, 2.1])["p"] is None  # one seed cannot be tested


def test_mann_whitney_effect_and_adjustment():
    fast, slow = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02], [2.0, 2.1, 1.9, 2.05, 1.95, 2.02]
    t = mann_whitney(fast, slow)
    assert t["effect"] == 1.0 and t["p"] < 0.01  # every fast sample is below every slow one
    assert mann_whitney(slow, fast)["effect"] == 0.0
    tests = adjust([{"p": 0.01}, {"p": 0.04}, {"p": 0.5}, {"p": None}])
    assert [t["distinguishable"] for t in tests] == [True, False, False, False]
    assert all(t["q"] >= t["p"] for t in tests[:3])  # adjusted p-values never shrink


def test_ratio_interval_contains_its_median():
    r = ratio_ci([1.9, 2.0, 2.1, 2.05, 1.95, 2.0, 2.02])
    assert r["ci_low"] <= r["median"] == 2.0 <= r["ci_high"] and r["ci_high"] - r["ci_low"] < 0.2


def _entries(samples: dict):
    from eval.side_by_side import _Entry

    out = []
    for name, ms in samples.items():
        e = _Entry(name, None)
        e.decode_ms, e.prefill_ms = list(ms), list(ms)
        out.append(e)
    return out


def test_verdicts_follow_the_tests_not_the_medians():
    from eval.side_by_side import _summarise

    base = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.15, 0.98, 1.02, 1.08]
    slower = [2 * x for x in base]
    noise = [1.01, 1.19, 0.91, 1.09, 1.06, 0.94, 1.14, 0.99, 1.03, 1.07]  # a hair slower in median, not really
    r = _summarise(_entries({"ref": base, "slow": slower, "same": noise}), "ref", None, "no counter")
    slow = r["models"]["slow"]["decode_ratio_to_reference"]
    assert slow["median"] == pytest.approx(2.0) and slow["test"]["verdict"] == "slower than the reference"
    same = r["models"]["same"]["decode_ratio_to_reference"]["test"]
    assert same["verdict"].startswith("not distinguishable") and not same["distinguishable"]
    assert r["models"]["ref"]["energy"] == {"method": "unavailable", "reason": "no counter"}
    alone = _summarise(_entries({"ref": base, "same": noise}), "ref", None, "no counter")
    assert not alone["separated"] and "too noisy" in alone["note"]


def test_side_by_side_times_every_model_every_round(tiny_args):
    from eval.side_by_side import Args, side_by_side
    from llama.model import Transformer

    small = Transformer(tiny_args).eval()
    tiny_args.n_layers = 3
    big = Transformer(tiny_args).eval()
    a = Args(rounds=4, context=8, prompt_len=8, n_tokens=2, energy=False)
    r = side_by_side({"small": small, "big": big}, torch.device("cpu"), a, progress=False)
    assert r["reference"] == "small" and set(r["models"]) == {"small", "big"}
    big_row = r["models"]["big"]
    assert len(big_row["decode_ms_samples"]) == len(big_row["prefill_ms_samples"]) == 4
    assert big_row["decode_ratio_to_reference"]["n"] == 4 and "verdict" in big_row["decode_ratio_to_reference"]["test"]
    assert small.causal_mask is None and big.causal_mask is None  # caches removed afterwards


def test_power_figures_equal_statsmodels_on_a_synthetic_pilot_of_known_spread():
    from statsmodels.stats.power import TTestIndPower

    from common.stats import detectable, mdd_of, seeds_needed

    # two groups of 4 seeds whose sample SD is exactly 0.01 each: the pooled SD is 0.01
    a = [1.0 + 0.01 * x for x in (-1.0, 1.0, -1.0, 1.0)]
    a = [1.0 + (v - 1.0) * (3 / 4) ** 0.5 for v in a]  # sample SD (n - 1) = 0.01
    b = [v + 0.2 for v in a]
    d = detectable(a, b, m=5)
    assert d["sd"] == pytest.approx(0.01, rel=1e-9)
    ref = TTestIndPower().solve_power(effect_size=None, nobs1=4, ratio=1.0, alpha=0.05, power=0.8)
    assert d["mdd"] == pytest.approx(ref * 0.01, rel=1e-9)
    ref_adj = TTestIndPower().solve_power(effect_size=None, nobs1=4, ratio=1.0, alpha=0.01, power=0.8)
    assert d["mdd_adjusted"] == pytest.approx(ref_adj * 0.01, rel=1e-9) and d["mdd_adjusted"] > d["mdd"]
    # the power at the MDD is 80%, by statsmodels' own power function
    assert TTestIndPower().power(effect_size=d["mdd"] / 0.01, nobs1=4, alpha=0.05) == pytest.approx(0.8, abs=1e-6)
    # seeds needed: the smallest n whose power reaches 80% for that difference
    n = seeds_needed(0.01, 0.01)
    assert TTestIndPower().power(effect_size=1.0, nobs1=n, alpha=0.05) >= 0.8
    assert TTestIndPower().power(effect_size=1.0, nobs1=n - 1, alpha=0.05) < 0.8
    assert n == 17 and seeds_needed(0.01, 0.0) is None
    assert seeds_needed(0.5, 0.01) == 2  # a difference 50 SDs wide: the solver has no root, two seeds do
    assert mdd_of(0.01, 6, 6) < d["mdd"]  # more seeds detect less
    assert detectable([1.0], [1.0, 2.0])["mdd"] is None


def test_fieller_interval_is_the_set_of_fractions_a_t_test_does_not_reject():
    from scipy import stats

    from common.stats import fraction_recovered

    deep = [3.00, 3.01, 2.99, 3.005]
    shallow = [3.10, 3.11, 3.09, 3.095]
    rich = [3.05, 3.06, 3.04, 3.052]
    f = fraction_recovered(deep, shallow, rich)
    ms, mr, md = (sum(x) / 4 for x in (shallow, rich, deep))
    assert f["fraction"] == pytest.approx((ms - mr) / (ms - md))
    assert f["ci_low"] < f["fraction"] < f["ci_high"]
    # at each end of the interval the t statistic of (a - f b) is exactly the critical value at that end's own
    # Welch-Satterthwaite degrees of freedom (the three variances weigh f^2, (1 - f)^2 and 1 in a - f b)
    vs, vr, vd = (stats.tvar(x) / 4 for x in (shallow, rich, deep))
    for end in (f["ci_low"], f["ci_high"]):
        a, b = ms - mr, ms - md
        parts = (end * end * vd, (1 - end) ** 2 * vs, vr)
        df = sum(parts) ** 2 / sum(p * p / 3 for p in parts)
        var = (vs + vr) - 2 * end * vs + end * end * (vs + vd)
        assert var == pytest.approx(sum(parts), rel=1e-12)
        assert abs(a - end * b) / var**0.5 == pytest.approx(stats.t.ppf(0.975, df), rel=1e-7)
    # no depth gap: the ratio is unbounded and no interval is printed
    flat = fraction_recovered([3.1, 3.0, 3.2], [3.05, 3.15, 3.1], [3.1, 3.1, 3.0])
    assert flat["ci_low"] is None and "not significant" in flat["reason"]


def test_mcnemar_equals_the_exact_binomial_test_on_the_discordant_items():
    from scipy import stats

    from common.stats import mcnemar_items

    # 40 items: both right 20, only a right 9, only b right 3, both wrong 8
    a = [True] * 20 + [True] * 9 + [False] * 3 + [False] * 8
    b = [True] * 20 + [False] * 9 + [True] * 3 + [False] * 8
    r = mcnemar_items(a, b)
    assert (r["a_only"], r["b_only"], r["n"]) == (9, 3, 40)
    assert r["p"] == pytest.approx(stats.binomtest(3, 12, 0.5).pvalue, rel=1e-12)
    assert r["diff"] == pytest.approx(6 / 40)
    with pytest.raises(ValueError, match="same items"):
        mcnemar_items([True], [True, False])


def test_paired_bootstrap_sees_a_consistent_per_item_gain_that_an_unpaired_view_hides():
    import numpy as np

    from common.stats import paired_bootstrap

    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 60)  # items differ a lot; model a is 0.05 better on every one
    r = paired_bootstrap((base + 0.05).tolist(), base.tolist())
    assert r["diff"] == pytest.approx(0.05) and r["p"] < 0.01 and r["ci_low"] > 0
    same = paired_bootstrap(base.tolist(), base.tolist())
    assert same["p"] == 1.0 and same["diff"] == 0.0


def test_an_a_a_control_that_differs_gates_every_verdict():
    from eval.side_by_side import CONTROL, _summarise

    base = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.15, 0.98, 1.02, 1.08]
    # each round's ratio nudged apart: tied ratios send scipy's Wilcoxon to a permutation test of ~1 s per call
    slower = [2 * x * (1 + 1e-4 * i) for i, x in enumerate(base)]
    drifted = [1.15 * x * (1 + 1e-4 * i) for i, x in enumerate(base)]  # the reference's own copy 15% slower
    r = _summarise(_entries({"ref": base, "slow": slower, CONTROL: drifted}), "ref", None, "none")
    assert CONTROL not in r["models"] and r["control"]["decode_control"]["median"] == pytest.approx(1.15, rel=1e-3)
    slow = r["models"]["slow"]["decode_ratio_to_reference"]["test"]
    assert r["gated"] and "A/A control" in r["gated"] and not r["separated"]
    assert not slow["distinguishable"] and slow["verdict"].startswith("no verdict")
    # a control level with the reference: the verdicts are the tests'
    steady = [x * (1.001 if i % 2 else 0.999) * (1 + 1e-5 * i) for i, x in enumerate(base)]
    r = _summarise(_entries({"ref": base, "slow": slower, CONTROL: steady}), "ref", None, "none")
    assert r["gated"] is None and r["models"]["slow"]["decode_ratio_to_reference"]["test"]["distinguishable"]


def test_intervals_are_printed_at_the_level_the_verdicts_are_adjusted_to():
    from eval.side_by_side import _summarise

    base = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.15, 0.98, 1.02, 1.08, 1.01, 0.97]
    models = {"ref": base}
    for k in range(4):  # four models a little slower each, some of them only barely
        # (each round's ratio nudged apart: tied ratios send scipy's Wilcoxon to a permutation test of ~1 s/call)
        models[f"m{k}"] = [
            x * (1.0 + 0.01 * k) * (1.03 if i % 3 else 0.99) * (1 + 1e-4 * i) for i, x in enumerate(base)
        ]
    r = _summarise(_entries(models), "ref", None, "none")
    assert r["interval_level"] == pytest.approx(1 - 0.05 / 8)
    for name in models:
        if name == "ref":
            continue
        t = r["models"][name]["decode_ratio_to_reference"]["test"]
        excludes_one = not t["ci_low"] <= 1 <= t["ci_high"]
        assert t["distinguishable"] == excludes_one  # a verdict never contradicts its interval


def test_side_by_side_beside_a_cpu_hog_records_the_load_and_its_control_gates_the_verdicts(tiny_args):
    import subprocess
    import sys

    from eval.side_by_side import Args, side_by_side
    from llama.model import Transformer

    small = Transformer(tiny_args).eval()
    tiny_args.n_layers = 3
    big = Transformer(tiny_args).eval()
    hog = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 60\nwhile time.time() < t: pass"])
    try:
        a = Args(rounds=8, context=8, prompt_len=8, n_tokens=4, energy=False)
        r = side_by_side({"small": small, "big": big}, torch.device("cpu"), a, progress=False)
    finally:
        hog.kill()
        hog.wait()
    assert r["load"]["other_processes_cores"] > 0.5 and r["load"]["busy"]  # the hog kept a core busy
    c = r["control"]["decode_control"]
    gated = c["ci_low"] is not None and not c["ci_low"] <= 1 <= c["ci_high"]
    assert (r["gated"] is not None) == gated
    if gated:
        assert not r["separated"] and "no verdict" in r["models"]["big"]["decode_ratio_to_reference"]["test"]["verdict"]


def test_a_bounded_metrics_interval_never_leaves_its_range():
    r = mean_ci([0.0, 0.5, 4.4], bounds=(0.0, 100.0))  # BLEU of three seeds: the t-interval reaches below zero
    assert r["ci_low"] == 0.0 and r["clipped"] and r["ci_high"] > r["mean"]
    inside = mean_ci([40.0, 41.0, 42.0], bounds=(0.0, 100.0))
    assert not inside["clipped"] and inside["ci_low"] > 0


def test_the_reference_may_be_named_as_the_checkpoint_was_given():
    from eval.side_by_side import reference_name

    names = ["tiny_baseline_4l-s0@step_120", "tiny@step_300"]
    ckpts = ["checkpoints/tiny_baseline_4l-s0", "checkpoints/tiny"]
    for given in ("tiny_baseline_4l-s0", "checkpoints/tiny_baseline_4l-s0", "tiny_baseline_4l-s0@step_120"):
        assert reference_name(given, ckpts, names) == names[0]
    assert reference_name("tiny", ckpts, names) == names[1] and reference_name(None, ckpts, names) is None
    assert reference_name("nope", ckpts, names) == "nope"  # side_by_side then says which models there are


def test_the_crossed_bootstrap_equals_direct_resampling_of_seeds_and_documents():
    """The vectorised resamples equal an explicit loop that draws the same seeds and documents, rebuilds the
    resampled table and sums it (2 models, 3 seeds, 5 documents of a synthetic table)."""
    import math

    import numpy as np

    from common.stats import crossed_bpb

    rng = np.random.default_rng(7)
    nats = rng.uniform(50, 150, size=(2, 3, 5))
    nbytes = rng.integers(40, 90, size=5).astype(float)
    fast = crossed_bpb(nats, nbytes, n_resamples=50, seed=3)
    draws = np.random.default_rng(3)
    for r in range(50):
        seeds = draws.integers(0, 3, 3)
        docs = draws.integers(0, 5, 5)
        for m in range(2):
            for j, k in enumerate(seeds):
                direct = sum(nats[m, k, d] for d in docs) / sum(nbytes[d] for d in docs) / math.log(2)
                assert fast[r, m, j] == pytest.approx(direct, rel=1e-12)


def test_the_crossed_bootstrap_widens_with_document_spread_and_seed_spread():
    """Intervals from the crossed bootstrap of the gap between two models grow when the documents disagree about
    the gap, and when the seeds do: each source of variation is in them."""
    import numpy as np

    from common.stats import crossed_bpb, percentile_interval

    rng = np.random.default_rng(0)
    nbytes = np.full(40, 100.0)

    def width(doc_sd: float, seed_sd: float) -> float:
        gap = 2.0 + rng.normal(0, doc_sd, 40)[None, :] + rng.normal(0, seed_sd, 6)[:, None]
        base = np.full((6, 40), 100.0)
        nats = np.stack([base, base + gap])
        draws = crossed_bpb(nats, nbytes, n_resamples=400, seed=1)
        low, high = percentile_interval(draws[:, 1].mean(1) - draws[:, 0].mean(1))
        return high - low

    narrow = width(0.01, 0.01)
    assert width(3.0, 0.01) > 5 * narrow and width(0.01, 3.0) > 5 * narrow


def test_paired_seeds_use_the_paired_t_test_and_its_power():
    from scipy import stats
    from statsmodels.stats.power import TTestPower

    from common.stats import compare_seeds, detectable_paired

    # a seed effect shared by both models (same batches) hides a constant difference from Welch, not from the pairs
    shared = [0.0, 0.05, -0.04, 0.08, -0.02, 0.03]
    a = {"values": [1.0 + s for s in shared], "seeds": list(range(6))}
    b = {"values": [1.01 + s + e for s, e in zip(shared, [0.001, -0.001, 0.002, 0, -0.002, 0.001], strict=True)]}
    b["seeds"] = list(range(6))
    r = compare_seeds(a, b)
    assert r["test"] == "paired t" and r["p"] == pytest.approx(stats.ttest_rel(a["values"], b["values"]).pvalue)
    assert r["p"] < 1e-4 < stats.ttest_ind(a["values"], b["values"], equal_var=False).pvalue
    # seeds that do not pair up (another set): Welch
    b["seeds"] = [0, 1, 2, 3, 4, 7]
    assert compare_seeds(a, b)["test"] == "welch"
    d = [x - y for x, y in zip(a["values"], b["values"], strict=True)]
    pw = detectable_paired(d, m=4)
    sd = float(np.std(d, ddof=1))
    assert pw["mdd"] == pytest.approx(TTestPower().solve_power(nobs=6, alpha=0.05, power=0.8) * sd)
    assert pw["mdd_adjusted"] == pytest.approx(TTestPower().solve_power(nobs=6, alpha=0.05 / 4, power=0.8) * sd)


def test_paired_power_is_statsmodels_ttestpower():
    from statsmodels.stats.power import TTestPower

    from common.stats import mdd_paired, pairs_needed

    assert mdd_paired(0.01, 8) == pytest.approx(TTestPower().solve_power(nobs=8, alpha=0.05, power=0.8) * 0.01)
    n = pairs_needed(0.01, 0.012)
    assert TTestPower().power(effect_size=0.01 / 0.012, nobs=n, alpha=0.05) >= 0.8
    assert TTestPower().power(effect_size=0.01 / 0.012, nobs=n - 1, alpha=0.05) < 0.8
    assert pairs_needed(0.01, 0.0) is None and pairs_needed(1.0, 0.001) == 2
