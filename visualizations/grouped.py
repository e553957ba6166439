"""A study's models grouped over seeds, and the comparisons its report may state (reads results/ only).

One row per model of the study (all seeds of a run, or of a compressed baseline, together): quality as the
mean and 95% t-interval over seeds with the per-seed values kept; latency from the side-by-side
measurement (median, p10-p90, ratio to the reference with its bootstrap interval); parameters, training
FLOPs per token, training time and epochs from the runs' summaries.

``comparisons`` sets each trained baseline against the next shallower one (the depth check), each model
recovered after compression against the same compression without recovery and against its dense base (bits
per byte, Welch over seeds), and each richer model (per-head layers or gated attention) against every
baseline at least as deep (trained, or compressed from one): bits per byte by Welch's t-test over seeds, at
matched training tokens (the study's runs share a token budget) and at matched training FLOPs (only between
runs trained to the same budget, within 5%: a curve read in the middle of its learning-rate decay would
favour the run that finished its schedule); decode latency by the Wilcoxon signed-rank test on the per-round
log ratios (the rounds are pairs), whose inverted test gives the ratio's interval. All p-values are adjusted
together (Benjamini-Hochberg); a difference is stated only where the adjusted p < 0.05, and every tested
comparison carries its minimum detectable difference (``with_power``). ``depth_answers`` gives the fraction
of the depth gap each richer shallower model recovers.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np

from common.cli import UserError
from common.files import atomic_write
from common.records import StudyRecord, TrainingSummary
from common.results import Compression, read_typed
from common.stats import (
    adjust,
    compare_seeds,
    crossed_bpb,
    detectable,
    detectable_paired,
    detectable_ratio,
    fraction_recovered,
    mean_ci,
    paired_ratio,
    percentile_interval,
)
from visualizations import write_tables
from visualizations.compare import MODEL_COLUMNS, compression_label, per_head_label

# row key -> its figure in a quality result (common.results.QualityResult)
QUALITY = {
    "bits_per_byte": lambda q: q.perplexity.bits_per_byte,
    "perplexity": lambda q: q.perplexity.perplexity,
    "bleu": lambda q: q.continuation.bleu,
    "rougeL": lambda q: q.continuation.rougeL,
    "rougeL_code": lambda q: q.continuation.rougeL_code,
}


# the range each bounded metric lives in: its interval over seeds is cut to it
BOUNDS = {"bleu": (0.0, 100.0), "rougeL": (0.0, 100.0), "rougeL_code": (0.0, 100.0), "bits_per_byte": (0.0, math.inf)}


def group_rows(out: Path, logs_dir: Path) -> list[dict]:
    members = StudyRecord.read(out).members
    side = read_typed(out / "side_by_side.json")
    groups: dict[str, dict] = {}
    for m in members:
        g = groups.setdefault(m.group, {"model": m.group, "kind": m.kind, "base": m.base, "seeds": []})
        q = member_result(out / "evals" / f"{m.name}-quality.json", m.name)
        summary = TrainingSummary.read(logs_dir / m.run) if m.kind == "trained" else None
        g["seeds"].append(
            {"seed": m.seed, "seed_value": m.seed_value, "name": m.name, "quality": q, "summary": summary, "run": m.run}
        )
    rows = []
    for g in groups.values():
        measured = [s for s in g["seeds"] if s["quality"]]
        row = {"model": g["model"], "kind": g["kind"], "base": g["base"], "seeds_measured": len(measured)}
        if measured:
            who = measured[0]["quality"].identity
            compression = Compression.of(who.compression)
            row |= {
                "params": who.params,
                "n_layers": who.n_layers,
                "per_head": who.per_head,
                "head_layer": who.head_layer,
                "compression": compression_label(compression),
            }
            if compression and compression.recovery:  # the same compression unrecovered: the study's twin of it
                row["recovery"] = compression.recovery.method
                row["compression_before_recovery"] = compression_label(compression.before_recovery())
            for key, figure in QUALITY.items():
                pairs = [(s["seed"], v) for s in measured if (v := figure(s["quality"])) is not None]
                row[key] = per_seed([v for _, v in pairs], [k for k, _ in pairs], BOUNDS.get(key)) if pairs else None
            row["documents"] = document_table(measured)
            passes = [s["quality"].humaneval.pass_at_1 for s in measured]
            row["pass@1"] = (
                mean_ci([p for p in passes if p is not None], bounds=(0.0, 1.0))
                if any(p is not None for p in passes)
                else None
            )
        inductions = [
            (s["seed"], member_result(out / "evals" / f"{s['name']}-induction.json", s["name"])) for s in g["seeds"]
        ]
        for kind in ("random", "heldout"):
            pairs = [(k, getattr(r, kind).induction_nats) for k, r in inductions if r and getattr(r, kind)]
            row[f"induction_{kind}"] = per_seed([v for _, v in pairs], [k for k, _ in pairs]) if pairs else None
        summaries = [s["summary"] for s in g["seeds"] if s["summary"]]
        if summaries:
            row |= {
                "flops_per_token": summaries[0].flops_per_token,
                "train_tokens": summaries[0].tokens,
                "epochs": summaries[0].epochs,
                "train_time_s": mean_ci([s.train_time_s for s in summaries]),
                "runs": [s["run"] for s in g["seeds"] if s["summary"]],
                "run_seeds": [s["seed"] for s in g["seeds"] if s["summary"]],
            }
        for path in sorted(out.glob("side_by_side-*.json")):  # further decoding modes timed side by side
            other = read_typed(path)
            if other and g["model"] in other.models:
                row[f"decode_ms_{other.mode}"] = dataclasses.asdict(other.models[g["model"]].decode_ms)
        if side and g["model"] in side.models:
            lat = side.models[g["model"]]
            row["decode_ms"] = dataclasses.asdict(lat.decode_ms)
            row["decode_ms_samples"] = list(lat.decode_samples)
            row["decode_ratio"] = dataclasses.asdict(lat.decode_ratio) if lat.decode_ratio else None
            row["energy"] = lat.energy.flat() if lat.energy else None
            row["latency_reference"] = side.reference
            row["latency_gate"] = side.gated
        rows.append(row)
    return rows


def member_result(path: Path, member: str):
    """The typed result in ``path``, refused in one line unless it is about ``member`` (the model it names, run@step
    or folder, is that member's): a result copied over another model's file never fills that model's row."""
    r = read_typed(path)
    if r is not None and r.identity is not None and r.identity.model.split("@")[0] != member:
        raise UserError(
            f"{path} is a result about {r.identity.model}, not {member}: it was copied or edited; delete it and "
            "run the study again"
        )
    return r


def per_seed(values: list[float], seeds: list[int], bounds: tuple[float, float] | None = None) -> dict:
    """Mean and 95% t-interval over seeds, with each value's seed index (what pairs two models' seeds)."""
    return mean_ci(values, bounds=bounds) | {"seeds": list(seeds)}


def document_table(measured: list[dict]) -> dict | None:
    """The scored documents of every measured seed (their per-document nats and bytes, from the quality results'
    perplexity), aligned by document: None where a seed recorded none or the seeds scored different documents."""
    records = [(s["seed"], s["quality"].perplexity.documents) for s in measured]
    if not records or any(not docs for _, docs in records):
        return None
    keys = [d.sha256 for d in records[0][1]]
    if any([d.sha256 for d in docs] != keys for _, docs in records):
        return None
    return {
        "seeds": [k for k, _ in records],
        "docs": keys,
        "index": [d.index for d in records[0][1]],
        "names": [d.name for d in records[0][1]],
        "nats": [[d.nats for d in docs] for _, docs in records],
        "tokens": [[d.tokens for d in docs] for _, docs in records],
        "bytes": [d.bytes for d in records[0][1]],
    }


def write_documents(rows: list[dict], out: Path) -> list[Path]:
    """Every scored document's figures, enough to rescore, bootstrap or subset the study without its models:
    ``documents.csv`` (each document of the held-out split scored: its index in the split, name, content hash and
    UTF-8 bytes) and ``document_nats.csv`` (per model, seed and document: tokens and summed NLL in nats). A model's
    bits per byte on any set of documents is its nats summed over them / (ln 2 x their bytes summed). Nothing is
    written where no model recorded per-document figures."""
    tables = [(r["model"], r["documents"]) for r in rows if r.get("documents")]
    if not tables:
        return []
    docs: dict[str, tuple] = {}
    nats = io.StringIO()
    w = csv.writer(nats, lineterminator="\n")
    w.writerow(["model", "seed", "sha256", "tokens", "nats"])
    for model, t in tables:
        for i, key in enumerate(t["docs"]):
            docs.setdefault(key, (t["index"][i], t["names"][i], key, t["bytes"][i]))
        for k, seed in enumerate(t["seeds"]):
            for i, key in enumerate(t["docs"]):
                w.writerow([model, seed, key, t["tokens"][k][i], t["nats"][k][i]])  # str(float) round-trips
    index = io.StringIO()
    w = csv.writer(index, lineterminator="\n")
    w.writerow(["index", "name", "sha256", "bytes"])
    w.writerows(sorted(docs.values()))
    written = [atomic_write(out / "documents.csv", index.getvalue())]
    return written + [atomic_write(out / "document_nats.csv", nats.getvalue())]


def _val_loss_at(curve: list[dict], flops_per_token: float, budget: float) -> float | None:
    """Validation loss at ``budget`` training FLOPs, linearly interpolated on the run's val.jsonl."""
    pts = [(r["tokens"] * flops_per_token, r["val_loss"]) for r in curve]
    if not pts or budget < pts[0][0] or budget > pts[-1][0] * (1 + 1e-9):
        return None
    xs, ys = zip(*pts, strict=True)
    return float(np.interp(budget, xs, ys))


def bpb_comparison(a: dict, b: dict, what: str, **extra) -> dict:
    """Two rows' bits per byte: the paired test where their seeds pair (else Welch's) and the interval over seeds
    and documents."""
    stats = {"a_stat": a["bits_per_byte"], "b_stat": b["bits_per_byte"]}
    return (
        {"a": a["model"], "b": b["model"], "what": what, **extra}
        | stats
        | compare_seeds(a["bits_per_byte"], b["bits_per_byte"])
        | crossed_difference(a, b)
    )


def comparisons(rows: list[dict], logs_dir: Path) -> list[dict]:
    """Every comparison the report states, each with its test, adjusted together."""
    out = depth_checks(rows) + variant_comparisons(rows) + recovery_comparisons(rows)
    out += [
        c
        for ph in rows
        if ph.get("per_head") and ph["kind"] == "trained"
        for c in richer_vs_baselines(ph, rows, logs_dir)
    ]
    out = with_power(adjust(out))
    gate = next((r["latency_gate"] for r in rows if r.get("latency_gate")), None)
    for c in out:
        if "ratio" in c and gate:  # the side-by-side's A/A control differed: no latency verdict at all
            c["distinguishable"], c["gated"] = False, gate
    return out


def depth_checks(rows: list[dict]) -> list[dict]:
    """Does depth pay at all here? Each trained baseline against the next shallower one: where the deeper is not
    better, the study cannot speak to whether richer heads replace blocks (the report says so)."""
    depth = {r["model"]: r.get("n_layers") or 0 for r in rows}
    plain = sorted(
        (r for r in rows if r["kind"] == "trained" and not r.get("per_head") and r.get("bits_per_byte")),
        key=lambda r: depth[r["model"]],
    )
    return [
        bpb_comparison(deep, shallow, "bits per byte, deeper vs shallower baseline", depth_check=True)
        for shallow, deep in zip(plain, plain[1:], strict=False)
        if depth[deep["model"]] > depth[shallow["model"]]
    ]


def variant_comparisons(rows: list[dict]) -> list[dict]:
    """Richer-head variants of one depth (hidden size, activation, gate, norm) against each other."""
    rich = [r for r in rows if r.get("per_head") and r["kind"] == "trained" and r.get("bits_per_byte")]
    return [
        bpb_comparison(a, b, "bits per byte, richer-head variants of one depth")
        for i, a in enumerate(rich)
        for b in rich[i + 1 :]
        if a.get("n_layers") == b.get("n_layers") and a.get("head_layer") != b.get("head_layer")
    ]


def recovery_comparisons(rows: list[dict]) -> list[dict]:
    """Each recovered model against the same compression unrecovered (where the study has it) and against the
    dense model it was compressed from."""
    by_name, out = {r["model"]: r for r in rows}, []
    for r in (r for r in rows if r.get("recovery") and r.get("bits_per_byte")):
        twins = [
            o
            for o in rows
            if o["kind"] == "compressed"
            and o["base"] == r["base"]
            and not o.get("recovery")
            and o.get("compression") == r["compression_before_recovery"]
        ]
        for other, what in [(t, "recovered vs not") for t in twins] + [(by_name.get(r["base"]), "recovered vs dense")]:
            if other is not None and other.get("bits_per_byte"):
                out.append(bpb_comparison(r, other, f"bits per byte, {what}"))
    return out


def richer_vs_baselines(ph: dict, rows: list[dict], logs_dir: Path) -> list[dict]:
    """A richer model against every baseline at least as deep (trained, or compressed from one): bits per byte at
    matched tokens, validation loss at matched FLOPs, decode latency side by side."""
    by_name, out = {r["model"]: r for r in rows}, []
    for other in rows:
        if other is ph or other.get("per_head"):
            continue
        base = by_name.get(other["base"]) if other["kind"] == "compressed" else other
        if base is None or (base.get("n_layers") or 0) < (ph.get("n_layers") or 0):
            continue  # only baselines at least as deep as the richer model (or compressed from one)
        pair = {"a": ph["model"], "b": other["model"]}
        # an external model is one model (no seeds): shown in the table, not tested for quality
        if ph.get("bits_per_byte") and other.get("bits_per_byte") and other["kind"] != "external":
            tokens = (ph.get("train_tokens"), base.get("train_tokens"))
            matched = "matched tokens" if tokens[0] == tokens[1] else f"tokens differ: {tokens[0]} vs {tokens[1]}"
            out.append(bpb_comparison(ph, other, f"bits per byte ({matched})"))
        if other["kind"] == "trained" and ph.get("flops_per_token") and other.get("flops_per_token"):
            out.append(pair | _matched_flops(ph, other, logs_dir))
        if ph.get("decode_ms_samples") and other.get("decode_ms_samples"):
            # interleaved rounds are pairs: the ratio, its interval and its test are one (paired_ratio)
            ratio = paired_ratio(ph["decode_ms_samples"], other["decode_ms_samples"])
            logs = np.log(ph["decode_ms_samples"]) - np.log(other["decode_ms_samples"])
            out.append(
                pair | {"what": "decode ms/token (side by side)", "ratio": ratio, "log_ratios": logs.tolist()} | ratio
            )
    return out


def with_power(comps: list[dict]) -> list[dict]:
    """Each tested comparison's minimum detectable difference (statsmodels' power at the report's level and
    80% power, from the spread it measured), at the nominal level and at the level the adjustment over this
    report's comparisons needs at worst: a "not distinguishable" then says how large a difference could hide."""
    m = sum(1 for c in comps if c.get("p") is not None)
    for c in comps:
        if c.get("p") is None:
            continue
        if "log_ratios" in c:
            c["power"] = detectable_ratio(c["log_ratios"]) | {"mdd_ratio_adjusted": None}
            if m > 1:
                c["power"]["mdd_ratio_adjusted"] = detectable_ratio(c["log_ratios"], alpha=0.05 / m)["mdd_ratio"]
        elif c.get("test") == "paired t" and c.get("pairs"):
            c["power"] = detectable_paired([x - y for x, y in zip(c["pairs"], c["pairs_b"], strict=True)], m=m)
        elif c.get("a_stat") and c.get("b_stat"):
            c["power"] = detectable(c["a_stat"]["values"], c["b_stat"]["values"], m=m)
    return comps


def aligned_documents(rows: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """(nats (models, seeds, documents), bytes (documents,)) of ``rows`` over the seeds they all have, or None
    where one has no per-document figures or they scored different documents."""
    tables = [r.get("documents") for r in rows]
    if any(t is None for t in tables) or any(t["docs"] != tables[0]["docs"] for t in tables):
        return None
    seeds = sorted(set.intersection(*(set(t["seeds"]) for t in tables)))
    if len(seeds) < 2:
        return None
    nats = np.array([[t["nats"][t["seeds"].index(k)] for k in seeds] for t in tables])
    return nats, np.asarray(tables[0]["bytes"], dtype=float)


def crossed_difference(a: dict, b: dict, confidence: float = 0.95) -> dict:
    """The 95% interval of mean bits per byte (a - b) from the bootstrap crossed over seeds and documents, where
    both rows have the per-document figures of the same documents (else nothing)."""
    aligned = aligned_documents([a, b])
    if aligned is None:
        return {}
    draws = crossed_bpb(*aligned)
    low, high = percentile_interval(draws[:, 0].mean(1) - draws[:, 1].mean(1), confidence)
    return {"crossed": {"ci_low": low, "ci_high": high, "confidence": confidence, "over": "seeds and documents"}}


def depth_answers(rows: list[dict]) -> list[dict]:
    """The study's answer: for each richer shallow model (per-head layers, a gate or per-head norm, L-1 blocks)
    trained beside a plain L-1 and a plain L-block model, the fraction of the depth gap in bits per byte it
    recovers: Fieller's 95% interval over seeds (common.stats.fraction_recovered) and the bootstrap's over seeds
    and documents; and that fraction per share of one block's parameters and FLOPs it spent (1: as efficient as
    the block itself)."""
    trained = [r for r in rows if r["kind"] == "trained" and r.get("bits_per_byte")]
    plain = {r.get("n_layers"): r for r in trained if not r.get("per_head")}
    out = []
    for rich in (r for r in trained if r.get("per_head")):
        depth = rich.get("n_layers") or 0
        shallow, deep = plain.get(depth), plain.get(depth + 1)
        if shallow is None or deep is None:
            continue
        f = fraction_recovered(
            deep["bits_per_byte"]["values"], shallow["bits_per_byte"]["values"], rich["bits_per_byte"]["values"]
        )
        extra = {
            "params": (rich.get("params"), shallow.get("params"), deep.get("params")),
            "flops_per_token": (
                rich.get("flops_per_token"),
                shallow.get("flops_per_token"),
                deep.get("flops_per_token"),
            ),
            "crossed": crossed_fraction(deep, shallow, rich),
        }
        for key in ("params", "flops_per_token"):  # the share of one block's cost the richer heads spent
            r_, s_, d_ = extra[key]
            share = (r_ - s_) / (d_ - s_) if None not in (r_, s_, d_) and d_ != s_ else None
            extra[f"{key}_share"] = share
            extra[f"fraction_per_{key}_share"] = (
                f["fraction"] / share if share and f.get("fraction") is not None else None
            )
        out.append({"rich": rich["model"], "shallow": shallow["model"], "deep": deep["model"], **f, **extra})
    return out


def crossed_fraction(deep: dict, shallow: dict, rich: dict, confidence: float = 0.95) -> dict | None:
    """The fraction of the depth gap recovered, with the bootstrap's interval over seeds and documents (and the
    depth gap's own): None without aligned per-document figures of the three models."""
    aligned = aligned_documents([deep, shallow, rich])
    if aligned is None:
        return None
    means = crossed_bpb(*aligned).mean(2)  # (resamples, [deep, shallow, rich]): each model's mean over seeds
    gap = means[:, 1] - means[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        fractions = (means[:, 1] - means[:, 2]) / gap
    gap_low, gap_high = percentile_interval(gap, confidence)
    out = {"gap_ci": [gap_low, gap_high], "confidence": confidence, "over": "seeds and documents"}
    out["seeds"], out["documents"] = aligned[0].shape[1], aligned[0].shape[2]
    if gap_low <= 0:  # the gap's own interval reaches zero: a ratio over it has no bounded interval
        return out | {"ci_low": None, "ci_high": None, "reason": "the depth gap's interval reaches zero: unbounded"}
    low, high = percentile_interval(fractions, confidence)
    return out | {"ci_low": low, "ci_high": high}


MATCHED_FLOPS_TOLERANCE = 1.05  # runs whose training FLOPs differ by at most 5% count as trained to one budget


def _matched_flops(a: dict, b: dict, logs_dir: Path) -> dict:
    def curves(row):
        return [
            [json.loads(x) for x in (logs_dir / r / "val.jsonl").read_text().splitlines() if x] for r in row["runs"]
        ]

    ca, cb = curves(a), curves(b)
    budgets = a["flops_per_token"] * a["train_tokens"], b["flops_per_token"] * b["train_tokens"]
    budget = min(budgets)
    if max(budgets) > MATCHED_FLOPS_TOLERANCE * budget:
        # the larger run's curve at the smaller budget is read in the middle of its learning-rate decay, against a
        # run that finished its schedule: biased towards the run that finished. Only runs trained to one budget
        # compare at matched FLOPs; the others meet on the FLOPs frontier plot.
        return {
            "what": f"val loss at matched training FLOPs ({budget:.3g} vs {max(budgets):.3g})",
            "budget_flops": budget,
            "p": None,
            "reason": "trained to different FLOP budgets: a curve read mid-schedule is biased; see the FLOPs plot",
        }
    va = [
        (k, v) for k, c in zip(a["run_seeds"], ca, strict=True) if (v := _val_loss_at(c, a["flops_per_token"], budget))
    ]
    vb = [
        (k, v) for k, c in zip(b["run_seeds"], cb, strict=True) if (v := _val_loss_at(c, b["flops_per_token"], budget))
    ]
    stat = {"what": f"val loss at matched training FLOPs ({budget:.3g})", "budget_flops": budget}
    if not va or not vb:
        return stat | {"p": None, "reason": "the matched budget falls before a run's first validation"}
    sa, sb = (per_seed([v for _, v in x], [k for k, _ in x]) for x in (va, vb))
    return stat | {"a_stat": sa, "b_stat": sb} | compare_seeds(sa, sb)


def sentence(c: dict, seeds: int) -> str:
    """One line of the report for one comparison: what was measured, and only what the test supports."""
    what = c["what"]
    if "ratio" in c:
        r = c["ratio"]
        level = f"{100 * r.get('confidence', 0.95):.4g}%"  # the test's own interval; its q is adjusted
        nums = f"{c['a']} / {c['b']} = x{r['median']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] ({level})"
        n = f"{r['n']} interleaved rounds"
    else:
        sa, sb = c.get("a_stat"), c.get("b_stat")
        nums = f"{c['a']} {_cell(sa)} vs {c['b']} {_cell(sb)}" if sa and sb else f"{c['a']} vs {c['b']}"
        n = f"{c['n']} paired seeds" if c.get("test") == "paired t" else f"{seeds} seed(s), unpaired"
        crossed = c.get("crossed")
        if crossed:
            nums += (
                f" (difference {c.get('diff', 0):+.4f}, 95% interval over seeds and documents "
                f"[{crossed['ci_low']:+.4f}, {crossed['ci_high']:+.4f}])"
            )
    if c.get("p") is None:
        return f"{what}: {nums}; not tested ({c.get('reason', 'too few values')})."
    if c.get("gated"):
        return f"{what}: {nums}; **no verdict**: {c['gated']}."
    if not c["distinguishable"]:
        r = c.get("ratio") or {}
        if r.get("ci_low") is not None and not r["ci_low"] <= 1 <= r["ci_high"]:  # p < 0.05 alone, not q
            return (
                f"{what}: {nums}; **not distinguishable** at {n} once adjusted for this report's comparisons "
                f"(q = {c['q']:.3g}; the unadjusted 95% interval alone excludes 1){_could_detect(c)}."
            )
        return f"{what}: {nums}; **not distinguishable** at {n} (q = {c['q']:.3g}){_could_detect(c)}."
    lower = c["ratio"]["median"] < 1 if "ratio" in c else c["diff"] < 0
    return f"{what}: {nums}; {c['a']} is **{'lower' if lower else 'higher'}** (q = {c['q']:.3g}, {n})."


def _could_detect(c: dict) -> str:
    """What a "not distinguishable" could have seen: the minimum detectable difference at 80% power."""
    pw = c.get("power") or {}
    if pw.get("mdd_ratio"):
        adj = pw.get("mdd_ratio_adjusted")
        return f"; it could have detected a ratio beyond x{pw['mdd_ratio']:.3f} (or 1/x) at 80% power" + (
            f", x{adj:.3f} after the adjustment at worst" if adj else ""
        )
    if pw.get("mdd") is not None:
        adj = pw.get("mdd_adjusted")
        return f"; the smallest difference it could have detected is {pw['mdd']:.4f} at 80% power" + (
            f" ({adj:.4f} after the adjustment at worst)" if adj and pw.get("comparisons", 1) > 1 else ""
        )
    return ""


def _cell(v, fmt=".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, dict) and "mean" in v:
        if v.get("ci_high") is None:
            return format(v["mean"], fmt) + f" (n={v['n']})"
        if v.get("clipped"):  # cut to the metric's range: no longer symmetric
            return f"{v['mean']:{fmt}} [{v['ci_low']:{fmt}}, {v['ci_high']:{fmt}}]"
        return f"{v['mean']:{fmt}} ± {v['ci_high'] - v['mean']:{fmt}}"
    if isinstance(v, dict) and "median" in v:
        return f"{v['median']:.3f} ({v['p10']:.3f}-{v['p90']:.3f})"
    if isinstance(v, float):
        return format(v, fmt)
    return str(v)


COLUMNS = MODEL_COLUMNS + [
    ("seeds_measured", "seeds"),
    ("bits_per_byte", "bpb (mean ± 95% CI)"),
    ("perplexity", "ppl"),
    ("bleu", "BLEU"),
    ("rougeL", "ROUGE-L"),
    ("pass@1", "pass@1"),
    ("decode_ms", "decode ms/token, median (p10-p90)"),
    ("decode_ratio", "decode ratio to reference [CI (its level)]"),
    ("induction_random", "induction, random tokens (nats)"),
    ("induction_heldout", "induction, held-out text (nats)"),
    ("energy", "J/token"),
    ("flops_per_token", "train FLOPs/token"),
    ("epochs", "epochs"),
]


INDUCTION = ("induction_random", "induction_heldout")


def _format(key: str, v) -> str:
    if key == "params" and v:
        return f"{v / 1e6:.2f}M"
    if key == "per_head":
        return v if isinstance(v, str) else "yes" if v else "no"
    if key == "decode_ratio":
        if v is None:
            return "reference"
        level = f" ({v['confidence']:.2%})" if v.get("confidence") else " (level not recorded)"
        return f"x{v['median']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]{level}"
    if key in ("induction_random", "induction_heldout"):
        return _cell(v, ".3f")
    if key == "energy":
        return "-" if v is None else ("unavailable" if v["method"] == "unavailable" else _cell(v, ".3g"))
    if key in ("flops_per_token",) and v:
        return f"{v:.3g}"
    if key == "epochs" and v:
        return f"{v:.2f}"
    if key in ("perplexity", "bleu", "rougeL"):
        return _cell(v, ".2f")
    if key == "pass@1":
        return _cell(v, ".3f")
    return _cell(v)


def write_grouped_table(rows: list[dict], out: Path) -> Path:
    note = (
        "Quality: mean ± half-width of the 95% t-interval over seeds (per-seed values in the JSONs); an interval cut "
        "to its metric's range (BLEU and ROUGE in [0, 100], pass@1 in [0, 1]) is printed as [low, high]. Latency: one "
        "seed per model, all models timed in one process in interleaved rounds; each ratio's interval is printed at "
        "the level its verdict was adjusted to (Bonferroni over the models compared), which it names. "
        "ROUGE-L: rouge-score's default tokenizer ([a-z0-9] words only). '-' = not measured."
    )
    # the induction columns only where some model was probed (a study with `induction = []` measures none)
    induction = any(r.get(k) for r in rows for k in INDUCTION)
    if induction:
        note += (
            " Induction: loss on the first copy of a repeated sequence minus the loss on the second "
            "(eval.induction), mean ± 95% t-interval over seeds."
        )
    columns = [(k, h) for k, h in COLUMNS if induction or k not in INDUCTION]
    # every figure of table.md, as numbers: quality as mean and 95% interval over seeds (bpb also per seed)
    header = ["model", "seeds", "bpb_mean", "bpb_ci_low", "bpb_ci_high", "bpb_per_seed"]
    header += [f"{k}_{part}" for k in ("ppl", "bleu", "rougeL", "pass1") for part in ("mean", "ci_low", "ci_high")]
    header += ["decode_ms_median", "decode_ms_p10", "decode_ms_p90"]
    header += ["decode_ratio", "decode_ratio_ci_low", "decode_ratio_ci_high", "j_per_token", "params", "n_layers"]
    header += ["per_head", "compression", "flops_per_token", "epochs", "decode_ratio_confidence"]
    header += [f"induction_{k}_{part}" for k in ("random", "heldout") for part in ("mean", "ci_low", "ci_high")]
    csv_rows = []
    for r in rows:
        b, d, q = r.get("bits_per_byte") or {}, r.get("decode_ms") or {}, r.get("decode_ratio") or {}
        seeds = " ".join(f"{v:.5f}" for v in b.get("values", []))
        quality = []
        for key in ("perplexity", "bleu", "rougeL", "pass@1"):
            m = r.get(key) or {}
            quality += [m.get("mean"), m.get("ci_low"), m.get("ci_high")]
        energy = r.get("energy") or {}
        joules = "unavailable" if energy.get("method") == "unavailable" else energy.get("median")
        csv_rows.append(
            [r["model"], r.get("seeds_measured"), b.get("mean"), b.get("ci_low"), b.get("ci_high"), seeds]
            + quality
            + [d.get("median"), d.get("p10"), d.get("p90"), q.get("median"), q.get("ci_low"), q.get("ci_high")]
            + [joules, r.get("params"), r.get("n_layers")]
            + [per_head_label(r), r.get("compression"), r.get("flops_per_token"), r.get("epochs"), q.get("confidence")]
            + [
                (r.get(f"induction_{k}") or {}).get(p)
                for k in ("random", "heldout")
                for p in ("mean", "ci_low", "ci_high")
            ]
        )
    md_rows = [[_format(k, per_head_label(r) if k == "per_head" else r.get(k)) for k, _ in columns] for r in rows]
    return write_tables(out, note, [h for _, h in columns], md_rows, header, csv_rows)[0]
