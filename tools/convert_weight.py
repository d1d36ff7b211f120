"""Convert ChatGLM2/3 weights between HF and MindSpore.

HF -> MindSpore (a folder of *.safetensors or pytorch_model*.bin, ChatGLM or transformers GlmForCausalLM names):
    python tools/convert_weight.py --torch_ckpt_dir chatglm3-6b/ --mindspore_ckpt_path glm3_6b.ckpt
MindSpore -> HF (ChatGLM names by default; --layout glm_hf for transformers GlmForCausalLM):
    python tools/convert_weight.py --reversed --input_path glm3_6b.ckpt --output_path hf_out/
    python tools/convert_weight.py --reversed --layout glm_hf --input_path output/.../glm3-tiny_rank_0-network.ckpt \
        --output_path hf_out/        # then AutoModelForCausalLM/AutoTokenizer.from_pretrained("hf_out")

With --reversed the folder also gets config.json, generation_config.json and the tokenizer files
(tokenizer.model, tokenizer.json, tokenizer_config.json), from the run config recorded in checkpoints
written by this tool or from --config. A LoRA adapter checkpoint is merged into its base weights (the
recorded base, or --base) on the way out.

The output file type follows the extension (.ckpt or .safetensors). dtypes are kept, except that bfloat16
becomes float32 in MindSpore checkpoints (MindSpore has no bf16 kernels on CPU); --dtype overrides both.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

try:
    import glm  # noqa: F401
except ImportError:   # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm import GLMError  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise GLMError(f"--max_shard_size: expected a size like 5GB or 500MB, got {text!r}")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * unit)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_path", "--torch_ckpt_dir", dest="input_path", required=True,
                   help="HF folder/file (default direction) or MindSpore .ckpt/.safetensors (--reversed)")
    p.add_argument("--output_path", "--mindspore_ckpt_path", dest="output_path", required=True,
                   help="MindSpore .ckpt/.safetensors file, or the HF output folder with --reversed")
    p.add_argument("--reversed", action="store_true", help="MindSpore -> HF safetensors folder")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast every floating tensor to this dtype (default: keep; bf16 -> float32 for MindSpore)")
    p.add_argument("--layout", choices=("chatglm_hf", "glm_hf"), default="chatglm_hf",
                   help="names of the HF output with --reversed (default chatglm_hf)")
    p.add_argument("--max_shard_size", default="5GB", help="HF output shard size with --reversed (default 5GB)")
    p.add_argument("--config", default=None,
                   help="--reversed: run config (YAML) for config.json and the tokenizer files; default: the "
                        "config recorded in the checkpoint")
    p.add_argument("--base", default=None,
                   help="--reversed with a LoRA adapter: base weights to merge into (default: the recorded base)")
    return p


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
                       "plain weights (serve it with --run_mode serve)")
    base = base or meta.get("base_checkpoint")
    if not base or base == "random" or not Path(base).exists():
        raise GLMError(f"--input_path {src} is a LoRA adapter whose base weights ({base!r}) are not available; "
                       "pass --base")
    merged = hf_to_ms(read_weights(base))
    merged.update({k: v for k, v in state.items() if ".lora_" in k})
    return merge_lora_state(merged, meta["lora"])


def _run_config(args: argparse.Namespace, meta: dict) -> dict | None:
    if args.config:
        from glm.config import load_config

        return load_config(args.config)
    return meta.get("config")


def _metadata(dst: Path, cfg: dict | None, args: argparse.Namespace) -> None:
    from glm.build import build_tokenizer, model_config
    from glm.hf_export import write_hf_metadata

    if not cfg:
        print("warning: no run config (pass --config CFG.yaml): only the weights were written; "
              "from_pretrained also needs config.json and the tokenizer", file=sys.stderr)
        return
    m = model_config(cfg, param_init_type=args.dtype) if args.dtype else model_config(cfg)
    try:
        tok = build_tokenizer(cfg)
    except GLMError as e:
        print(f"warning: tokenizer files not written ({e}); pass --config with a reachable vocab_file",
              file=sys.stderr)
        tok = None
    write_hf_metadata(dst, m, args.layout, tok)


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


def convert(args: argparse.Namespace) -> dict:
    from glm import weights

    t0 = time.time()
    src, dst = Path(args.input_path), Path(args.output_path)
    if args.reversed:
        state, meta = _read_reversed_input(src)
        if meta.get("kind") == "adapter":
            state = _merge_adapter(state, meta, args.base, src)
        cfg = _run_config(args, meta)
        state = weights.ms_to_hf(cast(state, args.dtype, False), layout=args.layout)
        weights.write_hf_safetensors(state, dst, shard_size=parse_size(args.max_shard_size))
        _metadata(dst, cfg, args)
    else:
        if dst.suffix not in (".ckpt", ".safetensors"):
            raise GLMError(f"--output_path {dst}: expected a .ckpt or .safetensors file name")
        state = weights.hf_to_ms(weights.read_hf_folder(src))
        state = cast(state, args.dtype, True)
        weights.write_ms_checkpoint(state, dst)
    dtypes = sorted({v.dtype.name for v in state.values()})
    return {"tensors": len(state), "params": int(sum(v.size for v in state.values())),
            "bytes": int(sum(v.nbytes for v in state.values())), "dtypes": dtypes,
            "seconds": time.time() - t0, "src": str(src), "dst": str(dst)}


def main(argv: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = convert(args)
    except GLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory while converting (the whole model is held in RAM)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:   # keep the one-line contract for the unforeseen too
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"converted {s['tensors']} tensors ({s['params']:,} parameters, {s['bytes'] / 1e6:,.1f} MB, "
          f"{'/'.join(s['dtypes'])}) {s['src']} -> {s['dst']} in {s['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GLOG_v", "3")
    sys.exit(main())
