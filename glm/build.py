"""Process and model set-up shared by every run mode: context, seeds, ranks, the model and its weights."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

from glm import GLMError
from glm.io import write_json_atomic  # noqa: F401  (its home is glm.io; kept importable from here)
from glm.model.config import GLMConfig
from glm.model.glm import GLMForCausalLM
from glm.model.lora import apply_lora, lora_settings
from glm.model.ptuning import PET_TYPE as PTUNING_TYPE
from glm.run_inputs import RANDOM_INIT, checkpoint_paths, tokenizer_section  # noqa: F401 (importable from here)
from glm.runtime import ms, setup_context
from glm.settings import RunConfig, as_run


@dataclass
class Process:
    rank: int = 0
    world: int = 1
    device_target: str = "CPU"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_device(run: RunConfig) -> str:
    """context.device_target, when this machine has it (the dry run checks it too)."""
    target = run.context.device_target
    available = ms.hal.is_available(target) if hasattr(ms, "hal") and target != "CPU" else True
    if not available:
        raise GLMError(f"context.device_target: {target} is not available on this machine "
                       "(set context.device_target: CPU, or pass --device_target CPU)")
    return target


def init_process(cfg: RunConfig | dict) -> Process:
    """Device, mode, seed and (with use_parallel) the communication group."""
    run = as_run(cfg)
    ctx = run.context
    target = check_device(run)
    setup_context(target, ctx.mode, ctx.device_id, ctx.max_device_memory)
    extra = {"max_call_depth": ctx.max_call_depth}
    if ctx.save_graphs:
        extra.update(save_graphs=ctx.save_graphs, save_graphs_path=ctx.save_graphs_path)
    if ctx.runtime_num_threads is not None:
        extra["runtime_num_threads"] = ctx.runtime_num_threads
    ms.set_context(**extra)
    ms.set_seed(run.seed)
    proc = Process(device_target=target)
    if run.use_parallel:
        from glm.parallel import init_distributed

        proc.rank, proc.world = init_distributed(run.parallel, run.parallel_config, target)
    return proc


def model_config(cfg: RunConfig | dict, **overrides) -> GLMConfig:
    """The model section, with run-mode overrides (use_past, batch_size) applied."""
    return dataclasses.replace(as_run(cfg).model.model_config, **overrides)


def build_model(cfg: RunConfig | dict, **overrides) -> tuple[GLMForCausalLM, Optional[dict]]:
    """The model and its parameter-efficient tuning settings (None for full fine-tuning): LoRA adapters
    are attached here; a P-Tuning v2 prefix encoder is part of the model (see glm/model/ptuning.py).
    Either way only the adapter or prefix trains."""
    mcfg = model_config(cfg, **overrides)
    model = GLMForCausalLM(mcfg)
    if mcfg.ptuning:
        return model, mcfg.ptuning.to_dict()
    lora = lora_settings(mcfg.pet_config)
    if lora:
        apply_lora(model, lora)
    return model, lora


def check_vocab(tokenizer, mcfg: GLMConfig, where: str) -> None:
    """Every id the tokenizer can produce must index the embedding: checked before any graph is built."""
    if tokenizer.vocab_size > mcfg.padded_vocab_size:
        raise GLMError(f"{where}: the tokenizer ({tokenizer.vocab_file}) has {tokenizer.vocab_size} ids but "
                       f"model.model_config.padded_vocab_size is {mcfg.padded_vocab_size}; use the model's own "
                       "tokenizer or a padded_vocab_size of at least the tokenizer's size")


def load_checkpoints(model: GLMForCausalLM, value, lora: Optional[dict], *, required: bool,
                     run_mode: str, metas: Optional[list] = None, _adapter_follows: bool = False) -> list[str]:
    """Load base weights and/or an adapter (LoRA, or a P-Tuning v2 prefix) into `model`; return the files used.

    `lora` is `build_model`'s tuning settings. An adapter checkpoint written by this tool names the base
    weights it was trained on, so `--load_checkpoint adapter.ckpt` alone is enough when that base file
    is still where it was. `metas`, if given, receives the meta of every file loaded that has one, in load
    order (base first).
    """
    from glm.checkpoint import load_state
    from glm.weights import load_weights, load_weights_into

    paths = checkpoint_paths(value)
    if paths == [RANDOM_INIT]:
        return []
    if not paths:
        if required:
            raise GLMError(f"--run_mode {run_mode} needs load_checkpoint (a .ckpt/.safetensors file or a HF folder);"
                           f" set load_checkpoint: {RANDOM_INIT} to start from random weights")
        return []
    used, adapter_loaded = [], False
    for i, path in enumerate(paths):
        if path == RANDOM_INIT:
            continue
        if not os.path.exists(path):
            raise GLMError(f"load_checkpoint: {path} does not exist")
        if path.endswith(".ckpt") and os.path.isfile(path):
            params, meta = load_state(path)
            if meta.get("kind") == "adapter":
                _check_adapter(path, meta, lora)
                if i == 0 and meta.get("base_checkpoint") not in (None, "", RANDOM_INIT):
                    used += load_checkpoints(model, meta["base_checkpoint"], None, required=True,
                                             run_mode=run_mode, metas=metas, _adapter_follows=True)
                if metas is not None:
                    metas.append(meta)
                state = {k: v.asnumpy() for k, v in params.items()}
                load_weights_into(model, state, where=path, part="adapter")
                used.append(path)
                adapter_loaded = True
                continue
            if metas is not None:
                metas.append(meta)
        # Adapter weights of another origin (a THUDM prefix .bin, ...) after the base: only theirs count.
        part = "adapter" if lora and i > 0 else ("base" if _adapter_follows or len(paths) > 1 else "all")
        missing, _ = load_weights(model, path, part=part)
        adapter_loaded |= bool(lora) and not any(_ADAPTER_MARK.search(n) for n in missing)
        used.append(path)
    if lora and not adapter_loaded and run_mode not in ("train", "finetune"):
        # Freshly initialised adapters are not the tuned model; a fine-tune from base weights is the normal case.
        print(f"warning: no adapter loaded: --run_mode {run_mode} runs the adapters as initialised, not a tuned "
              "model; pass --load_checkpoint base,adapter or the adapter alone", file=sys.stderr)
    return used


_ADAPTER_MARK = re.compile(r"\.lora_|prefix_encoder\.")   # LoRA factors, P-Tuning v2 prefix encoder


def _check_adapter(path: str, meta: dict, pet: Optional[dict]) -> None:
    """The adapter's recorded hyper-parameters must be the config's: a mismatch names the key."""
    saved = meta.get("pet") or meta.get("lora") or {}   # files before P-Tuning recorded only "lora"
    kind = saved.get("pet_type", "lora")
    if kind == PTUNING_TYPE:
        what = f"a P-Tuning v2 prefix (pre_seq_len {saved.get('pre_seq_len')})"
        keys = ["pre_seq_len", "prefix_projection"] + (["projection_dim"] if saved.get("prefix_projection") else [])
        fix = ("add model.model_config.pet_config: {pet_type: ptuning2, "
               + ", ".join(f"{k}: {saved.get(k)}" for k in keys) + "}")
    else:
        what = f"a LoRA adapter (rank {saved.get('lora_rank')})"
        keys = ["lora_rank", "target_modules"]
        fix = "add the same pet_config, or merge it first with glm merge-lora"
    if pet is None:
        raise GLMError(f"load_checkpoint {path}: this is {what} but the config has no "
                       f"model.model_config.pet_config; {fix}")
    if pet.get("pet_type") != kind:
        raise GLMError(f"load_checkpoint {path}: this is {what} but model.model_config.pet_config.pet_type is "
                       f"{pet.get('pet_type')!r}")
    for key in keys:
        if saved.get(key) != pet.get(key):
            raise GLMError(f"load_checkpoint {path}: adapter {key} is {saved.get(key)!r} but "
                           f"model.model_config.pet_config.{key} is {pet.get(key)!r}")


def peak_rss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1024 / 1024


def build_tokenizer(cfg: RunConfig | dict):
    from glm.tokenizer import load_tokenizer

    section, _ = tokenizer_section(cfg)
    return load_tokenizer(section.type, section.vocab_file)


_warned_decode_length = False


def generation_config(cfg: RunConfig | dict, tokenizer, **overrides):
    """Generation settings from model.model_config (MindFormers keeps them there), eos from the tokenizer."""
    global _warned_decode_length
    from glm.generate import GenerationConfig

    run = as_run(cfg)
    m = run.model.model_config
    if m.max_decode_length > m.seq_length and not _warned_decode_length:
        print(f"warning: model.model_config.max_decode_length {m.max_decode_length} is larger than seq_length "
              f"{m.seq_length}: generation stops at {m.seq_length} tokens, prompt included", file=sys.stderr)
        _warned_decode_length = True
    eos_ids = sorted(set(tokenizer.stop_token_ids) | set(m.eos_token_ids))
    gen = GenerationConfig(max_length=m.max_decode_length, do_sample=m.do_sample, temperature=m.temperature,
                           top_k=m.top_k, top_p=m.top_p, repetition_penalty=m.repetition_penalty,
                           eos_token_id=eos_ids, pad_token_id=m.pad_token_id, seed=run.seed,
                           vocab_size=tokenizer.vocab_size)
    for k, v in overrides.items():
        setattr(gen, k, v)
    if gen.do_sample and gen.top_k == 1:
        gen.do_sample = False   # the reference's eval YAMLs say do_sample True + top_k 1: that is greedy
    return gen
