"""Typed config sections about where and how a run happens: parallel layout, recompute and MoE, checkpoint
and other callbacks, export paths. Part of the ONE declaration of the config keys
(see glm/settings.py, which assembles them into RunConfig); docs/config.md is generated from both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from glm.validate import INERT, NONE, NOTICE, REFUSED, key, section

CHECKPOINT_CALLBACKS = ("CheckpointMonitor", "CheckpointMointor")  # the reference's spelling, and the right one


@dataclass
class StrategyCkptConfig:
    save_file: str = key("./ckpt_strategy.ckpt", "semi-auto parallel: strategy file written (per rank)")
    load_file: str = key("", "semi-auto parallel: strategy file read")
    only_trainable_params: bool = key(True, "strategy of trainable parameters only")


@dataclass
class ParallelSection:
    parallel_mode: Any = key(0, "0 data, 1 semi-auto, 2 auto (or the names); only with use_parallel",
                             kind=(int, str))
    gradients_mean: bool = key(True, "data parallel: average (True) or sum (False, MindFormers' recipes) the "
                               "ranks' gradients")
    loss_repeated_mean: bool = key(True, "semi-auto: passed to MindSpore")
    enable_alltoall: bool = key(False, "semi-auto: passed to MindSpore")
    full_batch: bool = key(True, "semi-auto: every rank reads the whole batch (required)")
    search_mode: str = key("sharding_propagation", "semi-auto: passed to MindSpore")
    enable_parallel_optimizer: bool = key(False, "optimizer-state sharding (math-neutral)", status=NOTICE,
                                          note="not available in data parallel on CPU")
    strategy_ckpt_save_file: str = key("", "older spelling of strategy_ckpt_config.save_file")
    strategy_ckpt_load_file: str = key("", "older spelling of strategy_ckpt_config.load_file")
    strategy_ckpt_config: StrategyCkptConfig = section(StrategyCkptConfig, "strategy files (semi-auto parallel)")
    dataset_strategy: Any = key(None, "'full_batch' or per-input layouts (semi-auto)", kind=object)
    pipeline_stages: Optional[int] = key(None, "must equal parallel_config.pipeline_stage", kind=(int, NONE), min=1)
    parallel_optimizer_config: Optional[dict] = key(None, "semi-auto: passed to MindSpore", kind=(dict, NONE))


@dataclass
class ParallelConfig:
    data_parallel: int = key(1, "data-parallel degree (semi-auto); data parallel uses every rank", min=1)
    model_parallel: int = key(1, "tensor parallel degree (Ascend/GPU semi-auto only)", min=1)
    pipeline_stage: int = key(1, "pipeline stages (Ascend/GPU semi-auto only)", min=1)
    expert_parallel: int = key(1, "MoE only", min=1, status=INERT)
    micro_batch_num: int = key(1, "pipeline micro-batches", min=1, status=REFUSED,
                               note="pipeline micro-batching is not implemented")
    vocab_emb_dp: bool = key(True, "shard layout of the embedding", status=INERT)
    gradient_aggregation_group: int = key(4, "communication fusion group", min=1, status=INERT)
    use_seq_parallel: bool = key(False, "sequence parallel", status=NOTICE)
    optimizer_shard: Optional[bool] = key(None, "older spelling of enable_parallel_optimizer", kind=(bool, NONE),
                                          status=NOTICE, off=(None, False))


@dataclass
class MoeConfig:
    expert_num: int = key(1, "experts (GLM has none)", min=1, status=NOTICE)
    capacity_factor: float = key(1.05, "MoE only", min=0, status=INERT)
    aux_loss_factor: float = key(0.05, "MoE only", min=0, status=INERT)
    num_experts_chosen: int = key(1, "MoE only", min=1, status=INERT)


@dataclass
class RecomputeConfig:
    recompute: Any = key(False, "activation recomputation (memory for time)", kind=(bool, list), status=NOTICE)
    select_recompute: Any = key(False, "selective recomputation", kind=(bool, list), status=NOTICE)
    parallel_optimizer_comm_recompute: bool = key(False, "not used by GLM in MindFormers", status=INERT)
    mp_comm_recompute: bool = key(True, "not used by GLM in MindFormers", status=INERT)
    recompute_slice_activation: bool = key(False, "slice recomputed activations", status=NOTICE)


@dataclass
class TensorboardConfig:
    tensorboard_dir: str = key("", "events go to <tensorboard_dir>/<run_id>/; '' = off", ours=True)
    tensorboard_queue_size: int = key(10, "events buffered before a write", min=1, ours=True)


@dataclass
class InferConfig:
    prefill_model_path: str = key("", "export: where the prefill graph goes")
    increment_model_path: str = key("", "export: where the decode graph goes")
    infer_seq_length: int = key(512, "MindSpore-Lite runner only", min=1, status=INERT)
    model_type: str = key("mindir", "MindSpore-Lite runner only", status=INERT)
    ge_config_path: str = key("", "MindSpore-Lite runner only", status=INERT)


@dataclass
class CheckpointConfig:
    """The CheckpointMonitor (or CheckpointMointor) callback; also the defaults when a file has none."""

    prefix: str = key("glm", "checkpoint file prefix")
    directory: str = key("", "checkpoints always go to output_dir/checkpoint here", status=REFUSED,
                         note="set output_dir instead")
    save_checkpoint_steps: int = key(1000, "steps between training checkpoints (and one at the end)", min=1)
    keep_checkpoint_max: int = key(5, "training checkpoints kept per rank (oldest removed)", min=1)
    integrated_save: bool = key(True, "merge parallel slices (checkpoints are whole in data parallel)",
                                status=INERT)
    async_save: bool = key(False, "save in a background thread", status=NOTICE)
    save_network_params: bool = key(True, "also write the weights-only file (checkpoint_network/); False is "
                                    "refused", status=REFUSED, note="eval/predict load that file")
    save_trainable_params: bool = key(False, "trainable-only file (LoRA runs write the adapter anyway)",
                                      status=INERT)


@dataclass
class LossMonitorConfig:
    per_print_times: Optional[int] = key(None, "steps between plain log lines; when set, replaces "
                                         "runner_config.log_interval", kind=(int, NONE), min=1)


@dataclass
class ObsMonitorConfig:
    keep_last: bool = key(True, "ModelArts OBS upload", status=INERT)


@dataclass
class SummaryMonitorConfig:
    summary_dir: str = key("", "MindSpore summary collection", status=INERT)
    collect_freq: int = key(10, "MindSpore summary collection", min=1, status=INERT)
    keep_default_action: bool = key(True, "MindSpore summary collection", status=INERT)


# Callback type -> its section; NOTICE callbacks are reported when present.
CALLBACK_TYPES = {"MFLossMonitor": LossMonitorConfig, "CheckpointMonitor": CheckpointConfig,
                  "CheckpointMointor": CheckpointConfig, "ObsMonitor": ObsMonitorConfig,
                  "SummaryMonitor": SummaryMonitorConfig}
CALLBACK_NOTICES = {"ObsMonitor": "ModelArts OBS upload", "SummaryMonitor": "MindSpore summary files"}
