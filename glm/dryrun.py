"""`--dry_run`: check a config end to end without training.

Prints the resolved config, parameter counts (computed from the shapes, so a 6B config can be checked
on a laptop), the checkpoint that would be loaded, and one training sample decoded next to its masked
labels — the usual place where a wrong template or a missing eos shows up.
"""

from __future__ import annotations

import os

import numpy as np
import yaml

from glm import GLMError
from glm.build import RANDOM_INIT, checkpoint_paths, model_config
from glm.config import dataset_section
from glm.model.config import GLMConfig
from glm.model.lora import lora_settings


def parameter_counts(cfg: GLMConfig, lora: dict | None) -> tuple[int, int]:
    """(total, trainable) parameters of the model described by `cfg` (no cache buffers)."""
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size
    qkv = cfg.qkv_size
    bias = cfg.add_qkv_bias or cfg.add_bias_linear
    per_layer = (h * qkv + (qkv if bias else 0) + cfg.num_attention_heads * cfg.head_dim * h
                 + h * 2 * f + f * h + 2 * h)
    if cfg.add_bias_linear:
        per_layer += h + 2 * f + h
    total = 2 * v * h + h + cfg.num_layers * per_layer
    if not lora:
        return total, total
    adapters = _lora_params(cfg, lora)
    return total + adapters, adapters


def _lora_params(cfg: GLMConfig, lora: dict) -> int:
    import re

    pattern = re.compile(lora["target_modules"])
    shapes = {"query_key_value": (cfg.hidden_size, cfg.qkv_size),
              "dense": (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size),
              "dense_h_to_4h": (cfg.hidden_size, 2 * cfg.ffn_hidden_size),
              "dense_4h_to_h": (cfg.ffn_hidden_size, cfg.hidden_size)}
    parents = {"query_key_value": "self_attention", "dense": "self_attention",
               "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}
    n = 0
    for i in range(cfg.num_layers):
        for leaf, (fan_in, fan_out) in shapes.items():
            name = f"transformer.encoder.layers.{i}.{parents[leaf]}.{leaf}"
            if pattern.fullmatch(name) or pattern.fullmatch(leaf):
                n += lora["lora_rank"] * (fan_in + fan_out)
    if pattern.fullmatch("transformer.output_layer") or pattern.fullmatch("output_layer"):
        n += lora["lora_rank"] * (cfg.hidden_size + cfg.padded_vocab_size)
    return n


def _show_ids(ids: np.ndarray, limit: int = 24) -> str:
    ids = [int(i) for i in ids]
    head = ", ".join(map(str, ids[:limit]))
    return f"[{head}{', ...' if len(ids) > limit else ''}] ({len(ids)} tokens)"


def dry_run(cfg: dict, run_mode: str) -> None:
    from glm.dataset import build_dataset  # imports mindspore.dataset; no graph is compiled

    mcfg = model_config(cfg)
    lora = lora_settings(mcfg.pet_config)
    print("# resolved config")
    print(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True).rstrip())
    total, trainable = parameter_counts(mcfg, lora)
    print(f"\nparameters: {total:,} total, {trainable:,} trainable" + (" (LoRA)" if lora else ""))
    paths = checkpoint_paths(cfg.get("load_checkpoint"))
    for p in paths:
        if p != RANDOM_INIT and not os.path.exists(p):
            raise GLMError(f"load_checkpoint: {p} does not exist")
    if run_mode == "finetune" and not paths:
        raise GLMError(f"--run_mode finetune needs load_checkpoint; set load_checkpoint: {RANDOM_INIT} "
                       "to start from random weights")
    print(f"load_checkpoint: {', '.join(paths) or '(none: random initialisation)'}")
    name = "train_dataset" if run_mode in ("train", "finetune") else "eval_dataset"
    runner = cfg.get("runner_config") or {}
    data = build_dataset(dataset_section(cfg, name), batch_size=int(runner.get("batch_size", 1)),
                         seq_length=mcfg.seq_length if name == "train_dataset" else None, where=name)
    tok = data.tokenizer
    ids, labels = data.samples["input_ids"][0], data.samples["labels"][0]
    real = ids[ids != mcfg.pad_token_id] if name == "train_dataset" else ids
    print(f"\nsample 0 of {len(data.records)} ({name}):")
    print(f"  input_ids   {_show_ids(ids)}")
    print(f"  input text  {tok.decode(real, skip_special_tokens=False)!r}")
    if name == "train_dataset":
        kept = labels[labels != -100]
        print(f"  labels      {int((labels == -100).sum())} x -100, then {_show_ids(kept)}")
        print(f"  label text  {tok.decode(kept)!r}" + ("  + eos" if len(kept) and kept[-1] == 2 else "  (NO eos!)"))
    else:
        print(f"  reference   {data.records[0].answer!r}")
    print(f"\nbatches per epoch: {data.num_batches} (batch {data.batch_size}); dry run OK")
