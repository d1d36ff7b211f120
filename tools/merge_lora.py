#!/usr/bin/env python
"""Fold a LoRA adapter into its base weights and write a plain checkpoint.

    python tools/merge_lora.py --adapter output/checkpoint_network/rank_0/glm2-tiny-lora_rank_0-adapter.ckpt \
        [--base base.ckpt] --output merged.ckpt

W' = W + (lora_alpha / lora_rank) * B @ A for every adapted linear. The adapter file carries its own
rank, alpha and targets (and the base checkpoint it was trained on, used when --base is omitted).
The result loads into a model built without `pet_config` and gives the same logits as base+adapter.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import glm  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter checkpoint written by a LoRA run")
    parser.add_argument("--base", default=None, help="base weights (.ckpt/.safetensors/HF folder); "
                                                     "default: the one recorded in the adapter")
    parser.add_argument("--output", required=True, help="merged checkpoint (.ckpt or .safetensors)")
    args = parser.parse_args(argv)

    from glm import GLMError
    from glm.checkpoint import load_state
    from glm.model.lora import merge_lora_state
    from glm.weights import hf_to_ms, read_weights, write_ms_checkpoint

    try:
        t0 = time.perf_counter()
        params, meta = load_state(args.adapter)
        if meta.get("kind") != "adapter" or not meta.get("lora"):
            raise GLMError(f"--adapter {args.adapter}: not a LoRA adapter checkpoint (kind {meta.get('kind')!r})")
        base = args.base or meta.get("base_checkpoint")
        if not base or base == "random":
            raise GLMError(f"--adapter {args.adapter}: it records no usable base checkpoint; pass --base")
        if not Path(base).exists():
            raise GLMError(f"--base {base}: does not exist")
        state = hf_to_ms(read_weights(base))
        adapter = {k: v.asnumpy() for k, v in params.items() if ".lora_" in k}
        missing = [k[: -len(".lora_a")] + ".weight" for k in adapter if k.endswith(".lora_a")
                   and k[: -len(".lora_a")] + ".weight" not in state]
        if missing:
            raise GLMError(f"--base {base}: has no {missing[0]} for the adapter's {missing[0][:-7]}.lora_a")
        for key, value in adapter.items():
            target = state.get(key[: key.rindex(".lora_")] + ".weight")
            dim = 1 if key.endswith(".lora_a") else 0
            if value.shape[dim] != target.shape[dim]:
                raise GLMError(f"--adapter {args.adapter}: {key} has shape {value.shape}, which does not fit the "
                               f"base weight's shape {target.shape}")
        merged = merge_lora_state({**state, **adapter}, meta["lora"])
        write_ms_checkpoint(merged, args.output)
    except GLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(adapter) // 2
    print(f"merged {n} LoRA adapter(s) (rank {meta['lora']['lora_rank']}, alpha {meta['lora']['lora_alpha']}) "
          f"into {base} -> {args.output} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
