"""What every evaluator command takes (``EvalOptions``) and a loaded model that writes its results
(``Evaluated``: runtime.loading's ``Loaded`` with ``write``). Every evaluator loads through ``load_for_eval``,
which is runtime.loading's ``load_model``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from common.cli import positional
from common.identity import options_identity
from common.results import ModelIdentity, check_result_path, write_result
from models.folders import fingerprint, model_folder
from runtime.loading import Loaded, load_model


@dataclass
class EvalOptions:
    """What every evaluator command takes: which model, on which device and dtype, and where results go."""

    checkpoint: str = positional()  # checkpoints/<run> (its newest step), a model folder, or a HF model folder
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 elsewhere), bfloat16, float32
    out: str | None = None  # result JSON (default: results/<model>-<evaluator>.json)
    # the evaluator names this command writes: an existing --out is replaced only by the same evaluator's result
    EVALUATORS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        # a user's file, or another evaluator's or model's result, named as --out stops the command now, not
        # after the work
        check_result_path(self.out, self.EVALUATORS, known_folder(self.checkpoint))

    def load(self):
        return load_for_eval(self.checkpoint, self.device, self.dtype)

    def identity(self) -> dict:
        """The settings that shape this evaluator's figures (every option but which model and where its result
        goes), as a result records them: a study reuses a result only when its command resolves to the same."""
        return options_identity(self, drop=("checkpoint", "out"))


@dataclass
class Evaluated(Loaded):
    def write(self, evaluator: str, payload: dict, options: EvalOptions) -> Path:
        """An evaluator's result JSON (``options.out``, default results/<model>-<evaluator>.json): where it was
        measured, which model it is (with the folder's fingerprint), the options that shaped it, and
        ``payload``."""
        identity = ModelIdentity(
            model=self.name,
            checkpoint=str(self.folder),
            params=self.n_params,
            n_layers=self.model.params.n_layers,
            architecture=self.architecture,
            head_layer=self.head_layer,
            compression=self.compression,
            fingerprint=fingerprint(self.folder),
        )
        header = {"evaluator": evaluator, **identity.to_json(), "options": options.identity()}
        path = options.out or Path("results") / f"{self.name}-{evaluator}.json"
        return write_result(path, header | payload, self.device, model=self.folder)


def known_folder(checkpoint: str | None) -> Path | None:
    """The folder ``checkpoint`` names (models.folders.model_folder), or None where it cannot be told yet (the
    load will say why)."""
    try:
        return model_folder(checkpoint) if checkpoint else None
    except OSError:
        return None


def load_for_eval(checkpoint: str | os.PathLike, device: str = "auto", dtype: str = "auto") -> Evaluated:
    loaded = load_model(checkpoint, device, dtype)
    return Evaluated(**{f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded)})
