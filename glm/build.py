"""Process and model set-up shared by every run mode: context, seeds, ranks, the model and its weights."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

from glm import GLMError
from glm.io import write_json_atomic  # noqa: F401  (its home is glm.io; kept importable from here)
from glm.model.config import GLMConfig
from glm.model.glm import GLMForCausalLM
from glm.model.lora import apply_lora, lora_settings
from glm.model.ptuning import PET_TYPE as PTUNING_TYPE
from glm.runtime import ms, setup_context

RANDOM_INIT = "random"   # load_checkpoint value that asks for random initialisation (smoke tests)


@dataclass
class Process:
    rank: int = 0
    world: int = 1
    device_target: str = "CPU"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process(cfg: dict) -> Process:
    """Device, mode, seed and (with use_parallel) the communication group."""
    ctx = cfg.get("context") or {}
    target = ctx.get("device_target", "CPU")
    available = ms.hal.is_available(target) if hasattr(ms, "hal") and target != "CPU" else True
    if not available:
        raise GLMError(f"context.device_target: {target} is not available on this machine "
                       "(set context.device_target: CPU, or pass --device_target CPU)")
    setup_context(target, int(ctx.get("mode", 0)), ctx.get("device_id"), ctx.get("max_device_memory"))
    ms.set_seed(int(cfg.get("seed", 0) or 0))
    proc = Process(device_target=target)
    if cfg.get("use_parallel"):
        from glm.parallel import init_distributed

        proc.rank, proc.world = init_distributed(cfg.get("parallel") or {}, cfg.get("parallel_config") or {},
                                                 target)
    return proc


def model_config(cfg: dict, **overrides) -> GLMConfig:
    section = dict((cfg.get("model") or {}).get("model_config") or {})
    section.update(overrides)
    return GLMConfig.from_dict(section)


def build_model(cfg: dict, **overrides) -> tuple[GLMForCausalLM, Optional[dict]]:
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


def checkpoint_paths(value) -> list[str]:
    """`load_checkpoint` may name several files (base weights, then an adapter) separated by commas."""
    if value in (None, "", False):
        return []
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(p).strip() for p in parts if str(p).strip()]


def load_checkpoints(model: GLMForCausalLM, value, lora: Optional[dict], *, required: bool,
                     run_mode: str, metas: Optional[list] = None) -> list[str]:
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
    used = []
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
                                             run_mode=run_mode, metas=metas)
                if metas is not None:
                    metas.append(meta)
                state = {k: v.asnumpy() for k, v in params.items()}
                load_weights_into(model, state, strict=False, where=path)
                used.append(path)
                continue
            if metas is not None:
                metas.append(meta)
        load_weights(model, path, strict=not (lora and i > 0))
        used.append(path)
    return used


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


def tokenizer_section(cfg: dict) -> dict:
    """The tokenizer block to use outside training: processor.tokenizer if it names a vocab file,
    else the eval dataset's, else the train dataset's."""
    from glm.config import dataset_section

    candidates = [((cfg.get("processor") or {}).get("tokenizer") or {}, "processor.tokenizer")]
    for name in ("eval_dataset", "train_dataset"):
        try:
            candidates.append(((dataset_section(cfg, name) or {}).get("tokenizer") or {}, f"{name}.tokenizer"))
        except GLMError:
            continue
    for section, where in candidates:
        if section.get("vocab_file"):
            return {**section, "_where": where}
    raise GLMError("no tokenizer: set processor.tokenizer.vocab_file (or train_dataset.tokenizer.vocab_file)")


def build_tokenizer(cfg: dict):
    from glm.tokenizer import load_tokenizer

    section = tokenizer_section(cfg)
    return load_tokenizer(section.get("type", "ChatGLM2Tokenizer"), section["vocab_file"])


def generation_config(cfg: dict, tokenizer, **overrides):
    """Generation settings from model.model_config (MindFormers keeps them there), eos from the tokenizer."""
    from glm.generate import GenerationConfig

    m = (cfg.get("model") or {}).get("model_config") or {}
    eos = m.get("eos_token_id", 2)
    eos_ids = sorted(set(tokenizer.stop_token_ids) | set(eos if isinstance(eos, (list, tuple)) else [eos]))
    gen = GenerationConfig(max_length=int(m.get("max_decode_length") or m.get("seq_length") or 512),
                           do_sample=bool(m.get("do_sample", False)), temperature=float(m.get("temperature", 1.0)),
                           top_k=int(m.get("top_k", 0) or 0), top_p=float(m.get("top_p", 1.0)),
                           repetition_penalty=float(m.get("repetition_penalty", 1.0)), eos_token_id=eos_ids,
                           pad_token_id=int(m.get("pad_token_id", 0)), seed=int(cfg.get("seed", 0) or 0))
    for k, v in overrides.items():
        setattr(gen, k, v)
    if gen.do_sample and gen.top_k == 1:
        gen.do_sample = False   # the reference's eval YAMLs say do_sample True + top_k 1: that is greedy
    return gen
