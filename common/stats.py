"""The statistics every comparison uses, from scipy: confidence intervals, tests and their effect sizes.

- Quality over seeds (a handful of values per model): mean with a t-distribution 95% confidence interval;
  between two models the paired t-test where their seeds pair up (seed k of every model of a study trains on the
  same batches in the same order), else Welch's t-test (unequal variances).
- Quality over seeds and documents: a bootstrap that resamples seeds and scored documents at once (crossed),
  so an interval also covers which documents happened to be held out (``crossed_bpb``).
- Latency and energy samples (many rounds, skewed, with outliers): medians. Measurements paired by round (or
  by prompt) are compared by their per-pair ratios: the Wilcoxon signed-rank test on the log ratios, with the
  interval that inverts the same test (Hodges-Lehmann), so a verdict and its interval cannot disagree
  (``paired_ratio``). Unpaired samples: the Mann-Whitney U test with its common-language effect size (the
  probability that a draw from A is below a draw from B).
- Many comparisons in one report: Benjamini-Hochberg adjusted p-values (q-values).
- Power (statsmodels): the smallest difference a comparison could have detected at ``ALPHA`` with ``POWER``,
  from its per-seed spread (``detectable``), and the seeds a given difference needs (``seeds_needed``).
- A ratio of differences of means (the fraction of a depth gap a richer block recovers): Fieller's interval over
  seeds, and the crossed bootstrap's over seeds and documents.
- Two models scored item by item on the same questions: McNemar's exact test (accuracy) or a paired bootstrap
  (scores).
A difference is stated only when its adjusted p-value is below ``ALPHA``; otherwise it is "not distinguishable",
with the smallest difference the comparison could have detected beside it.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05
POWER = 0.8  # the power minimum detectable differences are stated at


def mean_ci(values: list[float], confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> dict:
    """Mean and its t-interval; with one value the interval is unknown (None), never zero-width. A metric with
    ``bounds`` (BLEU in [0, 100], pass@1 in [0, 1]) has its interval cut to them, and says so (``clipped``):
    a BLEU of "1.63 +- 1.83" would otherwise reach below zero."""
    xs = [float(v) for v in values]
    n = len(xs)
    out = {"n": n, "mean": statistics.fmean(xs) if xs else None, "values": xs}
    if n >= 2:
        sd = statistics.stdev(xs)
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
        out |= {"sd": sd, "ci_low": out["mean"] - half, "ci_high": out["mean"] + half}
        if bounds is not None:
            low, high = max(bounds[0], out["ci_low"]), min(bounds[1], out["ci_high"])
            out |= {"clipped": (low, high) != (out["ci_low"], out["ci_high"]), "ci_low": low, "ci_high": high}
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


def paired_t(a: list[float], b: list[float]) -> dict:
    """The paired t-test of a vs b (scipy's ttest_rel): ``a[i]`` and ``b[i]`` are one seed of each model; needs at
    least two pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one of each per seed (have {len(a)} and {len(b)})")
    if len(a) < 2:
        return {"test": "paired t", "p": None, "reason": f"needs 2+ paired seeds (have {len(a)})"}
    d = [x - y for x, y in zip(a, b, strict=True)]
    if statistics.pstdev(d) == 0:  # every seed differs by the same amount: no spread to test against
        return {"test": "paired t", "p": 1.0 if d[0] == 0 else 0.0, "diff": statistics.fmean(d), "n": len(d)}
    r = stats.ttest_rel(a, b)
    return {"test": "paired t", "p": float(r.pvalue), "t": float(r.statistic), "diff": statistics.fmean(d), "n": len(d)}


def compare_seeds(a: dict, b: dict) -> dict:
    """Two models' per-seed values (``mean_ci`` dicts that carry ``seeds``, the seed index of each value): the
    paired t-test over the seeds both have, where they share two or more; else Welch's t-test."""
    sa, sb = a.get("seeds"), b.get("seeds")
    if sa is not None and sb is not None:
        common = sorted(set(sa) & set(sb))
        if len(common) >= 2 and len(common) == len(sa) == len(sb):
            va = [a["values"][sa.index(k)] for k in common]
            vb = [b["values"][sb.index(k)] for k in common]
            return paired_t(va, vb) | {"pairs": va, "pairs_b": vb}
    return welch(a["values"], b["values"])


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


def pooled_sd(a: list[float], b: list[float]) -> float | None:
    """The pooled standard deviation of two groups of seeds (the spread a two-sample t-test sees)."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return None
    return math.sqrt(((na - 1) * statistics.variance(a) + (nb - 1) * statistics.variance(b)) / (na + nb - 2))


def detectable(a: list[float], b: list[float], alpha: float = ALPHA, power: float = POWER, m: int = 1) -> dict:
    """The minimum detectable difference (MDD) of a two-sample comparison of ``a`` and ``b`` over seeds: the
    difference of means a two-sided t-test at ``alpha`` finds with probability ``power``, given the spread the
    seeds show (statsmodels' TTestIndPower; effect size times the pooled SD). With ``m`` > 1 comparisons in
    one report, ``mdd_adjusted`` is the same at alpha / m: what a Benjamini-Hochberg verdict needs at worst
    (all other comparisons null), so the detectable difference lies between the two."""
    sd = pooled_sd(a, b)
    out = {"alpha": alpha, "power": power, "n_a": len(a), "n_b": len(b), "sd": sd, "comparisons": m}
    if sd is None:
        return out | {"mdd": None, "reason": f"needs 2+ seeds on each side (have {len(a)} and {len(b)})"}
    return out | {
        "mdd": mdd_of(sd, len(a), len(b), alpha, power),
        "mdd_adjusted": mdd_of(sd, len(a), len(b), alpha / m, power),
    }


def detectable_paired(diffs: list[float], alpha: float = ALPHA, power: float = POWER, m: int = 1) -> dict:
    """The minimum detectable mean difference of a paired t-test over ``len(diffs)`` pairs (statsmodels'
    TTestPower on the per-pair differences), at ``alpha`` and at alpha / m (see ``detectable``)."""
    from statsmodels.stats.power import TTestPower

    x = [float(v) for v in diffs]
    out = {"alpha": alpha, "power": power, "n_pairs": len(x), "comparisons": m, "paired": True}
    if len(x) < 2 or statistics.stdev(x) == 0:
        return out | {"sd": None, "mdd": None, "reason": f"needs 2+ pairs that differ (have {len(x)})"}
    sd = statistics.stdev(x)

    def at(level: float) -> float:
        return float(TTestPower().solve_power(effect_size=None, nobs=len(x), alpha=level, power=power)) * sd

    return out | {"sd": sd, "mdd": at(alpha), "mdd_adjusted": at(alpha / m)}


def mdd_paired(sd_diff: float, n_pairs: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The minimum detectable mean difference of a two-sided paired t-test over ``n_pairs`` pairs whose
    differences spread with ``sd_diff`` (statsmodels' TTestPower)."""
    from statsmodels.stats.power import TTestPower

    return float(TTestPower().solve_power(effect_size=None, nobs=n_pairs, alpha=alpha, power=power)) * sd_diff


def worse_beyond_detection(a: list[float], b: list[float]) -> dict | None:
    """The rule for leaving a model out of a study's main runs: ``a`` (its losses, seed by seed) minus ``b`` (the
    plain model's on the same seeds), the smallest mean difference a paired t-test over those seeds could detect
    (80% power), and whether ``a`` is worse by more than that. None with fewer than two pairs or a missing loss."""
    if len(a) != len(b) or len(a) < 2 or any(x is None or not math.isfinite(x) for x in [*a, *b]):
        return None
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    gap, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    mdd = mdd_paired(sd, len(diffs)) if sd > 0 else 0.0
    return {"difference": gap, "mdd": mdd, "left_out": gap > mdd}


def leave_out_verdicts(runs: dict, kinds: dict[str, tuple[int | None, bool]]) -> list[dict]:
    """The rule for leaving a richer model out of a study's main runs, for every richer run that has a plain run of
    its depth: ``runs`` is the learning-rate check's record (tune.json's "runs": each run's chosen rate and its tail
    losses per rate, seed by seed), ``kinds`` each run's (blocks, richer heads). Each verdict: the model, its plain
    run and ``worse_beyond_detection`` of their tail losses at their chosen rates."""

    def tails(name: str) -> list:
        rec = runs[name]
        return next((r["tail_losses"] for r in rec["rates"] if r["lr"] == rec["chosen"]), None) or []

    out = []
    for name, (layers, richer) in kinds.items():
        plain = next((p for p, (n, rich) in kinds.items() if n == layers and not rich), None)
        rule = worse_beyond_detection(tails(name), tails(plain)) if richer and plain else None
        if rule is not None:
            out.append({"model": name, "plain": plain, **rule})
    return out


def pairs_needed(difference: float, sd_diff: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Paired seeds a two-sided paired t-test needs to detect ``difference`` with ``power`` (statsmodels'
    TTestPower); None where the spread is unknown or zero."""
    from statsmodels.stats.power import TTestPower

    if not sd_diff or not difference or not math.isfinite(sd_diff):
        return None
    solver, effect = TTestPower(), abs(difference) / sd_diff
    at_two = solver.power(effect_size=effect, nobs=2, alpha=alpha)
    if math.isnan(at_two) or at_two >= power:
        return 2
    return math.ceil(float(solver.solve_power(effect_size=effect, nobs=None, alpha=alpha, power=power)))


def mdd_of(sd: float, n_a: int, n_b: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The minimum detectable difference of a two-sided two-sample t-test with ``n_a`` and ``n_b`` seeds whose
    values spread with standard deviation ``sd`` (statsmodels' TTestIndPower)."""
    from statsmodels.stats.power import TTestIndPower

    d = TTestIndPower().solve_power(effect_size=None, nobs1=n_a, ratio=n_b / n_a, alpha=alpha, power=power)
    return float(d) * sd


def seeds_needed(difference: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Seeds per model for a two-sided t-test at ``alpha`` to detect ``difference`` with ``power``, given the
    per-seed SD (statsmodels' TTestIndPower, equal groups); None where the spread is unknown or zero."""
    from statsmodels.stats.power import TTestIndPower

    if not sd or not difference or not math.isfinite(sd):
        return None
    solver, effect = TTestIndPower(), abs(difference) / sd
    at_two = solver.power(effect_size=effect, nobs1=2, ratio=1.0, alpha=alpha)
    if math.isnan(at_two) or at_two >= power:  # (the noncentral t overflows to NaN only for huge effects)
        return 2  # the fewest a t-test takes (the solver finds no root below it)
    n = solver.solve_power(effect_size=effect, nobs1=None, ratio=1.0, alpha=alpha, power=power)
    return math.ceil(float(n))


def detectable_ratio(log_ratios: list[float], alpha: float = ALPHA, power: float = POWER) -> dict:
    """The smallest ratio a paired comparison of ``len(log_ratios)`` rounds detects (statsmodels' TTestPower on
    the log ratios, the t-test the signed-rank test approximates): x exp(+-d sd)."""
    from statsmodels.stats.power import TTestPower

    x = [float(v) for v in log_ratios]
    if len(x) < 3 or statistics.stdev(x) == 0:
        return {"alpha": alpha, "power": power, "n": len(x), "mdd_ratio": None}
    d = float(TTestPower().solve_power(effect_size=None, nobs=len(x), alpha=alpha, power=power))
    return {"alpha": alpha, "power": power, "n": len(x), "mdd_ratio": math.exp(d * statistics.stdev(x))}


def fraction_recovered(deep: list[float], shallow: list[float], rich: list[float], confidence: float = 0.95) -> dict:
    """How much of the depth gap a richer shallow model closes, on a lower-is-better metric:
    f = (mean(shallow) - mean(rich)) / (mean(shallow) - mean(deep)); 0 = no better than the plain shallow
    model, 1 = as good as the deeper one. Interval: Fieller's (1954) for a ratio of two normal estimates, with
    the covariance the two differences share through ``shallow``: the f whose numerator a - f b is within
    t * SE(a - f b) of zero, each candidate f with its own Welch-Satterthwaite degrees of freedom (the weights of
    the three models' variances in a - f b change with f). Written out because no library offers Fieller's
    interval for correlated estimates. When the depth gap itself is not significant the interval is unbounded
    (None)."""
    groups = [[float(v) for v in g] for g in (deep, shallow, rich)]
    if min(len(g) for g in groups) < 2:
        return {"fraction": None, "reason": "needs 2+ seeds of each of the three models"}
    (md, ms, mr), (vd, vs, vr) = (
        [statistics.fmean(g) for g in groups],
        [statistics.variance(g) / len(g) for g in groups],
    )
    dfs = [len(g) - 1 for g in groups]
    a, b = ms - mr, ms - md  # recovered, and the whole gap
    out = {"fraction": a / b if b else None, "recovered": a, "gap": b, "confidence": confidence}

    def terms(f: float) -> tuple[float, float, float]:
        # a - f b = f md + (1 - f) ms - mr: the variance each model contributes
        return f * f * vd, (1 - f) ** 2 * vs, vr

    def df_at(f: float) -> float:
        ts = terms(f)
        den = sum(t * t / k for t, k in zip(ts, dfs, strict=True))
        return sum(ts) ** 2 / den if den > 0 else float(sum(dfs))

    def excess(f: float) -> float:  # <= 0 inside the interval
        t = float(stats.t.ppf(0.5 + confidence / 2, df_at(f)))
        return (a - f * b) ** 2 - t * t * sum(terms(f))

    f_hat = out["fraction"]
    if f_hat is None or excess(f_hat) > 0:
        return out | {"ci_low": None, "ci_high": None, "reason": "the depth gap is zero, so not significant: unbounded"}
    ends = []
    for direction in (-1.0, 1.0):
        span = max(1.0, abs(f_hat))
        while excess(f_hat + direction * span) <= 0:  # widen until outside, or give up: unbounded
            span *= 2
            if span > 1e6:
                return out | {"ci_low": None, "ci_high": None, "reason": "the depth gap is not significant: unbounded"}
        ends.append(optimize.brentq(excess, f_hat, f_hat + direction * span, xtol=1e-10))
    return out | {"ci_low": min(ends), "ci_high": max(ends), "df": df_at(f_hat)}


def crossed_bpb(nats: np.ndarray, nbytes: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """Bits per byte of every model and seed in each resample of a bootstrap crossed over seeds and documents:
    ``nats`` (models, seeds, documents) and ``nbytes`` (documents,) -> (resamples, models, seeds). Each resample
    draws the seeds with replacement (the same draw for every model: seed k of every model shares its batches)
    and the documents with replacement (the same for every model and seed), then sums each model's nats and
    the bytes over the drawn documents. Resampling both ways at once is conservative for a crossed design
    (McCullagh, 2000): an interval from it may be a little wide, not narrow. Written out because scipy's
    bootstrap resamples one axis of paired samples, not two crossed ones."""
    nats, nbytes = np.asarray(nats, dtype=float), np.asarray(nbytes, dtype=float)
    _, n_seeds, n_docs = nats.shape
    rng = np.random.default_rng(seed)
    out = np.empty((n_resamples, nats.shape[0], n_seeds))
    for r in range(n_resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        weights = np.bincount(rng.integers(0, n_docs, n_docs), minlength=n_docs)  # how often each document is drawn
        out[r] = nats[:, seeds, :] @ weights / (nbytes @ weights) / math.log(2)
    return out


def percentile_interval(draws: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    x = np.asarray(draws, dtype=float)
    x = x[np.isfinite(x)]
    return float(np.quantile(x, (1 - confidence) / 2)), float(np.quantile(x, (1 + confidence) / 2))


def mcnemar_items(a_correct: list[bool], b_correct: list[bool]) -> dict:
    """Two models' accuracy on the same items, compared item by item: McNemar's exact test (statsmodels) on
    the discordant items (a right where b is wrong, and the reverse)."""
    from statsmodels.stats.contingency_tables import mcnemar

    if len(a_correct) != len(b_correct) or not a_correct:
        raise ValueError(f"need the same items for both models (have {len(a_correct)} and {len(b_correct)})")
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    r = mcnemar(table, exact=True)
    return {
        "test": "mcnemar (exact)",
        "n": len(a),
        "a_only": table[0][1],
        "b_only": table[1][0],
        "diff": float(a.mean() - b.mean()),
        "p": float(r.pvalue),
    }


def paired_bootstrap(a_scores: list[float], b_scores: list[float], seed: int = 0, n_resamples: int = 2000) -> dict:
    """Two models' scores on the same items: the mean per-item difference, its percentile-bootstrap 95% interval
    over items (scipy.stats.bootstrap, paired), and a two-sided p-value from the sign-flip permutation test
    (scipy.stats.permutation_test, samples paired)."""
    a, b = np.asarray(a_scores, dtype=float), np.asarray(b_scores, dtype=float)
    if len(a) != len(b) or len(a) < 3:
        raise ValueError(f"need the same 3+ items for both models (have {len(a)} and {len(b)})")
    d = a - b
    out = {"test": "paired bootstrap / sign-flip permutation", "n": len(d), "diff": float(d.mean())}
    if not d.any():
        return out | {"ci_low": 0.0, "ci_high": 0.0, "p": 1.0}
    ci = stats.bootstrap((d,), np.mean, method="percentile", random_state=seed, n_resamples=n_resamples)
    perm = stats.permutation_test(
        (a, b), lambda x, y: np.mean(x - y), permutation_type="samples", random_state=seed, n_resamples=n_resamples
    )
    return out | {
        "ci_low": float(ci.confidence_interval.low),
        "ci_high": float(ci.confidence_interval.high),
        "p": float(perm.pvalue),
    }
