"""The statistics every comparison uses, from scipy: confidence intervals, tests and their effect sizes.

- Quality over seeds (a handful of values per model): mean with a t-distribution 95% confidence interval,
  and Welch's t-test between two models (unequal variances).
- Latency and energy samples (many rounds, skewed, with outliers): medians; the Mann-Whitney U test with its
  common-language effect size (the probability that a draw from A is below a draw from B); ratios to a
  reference paired by round, with a bootstrap confidence interval of their median.
- Many comparisons in one report: Benjamini-Hochberg adjusted p-values (q-values).
A difference is stated only when its adjusted p-value is below ``ALPHA``; otherwise it is "not distinguishable".
"""

from __future__ import annotations

import math
import statistics

import numpy as np
from scipy import stats

ALPHA = 0.05


def mean_ci(values: list[float], confidence: float = 0.95) -> dict:
    """Mean and its t-interval; with one value the interval is unknown (None), never zero-width."""
    xs = [float(v) for v in values]
    n = len(xs)
    out = {"n": n, "mean": statistics.fmean(xs) if xs else None, "values": xs}
    if n >= 2:
        sd = statistics.stdev(xs)
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
        out |= {"sd": sd, "ci_low": out["mean"] - half, "ci_high": out["mean"] + half}
    else:
        out |= {"sd": None, "ci_low": None, "ci_high": None}
    return out


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's t-test of mean(a) vs mean(b); needs at least two values on each side."""
    if len(a) < 2 or len(b) < 2:
        return {"test": "welch", "p": None, "reason": f"needs 2+ seeds on each side (have {len(a)} and {len(b)})"}
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:  # identical values: no variance to test
        return {"test": "welch", "p": 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0, "diff": 0.0}
    r = stats.ttest_ind(a, b, equal_var=False)
    return {
        "test": "welch",
        "p": float(r.pvalue),
        "t": float(r.statistic),
        "diff": statistics.fmean(a) - statistics.fmean(b),
    }


def mann_whitney(a: list[float], b: list[float]) -> dict:
    """Two-sided Mann-Whitney U test; ``effect`` = P(a < b) + P(a = b) / 2 (0.5: no difference)."""
    if len(a) < 3 or len(b) < 3:
        return {"test": "mann-whitney", "p": None, "reason": f"needs 3+ samples each (have {len(a)}, {len(b)})"}
    r = stats.mannwhitneyu(a, b, alternative="two-sided")
    # scipy's U counts pairs with a > b (plus half the ties): the probability that a is below b is the rest
    return {"test": "mann-whitney", "p": float(r.pvalue), "effect": 1.0 - float(r.statistic) / (len(a) * len(b))}


def ratio_ci(paired_ratios: list[float], confidence: float = 0.95, seed: int = 0) -> dict:
    """Median of per-round ratios with a percentile-bootstrap interval (scipy.stats.bootstrap)."""
    xs = np.asarray(paired_ratios, dtype=float)
    out = {"median": float(np.median(xs)) if len(xs) else None, "n": len(xs)}
    if len(xs) >= 3 and np.ptp(xs) > 0:
        r = stats.bootstrap(
            (xs,), np.median, confidence_level=confidence, method="percentile", random_state=seed, n_resamples=2000
        )
        out |= {"ci_low": float(r.confidence_interval.low), "ci_high": float(r.confidence_interval.high)}
    elif len(xs):
        out |= {"ci_low": out["median"], "ci_high": out["median"]}
    return out


def adjust(tests: list[dict]) -> list[dict]:
    """Add Benjamini-Hochberg q-values to the tests that have a p-value, and a verdict to every test."""
    ps = [t["p"] for t in tests if t.get("p") is not None]
    qs = iter(stats.false_discovery_control(ps, method="bh") if ps else [])
    for t in tests:
        if t.get("p") is None:
            t["q"], t["distinguishable"] = None, False
        else:
            t["q"] = float(next(qs))
            t["distinguishable"] = t["q"] < ALPHA
    return tests


def kruskal(groups: dict[str, list[float]]) -> dict:
    """Kruskal-Wallis H test: do the groups' distributions differ at all (before any pairwise test)?"""
    kept = {k: v for k, v in groups.items() if len(v) >= 3}
    if len(kept) < 2:
        return {"test": "kruskal-wallis", "p": None, "reason": "needs 2+ groups of 3+ samples"}
    r = stats.kruskal(*kept.values())
    return {"test": "kruskal-wallis", "p": float(r.pvalue), "h": float(r.statistic), "groups": sorted(kept)}
