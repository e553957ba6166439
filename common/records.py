"""The records a study's runs write and its report reads, each a dataclass with one reader: the study's
members and commands (study.json) and a training run's summary (summary.json, with a schema version)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from common.cli import UserError, from_table
from common.files import atomic_write
from common.results import has_richer_heads, read_versioned
from common.typed import from_record


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
        """study.json, every field checked by the one reader of tables (common.cli.from_table: unknown, missing
        or mistyped keys are one line naming the file and the key)."""
        path = folder / "study.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is missing or damaged ({type(e).__name__}); run the study again") from None
        return from_table(cls, d, str(path))


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
        if any(d.get(k) is None for k in ("name", "steps", "tokens", "final_val_loss")):
            return None  # not a finished run's summary
        try:
            summary = from_record(cls, d)
        except (KeyError, ValueError) as e:
            bad = f"no {e}" if isinstance(e, KeyError) else str(e)
            raise UserError(
                f"{Path(log_dir) / 'summary.json'}: {bad}; train the run again or restore its summary"
            ) from None
        names = {f.name for f in dataclasses.fields(cls)} | {"per_head"}
        return dataclasses.replace(summary, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def older(cls, d: dict) -> dict:
        """Summaries written before the per-head settings were recorded say only ``per_head`` (derived from
        ``head_layer`` since): their settings read as unknown, {}."""
        if d.get("per_head") and d.get("head_layer") is None:
            return d | {"head_layer": {}}
        return d
