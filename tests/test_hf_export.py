"""HF export (issue 13): `tools/convert_weight.py --reversed --layout glm_hf` writes a folder that
transformers loads with AutoModelForCausalLM / AutoTokenizer and that computes the project's logits and
token ids; a LoRA adapter is merged on the way out; the chatglm layout gets its own config.

The checkpoints are written in-process as training writes them (weights + the run config in the meta).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from cli_utils import REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY3 = "configs/glm3/run_glm3_tiny.yaml"
TINY2 = "configs/glm2/run_glm2_tiny.yaml"
DEV = [json.loads(line)["content"] + json.loads(line)["summary"]
       for line in (REPO / "data/sample/dev.json").read_text("utf-8").splitlines()]
TEXTS = DEV[:20] + ["Hello, world!  two  spaces\nand a newline", "  leading spaces", "emoji 🙂 and ümlaut",
                    "tabs\tand\r\nCRLF", "数字 12345 和 English mixed", ""]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)    # configs name data/sample/tokenizer.model relative to the repo root


def convert(*args) -> int:
    spec = importlib.util.spec_from_file_location("convert_weight", REPO / "tools/convert_weight.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([str(a) for a in args])


def _cfg(config: str, *overrides: str) -> dict:
    from glm.config import load_config

    return load_config(str(REPO / config), list(overrides))


def _save(model, path, meta: dict, trainable_only: bool = False):
    from glm.checkpoint import params_to_items, save_atomic

    params = model.trainable_params() if trainable_only else model.get_parameters()
    return save_atomic(params_to_items(params), path, meta)


def _randomize(model, seed: int, only: str = "") -> None:
    from glm.runtime import ms

    rng = np.random.default_rng(seed)
    for p in model.get_parameters():
        if only in p.name and not p.name.endswith("_cache"):
            p.set_data(ms.Tensor(rng.normal(0, 0.1, p.shape).astype(np.float32)))


def _logits(model, ids: np.ndarray) -> np.ndarray:
    from glm.runtime import ms

    model.set_train(False)
    return model(ms.Tensor(ids.astype(np.int32))).asnumpy()


@pytest.fixture(scope="module")
def glm3(tmp_path_factory):
    from glm.build import build_model
    from glm.runtime import setup_context

    setup_context("CPU", 1)
    cfg = _cfg(TINY3)
    model, _ = build_model(cfg)
    _randomize(model, 0)
    folder = tmp_path_factory.mktemp("hf_export")
    ckpt = _save(model, folder / "glm3-tiny-network.ckpt", {"kind": "network", "config": cfg})
    return model, ckpt, folder


def test_glm_hf_export_loads_with_auto_classes_and_gives_the_projects_logits_and_ids(glm3, tmp_path):
    from glm.tokenizer import ChatGLM3Tokenizer

    model, ckpt, _ = glm3
    out = tmp_path / "hf"
    assert convert("--reversed", "--layout", "glm_hf", "--input_path", ckpt, "--output_path", out) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer.model", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == "GlmForCausalLM"
    tok = ChatGLM3Tokenizer(REPO / "data/sample/tokenizer.model")
    ids = np.array([tok.encode(t)[:24] for t in DEV[:2]])
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ref, _logits(model, ids), atol=1e-4, rtol=0)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == sorted(tok.stop_token_ids) and gen["do_sample"] is False
    assert gen["max_length"] == 128 and hf.generation_config.eos_token_id == gen["eos_token_id"]

    fast = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert fast(text)["input_ids"] == tok.encode(text), text
        assert fast.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text)), text
    role = tok.special_tokens["<|user|>"]
    assert fast.convert_tokens_to_ids("<|user|>") == role and fast.eos_token_id == tok.eos_id
    # Greedy generation through transformers follows the same logits.
    with torch.no_grad():
        out_ids = hf.generate(torch.tensor([ids[0][:12].tolist()]), max_new_tokens=5, do_sample=False)
    assert out_ids.shape[1] == 17


def test_lora_adapter_is_merged_on_the_way_out(tmp_path):
    from glm.build import build_model
    from glm.runtime import setup_context

    setup_context("CPU", 1)
    base_cfg = _cfg(TINY2)
    base, _ = build_model(base_cfg)
    _randomize(base, 1)
    base_ckpt = _save(base, tmp_path / "base.ckpt", {"kind": "network", "config": base_cfg})
    cfg = _cfg("configs/glm2/run_glm2_tiny_lora.yaml")
    lora_model, lora = build_model(cfg)
    from glm.weights import load_weights

    load_weights(lora_model, str(base_ckpt), strict=False)
    _randomize(lora_model, 2, only=".lora_")
    adapter = _save(lora_model, tmp_path / "adapter.ckpt",
                    {"kind": "adapter", "lora": lora, "base_checkpoint": str(base_ckpt), "config": cfg},
                    trainable_only=True)
    out = tmp_path / "hf"
    assert convert("--reversed", "--layout", "glm_hf", "--input_path", adapter, "--output_path", out) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = np.array([[795, 17, 33, 9, 71, 40, 8, 3]])
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    ours = _logits(lora_model, ids)
    np.testing.assert_allclose(ref, ours, atol=1e-4, rtol=0)
    assert np.abs(ours - _logits(base, ids)).max() > 1e-2      # the adapter changed the function


def test_chatglm_layout_gets_chatglm_config_and_without_a_config_only_weights(glm3, tmp_path, capsys):
    _, ckpt, _ = glm3
    out = tmp_path / "chatglm"
    assert convert("--reversed", "--input_path", ckpt, "--output_path", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["num_layers"] == 2 and config["padded_vocab_size"] == 2048
    assert (out / "tokenizer.json").is_file()
    # A checkpoint with no recorded config (e.g. converted from HF) and no --config: weights and a warning.
    bare = tmp_path / "bare.safetensors"
    assert convert("--input_path", out, "--output_path", bare) == 0
    capsys.readouterr()
    out2 = tmp_path / "bare_hf"
    assert convert("--reversed", "--input_path", bare, "--output_path", out2) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["model.safetensors"]
    assert "pass --config" in capsys.readouterr().err
    assert convert("--reversed", "--input_path", bare, "--output_path", out2, "--config", REPO / TINY3) == 0
    assert (out2 / "config.json").is_file() and (out2 / "tokenizer.json").is_file()
