"""The statistics every comparison uses, from scipy: confidence intervals, tests and their effect sizes.

- Quality over seeds (a handful of values per model): mean with a t-distribution 95% confidence interval,
  and Welch's t-test between two models (unequal variances).
- Latency and energy samples (many rounds, skewed, with outliers): medians. Measurements paired by round (or
  by prompt) are compared by their per-pair ratios: the Wilcoxon signed-rank test on the log ratios, with the
  interval that inverts the same test (Hodges-Lehmann), so a verdict and its interval cannot disagree
  (``paired_ratio``). Unpaired samples: the Mann-Whitney U test with its common-language effect size (the
  probability that a draw from A is below a draw from B).
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


def paired_ratio(a: list[float], b: list[float], confidence: float = 1 - ALPHA) -> dict:
    """A / B from measurements paired by round: the Hodges-Lehmann estimate of the ratio (exp of the median of
    the Walsh averages of the log ratios), the interval of ratios the Wilcoxon signed-rank test (scipy) does not
    reject at 1 - ``confidence``, and that test's p-value for a ratio of 1. The interval is found by inverting
    the very test that gives p, so p < 1 - confidence exactly when the interval excludes 1."""
    d = np.log(np.asarray(a, dtype=float)) - np.log(np.asarray(b, dtype=float))
    n = len(d)
    out = {"test": "wilcoxon signed-rank (log ratios)", "n": n, "confidence": confidence}
    if n < 3:
        return out | {
            "median": float(np.exp(np.median(d))) if n else None,
            "p": None,
            "reason": f"needs 3+ pairs (have {n})",
        }
    alpha = 1 - confidence
    walsh = np.sort((d[:, None] + d[None, :])[np.triu_indices(n)] / 2)

    def p_at(shift: float) -> float:
        x = d - shift
        if not np.any(x):
            return 1.0
        return float(stats.wilcoxon(x, zero_method="wilcox", method="auto").pvalue)

    # p(shift) rises to its peak near the estimate and falls on either side, changing only at Walsh averages:
    # the interval is the run of gaps between consecutive Walsh averages where p >= alpha
    mids = np.concatenate([[walsh[0] - 1.0], (walsh[1:] + walsh[:-1]) / 2, [walsh[-1] + 1.0]])
    estimate = float(np.median(walsh))
    centre = int(np.searchsorted(mids, estimate))
    centre = min(max(centre, 0), len(mids) - 1)

    def edge(step: int) -> int:
        """The farthest gap from the centre (going ``step``) where the test does not reject: a binary search,
        p falling monotonically away from the centre."""
        inside, outside = centre, centre + step * len(mids)  # p(inside) >= alpha (or the centre); outside: past
        while abs(outside - inside) > 1:
            mid = (inside + outside) // 2
            if 0 <= mid < len(mids) and p_at(mids[mid]) >= alpha:
                inside = mid
            else:
                outside = mid
        return inside

    left, right = edge(-1), edge(+1)
    low = walsh[left - 1] if left > 0 else -math.inf
    high = walsh[right] if right < len(walsh) else math.inf
    p = p_at(0.0)
    return out | {
        "median": float(np.exp(estimate)),
        "ci_low": float(np.exp(low)),
        "ci_high": float(np.exp(high)),
        "p": p,
    }


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
    """Add Benjamini-Hochberg q-values to the tests that have a p-value, and a verdict to every test. A test
    that carries an interval (paired_ratio) is distinguishable only if its interval also excludes 1, so the
    verdict never contradicts the interval printed beside it."""
    ps = [t["p"] for t in tests if t.get("p") is not None]
    qs = iter(stats.false_discovery_control(ps, method="bh") if ps else [])
    for t in tests:
        if t.get("p") is None:
            t["q"], t["distinguishable"] = None, False
        else:
            t["q"] = float(next(qs))
            excludes_one = "ci_low" not in t or not t["ci_low"] <= 1.0 <= t["ci_high"]
            t["distinguishable"] = t["q"] < ALPHA and excludes_one
    return tests


def kruskal(groups: dict[str, list[float]]) -> dict:
    """Kruskal-Wallis H test: do the groups' distributions differ at all (before any pairwise test)?"""
    kept = {k: v for k, v in groups.items() if len(v) >= 3}
    if len(kept) < 2:
        return {"test": "kruskal-wallis", "p": None, "reason": "needs 2+ groups of 3+ samples"}
    r = stats.kruskal(*kept.values())
    return {"test": "kruskal-wallis", "p": float(r.pvalue), "h": float(r.statistic), "groups": sorted(kept)}
