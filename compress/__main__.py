"""Build a compressed baseline from a checkpoint; the result is evaluated like any other model.

    python -m compress --checkpoint checkpoints/tiny --method wanda --sparsity 0.5 --out checkpoints/c/tiny-wanda50
    python -m compress --checkpoint checkpoints/tiny --method sparsegpt --pattern 2:4 --out ...
    python -m compress --checkpoint checkpoints/tiny --method drop-angular --layers 1 --out ...
    python -m compress --checkpoint checkpoints/tiny --method structured --head-ratio 0.25 --ffn-ratio 0.25 \\
        --skip-first 1 --skip-last 1 --finetune-steps 100 --out ...
    python -m compress --checkpoint checkpoints/tiny --method quantize --scheme int8-dynamic --out ...
    python -m compress --checkpoint hf/pythia-160m --method wanda --calib-corpus python-sources --out ...

A Hugging Face model folder (Llama, GPT-NeoX, GPT-2, Starcoder2) is compressed the same way and saved as a
Hugging Face folder again (``save_pretrained``, its config saying the new depth); it has no training data
here, so calibration needs ``--calib-corpus``.

With ``--finetune-steps`` the compressed model is fine-tuned by the trainer (a run ``<out>-ft``, with its logs
under ``--log-dir``) and ``--out`` holds the fine-tuned model, its compression.json saying so.

The output folder holds the model (safetensors, model_args.json, tokenizer), a ``state.json`` naming the
training data (for evaluation and calibration) and ``compression.json`` (method, settings, achieved
sparsity, parameters, and sizes under two names: ``disk_bytes_*``, the weight file in the folder, and
``memory_bytes_*``, the weights as they are in memory once loaded). Quantized models are stored as their
unquantized weights plus the scheme, which the evaluators re-apply on load (weight-only and dynamic
quantization are deterministic), so their disk size is the unquantized one.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from common.cli import UserError, parse_args, run_main
from common.device import pick_device
from common.files import atomic_dir, check_replaceable
from compress import COMPRESSION_FILE, read_compression
from compress.calibration import calibration_tokens, corpus_calibration_tokens
from compress.layer_drop import choose_layers
from compress.prune import prune_model
from compress.quantize import SCHEMES, quantize, state_dict_bytes
from compress.structured import prune_structured
from data.config import DataConfig
from llama.model import count_params
from llama.model_io import model_file_bytes, resolve_checkpoint
from models.folders import load_folder, save_folder
from models.interface import drop_blocks, require
from training.checkpoint import STATE_FILE, training_config
from training.config import TrainConfig

OWNER = "compress"  # the mark on its output folders: only those may be replaced by a later run
NEEDS_CALIBRATION = ("drop-angular", "drop-bi", "wanda", "sparsegpt", "structured")
METHODS = ("drop-last", "drop-angular", "drop-bi", "magnitude", "wanda", "sparsegpt", "structured", "quantize")
Method = Literal[METHODS]
Scheme = Literal[SCHEMES]


def parse_pattern(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--pattern {text!r} is not N:M; use e.g. 2:4") from None
    if not 0 < n < m:
        raise UserError(f"--pattern {text}: need 0 < N < M")
    return n, m


def calibration(a, base: Path, tokenizer) -> tuple[torch.Tensor, str]:
    """Calibration windows and where they came from: ``--calib-corpus`` (tokenized with the model's own
    tokenizer), else the base run's training data (a Hugging Face folder has none here)."""
    if a.calib_corpus is None:
        try:
            return calibration_tokens(base, a.calib_samples, a.calib_seq_len, a.seed), "training data of the base run"
        except FileNotFoundError:
            raise UserError(f"{base} has no training data here (a Hugging Face model?); pass --calib-corpus") from None
    corpus = DataConfig(corpus=None if a.calib_corpus == "stdlib" else a.calib_corpus, file_glob=a.calib_file_glob)
    tokens = corpus_calibration_tokens(corpus, tokenizer, a.calib_samples, a.calib_seq_len or 512, a.seed)
    return tokens, a.calib_corpus


def compress(a) -> Path:
    device = pick_device(a.device)
    model, tok, base = load_folder(a.checkpoint, device)
    if (read_compression(base) or {}).get("quantize"):
        raise UserError(f"{base} is already quantized; compress its unquantized base instead")
    if a.finetune_steps:
        require(model, "trainable", "--finetune-steps")
    before_params = count_params(model)["total"]
    before_bytes = state_dict_bytes(model)
    settings, report, quant = {}, {}, None
    calib, calib_source = calibration(a, base, tok) if a.method in NEEDS_CALIBRATION else (None, None)
    if a.method in ("drop-last", "drop-angular", "drop-bi"):
        layers = choose_layers(model, a.layers, a.method.removeprefix("drop-"), calib)
        model = drop_blocks(model, layers)
        settings, report = {"layers": a.layers}, {"dropped_layers": layers}
    elif a.method in ("magnitude", "wanda", "sparsegpt"):
        n_m = parse_pattern(a.pattern) if a.pattern else None
        report = prune_model(model, a.method, a.sparsity, n_m, calib, a.batch_size)
        settings = {"sparsity": None if n_m else a.sparsity, "pattern": a.pattern}
    elif a.method == "structured":
        model, report = prune_structured(
            model, calib, a.head_ratio, a.ffn_ratio, a.skip_first, a.skip_last, batch_size=a.batch_size
        )
        settings = {
            "head_ratio": a.head_ratio,
            "ffn_ratio": a.ffn_ratio,
            "skip_first": a.skip_first,
            "skip_last": a.skip_last,
        }
    elif a.method == "quantize":
        if not a.scheme:
            raise UserError(f"--method quantize needs --scheme, one of {SCHEMES}")
        quant, settings = a.scheme, {"scheme": a.scheme}
    else:
        raise UserError(f"unknown --method {a.method!r}; use one of {METHODS}")

    # Quantize a copy first, to measure it and to fail (scheme unavailable here) before anything is written.
    measured = quantize(copy.deepcopy(model), quant) if quant else model
    out = Path(a.out)
    info = {
        "method": a.method,
        **settings,
        "quantize": quant,
        "calibration": None
        if calib is None
        else {"source": calib_source, "windows": list(calib.shape), "seed": a.seed},
        "base": str(base),
        "base_compression": read_compression(base),
        "params_before": before_params,
        "params_after": count_params(model)["total"],
        "disk_bytes_before": model_file_bytes(base),
        "memory_bytes_before": before_bytes,
        "memory_bytes_after": state_dict_bytes(measured),
        "report": report,
    }
    if a.finetune_steps:  # the compressed model is only the fine-tuning's start: --out gets the tuned one
        staging = out.with_name(f".{out.name}.compressed")
        write_compressed(staging, model, tok, base, info)
    else:
        write_compressed(out, model, tok, base, info)
    print(
        f"{a.method} {settings}: {info['params_before']:,} -> {info['params_after']:,} parameters, "
        f"weights in memory {info['memory_bytes_before']:,} -> {info['memory_bytes_after']:,} bytes, "
        f"on disk {info['disk_bytes_before']:,} -> {info['disk_bytes_after']:,} bytes"
        + (f", linear sparsity {report['linear_sparsity']:.3f}" if "linear_sparsity" in report else "")
    )
    if a.finetune_steps:
        tuned = finetune(staging, training_config(base), a)
        info |= {"finetune_steps": a.finetune_steps, "finetune_lr": a.finetune_lr, "finetune_run": str(tuned.parent)}
        write_compressed(out, load_folder(tuned, device)[0], tok, base, info)
        shutil.rmtree(staging, ignore_errors=True)
    print(f"-> {out}")
    return out


def write_compressed(out: Path, model, tok, base: Path, info: dict):
    """One folder, written whole under a temporary name: model, tokenizer, state and compression.json appear
    together or not at all, and an existing folder is replaced only if compress wrote it."""
    with atomic_dir(out, owner=OWNER) as tmp:
        save_folder(model, tok, tmp)
        if (base / STATE_FILE).is_file():  # this project's run: the data it was trained on, for evaluation
            base_state = json.loads((base / STATE_FILE).read_text())
            state = {"data_dir": base_state.get("data_dir"), "config": base_state.get("config")}
            (tmp / STATE_FILE).write_text(json.dumps(state | {"compressed_from": str(base)}))
        info["disk_bytes_after"] = model_file_bytes(tmp)
        (tmp / COMPRESSION_FILE).write_text(json.dumps(info, indent=2))


def finetune_run(a) -> tuple[Path, Path]:
    """The fine-tuning run's checkpoint and log folders: ``<out>-ft`` beside --out, and under --log-dir."""
    out = Path(a.out)
    return out.with_name(f"{out.name}-ft"), Path(a.log_dir) / f"{out.name}-ft"


def check_finetune_run(a):
    """The fine-tuning run starts over (--overwrite): allowed only where no run of that name exists or the one
    there is this --out's own earlier fine-tuning (its compression.json names it)."""
    ckpt, logs = finetune_run(a)
    if not (ckpt.exists() or logs.exists()):
        return
    earlier = read_compression(Path(a.out)) if (Path(a.out) / COMPRESSION_FILE).is_file() else None
    if not earlier or Path(earlier.get("finetune_run", "")).resolve() != ckpt.resolve():
        raise UserError(
            f"the fine-tuning run {ckpt} (logs {logs}) exists and is not {a.out}'s own; nothing was changed: name "
            "another --out, or move that run away"
        )


def finetune(folder: Path, trained: TrainConfig | None, a) -> Path:
    """Short recovery fine-tuning with the trainer, on the base run's data; pruned weights stay zero. Returns
    the run's last checkpoint."""
    from training.trainer import train

    if trained is None:
        raise UserError("--finetune-steps needs the base run's training config (its state.json)")
    cfg = trained
    run, _ = finetune_run(a)
    cfg.name, cfg.out_dir, cfg.log_dir = run.name, str(run.parent), str(Path(a.log_dir))
    cfg.init_from, cfg.freeze_zeros = str(folder), a.method in ("magnitude", "wanda", "sparsegpt")
    cfg.max_steps, cfg.max_tokens, cfg.resume, cfg.overwrite = a.finetune_steps, None, False, True
    cfg.optim.lr, cfg.optim.warmup_steps = a.finetune_lr, min(cfg.optim.warmup_steps, a.finetune_steps // 10)
    cfg.eval_interval = cfg.ckpt_interval = a.finetune_steps
    cfg.device = a.device if a.device != "auto" else cfg.device
    train(cfg)
    return resolve_checkpoint(Path(cfg.out_dir) / cfg.name)


@dataclass
class Args:
    checkpoint: str | None = None  # the model to compress: checkpoints/<run>, a model folder or a HF folder (required)
    method: Method | None = None  # what to do (required)
    out: str | None = None  # folder for the compressed model (required)
    sparsity: float = 0.5  # unstructured pruning: share of weights zeroed
    pattern: str | None = None  # N:M semi-structured pattern, e.g. 2:4 (replaces --sparsity)
    layers: int = 1  # layer dropping: how many blocks to remove
    head_ratio: float = 0.25  # structured: share of head groups removed
    ffn_ratio: float = 0.25  # structured: share of SwiGLU channels removed
    skip_first: int = 0  # structured: leave the first N blocks intact
    skip_last: int = 0  # structured: leave the last N blocks intact
    scheme: Scheme | None = None  # quantization scheme
    calib_samples: int = 64  # calibration windows from the train split
    calib_seq_len: int | None = None  # default: the run's training seq_len (512 with --calib-corpus)
    calib_corpus: str | None = None  # calibration corpus: folder, file, python-sources, stdlib (HF models)
    calib_file_glob: str = "**/*.py"  # files of a folder calibration corpus
    batch_size: int = 8  # calibration windows per forward pass
    finetune_steps: int = 0  # recovery fine-tuning steps after pruning
    finetune_lr: float = 1e-4  # recovery fine-tuning learning rate
    log_dir: str = "logs"  # where the fine-tuning run logs
    seed: int = 0  # calibration draw
    device: str = "auto"  # auto, cpu, cuda, cuda:N


def main(argv=None):
    a = parse_args(Args(), argv)
    missing = [k for k in ("checkpoint", "method", "out") if getattr(a, k) is None]
    if missing:
        raise UserError(f"compress needs {', '.join('--' + k for k in missing)}; see --help")
    if a.method == "quantize" and a.finetune_steps:
        raise UserError("fine-tune before quantizing: quantized weights are not trained here")
    check_replaceable(a.out, OWNER)  # before the work, not after it: a folder that is not ours stops us now
    if a.finetune_steps:
        check_finetune_run(a)
    return compress(a)


if __name__ == "__main__":
    run_main(main)
