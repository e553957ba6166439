"""Result files: what every evaluator writes, and what every reader may take for one. A result is a JSON object
carrying where it was measured (git commit, device, torch and Python versions) beside its figures; it is
written whole (atomically), and replaces only an earlier result, never another file named as its path."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import UserError
from common.files import atomic_write
from common.hardware import run_metadata
from common.typed import SELF, Record, figure, from_record


def same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model folders are one model: the same folder, or two steps (step_N) of one training run."""
    a, b = Path(a).resolve(), Path(b).resolve()
    if a == b:
        return True
    return a.parent == b.parent and a.name.startswith("step_") and b.name.startswith("step_")


def check_result_path(
    path: str | os.PathLike | None, evaluators: tuple[str, ...] = (), model: str | os.PathLike | None = None
):
    """A result may replace only an earlier result of the same evaluator (one of ``evaluators``, where given)
    about the same model (``model``'s folder, where known): never a user's file that happens to be named as
    --out, a training run's summary, another evaluator's result or another model's. A one-line error
    otherwise, raised before any work."""
    if path is None or not os.path.lexists(path):
        return
    path = Path(path)
    try:
        old = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and {"git_commit", "torch_version", "evaluator"} <= set(old)):
        raise UserError(
            f"--out {path} exists and is not a result an evaluator wrote; nothing was changed: name a new file"
        )
    if evaluators and old["evaluator"] not in evaluators:
        raise UserError(
            f"--out {path} holds a {old['evaluator']!r} result, not a {evaluators[0]!r} one; nothing was changed: "
            "name a new file"
        )
    checkpoint = old.get("checkpoint")
    if model is not None and not (isinstance(checkpoint, str) and checkpoint):
        # a result that does not say which model it is about cannot be shown to be this model's: kept
        raise UserError(
            f"--out {path} holds a result that names no model folder (its 'checkpoint' is {checkpoint!r}); "
            "nothing was changed: name a new file"
        )
    if model is not None and not same_model(checkpoint, model):
        raise UserError(
            f"--out {path} holds the result of another model ({old.get('model', checkpoint)}); nothing was "
            "changed: name a new file"
        )


RESULT_SCHEMA = 1  # the version of an evaluator result's layout (write_result / read_result)


def write_result(
    path: str | os.PathLike, payload: dict, device: torch.device, model: str | os.PathLike | None = None
) -> Path:
    """Write ``payload`` (its "evaluator" included) plus where it was measured (commit, device, torch) and the
    schema version as JSON, atomically, once it reads as its typed result (``parse_result``); an existing file
    is replaced only if it is an earlier result of the same evaluator about the same ``model``
    (check_result_path)."""
    check_result_path(path, (payload["evaluator"],), model)
    record = {"schema": RESULT_SCHEMA, **run_metadata(device), **payload}
    parse_result(record)  # what readers take from it is there: an evaluator that left a figure out fails here
    return atomic_write(path, json.dumps(record, indent=2))


def read_versioned(path: str | os.PathLike, version: int, what: str, again: str):
    """A record file as written: None where it is missing or not JSON; a JSON object of another ``schema``
    version is refused in one line naming it (``what`` the record is, ``again`` how to make it anew). Records
    written before versions were recorded read as version 1, the layout they have."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("schema", 1) != version:
        raise UserError(
            f"{path} has {what} schema version {record['schema']!r}; this code reads version {version}: {again}"
        )
    return record


def read_result(path: str | os.PathLike) -> dict | None:
    """An evaluator's result as written (None where the file is missing or not JSON: not measured); one of
    another schema version is refused in one line naming it."""
    return read_versioned(path, RESULT_SCHEMA, "result", "run its evaluator again with this code")


# ---------------------------------------------------------------------------------------------------------
# Which model a result is about (the header of every result), and where per-head settings are read.


def has_richer_heads(head_layer: dict | None) -> bool:
    """Whether a model has per-head layers or a gate: the one place ``per_head`` is derived ({}: settings not
    recorded, still richer heads)."""
    return head_layer is not None


@dataclass(frozen=True)
class Recovery(Record):
    """Training after compression (compress/recover.py): its method (full, lora, distill) and steps."""

    method: str
    steps: int | None = None


@dataclass(frozen=True)
class Compression(Record):
    """What ``python -m compress`` did to make a model (its compression.json, also every result's
    ``compression``), as the loader, the tables and the report read it; the file keeps the rest (sizes,
    calibration, the pruning report, the recovery's settings)."""

    method: str  # magnitude, wanda, sparsegpt, structured, drop-<how>, quantize
    quantize: str | None = None  # the scheme (runtime/quantize.py), also after pruning or dropping
    sparsity: float | None = None
    pattern: str | None = None  # N:M, e.g. 2:4
    layers: int | None = None  # blocks dropped
    head_ratio: float | None = None  # structured pruning: heads and FFN channels kept
    ffn_ratio: float | None = None
    recovery: Recovery | None = None
    finetune_steps: int | None = None  # records written before recovery had its own record
    base: Compression | None = figure("base_compression", default=None)  # the compression of the model it was made from

    @classmethod
    def of(cls, d: dict | None, where: str = "compression") -> Compression | None:
        """The record read by its fields; None for a model that was not compressed (no record, or an empty one)."""
        return from_record(cls, d, where) if d else None

    def before_recovery(self) -> Compression:
        return dataclasses.replace(self, recovery=None)


@dataclass
class ModelIdentity(Record):
    """Which model a result is about: the header of every evaluator's result."""

    model: str  # run@step_N, or the model folder's name
    checkpoint: str  # its folder
    params: int
    n_layers: int
    architecture: str  # perhead-llama, or a transformers model_type
    head_layer: dict | None = None  # the per-head layers' settings (hidden_dim, activation, residual); None: plain
    compression: dict | None = None  # compression.json of a compressed model
    fingerprint: str | None = None  # models.folders.fingerprint of its folder when measured (None: not recorded)

    def __post_init__(self):
        Compression.of(self.compression)  # a compression record readers can read, or none: else ValueError

    @property
    def per_head(self) -> bool:
        return has_richer_heads(self.head_layer)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"per_head": self.per_head}

    @classmethod
    def older(cls, d: dict) -> dict:
        """Results written before these fields were all recorded: no folder, sizes or architecture (read as
        unknown), and per-head layers said only by ``per_head`` (their settings read as unknown, {})."""
        d = {"checkpoint": "", "architecture": "perhead-llama"} | {k: v for k, v in d.items() if v is not None}
        d = d | {k: d.get(k) or 0 for k in ("params", "n_layers")}
        if d.get("head_layer") is None and d.get("per_head"):
            d["head_layer"] = {}
        return d


# ---------------------------------------------------------------------------------------------------------
# Evaluator results, typed: what tables, reports and plots read of each evaluator's figures (``parse_result``;
# ``write_result`` parses a payload the same way before writing it, so what is written is what readers read).
# The file keeps everything else an evaluator records (examples, per-problem outcomes) in ``record``. Every
# class is read by its fields (common.typed.from_record): ``figure`` says where a figure sits and its range.


MAX_BITS_PER_BYTE = 1000.0  # far beyond any model's (a uniform guess over 32k tokens of one byte each is 15)


@dataclass(frozen=True)
class Spread(Record):
    """Median with the 10th and 90th percentiles over ``n`` repeats (common.timing.spread)."""

    median: float = figure(low=0.0)
    p10: float = figure(low=0.0)
    p90: float = figure(low=0.0)
    n: int = figure()


@dataclass(frozen=True)
class Ratio(Record):
    """A ratio to a reference with its interval (common.stats.paired_ratio); the bounds are None where too few
    rounds gave one (or unbounded: too few rounds to reject)."""

    median: float = figure(low=0.0)
    ci_low: float | None = figure(low=0.0, infinite=True, default=None)
    ci_high: float | None = figure(low=0.0, infinite=True, default=None)
    p: float | None = figure(low=0.0, high=1.0, default=None)
    confidence: float | None = figure(low=0.0, high=1.0, default=None)  # the interval's level; None: unknown


@dataclass(frozen=True)
class Energy(Record):
    """Energy per token: a counter's figure, or "unavailable" with the reason (never a guess)."""

    method: str
    j_per_token: float | None = figure(low=0.0, default=None)
    reason: str | None = None

    @property
    def figure(self) -> float | str | None:
        """What a table shows: joules per token, "unavailable", or None (measured, no figure)."""
        return "unavailable" if self.method == "unavailable" else self.j_per_token


@dataclass(frozen=True)
class DocumentFigures(Record):
    """One scored document of a held-out split: who it is (index, name, content hash) and its summed NLL in nats,
    tokens and UTF-8 bytes: what a study rescores, bootstraps or subsets without the model."""

    index: int
    sha256: str
    nats: float = figure(low=0.0)
    tokens: int = figure()
    bytes: int = figure()
    name: str | None = None


@dataclass(frozen=True)
class PerplexityFigures(Record):
    """eval.perplexity's figures: bits per byte always; token perplexity in its own (sliding) mode, word
    perplexity in lm-eval's; and what they were measured on."""

    bits_per_byte: float = figure(low=0.0, high=MAX_BITS_PER_BYTE)
    perplexity: float | None = figure(low=1.0, default=None)
    word_perplexity: float | None = figure(low=1.0, default=None)
    mode: str = "sliding"
    tokens_scored: int | None = None
    source: str | None = None
    sample: str | None = None
    context: int | None = None
    stride: int | None = None
    # per scored document of a held-out split (empty: not recorded)
    documents: tuple[DocumentFigures, ...] = figure("per_document", default=())
    excluded: tuple[dict, ...] = ()  # documents the near-duplicate rule left out (index, name, sha256, overlap)
    near_duplicates: float | None = None  # that rule's threshold (None: no document left out)


@dataclass(frozen=True)
class ContinuationFigures(Record):
    """BLEU and ROUGE-L of greedy continuations (rougeL_code: the tokenizer that keeps code symbols)."""

    bleu: float = figure(low=0.0, high=100.0)
    rougeL: float = figure(low=0.0, high=100.0)
    rougeL_code: float | None = figure(low=0.0, high=100.0, default=None)
    pairs: int | None = None
    prompt_tokens: int | None = None
    continuation_tokens: int | None = None


@dataclass(frozen=True)
class HumanEvalFigures(Record):
    """pass@1 (None where no problem was run) and what it was measured on."""

    scores: dict = figure("pass", repr=False)  # pass@k for each k measured, and what they were measured on
    pass_at_1: float | None = figure(("pass", "pass@1"), low=0.0, high=1.0, default=None)
    problems: int | None = figure(("pass", "problems"), default=None)
    samples_per_problem: int | None = figure(("pass", "samples_per_problem"), default=None)
    timeout_s: float | None = figure(("pass", "timeout_s"), low=0.0, default=None)
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Timing(Record):
    """One prefill row of eval.efficiency: milliseconds in ``mode`` at ``batch``."""

    mode: str
    batch: int
    ms: Spread
    energy: Energy | None = None


@dataclass(frozen=True)
class DecodeTiming(Timing):
    """One decode row of eval.efficiency: milliseconds per token in ``mode`` at ``batch``."""

    ms: Spread = figure("ms_per_token")


@dataclass(frozen=True, kw_only=True)
class Result(Record):
    """What every evaluator result carries: which model, and where it was measured."""

    evaluator: str
    identity: ModelIdentity | None = figure(SELF, when="model")  # None: a result about several models
    device: str = "?"  # common.hardware.run_metadata's: the device and, on a CPU, the threads ("... (2 threads)")
    torch_version: str = "?"
    git_commit: str = "?"
    record: dict = figure(SELF, repr=False, compare=False, default_factory=dict)  # the file as written

    @property
    def device_threads(self) -> int | None:
        """The CPU threads the result was measured with, where its device says."""
        m = re.search(r"\((\d+) threads\)", self.device)
        return int(m.group(1)) if m else None


@dataclass(frozen=True, kw_only=True)
class QualityResult(Result):
    perplexity: PerplexityFigures
    continuation: ContinuationFigures
    humaneval: HumanEvalFigures


@dataclass(frozen=True, kw_only=True)
class PerplexityResult(Result):
    figures: PerplexityFigures = figure(SELF)
    run: str | None = None  # over training: the run, the checkpoint's step, tokens seen and energy spent by then
    step: int | None = None
    tokens: int | None = None
    energy_j: float | None = None


@dataclass(frozen=True, kw_only=True)
class HumanEvalResult(Result):
    humaneval: HumanEvalFigures = figure(SELF)


@dataclass(frozen=True, kw_only=True)
class EfficiencyResult(Result):
    prefill: tuple[Timing, ...]
    decode: tuple[DecodeTiming, ...]
    memory_bytes: int | None = None
    disk_bytes: int | None = None

    @staticmethod
    def pick(rows: tuple[Timing, ...], mode: str | None, batch: int) -> Timing | None:
        """The row measured at ``batch`` in ``mode`` (or, without a mode, in the first mode measured)."""
        return next((t for t in rows if t.batch == batch and (mode is None or t.mode == mode)), None)


@dataclass(frozen=True)
class RoundsEnergy(Record):
    """Energy per token over a side-by-side timing's rounds: the spread of the rounds' joules per token (its
    median, p10, p90 and n beside the method), or "unavailable" with the reason."""

    method: str
    j_per_token: Spread | None = figure(SELF, when="median", default=None)
    reason: str | None = None

    def flat(self) -> dict:
        """As the study's table row holds it: method and reason beside the spread's median, p10, p90, n."""
        spread = dataclasses.asdict(self.j_per_token) if self.j_per_token else {}
        return {"method": self.method, "reason": self.reason, **spread}


@dataclass(frozen=True)
class TimedModel(Record):
    """One model of a side-by-side timing: decode ms per token over the rounds, each round's figure, its ratio
    to the reference (None for the reference), energy."""

    decode_ms: Spread = figure("decode_ms_per_token")
    decode_samples: tuple[float, ...] = figure("decode_ms_samples", low=0.0)
    decode_ratio: Ratio | None = figure("decode_ratio_to_reference", default=None)
    energy: RoundsEnergy | None = None


@dataclass(frozen=True, kw_only=True)
class SideBySideResult(Result):
    reference: str
    mode: str = "eager"
    models: dict[str, TimedModel] = dataclasses.field(default_factory=dict)
    gated: str | None = None  # why no latency verdict stands (the A/A control differed from 1), else None
    control: Ratio | None = figure(("control", "decode_control"), default=None)  # the A/A control: the noise floor
    rounds: int | None = None
    n_tokens: int | None = None
    context: int | None = None
    prompt_len: int | None = None
    batch: int | None = None
    threads: int | None = None
    load: dict | None = None  # common.load.LoadMeter's record of the machine while timing


@dataclass(frozen=True)
class Repetition(Record):
    """One kind of repeated sequence of eval.induction: the loss on the first and the second copy (nats per token)
    and their difference over sequences with its 95% t-interval."""

    loss_first: float = figure(low=0.0)
    loss_second: float = figure(low=0.0)
    induction_nats: float = figure(("induction_nats", "mean"))
    ci_low: float | None = figure(("induction_nats", "ci_low"), default=None)
    ci_high: float | None = figure(("induction_nats", "ci_high"), default=None)


@dataclass(frozen=True, kw_only=True)
class InductionResult(Result):
    """eval.induction: repeated random tokens (Olsson et al.'s probe) and repeated held-out text (None where the
    model has no held-out split of its own)."""

    random: Repetition | None
    heldout: Repetition | None
    sequences: int
    length: int


RESULT_TYPES: dict[str, type[Result]] = {
    "quality": QualityResult,
    "perplexity": PerplexityResult,
    "perplexity-lm-eval": PerplexityResult,
    "humaneval": HumanEvalResult,
    "efficiency": EfficiencyResult,
    "side_by_side": SideBySideResult,
    "induction": InductionResult,
}


def parse_result(record: dict) -> Result | None:
    """An evaluator's record as its typed result; None for an evaluator without one (lm-eval's harness run: its
    tables are lm-eval's own). A record missing a figure raises ValueError naming it."""
    kind = RESULT_TYPES.get(record.get("evaluator"))
    if kind is None:
        return None
    try:
        return kind.of(record)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"a {record['evaluator']} result without a readable {what}") from None


def read_typed(path: str | os.PathLike) -> Result | None:
    """The typed result in ``path``: None where there is none yet (missing, or an evaluator without a typed
    reader); one that is not JSON, of another schema version, or missing a figure its readers take, is refused
    in one line naming the file."""
    record = read_result(path)
    if record is None and os.path.lexists(path):
        raise UserError(f"{path} is not valid JSON (cut or edited): delete it and run its evaluator again")
    if not isinstance(record, dict) or "evaluator" not in record:
        return None
    try:
        return parse_result(record)
    except ValueError as e:
        raise UserError(f"{path} is {e}: delete it and run its evaluator again") from None
