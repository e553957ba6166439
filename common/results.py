"""Result files: what every evaluator writes, and what every reader may take for one. A result is a JSON object
carrying where it was measured (git commit, device, torch and Python versions) beside its figures; it is
written whole (atomically), and replaces only an earlier result, never another file named as its path."""

from __future__ import annotations

import dataclasses
import json
import os
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
    if model is not None and isinstance(checkpoint, str) and checkpoint and not same_model(checkpoint, model):
        raise UserError(
            f"--out {path} holds the result of another model ({old.get('model', checkpoint)}); nothing was "
            "changed: name a new file"
        )


RESULT_SCHEMA = 1  # the version of an evaluator result's layout (write_result / read_result)


def write_result(
    path: str | os.PathLike, payload: dict, device: torch.device, model: str | os.PathLike | None = None
) -> Path:
    """Write ``payload`` (its "evaluator" included) plus where it was measured (commit, device, torch) and the
    schema version as JSON, atomically; an existing file is replaced only if it is an earlier result of the
    same evaluator about the same ``model`` (check_result_path)."""
    check_result_path(path, (payload["evaluator"],), model)
    return atomic_write(path, json.dumps({"schema": RESULT_SCHEMA, **run_metadata(device), **payload}, indent=2))


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
# The typed records writers produce and readers consume (visualizations read these, never a study object).


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
        return cls(
            model=result["model"],
            checkpoint=result.get("checkpoint", ""),
            params=result.get("params") or 0,
            n_layers=result.get("n_layers") or 0,
            architecture=result.get("architecture", "perhead-llama"),
            head_layer=spec,
            compression=result.get("compression"),
        )


@dataclass
class Member:
    """One model of a study, one seed: what the table and the report group by (members.json)."""

    group: str  # the study's name for the model (all seeds)
    seed: int  # the seed's index in the study (0, 1, ...)
    name: str  # its run or folder name
    kind: str  # trained, compressed or external
    seed_value: int | None = None  # the seed it was trained with (trained runs; a compressed one: its base's)
    run: str | None = None  # trained: the run name (logs/<run>)
    base: str | None = None  # compressed: the group it was built from
    path: str | None = None  # external: its folder


@dataclass
class StudyRecord:
    """What a study's report needs to know about the study (study.json), written by runners.study."""

    name: str
    source: str  # how it was named on the command line (for the report's "Reproduce")
    workers: int  # steps run at once: their wall-clock figures share the machine
    members: list[Member]
    commands: dict[str, str]  # model group -> the command that made it (runner and overrides, compress options)
    about: str = ""  # what the study can answer, in the study file's words: the report's first paragraph

    def write(self, folder: Path) -> Path:
        return atomic_write(folder / "study.json", json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def read(cls, folder: Path) -> StudyRecord:
        path = folder / "study.json"
        try:
            d = json.loads(path.read_text())
            return cls(**{**d, "members": [Member(**m) for m in d["members"]]})
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UserError(f"{path} is missing or damaged ({type(e).__name__}); run the study again") from None


TRAINING_SCHEMA = 1  # the version of summary.json's layout (TrainingSummary); a file of another is refused


@dataclass
class TrainingSummary:
    """A finished training run (logs/<run>/summary.json), written by training/trainer.py and read by the
    study's tables, plots and resume through this one schema. ``extra`` holds where it ran (commit, device,
    torch and Python versions), as every result carries."""

    name: str
    steps: int
    tokens: int
    final_val_loss: float  # the run finished: its last validation
    params: int | None = None
    trained_params: int | None = None
    non_embedding_params: int | None = None
    n_layers: int | None = None  # None: a model without a layer count (a supplied model of recovery)
    head_layer: dict | None = None  # the richer heads' settings (ModelArgs.head_layer_spec); None: plain blocks
    train_tokens_available: int | None = None
    epochs: float | None = None  # passes over the training split (>1: data repeated)
    train_time_s: float | None = None
    final_train_loss: float | None = None
    world_size: int | None = None
    dtype: str | None = None
    compile: bool | None = None
    flops_per_token: float | None = None
    unigram_train_loss: float | None = None
    unigram_val_loss: float | None = None
    tokens_per_s: float | None = None
    energy: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def per_head(self) -> bool:
        return has_richer_heads(self.head_layer)

    def to_json(self) -> dict:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {"schema": TRAINING_SCHEMA, **fields, "per_head": self.per_head, **self.extra}

    def write(self, log_dir: Path) -> Path:
        return atomic_write(Path(log_dir) / "summary.json", json.dumps(self.to_json(), indent=2))

    @classmethod
    def read(cls, log_dir: str | os.PathLike) -> TrainingSummary | None:
        """The run's summary, None where it has none yet (or only a partial or unreadable one: the run did not
        finish); a summary of another schema version is refused in one line naming it. Files written before
        the version was recorded read as version 1, the layout they have."""
        again = "train the run again with this code, or read it with the code that wrote it"
        d = read_versioned(Path(log_dir) / "summary.json", TRAINING_SCHEMA, "summary", again)
        if not isinstance(d, dict):
            return None
        d.pop("schema", None)
        per_head = d.pop("per_head", None)  # derived from head_layer (older files: the flag alone)
        if per_head and d.get("head_layer") is None:
            d["head_layer"] = {}  # per-head layers of settings not recorded
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if any(d.get(k) is None for k in ("name", "steps", "tokens", "final_val_loss")):
            return None  # not a finished run's summary
        return cls(**{k: d[k] for k in names if k in d}, extra={k: v for k, v in d.items() if k not in names})
