"""The statistics behind every stated comparison, and the side-by-side latency measurement."""

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
