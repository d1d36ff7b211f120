"""Weight conversion HF <-> MindSpore and loading into the model (glm/weights.py, glm/convert.py through its old path tools/convert_weight.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glm import GLMError
from glm import weights as W

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "convert_weight.py"
L, H, NH, KV, HD, F, V = 2, 64, 4, 2, 16, 96, 128


def tool_main(capsys, *args) -> tuple:
    """The tool in-process (saves the ~1.5 s MindSpore import of a subprocess): (rc, stdout, stderr)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_weight", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def ms_layout(layers: int = L) -> dict:
    """The MindFormers names/shapes of the tiny model."""
    shapes = {W.MS_EMBED: (V, H), "transformer.encoder.final_layernorm.weight": (H,),
              "transformer.output_layer.weight": (V, H)}
    for i in range(layers):
        p = W.LAYER.format(i)
        shapes.update({p + "input_layernorm.weight": (H,),
                       p + "self_attention.query_key_value.weight": ((NH + 2 * KV) * HD, H),
                       p + "self_attention.query_key_value.bias": ((NH + 2 * KV) * HD,),
                       p + "self_attention.dense.weight": (H, NH * HD),
                       p + "post_attention_layernorm.weight": (H,),
                       p + "mlp.dense_h_to_4h.weight": (2 * F, H),
                       p + "mlp.dense_4h_to_h.weight": (H, F)})
    return shapes


def chatglm_state(dtype=np.float16, layers: int = L) -> dict:
    rng = np.random.default_rng(0)
    state = {}
    for name, shape in ms_layout(layers).items():
        state[W.HF_EMBED if name == W.MS_EMBED else name] = rng.standard_normal(shape).astype(dtype)
    state["transformer.rotary_pos_emb.inv_freq"] = np.arange(HD // 4, dtype=dtype)
    return state


def tiny_model(layers: int = 1, **kw):
    from glm.model.config import GLMConfig
    from glm.model.glm import GLMForCausalLM

    cfg = GLMConfig(num_layers=layers, padded_vocab_size=V, hidden_size=H, ffn_hidden_size=F, kv_channels=HD,
                    num_attention_heads=NH, multi_query_group_num=KV, seq_length=32, **kw)
    return GLMForCausalLM(cfg)


@pytest.fixture(scope="module")
def hf_glm(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GlmConfig(
        vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=L, num_attention_heads=NH,
        num_key_value_heads=KV, head_dim=HD, rms_norm_eps=1e-5, attention_bias=True, pad_token_id=0,
        eos_token_id=2, tie_word_embeddings=False, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    model = transformers.GlmForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("hf_glm")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


# ---------------------------------------------------------------------------------------- transformers GLM
def test_glm_hf_to_ckpt_with_tool(hf_glm, tmp_path):
    model, folder = hf_glm
    out = tmp_path / "tiny.ckpt"
    r = run_tool("--torch_ckpt_dir", folder, "--mindspore_ckpt_path", out)
    assert r.returncode == 0, r.stderr
    assert "converted 17 tensors" in r.stdout and "parameters" in r.stdout
    state = W.read_ms_checkpoint(out)
    assert {k: v.shape for k, v in state.items()} == ms_layout()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for i in range(L):
        a, p = f"model.layers.{i}.self_attn.", W.LAYER.format(i)
        for kind in ("weight", "bias"):
            qkv = state[p + f"self_attention.query_key_value.{kind}"]
            np.testing.assert_array_equal(qkv[:NH * HD], sd[a + f"q_proj.{kind}"])
            np.testing.assert_array_equal(qkv[NH * HD:(NH + KV) * HD], sd[a + f"k_proj.{kind}"])
            np.testing.assert_array_equal(qkv[(NH + KV) * HD:], sd[a + f"v_proj.{kind}"])
        np.testing.assert_array_equal(state[p + "mlp.dense_h_to_4h.weight"], sd[f"model.layers.{i}.mlp.gate_up_proj.weight"])
        np.testing.assert_array_equal(state[p + "self_attention.dense.weight"], sd[a + "o_proj.weight"])
    np.testing.assert_array_equal(state[W.MS_EMBED], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(state["transformer.output_layer.weight"], sd["lm_head.weight"])


def test_glm_hf_logits_match_after_load(hf_glm):
    torch = pytest.importorskip("torch")
    model, folder = hf_glm
    from glm.runtime import ms

    net = tiny_model(layers=L)
    missing, unexpected = W.load_weights(net, folder)   # HF folder, glm_hf names, converted on the fly
    assert (missing, unexpected) == ([], [])
    ids = np.array([[5, 17, 99, 3, 42, 7, 64, 120]], dtype=np.int32)
    ours = net(ms.Tensor(ids)).asnumpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_reversed_to_glm_hf_loads_in_transformers(hf_glm, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, folder = hf_glm
    ckpt, out = tmp_path / "m.safetensors", tmp_path / "hf"
    assert run_tool("--input_path", folder, "--output_path", ckpt).returncode == 0
    r = run_tool("--reversed", "--input_path", ckpt, "--output_path", out, "--layout", "glm_hf",
                 "--max_shard_size", "40KB")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors.index.json").is_file()   # sharded
    shutil.copy(folder / "config.json", out / "config.json")
    back = transformers.GlmForCausalLM.from_pretrained(out)
    ref = model.state_dict()
    assert set(back.state_dict()) == set(ref)
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k


# ---------------------------------------------------------------------------------------- ChatGLM HF names
@pytest.mark.parametrize("ms_ext", [".ckpt", ".safetensors"])
def test_chatglm_fp16_round_trip_is_bit_exact(tmp_path, ms_ext):
    from safetensors.numpy import load_file, save_file

    state = chatglm_state(np.float16)
    src = tmp_path / "chatglm"
    src.mkdir()
    names = sorted(state)
    # two shards + index, as on the Hub
    half = {"model-00001-of-00002.safetensors": names[:9], "model-00002-of-00002.safetensors": names[9:]}
    for fname, keys in half.items():
        save_file({k: state[k] for k in keys}, str(src / fname), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in half.items() for k in ks}}))
    ckpt, out = tmp_path / f"ms{ms_ext}", tmp_path / "back"
    r = run_tool("--torch_ckpt_dir", src, "--mindspore_ckpt_path", ckpt)
    assert r.returncode == 0, r.stderr
    ms_state = W.read_ms_checkpoint(ckpt)
    assert W.MS_EMBED in ms_state and not any("inv_freq" in k for k in ms_state)
    assert run_tool("--reversed", "--input_path", ckpt, "--output_path", out).returncode == 0
    assert sorted(os.listdir(out)) == ["model.safetensors"]   # no temp files left behind
    back = load_file(str(out / "model.safetensors"))
    expected = {k: v for k, v in state.items() if "inv_freq" not in k}
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert back[k].dtype == np.float16 and back[k].tobytes() == v.tobytes(), k


def test_bf16_is_stored_as_fp32_unless_asked(tmp_path, capsys):
    from safetensors.numpy import save_file

    from glm.runtime import ms  # noqa: F401  (registers numpy bfloat16)

    bf16 = np.dtype("bfloat16")
    state = {k: v.astype(np.float32).astype(bf16) for k, v in chatglm_state(layers=1).items()}
    (tmp_path / "src").mkdir()
    save_file(state, str(tmp_path / "src" / "model.safetensors"))
    assert tool_main(capsys, "--input_path", tmp_path / "src", "--output_path", tmp_path / "a.ckpt")[0] == 0
    a = W.read_ms_checkpoint(tmp_path / "a.ckpt")
    assert {v.dtype for v in a.values()} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(a[W.MS_EMBED], state[W.HF_EMBED].astype(np.float32))
    rc, out, err = tool_main(capsys, "--input_path", tmp_path / "src", "--output_path", tmp_path / "b.ckpt",
                             "--dtype", "bfloat16")
    assert rc == 0, err
    assert "bfloat16" in out
    b = W.read_ms_checkpoint(tmp_path / "b.ckpt")
    assert b[W.MS_EMBED].dtype == bf16 and b[W.MS_EMBED].tobytes() == state[W.HF_EMBED].tobytes()


def test_pytorch_bin_is_read_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    state = chatglm_state(np.float16, layers=1)
    sd = {k: torch.from_numpy(v) for k, v in state.items()}
    sd["transformer.encoder.final_layernorm.weight"] = torch.linspace(-2, 2, H).to(torch.bfloat16)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    got = W.read_hf_folder(tmp_path)
    assert set(got) == set(sd)
    np.testing.assert_array_equal(got[W.HF_EMBED], state[W.HF_EMBED])
    norm = got["transformer.encoder.final_layernorm.weight"]
    assert norm.dtype.name == "bfloat16"    # kept losslessly
    np.testing.assert_array_equal(norm.astype(np.float32), sd["transformer.encoder.final_layernorm.weight"].float().numpy())


def test_pytorch_bin_without_torch_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "torch", None)   # makes `import torch` fail
    with pytest.raises(GLMError, match=r"needs torch \(pip install torch\)"):
        W.read_hf_folder(tmp_path)


# ---------------------------------------------------------------------------------------- layouts
def test_detect_layout_and_aliases():
    assert W.detect_layout(chatglm_state(layers=1)) == "chatglm_hf"
    assert W.detect_layout(["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]) == "glm_hf"
    assert W.detect_layout(ms_layout(1)) == "mindspore"
    assert W.detect_layout(["transformer.encoder.layers.0.self_attention.query_key_value.lora_a"]) == "mindspore"
    with pytest.raises(GLMError, match="unrecognised parameter names"):
        W.detect_layout(["encoder.weight"])
    old = {W.OLD_MS_EMBED: np.zeros((2, 2)), "transformer.encoder.layers.0.self_attention.query_key_value.lora_a":
           np.ones((4, H))}
    new = W.hf_to_ms(old)
    assert set(new) == {W.MS_EMBED, "transformer.encoder.layers.0.self_attention.query_key_value.lora_a"}


def test_ms_to_glm_hf_split_from_shapes_equals_split_from_config():
    from glm.model.config import GLMConfig

    ms_state = W.hf_to_ms(chatglm_state(np.float32, layers=1))
    cfg = GLMConfig(num_layers=1, padded_vocab_size=V, hidden_size=H, ffn_hidden_size=F, kv_channels=HD,
                    num_attention_heads=NH, multi_query_group_num=KV)
    a, b = W.ms_to_hf(ms_state, "glm_hf"), W.ms_to_hf(ms_state, "glm_hf", config=cfg)
    assert a.keys() == b.keys()
    assert a["model.layers.0.self_attn.k_proj.weight"].shape == (KV * HD, H)
    again = W.hf_to_ms(a)
    assert again.keys() == ms_state.keys()
    for k, v in ms_state.items():
        np.testing.assert_array_equal(again[k], v)


# ---------------------------------------------------------------------------------------- bad input
def test_tool_bad_inputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    r = run_tool("--input_path", tmp_path / "missing", "--output_path", tmp_path / "o.ckpt")   # the real CLI
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: {tmp_path / 'missing'}: no such file or folder\n"
    cases = [(["--input_path", tmp_path / "empty"], "no *.safetensors or pytorch_model*.bin", "empty"),
             (["--input_path", tmp_path / "corrupt"], "not a readable safetensors file", "corrupt"),
             (["--reversed", "--input_path", tmp_path / "gone.ckpt"], "no such file or folder", "gone.ckpt")]
    for args, msg, name in cases:
        rc, _, err = tool_main(capsys, *args, "--output_path", tmp_path / "o.ckpt")
        assert rc == 2 and msg in err and name in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    rc, _, err = tool_main(capsys, "--input_path", tmp_path / "empty", "--output_path", tmp_path / "o.bin")
    assert rc == 2 and "expected a .ckpt or .safetensors file name" in err


def test_corrupt_ckpt_and_failed_write_leave_no_debris(tmp_path, monkeypatch):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(GLMError, match="bad.ckpt: not a readable MindSpore checkpoint"):
        W.read_ms_checkpoint(bad)
    good = tmp_path / "good.ckpt"
    W.write_ms_checkpoint({"a": np.ones(3, np.float32)}, good)
    before = good.read_bytes()
    from glm.runtime import ms

    def disk_full(items, path, **kw):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ms, "save_checkpoint", disk_full)
    with pytest.raises(GLMError, match=r"good.ckpt: no space left on device \(needs about 12 B, "):
        W.write_ms_checkpoint({"a": np.zeros(3, np.float32)}, good)
    assert good.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["bad.ckpt", "good.ckpt"]


def _model_state(net) -> dict:
    return {n: p.asnumpy() for n, p in net.parameters_and_names()}


def test_load_weights_into_checks_names_and_shapes(tmp_path, capsys):
    net = tiny_model()
    state = W.hf_to_ms(chatglm_state(np.float16, layers=1))    # fp16 in, fp32 parameters
    assert W.load_weights_into(net, state) == ([], [])
    got = _model_state(net)
    assert got[W.MS_EMBED].dtype == np.float32
    np.testing.assert_array_equal(got[W.MS_EMBED], state[W.MS_EMBED].astype(np.float32))

    bad = dict(state, **{"transformer.output_layer.weight": np.zeros((2 * V, H), np.float32)})
    with pytest.raises(GLMError) as e:
        W.load_weights_into(net, bad, where="x.ckpt")
    assert str(e.value) == (f"checkpoint x.ckpt: transformer.output_layer.weight has shape ({2 * V}, {H}) "
                            f"but the model expects ({V}, {H})")

    partial = {k: v for k, v in state.items() if "encoder.layers.0" not in k}
    with pytest.raises(GLMError, match=r"7 model parameter\(s\) missing: transformer\.encoder\.layers\.0\..* and 2 more"):
        W.load_weights_into(net, partial)
    missing, _ = W.load_weights_into(net, partial, strict=False)
    assert len(missing) == 7 and "left as initialised" in capsys.readouterr().err

    extra = dict(state, **{"transformer.rotary_scale.weight": np.zeros((2, 2), np.float32),
                           "adam_m.transformer.output_layer.weight": np.zeros((V, H), np.float32),
                           "global_step": np.array([3], np.int32)})
    assert W.load_weights_into(net, extra) == ([], ["transformer.rotary_scale.weight"])
    err = capsys.readouterr().err
    assert "1 tensor(s) not used by the model: transformer.rotary_scale.weight" in err
    assert "adam_m" not in err


def test_load_weights_from_paths(tmp_path):
    net = tiny_model()
    state = chatglm_state(np.float16, layers=1)
    W.write_ms_checkpoint(W.hf_to_ms(state), tmp_path / "m.ckpt")
    W.write_hf_safetensors(state, tmp_path / "hf")
    for path in (tmp_path / "m.ckpt", tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        assert W.load_weights(net, path) == ([], []), path
    with pytest.raises(GLMError, match="no such file or folder"):
        W.load_weights(net, tmp_path / "nowhere")
    cached = tiny_model(use_past=True)   # KV-cache Parameters are not weights
    assert any(n.endswith("_cache") for n, _ in cached.parameters_and_names())
    assert W.load_weights(cached, tmp_path / "m.ckpt") == ([], [])
