"""Training checkpoints: atomic save, rotation, discovery of the latest complete one, and resume state.

Layout (as the reference): `<output_dir>/checkpoint/rank_<r>/<prefix>_rank_<r>-<epoch>_<step>.ckpt`.
Each file carries the trainable weights, the optimizer moments, the loss-scale state and a JSON
`glm_meta` string (global step, epoch, data position, seeds, LoRA settings, the resolved config).
A file is written under a hidden temporary name with a CRC and renamed when complete, so a killed
process never leaves a file that looks loadable. The temporary name carries the writer's host and PID
(`.<name>.partial-<host>-<pid>.ckpt`); the next run removes those whose process is gone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from glm import GLMError
from glm.io import atomic_path
from glm.runtime import ms

FORMAT = "glm-launcher/1"
_NAME = re.compile(r"^(?P<prefix>.+)_rank_(?P<rank>\d+)-(?P<epoch>\d+)_(?P<step>\d+)\.ckpt$")
# `-<host>` is optional: files written before the host was recorded have only the PID.
_PARTIAL = re.compile(r"^\..+\.partial-(?:(?P<host>.+)-)?(?P<pid>\d+)\.ckpt$")


def rank_dir(output_dir: str | Path, rank: int, kind: str = "checkpoint") -> Path:
    return Path(output_dir) / kind / f"rank_{rank}"


def checkpoint_name(prefix: str, rank: int, epoch: int, step: int) -> str:
    return f"{prefix}_rank_{rank}-{epoch}_{step}.ckpt"


def save_atomic(items: list[dict], path: str | Path, meta: Optional[dict] = None) -> Path:
    """Write `[{"name", "data"}]` (+ meta) to `path` via a hidden temporary file and a rename."""
    path = Path(path)
    append = {"glm_meta": json.dumps({"format": FORMAT, **(meta or {})}, default=str)}
    with atomic_path(path, needed=items_nbytes(items)) as tmp, _quiet_mindspore_log():
        ms.save_checkpoint(items, str(tmp), append_dict=append, crc_check=True)
    return path


def items_nbytes(items: list[dict]) -> int:
    """Roughly the size of the checkpoint `items` make (for the full-disk message)."""
    total = 0
    for item in items:
        data = item["data"]
        total += int(getattr(data, "nbytes", 0) or (data.size * data.itemsize if hasattr(data, "itemsize") else 0))
    return total


@contextmanager
def _quiet_mindspore_log():
    """MindSpore logs a [CRITICAL] line of its own before re-raising a failed save; ours is the one line."""
    from mindspore import log

    logger = log._get_logger() if hasattr(log, "_get_logger") else None
    level = logger.level if logger else None
    if logger:
        logger.setLevel(60)
    try:
        yield
    finally:
        if logger:
            logger.setLevel(level)


def params_to_items(params, skip_caches: bool = True) -> list[dict]:
    return [{"name": p.name, "data": p} for p in params if not (skip_caches and p.name.endswith("_cache"))]


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first (by epoch, then step)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for f in d.iterdir():
        m = _NAME.match(f.name)
        if m and not f.name.startswith("."):
            found.append((int(m["epoch"]), int(m["step"]), f))
    return [f for _, _, f in sorted(found)]


def prune(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; return the deleted paths."""
    ckpts = list_checkpoints(directory)
    doomed = ckpts[:-keep] if keep > 0 else []
    for f in doomed:
        f.unlink(missing_ok=True)
    return doomed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def remove_stale_partials(directory: str | Path) -> list[Path]:
    """Delete temporary checkpoint files left by a killed writer: those written on this host by a PID
    that no longer exists. A live process's file, or another host's (a shared disk), is left alone."""
    d = Path(directory)
    if not d.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    for f in d.iterdir():
        m = _PARTIAL.match(f.name)
        if not m or (m["host"] is not None and m["host"] != host) or _pid_alive(int(m["pid"])):
            continue
        try:
            f.unlink()
        except FileNotFoundError:
            continue
        removed.append(f)
    return removed


def load_state(path: str | Path) -> tuple[dict, dict]:
    """(name -> Parameter, meta) of a checkpoint; a corrupt or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise GLMError(f"checkpoint {path}: file not found")
    try:
        params = ms.load_checkpoint(str(path), crc_check=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise GLMError(f"checkpoint {path}: cannot be read ({str(e).splitlines()[0]})") from None
    meta_raw = params.pop("glm_meta", None)
    meta = json.loads(meta_raw) if isinstance(meta_raw, str) else {}
    return params, meta


def resume_state(resume: str | bool, output_dir: str | Path, rank: int) -> Optional[tuple[Path, dict, dict]]:
    """(path, params, meta) to resume from: a given file or folder, or the newest readable checkpoint
    in this rank's folder (None when there is none).

    A file that fails its CRC is skipped with a warning and the one before it is used.
    """
    if isinstance(resume, str) and resume not in ("", "True", "true", "latest"):
        p = Path(resume)
        if p.is_dir():
            p = p / f"rank_{rank}" if (p / f"rank_{rank}").is_dir() else p
            ckpts = list_checkpoints(p)
            if not ckpts:
                raise GLMError(f"--resume_training {resume}: no checkpoint in {p}")
            p = ckpts[-1]
        if not p.is_file():
            raise GLMError(f"--resume_training {resume}: file not found")
        return (p, *load_state(p))
    for f in reversed(list_checkpoints(rank_dir(output_dir, rank))):
        try:
            return (f, *load_state(f))
        except GLMError as e:
            print(f"warning: skipping unreadable checkpoint: {e}", file=sys.stderr)
    return None
