"""Convert ChatGLM2/3 weights between HF and MindSpore.

HF -> MindSpore (a folder of *.safetensors or pytorch_model*.bin, ChatGLM or transformers GlmForCausalLM names):
    glm convert --torch_ckpt_dir chatglm3-6b/ --mindspore_ckpt_path glm3_6b.ckpt
MindSpore -> HF (ChatGLM names by default; --layout glm_hf for transformers GlmForCausalLM):
    glm convert --reversed --input_path glm3_6b.ckpt --output_path hf_out/

The output file type follows the extension (.ckpt or .safetensors). dtypes are kept, except that bfloat16
becomes float32 in MindSpore checkpoints (MindSpore has no bf16 kernels on CPU); --dtype overrides both.
"""

from __future__ import annotations

import re
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


def convert(input_path: str, output_path: str, to_hf: bool = False, dtype: str | None = None,
            layout: str = "chatglm_hf", max_shard_size: str = "5GB") -> dict:
    """HF -> MindSpore file (or MindSpore -> HF folder with `to_hf`); returns a summary for the log line."""
    from glm import weights

    t0 = time.time()
    src, dst = Path(input_path), Path(output_path)
    if to_hf:
        state = weights.read_weights(src)
        state = weights.ms_to_hf(cast(state, dtype, False), layout=layout)
        weights.write_hf_safetensors(state, dst, shard_size=parse_size(max_shard_size))
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
