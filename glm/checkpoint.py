"""Training checkpoints: atomic save, the files of one run, rotation, discovery of the latest complete one,
and the run fingerprint.

Layout (as the reference): `<output_dir>/checkpoint/rank_<r>/<prefix>_rank_<r>-<epoch>_<step>.ckpt`.
Each file carries the trainable weights, the optimizer moments, the loss-scale state and a JSON
`glm_meta` string (global step, epoch, data position, seeds, LoRA settings, the run fingerprint, the
resolved config). Files are written through glm.io (hidden temporary name, fsync, rename), so a killed
process never leaves a file that looks loadable.

Checkpoints belong to their run. A fresh run into a folder that already holds files of the configured
prefix does not touch them: like MindSpore's ModelCheckpoint it names its own files `<prefix>_1`,
`<prefix>_2`, ... ("the run prefix"). Rotation (keep_checkpoint_max) and `--resume_training` only look at
one run's files: a resumed run continues under the prefix of the file it resumed from, and "latest" is the
newest file of the most recently written run.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from glm import GLMError
from glm.io import atomic_path
from glm.runtime import ms

FORMAT = "glm-launcher/1"
_NAME = re.compile(r"^(?P<prefix>.+)_rank_(?P<rank>\d+)-(?P<epoch>\d+)_(?P<step>\d+)\.ckpt$")


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


def parse_name(name: str) -> Optional[tuple[str, int, int, int]]:
    """(prefix, rank, epoch, step) of a complete checkpoint's file name, else None."""
    m = _NAME.match(name)
    if not m or name.startswith("."):
        return None
    return m["prefix"], int(m["rank"]), int(m["epoch"]), int(m["step"])


def list_checkpoints(directory: str | Path, prefix: Optional[str] = None) -> list[Path]:
    """Complete checkpoints in `directory` (of run prefix `prefix` when given), oldest first by (epoch, step)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for f in d.iterdir():
        parsed = parse_name(f.name)
        if parsed and (prefix is None or parsed[0] == prefix):
            found.append((parsed[2], parsed[3], f))
    return [f for _, _, f in sorted(found)]


def _in_family(prefix: str, base: str) -> bool:
    """`prefix` is `base` or a later run of it (`base_1`, `base_2`, ...)."""
    return prefix == base or (prefix.startswith(base + "_") and prefix[len(base) + 1:].isdigit())


def used_prefixes(output_dir: str | Path, base: str) -> set[str]:
    """Run prefixes of `base`'s family with files in any rank folder of `output_dir` (both kinds)."""
    used = set()
    for kind in ("checkpoint", "checkpoint_network"):
        for d in (Path(output_dir) / kind).glob("rank_*"):
            for f in d.glob("*_rank_*"):
                prefix = f.name.split("_rank_")[0]
                if not f.name.startswith(".") and _in_family(prefix, base):
                    used.add(prefix)
    return used


def new_run_prefix(output_dir: str | Path, base: str) -> str:
    """The prefix a fresh run writes under: `base` if no file of that family exists, else the first free
    `base_<n>` (MindSpore's ModelCheckpoint does the same), so an earlier run's files are never touched."""
    used = used_prefixes(output_dir, base)
    if base not in used:
        return base
    n = 1
    while f"{base}_{n}" in used:
        n += 1
    return f"{base}_{n}"


def prune(directory: str | Path, keep: int, prefix: str, protect: Optional[Path] = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints of run prefix `prefix` (`protect`, the file just written,
    always counts as kept); return the deleted paths. Other runs' files are not looked at."""
    if keep <= 0:
        return []
    ckpts = list_checkpoints(directory, prefix)
    others = [f for f in ckpts if protect is None or f != Path(protect)]
    room = keep - 1 if protect is not None and Path(protect) in ckpts else keep
    doomed = others[:max(0, len(others) - room)]
    for f in doomed:
        f.unlink(missing_ok=True)
    return doomed


def latest_run(directory: str | Path, base: str) -> list[Path]:
    """The checkpoints of the most recently written run of `base`'s family in `directory`, newest first."""
    runs: dict[str, list[Path]] = {}
    for f in list_checkpoints(directory):
        prefix = parse_name(f.name)[0]
        if _in_family(prefix, base):
            runs.setdefault(prefix, []).append(f)
    if not runs:
        return []
    newest = max(runs, key=lambda p: max(f.stat().st_mtime for f in runs[p]))
    return list(reversed(runs[newest]))


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


def resume_state(resume: str | bool, output_dir: str | Path, rank: int,
                 prefix: str) -> Optional[tuple[Path, dict, dict]]:
    """(path, params, meta) to resume from: a given file or folder, or the newest readable checkpoint of the
    most recently written run of `prefix` in this rank's folder (None when there is none).

    A file that fails its CRC is skipped with a warning and the run's one before it is used; when every
    file of that run is unreadable, that is an error (starting over would silently drop the run).
    """
    if isinstance(resume, str) and resume not in ("", "True", "true", "latest"):
        p = Path(resume)
        if p.is_dir():
            p = p / f"rank_{rank}" if (p / f"rank_{rank}").is_dir() else p
            ckpts = latest_run(p, prefix) or list(reversed(list_checkpoints(p)))
            if not ckpts:
                raise GLMError(f"--resume_training {resume}: no checkpoint in {p}")
            p = ckpts[0]
        if not p.is_file():
            raise GLMError(f"--resume_training {resume}: file not found")
        return (p, *load_state(p))
    run = latest_run(rank_dir(output_dir, rank), prefix)
    errors = []
    for f in run:
        try:
            return (f, *load_state(f))
        except GLMError as e:
            errors.append(str(e))
            print(f"warning: skipping unreadable checkpoint: {e}", file=sys.stderr)
    if errors:
        raise GLMError(f"--resume_training: none of the {len(errors)} checkpoint(s) of run "
                       f"{parse_name(run[0].name)[0]} in {run[0].parent} can be read ({errors[0]}); delete them, "
                       "or start without --resume_training")
    return None


# ---------------------------------------------------------------------------------------- fingerprint
FINGERPRINT_FIELDS = ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
                      "num_attention_heads", "multi_query_attention", "multi_query_group_num", "seq_length",
                      "rmsnorm", "post_layer_norm", "add_bias_linear", "add_qkv_bias", "rope_ratio",
                      "pre_seq_len", "prefix_projection")


def run_fingerprint(model_config, pet: Optional[dict] = None, tokenizer=None) -> dict:
    """What a checkpoint's run was: the model shape, the adapter settings (LoRA / P-Tuning v2, dropout aside)
    and the tokenizer, plus a short hash of them. Stored in every checkpoint; a resume whose config gives
    another fingerprint is refused."""
    fields = {k: getattr(model_config, k, None) for k in FINGERPRINT_FIELDS}
    if pet:
        fields["pet"] = {k: v for k, v in sorted(pet.items()) if "dropout" not in k}
    if tokenizer is not None:
        fields["tokenizer"] = type(tokenizer).__name__
        fields["vocab_size"] = int(tokenizer.vocab_size)
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {"id": digest, "fields": fields}


def fingerprint_mismatch(saved: Optional[dict], current: dict) -> Optional[str]:
    """None when `saved` (a checkpoint's) matches `current` (or predates fingerprints); else what differs."""
    if not isinstance(saved, dict) or not saved.get("fields") or saved.get("id") == current["id"]:
        return None
    a, b = saved["fields"], current["fields"]
    diffs = [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return ", ".join(diffs[:3]) + more
