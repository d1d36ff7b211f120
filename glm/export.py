"""`--run_mode export`: MindIR graphs for serving (prefill + decode) and a JSON contract next to them.

Why a functional cache: the model's `CachedStep` keeps the KV cache in Parameters, and a MindIR file
carries its own copy of every Parameter. Two graphs loaded as two `nn.GraphCell`s therefore do NOT share
the cache (measured on CPU: the prefill graph's first token is right, the decode graph then attends to
an empty cache). So both exported graphs take the whole cache as an input and return the updated cache:

    prefill(input_ids [B,S], positions [B,S], last_index [B], kv_cache) -> (logits [B,V], kv_cache)
    decode (input_ids [B,1], positions [B,1], kv_cache)                 -> (logits [B,V], kv_cache)

kv_cache is [num_layers, 2 (key, value), B, seq_length, kv_groups, head_dim] in compute_dtype, zeros at
the start of a batch. The caller feeds the returned cache to the next call. Layout on disk (as the
reference): `<output_dir>/mindir_full_checkpoint/rank_{r}_graph.mindir` (prefill) and
`<output_dir>/mindir_inc_checkpoint/rank_{r}_graph.mindir` (decode), or the `infer:` block's
`prefill_model_path` / `increment_model_path`, plus `<output_dir>/export_info.json`, written last.
Models over 2 GB get a `rank_{r}_variables/` folder next to each graph (MindSpore's external weights).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from mindspore import Tensor, nn, ops

from glm import GLMError
from glm.build import RANDOM_INIT, build_model, init_process, load_checkpoints
from glm.io import ensure_dir, os_error, temp_path, write_json_atomic
from glm.model.glm import GLMForCausalLM, _take_last
from glm.runtime import ms, resolve_dtype
from glm.settings import InferConfig, RunConfig, as_run

FULL_DIR, INC_DIR = "mindir_full_checkpoint", "mindir_inc_checkpoint"


class FunctionalStep(nn.Cell):
    """`CachedStep` with the cache passed in and returned instead of held in Parameters (prefill form).

    It runs the model's own cells (so LoRA adapters and parameter names are kept) through the explicit
    cache path of `GLMForCausalLM.cached_hidden`.
    """

    def __init__(self, lm: GLMForCausalLM):
        super().__init__(auto_prefix=False)   # keep the model's parameter names in the graph
        self.lm = lm

    def _forward(self, input_ids: Tensor, positions: Tensor, kv_cache: Tensor, prefill: bool) -> tuple:
        n, _, b, t, kv, hd = kv_cache.shape
        flat = kv_cache.reshape(n, 2, b * t, kv, hd)
        hidden, pairs = self.lm.cached_hidden(input_ids, positions, tuple((flat[i, 0], flat[i, 1]) for i in range(n)),
                                              prefill)
        return hidden, ops.stack([ops.stack(pair) for pair in pairs]).reshape(kv_cache.shape)

    def construct(self, input_ids: Tensor, positions: Tensor, last_index: Tensor, kv_cache: Tensor) -> tuple:
        # P-Tuning v2: the prefill writes the prefix (computed in the graph) into the first cache slots.
        hidden, cache = self._forward(input_ids, positions, kv_cache, True)
        return self.lm.logits(_take_last(hidden, last_index)), cache


class FunctionalDecode(FunctionalStep):
    """Decode form: one new token per row, so no last_index."""

    def construct(self, input_ids: Tensor, positions: Tensor, kv_cache: Tensor) -> tuple:
        hidden, cache = self._forward(input_ids, positions, kv_cache, False)
        return self.lm.logits(hidden.reshape(hidden.shape[0], -1)), cache


def graph_inputs(mcfg, phase: str, dynamic: bool) -> list:
    """Example inputs for `ms.export`, also right for `GraphCell.set_inputs` (None = dynamic length)."""
    bs = mcfg.batch_size
    s = 1 if phase == "decode" else (None if dynamic else mcfg.seq_length)
    specs = [([bs, s], ms.int32), ([bs, s], ms.int32)] + ([([bs], ms.int32)] if phase == "prefill" else [])
    specs.append((list(cache_shape(mcfg)), resolve_dtype(mcfg.compute_dtype)))
    if s is None:
        return [Tensor(shape=shape, dtype=dt) for shape, dt in specs]
    return [Tensor(np.zeros(shape, np.int32 if dt == ms.int32 else np.float32), dt) for shape, dt in specs]


def cache_shape(mcfg) -> tuple:
    """P-Tuning v2 models keep their prefix in the first pre_seq_len slots of each row."""
    return (mcfg.num_layers, 2, mcfg.batch_size, mcfg.seq_length + mcfg.prefix_len, mcfg.num_kv_heads,
            mcfg.head_dim)


def _targets(run: RunConfig, out: Path, rank: int) -> dict:
    infer = run.infer or InferConfig()
    name = f"rank_{rank}_graph.mindir"
    return {"prefill": Path(infer.prefill_model_path or out / FULL_DIR / name),
            "decode": Path(infer.increment_model_path or out / INC_DIR / name)}


def export_preflight(cfg: RunConfig | dict, rank: int = 0) -> dict:
    """What export checks before building the model (the dry run runs the same): the weights are named and
    the two graphs do not overwrite each other. Returns the graph paths."""
    run = as_run(cfg)
    if run.load_checkpoint in (None, ""):   # fail before building a 6B model
        raise GLMError(f"--run_mode export needs load_checkpoint (the weights to put in the graphs); set "
                       f"load_checkpoint: {RANDOM_INIT} for a random-weight smoke test")
    paths = _targets(run, Path(run.output_dir), rank)
    if paths["prefill"].resolve() == paths["decode"].resolve():
        raise GLMError(f"infer.prefill_model_path and infer.increment_model_path are both {paths['decode']}: "
                       "the decode graph would overwrite the prefill graph")
    return paths


def _export_one(net: nn.Cell, inputs: list, dest: Path, prefix: str) -> None:
    """Export into a hidden stage folder next to `dest` (same file system, named like every glm.io temporary so
    a killed run's is removed at the next start), then move the graph there by rename."""
    ensure_dir(dest.parent)
    stage = temp_path(dest)
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
        ms.export(net, *inputs, file_name=str(stage / prefix), file_format="MINDIR")
        produced = [p for p in (stage / f"{prefix}.mindir", stage / f"{prefix}_graph.mindir") if p.exists()]
        if not produced:
            raise GLMError(f"export: MindSpore wrote no graph into {stage}")
        if (stage / f"{prefix}_variables").is_dir():
            # Over 2 GB the graph names its weights `<prefix>_variables/data_N` relative to itself.
            var_dest = dest.parent / f"{prefix}_variables"
            shutil.rmtree(var_dest, ignore_errors=True)
            os.replace(stage / f"{prefix}_variables", var_dest)
        os.replace(produced[0], dest)
    except OSError as e:
        raise os_error(e, dest) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _io(name: str, shape: list, dtype: str, meaning: str) -> dict:
    return {"name": name, "shape": [-1 if d is None else d for d in shape], "dtype": dtype, "meaning": meaning}


def export_info(mcfg, paths: dict, dynamic: bool, used: list, out: Path) -> dict:
    bs, t = mcfg.batch_size, mcfg.seq_length
    dt = str(resolve_dtype(mcfg.compute_dtype)).lower()
    cache = list(cache_shape(mcfg))
    s = None if dynamic else t
    slot = "position" if not mcfg.prefix_len else f"slot (P-Tuning prefix in 0..{mcfg.prefix_len - 1}, position p at {mcfg.prefix_len} + p)"
    cache_io = _io("kv_cache", cache, dt, f"[layer, key|value, row, {slot}, kv group, head dim]; zeros "
                   "before the prefill, then the previous call's returned kv_cache")
    logits = _io("logits", [bs, mcfg.padded_vocab_size], "float32", "next-token logits of each row")

    def rel(p: Path) -> str:   # relative to export_info.json when inside output_dir
        r = os.path.relpath(p, out)
        return str(p) if r.startswith("..") else r

    return {
        "format": "MINDIR", "mindspore_version": ms.__version__, "dynamic_prompt_length": dynamic,
        "checkpoints": used or [RANDOM_INIT],
        "model": {"num_layers": mcfg.num_layers, "vocab_size": mcfg.padded_vocab_size, "seq_length": t,
                  "batch_size": bs, "eos_token_id": mcfg.eos_token_ids, "pad_token_id": mcfg.pad_token_id,
                  "compute_dtype": dt, "pre_seq_len": mcfg.prefix_len},
        "graphs": {
            "prefill": {"file": rel(paths["prefill"]), "inputs": [
                _io("input_ids", [bs, s], "int32", "prompt tokens, right-padded with pad_token_id"),
                _io("positions", [bs, s], "int32", "0 .. S-1 for every row"),
                _io("last_index", [bs], "int32", "index of each row's last prompt token (length - 1)"),
                cache_io], "outputs": [logits, cache_io]},
            "decode": {"file": rel(paths["decode"]), "inputs": [
                _io("input_ids", [bs, 1], "int32", "the token chosen at the previous step"),
                _io("positions", [bs, 1], "int32", "its position: prompt length + tokens decoded so far"),
                cache_io], "outputs": [logits, cache_io]}},
        "usage": ["g = mindspore.nn.GraphCell(mindspore.load(file))",
                  "dynamic graphs only: g.set_inputs(*placeholders), with shape -1 as None",
                  "cache = zeros(kv_cache shape); logits, cache = prefill(ids, positions, last_index, cache)",
                  "repeat: token = pick(logits); logits, cache = decode([[token]], [[position]], cache)",
                  "stop at an eos_token_id or when position reaches seq_length"],
    }


def run_export(cfg: RunConfig | dict) -> dict:
    """Export the prefill and decode graphs; return export_info (also written as export_info.json)."""
    run = as_run(cfg)
    export_preflight(run)
    proc = init_process(run)
    paths = export_preflight(run, proc.rank)
    model, lora = build_model(run, use_past=True)
    dynamic = model.config.is_dynamic
    used = load_checkpoints(model, run.load_checkpoint, lora, required=True, run_mode="export")
    model.set_train(False)
    mcfg = model.config
    out = Path(run.output_dir)
    prefix = f"rank_{proc.rank}"
    _export_one(FunctionalStep(model), graph_inputs(mcfg, "prefill", dynamic), paths["prefill"], prefix)
    _export_one(FunctionalDecode(model), graph_inputs(mcfg, "decode", dynamic), paths["decode"], prefix)
    info = export_info(mcfg, paths, dynamic, used, out)
    if proc.is_main:
        write_json_atomic(info, out / "export_info.json")
        print(f"exported prefill graph to {paths['prefill']}\nexported decode graph to {paths['decode']}\n"
              f"contract: {out / 'export_info.json'}")
    return info
