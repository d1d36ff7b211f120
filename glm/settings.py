"""The run config's typed sections: every key, its default, a one-line doc and how it is treated.

This is the ONE place where a config key is declared. The YAML schema (glm/config.py) is derived from
these dataclasses, `resolve(cfg)` turns the validated dict into a `RunConfig`, and docs/config.md is
generated from them (`python -m glm.config_doc`). The model section is `GLMConfig` (glm/model/config.py).

Status of a key (see glm/validate.py): honoured (changes the run as in MindFormers v1.0.2), notice
(performance/device-only, reported in one line at start when set), refused (would change the math and is not
implemented: an error when set), inert (no effect in MindFormers either, for GLM).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional

from glm import GLMError
from glm.model.config import DEFAULTS as PTUNING_DEFAULTS
from glm.model.config import PET_TYPE as PTUNING
from glm.model.config import GLMConfig
from glm.sections import (  # noqa: F401 (re-exported: glm.settings is where run modes import sections from)
    CALLBACK_NOTICES,
    CALLBACK_TYPES,
    CHECKPOINT_CALLBACKS,
    CheckpointConfig,
    ColumnsConfig,
    DataLoaderConfig,
    DatasetConfig,
    DatasetTaskConfig,
    InferConfig,
    LossMonitorConfig,
    MoeConfig,
    ObsMonitorConfig,
    ParallelConfig,
    ParallelSection,
    RecomputeConfig,
    StrategyCkptConfig,
    SummaryMonitorConfig,
    TensorboardConfig,
    TokenizerConfig,
)
from glm.validate import (
    INERT,
    NONE,
    NOTICE,
    REFUSED,
    field_default,
    hint,
    key,
    report,
    section,
    typed,
    validate_section,
)

RUN_MODES = ("train", "finetune", "eval", "predict", "export", "chat", "serve")  # chat, serve: ours
# MindFormers' schedule names (build_lr.py aliases and class names) -> the schedule computed (glm/optim.py).
LR_TYPES = {"polynomial": "polynomial", "PolynomialWithWarmUpLR": "polynomial",
            "linear": "linear", "LinearWithWarmUpLR": "linear",
            "cosine": "cosine", "CosineWithWarmUpLR": "cosine", "CosineAnnealingLR": "cosine",
            "constant": "constant", "constant_with_warmup": "constant", "ConstantWarmUpLR": "constant"}
LR_REFUSED = {"cosine_with_restarts": "is not implemented", "CosineWithRestartsAndWarmUpLR": "is not implemented"}
# Optimizer names -> whether the update is bias-corrected. MindSpore's AdamWeightDecay (and MindFormers'
# FP32State/Fused variants and the lower-case aliases of build_optim.py) has NO bias correction; only
# `AdamW` (this tool's name for torch's AdamW) has it.
OPTIMIZERS = {"AdamWeightDecay": False, "FP32StateAdamWeightDecay": False, "FusedAdamWeightDecay": False,
              "adamw": False, "fp32_adamw": False, "fused_adamw": False, "AdamW": True}
PET_TYPES = ("lora", PTUNING)
ARCH_TYPES = ("ChatGLM2ForConditionalGeneration", "ChatGLM3ForConditionalGeneration", "ChatGLM2WithLora",
              "ChatGLM2WithPtuning2")


def _regex(value: Any, where: str) -> str:
    value = typed(value, str, where)
    try:
        re.compile(value)
    except re.error as e:
        raise GLMError(f"{where}: not a valid regular expression ({e}): {value!r}") from None
    return value


def _lr_type(value: Any, where: str) -> str:
    if value in LR_REFUSED:
        raise GLMError(f"{where}: {value!r} {LR_REFUSED[value]} (use one of {sorted(LR_TYPES)})")
    if value not in LR_TYPES:
        raise GLMError(f"{where}: expected one of {sorted(LR_TYPES)}, got {value!r}{hint(value, LR_TYPES)}")
    return value


# ------------------------------------------------------------------------------------------- sections
@dataclass
class PetConfig:
    pet_type: str = key("lora", "lora, or ptuning2 (P-Tuning v2)", kind=frozenset(PET_TYPES))
    lora_rank: int = key(8, "LoRA rank r", min=1)
    lora_alpha: float = key(16.0, "LoRA scale numerator (scaling = alpha / rank)", min=0)
    lora_dropout: float = key(0.0, "dropout on the LoRA input", min=0)
    target_modules: str = key(r".*query_key_value$", "regex on layer names that get adapters", kind=_regex)
    # P-Tuning v2: the defaults are MindFormers' Ptuning2Config, kept in glm/model/ptuning.py.
    pre_seq_len: int = key(PTUNING_DEFAULTS.pre_seq_len, "P-Tuning v2: prefix rows per layer", min=1)
    prefix_projection: bool = key(PTUNING_DEFAULTS.prefix_projection,
                                  "P-Tuning v2: a 2-layer tanh MLP re-parameterises the prefix")
    projection_dim: int = key(PTUNING_DEFAULTS.projection_dim, "P-Tuning v2: hidden width of that MLP", min=1)
    dropout_prob: float = key(PTUNING_DEFAULTS.dropout_prob, "P-Tuning v2: dropout on the prefix (training)",
                              min=0)


@dataclass
class ArchConfig:
    type: str = key("ChatGLM2ForConditionalGeneration", "model class; *WithLora / *WithPtuning2 must agree with "
                    "pet_config", kind=frozenset(ARCH_TYPES))


@dataclass
class ModelSection:
    model_config: GLMConfig = section(GLMConfig, "architecture and generation settings (GLMConfig)")
    arch: ArchConfig = section(ArchConfig, "model class")


@dataclass
class TrainerConfig:
    type: str = key("CausalLanguageModelingTrainer", "task trainer (the only one for GLM)",
                    kind=frozenset({"CausalLanguageModelingTrainer"}))
    model_name: str = key("glm2_6b", "a name; MindFormers uses it to look up downloads", status=INERT)


@dataclass
class ServeConfig:
    """`--run_mode serve` (glm/serve/): the OpenAI-compatible HTTP server."""

    host: str = key("127.0.0.1", "address to listen on (0.0.0.0: every interface; --host wins)", ours=True)
    port: int = key(8000, "TCP port (0: a free one, printed at start; --port wins)", min=0, ours=True)
    batch_size: Optional[int] = key(None, "requests decoded together (null: runner_config.batch_size)",
                                    kind=(int, NONE), min=1, ours=True)
    max_queue: int = key(64, "requests waiting for a row; more are answered 429", min=1, ours=True)
    model_name: str = key("", "the model id of /v1/models and the responses ('': trainer.model_name)", ours=True)


@dataclass
class MetricConfig:
    type: str = key("ADGENMetric", "eval metric: ADGENMetric (generate, ROUGE/BLEU) or PerplexityMetric",
                    kind=frozenset({"ADGENMetric", "PerplexityMetric"}))


@dataclass
class ProcessorConfig:
    type: str = key("GLMProcessor", "processor class", status=INERT)
    return_tensors: str = key("ms", "tensor type", status=INERT)
    tokenizer: TokenizerConfig = section(TokenizerConfig, "tokenizer for predict/chat/export (vocab_file)")
    max_length: Optional[int] = key(None, "processor padding length (not used by GLM flows)", kind=(int, NONE),
                                    min=1, status=INERT)


@dataclass
class ContextConfig:
    mode: int = key(0, "0 graph, 1 PyNative", kind=frozenset({0, 1}))
    device_target: str = key("CPU", "CPU, GPU or Ascend (must exist on this machine)",
                             kind=frozenset({"CPU", "GPU", "Ascend"}))
    device_id: int = key(0, "device index (Ascend/GPU)", min=0)
    enable_graph_kernel: bool = key(False, "graph-kernel fusion", status=NOTICE)
    graph_kernel_flags: str = key("", "flags of graph-kernel fusion (only with enable_graph_kernel)", status=INERT)
    max_call_depth: int = key(10000, "MindSpore's recursion limit for graphs", min=1)
    max_device_memory: str = key("", "device memory cap, e.g. '30GB' (Ascend only)", status=NOTICE, off=("",),
                                 note="applied on Ascend only")
    save_graphs: Any = key(False, "dump compiled IR graphs (True or a level)", kind=(bool, int))
    save_graphs_path: str = key("./graph", "where save_graphs writes")
    runtime_num_threads: Optional[int] = key(None, "MindSpore runtime threads (null: MindSpore's default)",
                                             kind=(int, NONE), min=1)


@dataclass
class RunnerConfig:
    epochs: int = key(1, "passes over the training data", min=1)
    batch_size: int = key(1, "batch per device (replaces the dataset blocks' batch_size)", min=1)
    sink_mode: bool = key(False, "device-side loop of sink_size steps", status=NOTICE,
                          note="steps run one at a time here; callbacks fire every step")
    sink_size: int = key(1, "steps per sink (only with sink_mode)", status=INERT)
    initial_epoch: int = key(0, "epoch to start at; use resume_training instead", min=0, status=REFUSED)
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step", min=1)
    max_steps: Optional[int] = key(None, "stop after this many optimizer steps", kind=(int, NONE), min=1, ours=True)
    log_interval: int = key(10, "steps between plain log lines (no terminal)", min=1, ours=True)
    plot_curves: bool = key(True, "PNG curves under output_dir/plots at the end of training", ours=True)


@dataclass
class LossScaleConfig:
    type: str = key("DynamicLossScaleUpdateCell", "dynamic (halve on overflow, double after scale_window good "
                    "steps) or fixed", kind=frozenset({"DynamicLossScaleUpdateCell", "FixedLossScaleUpdateCell"}))
    loss_scale_value: float = key(65536.0, "initial loss scale", min=1)
    scale_factor: int = key(2, "factor of each change", min=1)
    scale_window: int = key(1000, "good steps before the scale grows", min=1)


def _scale_sense(value: Any, where: str) -> Any:
    """runner_wrapper.scale_sense: a fixed loss scale (number) or a loss-scale cell mapping."""
    if isinstance(value, dict):
        return validate_section(value, schema_of(LossScaleConfig), where)
    return typed(value, float, where)


@dataclass
class WrapperConfig:
    type: str = key("MFTrainOneStepCell", "train-step cell", kind=frozenset({"MFTrainOneStepCell"}))
    scale_sense: Any = key(None, "loss scaling (float16 only): a number (fixed) or a LossScaleConfig mapping; "
                           "null: none", kind=_scale_sense)
    use_clip_grad: bool = key(False, "clip the global gradient norm to max_grad_norm")
    max_grad_norm: float = key(1.0, "clip threshold", min=0)


@dataclass
class LRScheduleConfig:
    type: str = key("polynomial", "polynomial, linear, cosine, constant (or MindFormers' class names)",
                    kind=_lr_type)
    learning_rate: float = key(5e-5, "peak lr (optimizer.learning_rate, if set, replaces it)", min=0)
    lr_end: float = key(0.0, "final lr of polynomial/cosine (linear decays to 0)", min=0)
    warmup_steps: int = key(0, "steps of linear warmup from warmup_lr_init", min=0)
    warmup_ratio: Optional[float] = key(None, "warmup as a fraction of total_steps; wins over warmup_steps",
                                        kind=(float, NONE), min=0)
    warmup_epochs: Optional[float] = key(None, "warmup in epochs; warmup_ratio wins over it", kind=(float, NONE),
                                         min=0)
    warmup_lr_init: float = key(0.0, "lr at the start of warmup", min=0)
    total_steps: int = key(-1, "steps the schedule spans; -1: steps per epoch x epochs", min=-1)
    power: float = key(1.0, "polynomial power", min=0)
    num_cycles: float = key(0.5, "cosine: half-waves over the decay (0.5: one half cosine)", min=0)


@dataclass
class OptimizerConfig:
    type: str = key("AdamWeightDecay", "AdamWeightDecay / FP32StateAdamWeightDecay / FusedAdamWeightDecay: "
                    "MindSpore's update, no bias correction; AdamW: bias-corrected", kind=frozenset(OPTIMIZERS))
    beta1: float = key(0.9, "first-moment decay, in [0, 1)", min=0)
    beta2: float = key(0.95, "second-moment decay, in [0, 1)", min=0)
    eps: float = key(1e-8, "added to sqrt(v)", min=0)
    weight_decay: float = key(0.0, "decoupled decay; not applied to 1-D parameters (norms, biases)", min=0)
    learning_rate: Optional[float] = key(None, "replaces lr_schedule.learning_rate when set", kind=(float, NONE),
                                         min=0)


def schema_of(cls: type) -> dict:
    """The validate.py schema of a section: {key: (kind, default[, minimum])}."""
    out = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "doc" not in meta:
            continue
        if meta.get("section"):
            sub = meta["section"]
            out[f.name] = (_model_config if sub is GLMConfig else schema_of(sub), None if meta["optional"] else {})
            continue
        default = field_default(f)
        kind = meta["kind"] if meta["kind"] is not None else _kind_of(default, f.name)
        out[f.name] = (kind, default) if meta["min"] is None else (kind, default, meta["min"])
    return out


def _kind_of(default: Any, name: str) -> Any:
    for t in (bool, int, float, str, list, dict):
        if isinstance(default, t):
            return t
    raise TypeError(f"config key {name}: give kind= (the default {default!r} does not say)")


def _callbacks(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise GLMError(f"{where}: expected a list of {{type: ...}} mappings, got {value!r}")
    out = []
    for i, item in enumerate(value):
        w = f"{where}[{i}]"
        if not isinstance(item, dict) or "type" not in item:
            raise GLMError(f"{w}: expected a mapping with a 'type' key, got {item!r}")
        kind = item["type"]
        if kind not in CALLBACK_TYPES:
            raise GLMError(f"{w}.type: unknown callback {kind!r}{hint(kind, CALLBACK_TYPES)}")
        body = validate_section({k: v for k, v in item.items() if k != "type"}, schema_of(CALLBACK_TYPES[kind]), w)
        out.append({"type": kind, **body})
    return out


MODEL_ALIASES = {"max_length": "max_decode_length"}   # MindFormers' generation alias
PET_KEYS = {"lora": ("lora_rank", "lora_alpha", "lora_dropout", "target_modules"),
            "ptuning2": ("pre_seq_len", "prefix_projection", "projection_dim", "dropout_prob")}


def _pet_keys(pet: dict, given: dict, where: str) -> dict:
    """Keep the keys of the chosen pet_type; a key of the other method in the file is an error."""
    own = PET_KEYS.get(pet["pet_type"], ())
    out = {"pet_type": pet["pet_type"]}
    for kind, names in PET_KEYS.items():
        for name in names:
            if name in own:
                out[name] = pet[name]
            elif name in given:
                report(f"{where}.{name}: a {kind} key, but pet_type is {pet['pet_type']!r}", rank=1)
    return out


def model_schema() -> dict:
    """model.model_config's schema, from GLMConfig's fields (pet_config: PetConfig's)."""
    return {**schema_of(GLMConfig), "pet_config": (schema_of(PetConfig), None)}


def _model_config(value: Any, where: str) -> dict:
    """Type-check against GLMConfig's fields, then let GLMConfig do the architecture checks."""
    if not isinstance(value, dict):
        raise GLMError(f"{where}: expected a mapping, got {value!r}")
    value = dict(value)
    for alias, name in MODEL_ALIASES.items():
        if alias in value:
            length = value.pop(alias)
            value.setdefault(name, length)
    out = validate_section(value, model_schema(), where)
    if out["pet_config"]:
        given = value.get("pet_config") if isinstance(value.get("pet_config"), dict) else {}
        if given.get("pet_type", "lora") in PET_TYPES:   # else its error is reported; no follow-on noise
            out["pet_config"] = _pet_keys(out["pet_config"], given, f"{where}.pet_config")
    try:
        return {**GLMConfig.from_dict(out, where).to_dict(), "pet_config": out["pet_config"]}
    except (GLMError, TypeError) as e:  # an architecture check, or a field that does not accept the value
        report(str(e) if isinstance(e, GLMError) else f"{where}: {e}", rank=3)
        return out   # the values as given, so that refused keys are still reported


# ------------------------------------------------------------------------------------------ the run
@dataclass
class RunConfig:
    """The whole run config: top-level keys and sections, named as in the YAML (MindFormers layout)."""

    seed: int = key(0, "seeds MindSpore (initialisation, LoRA, dropout) and the data order")
    run_mode: str = key("train", "train, finetune, eval, predict, export, chat, serve (--run_mode wins)",
                        kind=frozenset(RUN_MODES))
    output_dir: str = key("./output", "checkpoints, logs and results")
    load_checkpoint: str = key("", "weights: a file, a rank_k/ folder, an HF folder, 'base,adapter', 'random' "
                               "or '' (random init for train)")
    src_strategy_path_or_dir: str = key("", "strategy of a sharded checkpoint to transform", status=NOTICE,
                                        note="checkpoints here are whole, not sharded")
    auto_trans_ckpt: bool = key(False, "reshard load_checkpoint for the parallel layout", status=NOTICE,
                                note="checkpoints here are whole, not sharded")
    only_save_strategy: bool = key(False, "write the parallel strategy and exit", status=REFUSED,
                                   note="not implemented")
    resume_training: Any = key(False, "True: newest checkpoint in output_dir; a path: that checkpoint",
                               kind=(bool, str))
    use_parallel: bool = key(False, "distributed run (msrun / rank table); the parallel sections apply")
    do_eval: bool = key(False, "evaluate on eval_dataset during training")
    eval_step_interval: int = key(500, "steps between evaluations (<= 0: off)")
    eval_epoch_interval: int = key(-1, "epochs between evaluations (<= 0: off)")
    best_metric: str = key("eval_loss", "do_eval: the metric that picks <prefix>_rank_r-best.ckpt: eval_loss, "
                           "eval_perplexity, eval_rouge-1/2/l, eval_bleu-4 (ADGENMetric); 'loss' = 'eval_loss'",
                           ours=True)
    greater_is_better: Optional[bool] = key(None, "do_eval: direction of best_metric (null: lower for "
                                            "loss/perplexity, higher for ROUGE/BLEU)", kind=(bool, NONE), ours=True)
    early_stopping_patience: int = key(0, "do_eval: stop after this many evaluations without improvement (0: never)",
                                       min=0, ours=True)
    early_stopping_threshold: float = key(0.0, "do_eval: an improvement must beat the best by more than this",
                                          min=0, ours=True)
    prompt_format: str = key("auto", "eval/predict/chat/serve prompt encoding: auto (the format the checkpoint was "
                             "fine-tuned with), raw, glm2, glm3_chat", kind=frozenset({"auto", "raw", "glm2",
                                                                                     "glm3_chat"}), ours=True)
    remote_save_url: str = key("", "ModelArts OBS upload", status=NOTICE, note="ModelArts only")
    predict_batch_size: Optional[int] = key(None, "predict: prompts per batch (null: runner_config.batch_size)",
                                            kind=(int, NONE), min=1)
    trainer: TrainerConfig = section(TrainerConfig, "task trainer")
    metric: MetricConfig = section(MetricConfig, "eval metric")
    processor: ProcessorConfig = section(ProcessorConfig, "tokenizer for predict/chat")
    context: ContextConfig = section(ContextConfig, "MindSpore context (device, mode)")
    model: ModelSection = section(ModelSection, "model_config (GLMConfig) and arch")
    train_dataset: Optional[DatasetConfig] = section(DatasetConfig, "training data", optional=True)
    train_dataset_task: Optional[DatasetTaskConfig] = section(DatasetTaskConfig, "task wrapper of train_dataset",
                                                              optional=True)
    eval_dataset: Optional[DatasetConfig] = section(DatasetConfig, "evaluation data", optional=True)
    eval_dataset_task: Optional[DatasetTaskConfig] = section(DatasetTaskConfig, "task wrapper of eval_dataset",
                                                             optional=True)
    runner_config: RunnerConfig = section(RunnerConfig, "epochs, batch, accumulation")
    runner_wrapper: WrapperConfig = section(WrapperConfig, "loss scaling and gradient clipping")
    lr_schedule: LRScheduleConfig = section(LRScheduleConfig, "learning-rate schedule")
    layer_scale: bool = key(False, "layer-wise lr decay", status=NOTICE,
                            note="MindFormers applies it only to ViT/Swin, not GLM")
    layer_decay: float = key(0.65, "layer-wise lr decay factor (only with layer_scale)", status=INERT)
    optimizer: OptimizerConfig = section(OptimizerConfig, "optimizer")
    lr_scale: bool = key(False, "scale the lr by global batch / lr_scale_factor")
    lr_scale_factor: int = key(256, "the batch size the lr was tuned for (with lr_scale)", min=1)
    parallel: ParallelSection = section(ParallelSection, "MindSpore auto-parallel context (with use_parallel)")
    parallel_config: ParallelConfig = section(ParallelConfig, "parallel degrees (with use_parallel)")
    micro_batch_interleave_num: int = key(1, "micro-batch interleaving (global batch x N)", min=1,
                                          status=REFUSED, note="not implemented")
    moe_config: MoeConfig = section(MoeConfig, "mixture of experts (GLM has none)")
    recompute_config: RecomputeConfig = section(RecomputeConfig, "activation recomputation")
    auto_tune: bool = key(False, "dataset autotuning", status=NOTICE)
    filepath_prefix: str = key("./autotune", "autotune output (only with auto_tune)", status=INERT)
    autotune_per_step: int = key(10, "autotune period (only with auto_tune)", min=1, status=INERT)
    profile: bool = key(False, "MindSpore profiler", status=NOTICE)
    profile_start_step: int = key(1, "profiler window (only with profile)", min=0, status=INERT)
    profile_stop_step: int = key(10, "profiler window (only with profile)", min=0, status=INERT)
    init_start_profile: bool = key(False, "profiler option (only with profile)", status=INERT)
    profile_communication: bool = key(False, "profiler option (only with profile)", status=INERT)
    profile_memory: bool = key(True, "profiler option (only with profile)", status=INERT)
    profile_output: str = key("", "profiler output (only with profile)", status=INERT)
    callbacks: list = key([], "MFLossMonitor, CheckpointMonitor (see below), SummaryMonitor, ObsMonitor",
                          kind=_callbacks)
    eval_callbacks: list = key([], "callbacks of evaluation (ObsMonitor only in MindFormers; reported)",
                               kind=_callbacks, status=INERT)
    tensorboard: TensorboardConfig = section(TensorboardConfig, "TensorBoard event files of the metrics.jsonl "
                                             "scalars (MindFormers r1.3+ layout)", ours=True)
    infer: Optional[InferConfig] = section(InferConfig, "export graph paths", optional=True)
    serve: ServeConfig = section(ServeConfig, "the OpenAI-compatible server (--run_mode serve)", ours=True)
    raw: dict = dataclasses.field(default_factory=dict, repr=False)   # the validated dict (config.resolved.yaml)

    # ------------------------------------------------------------------ typed views
    @property
    def runner(self) -> RunnerConfig:
        return self.runner_config

    @property
    def wrapper(self) -> WrapperConfig:
        return self.runner_wrapper

    @property
    def model_config(self) -> GLMConfig:
        return self.model.model_config

    @property
    def checkpoint(self) -> CheckpointConfig:
        """The CheckpointMonitor callback, or its defaults when the file has none."""
        found = self.callback("CheckpointMonitor")
        return found if found is not None else CheckpointConfig()

    def callback(self, name: str) -> Any:
        names = CHECKPOINT_CALLBACKS if name in CHECKPOINT_CALLBACKS else (name,)
        for item in self.callbacks:
            if item.get("type") in names:
                cls = CALLBACK_TYPES[item["type"]]
                return from_dict(cls, {k: v for k, v in item.items() if k != "type"})
        return None

    def dataset(self, name: str = "train_dataset") -> DatasetConfig:
        """train_dataset / eval_dataset (or its task's dataset_config); an error naming it when absent."""
        found = getattr(self, name)
        if found is None:
            raise GLMError(f"{name}: no dataset configured (add a {name}: block with data_loader.dataset_dir)")
        return found

    @property
    def train_data(self) -> DatasetConfig:
        return self.dataset("train_dataset")

    @property
    def eval_data(self) -> DatasetConfig:
        return self.dataset("eval_dataset")


def from_dict(cls: type, d: dict | None) -> Any:
    """Build a section dataclass from its validated dict (nested sections recursively)."""
    if d is None:
        return None
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        sub = f.metadata.get("section")
        value = d[f.name]
        if sub is GLMConfig:
            value = GLMConfig(**{k: v for k, v in value.items() if k != "extra"})
        elif sub is not None:
            value = from_dict(sub, value)
        kwargs[f.name] = value
    return cls(**kwargs)


def resolve(cfg: dict) -> RunConfig:
    """The typed RunConfig of a validated config dict (glm.config.load_config's result).

    As MindFormers' dataset/utils.py does, each dataset block's batch_size and seed are replaced by
    runner_config.batch_size and the top-level seed."""
    run = from_dict(RunConfig, cfg)
    run.raw = cfg
    for name in ("train_dataset", "eval_dataset"):
        data = getattr(run, name)
        if data is not None:
            data.batch_size, data.seed = run.runner_config.batch_size, run.seed
    return run


def as_run(cfg: RunConfig | dict) -> RunConfig:
    """A RunConfig from a RunConfig (returned as is) or a validated config dict (resolved)."""
    return cfg if isinstance(cfg, RunConfig) else resolve(cfg)
