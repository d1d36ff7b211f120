"""Run-config tests: shipped configs, pasted model-card blocks, overrides and one-line error messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from glm import GLMError
from glm.config import CHECKPOINT_CALLBACKS, apply_overrides, load_config, save_resolved, validate_config
from glm.policy import notice_line
from glm.settings import resolve

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SEEDS = SHARED / "seeds"
TINY = REPO / "configs" / "glm2" / "run_glm2_tiny.yaml"
SHIPPED = sorted((REPO / "configs").glob("glm*/*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error(path, overrides=()) -> str:
    with pytest.raises(GLMError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------- shipped configs
def callback(cfg: dict, name: str) -> dict | None:
    """The first callback of type `name` in a loaded config; CheckpointMonitor matches either spelling."""
    names = CHECKPOINT_CALLBACKS if name in CHECKPOINT_CALLBACKS else (name,)
    return next((c for c in cfg["callbacks"] if c["type"] in names), None)


def test_all_configs_are_shipped():
    names = {p.relative_to(REPO / "configs").as_posix() for p in SHIPPED}
    assert {"glm2/run_glm2_6b.yaml", "glm2/run_glm2_6b_finetune.yaml", "glm2/run_glm2_6b_lora.yaml",
            "glm3/run_glm3_6b.yaml", "glm3/run_glm3_6b_finetune_2k.yaml", "glm2/run_glm2_tiny.yaml",
            "glm2/run_glm2_tiny_lora.yaml", "glm3/run_glm3_tiny.yaml", "glm3/run_glm3_tiny_lora.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    mc = cfg["model"]["model_config"]
    train = cfg["train_dataset"]
    assert mc["seq_length"] >= train["max_source_length"] + train["max_target_length"] + 1
    assert cfg["eval_dataset"]["data_loader"]["phase"] in ("train", "eval")
    ckpt = callback(cfg, "CheckpointMonitor")
    assert ckpt is not None and ckpt["keep_checkpoint_max"] >= 1
    assert isinstance(cfg["lr_schedule"]["learning_rate"], float)
    assert isinstance(mc["layernorm_epsilon"], float)  # `1e-5` is a string to PyYAML
    glm3 = path.parent.name == "glm3"
    assert train["tokenizer"]["type"] == ("ChatGLM3Tokenizer" if glm3 else "ChatGLM2Tokenizer")
    assert ("lora" in path.name or "ptuning" in path.name) == (mc["pet_config"] is not None)


@pytest.mark.parametrize("path", [p for p in SHIPPED if "tiny" in p.name and "chat" not in p.name],  # chat: test_conversations
                         ids=lambda p: p.name)
def test_tiny_configs(path):
    cfg = load_config(path)
    mc = cfg["model"]["model_config"]
    assert (mc["num_layers"], mc["hidden_size"], mc["num_attention_heads"], mc["kv_channels"]) == (2, 128, 4, 32)
    assert (mc["multi_query_group_num"], mc["ffn_hidden_size"], mc["padded_vocab_size"]) == (2, 344, 2048)
    assert mc["seq_length"] == 48 + 79 + 1
    assert {mc["param_init_type"], mc["compute_dtype"]} == {"float32"}
    assert cfg["context"]["device_target"] == "CPU" and cfg["use_parallel"] is False
    assert cfg["load_checkpoint"] == "random" and cfg["output_dir"].startswith("./output/")
    assert cfg["runner_config"]["batch_size"] == 4
    lr, decay = (2e-2, 0.0) if "ptuning" in path.name else (1e-3, 0.01)   # prefixes: a larger LR, no decay
    assert cfg["lr_schedule"] == {**cfg["lr_schedule"], "type": "polynomial", "learning_rate": lr, "warmup_steps": 10}
    assert (cfg["optimizer"]["type"], cfg["optimizer"]["beta2"], cfg["optimizer"]["weight_decay"]) == \
        ("AdamWeightDecay", 0.95, decay)
    ckpt = callback(cfg, "CheckpointMointor")
    assert (ckpt["save_checkpoint_steps"], ckpt["keep_checkpoint_max"]) == (50, 2)
    train, ev = cfg["train_dataset"], cfg["eval_dataset"]
    version = 3 if "glm3" in path.name else 2
    assert (train["data_loader"]["version"], ev["data_loader"]["version"]) == (version, version)
    assert (ev["data_loader"]["phase"], ev["max_source_length"], ev["max_target_length"]) == ("eval", 48, 80)
    for section in (train, ev):  # the sample data the tiny configs point at
        assert section["data_loader"]["dataset_dir"].startswith("data/sample/")
        assert section["tokenizer"]["vocab_file"] == "data/sample/tokenizer.model"
    if "lora" in path.name:
        assert mc["pet_config"] == {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
                                    "target_modules": ".*query_key_value.*"}
    if "ptuning" in path.name:
        assert mc["pet_config"] == {"pet_type": "ptuning2", "pre_seq_len": 16, "prefix_projection": False,
                                    "projection_dim": 128, "dropout_prob": 0.0}


def test_reference_values_of_the_6b_config():
    cfg = load_config(REPO / "configs" / "glm2" / "run_glm2_6b.yaml")
    assert cfg["model"]["model_config"]["seq_length"] == 193
    assert cfg["lr_schedule"]["learning_rate"] == 5e-5 and cfg["lr_schedule"]["lr_end"] == 1e-6
    assert cfg["optimizer"]["type"] == "FP32StateAdamWeightDecay" and cfg["optimizer"]["eps"] == 1e-8
    assert cfg["runner_wrapper"]["scale_sense"]["loss_scale_value"] == 65536.0
    assert callback(cfg, "CheckpointMonitor")["type"] == "CheckpointMointor"
    assert cfg["parallel_config"]["data_parallel"] == 8
    lora = load_config(REPO / "configs" / "glm2" / "run_glm2_6b_lora.yaml")
    assert lora["model"]["model_config"]["pet_config"]["lora_alpha"] == 32.0
    assert lora["parallel"]["strategy_ckpt_config"]["only_trainable_params"] is False


# ----------------------------------------------------------------------------- model-card blocks
def _seed_blocks() -> list:
    if not SEEDS.is_dir():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"shared seeds not found at {SEEDS}"))]
    blocks = []
    for card in sorted(SEEDS.glob("*.md")):
        text = card.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"^([ \t]*)```yaml[ \t]*\n(.*?)^\1```", text, re.S | re.M):
            body = "\n".join(line[len(m.group(1)):] for line in m.group(2).splitlines())
            if "model_config" in body or "train_dataset" in body:
                line = text[: m.start()].count("\n") + 1
                blocks.append(pytest.param(card.name, body, id=f"{card.stem}:{line}"))
    return blocks


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


@pytest.mark.parametrize("card,block", _seed_blocks())
def test_model_card_yaml_blocks_load(card, block, tmp_path):
    """A block pasted alone, or into the matching shipped config, loads (the paths stay placeholders)."""
    base = REPO / "configs" / ("glm3/run_glm3_6b.yaml" if "glm3" in card else "glm2/run_glm2_6b.yaml")
    merged = _deep_merge(yaml.safe_load(base.read_text(encoding="utf-8")), yaml.safe_load(block))
    for path in (write(tmp_path, block, "alone.yaml"), write(tmp_path, yaml.safe_dump(merged), "merged.yaml")):
        try:
            cfg = load_config(path)
        except GLMError as e:  # only explicit placeholders may fail
            assert "/path/to" in str(e), str(e)
            continue
        if "train_dataset" in block:
            assert cfg["train_dataset"]["data_loader"]["dataset_dir"] == "/path/to/AdvertiseGen/train.json"
            assert cfg["eval_dataset"]["data_loader"]["phase"] == "eval"


# ------------------------------------------------------------------------------ errors: keys/types
def test_unknown_key_names_dotted_path_and_suggestion(tmp_path):
    msg = error(write(tmp_path, "runner_config:\n  epoch: 2\n"))
    assert "cfg.yaml" in msg and "runner_config.epoch" in msg and "'runner_config.epochs'" in msg
    msg = error(write(tmp_path, "train_dataset:\n  data_loader:\n    dataset_dri: x.json\n"))
    assert "train_dataset.data_loader.dataset_dri" in msg and "train_dataset.data_loader.dataset_dir" in msg
    msg = error(write(tmp_path, "lr_shedule:\n  type: cosine\n"))
    assert "lr_shedule: unknown key" in msg and "'lr_schedule'" in msg
    msg = error(write(tmp_path, "model:\n  model_config:\n    num_layer: 2\n"))
    assert "model.model_config.num_layer" in msg and "model.model_config.num_layers" in msg
    msg = error(write(tmp_path, "callbacks:\n  - type: CheckpointMonitr\n"))
    assert "callbacks[0].type" in msg and "CheckpointMonitor" in msg
    msg = error(write(tmp_path, "callbacks:\n  - type: CheckpointMointor\n    keep_checkpoint: 2\n"))
    assert "callbacks[0].keep_checkpoint" in msg and "keep_checkpoint_max" in msg


def test_wrong_type_names_key_expectation_and_value(tmp_path):
    msg = error(write(tmp_path, "runner_config:\n  epochs: two\n"))
    assert "runner_config.epochs" in msg and "integer" in msg and "'two'" in msg
    msg = error(write(tmp_path, "runner_config:\n  epochs: true\n"))  # a bool is not an int
    assert "runner_config.epochs" in msg and "True" in msg
    msg = error(write(tmp_path, "do_eval: 'yes'\n"))
    assert "do_eval" in msg and "true or false" in msg
    msg = error(write(tmp_path, "optimizer:\n  weight_decay: lots\n"))
    assert "optimizer.weight_decay" in msg and "number" in msg and "'lots'" in msg
    msg = error(write(tmp_path, "runner_config: 4\n"))
    assert "runner_config: expected a mapping" in msg
    msg = error(write(tmp_path, "model:\n  model_config:\n    use_past: 'no'\n"))
    assert "model.model_config.use_past" in msg


def test_numeric_strings_and_ints_accepted_as_floats(tmp_path):
    cfg = load_config(write(tmp_path, "lr_schedule:\n  learning_rate: 1e-4\n  lr_end: 0\noptimizer:\n"
                                      "  eps: 1.e-8\n  beta1: 0.9\nmodel:\n  model_config:\n    layernorm_epsilon: 1e-5\n"
                                      "    top_p: 1\n"))
    assert cfg["lr_schedule"]["learning_rate"] == 1e-4 and isinstance(cfg["lr_schedule"]["lr_end"], float)
    assert cfg["optimizer"]["eps"] == 1e-8
    assert cfg["model"]["model_config"]["layernorm_epsilon"] == 1e-5
    assert cfg["model"]["model_config"]["top_p"] == 1.0


def test_none_strings_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "load_checkpoint: None\nmodel:\n  model_config:\n    pre_seq_len: None\n"))
    assert cfg["load_checkpoint"] == "" and cfg["model"]["model_config"]["pre_seq_len"] is None
    assert cfg["runner_config"] == {"epochs": 1, "batch_size": 1, "sink_mode": False, "sink_size": 1,
                                    "initial_epoch": 0, "gradient_accumulation_steps": 1, "max_steps": None,
                                    "log_interval": 10, "plot_curves": True}
    assert cfg["train_dataset"] is None and cfg["callbacks"] == [] and cfg["infer"] is None
    assert callback(cfg, "CheckpointMonitor") is None
    with pytest.raises(GLMError, match="eval_dataset: no dataset configured"):
        resolve(cfg).dataset("eval_dataset")


def test_reference_schedule_names_and_optimizer_lr(tmp_path):
    cfg = load_config(write(tmp_path, "lr_schedule:\n  type: CosineWithWarmUpLR\n  learning_rate: 1.e-5\n"
                                      "optimizer:\n  learning_rate: 3.e-4\n"))
    assert cfg["lr_schedule"]["type"] == "CosineWithWarmUpLR"   # glm/optim.py computes the cosine
    assert cfg["lr_schedule"]["learning_rate"] == 3e-4  # optimizer.learning_rate, when set, wins


def test_inference_only_model_keys_are_accepted_with_a_notice(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  model_config:\n    use_paged_attention: True\n    block_size: 16\n"
                                      "    max_length: 300\n"))
    mc = cfg["model"]["model_config"]
    assert mc["use_paged_attention"] is True and mc["max_decode_length"] == 300
    line = notice_line(resolve(cfg))
    assert "\n" not in line and "model.model_config.use_paged_attention" in line
    assert "block_size" not in line   # inert unless paged attention itself applied


def test_model_config_architecture_errors_name_the_file(tmp_path):
    msg = error(write(tmp_path, "model:\n  model_config:\n    hidden_size: 100\n"))
    assert msg.startswith(str(tmp_path / "cfg.yaml")) and "model.model_config" in msg and "hidden_size" in msg


# --------------------------------------------------------------------------------------- file I/O
def test_missing_file_directory_invalid_yaml_and_non_mapping(tmp_path):
    assert "not found" in error(tmp_path / "nope.yaml") and "nope.yaml" in error(tmp_path / "nope.yaml")
    assert "is a directory" in error(tmp_path)
    msg = error(write(tmp_path, "seed: 0\nrunner_config:\n  epochs: [1\n  batch_size: 2\n"))
    assert "cfg.yaml" in msg and "invalid YAML" in msg and re.search(r"line [45]\b", msg), msg
    msg = error(write(tmp_path, "seed: 0\n  bad_indent: 1\n"))
    assert "line 2" in msg, msg
    assert "top level" in error(write(tmp_path, "- a\n- b\n"))
    assert "empty file" in error(write(tmp_path, ""))


def test_anchors_aliases_and_task_only_datasets(tmp_path):
    # only train_dataset_task.dataset_config is given (anchored); eval reuses it through an alias
    text = ("train_dataset_task:\n  type: KeyWordGenDataset\n  dataset_config: &ds\n"
            "    data_loader: {dataset_dir: a.json, phase: train}\n    max_source_length: 8\n"
            "    max_target_length: 8\neval_dataset_task:\n  dataset_config: *ds\n")
    path = write(tmp_path, text)
    cfg = load_config(path, ["train_dataset.data_loader.dataset_dir=b.json"])
    assert cfg["train_dataset"]["data_loader"]["dataset_dir"] == "b.json"
    assert cfg["eval_dataset"]["max_source_length"] == 8
    assert cfg["train_dataset_task"]["dataset_config"]["data_loader"]["dataset_dir"] == "b.json"  # aliased


def test_save_resolved_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "glm2" / "run_glm2_6b_lora.yaml")
    out = save_resolved(cfg, tmp_path / "run")
    assert out == tmp_path / "run" / "config.resolved.yaml"
    assert [p.name for p in out.parent.iterdir()] == ["config.resolved.yaml"]  # no temp file left
    assert "&id" not in out.read_text(encoding="utf-8")
    assert load_config(out) == cfg
    assert validate_config(cfg) == cfg


# -------------------------------------------------------------------------------------- overrides
def test_overrides_of_nested_keys():
    cfg = load_config(TINY, ["model.model_config.seq_length=256", "runner_config.batch_size=2",
                             "optimizer.learning_rate=1e-4", "callbacks.CheckpointMonitor.save_checkpoint_steps=7",
                             "callbacks.0.per_print_times=5", "runner_wrapper.scale_sense.loss_scale_value=1024",
                             "eval_dataset.data_loader.dataset_dir=/data/dev.json", "do_eval=True"])
    assert cfg["model"]["model_config"]["seq_length"] == 256 and cfg["runner_config"]["batch_size"] == 2
    assert cfg["lr_schedule"]["learning_rate"] == 1e-4 and cfg["do_eval"] is True
    assert callback(cfg, "CheckpointMonitor")["save_checkpoint_steps"] == 7
    assert cfg["callbacks"][0]["per_print_times"] == 5
    assert cfg["runner_wrapper"]["scale_sense"]["loss_scale_value"] == 1024.0
    assert cfg["eval_dataset"]["data_loader"]["dataset_dir"] == "/data/dev.json"
    added = load_config(TINY, ["callbacks.SummaryMonitor.collect_freq=3"])
    assert callback(added, "SummaryMonitor")["collect_freq"] == 3


def test_override_errors():
    msg = error(TINY, ["runner_config.epoch=2"])
    assert "run_glm2_tiny.yaml" in msg and "runner_config.epoch" in msg and "'runner_config.epochs'" in msg
    msg = error(TINY, ["model.model_config.seq_lenght=3"])
    assert "'model.model_config.seq_length'" in msg
    assert "expected dotted.key=value" in error(TINY, ["runner_config.batch_size"])
    assert "has no key 'x'" in error(TINY, ["runner_config.batch_size.x=1"])
    msg = error(TINY, ["runner_config.epochs=two"])
    assert "runner_config.epochs" in msg and "'two'" in msg
    assert "unknown callback" in error(TINY, ["callbacks.LossMonitor.per_print_times=1"])


def test_apply_overrides_then_validate():
    cfg = apply_overrides(load_config(TINY), ["runner_config.epochs=3", "model.model_config.pet_config.lora_rank=4",
                                              "optimizer.learning_rate=1e-4", "run_mode=chat",
                                              "runner_config.max_steps=5"])
    assert cfg["runner_config"]["epochs"] == 3 and cfg["runner_config"]["max_steps"] == 5
    assert cfg["lr_schedule"]["learning_rate"] == 1e-4 and cfg["run_mode"] == "chat"  # validated, converted
    assert cfg["model"]["model_config"]["pet_config"]["lora_rank"] == 4  # adding pet_config enables LoRA
    with pytest.raises(GLMError, match=r"unknown key 'sed'.*'seed'"):
        apply_overrides(cfg, ["sed=1"])
    with pytest.raises(GLMError, match=r"runner_config.epochs: expected an integer, got 'x'"):
        apply_overrides(cfg, ["runner_config.epochs=x"])


# -------------------------------------------------------------------------------- semantic checks
@pytest.mark.parametrize("override,needle", [
    ("runner_config.batch_size=0", "runner_config.batch_size: expected a value >= 1, got 0"),
    ("runner_config.epochs=0", "runner_config.epochs: expected a value >= 1, got 0"),
    ("runner_config.gradient_accumulation_steps=0", "runner_config.gradient_accumulation_steps: expected a value >= 1"),
    ("lr_schedule.warmup_steps=-1", "lr_schedule.warmup_steps: expected a value >= 0, got -1"),
    ("lr_schedule.total_steps=0", "lr_schedule.total_steps"),
    ("lr_schedule.warmup_ratio=1.5", "lr_schedule.warmup_ratio"),
    ("lr_schedule.type=cosin", "did you mean 'cosine'"),
    ("callbacks.CheckpointMonitor.keep_checkpoint_max=0", "callbacks[1].keep_checkpoint_max: expected a value >= 1"),
    ("train_dataset.data_loader.phase=test", "train_dataset.data_loader.phase: expected one of 'eval', 'train'"),
    ("eval_dataset.data_loader.version=1", "eval_dataset.data_loader.version: expected one of 2, 3, got 1"),
    ("model.model_config.pet_config.pet_type=prefix", "pet_config.pet_type: expected one of 'lora', 'ptuning2', got 'prefix'"),
    ("model.model_config.pet_config.lora_rank=0", "pet_config.lora_rank: expected a value >= 1, got 0"),
    ("model.model_config.pet_config.lora_dropout=1.0", "pet_config.lora_dropout"),
    ("model.model_config.pet_config.target_modules=(", "pet_config.target_modules: not a valid regular expression"),
    ("run_mode=serving", "run_mode: expected one of"),
    ("context.device_target=TPU", "context.device_target"),
    ("optimizer.type=SGD", "optimizer.type"),
    ("optimizer.beta2=1.0", "optimizer.beta2"),
    ("metric.type=Accuracy", "metric.type"),
    ("train_dataset.tokenizer.type=LlamaTokenizer", "train_dataset.tokenizer.type"),
])
def test_semantic_checks(override, needle):
    msg = error(TINY, [override])
    assert needle in msg and msg.startswith(str(TINY)), msg


def test_an_empty_output_dir_is_the_default_folder_for_every_reader():
    # One place turns `output_dir: ''` into the default; run modes, the lock and the launcher read it as is.
    cfg = load_config(TINY, ["output_dir="])
    assert cfg["output_dir"] == "./output" and resolve(cfg).output_dir == "./output"
    assert load_config(TINY, ["output_dir=elsewhere"])["output_dir"] == "elsewhere"
