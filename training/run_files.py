"""A run's own folders and log files: the lock that keeps two trainings of one run apart, the checkpoint and
log folders prepared (refusing another run's folders), and the JSON-lines logs read, cut back on resume, and
appended to."""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from common.cli import UserError
from common.files import atomic_write
from common.records import TrainingSummary
from llama.model_io import list_checkpoints
from training import distributed as D
from training.checkpoint import remove_leftovers
from training.config import TrainConfig, check_run_name


@contextmanager
def run_lock(cfg: TrainConfig):
    """One process trains a run at a time: an OS file lock next to checkpoints/<name> and one next to
    logs/<name> (a run writes both, and two runs of one name may share either), released by the kernel when
    its holder exits, however it exits (kill -9 included)."""
    check_run_name(cfg.name)
    locks = []
    try:
        for folder in dict.fromkeys(Path(d).resolve() for d in (cfg.out_dir, cfg.log_dir)):
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f".{cfg.name}.lock"
            lock = FileLock(path, timeout=0)
            try:
                lock.acquire()
            except Timeout:
                raise FileExistsError(
                    f"run {cfg.name!r} is already being trained by another process (lock {path}); wait for it "
                    "to finish or stop it, or pick another --name"
                ) from None
            locks.append(lock)
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


def inside(path: Path, parent: Path) -> bool:
    return path.resolve().parent == parent.resolve()


def prepare_run_dirs(cfg: TrainConfig, info: D.DistInfo) -> tuple[Path, Path]:
    """checkpoints/<name> and logs/<name>; an existing run is never overwritten without --overwrite, and an
    overwrite deletes nothing but these two folders."""
    check_run_name(cfg.name)
    ckpt_dir, log_dir = Path(cfg.out_dir) / cfg.name, Path(cfg.log_dir) / cfg.name
    if not (inside(ckpt_dir, Path(cfg.out_dir)) and inside(log_dir, Path(cfg.log_dir))):
        raise UserError(f"run {cfg.name!r} would not be a folder of {cfg.out_dir} and {cfg.log_dir}; rename it")
    exists = any(d.is_dir() and any(d.iterdir()) for d in (ckpt_dir, log_dir))
    if exists and not (cfg.resume or cfg.overwrite):
        if not list_checkpoints(ckpt_dir):  # stopped before its first checkpoint: nothing to continue from
            raise FileExistsError(
                f"run {cfg.name!r} exists but stopped before its first checkpoint ({ckpt_dir}): nothing to resume; "
                "pass --overwrite to start it over, or --name for a new run"
            )
        raise FileExistsError(
            f"run {cfg.name!r} already exists ({ckpt_dir}, {log_dir}); pass --resume to continue it, "
            "--overwrite to start it over, or --name for a new run"
        )
    if cfg.resume and not list_checkpoints(ckpt_dir):
        if not exists:
            raise FileNotFoundError(
                f"--resume: run {cfg.name!r} does not exist ({ckpt_dir}): no checkpoint to resume; run without "
                "--resume to start it"
            )
        raise FileNotFoundError(
            f"--resume: run {cfg.name!r} stopped before its first checkpoint ({ckpt_dir}): no checkpoint to resume; "
            "run the same command with --overwrite in place of --resume to start it over"
        )
    if info.is_main:
        if cfg.overwrite:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            shutil.rmtree(log_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(ckpt_dir)
    D.barrier(info)
    return ckpt_dir, log_dir


DIVERGED_FILE = "diverged.json"  # logs/<run>/: the run stopped at a non-finite loss (a learning-rate check's result)


def mark_diverged(log_dir: Path, step: int, loss: float, why: str):
    """Say in the run's own logs that its loss diverged, and where: a study's learning-rate check reads a rate
    that diverged as a result (the worst loss), not as a failed step."""
    atomic_write(log_dir / DIVERGED_FILE, json.dumps({"step": step, "loss": loss, "error": why}))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a log; a line that is not a JSON record (torn by a kill or a full disk) is skipped
    and named, never fatal."""
    records = []
    if path.is_file():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("no step")
            except ValueError:
                if line.strip():
                    print(f"warning: skipped unreadable {path.name} line {i}: {line[:60]!r}", file=sys.stderr)
                continue
            records.append(record)
    return records


def truncate_jsonl(path: Path, last_step: int):
    """On resume, drop lines logged after the checkpoint (those steps are trained again) and torn ones."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))  # a kill here must not lose the log


def append_jsonl(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def finished_summary(log_dir: Path, step: int, total_steps: int) -> dict | None:
    """The summary of a run that already reached its last step, if one was written whole (as written)."""
    summary = TrainingSummary.read(log_dir) if step >= total_steps else None
    return None if summary is None else summary.to_json()
