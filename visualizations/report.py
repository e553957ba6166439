"""A study's report.md: setup, the comparison table, what the measurements say, and the figures.

Every number in it is read from logs/ and results/; a comparison is only stated where both sides were
measured. Written by ``python -m runners.study``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from common.files import atomic_write
from common.load import describe
from common.records import StudyRecord, TrainingSummary
from common.results import PerplexityResult, QualityResult, Result, SideBySideResult, read_typed
from visualizations.compare import per_head_label
from visualizations.grouped import sentence


def _num(v, fmt):
    return "-" if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, fmt)


HOW_TO_READ = """How to read this report. Each model was trained (or compressed) once per seed; quality is the mean
over seeds with the half-width of its 95% t-interval. Latency was measured for one seed of each model, all models in one
process, in rounds of the rotated order A B C, B C A, ..., beside an A/A control (the reference timed twice)
whose ratio is the run's noise floor: while the control differs from 1, no latency verdict is stated. A
comparison says **lower** or **higher** only when its test, adjusted for the number of comparisons in this
report (Benjamini-Hochberg), gives q < 0.05: for quality the paired t-test over seeds where the two models'
seeds pair up (seed k of every model trains on the same batches in the same order; a compressed model pairs
through its base's seed), else Welch's; for latency the Wilcoxon signed-rank test on the per-round ratios (every
interval printed names its level: the table's, the level its column's verdicts are adjusted to; a comparison
line's, the test's own 95% beside its adjusted q; a ratio whose interval holds 1 is never called a
difference). Otherwise it says **not distinguishable** at the number of seeds or
rounds it had: the difference may be real, but this study cannot tell it from seed-to-seed or round-to-round
variation. Where per-document figures exist, a quality comparison also gives the 95% interval of its difference
from a bootstrap crossed over seeds and scored documents: how far it would hold on other documents of the same
kind. Matched tokens: the two runs compared saw the same number of training tokens (a comparison says so only
where they did). Matched FLOPs: tested only between runs trained to the same FLOP budget (within 5%); runs of
different budgets meet on the quality-against-training-FLOPs plot, since a curve read mid-schedule favours the
run that finished."""


def _first(paths) -> Result | None:
    return next((r for r in map(read_typed, paths) if r is not None), None)


def _machine(device: str | None) -> str:
    """The device without the thread count run_metadata appends: threads differ per step (_threads says)."""
    return re.sub(r" \(\d+ threads\)$", "", device or "unknown device")


def _threads(quality: QualityResult | None, side: SideBySideResult | None, workers: int) -> str:
    parts = []
    if quality:
        parts.append(
            f"quality evaluations ran with {_said(quality.device_threads)} thread(s) each, {workers} step(s) at once"
        )
    if side:
        parts.append(f"latency was timed alone with {_said(side.device_threads)} thread(s)")
    return ("; ".join(parts) + ".") if parts else ""


def _said(v) -> str:
    """A setting as its result recorded it, "?" where it did not."""
    return "?" if v is None else str(v)


def evaluation_sizes(quality: QualityResult | None, side: SideBySideResult | None) -> list[str]:
    """What every figure of the report was measured on, read from the results (one set for the whole report)."""
    out = []
    if quality:
        ppl, cont, he = quality.perplexity, quality.continuation, quality.humaneval
        out += [
            f"- Perplexity and bits per byte: {_num(ppl.tokens_scored, ',')} held-out tokens "
            f"({ppl.source or '?'}"
            + (f": {ppl.sample}" if ppl.sample else ": the first tokens of the split, in its order")
            + f"), windows of {_said(ppl.context)} tokens every {_said(ppl.stride)}; "
            "the same text for every model and every checkpoint."
            + (
                " Left out by the near-duplicate rule fixed before training: "
                + ", ".join(f"{d.get('name') or d.get('sha256')} ({d.get('overlap', 0):.0%})" for d in ppl.excluded)
                + "."
                if ppl.excluded
                else ""
            ),
            f"- Continuations (BLEU, ROUGE-L): {_said(cont.pairs)} held-out documents, prompted with their first "
            f"{_said(cont.prompt_tokens)} tokens, scored against the next {_said(cont.continuation_tokens)}.",
            f"- HumanEval: {_said(he.problems)} of the 164 problems, {_said(he.samples_per_problem)} "
            f"sample(s) each, {_said(he.max_new_tokens)} new tokens, {_said(he.timeout_s)} s per program;"
            f" pass@1 over {_said(he.problems)} problems moves in steps of "
            f"{1 / max(1, he.problems or 1):.3f}.",
        ]
    if side:
        out.append(
            f"- Latency: {_said(side.rounds)} interleaved rounds; decode of {_said(side.n_tokens)} tokens "
            f"after a context of {_said(side.context)}, prefill of {_said(side.prompt_len)} tokens, "
            f"batch {_said(side.batch)}, {side.mode} mode, {_said(side.threads)} thread(s)."
        )
        control = side.control
        if control and control.ci_low is not None:
            out.append(
                f"- A/A control (the reference timed a second time as its own copy): x{control.median:.3f} "
                f"[{control.ci_low:.3f}, {control.ci_high:.3f}], this run's noise floor"
                + (f"; {side.gated}." if side.gated else ": not distinguishable from 1, so verdicts stand.")
            )
        busy = describe(side.load)
        if busy:
            out.append(f"- **Busy machine**: {busy}.")
    return out or ["- (no evaluation results yet)"]


def depth_caveat(comps: list[dict], rows: list[dict]) -> list[str]:
    """Where a deeper baseline is not distinguishably better than a shallower one, the study cannot say whether
    per-head layers let a model use fewer blocks: depth itself has not paid yet at this training length."""
    epochs = {r["model"]: r.get("epochs") for r in rows}
    out = []
    for c in comps:
        if c.get("depth_check") and not (c.get("distinguishable") and c.get("diff", 0) < 0):
            e = epochs.get(c["a"])
            out.append(
                f"- Depth has not paid yet: the deeper baseline {c['a']} is not distinguishably better than "
                f"{c['b']} in bits per byte"
                + (f" after {e:.2f} epochs of training" if isinstance(e, float) else "")
                + ". Until it is, this study cannot say whether per-head layers let a model use fewer blocks; "
                "train longer (more steps or tokens) before reading the per-head comparisons as an answer."
            )
    return out


def power_summary(comps: list[dict]) -> list[str]:
    """One line near the top: the smallest differences this study's comparisons could detect (80% power)."""
    quality = [c for c in comps if (c.get("power") or {}).get("mdd") is not None]
    bpb = sorted(c["power"]["mdd"] for c in quality if c["what"].startswith("bits per byte"))
    latency = sorted(c["power"]["mdd_ratio"] for c in comps if (c.get("power") or {}).get("mdd_ratio"))
    if not bpb and not latency:
        return []
    parts = []
    if bpb:
        parts.append(
            f"differences in bits per byte of {bpb[0]:.4f} to {bpb[-1]:.4f} between two of its models "
            f"(over seeds, {len(bpb)} comparisons)"
        )
    if latency:
        parts.append(f"decode latency ratios beyond x{latency[0]:.3f} to x{latency[-1]:.3f} (side by side)")
    return [
        "Smallest differences this study could detect (80% power at its level, before the adjustment over its "
        f'comparisons): {"; ".join(parts)}. A smaller real difference would read "not distinguishable".',
        "",
    ]


def answer_section(answers: list[dict], comps: list[dict], rows: list[dict]) -> list[str]:
    """The study's answer first: does depth pay (the depth check), how much of the depth gap each richer
    shallower model recovers (intervals over seeds and documents, and over seeds alone), per share of one block's
    cost, and whether the study had the power to see a third of that gap. No fraction of a gap that did not pass
    its depth check is printed. Empty when the study has no such triple."""
    if not answers:
        return []
    by = {r["model"]: r for r in rows}
    lines = ["## The answer", ""]
    checks = {(c["a"], c["b"]): c for c in comps if c.get("depth_check")}
    passed = {}
    for deep, shallow in dict.fromkeys((a["deep"], a["shallow"]) for a in answers):
        c = checks.get((deep, shallow))
        if c is None or c.get("p") is None:
            lines.append(f"- Depth check {deep} vs {shallow}: not tested (too few seeds).")
            passed[(deep, shallow)] = False
            continue
        ok = passed[(deep, shallow)] = bool(c["distinguishable"] and c["diff"] < 0)
        crossed = c.get("crossed")
        interval = (
            f"; 95% interval over seeds and documents [{crossed['ci_low']:+.4f}, {crossed['ci_high']:+.4f}]"
            if crossed
            else ""
        )
        # one sign convention with the comparisons below: the difference is deeper minus shallower (lower is better)
        lines.append(
            f"- Depth check: {deep} minus {shallow} = {c['diff']:+.4f} bits per byte ({_test_name(c)}, "
            f"q = {c['q']:.3g}{interval}): {deep} is "
            + ("**distinguishably better**" if ok else "**not distinguishably better**")
            + (
                "; the fractions below measure against that gap."
                if ok
                else ": depth has not paid, so no fraction of its gap is stated: it would be a ratio over noise."
            )
        )
    answered = [a for a in answers if passed.get((a["deep"], a["shallow"]))]
    if answered:
        lines += ["", *fraction_table(answered, by), "", *fraction_sentences(answered, comps, checks), ""]
        lines.append(
            "Fraction recovered = (plain shallow - richer) / (plain shallow - deeper), in bits per byte, means over "
            "seeds; 0 is no better than the plain model with the same blocks, 1 as good as one block more. Main "
            "interval: percentile bootstrap crossed over seeds (seed k of the three models together) and scored "
            "documents (common/stats.py: crossed_bpb); beside it Fieller's over seeds alone, each candidate fraction "
            "with its own degrees of freedom (fraction_recovered). Share of a block: the richer heads' added "
            "parameters (training FLOPs per token) over what one block more adds; the fraction per share is 1 for "
            "heads exactly as efficient as a block. Figures: tradeoff_decode_ms.png and tradeoff_flops_per_token.png."
        )
    lines += mechanism_lines(answers, by)
    return lines + [""]


def _test_name(c: dict) -> str:
    n = c.get("n") or (c.get("power") or {}).get("n_a")
    return f"paired t-test over {n} seeds" if c.get("test") == "paired t" else f"Welch's t-test over {n} seeds"


def _interval(lo, hi, fmt=".2f", why=None) -> str:
    return f"[{lo:{fmt}}, {hi:{fmt}}]" if lo is not None else f"unbounded ({why or 'too few seeds'})"


def fraction_table(answers: list[dict], by: dict) -> list[str]:
    lines = [
        "| richer model | what it adds | parameters (vs plain, vs deeper) | share of a block: params, FLOPs | "
        "bits per byte | fraction of the depth gap recovered [95%, seeds and documents] | [95%, seeds only] | "
        "fraction per share of a block's params, FLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in answers:
        rich, crossed = by[a["rich"]], a.get("crossed") or {}
        params = [x or 0 for x in a["params"]]
        frac = "-" if a.get("fraction") is None else f"{a['fraction']:.2f}"
        why = crossed.get("reason", "no per-document figures")
        main = _interval(crossed.get("ci_low"), crossed.get("ci_high"), why=why)
        seeds_only = _interval(a.get("ci_low"), a.get("ci_high"), why=a.get("reason"))
        shares = ", ".join(_num(a.get(k), ".2f") for k in ("params_share", "flops_per_token_share"))
        per_share = ", ".join(
            _num(a.get(k), ".2f") for k in ("fraction_per_params_share", "fraction_per_flops_per_token_share")
        )
        lines.append(
            f"| {a['rich']} | {per_head_label(rich)} | {params[0]:,} ({params[0] - params[1]:+,}, "
            f"{params[0] - params[2]:+,}) | {shares} | {rich['bits_per_byte']['mean']:.4f} | {frac} {main} | "
            f"{seeds_only} | {per_share} |"
        )
    return lines


def fraction_sentences(answers: list[dict], comps: list[dict], checks: dict) -> list[str]:
    """Each richer model's verdict, from its main interval (seeds and documents; seeds alone where no documents
    were recorded), and what the study could detect against the plain model of its depth."""
    out = []
    for a in answers:
        crossed = a.get("crossed") or {}
        lo, hi = (crossed.get("ci_low"), crossed.get("ci_high")) if crossed else (a.get("ci_low"), a.get("ci_high"))
        over = "seeds and documents" if crossed else "seeds"
        frac = "-" if a.get("fraction") is None else f"{a['fraction']:.2f}"
        if lo is not None:
            if hi < 0:
                verdict = (
                    "is **worse** than the plain model with as many blocks (it recovers less than none of the gap)"
                )
            elif lo > 1:
                verdict = "is **better** than one block more (it recovers more than all of the gap)"
            elif lo > 0 and hi < 1:
                verdict = "recovers **part** of the gap: more than none of it and less than all of it"
            elif lo > 0:
                verdict = "recovers **more than none** of the gap; it is not distinguishable from recovering all of it"
            elif hi < 1:
                verdict = "recovers **less than all** of the gap; it is not distinguishable from recovering none of it"
            else:
                verdict = "is **not distinguishable** from recovering none of the gap, nor from recovering all of it"
            out.append(f"- {a['rich']} {verdict} (fraction {frac}, 95% interval over {over} [{lo:.2f}, {hi:.2f}]).")
        vs_plain = [
            c
            for c in comps
            if {c["a"], c["b"]} == {a["rich"], a["shallow"]}
            and c.get("a_stat")
            and c["what"].startswith("bits per byte")
        ]
        pw = (vs_plain[0].get("power") or {}) if vs_plain else {}
        gap = -checks[(a["deep"], a["shallow"])]["diff"]
        if pw.get("mdd") is not None and gap:
            adj = pw.get("mdd_adjusted")
            third = (
                "within"
                if (adj or pw["mdd"]) <= gap / 3
                else ("**more than**" if pw["mdd"] > gap / 3 else "at worst more than")
            )
            out.append(
                f"  Power: against {a['shallow']} this study could detect {pw['mdd']:.4f} bits per byte at 80% power "
                f"({pw['mdd'] / gap:.2f} of the depth gap)"
                + (
                    f", {adj:.4f} ({adj / gap:.2f}) after the adjustment over the report's comparisons at worst"
                    if adj
                    else ""
                )
                + f": {third} the third it was designed for."
            )
    return out


def mechanism_lines(answers: list[dict], by: dict) -> list[str]:
    """Induction per model (eval.induction): whether a richer shallow model gains what one more block gains."""
    models = list(dict.fromkeys(m for a in answers for m in (a["deep"], a["shallow"], a["rich"])))
    if not any(by[m].get("induction_random") or by[m].get("induction_heldout") for m in models):
        return []
    lines = [
        "",
        "**Mechanism: in-context repetition.** Loss on the first copy of a repeated sequence minus the loss on the "
        "second (nats per token, mean over seeds ± 95% t-interval; eval.induction): random tokens (an induction "
        "head's signature, Olsson et al., 2022) and spans of held-out text.",
        "",
        "| model | random tokens | held-out text |",
        "|---|---|---|",
    ]
    for m in models:
        lines.append(f"| {m} | {_ci(by[m].get('induction_random'))} | {_ci(by[m].get('induction_heldout'))} |")
    return lines


def _ci(v: dict | None, fmt: str = ".3f") -> str:
    if not v:
        return "-"
    if v.get("ci_high") is None:
        return f"{v['mean']:{fmt}} (n={v['n']})"
    return f"{v['mean']:{fmt}} ± {v['ci_high'] - v['mean']:{fmt}}"


def tune_section(out: Path, rows: list[dict] | None = None) -> list[str]:
    """The learning-rate check (results/<study>/tune.json): every run's grid, its tail losses and the rate chosen."""
    import json

    path = out / "tune.json"
    if not path.is_file():
        return []
    try:
        t = json.loads(path.read_text())
        runs = t["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["## Learning rates", "", f"- {path} is damaged: run the study again to rebuild it.", ""]
    grid = sorted({r["lr"] for rec in runs.values() for r in rec["rates"]})
    lines = [
        "## Learning rates",
        "",
        f"Each model trained at each rate of its grid with seeds 0-{t['seeds'] - 1}, at the full budget; the rate "
        f"of lowest mean training loss over the last {t['tail']:.0%} of the steps was chosen (each loss measured on a "
        "batch before training on it: no held-out text was read to choose), and its runs are the main runs' first "
        "seeds. "
        "A best rate at the edge of a grid would have stopped the study until the grid was extended. Cells: mean "
        "tail loss over seeds (nats); 'diverged' where a seed's loss stopped being finite.",
        "",
        "| model | " + " | ".join(f"{lr:g}" for lr in grid) + " | chosen |",
        "|---|" + "---|" * len(grid) + "---|",
    ]
    for name, rec in runs.items():
        cells = {r["lr"]: r for r in rec["rates"]}
        row = []
        for lr in grid:
            r = cells.get(lr)
            if r is None:
                row.append("-")
            elif r["mean"] is None:
                row.append("diverged")
            else:
                row.append(f"**{r['mean']:.4f}**" if lr == rec["chosen"] else f"{r['mean']:.4f}")
        lines.append(f"| {name} | " + " | ".join(row) + f" | {rec['chosen']:g} |")
    return lines + [""] + keep_rule_lines(runs, rows or [])


def keep_rule_lines(runs: dict, rows: list[dict]) -> list[str]:
    """The rule for leaving a richer model out of the main runs, applied to the check's runs: its tail loss at its
    chosen rate against the plain model of its depth at that model's, paired over the check's seeds; left out where
    it is worse by more than the smallest difference the check could detect (common.stats.leave_out_verdicts)."""
    from common.stats import leave_out_verdicts

    kinds = {
        r["model"]: (r.get("n_layers"), bool(r.get("per_head")))
        for r in rows
        if r.get("kind") == "trained" and r["model"] in runs
    }
    lines = [
        f"| {v['model']} | {v['plain']} | {v['difference']:+.4f} | {v['mdd']:.4f} | "
        + ("**left out by the rule** |" if v["left_out"] else "kept |")
        for v in leave_out_verdicts(runs, kinds)
    ]
    if not lines:
        return []
    head = [
        "Leaving a model out (the rule fixed before the main runs): a richer model's tail loss at its chosen rate "
        "minus the plain model's of its depth at its own, paired over the check's seeds, against the smallest "
        "difference the check could detect (paired t, 80% power); a model worse by more is left out (with "
        "`[tune] leave_out = true` the study stops before its main runs until it is removed from the file).",
        "",
        "| model | plain model | tail-loss difference | smallest detectable | verdict |",
        "|---|---|---|---|---|",
    ]
    return head + lines + [""]


def write_report(
    study: StudyRecord,
    out: Path,
    rows: list[dict],
    comps: list[dict],
    runs: dict[str, dict],
    figures: list[str],
    over_training: dict[str, list[PerplexityResult]],
    answers: list[dict] | None = None,
) -> Path:
    """report.md in ``out``, from the study's record (study.json) and what was measured."""
    quality = _first(sorted((out / "evals").glob("*-quality.json")))
    side = _first([out / "side_by_side.json"])
    meta = quality or side
    lines = [
        f"# Study `{study.name}`",
        "",
        f"Measured on {_machine(meta and meta.device)}, torch {meta.torch_version if meta else '?'}, commit "
        f"`{(meta.git_commit if meta else '?')[:12]}`; report written {time.strftime('%Y-%m-%d %H:%M')}. "
        + _threads(quality, side, study.workers),
        "",
        *([study.about.strip(), ""] if study.about.strip() else []),
        *power_summary(comps),
        "Does a richer model with fewer blocks match deeper baselines and their compressed versions on "
        "quality, latency and energy? Every figure below was measured by the commands of this study; "
        "'-' marks what was not measured.",
        "",
        HOW_TO_READ,
        "",
        *answer_section(answers or [], comps, rows),
        "## What was evaluated",
        "",
        *evaluation_sizes(quality, side),
        "",
        *tune_section(out, rows),
        *training_section(study, runs),
        *measurements_section(out, rows, comps),
        *figures_section(figures),
        *over_training_section(over_training),
        "## Reproduce",
        "",
        "```bash",
        f"python -m runners.study {study.source}",
        "```",
        "",
        f"Per-step logs are in `{out / 'logs'}`; raw results in `{out / 'evals'}`. Every scored document's figures "
        "are in `documents.csv` (index, name, content hash, bytes) and `document_nats.csv` (tokens and nats per "
        "model, seed and document) beside this report: a model's bits per byte on any set of documents is its nats "
        "summed over them / (ln 2 x their bytes summed), so the study can be rescored, bootstrapped or cut to a "
        "subset without its models.",
        "",
    ]
    path = out / "report.md"
    atomic_write(path, "\n".join(lines))
    return path


def training_section(study: StudyRecord, runs: dict[str, dict]) -> list[str]:
    shared = study.workers > 1  # steps ran several at once: their wall-clock times share the machine
    lines = [
        "## Training runs",
        "",
        "| run | runner arguments | params | layers | per-head | train FLOPs/token | tokens | epochs | "
        f"time (s){' †' if shared else ''} | tokens/s{' †' if shared else ''} | final val loss | unigram val loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = {m.name: m.group for m in study.members if m.kind == "trained"}
    for name, r in runs.items():
        s: TrainingSummary | None = r.get("summary")
        command = study.commands.get(groups.get(name, ""), "?")
        lines.append(
            f"| {name} | `{command}` | {_num(s and s.params, ',')} | "
            f"{_num(s and s.n_layers, 'd')} | {per_head_label({'head_layer': s.head_layer}) if s else '-'} | "
            f"{_num(s and s.flops_per_token, '.3g')} | {_num(s and s.tokens, ',')} | "
            f"{_num(s and s.epochs, '.2f')} | "
            f"{_num(s and s.train_time_s, '.0f')} | {_num(s and s.tokens_per_s, ',.0f')} | "
            f"{_num(s and s.final_val_loss, '.4f')} | {_num(s and s.unigram_val_loss, '.4f')} |"
        )
    if shared:
        lines += [
            "",
            f"† Taken with up to {study.workers} steps of the study running at once on this machine: the runs' "
            "times and throughputs say how busy the machine was, not how fast the models train (runs of equal "
            "cost can differ by half). They are not plotted; bench.train_throughput times models side by side.",
        ]
    compressed = sorted({m.group for m in study.members if m.kind == "compressed"})
    if compressed:
        lines += [
            "",
            "Compressed baselines: "
            + "; ".join(f"{name} = `{study.commands.get(name, '?')}`" for name in compressed)
            + ".",
        ]
    return lines


def measurements_section(out: Path, rows: list[dict], comps: list[dict]) -> list[str]:
    seeds = max((r.get("seeds_measured") or 0 for r in rows), default=0)
    lines = ["", "## Comparison", "", (out / "table.md").read_text().strip(), "", "## What the measurements say", ""]
    lines += [f"- {sentence(c, seeds)}" for c in comps] or [
        "- (nothing to compare: each per-head model is compared with the baselines at least as deep, trained or "
        "compressed from one, and this study has no such pair)"
    ]
    lines += depth_caveat(comps, rows)
    latency = [c for c in comps if "ratio" in c]
    if latency and not any(c.get("distinguishable") for c in latency):
        lines.append(
            "- No latency difference between the compared models is distinguishable on this machine at these "
            "rounds: no latency ranking is stated."
        )
    energies = [r.get("energy") for r in rows if r.get("energy")]
    if energies and all(e["method"] == "unavailable" for e in energies):
        lines.append(
            "- Energy per token was not measured on this machine (no NVML or readable RAPL counter): every "
            "J/token field says so, and no energy figure is drawn."
        )
    return lines


CAPTIONS = {
    "training_curves.png": "Training (lines) and validation (dots) loss against steps, every seed of a model "
    "in its family's colour (blue baseline, orange per-head layers, green gated, purple per-head RMSNorm), models "
    "of one family apart by line style and dot marker; against wall-clock time too "
    "where the runs had the machine to themselves.",
    "training_costs.png": "Training time and throughput per run.",
    "tradeoff_decode_ms.png": "Bits per byte (mean, 95% CI over seeds) against decode latency at batch 1 "
    "(median, p10-p90 over interleaved rounds).",
    "tradeoff_decode_ms_compile.png": "Bits per byte (mean, 95% CI over seeds) against compiled decode latency "
    "at batch 1 (torch.compile; median, p10-p90 over interleaved rounds).",
    "tradeoff_params.png": "Bits per byte (mean, 95% CI over seeds) against parameter count.",
    "tradeoff_flops_per_token.png": "Bits per byte (mean, 95% CI over seeds) against training FLOPs per token.",
    "over_training.png": "Held-out quality of periodic checkpoints against training tokens, on the "
    "evaluation set of the table: seed 0 of each model only, in the training curves' colours and styles.",
}


def figures_section(figures: list[str]) -> list[str]:
    lines = ["", "## Figures", ""]
    for f in figures:
        lines += [f"![{f}](plots/{f})", "", CAPTIONS.get(f, f), ""]
    return lines


def over_training_section(over_training: dict[str, list[PerplexityResult]]) -> list[str]:
    if not over_training:
        return []
    lines = [
        "## Checkpoints over training",
        "",
        "Scored on the same held-out text as the table (the study passes eval.quality's --max-tokens and text "
        "options to each checkpoint's eval.perplexity): a run's last checkpoint scores what its own quality "
        "evaluation does (the table shows the mean over seeds).",
        "",
        "| run | step | tokens | perplexity | bits per byte | training energy (J) |",
        "|---|---|---|---|---|---|",
    ]
    for run, pts in over_training.items():
        for p in sorted(pts, key=lambda p: p.step):
            lines.append(
                f"| {run} | {p.step} | {p.tokens:,} | {_num(p.figures.perplexity, '.3f')} | "
                f"{_num(p.figures.bits_per_byte, '.4f')} | {_num(p.energy_j, '.1f')} |"
            )
    return lines + [""]
