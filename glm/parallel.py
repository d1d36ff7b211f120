"""Distributed set-up: rank-table validation and communication init (data parallel on CPU).

MindSpore is imported lazily inside the functions that need it, so the rank-table checks (and the
``python -m glm.parallel check-rank-table`` command used by ``scripts/run_distribute.sh``) run in a
fraction of a second and work on machines without MindSpore.

Rank table ("version 1.0", the HCCL format; every value is a string)::

    {"version": "1.0", "server_count": "1",
     "server_list": [{"server_id": "10.0.0.1", "host_nic_ip": "reserve",
                      "device": [{"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"}, ...]}],
     "status": "completed"}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from glm import GLMError

_SEMI_AUTO_MODES = {"semi_auto_parallel", "auto_parallel"}
_PARALLEL_MODES = {
    "data_parallel": "DATA_PARALLEL",
    "semi_auto_parallel": "SEMI_AUTO_PARALLEL",
    "auto_parallel": "AUTO_PARALLEL",
    "stand_alone": "STAND_ALONE",
}
# Keys of the config's `parallel:` section handed to ms.set_auto_parallel_context as they are (when not
# None) in semi-auto/auto parallel; full_batch, pipeline_stages and the strategy files are resolved first.
_CONTEXT_KEYS = ("gradients_mean", "enable_parallel_optimizer", "search_mode", "loss_repeated_mean",
                 "enable_alltoall", "parallel_optimizer_config")
SEMI_AUTO_FULL_BATCH_ERROR = (
    "semi-auto/auto parallel needs parallel.full_batch: True (and dataset_strategy unset or 'full_batch'): "
    "every rank reads the whole batch and MindSpore slices it; per-rank data slices are not supported")


# ----------------------------------------------------------------------------------------------
# rank table
# ----------------------------------------------------------------------------------------------

def load_rank_table(path: str) -> dict[str, Any]:
    """Read and validate a rank-table JSON file; raise GLMError naming the file and the problem."""
    if not os.path.isfile(path):
        raise GLMError(f"rank table {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise GLMError(f"rank table {path}: cannot read it ({e})") from e
    except json.JSONDecodeError as e:
        raise GLMError(f"rank table {path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    validate_rank_table(table, path)
    return table


def _str_int(value: Any, what: str, where: str) -> int:
    if not isinstance(value, str):
        raise GLMError(f"rank table {where}: {what} must be a string, got {value!r}")
    if not value.isdigit():
        raise GLMError(f"rank table {where}: {what} must be a non-negative integer string, got {value!r}")
    return int(value)


def _require(obj: dict[str, Any], key: str, what: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise GLMError(f"rank table {where}: {what} has no {key!r}")
    return obj[key]


def validate_rank_table(d: dict[str, Any], where: str = "<rank table>") -> None:
    """Check the HCCL 1.0 schema and the rank numbering; raise GLMError on the first problem found."""
    if not isinstance(d, dict):
        raise GLMError(f"rank table {where}: expected a JSON object, got {type(d).__name__}")
    version = _require(d, "version", "the table", where)
    if version != "1.0":
        raise GLMError(f"rank table {where}: version must be \"1.0\", got {version!r}")
    status = _require(d, "status", "the table", where)
    if status != "completed":
        raise GLMError(f"rank table {where}: status must be \"completed\", got {status!r}")
    server_count = _str_int(_require(d, "server_count", "the table", where), "server_count", where)
    servers = _require(d, "server_list", "the table", where)
    if not isinstance(servers, list) or not servers:
        raise GLMError(f"rank table {where}: server_list must be a non-empty list")
    if server_count != len(servers):
        raise GLMError(f"rank table {where}: server_count is {server_count} but server_list has "
                       f"{len(servers)} servers")

    rank_owner: dict[int, str] = {}
    ip_owner: dict[str, str] = {}
    server_ids: set[str] = set()
    for s_idx, server in enumerate(servers):
        sid = _require(server, "server_id", f"server #{s_idx}", where)
        if not isinstance(sid, str) or not sid:
            raise GLMError(f"rank table {where}: server #{s_idx} has an empty or non-string server_id")
        if sid in server_ids:
            raise GLMError(f"rank table {where}: server_id {sid} appears twice")
        server_ids.add(sid)
        devices = _require(server, "device", f"server {sid}", where)
        if not isinstance(devices, list) or not devices:
            raise GLMError(f"rank table {where}: server {sid} has an empty device list")
        device_ids: set[int] = set()
        for d_idx, dev in enumerate(devices):
            what = f"server {sid} device #{d_idx}"
            device_id = _str_int(_require(dev, "device_id", what, where), f"{what} device_id", where)
            if device_id in device_ids:
                raise GLMError(f"rank table {where}: device_id {device_id} appears twice on server {sid}")
            device_ids.add(device_id)
            ip = _require(dev, "device_ip", what, where)
            if not isinstance(ip, str) or not ip:
                raise GLMError(f"rank table {where}: {what} has an empty or non-string device_ip")
            if ip in ip_owner:
                raise GLMError(f"rank table {where}: device_ip {ip} appears twice "
                               f"(servers {ip_owner[ip]} and {sid})")
            ip_owner[ip] = sid
            rank = _str_int(_require(dev, "rank_id", what, where), f"{what} rank_id", where)
            if rank in rank_owner:
                raise GLMError(f"rank table {where}: rank_id {rank} appears twice "
                               f"(servers {rank_owner[rank]} and {sid})")
            rank_owner[rank] = sid

    n = len(rank_owner)
    missing = sorted(set(range(n)) - set(rank_owner))
    if missing:
        raise GLMError(f"rank table {where}: rank_ids must be 0..{n - 1}; missing {missing[:5]}, "
                       f"found {sorted(set(rank_owner) - set(range(n)))[:5]}")


def rank_table_size(d: dict[str, Any]) -> int:
    """Total number of ranks (devices over all servers) of a validated table."""
    return sum(len(s["device"]) for s in d["server_list"])


# ----------------------------------------------------------------------------------------------
# communication init
# ----------------------------------------------------------------------------------------------

def _get(section: Any, name: str, default: Any = None) -> Any:
    """A key of a typed section (glm/settings.py) or of a plain dict (tests, tools)."""
    if section is None:
        return default
    if isinstance(section, dict):
        return section.get(name, default)
    return getattr(section, name, default)


def _as_int(section: Any, key: str, default: int = 1) -> int:
    value = _get(section, key, default)
    try:
        return int(value if value is not None else default)
    except (TypeError, ValueError) as e:
        raise GLMError(f"parallel_config.{key}: expected an integer, got {value!r}") from e


def check_parallel_support(cfg_parallel: Any, parallel_config: Any, device_target: str) -> str:
    """Return the lower-case parallel_mode; refuse model/pipeline parallel on CPU (MindSpore cannot).

    The loader runs this too (glm/policy.py), so --dry_run refuses what the run would; each message names
    the key that is actually wrong."""
    raw_mode = _get(cfg_parallel, "parallel_mode", "data_parallel")
    mode = str(raw_mode).lower()
    if mode.isdigit():  # MindFormers configs use 0 data, 1 semi-auto, 2 auto, 3 hybrid
        mode = {"0": "data_parallel", "1": "semi_auto_parallel", "2": "auto_parallel"}.get(mode, mode)
    if mode not in _PARALLEL_MODES:
        raise GLMError(f"parallel.parallel_mode: expected one of {sorted(_PARALLEL_MODES)} (or 0, 1, 2), "
                       f"got {raw_mode!r}")
    mp = _as_int(parallel_config, "model_parallel")
    pp = _as_int(parallel_config, "pipeline_stage")
    if device_target.upper() == "CPU":
        wrong = []
        if mode in _SEMI_AUTO_MODES:
            wrong.append(f"parallel.parallel_mode: {raw_mode!r} ({mode}) needs Ascend or GPU; on CPU use 0 "
                         "(data parallel)")
        if mp > 1:
            wrong.append(f"parallel_config.model_parallel: {mp} needs Ascend or GPU; on CPU use 1")
        if pp > 1:
            wrong.append(f"parallel_config.pipeline_stage: {pp} needs Ascend or GPU; on CPU use 1")
        if wrong:
            raise GLMError("; ".join(wrong))
    if mode in _SEMI_AUTO_MODES and not _full_batch(cfg_parallel):
        raise GLMError(SEMI_AUTO_FULL_BATCH_ERROR)
    return mode


def _full_batch(cfg_parallel: Any) -> bool:
    """Whether every rank loads the whole batch (dataset_strategy, when set, wins over full_batch)."""
    strategy = _get(cfg_parallel, "dataset_strategy")
    if strategy is not None:
        return strategy == "full_batch"
    return bool(_get(cfg_parallel, "full_batch", True))


def data_parallel_plan(cfg: Any, world: int, device_target: str) -> tuple[bool, bool]:
    """(shard_data, own_reducer) for the trainer on `world` ranks.

    Data parallel (the only mode on CPU): each rank reads its shard of the data and the trainer
    averages the gradients itself (DistributedGradReducer). Semi-auto/auto parallel on Ascend/GPU:
    every rank reads the full batch (full_batch) and MindSpore inserts the gradient communication
    while compiling, so the trainer does neither.
    """
    if world <= 1:
        return False, False
    mode = check_parallel_support(_get(cfg, "parallel"), _get(cfg, "parallel_config"), device_target)
    if mode in _SEMI_AUTO_MODES:
        return False, False
    return True, True


def semi_auto_context(cfg_parallel: Any, parallel_config: Any, rank: int) -> dict[str, Any]:
    """The ms.set_auto_parallel_context arguments (besides parallel_mode, device_num) for semi-auto.

    None values (unset in the config) are left to MindSpore's defaults. The strategy file is saved
    per rank (`ckpt_strategy.ckpt` -> `ckpt_strategy_rank_3.ckpt`, as the reference), so the ranks'
    files do not overwrite each other and tools/transform_ckpt.py can merge their directory.
    """
    kwargs: dict[str, Any] = {k: _get(cfg_parallel, k) for k in _CONTEXT_KEYS
                              if _get(cfg_parallel, k) is not None}
    kwargs["full_batch"] = True   # check_parallel_support refuses anything else
    stages = _as_int(parallel_config, "pipeline_stage")
    declared = _get(cfg_parallel, "pipeline_stages")
    if declared is not None and int(declared) != stages:
        raise GLMError(f"parallel.pipeline_stages {declared} disagrees with "
                       f"parallel_config.pipeline_stage {stages}; set only parallel_config.pipeline_stage")
    kwargs["pipeline_stages"] = stages
    ckpt = _get(cfg_parallel, "strategy_ckpt_config") or {}
    strategy = dict(ckpt) if isinstance(ckpt, dict) else dataclasses.asdict(ckpt)
    for flat, key in (("strategy_ckpt_save_file", "save_file"), ("strategy_ckpt_load_file", "load_file")):
        if _get(cfg_parallel, flat):   # the older flat keys win when set
            strategy[key] = _get(cfg_parallel, flat)
    if strategy.get("save_file"):
        root, ext = os.path.splitext(strategy["save_file"])
        strategy["save_file"] = f"{root}_rank_{rank}{ext or '.ckpt'}"
    if strategy:
        kwargs["strategy_ckpt_config"] = strategy
    return kwargs


def init_distributed(cfg_parallel: Any, parallel_config: Any, device_target: str) -> tuple[int, int]:
    """Initialise communication and the auto-parallel context; return (rank, world_size).

    On CPU only data parallel works (backend mccl, started by msrun). On Ascend/GPU the
    `parallel:` settings (parallel_mode, full_batch, strategy files, ...) are passed through to
    ``ms.set_auto_parallel_context`` (see `semi_auto_context`); `data_parallel_plan` tells the
    trainer what it must do itself in each mode.
    """
    mode = check_parallel_support(cfg_parallel, parallel_config, device_target)
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    try:
        init()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GLMError(f"distributed init failed: {first} (launch with scripts/run_distribute.sh, "
                       f"or msrun, and check the other ranks' logs)") from e
    rank, world = get_rank(), get_group_size()
    ms.reset_auto_parallel_context()
    if mode == "data_parallel" or device_target.upper() == "CPU":
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL,
                                     gradients_mean=bool(_get(cfg_parallel, "gradients_mean", True)),
                                     device_num=world)
    else:
        # Pass-through: the model carries no per-operator shard strategies; MindSpore's semi-auto
        # parallel (sharding propagation) decides, on Ascend/GPU only (untested here: CPU-only CI).
        ms.set_auto_parallel_context(parallel_mode=getattr(ms.ParallelMode, _PARALLEL_MODES[mode]),
                                     device_num=world, **semi_auto_context(cfg_parallel, parallel_config, rank))
    return rank, world


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def _check_rank_table_cmd(args: argparse.Namespace) -> int:
    table = load_rank_table(args.file)
    n = rank_table_size(table)
    if args.rank_size is not None and n != args.rank_size:
        raise GLMError(f"rank table {args.file}: it has {n} ranks but RANK_SIZE is {args.rank_size}")
    print(f"rank table {args.file}: ok ({table['server_count']} server(s), {n} ranks)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm.parallel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-rank-table", help="validate an HCCL rank-table JSON file")
    p.add_argument("file")
    p.add_argument("--rank-size", type=int, default=None, help="expected total number of ranks")
    p.set_defaults(func=_check_rank_table_cmd)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except GLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
