"""Fold a LoRA adapter into its base weights and write a plain checkpoint (`glm merge-lora`).

W' = W + (lora_alpha / lora_rank) * B @ A for every adapted linear. The adapter file carries its own
rank, alpha and targets (and the base checkpoint it was trained on, used when no base is given).
The result loads into a model built without `pet_config` and gives the same logits as base+adapter.
"""

from __future__ import annotations

import time
from pathlib import Path

from glm import GLMError


def merge_lora(adapter: str, output: str, base: str | None = None) -> str:
    """Merge `adapter` into `base` (default: the base recorded in the adapter), write `output`;
    returns the line to print."""
    from glm.checkpoint import load_state
    from glm.model.lora import merge_lora_state
    from glm.weights import hf_to_ms, read_weights, write_ms_checkpoint

    t0 = time.perf_counter()
    params, meta = load_state(adapter)
    if (meta.get("pet") or {}).get("pet_type") == "ptuning2":
        raise GLMError(f"--adapter {adapter}: a P-Tuning v2 prefix cannot be merged into the weights (it adds "
                       "attention keys and values, not a weight delta); load it with --load_checkpoint and a "
                       "pet_type: ptuning2 config")
    if meta.get("kind") != "adapter" or not meta.get("lora"):
        raise GLMError(f"--adapter {adapter}: not a LoRA adapter checkpoint (kind {meta.get('kind')!r})")
    base = base or meta.get("base_checkpoint")
    if not base or base == "random":
        raise GLMError(f"--adapter {adapter}: it records no usable base checkpoint; pass --base")
    if not Path(base).exists():
        raise GLMError(f"--base {base}: does not exist")
    state = hf_to_ms(read_weights(base))
    lora = {k: v.asnumpy() for k, v in params.items() if ".lora_" in k}
    missing = [k[: -len(".lora_a")] + ".weight" for k in lora if k.endswith(".lora_a")
               and k[: -len(".lora_a")] + ".weight" not in state]
    if missing:
        raise GLMError(f"--base {base}: has no {missing[0]} for the adapter's {missing[0][:-7]}.lora_a")
    for key, value in lora.items():
        target = state.get(key[: key.rindex(".lora_")] + ".weight")
        dim = 1 if key.endswith(".lora_a") else 0
        if value.shape[dim] != target.shape[dim]:
            raise GLMError(f"--adapter {adapter}: {key} has shape {value.shape}, which does not fit the "
                           f"base weight's shape {target.shape}")
    merged = merge_lora_state({**state, **lora}, meta["lora"])
    write_ms_checkpoint(merged, output)
    return (f"merged {len(lora) // 2} LoRA adapter(s) (rank {meta['lora']['lora_rank']}, alpha "
            f"{meta['lora']['lora_alpha']}) into {base} -> {output} in {time.perf_counter() - t0:.1f} s")
