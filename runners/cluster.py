"""A study's steps as cluster jobs, through submitit (the library the field uses to submit Python to Slurm).

``runners.study FILE --executor slurm`` submits each step whose inputs are ready (a phase at a time, as the
local executor runs them) as one Slurm job, with the resources its kind asks for in the study file:

    [cluster.default]            # every kind not named below
    partition = "gpu"
    timeout_min = 240
    [cluster.train]
    gpus_per_node = 1
    cpus_per_task = 16
    mem_gb = 64

A job runs the step exactly as the local executor does (the same command, its output in
``results/<study>/logs/<step>.log``) and leaves the same marker in ``results/<study>/steps/`` when it ends
well, so finished steps are never run again, whichever executor ran them. Each submitted job is recorded in
``results/<study>/jobs/<step>.json``; a study started again while its jobs still run (the process that
submitted them was killed) waits for those jobs instead of submitting the steps twice. A failed job is named
with its step's log and submitit's own log. ``--executor submitit-local`` runs the same jobs as processes of
this machine (submitit's local executor): the Slurm path, testable without Slurm.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from common.cli import UserError
from common.files import atomic_write

EXECUTORS = ("local", "slurm", "submitit-local")
KINDS = ("default", "train", "compress", "quality", "efficiency", "side_by_side", "over_training")
ACTIVE = {"RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}
POLL_S = 0.5  # how often running jobs are asked about (a sacct call each, on Slurm: cheap)


@dataclass
class Resources:
    """A ``[cluster.<kind>]`` table: what one step of that kind asks the cluster for."""

    gpus_per_node: int = 0
    cpus_per_task: int = 4
    mem_gb: float | None = None
    timeout_min: int = 240
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None

    def __post_init__(self):
        for key in ("gpus_per_node", "cpus_per_task", "timeout_min"):
            v = getattr(self, key)
            if v < (0 if key == "gpus_per_node" else 1):
                raise UserError(f"[cluster] {key} = {v}: give a positive whole number")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise UserError(f"[cluster] mem_gb = {self.mem_gb}: give a positive size")

    def parameters(self) -> dict:
        """submitit's names for them (the Slurm-only ones prefixed slurm_, ignored by the local executor)."""
        out = {"gpus_per_node": self.gpus_per_node, "cpus_per_task": self.cpus_per_task}
        out |= {"timeout_min": self.timeout_min, "tasks_per_node": 1, "nodes": 1}
        if self.mem_gb is not None:
            out["mem_gb"] = self.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key) is not None:
                out[f"slurm_{key}"] = getattr(self, key)
        return out


def resources_of(table: dict, where: str, from_table) -> dict[str, Resources]:
    """The ``[cluster]`` table of a study file: one Resources per step kind (each kind defaults to default)."""
    unknown = sorted(set(table) - set(KINDS))
    if unknown:
        raise UserError(f"{where}: unknown [cluster] kind(s) {unknown}; use any of {list(KINDS)}")
    for kind, t in table.items():
        if not isinstance(t, dict):
            raise UserError(f"{where}: [cluster.{kind}] must be a table, got {t!r}")
    default = table.get("default", {})
    return {k: from_table(Resources, default | table.get(k, {}), f"{where} [cluster.{k}]") for k in KINDS}


def _alive(record: dict) -> bool:
    """Whether the job a record names still runs (Slurm: its state in sacct; local: its process)."""
    if record["executor"] == "slurm":
        from submitit.slurm.slurm import SlurmJob

        return SlurmJob(record["folder"], record["job_id"]).state in ACTIVE
    pid = int(record["job_id"])
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"submitit" in cmdline  # the pid of a job, not of a process that reused the number


RECORD_KEYS = ("job_id", "executor", "folder", "stdout", "stderr")


def _read_record(path: Path) -> dict | None:
    """The job record of an earlier submission, None where there is none; a damaged one (cut short by a full
    disk, emptied by hand) is one line: whether its job still runs cannot be known from it."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or any(k not in record for k in RECORD_KEYS):
            raise ValueError("fields missing")
    except (OSError, ValueError) as e:
        raise UserError(
            f"job record {path} is damaged ({e}): this study cannot tell whether that step's job still runs; "
            "check the cluster's queue (squeue) for it, then delete the record to submit the step again"
        ) from None
    return record


class Jobs:
    """Submits steps as jobs and waits for them; ``run(step)`` is what a job executes (runs the step, writes
    its marker)."""

    def __init__(self, executor: str, folder: Path, resources: dict[str, Resources]):
        import submitit

        if executor not in EXECUTORS[1:]:
            raise UserError(f"--executor {executor!r}: use one of {EXECUTORS}")
        self.name, self.folder, self.resources = executor, folder, resources
        (folder / "records").mkdir(parents=True, exist_ok=True)
        cluster = "slurm" if executor == "slurm" else "local"
        try:
            self.executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
        except RuntimeError as e:  # no sbatch here, for one
            raise UserError(f"--executor {executor}: {e}") from None

    def record_path(self, key: str) -> Path:
        return self.folder / "records" / f"{key}.json"

    def run_phase(
        self, steps: list, kind: str, run: Callable, marker: Callable[[object], Path], on_done: Callable
    ) -> list[tuple[object, dict]]:
        """Submit every step of a phase (or wait for its job from an earlier submission that still runs), then
        wait for them all; ``on_done(step)`` as each one ends well. Returns the (step, job record) of those that
        did not."""
        waiting = {}
        for step in steps:
            path = self.record_path(step.key)
            earlier = _read_record(path)
            if earlier is not None and _alive(earlier):
                print(f"{step.key}: job {earlier['job_id']} from an earlier start still runs; waiting for it")
                waiting[step.key] = (step, None, earlier)
                continue
            params = self.resources.get(kind, self.resources["default"]).parameters()
            self.executor.update_parameters(name=step.key[:100], **params)
            job = self.executor.submit(run, step)
            record = {
                "job_id": str(job.job_id),
                "executor": self.name,
                "folder": str(self.folder / "%j"),
                "stdout": str(job.paths.stdout),
                "stderr": str(job.paths.stderr),
                "resources": asdict(self.resources.get(kind, self.resources["default"])),
                "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            atomic_write(path, json.dumps(record, indent=2))
            waiting[step.key] = (step, job, record)
        failures = []
        while waiting:
            for key, (step, job, record) in list(waiting.items()):
                running = _alive(record) if job is None else not job.done()
                if running:
                    continue
                del waiting[key]
                if marker(step).is_file():
                    on_done(step)
                else:
                    failures.append((step, record))
            if waiting:
                time.sleep(POLL_S)
        return failures
