"""Build a compressed baseline from a checkpoint; the result is evaluated like any other model.

    python -m compress --checkpoint checkpoints/tiny --method wanda --sparsity 0.5 --out checkpoints/c/tiny-wanda50
    python -m compress --checkpoint checkpoints/tiny --method sparsegpt --pattern 2:4 --out ...
    python -m compress --checkpoint checkpoints/tiny --method drop-angular --layers 1 --out ...
    python -m compress --checkpoint checkpoints/tiny --method structured --head-ratio 0.25 --ffn-ratio 0.25 \\
        --skip-first 1 --skip-last 1 --recover lora --recover-steps 100 --out ...
    python -m compress --checkpoint hf/pythia-160m --method structured --calib-corpus python-sources \\
        --recover distill --recover-steps 200 --out ...
    python -m compress --checkpoint checkpoints/tiny --method quantize --scheme int8-dynamic --out ...
    python -m compress --checkpoint hf/pythia-160m --method wanda --calib-corpus python-sources --out ...

A Hugging Face model folder (Llama, GPT-NeoX, GPT-2, Starcoder2) is compressed the same way and saved as a
Hugging Face folder again (``save_pretrained``, its config saying the new depth); it has no training data
here, so calibration needs ``--calib-corpus``.

With ``--recover full|lora|distill`` the compressed model is trained a little by the trainer (compress/recover.py:
a run ``<out>-recover`` beside ``--out``, its logs under ``--log-dir``; ``--resume`` continues a killed one) and
``--out`` holds the recovered model (LoRA merged), its compression.json recording the recovery and the held-out
loss before and after. ``--finetune-steps N`` is ``--recover full --recover-steps N``.

The output folder holds the model (safetensors, model_args.json, tokenizer), a ``state.json`` naming the
training data (for evaluation and calibration) and ``compression.json`` (method, settings, achieved
sparsity, parameters, and sizes under two names: ``disk_bytes_*``, the weight file in the folder, and
``memory_bytes_*``, the weights as they are in memory once loaded). A quantized model is stored quantized
(``quantized.safetensors`` or ``quantized.pt`` in place of the weights, runtime/quantize.py), so its disk
size is the quantized one; int4 and bitsandbytes store the unquantized weights and are quantized again at
every load (compression.json's ``stored`` says which).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from common.cli import UserError, parse_args, run_main
from common.device import pick_device
from common.files import atomic_dir, check_replaceable
from common.identity import options_identity
from compress import COMPRESSION_FILE, COMPRESSION_SCHEMA, IDENTITY_FILE, RECOVERY, read_compression, read_recovery_mark
from compress.calibration import calibration_tokens, corpus_calibration_tokens
from compress.layer_drop import choose_layers
from compress.prune import prune_model
from compress.structured import prune_structured
from data.config import DataConfig
from llama.model import count_params
from llama.model_io import STATE_FILE, list_checkpoints, model_file_bytes, write_checksums
from models.folders import fingerprint, load_folder, save_folder
from models.interface import drop_blocks, require, state_dict_bytes
from runtime.quantize import SCHEMES, quantize, scheme
from training.checkpoint import training_config
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


def calibration(a, base: Path, tokenizer, context: int) -> tuple[torch.Tensor, str]:
    """Calibration windows and where they came from: ``--calib-corpus`` (tokenized with the model's own
    tokenizer), else the base run's training data (a Hugging Face folder has none here)."""
    if a.calib_corpus is None:
        try:
            return calibration_tokens(base, a.calib_samples, a.calib_seq_len, a.seed), "training data of the base run"
        except FileNotFoundError:
            raise UserError(f"{base} has no training data here (a Hugging Face model?); pass --calib-corpus") from None
    corpus = DataConfig(corpus=None if a.calib_corpus == "stdlib" else a.calib_corpus, file_glob=a.calib_file_glob)
    seq_len = a.calib_seq_len or min(512, context)
    tokens = corpus_calibration_tokens(corpus, tokenizer, a.calib_samples, seq_len, a.seed)
    return tokens, a.calib_corpus


def check_lengths(a, context: int):
    """Calibration and recovery windows must fit the model's context: an explicit length beyond it is one
    line before any work (the defaults follow the context)."""
    for option, value in (("--calib-seq-len", a.calib_seq_len), ("--recover-seq-len", a.recover_seq_len)):
        if value is not None and value > context:
            raise UserError(f"{option} {value} is over the model's context of {context} tokens; use at most {context}")


def apply_method(a, model, calib):
    """The compression itself: (the model, its settings as compression.json records them, the method's report,
    the quantization scheme or None)."""
    if a.method in ("drop-last", "drop-angular", "drop-bi"):
        layers = choose_layers(model, a.layers, a.method.removeprefix("drop-"), calib)
        return drop_blocks(model, layers), {"layers": a.layers}, {"dropped_layers": layers}, None
    if a.method in ("magnitude", "wanda", "sparsegpt"):
        n_m = parse_pattern(a.pattern) if a.pattern else None
        report = prune_model(model, a.method, a.sparsity, n_m, calib, a.batch_size)
        return model, {"sparsity": None if n_m else a.sparsity, "pattern": a.pattern}, report, None
    if a.method == "structured":
        model, report = prune_structured(
            model, calib, a.head_ratio, a.ffn_ratio, a.skip_first, a.skip_last, batch_size=a.batch_size
        )
        settings = {"head_ratio": a.head_ratio, "ffn_ratio": a.ffn_ratio}
        return model, settings | {"skip_first": a.skip_first, "skip_last": a.skip_last}, report, None
    if a.method == "quantize":
        if not a.scheme:
            raise UserError(f"--method quantize needs --scheme, one of {SCHEMES}")
        return model, {"scheme": a.scheme}, {}, a.scheme
    raise UserError(f"unknown --method {a.method!r}; use one of {METHODS}")


def recover_into(a, out: Path, staging: Path, tok, base: Path, info: dict, device, context: int):
    """Train the compressed model in ``staging`` by --recover and write the recovered one to ``out``."""
    from compress.recover import recover  # the trainer and peft: imported only when recovering

    recovered, record = recover(
        staging,
        base,
        recovery(a),
        recovery_config(a, base, context),
        recovery_corpus(a),
        device,
        resume=a.resume,
        identity=recovery_identity(a),
    )
    info["recovery"] = record.to_json()
    print(
        f"recovery ({a.recover}, {record.tokens:,} tokens): held-out loss "
        + (f"{record.val_loss_before:.4f} -> " if record.val_loss_before is not None else "")
        + f"{record.val_loss_after:.4f}"
    )
    write_compressed(out, recovered, tok, base, info)
    shutil.rmtree(staging, ignore_errors=True)


def compress(a) -> Path:
    device = pick_device(a.device)
    model, tok, base = load_folder(a.checkpoint, device)
    if (read_compression(base) or {}).get("quantize"):
        raise UserError(f"{base} is already quantized; compress its unquantized base instead")
    if a.recover:
        require(model, "trainable", "--recover")
    context = model.params.max_seq_len
    check_lengths(a, context)
    before_params = count_params(model)["total"]
    before_bytes = state_dict_bytes(model)
    calib, calib_source = calibration(a, base, tok, context) if a.method in NEEDS_CALIBRATION else (None, None)
    model, settings, report, quant = apply_method(a, model, calib)

    # Quantize a copy first, to measure it and to fail (scheme unavailable here) before anything is written.
    measured = quantize(copy.deepcopy(model), quant) if quant else model
    out = Path(a.out)
    info = {
        "schema": COMPRESSION_SCHEMA,
        "method": a.method,
        **settings,
        "quantize": quant,
        "calibration": None
        if calib is None
        else {"source": calib_source, "windows": list(calib.shape), "seed": a.seed},
        "base": str(base),
        "base_fingerprint": fingerprint(base),  # which model it was made from: a study rebuilds it if that changes
        "options": options_of(a),  # every setting that shaped it (what a study compares its command against)
        "base_compression": read_compression(base),
        "params_before": before_params,
        "params_after": count_params(model)["total"],
        "disk_bytes_before": model_file_bytes(base),
        "memory_bytes_before": before_bytes,
        "memory_bytes_after": state_dict_bytes(measured),
        "report": report,
    }
    if quant:
        stored = scheme(quant).file is not None
        info["stored"] = "quantized" if stored else "unquantized; quantized again at every load"
    if a.recover:  # the compressed model is only the recovery's start: --out gets the recovered one
        staging = out.with_name(f".{out.name}.compressed")
        write_compressed(staging, model, tok, base, info)
    else:
        write_compressed(out, model, tok, base, info, quantized=measured if quant else None)
    print(
        f"{a.method} {settings}: {info['params_before']:,} -> {info['params_after']:,} parameters, "
        f"weights in memory {info['memory_bytes_before']:,} -> {info['memory_bytes_after']:,} bytes, "
        f"on disk {info['disk_bytes_before']:,} -> {info['disk_bytes_after']:,} bytes"
        + (f", linear sparsity {report['linear_sparsity']:.3f}" if "linear_sparsity" in report else "")
    )
    if a.recover:
        recover_into(a, out, staging, tok, base, info, device, context)
    print(f"-> {out}")
    return out


def write_compressed(out: Path, model, tok, base: Path, info: dict, quantized=None):
    """One folder, written whole under a temporary name: model, tokenizer, state and compression.json appear
    together or not at all, and an existing folder is replaced only if compress wrote it. ``quantized``: the
    model quantized by ``info``'s scheme, stored in place of the weights where the scheme stores them."""
    with atomic_dir(out, owner=OWNER) as tmp:
        save_folder(model, tok, tmp)
        stores = scheme(info["quantize"]) if quantized is not None else None
        if stores is not None and stores.file is not None:
            unquantized = sorted(tmp.glob("*.safetensors"))
            stores.save(quantized, tmp)
            for f in unquantized:  # the folder's config and tokenizer stay: they say what to load them into
                f.unlink()

        if (base / STATE_FILE).is_file():  # this project's run: the data it was trained on, for evaluation
            base_state = json.loads((base / STATE_FILE).read_text())
            state = {"data_dir": base_state.get("data_dir"), "config": base_state.get("config")}
            (tmp / STATE_FILE).write_text(json.dumps(state | {"compressed_from": str(base)}))
        info["disk_bytes_after"] = model_file_bytes(tmp)
        (tmp / COMPRESSION_FILE).write_text(json.dumps(info, indent=2))
        # the record is checksummed with the weights (any folder kind): an edit that relabels them ("bf16" -> "fp16")
        # or swaps them is refused at load (runtime.loading)
        weights = [p.name for p in tmp.iterdir() if p.suffix in (".safetensors", ".pt")]
        write_checksums(tmp, [COMPRESSION_FILE, *weights])


def resolve_finetune(a):
    """``--finetune-steps N`` is ``--recover full --recover-steps N`` (at --finetune-lr)."""
    if a.finetune_steps:
        if a.recover not in (None, "full"):
            raise UserError(f"--finetune-steps is --recover full; it cannot go with --recover {a.recover}")
        a.recover, a.recover_steps, a.recover_lr = "full", a.finetune_steps, a.finetune_lr


def options_of(a) -> dict:
    """The settings that shape a compressed model (every option but where the model comes from and goes, its
    logs, and whether a stopped recovery is resumed), as compression.json records them: the same for every
    spelling of one command."""
    a = copy.copy(a)
    resolve_finetune(a)
    return options_identity(a, drop=("checkpoint", "out", "log_dir", "resume", "overwrite"))


def recovery_run(a) -> tuple[Path, Path]:
    """The recovery run's checkpoint and log folders: ``<out>-recover`` beside --out, and under --log-dir."""
    out = Path(a.out)
    return out.with_name(f"{out.name}-recover"), Path(a.log_dir) / f"{out.name}-recover"


def recovery_identity(a) -> dict:
    """What a recovery run is: the --out it recovers and every setting that shapes its weights. A run marked
    with another --out is not this compression's; one marked with other settings cannot be resumed."""
    compression = {
        k: getattr(a, k)
        for k in (
            "method", "sparsity", "pattern", "layers", "head_ratio", "ffn_ratio", "skip_first", "skip_last",
            "calib_samples", "calib_seq_len", "calib_corpus", "calib_file_glob", "seed",
        )
    }  # fmt: skip
    return {
        "out": str(Path(a.out).resolve()),
        "base": str(Path(a.checkpoint).resolve()),
        "logs": str(recovery_run(a)[1].resolve()),  # its loss curve: a resume elsewhere would keep half of it
        "compression": compression,
        "recovery": dataclasses.asdict(recovery(a)),
    }


def changed_settings(old: dict, new: dict) -> list[str]:
    """'name old -> new' for each setting that differs between two identities."""
    changes = []
    for part in ("base", "logs", "compression", "recovery"):
        a, b = old.get(part), new.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            changes.append(f"{part} {a!r} -> {b!r}")
    return changes


def check_recovery_run(a):
    """A recovery run's folders (``<out>-recover`` and its log folder) are touched only where they are absent,
    empty, or marked as this --out's own recovery (recovery-of.json); --resume continues only a run marked
    with the same --out and the same settings. Checked before any work; nothing is changed on refusal."""
    ckpt, logs = recovery_run(a)
    ours = recovery_identity(a)
    for folder in (ckpt, logs):
        if folder.exists() and (not folder.is_dir() or folder.is_symlink() or any(folder.iterdir())):
            mark = read_recovery_mark(folder)
            if mark is None or mark.get("out") != ours["out"]:
                raise UserError(
                    f"{folder} exists and is not a recovery that compress started for {a.out}; nothing was "
                    "changed: name another --out or --log-dir, or move that folder away"
                )
    if not a.resume:
        return
    if not list_checkpoints(ckpt):
        raise UserError(f"--resume: there is no recovery run {ckpt} to continue; leave out --resume")
    mark = read_recovery_mark(ckpt) or {}
    before = mark.get("val_loss_before")
    if before is not None and (isinstance(before, bool) or not isinstance(before, (int, float)) or before != before):
        raise UserError(
            f"--resume: {ckpt / IDENTITY_FILE} records val_loss_before = {before!r}, not a number: the mark was "
            "edited or damaged; nothing was changed: leave out --resume to start the recovery over"
        )
    if mark.get("logs") is not None and mark["logs"] != ours["logs"]:
        raise UserError(
            f"--resume: the stopped recovery logged to {mark['logs']}, not {ours['logs']}; nothing was changed: "
            "resume it with the --log-dir it was started with (its loss curve is there)"
        )
    changes = changed_settings(mark, ours)
    if changes:
        raise UserError(
            f"--resume: the stopped recovery {ckpt} had other settings ({'; '.join(changes)}); nothing was "
            "changed: resume it with its own settings, or leave out --resume to start it over"
        )


def recovery(a):
    """The recovery settings (compress.recover.Recovery), checked."""
    from compress.recover import Recovery

    return Recovery(
        a.recover,
        a.recover_steps,
        a.recover_lr,
        a.recover_batch_size,
        a.recover_seq_len,
        a.lora_rank,
        a.lora_alpha,
        a.lora_dropout,
        a.lora_targets,
        a.distill_alpha,
        a.temperature,
        a.distill_lora,
        a.seed,
    )


def recovery_config(a, base: Path, context: int) -> TrainConfig:
    """The recovery run's settings: the base run's own (dtype, compile, optimizer) where it has them; windows
    of 256 tokens (or the model's context, if shorter) on a --calib-corpus."""
    trained = training_config(base)
    cfg = trained or TrainConfig(seq_len=min(256, context))
    if a.calib_corpus is not None and trained is None:
        cfg.seq_len = a.recover_seq_len or min(256, context)
    run, logs = recovery_run(a)
    cfg.name, cfg.out_dir, cfg.log_dir = run.name, str(run.parent), str(logs.parent)
    cfg.device = a.device if a.device != "auto" else cfg.device
    return cfg


def recovery_corpus(a) -> DataConfig | None:
    if a.calib_corpus is None:
        return None
    return DataConfig(corpus=None if a.calib_corpus == "stdlib" else a.calib_corpus, file_glob=a.calib_file_glob)


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
    calib_seq_len: int | None = None  # default: the run's training seq_len (with --calib-corpus: 512, or the context)
    calib_corpus: str | None = None  # calibration corpus: folder, file, python-sources, stdlib (HF models)
    calib_file_glob: str = "**/*.py"  # files of a folder calibration corpus
    batch_size: int = 8  # calibration windows per forward pass
    recover: str | None = None  # recovery after compression: full, lora or distill (compress/recover.py)
    recover_steps: int = 100  # recovery training steps
    recover_lr: float | None = None  # default: 1e-4 (full, distill), 2e-4 (LoRA)
    recover_batch_size: int = 8  # sequences per recovery step
    recover_seq_len: int | None = None  # default: the base run's training length (256 with --calib-corpus)
    lora_rank: int = 8  # LoRA rank r
    lora_alpha: float = 16.0  # LoRA scale alpha (the update is alpha / r x B A)
    lora_dropout: float = 0.05  # LoRA dropout
    lora_targets: list[str] | None = None  # modules given adapters (default: the attention and MLP projections)
    distill_alpha: float = 0.5  # distillation: weight of KL(teacher || student); 1 - alpha on cross-entropy
    temperature: float = 2.0  # distillation temperature T
    distill_lora: bool = False  # distill into LoRA adapters instead of every weight
    resume: bool = False  # continue a recovery run that was stopped
    finetune_steps: int = 0  # the same as --recover full --recover-steps N
    finetune_lr: float = 1e-4  # its learning rate
    log_dir: str = "logs"  # where the recovery run logs
    seed: int = 0  # calibration draw
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    overwrite: bool = False  # replace an earlier compress output in --out (never another command's folder)


def main(argv=None):
    a = parse_args(Args(), argv)
    missing = [k for k in ("checkpoint", "method", "out") if getattr(a, k) is None]
    if missing:
        raise UserError(f"compress needs {', '.join('--' + k for k in missing)}; see --help")
    resolve_finetune(a)
    if a.recover is not None and a.recover not in RECOVERY:
        raise UserError(f"--recover {a.recover!r}: use one of {RECOVERY}")
    if a.method == "quantize" and a.recover:
        raise UserError(
            "recover before quantizing: quantized weights are not trained here (quantization-aware "
            "training is out of scope)"
        )
    if a.resume and not a.recover:
        raise UserError("--resume continues a recovery run; it needs --recover")
    if a.recover:
        recovery(a)  # bad settings stop here, before any work
    # before the work, not after it: a folder that is not ours stops us now, and one of ours needs --overwrite
    check_replaceable(a.out, OWNER, overwrite=a.overwrite)
    if a.recover:
        check_recovery_run(a)
    return compress(a)


if __name__ == "__main__":
    run_main(main)
