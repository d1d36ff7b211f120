"""A config is a contract: every key is honoured, reported (one notice line) or refused (all errors at once).

Fast and in-process: the loader, the notice line and the dry run's own checks; no training.
- every YAML under configs/ and MindFormers v1.0.2 recipes (tests/fixtures/mindformers/) load with a stated
  notice, or are refused with one message that lists every bad key;
- every honoured key is read by the code outside the loader (so a new silent key fails here);
- docs/config.md is the generated reference, and its defaults are the dataclasses' (one place per key);
- --dry_run refuses what the run refuses, with the same message, and checks only what the mode needs.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from glm import GLMError
from glm.config import load_config, validate_config
from glm.config_doc import DOC, _fmt, render
from glm.model.config import GLMConfig
from glm.policy import notice_line
from glm.settings import PetConfig, RunConfig, resolve
from glm.validate import HONOURED, field_default

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mindformers"
CONFIGS = sorted((REPO / "configs").glob("glm*/*.yaml"))
TINY = REPO / "configs" / "glm2" / "run_glm2_tiny.yaml"


def merged(name: str) -> dict:
    """A MindFormers recipe: tests/fixtures/mindformers/common.yaml with the recipe's own keys over it."""
    def merge(base: dict, over: dict) -> dict:
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    common = yaml.safe_load((FIXTURES / "common.yaml").read_text(encoding="utf-8"))
    recipe = yaml.safe_load((FIXTURES / name).read_text(encoding="utf-8"))
    cfg = merge(common, recipe)
    for name in ("train_dataset", "eval_dataset"):   # the *_task blocks are aliases of these in the recipes
        cfg[f"{name}_task"]["dataset_config"] = cfg[name]
    return cfg


def write(tmp_path: Path, cfg: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def refusal(path: Path, overrides=()) -> str:
    with pytest.raises(GLMError) as info:
        load_config(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------- shipped configs and recipes
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_state_their_notices(path):
    cfg = load_config(path)
    line = notice_line(resolve(cfg))
    if "tiny" in path.name:   # CPU configs ask for nothing this machine cannot do
        assert line is None
    else:                      # the 6B configs are MindFormers' Ascend recipes: sink mode, memory cap, ...
        assert line is not None and "\n" not in line and line.startswith("notice: ")
        assert "runner_config.sink_mode" in line and "context.max_device_memory" in line


# recipe -> keys the notice line must name
RECIPES = {
    "run_glm2_6b.yaml": ["runner_config.sink_mode", "context.max_device_memory", "recompute_config.recompute",
                         "remote_save_url", "ObsMonitor"],
    "run_glm2_6b_lora.yaml": ["runner_config.sink_mode", "SummaryMonitor", "ObsMonitor"],
    "run_glm2_6b_ptuning2.yaml": ["runner_config.sink_mode", "context.max_device_memory"],
    "run_glm2_6b_finetune_eval.yaml": ["recompute_config.recompute_slice_activation"],
    "run_glm3_6b.yaml": ["runner_config.sink_mode"],
    "export_glm3_6b_pa.yaml": ["model.model_config.use_paged_attention",
                               "model.model_config.use_prompt_flash_attention"],
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_mindformers_recipes_are_accepted_with_one_notice_line(name, tmp_path):
    cfg = load_config(write(tmp_path, merged(name)))
    line = notice_line(resolve(cfg))
    assert "\n" not in line
    for key in RECIPES[name]:
        assert key in line, (key, line)
    # use_parallel False: MindFormers ignores the parallel sections, so they are not reported either
    assert "parallel.enable_parallel_optimizer" not in line and "parallel_config" not in line
    # settings inert for GLM in MindFormers too (block_size without paged attention, profile_* without
    # profile) are not noise in the line
    assert "profile_communication" not in line and "layer_decay" not in line


def test_a_recipe_with_every_kind_of_mistake_lists_them_all_in_one_message(tmp_path):
    cfg = merged("run_glm2_6b_ptuning2.yaml")
    mc = cfg["model"]["model_config"]
    mc.update(quantization_bit=4, apply_query_key_layer_scaling=False, num_heads=32)   # refused x2, a typo
    cfg["micro_batch_interleave_num"] = 2                                               # refused
    cfg["only_save_strategy"] = True                                                    # refused
    cfg["lr_schedule"]["type"] = "cosine_with_restarts"                                 # not implemented
    cfg["optimizer"]["type"] = "SGD"                                                    # unknown value
    cfg["runner_config"]["epochs"] = 0                                                  # out of range
    msg = refusal(write(tmp_path, cfg))
    lines = msg.splitlines()
    assert lines[0].endswith("8 config errors:"), msg
    bad = ["model.model_config.quantization_bit", "model.model_config.apply_query_key_layer_scaling",
           "micro_batch_interleave_num", "only_save_strategy", "lr_schedule.type", "optimizer.type",
           "model.model_config.num_heads", "runner_config.epochs"]
    for key in bad:
        assert sum(line.startswith(f"  - {key}:") for line in lines[1:]) == 1, (key, msg)
    assert "did you mean 'model.model_config.num_attention_heads'" in msg
    # the most fundamental first: refused features and wrong types, then unknown keys, then bad values
    order = [next(i for i, line in enumerate(lines) if line.startswith(f"  - {k}:")) for k in bad]
    assert max(order[:6]) < order[6] < order[7]


def test_mindformers_ptuning2_recipe_before_ptuning_was_a_chain_of_runs_now_one_answer(tmp_path):
    """The recipe's P-Tuning v2 keys are all accepted (glm/model/ptuning.py); a model-level pre_seq_len that
    disagrees with pet_config, and a LoRA key on a P-Tuning config, come back together."""
    cfg = merged("run_glm2_6b_ptuning2.yaml")
    load_config(write(tmp_path, cfg))
    cfg["model"]["model_config"]["pet_config"]["lora_rank"] = 8
    cfg["model"]["arch"]["type"] = "ChatGLM2WithLora"
    msg = refusal(write(tmp_path, cfg))
    assert "pet_config.lora_rank: a lora key, but pet_type is 'ptuning2'" in msg
    assert "model.arch.type: 'ChatGLM2WithLora' needs" in msg


def test_same_check_same_message_for_parallel_on_cpu_and_it_names_the_wrong_key(tmp_path):
    # finetune_eval ships parallel_mode 1 (semi-auto): fine while use_parallel is False, as in MindFormers
    path = write(tmp_path, merged("run_glm2_6b_finetune_eval.yaml"))
    load_config(path, ["context.device_target=CPU"])
    msg = refusal(path, ["use_parallel=True", "context.device_target=CPU"])
    assert "parallel.parallel_mode: 1 (semi_auto_parallel) needs Ascend or GPU" in msg
    assert "model_parallel" not in msg and "pipeline_stage" not in msg   # they are 1
    from glm.parallel import check_parallel_support  # what the run's init_distributed calls
    from glm.sections import ParallelConfig, ParallelSection

    with pytest.raises(GLMError) as run_error:
        check_parallel_support(ParallelSection(parallel_mode=1), ParallelConfig(model_parallel=1), "CPU")
    assert str(run_error.value) in msg


def test_max_decode_length_zero_is_an_error_and_above_seq_length_warns_once(tmp_path, capsys):
    assert "model.model_config.max_decode_length: expected a value >= 1, got 0" in refusal(
        TINY, ["model.model_config.max_decode_length=0"])
    from glm.build import generation_config
    from glm.tokenizer import load_tokenizer

    cfg = load_config(TINY, ["model.model_config.max_decode_length=300"])
    tok = load_tokenizer("ChatGLM2Tokenizer", str(REPO / "data" / "sample" / "tokenizer.model"))
    import glm.build

    glm.build._warned_decode_length = False
    gen = generation_config(cfg, tok)
    generation_config(cfg, tok)
    err = capsys.readouterr().err
    assert err.count("max_decode_length 300 is larger than seq_length 128") == 1
    assert "generation stops at 128 tokens, prompt included" in err and gen.max_length == 300


# ------------------------------------------------------------------- dry run: what the mode needs
def test_export_dry_run_needs_no_dataset_and_refuses_what_export_refuses(tmp_path, capsys):
    from glm.dryrun import dry_run

    cfg = load_config(TINY, ["train_dataset=null", "train_dataset_task=null", "eval_dataset=null",
                             "eval_dataset_task=null", "processor.tokenizer.vocab_file=''",
                             f"output_dir={tmp_path}"])
    dry_run(cfg, "export")
    assert "export reads no dataset; dry run OK" in capsys.readouterr().out
    from glm.export import export_preflight

    no_weights = load_config(TINY, ["load_checkpoint=''", "train_dataset=null", "train_dataset_task=null"])
    with pytest.raises(GLMError) as run_error:
        export_preflight(no_weights)
    with pytest.raises(GLMError) as dry_error:
        dry_run(no_weights, "export")
    assert str(dry_error.value) == str(run_error.value)


def test_eval_dry_run_requires_weights_like_eval(capsys):
    from glm.build import load_checkpoints
    from glm.dryrun import dry_run

    cfg = load_config(TINY, ["load_checkpoint=''"])
    with pytest.raises(GLMError) as dry_error:
        dry_run(cfg, "eval")
    with pytest.raises(GLMError) as run_error:
        load_checkpoints(None, "", None, required=True, run_mode="eval")
    assert str(dry_error.value) == str(run_error.value)


# ------------------------------------------------------------------- no silent key
LOADER = {"config.py", "validate.py", "settings.py", "sections.py", "policy.py", "config_doc.py"}
# Keys read as a whole (a list of callbacks, each checked on its own; a mapping passed to MindSpore).
PASSED_AS_A_MAPPING = {"callbacks", "parallel.strategy_ckpt_config.save_file", "parallel.strategy_ckpt_config.load_file",
                       "parallel.strategy_ckpt_config.only_trainable_params"}
# Keys whose reader is being built by another change of this wave (none left: glm/train_eval.py reads
# do_eval and the eval intervals).
PENDING: set = set()


def _honoured(cls: type, prefix: str = ""):
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "doc" not in meta:
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        sub = meta.get("section")
        if sub is not None:
            yield from _honoured(sub, path)
        elif meta["status"] == HONOURED:
            yield path, f.name
        if f.name == "pet_config":
            yield from _honoured(PetConfig, path)


def test_every_honoured_key_is_read_outside_the_loader():
    from glm.settings import CALLBACK_TYPES

    code = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "glm").rglob("*.py")
                     if p.name not in LOADER or p.parent.name == "model")
    keys = list(_honoured(RunConfig)) + list(_honoured(GLMConfig, "model.model_config"))
    for name, cls in CALLBACK_TYPES.items():
        keys += list(_honoured(cls, f"callbacks[{name}]"))
    silent = [path for path, name in keys
              if path not in PASSED_AS_A_MAPPING and path not in PENDING
              and not re.search(rf"(\.{re.escape(name)}\b|[\"']{re.escape(name)}[\"'])", code)]
    assert not silent, f"accepted but never read (honour them, or declare them notice/refused/inert): {silent}"
    still_pending = [k for k in PENDING if re.search(rf"\.{k}\b|[\"']{k}[\"']", code)]
    assert not still_pending, f"now read: remove from PENDING {still_pending}"


# ------------------------------------------------------------------- one default per key
def test_key_reference_is_generated_and_its_defaults_are_the_dataclasses():
    assert DOC.read_text(encoding="utf-8") == render(), "docs/config.md is stale: python -m glm.config_doc"
    rows = {}
    section = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## `"):
            section = line[4:line.index("`", 4)]
        elif line.startswith("| `") and section:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[(section, cells[0].strip("`"))] = cells[1]
    # What a run gets when the file leaves a key out is what the loader fills in: compare the reference with
    # that (an independent path; render() and the dataclass defaults share field_default).
    loaded = validate_config({})
    checked = 0
    for section_name, cls, values in [
            ("top level", RunConfig, loaded), ("model.model_config", GLMConfig, loaded["model"]["model_config"]),
            ("runner_config", RunConfig.__dataclass_fields__["runner_config"].metadata["section"],
             loaded["runner_config"]),
            ("lr_schedule", RunConfig.__dataclass_fields__["lr_schedule"].metadata["section"], loaded["lr_schedule"]),
            ("optimizer", RunConfig.__dataclass_fields__["optimizer"].metadata["section"], loaded["optimizer"])]:
        for f in dataclasses.fields(cls):
            if "doc" in f.metadata and f.metadata.get("section") is None:
                assert rows[(section_name, f.name)] == _fmt(field_default(f)) == _fmt(values[f.name]), \
                    (section_name, f.name, values[f.name])
                checked += 1
    assert checked > 100
    # the old disagreements (keep_checkpoint_max 5 vs 1): one default, whether or not the file has the block
    empty = resolve(load_config(TINY, ["callbacks=[]"]))
    assert empty.checkpoint.keep_checkpoint_max == 5
    assert rows[("callbacks: CheckpointMonitor / CheckpointMointor", "keep_checkpoint_max")] == "`5`"
