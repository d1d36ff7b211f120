"""Convert ChatGLM2/3 weights between HF and MindSpore.

HF -> MindSpore (a folder of *.safetensors or pytorch_model*.bin, ChatGLM or transformers GlmForCausalLM names):
    glm convert --torch_ckpt_dir chatglm3-6b/ --mindspore_ckpt_path glm3_6b.ckpt
MindSpore -> HF (ChatGLM names by default; --layout glm_hf for transformers GlmForCausalLM):
    glm convert --reversed --input_path glm3_6b.ckpt --output_path hf_out/
    glm convert --reversed --layout glm_hf --input_path output/.../glm3-tiny_rank_0-network.ckpt --output_path hf_out/
        (then AutoModelForCausalLM / AutoTokenizer .from_pretrained("hf_out"))

With --reversed the folder also gets config.json, generation_config.json and the tokenizer files
(tokenizer.model, tokenizer.json, tokenizer_config.json), from the run config recorded in checkpoints
written by this tool or from --config. A LoRA adapter checkpoint is merged into its base weights (the
recorded base, or --base) on the way out.

The output file type follows the extension (.ckpt or .safetensors). dtypes are kept, except that bfloat16
becomes float32 in MindSpore checkpoints (MindSpore has no bf16 kernels on CPU); --dtype overrides both.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from glm import GLMError

DTYPES = ("float32", "float16", "bfloat16")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise GLMError(f"--max_shard_size: expected a size like 5GB or 500MB, got {text!r}")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * unit)


def cast(state: dict, dtype: str | None, to_mindspore: bool) -> dict:
    """Cast floating tensors to `dtype`; with no dtype, only bf16 -> fp32 for MindSpore outputs."""
    import numpy as np

    out = {}
    for name, value in state.items():
        is_float = value.dtype.kind == "f" or value.dtype.name == "bfloat16"   # numpy bf16 is kind 'V'
        target = dtype or ("float32" if to_mindspore and value.dtype.name == "bfloat16" else None)
        if is_float and target and value.dtype.name != target:
            value = value.astype(np.dtype(target))   # "bfloat16" is registered by mindspore
        out[name] = value
    return out


def _read_reversed_input(src: Path) -> tuple[dict, dict]:
    """(MindSpore-named state, the meta this tool's checkpoints carry: run config, kind, LoRA settings)."""
    from glm import weights

    if src.suffix == ".ckpt" and src.is_file():
        from glm.checkpoint import load_state

        params, meta = load_state(src)
        return {k: v.asnumpy() for k, v in params.items() if hasattr(v, "asnumpy")}, meta
    return weights.read_weights(src), {}


def _merge_adapter(state: dict, meta: dict, base: str | None, src: Path) -> dict:
    from glm.model.lora import merge_lora_state
    from glm.weights import hf_to_ms, read_weights

    if not meta.get("lora"):
        raise GLMError(f"--input_path {src}: this adapter is not LoRA; a P-Tuning prefix cannot be folded into "
                       "plain weights (serve it with glm serve)")
    base = base or meta.get("base_checkpoint")
    if not base or base == "random" or not Path(base).exists():
        raise GLMError(f"--input_path {src} is a LoRA adapter whose base weights ({base!r}) are not available; "
                       "pass --base")
    merged = hf_to_ms(read_weights(base))
    merged.update({k: v for k, v in state.items() if ".lora_" in k})
    return merge_lora_state(merged, meta["lora"])


def _recorded_config(meta: dict, src: Path) -> dict | None:
    """The run config a checkpoint of this tool records, checked like a YAML file (None if absent or stale)."""
    raw = meta.get("config")
    if not isinstance(raw, dict):
        return None
    from glm.config import validate_config

    try:
        return validate_config(raw)
    except GLMError as e:
        print(f"warning: {src}: the recorded run config does not load ({str(e).splitlines()[0]}); "
              "pass --config", file=sys.stderr)
        return None


def _write_metadata(dst: Path, cfg: dict | None, layout: str, dtype: str | None) -> None:
    from glm.build import build_tokenizer, model_config
    from glm.hf_export import write_hf_metadata

    if not cfg:
        print("warning: no run config (pass --config CFG.yaml): only the weights were written; "
              "from_pretrained also needs config.json and the tokenizer", file=sys.stderr)
        return
    m = model_config(cfg, param_init_type=dtype) if dtype else model_config(cfg)
    try:
        tok = build_tokenizer(cfg)
    except GLMError as e:
        print(f"warning: tokenizer files not written ({e}); pass --config with a reachable vocab_file",
              file=sys.stderr)
        tok = None
    write_hf_metadata(dst, m, layout, tok)


def convert(input_path: str, output_path: str, to_hf: bool = False, dtype: str | None = None,
            layout: str = "chatglm_hf", max_shard_size: str = "5GB", config: str | None = None,
            base: str | None = None) -> dict:
    """HF -> MindSpore file (or MindSpore -> HF folder with `to_hf`); returns a summary for the log line."""
    from glm import weights

    t0 = time.time()
    src, dst = Path(input_path), Path(output_path)
    if to_hf:
        state, meta = _read_reversed_input(src)
        if meta.get("kind") == "adapter":
            state = _merge_adapter(state, meta, base, src)
        elif base:
            raise GLMError(f"--base: {src} is not a LoRA adapter (only an adapter is merged into a base)")
        if config:
            from glm.config import load_config

            cfg = load_config(config)
        else:
            cfg = _recorded_config(meta, src)
        state = weights.ms_to_hf(cast(state, dtype, False), layout=layout)
        weights.write_hf_safetensors(state, dst, shard_size=parse_size(max_shard_size))
        _write_metadata(dst, cfg, layout, dtype)
    else:
        if dst.suffix not in (".ckpt", ".safetensors"):
            raise GLMError(f"--output_path {dst}: expected a .ckpt or .safetensors file name")
        state = weights.hf_to_ms(weights.read_hf_folder(src))
        state = cast(state, dtype, True)
        weights.write_ms_checkpoint(state, dst)
    dtypes = sorted({v.dtype.name for v in state.values()})
    return {"tensors": len(state), "params": int(sum(v.size for v in state.values())),
            "bytes": int(sum(v.nbytes for v in state.values())), "dtypes": dtypes,
            "seconds": time.time() - t0, "src": str(src), "dst": str(dst)}
