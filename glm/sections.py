"""Typed config sections about where and how a run happens (parallel layout, recompute and MoE, checkpoint
and other callbacks, export paths) and about the data (dataset blocks, data loader, tokenizer). Part of the
ONE declaration of the config keys (glm/settings.py assembles them into RunConfig); docs/config.md is
generated from both.
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


@dataclass
class TokenizerConfig:
    type: str = key("ChatGLM2Tokenizer", "tokenizer class: ChatGLM2Tokenizer or ChatGLM3Tokenizer (special tokens "
                    "and chat format)", kind=frozenset({"ChatGLM2Tokenizer", "ChatGLM3Tokenizer"}))
    vocab_file: str = key("", "SentencePiece tokenizer.model")
    bos_token: Optional[str] = key(None, "cosmetic: the SentencePiece model defines the special tokens",
                                   kind=(str, NONE), status=INERT)
    eos_token: Optional[str] = key(None, "cosmetic, as bos_token", kind=(str, NONE), status=INERT)
    end_token: Optional[str] = key(None, "cosmetic, as bos_token", kind=(str, NONE), status=INERT)
    mask_token: Optional[str] = key(None, "cosmetic, as bos_token", kind=(str, NONE), status=INERT)
    gmask_token: Optional[str] = key(None, "cosmetic, as bos_token", kind=(str, NONE), status=INERT)
    pad_token: Optional[str] = key(None, "cosmetic, as bos_token", kind=(str, NONE), status=INERT)
    unk_token: Optional[str] = key(None, "cosmetic, as bos_token", kind=(str, NONE), status=INERT)


@dataclass
class ColumnsConfig:
    prompt: Optional[str] = key(None, "adgen: the prompt (default origin_columns[0], 'content')", kind=(str, NONE),
                                ours=True)
    response: Optional[str] = key(None, "adgen: the answer (default origin_columns[1], 'summary')",
                                  kind=(str, NONE), ours=True)
    history: Optional[str] = key(None, "adgen: [[query, response], ...] earlier rounds of the [Round n] prompt",
                                 kind=(str, NONE), ours=True)
    conversations: Optional[str] = key(None, "conversations: the message list (default 'conversations')",
                                       kind=(str, NONE), ours=True)
    tools: Optional[str] = key(None, "conversations: the tool list (default 'tools')", kind=(str, NONE), ours=True)
    system: Optional[str] = key(None, "conversations: a per-line system prompt put first (default: none)",
                                kind=(str, NONE), ours=True)


@dataclass
class DataLoaderConfig:
    type: str = key("ADGenDataLoader", "JSON-lines reader", kind=frozenset({"ADGenDataLoader"}))
    format: str = key("adgen", "adgen: prompt/answer pairs (version 2/3); conversations: ChatGLM3 messages with "
                      "tools, loss on the assistant turns (ChatGLM3Tokenizer; version does not apply)",
                      kind=frozenset({"adgen", "conversations"}), ours=True)
    columns: ColumnsConfig = section(ColumnsConfig, "JSON keys of the fields (null: the format's default)",
                                     ours=True)
    dataset_dir: str = key("", "the JSON-lines file")
    shuffle: bool = key(False, "shuffle every epoch (seeded by the top-level seed and the epoch)")
    phase: str = key("train", "train: prompt+answer with shifted labels; eval: prompt and reference",
                     kind=frozenset({"train", "eval"}))
    version: int = key(2, "prompt format: 2 '[Round 1]\\n\\n问：…\\n\\n答：', 3 raw content after [gMASK]sop",
                       kind=frozenset({2, 3}))
    origin_columns: list = key(["content", "summary"], "the prompt and answer fields of each line")


@dataclass
class DatasetConfig:
    data_loader: DataLoaderConfig = section(DataLoaderConfig, "where and how the records are read")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "tokenizer of this dataset")
    input_columns: list = key(["input_ids", "labels"], "columns MindFormers casts to int32 (always these two)",
                              status=INERT)
    max_source_length: int = key(64, "prompt tokens kept (longer prompts are truncated)", min=1)
    max_target_length: int = key(128, "answer tokens kept", min=1)
    ignore_pad_token_for_loss: bool = key(True, "labels of padding are -100 (no loss)")
    num_parallel_workers: int = key(8, "preprocessing workers (capped at the CPU count)", min=1)
    python_multiprocessing: bool = key(False, "worker processes instead of threads")
    drop_remainder: bool = key(True, "drop the last partial batch")
    batch_size: int = key(1, "replaced by runner_config.batch_size (as MindFormers does)", min=1, status=INERT)
    repeat: int = key(1, "passes over the file per epoch", min=1)
    packing: bool = key(True, "train: pack several samples per row (attention blocked between them, positions "
                        "restarting; same loss as one per row, less padding); eval and eval loss never pack",
                        ours=True)
    numa_enable: bool = key(False, "NUMA binding of the pipeline", status=NOTICE)
    prefetch_size: int = key(1, "pipeline prefetch depth", min=1, status=NOTICE)
    seed: int = key(0, "replaced by the top-level seed (as MindFormers does)", status=INERT)
    max_eval_samples: Optional[int] = key(None, "evaluate on at most this many samples (null: all)",
                                          kind=(int, NONE), min=1, ours=True)


@dataclass
class DatasetTaskConfig:
    type: str = key("KeyWordGenDataset", "dataset task class", kind=frozenset({"KeyWordGenDataset"}))
    dataset_config: Optional[DatasetConfig] = section(DatasetConfig, "the dataset block (usually an alias of "
                                                      "train_dataset / eval_dataset)", optional=True)
