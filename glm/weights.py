"""Weights in and out: HF ChatGLM2/3 and transformers `GlmForCausalLM` files <-> MindSpore checkpoints.

Everything here works on plain `dict[str, np.ndarray]` state dicts named in one of three layouts:

* "mindspore"  - MindFormers names, the names of `glm.model.glm.GLMForCausalLM` (canonical here);
* "chatglm_hf" - THUDM/zai-org ChatGLM2/3 on the Hub: identical except `embedding.word_embeddings.weight`,
                 plus a `rotary_pos_emb.inv_freq` buffer that is dropped;
* "glm_hf"     - transformers `GlmForCausalLM` (`model.layers.N.self_attn.q_proj` ...): q/k/v are separate
                 and are fused by row concatenation into `query_key_value`.

dtypes are preserved (fp16 stays fp16, so HF -> MindSpore -> HF is bit-exact). bfloat16 is kept as
MindSpore's numpy `bfloat16` dtype (registered when mindspore is imported); `glm convert` stores
it as float32 in MindSpore checkpoints unless `--dtype bfloat16` is given, because CPU has no bf16 kernels.
LoRA tensors (`...lora_a` / `...lora_b`) and any other unknown names pass through untouched.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from glm import GLMError
from glm.io import atomic_path, ensure_dir, write_json_atomic

MS_EMBED = "transformer.embedding.embedding_table"
HF_EMBED = "transformer.embedding.word_embeddings.weight"
OLD_MS_EMBED = "transformer.embedding.embedding_weight"  # MindFormers 1.x name
INV_FREQ = re.compile(r"(^|\.)rotary_(pos_)?emb\.inv_freq$")
LAYER = "transformer.encoder.layers.{}."

# transformers GlmForCausalLM suffix -> MindFormers suffix (per layer, q/k/v handled separately)
_GLM_LAYER_MAP = {
    "self_attn.o_proj.weight": "self_attention.dense.weight",
    "mlp.gate_up_proj.weight": "mlp.dense_h_to_4h.weight",
    "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
}
_GLM_TOP_MAP = {
    "model.embed_tokens.weight": MS_EMBED,
    "model.norm.weight": "transformer.encoder.final_layernorm.weight",
    "lm_head.weight": "transformer.output_layer.weight",
}
_GLM_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MS_LAYER_RE = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
# Optimizer / loop state that MindSpore training checkpoints carry next to the weights.
_TRAIN_STATE_PREFIXES = ("adam_m.", "adam_v.", "grad_acc.", "moment1.", "moment2.", "accum.", "moments.",
                         "global_step",
                         "learning_rate", "scale_sense", "current_iterator_step", "epoch_num", "step_num",
                         "loss_scale", "beta1_power", "beta2_power", "last_overflow_iterator_step")

State = dict  # dict[str, np.ndarray]
# P-Tuning v2 (glm/model/ptuning.py): THUDM ChatGLM2 `ptuning/` names -> ours (= MindFormers'), and
# MindFormers' derived arange(pre_seq_len) index buffer, which is not a weight.
PREFIX_THUDM_NAMES = {
    "transformer.prefix_encoder.embedding.weight": "prefix_encoder.mindpet_delta_ptuning2_embedding.embedding_table",
    **{f"transformer.prefix_encoder.trans.{i}.{kind}": f"prefix_encoder.mindpet_delta_ptuning2_{name}.{kind}"
       for i, name in ((0, "dense_in"), (2, "dense_out")) for kind in ("weight", "bias")},
}
PREFIX_INDEX_BUFFER = "prefix_encoder.mindpet_delta_ptuning2_prefix"


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _ms():
    """Import MindSpore through glm.runtime (sets GLOG_v first; also registers numpy's `bfloat16`)."""
    from glm.runtime import ms

    return ms


# ---------------------------------------------------------------------------------------- layouts
def detect_layout(names) -> str:
    """Return "glm_hf", "chatglm_hf" or "mindspore" for an iterable of parameter names."""
    names = list(names)
    if any(n.startswith(("model.layers.", "model.embed_tokens.")) or n == "lm_head.weight" for n in names):
        return "glm_hf"
    if any(n == HF_EMBED or INV_FREQ.search(n) for n in names):
        return "chatglm_hf"
    if any(n.startswith("transformer.") for n in names):
        return "mindspore"   # also partial (e.g. LoRA-only) checkpoints: names are shared with chatglm_hf
    shown = ", ".join(names[:3]) or "(no tensors)"
    raise GLMError(f"unrecognised parameter names ({shown}, ...): expected ChatGLM2/3 (transformer.*) "
                   f"or transformers GlmForCausalLM (model.layers.*) weights")


def hf_to_ms(state: State) -> State:
    """Rename any supported layout to MindFormers names; fuse GlmForCausalLM q/k/v; drop inv_freq."""
    layout = detect_layout(state)
    out: State = {}
    if layout != "glm_hf":
        for name, value in state.items():
            if INV_FREQ.search(name):
                continue   # a derived buffer, not a parameter (recomputed from rope_ratio)
            out[MS_EMBED if name in (HF_EMBED, OLD_MS_EMBED) else name] = value
        return out
    qkv: dict = {}   # (layer, "weight"|"bias") -> {"q": arr, ...}
    for name, value in state.items():
        if INV_FREQ.search(name):
            continue
        if name in _GLM_TOP_MAP:
            out[_GLM_TOP_MAP[name]] = value
            continue
        m = _GLM_LAYER_RE.match(name)
        if not m:
            out[name] = value      # unknown (e.g. adapters): pass through
            continue
        layer, rest = m.group(1), m.group(2)
        pm = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if pm:
            qkv.setdefault((layer, pm.group(2)), {})[pm.group(1)] = value
        elif rest in _GLM_LAYER_MAP:
            out[LAYER.format(layer) + _GLM_LAYER_MAP[rest]] = value
        else:
            out[name] = value
    for (layer, kind), parts in sorted(qkv.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise GLMError(f"layer {layer}: self_attn.{missing[0]}_proj.{kind} is missing, "
                           f"so query_key_value.{kind} cannot be built")
        # ChatGLM's fused projection is rows [q | k | v]; no per-head interleaving.
        out[LAYER.format(layer) + f"self_attention.query_key_value.{kind}"] = np.concatenate(
            [parts["q"], parts["k"], parts["v"]], axis=0)
    if "transformer.output_layer.weight" not in out and MS_EMBED in out:
        out["transformer.output_layer.weight"] = out[MS_EMBED]   # tied embeddings: lm_head not saved
    return out


def ms_to_hf(state: State, layout: str = "chatglm_hf", config: Any = None) -> State:
    """MindFormers names -> "chatglm_hf" (one rename) or "glm_hf" (renames + q/k/v split).

    The q/k/v split needs the q rows (num_heads * head_dim). It comes from `config` (a GLMConfig) when
    given, otherwise from the shapes: `self_attention.dense.weight` is [H, nh*hd], so its column count is
    the q row count (for ChatGLM nh*hd == H anyway); k and v each take half of the remaining rows.
    """
    if layout not in ("chatglm_hf", "glm_hf"):
        raise GLMError(f"ms_to_hf: layout must be 'chatglm_hf' or 'glm_hf', got {layout!r}")
    state = hf_to_ms(state) if detect_layout(state) != "mindspore" or OLD_MS_EMBED in state else state
    out: State = {}
    if layout == "chatglm_hf":
        for name, value in state.items():
            out[HF_EMBED if name == MS_EMBED else name] = value
        return out
    top = {v: k for k, v in _GLM_TOP_MAP.items()}
    layer_map = {v: k for k, v in _GLM_LAYER_MAP.items()}
    for name, value in state.items():
        if name in top:
            out[top[name]] = value
            continue
        m = _MS_LAYER_RE.match(name)
        if not m:
            out[name] = value
            continue
        layer, rest = m.group(1), m.group(2)
        if rest in layer_map:
            out[f"model.layers.{layer}.{layer_map[rest]}"] = value
        elif rest.startswith("self_attention.query_key_value.") and rest.rsplit(".", 1)[1] in ("weight", "bias"):
            kind = rest.rsplit(".", 1)[1]
            q_rows = _q_rows(state, layer, config)
            kv_rows, odd = divmod(value.shape[0] - q_rows, 2)
            if odd or kv_rows <= 0:
                raise GLMError(f"{name}: {value.shape[0]} rows cannot be split into q ({q_rows}) + 2 equal k/v")
            pre = f"model.layers.{layer}.self_attn."
            out[pre + f"q_proj.{kind}"] = value[:q_rows]
            out[pre + f"k_proj.{kind}"] = value[q_rows:q_rows + kv_rows]
            out[pre + f"v_proj.{kind}"] = value[q_rows + kv_rows:]
        else:
            out[name] = value   # LoRA factors etc. keep their MindSpore names
    return out


def _q_rows(state: State, layer: str, config: Any) -> int:
    if config is not None:
        return int(config.num_attention_heads) * int(config.head_dim)
    dense = state.get(LAYER.format(layer) + "self_attention.dense.weight")
    if dense is None:
        raise GLMError(f"layer {layer}: cannot split query_key_value without self_attention.dense.weight "
                       f"or a model config")
    return int(dense.shape[1])


# ---------------------------------------------------------------------------------------- reading
def _read_safetensors(path: Path) -> State:
    _ms()   # registers numpy bfloat16 so bf16 files load
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, TypeError on unknown dtypes
        raise GLMError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def _read_torch_bin(path: Path) -> State:
    try:
        import torch
    except ImportError:
        raise GLMError(f"{path}: reading pytorch_model*.bin needs torch (pip install torch), "
                       f"or use the model's *.safetensors files") from None
    _ms()
    bf16 = np.dtype("bfloat16")   # registered by mindspore
    try:
        with warnings.catch_warnings():   # torch warns (several lines) about pickle protocols before failing
            warnings.simplefilter("ignore")
            sd = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as e:
        raise GLMError(f"{path}: cannot be read as a PyTorch weights file ({type(e).__name__}: {_torch_reason(e)}); "
                       "only plain tensor state dicts are loaded") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise GLMError(f"{path}: holds a pickled {type(sd).__name__}, not a state dict of tensors")
    out: State = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().contiguous()
        # numpy cannot hold torch.bfloat16: reinterpret the bits as MindSpore's numpy bfloat16 (lossless).
        out[name] = t.view(torch.int16).numpy().view(bf16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def _torch_reason(e: Exception) -> str:
    """torch.load's errors run to a dozen lines; keep the line that says what was wrong."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        return "unsupported content: " + (detail[0].strip() if detail else "?")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200]


def _index_files(folder: Path, index_name: str) -> Optional[list]:
    index = folder / index_name
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise GLMError(f"{index}: not a valid index file ({e})") from e
    files = [folder / f for f in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise GLMError(f"{index} lists {f.name}, which does not exist")
    return files


def read_hf_folder(path: Union[str, os.PathLike]) -> State:
    """Read a HF model folder (or one file): *.safetensors preferred, else pytorch_model*.bin (needs torch)."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = (_index_files(p, "model.safetensors.index.json") or sorted(p.glob("*.safetensors"))
                 or _index_files(p, "pytorch_model.bin.index.json") or sorted(p.glob("pytorch_model*.bin")))
        if not files:
            raise GLMError(f"{p}: no *.safetensors or pytorch_model*.bin weight files in this folder")
    else:
        raise GLMError(f"{p}: no such file or folder")
    state: State = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(_read_safetensors(f))
        elif f.suffix in (".bin", ".pt", ".pth"):
            state.update(_read_torch_bin(f))
        else:
            raise GLMError(f"{f}: unsupported weight file (expected .safetensors or .bin)")
    if not state:
        raise GLMError(f"{p}: the weight files hold no tensors")
    return state


def read_ms_checkpoint(path: Union[str, os.PathLike]) -> State:
    """Read a MindSpore .ckpt or .safetensors checkpoint into numpy arrays (dtypes kept)."""
    p = Path(path)
    if not p.is_file():
        raise GLMError(f"{p}: no such checkpoint file")
    if p.suffix == ".safetensors":
        return _read_safetensors(p)
    ms = _ms()
    try:
        params = ms.load_checkpoint(str(p))
    except Exception as e:
        raise GLMError(f"{p}: not a readable MindSpore checkpoint ({type(e).__name__}: {e})") from e
    return {k: v.asnumpy() for k, v in params.items() if hasattr(v, "asnumpy")}


def read_weights(path: Union[str, os.PathLike]) -> State:
    """Any supported input by its type: folder -> HF, .ckpt -> MindSpore, .safetensors / .bin -> as is."""
    p = Path(path)
    if p.is_file() and p.suffix == ".ckpt":
        return read_ms_checkpoint(p)
    return read_hf_folder(p)


# ---------------------------------------------------------------------------------------- writing
def _contiguous(state: State) -> State:
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def write_ms_checkpoint(state: State, path: Union[str, os.PathLike]) -> None:
    """Write a MindSpore checkpoint atomically; `.safetensors` by extension, else `.ckpt`."""
    dest = Path(path)
    ms = _ms()
    fmt = "safetensors" if dest.suffix == ".safetensors" else "ckpt"
    state = _contiguous(state)
    try:
        with atomic_path(dest, needed=sum(v.nbytes for v in state.values())) as tmp:
            # from_numpy shares memory, so a 12 GB model is not copied a second time.
            items = [{"name": k, "data": ms.from_numpy(v)} for k, v in state.items()]
            ms.save_checkpoint(items, str(tmp), format=fmt)
    except GLMError:
        raise
    except Exception as e:
        raise GLMError(f"{dest}: cannot write the checkpoint ({type(e).__name__}: {e})") from e


def write_hf_safetensors(state: State, folder: Union[str, os.PathLike], shard_size: int = 5 * 1024 ** 3) -> list:
    """Write `model.safetensors` (or `model-0000i-of-0000n.safetensors` + index) into `folder`; returns paths."""
    from safetensors.numpy import save_file

    _ms()   # bf16 arrays need the registered numpy dtype
    out = ensure_dir(folder)
    state = _contiguous(state)
    shards: list = [{}]
    size = 0
    for name, value in state.items():
        if shards[-1] and size + value.nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written = []
    for fname, shard in zip(names, shards):
        dest = out / fname
        try:
            with atomic_path(dest, needed=sum(v.nbytes for v in shard.values())) as tmp:
                save_file(shard, str(tmp), metadata={"format": "pt"})   # transformers refuses files without it
        except GLMError:
            raise
        except Exception as e:
            raise GLMError(f"{dest}: cannot write ({type(e).__name__}: {e})") from e
        written.append(dest)
    index = out / "model.safetensors.index.json"
    if n > 1:
        body = {"metadata": {"total_size": int(sum(v.nbytes for v in state.values()))},
                "weight_map": {k: fname for fname, shard in zip(names, shards) for k in shard}}
        written.append(write_json_atomic(body, index))
    elif index.exists():
        index.unlink()   # a stale index would point readers at old shards
    return written


# ---------------------------------------------------------------------------------------- into a net
def _names(names: list, limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights_into(net, state: State, strict: bool = True, where: str = "", part: str = "all") -> tuple:
    """Check names/shapes against `net`, cast to each parameter's dtype, load. Returns (missing, unexpected).

    Shape mismatches always raise. Missing parameters raise in strict mode, except LoRA factors and the
    P-Tuning prefix encoder (a base checkpoint never holds them), which get a warning line; KV-cache buffers
    (`*_cache`) are not weights. Unexpected tensors get a warning line; optimizer/loop state (adam_m.*,
    global_step, ...) is skipped. THUDM's P-Tuning names (`transformer.prefix_encoder.*`) are renamed; a
    prefix for a model without one is an error (it would otherwise be silently dropped).
    `part`: "base" - a base file under an adapter that follows (missing adapter parameters are expected);
    "adapter" - an adapter file (base parameters come from elsewhere; its own must all be there).
    """
    ms = _ms()
    label = f"checkpoint {where}" if where else "checkpoint"
    if state and (OLD_MS_EMBED in state or _safe_layout(state) != "mindspore"):
        state = hf_to_ms(state)
    params = dict((name, p) for name, p in net.parameters_and_names())
    prefix = sorted(k for k in state if k.startswith(("prefix_encoder.", "transformer.prefix_encoder.")))
    if prefix and not any(n.startswith("prefix_encoder.") for n in params):
        raise GLMError(f"{label}: holds a P-Tuning v2 prefix ({prefix[0]}) but the model has none; set "
                       "model.model_config.pet_config: {pet_type: ptuning2, pre_seq_len: ...}")
    state = {PREFIX_THUDM_NAMES.get(k, k): v for k, v in state.items() if k != PREFIX_INDEX_BUFFER}
    for name, value in state.items():
        if name in params and tuple(value.shape) != tuple(params[name].shape):
            why = (" (the prefix file's pre_seq_len / prefix_projection / projection_dim differ from "
                   "model.model_config.pet_config)" if name.startswith("prefix_encoder.") else "")
            raise GLMError(f"{label}: {name} has shape {tuple(value.shape)} "
                           f"but the model expects {tuple(params[name].shape)}{why}")
    missing = [n for n in params if n not in state and not n.endswith("_cache")]   # KV cache: runtime state
    unexpected = [n for n in state if n not in params and not n.startswith(_TRAIN_STATE_PREFIXES)]
    hard_missing = [n for n in missing if not _is_adapter(n)]
    if part == "adapter":   # an adapter file must hold all of the model's adapter weights
        hard_missing = [n for n in missing if _is_adapter(n)]
        ours = [n for n in params if _is_adapter(n)]
        if ours and len(hard_missing) == len(ours):
            raise GLMError(f"{label}: holds none of the model's {len(ours)} adapter weights (a full model checkpoint "
                           "as the adapter half of 'base,adapter'?); give the *-adapter.ckpt a LoRA or P-Tuning "
                           "run saved")
        strict = True
    # Missing adapter weights in a base file are normal; glm.build.load_checkpoints says so when no adapter
    # at all was loaded for a mode that needs one.
    if hard_missing and strict:
        raise GLMError(f"{label}: {len(hard_missing)} model parameter(s) missing: {_names(hard_missing)}")
    if hard_missing:
        _warn(f"{label}: {len(hard_missing)} model parameter(s) not in the checkpoint, left as initialised: "
              f"{_names(hard_missing)}")
    if unexpected:
        _warn(f"{label}: {len(unexpected)} tensor(s) not used by the model: {_names(unexpected)}")
    to_load = {}
    for name, value in state.items():
        if name in params:
            np_dtype = ms.dtype_to_nptype(params[name].dtype)
            value = np.ascontiguousarray(value.astype(np_dtype, copy=False))
            to_load[name] = ms.Parameter(ms.Tensor(value), name=name)
    ms.load_param_into_net(net, to_load)
    return missing, unexpected


def _is_adapter(name: str) -> bool:
    """LoRA factors and the P-Tuning prefix encoder: trained on top of a base, never in a base file."""
    return ".lora_" in name or name.startswith("prefix_encoder.")


def _safe_layout(state: State) -> str:
    try:
        return detect_layout(state)
    except GLMError:
        return "mindspore"


def load_weights(net, path: Union[str, os.PathLike], strict: bool = True, part: str = "all") -> tuple:
    """`load_weights_into` from a file or folder: .ckpt, .safetensors, pytorch .bin or a HF folder."""
    return load_weights_into(net, read_weights(path), strict=strict, where=str(path), part=part)
