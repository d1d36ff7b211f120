"""The run config: one YAML file in the MindFormers layout, `key=value` overrides, validation.

`load_config(path, overrides)` returns plain nested dicts with every known key present (defaults
filled). Every section is checked against the SCHEMA below: an unknown or misspelt key, a wrong type
or an out-of-range value raises `GLMError` with one line naming the file, the dotted key and what
was expected. Relative paths in a config (dataset_dir, vocab_file, output_dir, ...) are kept as
written and resolved by their users against the current working directory, as MindFormers does.

The schema format and the checking machinery are in glm/validate.py.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from glm import GLMError
from glm.model.config import DEFAULTS as PTUNING_DEFAULTS
from glm.model.config import PET_TYPE as PTUNING_TYPE
from glm.model.config import GLMConfig
from glm.validate import NONE, hint, typed, validate_section

RUN_MODES = frozenset({"train", "finetune", "eval", "predict", "export", "chat"})  # chat: run_glm.py extra
# The reference spells its checkpoint callback "CheckpointMointor"; both spellings are accepted.
CHECKPOINT_CALLBACKS = ("CheckpointMonitor", "CheckpointMointor")
# MindFormers' class names for the schedules are accepted and mapped to the short names.
LR_TYPES = {"polynomial": "polynomial", "PolynomialWithWarmUpLR": "polynomial", "linear": "linear",
            "LinearWithWarmUpLR": "linear", "cosine": "cosine",
            "CosineWithWarmUpLR": "cosine", "CosineAnnealingLR": "cosine", "constant": "constant",
            "ConstantWarmUpLR": "constant"}
# model_config keys of the reference that only matter for Ascend inference graphs (paged attention,
# dynamic shapes, fused kernels) or are derived: accepted so pasted YAML loads, then dropped.
IGNORED_MODEL_KEYS = frozenset({
    "use_paged_attention", "block_size", "num_blocks", "use_prompt_flash_attention",
    "use_kvcache_op", "is_sample_acceleration", "embedding_type", "mask_type", "gmask_token_id",
    "bos_token_id", "vocab_size", "softmax_compute_type"})


# ------------------------------------------------------------------------------------------ schema
def _regex(value: Any, where: str) -> str:  # pet_config.target_modules
    value = typed(value, str, where)
    try:
        re.compile(value)
    except re.error as e:
        raise GLMError(f"{where}: not a valid regular expression ({e}): {value!r}") from None
    return value


TOKENIZER = {
    "type": (frozenset({"ChatGLM2Tokenizer", "ChatGLM3Tokenizer"}), "ChatGLM2Tokenizer"),
    "vocab_file": (str, ""),
    # Cosmetic in the reference (the SentencePiece model defines the specials); accepted, unused.
    **{k: ((str, NONE), None)
       for k in ("bos_token", "eos_token", "end_token", "mask_token", "gmask_token", "pad_token", "unk_token")},
}
COLUMNS = {  # data_loader.columns: the JSON key holding each field (null: origin_columns / the format's default)
    "prompt": ((str, NONE), None),         # adgen: the prompt (default origin_columns[0], "content")
    "response": ((str, NONE), None),       # adgen: the answer (default origin_columns[1], "summary")
    "history": ((str, NONE), None),        # adgen: [[query, response], ...] earlier rounds of the [Round n] prompt
    "conversations": ((str, NONE), None),  # conversations: the message list (default "conversations")
    "tools": ((str, NONE), None),          # conversations: the tool list (default "tools")
    "system": ((str, NONE), None),         # conversations: a per-line system prompt put first (default: none)
}
DATA_LOADER = {
    "type": (frozenset({"ADGenDataLoader"}), "ADGenDataLoader"),
    # adgen: prompt/answer pairs (KeyWordGen, version 2/3); conversations: ChatGLM3 messages with tools,
    # loss on the assistant turns (needs ChatGLM3Tokenizer; version does not apply)
    "format": (frozenset({"adgen", "conversations"}), "adgen"),
    "columns": (COLUMNS, {}),
    "dataset_dir": (str, ""),
    "shuffle": (bool, False),
    "phase": (frozenset({"train", "eval"}), "train"),
    "version": (frozenset({2, 3}), 2),  # 2: "[Round 1]\n\n问：…答：" prompt, 3: the content as is (no template)
    "origin_columns": (list, ["content", "summary"]),
}
DATASET = {
    "data_loader": (DATA_LOADER, {}),
    "tokenizer": (TOKENIZER, {}),
    "input_columns": (list, ["input_ids", "labels"]),
    "max_source_length": (int, 64, 1),
    "max_target_length": (int, 128, 1),
    "ignore_pad_token_for_loss": (bool, True),  # labels of padding are -100 (no loss)
    "num_parallel_workers": (int, 8, 1), "python_multiprocessing": (bool, False), "drop_remainder": (bool, True),
    "batch_size": (int, 1, 1), "repeat": (int, 1, 1), "numa_enable": (bool, False), "prefetch_size": (int, 1, 1),
    "seed": (int, 0), "max_eval_samples": ((int, NONE), None, 1),
}
DATASET_TASK = {"type": (str, "KeyWordGenDataset"), "dataset_config": (DATASET, None)}
LORA_PET = {
    "pet_type": (frozenset({"lora"}), "lora"),
    "lora_rank": (int, 8, 1),
    "lora_alpha": (float, 16.0, 0),
    "lora_dropout": (float, 0.0, 0),
    "target_modules": (_regex, r".*query_key_value$"),  # regex on layer names
}
PTUNING_PET = {  # P-Tuning v2 (glm/model/ptuning.py holds the defaults: MindFormers' Ptuning2Config)
    "pet_type": (frozenset({PTUNING_TYPE}), PTUNING_TYPE),
    "pre_seq_len": (int, PTUNING_DEFAULTS.pre_seq_len, 1),
    "prefix_projection": (bool, PTUNING_DEFAULTS.prefix_projection),
    "projection_dim": (int, PTUNING_DEFAULTS.projection_dim, 1),
    "dropout_prob": (float, PTUNING_DEFAULTS.dropout_prob, 0),
}
PET_TYPES = {"lora": LORA_PET, PTUNING_TYPE: PTUNING_PET}
# ChatGLM2WithPtuning2 is MindFormers' P-Tuning class; the model here is one class with an optional prefix.
ARCH_TYPES = frozenset({"ChatGLM2ForConditionalGeneration", "ChatGLM2WithPtuning2"})


def _pet_config(value: Any, where: str) -> dict:
    """model_config.pet_config: the keys of its pet_type (lora when absent)."""
    if not isinstance(value, dict):
        raise GLMError(f"{where}: expected a mapping, got {value!r}")
    kind = value.get("pet_type", "lora")
    if kind not in PET_TYPES:
        raise GLMError(f"{where}.pet_type: expected one of {', '.join(map(repr, PET_TYPES))}, got {kind!r}"
                       f"{hint(kind, PET_TYPES)}")
    return validate_section(value, PET_TYPES[kind], where)
SCALE_SENSE = {
    "type": (frozenset({"DynamicLossScaleUpdateCell", "FixedLossScaleUpdateCell"}), "DynamicLossScaleUpdateCell"),
    "loss_scale_value": (float, 65536.0, 1), "scale_factor": (int, 2, 1), "scale_window": (int, 1000, 1),
}
CALLBACKS = {
    "MFLossMonitor": {"per_print_times": (int, 1, 1)},
    "CheckpointMonitor": {
        "prefix": (str, "glm"),
        "directory": (str, ""),
        "save_checkpoint_steps": (int, 1000, 1),
        "keep_checkpoint_max": (int, 5, 1),
        "integrated_save": (bool, True), "async_save": (bool, False),
        "save_network_params": (bool, True), "save_trainable_params": (bool, False),
    },
    "ObsMonitor": {"keep_last": (bool, True)},
    "SummaryMonitor": {"summary_dir": (str, ""), "collect_freq": (int, 10, 1), "keep_default_action": (bool, True)},
}
CALLBACKS["CheckpointMointor"] = CALLBACKS["CheckpointMonitor"]


def _scale_sense(value: Any, where: str) -> Any:
    """runner_wrapper.scale_sense: a fixed loss scale (number) or a loss-scale cell mapping."""
    if isinstance(value, dict):
        return validate_section(value, SCALE_SENSE, where)
    return typed(value, float, where)


def _callbacks(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise GLMError(f"{where}: expected a list of {{type: ...}} mappings, got {value!r}")
    out = []
    for i, item in enumerate(value):
        w = f"{where}[{i}]"
        if not isinstance(item, dict) or "type" not in item:
            raise GLMError(f"{w}: expected a mapping with a 'type' key, got {item!r}")
        kind = item["type"]
        if kind not in CALLBACKS:
            raise GLMError(f"{w}.type: unknown callback {kind!r}{hint(kind, CALLBACKS)}")
        out.append({"type": kind, **validate_section({k: v for k, v in item.items() if k != "type"}, CALLBACKS[kind], w)})
    return out


def _lr_type(value: Any, where: str) -> str:
    if value not in LR_TYPES:
        raise GLMError(f"{where}: expected one of {sorted(LR_TYPES)}, got {value!r}{hint(value, LR_TYPES)}")
    return LR_TYPES[value]


def _model_config(value: Any, where: str) -> dict:
    """Type-check against GLMConfig's fields, then let GLMConfig do the architecture checks."""
    if not isinstance(value, dict):
        raise GLMError(f"{where}: expected a mapping, got {value!r}")
    value = dict(value)
    if "max_length" in value:  # MindFormers' generation alias of max_decode_length
        length = value.pop("max_length")
        value.setdefault("max_decode_length", length)
    for key in sorted(IGNORED_MODEL_KEYS & set(value)):
        print(f"warning: {where}.{key} is accepted for MindFormers compatibility but has no effect here",
              file=sys.stderr)
        value.pop(key)
    out = validate_section(value, MODEL_CONFIG, where)
    try:
        return {**GLMConfig.from_dict(out, where).to_dict(), "pet_config": out["pet_config"]}
    except TypeError as e:  # a dataclass field that does not accept the value
        raise GLMError(f"{where}: {e}") from None


def _field_kind(f: dataclasses.Field) -> Any:
    if f.name == "pet_config":
        return _pet_config
    kinds = {"int": int, "float": float, "bool": bool, "str": str, "Optional[int]": (int, NONE)}
    return kinds.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""), object)


MODEL_CONFIG = {f.name: (_field_kind(f), None if f.name == "pet_config" else f.default)
                for f in dataclasses.fields(GLMConfig) if f.name != "extra"}

SCHEMA: dict = {
    "seed": (int, 0),
    "run_mode": (RUN_MODES, "train"),
    "output_dir": (str, "./output"),
    "load_checkpoint": (str, ""),  # a file, a rank_k/ directory, or '' (random init for tiny configs)
    "src_strategy_path_or_dir": (str, ""),
    "auto_trans_ckpt": (bool, False), "only_save_strategy": (bool, False),
    "resume_training": ((bool, str), False),  # True: latest in output_dir; a string: that checkpoint
    "use_parallel": (bool, False),
    "do_eval": (bool, False),
    "eval_step_interval": (int, 500),  # < 0 disables
    "eval_epoch_interval": (int, -1),  # < 0 disables
    # Evaluation during training (glm/train_eval.py); names as in HF Trainer, not in MindFormers.
    "best_metric": (str, "eval_loss"),  # eval_loss, eval_perplexity, or eval_rouge-1/2/l / eval_bleu-4 (ADGEN)
    "greater_is_better": ((bool, NONE), None),  # None: False for loss/perplexity, True for ROUGE/BLEU
    "early_stopping_patience": (int, 0, 0),  # stop after this many evaluations without improvement; 0: never
    "early_stopping_threshold": (float, 0.0, 0),  # an improvement must beat the best by more than this
    # How eval/predict/chat encode prompts: auto = the format the checkpoint was fine-tuned with
    # (else the eval data's version, or the model family's chat template); raw, glm2 or glm3_chat.
    "prompt_format": (frozenset({"auto", "raw", "glm2", "glm3_chat"}), "auto"),
    "remote_save_url": (str, ""),
    "predict_batch_size": ((int, NONE), None, 1),
    "trainer": ({"type": (str, "CausalLanguageModelingTrainer"), "model_name": (str, "glm2_6b")}, {}),
    "metric": ({"type": (frozenset({"ADGENMetric", "PerplexityMetric"}), "ADGENMetric")}, {}),
    "processor": ({"type": (str, "GLMProcessor"), "return_tensors": (str, "ms"), "tokenizer": (TOKENIZER, {}),
                   "max_length": ((int, NONE), None, 1)}, {}),
    "context": ({
        "mode": (frozenset({0, 1}), 0),  # 0 graph, 1 PyNative
        "device_target": (frozenset({"CPU", "GPU", "Ascend"}), "CPU"), "device_id": (int, 0, 0),
        "enable_graph_kernel": (bool, False), "graph_kernel_flags": (str, ""), "max_call_depth": (int, 10000, 1),
        "max_device_memory": (str, ""), "save_graphs": ((bool, int), False), "save_graphs_path": (str, "./graph"),
        "runtime_num_threads": ((int, NONE), None, 1),
    }, {}),
    "model": ({"model_config": (_model_config, {}),
               "arch": ({"type": (ARCH_TYPES, "ChatGLM2ForConditionalGeneration")}, {})}, {}),
    "train_dataset": (DATASET, None),
    "train_dataset_task": (DATASET_TASK, None),
    "eval_dataset": (DATASET, None),
    "eval_dataset_task": (DATASET_TASK, None),
    "runner_config": ({
        "epochs": (int, 1, 1),
        "batch_size": (int, 1, 1),  # per device; overrides the dataset block's batch_size
        "sink_mode": (bool, True), "sink_size": (int, 1), "initial_epoch": (int, 0, 0),
        "gradient_accumulation_steps": (int, 1, 1),
        "max_steps": ((int, NONE), None, 1),  # stop after this many optimizer steps (not in the reference)
        "log_interval": (int, 10, 1),  # steps between loss log lines (not in the reference)
        "plot_curves": (bool, True),  # PNG curves under output_dir/plots at the end of training (not in the reference)
    }, {}),
    "runner_wrapper": ({
        "type": (str, "MFTrainOneStepCell"),
        "scale_sense": (_scale_sense, None),  # None: no loss scaling
        "use_clip_grad": (bool, False),
        "max_grad_norm": (float, 1.0, 0),
    }, {}),
    "lr_schedule": ({
        "type": (_lr_type, "polynomial"),
        "learning_rate": (float, 5e-5, 0),  # the peak LR (optimizer.learning_rate, if set, replaces it)
        "lr_end": (float, 0.0, 0),
        "warmup_steps": (int, 0, 0),
        "warmup_ratio": ((float, NONE), None, 0),  # fraction of total_steps; wins over warmup_steps
        "warmup_lr_init": (float, 0.0, 0),
        "total_steps": (int, -1, -1),  # -1: steps per epoch x epochs
        "power": (float, 1.0, 0),
    }, {}),
    "layer_scale": (bool, False), "layer_decay": (float, 0.65),
    "optimizer": ({
        "type": (frozenset({"AdamWeightDecay", "FP32StateAdamWeightDecay", "AdamW"}), "AdamWeightDecay"),
        "beta1": (float, 0.9, 0),
        "beta2": (float, 0.95, 0),
        "eps": (float, 1e-8, 0),
        "weight_decay": (float, 0.0, 0),  # not applied to 1-D parameters (norms, biases)
        "learning_rate": ((float, NONE), None, 0),
    }, {}),
    "lr_scale": (bool, False), "lr_scale_factor": (int, 256, 1),
    "parallel": ({  # handed to ms.set_auto_parallel_context by glm/parallel.py
        "parallel_mode": ((int, str), 0),  # 0 data, 1 semi-auto, 2 auto, 3 hybrid (or the names)
        "gradients_mean": (bool, True),  # data parallel: average (not sum) the ranks' gradients
        "loss_repeated_mean": (bool, True), "enable_alltoall": (bool, False), "full_batch": (bool, True),
        "search_mode": (str, "sharding_propagation"), "enable_parallel_optimizer": (bool, False),
        "strategy_ckpt_save_file": (str, ""), "strategy_ckpt_load_file": (str, ""),
        "strategy_ckpt_config": ({"save_file": (str, "./ckpt_strategy.ckpt"), "load_file": (str, ""),
                                  "only_trainable_params": (bool, True)}, {}),
        "dataset_strategy": (object, None), "pipeline_stages": ((int, NONE), None, 1),
        "parallel_optimizer_config": ((dict, NONE), None),
    }, {}),
    "parallel_config": ({
        "data_parallel": (int, 1, 1), "model_parallel": (int, 1, 1), "pipeline_stage": (int, 1, 1),
        "expert_parallel": (int, 1, 1), "micro_batch_num": (int, 1, 1), "vocab_emb_dp": (bool, True),
        "gradient_aggregation_group": (int, 4, 1), "use_seq_parallel": (bool, False),
        "optimizer_shard": ((bool, NONE), None),
    }, {}),
    "micro_batch_interleave_num": (int, 1, 1),
    "moe_config": ({"expert_num": (int, 1, 1), "capacity_factor": (float, 1.05, 0),
                    "aux_loss_factor": (float, 0.05, 0), "num_experts_chosen": (int, 1, 1)}, {}),
    "recompute_config": ({"recompute": ((bool, list), False), "select_recompute": ((bool, list), False),
                          "parallel_optimizer_comm_recompute": (bool, False), "mp_comm_recompute": (bool, True),
                          "recompute_slice_activation": (bool, False)}, {}),
    "auto_tune": (bool, False), "filepath_prefix": (str, "./autotune"), "autotune_per_step": (int, 10, 1),
    "profile": (bool, False), "profile_start_step": (int, 1, 0), "profile_stop_step": (int, 10, 0),
    "init_start_profile": (bool, False), "profile_communication": (bool, False), "profile_memory": (bool, True),
    "profile_output": (str, ""),
    # TensorBoard event files with the metrics.jsonl scalars (MindFormers r1.3+ layout); '' = off.
    "tensorboard": ({"tensorboard_dir": (str, ""),  # events go to <tensorboard_dir>/<run_id>/
                     "tensorboard_queue_size": (int, 10, 1)}, {}),  # events buffered before a write
    "callbacks": (_callbacks, []),
    "eval_callbacks": (_callbacks, []),
    # Read by the MindSpore-Lite runner in the reference (export mode); kept for reference YAMLs.
    "infer": ({"prefill_model_path": (str, ""), "increment_model_path": (str, ""),
               "infer_seq_length": (int, 512, 1), "model_type": (str, "mindir"),
               "ge_config_path": (str, "")}, None),
}


# --------------------------------------------------------------------------------------- validation
def _semantic_checks(cfg: dict) -> None:
    lr = cfg["lr_schedule"]
    if lr["total_steps"] == 0:
        raise GLMError("lr_schedule.total_steps: expected -1 (whole run) or a positive number of steps, got 0")
    if lr["type"] == "linear" and lr["lr_end"]:
        print(f"warning: lr_schedule.lr_end {lr['lr_end']} has no effect with type linear (it decays to 0, as "
              "MindFormers' LinearWithWarmUpLR does); use type polynomial for a floor", file=sys.stderr)
    if lr["warmup_ratio"] is not None and lr["warmup_ratio"] > 1:
        raise GLMError(f"lr_schedule.warmup_ratio: expected a fraction in [0, 1], got {lr['warmup_ratio']!r}")
    pet = cfg["model"]["model_config"]["pet_config"]
    for key in ("lora_dropout", "dropout_prob"):
        if pet and pet.get(key, 0) >= 1:
            raise GLMError(f"model.model_config.pet_config.{key}: expected a probability in [0, 1), "
                           f"got {pet[key]!r}")
    arch = cfg["model"]["arch"]["type"]
    if arch == "ChatGLM2WithPtuning2" and (pet or {}).get("pet_type") != PTUNING_TYPE:
        raise GLMError("model.arch.type: ChatGLM2WithPtuning2 needs model.model_config.pet_config with "
                       "pet_type: ptuning2 (and pre_seq_len)")
    if cfg["optimizer"]["learning_rate"] is not None:  # one source of truth for the trainer
        lr["learning_rate"] = cfg["optimizer"]["learning_rate"]
    for name in ("beta1", "beta2"):
        if not cfg["optimizer"][name] < 1:
            raise GLMError(f"optimizer.{name}: expected a value in [0, 1), got {cfg['optimizer'][name]!r}")


def _hoist_datasets(cfg: dict) -> dict:
    """A file may define only `<name>_task.dataset_config`: make `<name>` that same dict (in place)."""
    for name in ("train_dataset", "eval_dataset"):
        task = cfg.get(f"{name}_task")
        if cfg.get(name) is None and isinstance(task, dict) and isinstance(task.get("dataset_config"), dict):
            cfg[name] = task["dataset_config"]
    return cfg


def validate_config(raw: dict) -> dict:
    """Validate a raw config dict (as read from YAML); return a new dict with all defaults filled.

    Idempotent: validating an already validated config returns an equal dict."""
    cfg = validate_section(_hoist_datasets(dict(raw)), SCHEMA, "")
    _semantic_checks(cfg)
    return cfg


# --------------------------------------------------------------------------------------- overrides
def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, text = str(item).partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise GLMError(f"override {item!r}: expected dotted.key=value, e.g. runner_config.batch_size=2")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML (e.g. an unbalanced bracket): keep the text
    return key.split("."), value


def _callback_item(items: list, part: str, item: str) -> dict:
    if part.isdigit():
        if int(part) >= len(items):
            raise GLMError(f"override {item!r}: callbacks has {len(items)} entries, no index {part}")
        return items[int(part)]
    if part not in CALLBACKS:
        raise GLMError(f"override {item!r}: unknown callback {part!r}{hint(part, CALLBACKS)}")
    names = CHECKPOINT_CALLBACKS if part in CHECKPOINT_CALLBACKS else (part,)
    for entry in items:
        if isinstance(entry, dict) and entry.get("type") in names:
            return entry
    items.append({"type": part})  # overriding a callback the file lacks adds it
    return items[-1]


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Set dotted `key=value` items (values parsed as YAML) in `cfg` and return the validated result.

    Keys are checked against the schema (unknown key: error naming the closest match), then the
    whole config is validated again, so values get the same checks and conversions as the file's.
    Callbacks are addressed by index or type: `callbacks.CheckpointMonitor.save_checkpoint_steps=10`
    (a callback the config lacks is added)."""
    return validate_config(_set_overrides(cfg, overrides))


def _set_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    _hoist_datasets(cfg)  # so `train_dataset.x=...` edits the task's block rather than a new, partial one
    for item in overrides:
        parts, value = _parse_override(item)
        node, kind = cfg, SCHEMA
        for i, part in enumerate(parts):
            where = ".".join(parts[: i + 1])
            if kind is _callbacks:
                node = _callback_item(node, part, item)
                kind = CALLBACKS[node["type"]]
                if i == len(parts) - 1:
                    raise GLMError(f"override {item!r}: set a key of the callback, e.g. {where}.prefix=...")
                continue
            if kind is _model_config:
                kind = MODEL_CONFIG if part not in IGNORED_MODEL_KEYS | {"max_length"} else {part: (object, None)}
            elif kind is _pet_config:   # the keys of every pet_type; validation then checks the chosen one
                kind = {k: v for schema in PET_TYPES.values() for k, v in schema.items()}
            elif kind is _scale_sense:
                kind = SCALE_SENSE
            if not isinstance(kind, dict):
                parent = ".".join(parts[:i])
                raise GLMError(f"override {item!r}: {parent} is a single value, it has no key {part!r}")
            if part not in kind:
                prefix = ".".join(parts[:i]) + "." if i else ""
                raise GLMError(f"override {item!r}: unknown key {where!r}{hint(part, kind, prefix)}")
            if i == len(parts) - 1:
                node[part] = value
                break
            kind = kind[part][0]
            child = node.get(part)
            if kind is _callbacks:
                node[part] = child if isinstance(child, list) else []
            elif not isinstance(child, dict):
                node[part] = {}
            node = node[part]
    return cfg


# -------------------------------------------------------------------------------------- file I/O
def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Read, override and validate a YAML run config; errors name the file, the key and the problem."""
    path = Path(path)
    if not path.exists():
        raise GLMError(f"{path}: config file not found")
    if path.is_dir():
        raise GLMError(f"{path}: is a directory, expected a YAML config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GLMError(f"{path}:{line}: invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GLMError(f"{path}: cannot read: {e}") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else type(raw).__name__
        raise GLMError(f"{path}: expected a mapping of config keys at the top level, got {got}")
    try:
        return validate_config(_set_overrides(raw, overrides))
    except GLMError as e:
        raise GLMError(f"{path}: {e}") from None


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # write shared sections out in full, no &id001
        return True


def save_resolved(cfg: dict, output_dir: str | Path) -> Path:
    """Write `output_dir/config.resolved.yaml` atomically (glm.io: temp file, fsync, rename); return its path."""
    from glm.io import write_text_atomic

    text = yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return write_text_atomic(Path(output_dir) / "config.resolved.yaml", text)


# ---------------------------------------------------------------------------------------- helpers
def dataset_section(cfg: dict, name: str = "train_dataset") -> dict:
    """The dataset block `name` (train_dataset / eval_dataset), or `<name>_task.dataset_config`."""
    section = cfg.get(name) or (cfg.get(f"{name}_task") or {}).get("dataset_config")
    if not section:
        raise GLMError(f"{name}: no dataset configured (add a {name}: block with data_loader.dataset_dir)")
    return section


def callback(cfg: dict, name: str, key: str = "callbacks") -> dict | None:
    """The first callback of type `name` in cfg[key]; CheckpointMonitor matches either spelling."""
    names = CHECKPOINT_CALLBACKS if name in CHECKPOINT_CALLBACKS else (name,)
    return next((c for c in cfg.get(key) or [] if c.get("type") in names), None)
