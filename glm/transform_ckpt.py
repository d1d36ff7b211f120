"""Merge or re-slice distributed checkpoints.

    glm transform-ckpt --src_ckpt_strategy output/strategy/ --src_ckpt_dir output/checkpoint/ \
        --dst_ckpt_dir output/merged/ --prefix glm2_6b_

Input is SRC_CKPT_DIR/rank_K/*.ckpt (the last one in natural order, e.g. glm-3_16.ckpt over glm-3_8.ckpt),
output is DST_CKPT_DIR/rank_K/{prefix}K.ckpt.

* With a source strategy (a file, or a directory of per-stage strategy files that is merged first with
  ms.merge_pipeline_strategys), ms.transform_checkpoints re-slices the shards for the destination strategy,
  or merges them into one complete checkpoint when --dst_ckpt_strategy is empty/None.
* Without one (data-parallel runs save no strategy), every rank already holds the complete model: the
  ranks are checked to have the same parameter names and shapes (and, with --check_values, the same
  values), and rank 0's checkpoint is written as DST_CKPT_DIR/rank_0/{prefix}0.ckpt.

Merge the weights-only files of OUTPUT_DIR/checkpoint_network/. The training-state files of
OUTPUT_DIR/checkpoint/ (trainable weights + AdamW moments + loss scale, for resuming) are refused: they
hold no frozen weights (LoRA) and their optimizer entries are not model weights.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Any

from glm import GLMError
from glm.io import atomic_path

MERGED_STRATEGY = "merged_ckpt_strategy.ckpt"


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_rank_checkpoints(src_dir: str) -> dict[int, str]:
    """{rank: checkpoint file} for src_dir/rank_K/*.ckpt; GLMError on a missing or malformed layout."""
    if not os.path.isdir(src_dir):
        raise GLMError(f"--src_ckpt_dir {src_dir}: no such directory")
    ranks = {int(d[5:]): os.path.join(src_dir, d) for d in os.listdir(src_dir)
             if re.fullmatch(r"rank_\d+", d) and os.path.isdir(os.path.join(src_dir, d))}
    if not ranks:
        raise GLMError(f"--src_ckpt_dir {src_dir}: no rank_* subdirectories (expected rank_0/, rank_1/, ...)")
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        raise GLMError(f"--src_ckpt_dir {src_dir}: rank directories missing: "
                       f"{', '.join(f'rank_{r}' for r in missing)}")
    found = {}
    for rank, folder in sorted(ranks.items()):
        ckpts = sorted((f for f in os.listdir(folder) if f.endswith(".ckpt")), key=_natural_key)
        if not ckpts:
            raise GLMError(f"{folder}: no .ckpt file")
        found[rank] = os.path.join(folder, ckpts[-1])
    return found


def refuse_training_state(path: str, src_dir: str) -> None:
    """GLMError when `path` is a training-state checkpoint (glm_meta kind train_state, or optimizer moments)."""
    import json

    import mindspore as ms

    names: list[str] = []

    def keep(name: str) -> bool:   # reads only the names and the metadata string, no tensor
        names.append(name)
        return name == "glm_meta"

    try:
        meta_raw = ms.load_checkpoint(path, choice_func=keep).get("glm_meta")
    except (ValueError, RuntimeError, OSError) as e:
        if names:   # readable, but without glm_meta MindSpore complains that nothing was chosen
            meta_raw = None
        else:
            raise GLMError(f"{path}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        kind = json.loads(meta_raw).get("kind") if isinstance(meta_raw, str) else None
    except (ValueError, AttributeError):
        kind = None
    moments = [n for n in names if n.startswith(("adam_m.", "adam_v.", "moment1.", "moment2."))]
    if kind != "train_state" and not moments:
        return
    src = os.path.normpath(src_dir)
    network = os.path.join(os.path.dirname(src), "checkpoint_network") if os.path.basename(src) == "checkpoint" \
        else "OUTPUT_DIR/checkpoint_network"
    raise GLMError(f"{path} is a training-state checkpoint (weights + optimizer moments, for resuming), not a "
                   f"weights file; merge the weights-only files instead: --src_ckpt_dir {network}")


def strategy_arg(value: str | None, what: str) -> str | None:
    """None for ''/'None'; otherwise the path, which must exist (a file, or a directory of files)."""
    if value is None or value.strip() in ("", "None", "none"):
        return None
    if not os.path.exists(value):
        raise GLMError(f"{what} {value}: no such file or directory")
    return value


def resolve_strategy(value: str | None, what: str) -> str | None:
    """None for ''/'None'; a directory is merged into DIR/merged_ckpt_strategy.ckpt first."""
    value = strategy_arg(value, what)
    if value is not None and os.path.isdir(value):
        import mindspore as ms

        merged = os.path.join(value, MERGED_STRATEGY)
        ms.merge_pipeline_strategys(value, merged)
        return merged
    return value


def _signature(params: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    # Checkpoints may carry string entries (glm-launcher's JSON metadata): only tensors are compared.
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in params.items() if hasattr(v, "shape")}


def _describe_mismatch(ref: dict[str, Any], other: dict[str, Any], rank: int) -> str:
    only_ref = sorted(set(ref) - set(other))
    only_other = sorted(set(other) - set(ref))
    if only_ref or only_other:
        parts = []
        if only_ref:
            parts.append(f"missing {only_ref[:3]}{' ...' if len(only_ref) > 3 else ''}")
        if only_other:
            parts.append(f"extra {only_other[:3]}{' ...' if len(only_other) > 3 else ''}")
        return f"rank {rank} has a different parameter set than rank 0 ({'; '.join(parts)})"
    name = next(k for k in sorted(ref) if ref[k] != other[k])
    return f"rank {rank}: parameter {name} is {other[name]}, rank 0 has {ref[name]}"


def merge_data_parallel(src_dir: str, dst_dir: str, prefix: str, check_values: bool = False) -> str:
    """Check that all ranks hold the same full model and write rank 0's copy; return the output path."""
    import mindspore as ms

    files = find_rank_checkpoints(src_dir)
    ref_params = ms.load_checkpoint(files[0])
    ref = _signature(ref_params)
    ref_np = {k: v.asnumpy() for k, v in ref_params.items() if hasattr(v, "shape")} if check_values else {}
    del ref_params
    for rank, path in files.items():
        if rank == 0:
            continue
        params = ms.load_checkpoint(path)
        if _signature(params) != ref:
            raise GLMError(f"{path}: {_describe_mismatch(ref, _signature(params), rank)}; "
                           "these are not copies of one data-parallel model (pass --src_ckpt_strategy "
                           "for sharded checkpoints)")
        if check_values:
            diffs = [(abs(v.asnumpy().astype("float64") - ref_np[k].astype("float64")).max(), k)
                     for k, v in params.items() if hasattr(v, "shape") and v.size]
            worst = max(diffs, default=(0.0, ""))
            if worst[0] > 0:
                print(f"warning: rank {rank} differs from rank 0: max |diff| {worst[0]:.3g} "
                      f"(parameter {worst[1]}); writing rank 0's values", file=sys.stderr)
        del params
    out = os.path.join(dst_dir, "rank_0", f"{prefix}0.ckpt")
    with atomic_path(out, needed=os.path.getsize(files[0])) as tmp:
        shutil.copyfile(files[0], tmp)
    print(f"{len(files)} data-parallel rank(s) hold the same {len(ref)} parameters; "
          f"wrote {out} (from {files[0]})")
    return out


def transform(src_strategy: str | None, dst_strategy: str | None, src_dir: str, dst_dir: str,
              prefix: str, check_values: bool = False) -> None:
    """The command: DP merge without a source strategy, ms.transform_checkpoints otherwise."""
    if not dst_dir:
        raise GLMError("--dst_ckpt_dir is required")
    # Every check before anything is written (merging a strategy directory writes into it).
    src_arg = strategy_arg(src_strategy, "--src_ckpt_strategy")
    dst_arg = strategy_arg(dst_strategy, "--dst_ckpt_strategy")
    if src_arg is None:
        if dst_arg is not None:
            raise GLMError("slicing a complete checkpoint needs --src_ckpt_strategy too; "
                           "load it with the destination strategy instead (auto_trans_ckpt)")
        refuse_training_state(find_rank_checkpoints(src_dir)[0], src_dir)
        merge_data_parallel(src_dir, dst_dir, prefix, check_values)
        return
    if check_values:   # sharded ranks hold different slices: there are no copies to compare
        raise GLMError("--check_values compares data-parallel copies; it does not apply with --src_ckpt_strategy")
    refuse_training_state(find_rank_checkpoints(src_dir)[0], src_dir)  # clear errors before MindSpore's
    src = resolve_strategy(src_arg, "--src_ckpt_strategy")
    dst = resolve_strategy(dst_arg, "--dst_ckpt_strategy")
    import mindspore as ms

    os.makedirs(dst_dir, exist_ok=True)
    ms.transform_checkpoints(src_dir, dst_dir, prefix, src, dst)
    print(f"transformed checkpoints written to {dst_dir}/rank_*/{prefix}*.ckpt")
