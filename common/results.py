"""Result files: what every evaluator writes, and what every reader may take for one. A result is a JSON object
carrying where it was measured (git commit, device, torch and Python versions) beside its figures; it is
written whole (atomically), and replaces only an earlier result, never another file named as its path."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import UserError
from common.files import atomic_write
from common.hardware import run_metadata


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


@dataclass
class ModelIdentity:
    """Which model a result is about: the header of every evaluator's result."""

    model: str  # run@step_N, or the model folder's name
    checkpoint: str  # its folder
    params: int
    n_layers: int
    architecture: str  # perhead-llama, or a transformers model_type
    head_layer: dict | None = None  # the per-head layers' settings (hidden_dim, activation, residual); None: plain
    compression: dict | None = None  # compression.json of a compressed model
    fingerprint: str | None = None  # models.folders.fingerprint of its folder when measured (None: not recorded)

    @property
    def per_head(self) -> bool:
        return has_richer_heads(self.head_layer)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"per_head": self.per_head}

    @classmethod
    def of(cls, result: dict) -> ModelIdentity:
        """The identity a result file carries (results written before the per-head settings were recorded say
        only per_head: their settings read as unknown, {})."""
        spec = result.get("head_layer")
        if spec is None and result.get("per_head"):
            spec = {}
        for key, kind in (("model", str), ("checkpoint", str), ("architecture", str), ("fingerprint", str)):
            if result.get(key) is not None and not isinstance(result[key], kind):
                raise ValueError(f"{key} = {result[key]!r} is not a {kind.__name__}")
        for key in ("params", "n_layers"):
            if result.get(key) is not None:
                _count(result[key], key)
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"head_layer = {spec!r} is not a table of settings")
        if result.get("compression") is not None and not isinstance(result["compression"], dict):
            raise ValueError(f"compression = {result['compression']!r} is not a compression record")
        return cls(
            model=result["model"],
            checkpoint=result.get("checkpoint", ""),
            params=result.get("params") or 0,
            n_layers=result.get("n_layers") or 0,
            architecture=result.get("architecture", "perhead-llama"),
            head_layer=spec,
            compression=result.get("compression"),
            fingerprint=result.get("fingerprint"),
        )


# ---------------------------------------------------------------------------------------------------------
# Evaluator results, typed: what tables, reports and plots read of each evaluator's figures (``parse_result``;
# ``write_result`` parses a payload the same way before writing it, so what is written is what readers read).
# The file keeps everything else an evaluator records (examples, per-problem outcomes) in ``record``.


def _opt(d: dict, key: str, kind=None):
    v = d.get(key)
    return v if v is None or kind is None else kind(v)


@dataclass(frozen=True)
class Spread:
    """Median with the 10th and 90th percentiles over ``n`` repeats (common.timing.spread)."""

    median: float
    p10: float
    p90: float
    n: int

    @classmethod
    def of(cls, d: dict, what: str = "timing") -> Spread:
        return cls(
            _finite(d["median"], f"{what}.median", low=0.0),
            _finite(d["p10"], f"{what}.p10", low=0.0),
            _finite(d["p90"], f"{what}.p90", low=0.0),
            _count(d["n"], f"{what}.n"),
        )


@dataclass(frozen=True)
class Ratio:
    """A ratio to a reference with its interval (common.stats.paired_ratio); the bounds are None where too few
    rounds gave one."""

    median: float
    ci_low: float | None = None
    ci_high: float | None = None
    p: float | None = None
    confidence: float | None = None  # the interval's level (a Bonferroni-adjusted one is above 0.95); None: unknown

    @classmethod
    def of(cls, d: dict | None) -> Ratio | None:
        if not d:
            return None
        return cls(
            _finite(d["median"], "ratio.median", low=0.0),
            _maybe(d, "ci_low", "ratio.ci_low", low=0.0, infinite=True),  # too few rounds: an unbounded interval
            _maybe(d, "ci_high", "ratio.ci_high", low=0.0, infinite=True),
            _maybe(d, "p", "ratio.p", low=0.0, high=1.0),
            _maybe(d, "confidence", "ratio.confidence", low=0.0, high=1.0),
        )


@dataclass(frozen=True)
class Energy:
    """Energy per token: a counter's figure, or "unavailable" with the reason (never a guess)."""

    method: str
    j_per_token: float | None = None
    reason: str | None = None

    @classmethod
    def of(cls, d: dict | None) -> Energy | None:
        if d is None:
            return None
        return cls(str(d["method"]), _maybe(d, "j_per_token", "energy.j_per_token", low=0.0), d.get("reason"))

    @property
    def figure(self) -> float | str | None:
        """What a table shows: joules per token, "unavailable", or None (measured, no figure)."""
        return "unavailable" if self.method == "unavailable" else self.j_per_token


@dataclass(frozen=True)
class DocumentFigures:
    """One scored document of a held-out split: who it is (index, name, content hash) and its summed NLL in nats,
    tokens and UTF-8 bytes: what a study rescores, bootstraps or subsets without the model."""

    index: int
    sha256: str
    nats: float
    tokens: int
    bytes: int
    name: str | None = None

    @classmethod
    def of(cls, d: dict, i: int) -> DocumentFigures:
        where = f"per_document[{i}]"
        if not isinstance(d.get("sha256"), str):
            raise ValueError(f"{where}.sha256 = {d.get('sha256')!r} is not a content hash")
        return cls(
            _count(d["index"], f"{where}.index"),
            d["sha256"],
            _finite(d["nats"], f"{where}.nats", low=0.0),
            _count(d["tokens"], f"{where}.tokens"),
            _count(d["bytes"], f"{where}.bytes"),
            d.get("name") if isinstance(d.get("name"), str) else None,
        )


@dataclass(frozen=True)
class PerplexityFigures:
    """eval.perplexity's figures: bits per byte always; token perplexity in its own (sliding) mode, word
    perplexity in lm-eval's; and what they were measured on."""

    bits_per_byte: float
    perplexity: float | None = None
    word_perplexity: float | None = None
    mode: str = "sliding"
    tokens_scored: int | None = None
    source: str | None = None
    sample: str | None = None
    context: int | None = None
    stride: int | None = None
    documents: tuple[DocumentFigures, ...] = ()  # per scored document of a held-out split (empty: not recorded)
    excluded: tuple[dict, ...] = ()  # documents the near-duplicate rule left out (index, name, sha256, overlap)
    near_duplicates: float | None = None  # that rule's threshold (None: no document left out)

    @classmethod
    def of(cls, d: dict) -> PerplexityFigures:
        docs = d.get("per_document") or []
        return cls(
            _finite(d["bits_per_byte"], "bits_per_byte", low=0.0, high=MAX_BITS_PER_BYTE),
            _maybe(d, "perplexity", "perplexity", low=1.0),
            _maybe(d, "word_perplexity", "word_perplexity", low=1.0),
            d.get("mode", "sliding"),
            _maybe_count(d, "tokens_scored"),
            d.get("source"),
            d.get("sample"),
            _maybe_count(d, "context"),
            _maybe_count(d, "stride"),
            tuple(DocumentFigures.of(x, i) for i, x in enumerate(docs)),
            tuple(d.get("excluded") or ()),
            _opt(d, "near_duplicates", float),
        )


@dataclass(frozen=True)
class ContinuationFigures:
    """BLEU and ROUGE-L of greedy continuations (rougeL_code: the tokenizer that keeps code symbols)."""

    bleu: float
    rougeL: float
    rougeL_code: float | None = None
    pairs: int | None = None
    prompt_tokens: int | None = None
    continuation_tokens: int | None = None

    @classmethod
    def of(cls, d: dict) -> ContinuationFigures:
        return cls(
            _finite(d["bleu"], "continuation.bleu", low=0.0, high=100.0),
            _finite(d["rougeL"], "continuation.rougeL", low=0.0, high=100.0),
            _maybe(d, "rougeL_code", "continuation.rougeL_code", low=0.0, high=100.0),
            _maybe_count(d, "pairs"),
            _maybe_count(d, "prompt_tokens"),
            _maybe_count(d, "continuation_tokens"),
        )


@dataclass(frozen=True)
class HumanEvalFigures:
    """pass@1 (None where no problem was run) and what it was measured on."""

    pass_at_1: float | None
    problems: int | None = None
    samples_per_problem: int | None = None
    timeout_s: float | None = None
    max_new_tokens: int | None = None

    @classmethod
    def of(cls, d: dict) -> HumanEvalFigures:
        p = d["pass"]
        return cls(
            _maybe(p, "pass@1", "humaneval.pass@1", low=0.0, high=1.0),
            _maybe_count(p, "problems"),
            _maybe_count(p, "samples_per_problem"),
            _maybe(p, "timeout_s", "humaneval.timeout_s", low=0.0),
            _maybe_count(d, "max_new_tokens"),
        )


@dataclass(frozen=True)
class Timing:
    """One latency row of eval.efficiency: milliseconds (per token for decode) in ``mode`` at ``batch``."""

    mode: str
    batch: int
    ms: Spread
    energy: Energy | None = None

    @classmethod
    def of(cls, d: dict, key: str) -> Timing:
        return cls(str(d["mode"]), _count(d["batch"], "batch"), Spread.of(d[key], key), Energy.of(d.get("energy")))


@dataclass(frozen=True)
class Result:
    """What every evaluator result carries: which model, and where it was measured."""

    evaluator: str
    identity: ModelIdentity | None  # None: a result about several models (side by side)
    device: str  # common.hardware.run_metadata's: the device and, on a CPU, the threads ("... (2 threads)")
    torch_version: str
    git_commit: str
    record: dict = dataclasses.field(repr=False, compare=False)  # the file as written

    @classmethod
    def _head(cls, r: dict) -> dict:
        who = ModelIdentity.of(r) if "model" in r else None
        where = {k: str(r.get(k, "?")) for k in ("device", "torch_version", "git_commit")}
        return {"evaluator": r["evaluator"], "identity": who, **where, "record": r}

    @property
    def device_threads(self) -> int | None:
        """The CPU threads the result was measured with, where its device says."""
        m = re.search(r"\((\d+) threads\)", self.device)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class QualityResult(Result):
    perplexity: PerplexityFigures = None
    continuation: ContinuationFigures = None
    humaneval: HumanEvalFigures = None

    @classmethod
    def of(cls, r: dict) -> QualityResult:
        return cls(
            **cls._head(r),
            perplexity=PerplexityFigures.of(r["perplexity"]),
            continuation=ContinuationFigures.of(r["continuation"]),
            humaneval=HumanEvalFigures.of(r["humaneval"]),
        )


@dataclass(frozen=True)
class PerplexityResult(Result):
    figures: PerplexityFigures = None
    run: str | None = None  # over training: the run, the checkpoint's step, tokens seen and energy spent by then
    step: int | None = None
    tokens: int | None = None
    energy_j: float | None = None

    @classmethod
    def of(cls, r: dict) -> PerplexityResult:
        return cls(
            **cls._head(r),
            figures=PerplexityFigures.of(r),
            run=r.get("run"),
            step=r.get("step"),
            tokens=r.get("tokens"),
            energy_j=_opt(r, "energy_j", float),
        )


@dataclass(frozen=True)
class HumanEvalResult(Result):
    humaneval: HumanEvalFigures = None

    @classmethod
    def of(cls, r: dict) -> HumanEvalResult:
        return cls(**cls._head(r), humaneval=HumanEvalFigures.of(r))


@dataclass(frozen=True)
class EfficiencyResult(Result):
    prefill: tuple[Timing, ...] = ()
    decode: tuple[Timing, ...] = ()
    memory_bytes: int | None = None
    disk_bytes: int | None = None

    @classmethod
    def of(cls, r: dict) -> EfficiencyResult:
        return cls(
            **cls._head(r),
            prefill=tuple(Timing.of(x, "ms") for x in r["prefill"]),
            decode=tuple(Timing.of(x, "ms_per_token") for x in r["decode"]),
            memory_bytes=r.get("memory_bytes"),
            disk_bytes=r.get("disk_bytes"),
        )

    @staticmethod
    def pick(rows: tuple[Timing, ...], mode: str | None, batch: int) -> Timing | None:
        """The row measured at ``batch`` in ``mode`` (or, without a mode, in the first mode measured)."""
        return next((t for t in rows if t.batch == batch and (mode is None or t.mode == mode)), None)


@dataclass(frozen=True)
class RoundsEnergy:
    """Energy per token over a side-by-side timing's rounds: the spread of the rounds' joules per token, or
    "unavailable" with the reason."""

    method: str
    j_per_token: Spread | None = None
    reason: str | None = None

    @classmethod
    def of(cls, d: dict | None) -> RoundsEnergy | None:
        if d is None:
            return None
        return cls(d["method"], Spread.of(d) if "median" in d else None, d.get("reason"))

    def flat(self) -> dict:
        """As the study's table row holds it: method and reason beside the spread's median, p10, p90, n."""
        spread = dataclasses.asdict(self.j_per_token) if self.j_per_token else {}
        return {"method": self.method, "reason": self.reason, **spread}


@dataclass(frozen=True)
class TimedModel:
    """One model of a side-by-side timing: decode ms per token over the rounds, each round's figure, its ratio
    to the reference (None for the reference), energy."""

    decode_ms: Spread
    decode_samples: tuple[float, ...]
    decode_ratio: Ratio | None
    energy: RoundsEnergy | None

    @classmethod
    def of(cls, d: dict) -> TimedModel:
        return cls(
            Spread.of(d["decode_ms_per_token"], "decode_ms_per_token"),
            tuple(_finite(x, "decode_ms_samples", low=0.0) for x in d["decode_ms_samples"]),
            Ratio.of(d.get("decode_ratio_to_reference")),
            RoundsEnergy.of(d.get("energy")),
        )


@dataclass(frozen=True)
class SideBySideResult(Result):
    reference: str = ""
    mode: str = "eager"
    models: dict[str, TimedModel] = dataclasses.field(default_factory=dict)
    gated: str | None = None  # why no latency verdict stands (the A/A control differed from 1), else None
    control: Ratio | None = None  # the A/A control's decode ratio: the run's noise floor
    rounds: int | None = None
    n_tokens: int | None = None
    context: int | None = None
    prompt_len: int | None = None
    batch: int | None = None
    threads: int | None = None
    load: dict | None = None  # common.load.LoadMeter's record of the machine while timing

    @classmethod
    def of(cls, r: dict) -> SideBySideResult:
        return cls(
            **cls._head(r),
            reference=r["reference"],
            mode=r.get("mode", "eager"),
            models={name: TimedModel.of(m) for name, m in r["models"].items()},
            gated=r.get("gated"),
            control=Ratio.of((r.get("control") or {}).get("decode_control")),
            rounds=r.get("rounds"),
            n_tokens=r.get("n_tokens"),
            context=r.get("context"),
            prompt_len=r.get("prompt_len"),
            batch=r.get("batch"),
            threads=r.get("threads"),
            load=r.get("load"),
        )


@dataclass(frozen=True)
class Repetition:
    """One kind of repeated sequence of eval.induction: the loss on the first and the second copy (nats per token)
    and their difference over sequences with its 95% t-interval."""

    loss_first: float
    loss_second: float
    induction_nats: float
    ci_low: float | None = None
    ci_high: float | None = None

    @classmethod
    def of(cls, d: dict | None, kind: str) -> Repetition | None:
        if d is None:
            return None
        ci = d["induction_nats"]
        return cls(
            _finite(d["loss_first"], f"{kind}.loss_first", low=0.0),
            _finite(d["loss_second"], f"{kind}.loss_second", low=0.0),
            _finite(ci["mean"], f"{kind}.induction_nats"),
            None if ci.get("ci_low") is None else _finite(ci["ci_low"], f"{kind}.induction_nats.ci_low"),
            None if ci.get("ci_high") is None else _finite(ci["ci_high"], f"{kind}.induction_nats.ci_high"),
        )


@dataclass(frozen=True)
class InductionResult(Result):
    """eval.induction: repeated random tokens (Olsson et al.'s probe) and repeated held-out text (None where the
    model has no held-out split of its own)."""

    random: Repetition | None = None
    heldout: Repetition | None = None
    sequences: int = 0
    length: int = 0

    @classmethod
    def of(cls, r: dict) -> InductionResult:
        return cls(
            **cls._head(r),
            random=Repetition.of(r["random"], "random"),
            heldout=Repetition.of(r["heldout"], "heldout"),
            sequences=_count(r["sequences"], "sequences"),
            length=_count(r["length"], "length"),
        )


def _finite(v, what: str, low: float | None = None, high: float | None = None, infinite: bool = False) -> float:
    """A figure as a float: a number, finite (or, with ``infinite``, not NaN: an unbounded interval's end), within
    [low, high] where given; else ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{what} = {v!r} is not a number")
    x = float(v)
    bad = math.isnan(x) if infinite else not math.isfinite(x)
    if bad or (low is not None and x < low) or (high is not None and x > high):
        bounds = f" in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(
            f"{what} = {v!r} is not a finite number{bounds if low is not None or high is not None else ''}"
        )
    return x


MAX_BITS_PER_BYTE = 1000.0  # far beyond any model's (a uniform guess over 32k tokens of one byte each is 15)


def _maybe(d: dict, key: str, what: str, low=None, high=None, infinite: bool = False) -> float | None:
    """An optional figure: None where absent, else checked as ``_finite``."""
    return None if d.get(key) is None else _finite(d[key], what, low, high, infinite)


def _maybe_count(d: dict, key: str) -> int | None:
    return None if d.get(key) is None else _count(d[key], key)


def _count(v, what: str) -> int:
    """A count: a whole number, not negative; else ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what} = {v!r} is not a count (a whole number >= 0)")
    return v


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
