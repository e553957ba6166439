"""One table of every evaluated model, from the evaluators' result JSONs (nothing is re-run).

    python -m visualizations.compare results/                 # -> results/table.md and results/table.csv
    python -m visualizations.compare results/study_tiny/evals --out results/study_tiny --mode eager --batch 1

Latency and energy columns come from one decoding mode and batch size for every model, named in the table;
a value that was not measured is left empty ("-"), and energy that could not be measured reads "unavailable".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.cli import UserError, parse_args, positional, run_main
from common.results import (
    Compression,
    EfficiencyResult,
    HumanEvalResult,
    PerplexityResult,
    QualityResult,
    parse_result,
    read_result,
)
from visualizations import write_tables

# what identifies a model in every table (this flat one and the study's grouped one)
MODEL_COLUMNS = [
    ("model", "model"),
    ("params", "params"),
    ("n_layers", "layers"),
    ("per_head", "per-head"),
    ("compression", "compression"),
]
COLUMNS = MODEL_COLUMNS + [
    ("perplexity", "ppl"),
    ("bits_per_byte", "bpb"),
    ("word_perplexity", "word ppl (lm-eval)"),
    ("bits_per_byte_lm_eval", "bpb (lm-eval)"),
    ("bleu", "BLEU"),
    ("rougeL", "ROUGE-L"),
    ("pass@1", "pass@1"),
    ("prefill_ms", "prefill ms"),
    ("decode_ms", "decode ms/token"),
    ("j_per_token", "J/token"),
    ("memory_bytes", "weights in memory (bytes)"),
    ("disk_bytes", "on disk (bytes)"),
    ("mode", "mode"),
    ("timing_load", "timed while other processes used (cores)"),
]


def per_head_label(row: dict) -> str:
    """ "no", or the richer heads' settings ("64 silu", "32 gelu, no residual", "gate elementwise", "RMSNorm per
    head"): variants stay apart."""
    spec = row.get("head_layer")
    if not spec:  # None: plain blocks; {}: per-head layers whose settings the result did not record
        return "yes" if row.get("per_head") or spec == {} else "no"
    parts = []
    if "hidden_dim" in spec:
        parts.append(
            f"{spec['hidden_dim']} {spec['activation']}" + ("" if spec.get("residual", True) else ", no residual")
        )
    if spec.get("gate"):
        parts.append(f"gate {spec['gate']}")
    if spec.get("head_norm"):
        parts.append("RMSNorm per head")
    return " + ".join(parts) or "yes"  # settings this code does not know: richer heads all the same


def compression_label(c: Compression | None) -> str:
    if c is None:
        return "none"
    m = c.method
    if m == "quantize":
        label = c.quantize
    elif m in ("magnitude", "wanda", "sparsegpt"):
        label = f"{m} {c.pattern}" if c.pattern else f"{m} {round(100 * c.sparsity)}%"
    elif m.startswith("drop-"):
        label = f"drop {c.layers} ({m.removeprefix('drop-')})"
    elif m == "structured":
        label = f"structured h{round(100 * c.head_ratio)}/f{round(100 * c.ffn_ratio)}"
    else:
        label = m
    if c.recovery:  # recovered after compression (compress/recover.py)
        label += f" +{c.recovery.method}{c.recovery.steps}"
    elif c.finetune_steps:  # results written before recovery had its own record
        label += f" +ft{c.finetune_steps}"
    return f"{compression_label(c.base)} + {label}" if c.base else label


def collect(
    results_dir: str | Path, mode: str | None = None, batch: int = 1, skipped: list | None = None
) -> list[dict]:
    """One row per model from every evaluator result in ``results_dir``, each read as its typed result
    (common.results.parse_result). A JSON file that is not a result this table shows (a harness run, a
    side-by-side timing, a table, a result missing its fields) is listed in ``skipped`` with why, never a
    crash."""
    by_model: dict[str, dict] = {}
    skipped = [] if skipped is None else skipped
    for path in sorted(Path(results_dir).glob("*.json")):
        r = read_result(path)  # another schema version: one line naming it
        if r is None:
            raise UserError(f"{path} is not valid JSON; delete it and run its evaluator again")
        if not isinstance(r, dict) or "evaluator" not in r or "model" not in r:
            continue  # not an evaluator's result (a table, a study state ...)
        try:
            typed = parse_result(r)
        except ValueError as e:
            skipped.append((path, f"{e} (written by another version?)"))
            continue
        if type(typed) not in READERS:
            skipped.append((path, f"{r['evaluator']} results have no column in this table"))
            continue
        who = typed.identity
        row = by_model.setdefault(who.model, {"model": who.model})
        READERS[type(typed)](typed, row, mode, batch)
        for key, value in (("params", who.params), ("n_layers", who.n_layers), ("per_head", who.per_head)):
            row.setdefault(key, value)
        row.setdefault("head_layer", who.head_layer)
        if who.compression is not None:  # (an uncompressed model's row gets "none" below)
            row["compression"] = compression_label(Compression.of(who.compression))
    for row in by_model.values():
        row.setdefault("compression", "none")
    return sorted(by_model.values(), key=lambda r: (r.get("n_layers") or 0, r["model"]))


def _quality(r: QualityResult, row: dict, mode, batch):
    row |= {
        "perplexity": r.perplexity.perplexity,
        "bits_per_byte": r.perplexity.bits_per_byte,
        "bleu": r.continuation.bleu,
        "rougeL": r.continuation.rougeL,
        "pass@1": r.humaneval.pass_at_1,
    }


def _perplexity(r: PerplexityResult, row: dict, mode, batch):
    """Either mode of eval.perplexity, each in its own columns (their figures do not compare)."""
    f = r.figures
    if f.mode == "lm-eval":
        row |= {"word_perplexity": f.word_perplexity, "bits_per_byte_lm_eval": f.bits_per_byte}
    elif "perplexity" not in row:  # eval.quality's figure, where there is one, is the table's
        row |= {"perplexity": f.perplexity, "bits_per_byte": f.bits_per_byte}


def _humaneval(r: HumanEvalResult, row: dict, mode, batch):
    row.setdefault("pass@1", r.humaneval.pass_at_1)


def _efficiency(r: EfficiencyResult, row: dict, mode, batch):
    prefill = r.pick(r.prefill, mode, batch)
    decode = r.pick(r.decode, mode, batch)
    row["memory_bytes"], row["disk_bytes"] = r.memory_bytes, r.disk_bytes
    if decode:
        row |= {"decode_ms": decode.ms.median, "mode": decode.mode}
        row["j_per_token"] = decode.energy.figure if decode.energy else None
    if prefill:
        row["prefill_ms"] = prefill.ms.median
    load = r.record.get("load") or {}
    others = load.get("other_processes_cores")
    if isinstance(others, (int, float)):  # each row says how busy the machine was while it was timed
        row["timing_load"] = f"{others:.2f} of {load.get('cores', '?')}" + (" (busy)" if load.get("busy") else "")


READERS = {
    QualityResult: _quality,
    PerplexityResult: _perplexity,
    HumanEvalResult: _humaneval,
    EfficiencyResult: _efficiency,
}


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if key == "params":
        return f"{v / 1e6:.2f}M"
    if key in ("memory_bytes", "disk_bytes"):
        return f"{v:,}"
    if key in ("perplexity", "word_perplexity", "bleu", "rougeL"):
        return f"{v:.2f}"
    if key in ("prefill_ms", "decode_ms", "bits_per_byte", "bits_per_byte_lm_eval", "pass@1"):
        return f"{v:.3f}"
    if key == "j_per_token":
        return f"{v:.3g}"
    return str(v)


def write_table(rows: list[dict], out_dir: str | Path, batch: int = 1) -> tuple[Path, Path]:
    note = (
        f"Latency and energy at batch {batch}; '-' = not measured. ROUGE-L uses rouge-score's default tokenizer "
        "(lowercase [a-z0-9] words only: code symbols and non-Latin text are ignored; the result JSONs also hold "
        "rougeL_code, which keeps them)."
    )
    md_rows = [[per_head_label(r) if k == "per_head" else _fmt(k, r.get(k)) for k, _ in COLUMNS] for r in rows]
    csv_rows = [[r.get(k) for k, _ in COLUMNS] for r in rows]
    return write_tables(Path(out_dir), note, [h for _, h in COLUMNS], md_rows, [k for k, _ in COLUMNS], csv_rows)


def say_skipped(skipped: list[tuple[Path, str]]):
    for path, why in skipped:
        print(f"skipped {path.name}: {why}")


@dataclass
class Args:
    results: str = positional("results", required=False)  # folder of evaluator result JSONs
    out: str | None = None  # default: the results folder
    mode: str | None = None  # decoding mode for latency columns (default: first measured)
    batch: int = 1  # batch size of the latency and energy columns


def main(argv=None):
    a = parse_args(Args(), argv)
    skipped = []
    rows = collect(a.results, a.mode, a.batch, skipped)
    say_skipped(skipped)
    if not rows:
        raise FileNotFoundError(f"no evaluator results in {a.results}; run python -m eval.quality / eval.efficiency")
    md, csv_path = write_table(rows, a.out or a.results, a.batch)
    print(md.read_text())
    print(f"-> {md}, {csv_path}")


if __name__ == "__main__":
    run_main(main)
