"""Distributed set-up: parallel-mode checks and communication init (data parallel on CPU).

MindSpore is imported lazily inside the functions that need it. Rank tables live in glm/rank_table.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from glm import GLMError

if TYPE_CHECKING:
    from glm.sections import ParallelConfig, ParallelSection
    from glm.settings import RunConfig

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
# communication init
# ----------------------------------------------------------------------------------------------

def check_parallel_support(cfg_parallel: ParallelSection, parallel_config: ParallelConfig,
                           device_target: str) -> str:
    """Return the lower-case parallel_mode; refuse model/pipeline parallel on CPU (MindSpore cannot).

    The loader runs this too (glm/policy.py), so --dry_run refuses what the run would; each message names
    the key that is actually wrong. The sections come typed and checked from the loader (glm/settings.py)."""
    raw_mode = cfg_parallel.parallel_mode
    mode = str(raw_mode).lower()
    if mode.isdigit():  # MindFormers configs use 0 data, 1 semi-auto, 2 auto, 3 hybrid
        mode = {"0": "data_parallel", "1": "semi_auto_parallel", "2": "auto_parallel"}.get(mode, mode)
    if mode not in _PARALLEL_MODES:
        raise GLMError(f"parallel.parallel_mode: expected one of {sorted(_PARALLEL_MODES)} (or 0, 1, 2), "
                       f"got {raw_mode!r}")
    mp, pp = parallel_config.model_parallel, parallel_config.pipeline_stage
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


def _full_batch(cfg_parallel: ParallelSection) -> bool:
    """Whether every rank loads the whole batch (dataset_strategy, when set, wins over full_batch)."""
    if cfg_parallel.dataset_strategy is not None:
        return cfg_parallel.dataset_strategy == "full_batch"
    return cfg_parallel.full_batch


def data_parallel_plan(cfg: RunConfig, world: int, device_target: str) -> tuple[bool, bool]:
    """(shard_data, own_reducer) for the trainer on `world` ranks.

    Data parallel (the only mode on CPU): each rank reads its shard of the data and the trainer
    averages the gradients itself (DistributedGradReducer). Semi-auto/auto parallel on Ascend/GPU:
    every rank reads the full batch (full_batch) and MindSpore inserts the gradient communication
    while compiling, so the trainer does neither.
    """
    if world <= 1:
        return False, False
    mode = check_parallel_support(cfg.parallel, cfg.parallel_config, device_target)
    if mode in _SEMI_AUTO_MODES:
        return False, False
    return True, True


def semi_auto_context(cfg_parallel: ParallelSection, parallel_config: ParallelConfig, rank: int) -> dict[str, Any]:
    """The ms.set_auto_parallel_context arguments (besides parallel_mode, device_num) for semi-auto.

    None values (unset in the config) are left to MindSpore's defaults. The strategy file is saved
    per rank (`ckpt_strategy.ckpt` -> `ckpt_strategy_rank_3.ckpt`, as the reference), so the ranks'
    files do not overwrite each other and `glm transform-ckpt` can merge their directory.
    """
    kwargs: dict[str, Any] = {k: getattr(cfg_parallel, k) for k in _CONTEXT_KEYS
                              if getattr(cfg_parallel, k) is not None}
    kwargs["full_batch"] = True   # check_parallel_support refuses anything else
    stages = parallel_config.pipeline_stage
    declared = cfg_parallel.pipeline_stages
    if declared is not None and declared != stages:
        raise GLMError(f"parallel.pipeline_stages {declared} disagrees with "
                       f"parallel_config.pipeline_stage {stages}; set only parallel_config.pipeline_stage")
    kwargs["pipeline_stages"] = stages
    strategy = dataclasses.asdict(cfg_parallel.strategy_ckpt_config)
    for flat, key in (("strategy_ckpt_save_file", "save_file"), ("strategy_ckpt_load_file", "load_file")):
        if getattr(cfg_parallel, flat):   # the older flat keys win when set
            strategy[key] = getattr(cfg_parallel, flat)
    if strategy.get("save_file"):
        root, ext = os.path.splitext(strategy["save_file"])
        strategy["save_file"] = f"{root}_rank_{rank}{ext or '.ckpt'}"
    if strategy:
        kwargs["strategy_ckpt_config"] = strategy
    return kwargs


def init_distributed(cfg_parallel: ParallelSection, parallel_config: ParallelConfig, device_target: str) -> tuple[int, int]:
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
        raise GLMError(f"distributed init failed: {first} (launch with glm launch or scripts/run_distribute.sh, "
                       f"or msrun, and check the other ranks' logs)") from e
    rank, world = get_rank(), get_group_size()
    ms.reset_auto_parallel_context()
    if mode == "data_parallel" or device_target.upper() == "CPU":
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL,
                                     gradients_mean=cfg_parallel.gradients_mean,
                                     device_num=world)
    else:
        # Pass-through: the model carries no per-operator shard strategies; MindSpore's semi-auto
        # parallel (sharding propagation) decides, on Ascend/GPU only (untested here: CPU-only CI).
        ms.set_auto_parallel_context(parallel_mode=getattr(ms.ParallelMode, _PARALLEL_MODES[mode]),
                                     device_num=world, **semi_auto_context(cfg_parallel, parallel_config, rank))
    return rank, world
