"""Writing files and folders so that a kill, Ctrl-C or a full disk never leaves a torn one behind: everything
is written under a temporary name next to its target and renamed into place (one rename is atomic)."""

from __future__ import annotations

import csv
import errno
import io
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from common.cli import UserError

# A folder a command writes as its output (--out) names that command in this file. The command may replace
# such a folder later; any other folder that is not empty (a user's notes, checkpoints/, another command's
# output) is never deleted: the command stops and says so.
OWNER_FILE = ".written-by"


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and _disk_full(e, path.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
    return path


def write_csv(path: str | os.PathLike, fields: tuple[str, ...], rows: list[dict]) -> Path:
    """``rows`` as a CSV file of the columns ``fields`` (other keys left out), written whole or not at all."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return atomic_write(path, buf.getvalue())


def check_replaceable(final: str | os.PathLike, owner: str, option: str = "--out", overwrite: bool | None = None):
    """Raise a one-line UserError unless ``final`` is absent, an empty folder, or a folder ``owner`` wrote; with
    ``overwrite`` given (a command's --overwrite), a folder ``owner`` wrote is replaced only when it is True: one
    rule for every command, as training's (an earlier output is never replaced silently)."""
    final = Path(final)
    if not final.exists() and not final.is_symlink():
        return
    if final.is_symlink() or not final.is_dir():
        raise UserError(f"{option} {final} exists and is not a folder; nothing was changed: name a new folder")
    if not any(final.iterdir()):
        return
    try:
        written_by = (final / OWNER_FILE).read_text().strip()
    except OSError:
        written_by = None
    if written_by != owner:
        raise UserError(
            f"{option} {final} already holds files that {owner} did not write; nothing was changed: name a new "
            "folder, or move that one away yourself"
        )
    if overwrite is False:
        raise UserError(
            f"{option} {final} holds an earlier {owner} output; nothing was changed: pass --overwrite to replace it, "
            "or name a new folder"
        )


@contextmanager
def atomic_dir(final: str | os.PathLike, replace: bool = True, owner: str | None = None):
    """Yield a temporary folder next to ``final``; on success it becomes ``final`` in one rename. With
    ``replace=False`` an existing ``final`` (another process finished the same work first) is kept and ours
    is discarded. With ``owner`` (the command writing it) the folder is marked as that command's, and an
    existing ``final`` is replaced only if it is empty or marked as that command's (check_replaceable)."""
    final = Path(final)
    if owner is not None:
        check_replaceable(final, owner)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if owner is not None:
            (tmp / OWNER_FILE).write_text(owner + "\n")
        yield tmp
        if owner is not None:
            check_replaceable(final, owner)  # again: something may have appeared there meanwhile
        if not replace:
            try:
                os.replace(tmp, final)
            except OSError:  # a folder of that name appeared: the other process's is as good as ours
                if not final.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        elif final.exists():  # replacing: move the old one aside first so a crash here loses neither
            old = final.with_name(f".{final.name}.old{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and _disk_full(e, final.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(final)) from e
        raise


def _disk_full(e: Exception, folder: Path) -> bool:
    """Writers report a full disk in their own words: OSError(ENOSPC), safetensors' "os error 28", and
    torch.save's "unexpected pos" with no reason at all, which we recognise by the free space left."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(e) or "os error 28" in str(e):
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False
