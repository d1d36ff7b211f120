"""P-Tuning v2 (pet_type: ptuning2): parity with THUDM's forward, cache == recompute, only the prefix trains,
prefix-only checkpoints, dry run of MindFormers' config, export.

The oracle is transformers' GlmForCausalLM (the ChatGLM2/3 function) with its key/value cache pre-filled
with the un-rotated prefix and explicit positions from 0 - THUDM's `past_key_values = get_prompt(...)`.
The prefix itself is computed here in numpy from the encoder's weights, as THUDM's PrefixEncoder does:
table [P, L*2*kv*hd] (-> Linear -> tanh -> Linear) -> [P, 2L, kv, hd], layer i keys = block 2i, values 2i+1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_utils import REPO, TINY2, TINY2_PTUNING, run_glm

torch = pytest.importorskip("torch", reason="torch is the parity oracle (pip install -e '.[parity]')")
transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

from glm.generate import GenerationConfig, Generator  # noqa: E402
from glm.model.config import GLMConfig  # noqa: E402
from glm.model.glm import GLMForCausalLM, count_parameters  # noqa: E402
from glm.model.ptuning import TABLE  # noqa: E402
from glm.runtime import ms, setup_context  # noqa: E402
from glm.weights import hf_to_ms, load_weights_into  # noqa: E402

L, H, NH, KV, F, V, SEQ, P = 2, 64, 4, 2, 96, 160, 64, 6
NEW = 8   # generated tokens per prompt
HD = H // NH
DENSE_IN, DENSE_OUT = "prefix_encoder.mindpet_delta_ptuning2_dense_in", "prefix_encoder.mindpet_delta_ptuning2_dense_out"


def hf_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GlmConfig(
        num_hidden_layers=L, hidden_size=H, num_attention_heads=NH, num_key_value_heads=KV,
        intermediate_size=F, vocab_size=V, head_dim=HD, rms_norm_eps=1e-5, attention_bias=True,
        max_position_embeddings=256, pad_token_id=0, eos_token_id=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    model = transformers.GlmForCausalLM(cfg).float().eval()
    with torch.no_grad():   # std 0.02 init: scale up so that logits differ clearly between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


def prefix_weights(projection: bool, seed: int = 0) -> dict:
    """Seeded prefix-encoder weights (large enough that the prefix changes the logits clearly)."""
    rs = np.random.RandomState(seed)
    width = L * 2 * KV * HD
    w = {TABLE: rs.normal(0, 1.0, (P, width)).astype(np.float32)}
    if projection:
        w[f"{DENSE_IN}.weight"] = rs.normal(0, 0.3, (24, width)).astype(np.float32)
        w[f"{DENSE_IN}.bias"] = rs.normal(0, 0.3, (24,)).astype(np.float32)
        w[f"{DENSE_OUT}.weight"] = rs.normal(0, 0.5, (width, 24)).astype(np.float32)
        w[f"{DENSE_OUT}.bias"] = rs.normal(0, 0.3, (width,)).astype(np.float32)
    return w


def numpy_prefix(w: dict) -> np.ndarray:
    """THUDM get_prompt without dropout: [2L, P, kv, hd] (keys of layer i at 2i, values at 2i + 1)."""
    rows = w[TABLE].astype(np.float64)
    if f"{DENSE_IN}.weight" in w:
        hidden = np.tanh(rows @ w[f"{DENSE_IN}.weight"].T + w[f"{DENSE_IN}.bias"])
        rows = hidden @ w[f"{DENSE_OUT}.weight"].T + w[f"{DENSE_OUT}.bias"]
    return rows.reshape(P, 2 * L, KV, HD).transpose(1, 0, 2, 3)


def pet(projection: bool) -> dict:
    return {"pet_type": "ptuning2", "pre_seq_len": P, "prefix_projection": projection, "projection_dim": 24,
            "dropout_prob": 0.0}


def our_model(hf, projection: bool, **kw) -> GLMForCausalLM:
    cfg = GLMConfig(num_layers=L, hidden_size=H, num_attention_heads=NH, kv_channels=HD, multi_query_group_num=KV,
                    ffn_hidden_size=F, padded_vocab_size=V, seq_length=SEQ, pet_config=pet(projection), **kw)
    net = GLMForCausalLM(cfg)
    state = hf_to_ms({k: v.detach().numpy() for k, v in hf.state_dict().items()})
    load_weights_into(net, {**state, **prefix_weights(projection)})
    return net


def hf_logits(hf, ids: np.ndarray, prefix: np.ndarray, mask=None) -> np.ndarray:
    """THUDM's P-Tuning v2 forward: the cache holds the un-rotated prefix; real tokens at positions 0..S-1."""
    b, s = ids.shape
    cache = transformers.DynamicCache()
    for i in range(L):
        k = torch.tensor(prefix[2 * i], dtype=torch.float32).permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)
        v = torch.tensor(prefix[2 * i + 1], dtype=torch.float32).permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)
        cache.update(k.contiguous(), v.contiguous(), i)
    attn = np.ones((b, P + s), np.int64)
    if mask is not None:
        attn[:, P:] = mask
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids, dtype=torch.long), past_key_values=cache,
                 position_ids=torch.arange(s).unsqueeze(0).expand(b, -1),
                 attention_mask=torch.tensor(attn), use_cache=True)
    return out.logits.numpy()


@pytest.fixture(scope="module")
def hf():
    setup_context("CPU", 0)
    return hf_model()


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
def test_logits_match_thudm_ptuning_v2_forward(hf, projection):
    net = our_model(hf, projection)
    prefix = numpy_prefix(prefix_weights(projection))
    ids = np.random.RandomState(1).randint(3, V, (2, 13)).astype(np.int32)
    ref = hf_logits(hf, ids, prefix)
    out = net(ms.Tensor(ids)).asnumpy()
    assert np.abs(out - ref).max() < 1e-4
    # The prefix matters: without it (plain transformers forward) the logits are far off.
    with torch.no_grad():
        plain = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(plain - ref).max() > 0.5
    # Right padding: pad keys are masked (as the project masks pad_token_id 0), real positions agree.
    padded = ids.copy()
    padded[1, 9:] = 0
    keep = (padded != 0).astype(np.int64)
    ref = hf_logits(hf, padded, prefix, keep)
    out = net(ms.Tensor(padded)).asnumpy()
    assert np.abs(out[0] - ref[0]).max() < 1e-4 and np.abs(out[1, :9] - ref[1, :9]).max() < 1e-4


def test_trainable_parameters_are_the_prefix_only(hf):
    net = our_model(hf, False)
    assert [p.name for p in net.trainable_params()] == [TABLE]
    assert count_parameters(net, True) == P * L * 2 * KV * HD
    proj = our_model(hf, True)
    width = L * 2 * KV * HD
    assert count_parameters(proj, True) == P * width + (width * 24 + 24) + (24 * width + width)


def test_cached_generation_equals_full_recompute_and_the_oracle(hf):
    """Batched prompts of different lengths: the KV-cache paths (chunked greedy and one step at a time,
    prefix written into the first cache slots by the prefill) = recompute without a cache = THUDM."""
    cached = our_model(hf, True, use_past=True, batch_size=3)
    full = our_model(hf, True, batch_size=3)
    rs = np.random.RandomState(2)
    prompts = [list(map(int, rs.randint(3, V, n))) for n in (5, 17, 9)]
    gen = GenerationConfig(max_new_tokens=NEW, eos_token_id=[-1])   # no eos: always NEW tokens
    chunked = Generator(cached, use_cache=True, decode_chunk=3).generate(prompts, gen)
    stepwise = Generator(cached, use_cache=True, decode_chunk=1).generate(prompts, gen)
    recompute = Generator(full, use_cache=False).generate(prompts, gen)
    prefix = numpy_prefix(prefix_weights(True))
    oracle = []
    for p in prompts:
        seq = list(p)
        for _ in range(NEW):
            seq.append(int(hf_logits(hf, np.array([seq]), prefix)[0, -1].argmax()))
        oracle.append(seq[len(p):])
    assert chunked == stepwise == recompute == oracle
    assert len({tuple(t) for t in oracle}) == 3


def test_training_changes_only_the_prefix_and_dropout_is_for_training_only(hf):
    """Three optimizer steps with dropout_prob 0.3: every base weight is bit-identical afterwards, the prefix
    encoder moved; in eval mode the forward equals a dropout-free model with the same weights."""
    from glm.dropout import use_counted_dropout
    from glm.optim import build_optimizer
    from glm.settings import OptimizerConfig
    from glm.train_step import TrainStep

    cfg = GLMConfig(num_layers=L, hidden_size=H, num_attention_heads=NH, kv_channels=HD, multi_query_group_num=KV,
                    ffn_hidden_size=F, padded_vocab_size=V, seq_length=SEQ,
                    pet_config={**pet(True), "dropout_prob": 0.3})
    net = GLMForCausalLM(cfg)
    load_weights_into(net, {**hf_to_ms({k: v.detach().numpy() for k, v in hf.state_dict().items()}),
                            **prefix_weights(True)})
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    assert use_counted_dropout(net, seed=0) is not None   # the prefix dropout is the model's only dropout
    net.set_train(True)
    step = TrainStep(net, build_optimizer(OptimizerConfig(weight_decay=0.1), net.trainable_params()), 1.0, None, 1)
    rs = np.random.RandomState(4)
    ids = rs.randint(3, V, (2, 16)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((2, 1), -100, np.int32)], 1)
    losses = [step.run([(ids, labels)], [1.0], 1e-2, i + 1)[0] for i in range(3)]
    assert losses[-1] < losses[0]
    after = {p.name: p.asnumpy() for p in net.get_parameters()}
    changed = sorted(n for n in before if not np.array_equal(before[n], after[n]))
    assert changed == sorted([TABLE, f"{DENSE_IN}.weight", f"{DENSE_IN}.bias", f"{DENSE_OUT}.weight",
                              f"{DENSE_OUT}.bias"])
    net.set_train(False)
    clean = our_model(hf, True)
    load_weights_into(clean, {n: after[n] for n in changed}, part="adapter")
    x = ms.Tensor(ids)
    assert np.array_equal(net(x).asnumpy(), clean(x).asnumpy())


def test_prefix_settings_errors_name_the_key(tmp_path):
    """model_config.pre_seq_len alone (silently ignored before), disagreeing values, MindFormers' P-Tuning
    class without its pet_config, a prefix file for a model without a prefix: one-line errors."""
    from glm import GLMError
    from glm.config import load_config

    tiny = REPO / "configs/glm2/run_glm2_tiny.yaml"
    tiny_pt = REPO / "configs/glm2/run_glm2_tiny_ptuning2.yaml"
    cases = [
        (tiny, ["model.model_config.pre_seq_len=16"], "model.model_config.pre_seq_len: P-Tuning v2 is set in"),
        (tiny_pt, ["model.model_config.pre_seq_len=8"],
         "model.model_config.pre_seq_len: 8 but model.model_config.pet_config.pre_seq_len is 16"),
        (tiny, ["model.arch.type=ChatGLM2WithPtuning2"], "model.arch.type: 'ChatGLM2WithPtuning2' needs"),
        (tiny_pt, ["model.model_config.pet_config.lora_rank=4"], "pet_config.lora_rank: a lora key, but pet_type is 'ptuning2'"),
        (tiny_pt, ["model.model_config.pet_config.dropout_prob=1.0"], "pet_config.dropout_prob: expected a "
                                                                      "probability in [0, 1)"),
    ]
    for path, overrides, needle in cases:
        with pytest.raises(GLMError) as e:
            load_config(path, overrides)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    plain = GLMForCausalLM(GLMConfig(num_layers=L, hidden_size=H, num_attention_heads=NH, kv_channels=HD,
                                     multi_query_group_num=KV, ffn_hidden_size=F, padded_vocab_size=V, seq_length=SEQ))
    with pytest.raises(GLMError, match="holds a P-Tuning v2 prefix .* but the model has none"):
        load_weights_into(plain, {"transformer.prefix_encoder.embedding.weight": np.zeros((P, 8), np.float32)})


def test_thudm_and_mindformers_prefix_names_load(hf):
    """A THUDM ChatGLM2 ptuning checkpoint (transformer.prefix_encoder.embedding / trans.0 / trans.2) and a
    MindFormers one (with its arange index buffer) load into the same parameters."""
    net = our_model(hf, True)
    w = prefix_weights(True, seed=9)
    thudm = {"transformer.prefix_encoder.embedding.weight": w[TABLE],
             "transformer.prefix_encoder.trans.0.weight": w[f"{DENSE_IN}.weight"],
             "transformer.prefix_encoder.trans.0.bias": w[f"{DENSE_IN}.bias"],
             "transformer.prefix_encoder.trans.2.weight": w[f"{DENSE_OUT}.weight"],
             "transformer.prefix_encoder.trans.2.bias": w[f"{DENSE_OUT}.bias"]}
    assert load_weights_into(net, thudm, part="adapter")[1] == []   # nothing unused
    got = {p.name: p.asnumpy() for p in net.get_parameters()}
    assert all(np.array_equal(got[k], v) for k, v in w.items())
    mindformers = {**w, "prefix_encoder.mindpet_delta_ptuning2_prefix": np.arange(P)}
    assert load_weights_into(net, mindformers, part="adapter")[1] == []


# ------------------------------------------------------------------------------------------------ export
def test_exported_graphs_carry_the_prefix(hf, tmp_path):
    """The MindIR prefill graph computes the prefix and writes it into the first pre_seq_len cache slots;
    prefill + decode driven from numpy give the eager model's greedy tokens."""
    from glm.build import build_model
    from glm.export import run_export
    from glm.weights import write_ms_checkpoint

    model_cfg = dict(num_layers=L, hidden_size=H, num_attention_heads=NH, kv_channels=HD, multi_query_group_num=KV,
                     ffn_hidden_size=F, padded_vocab_size=V, seq_length=SEQ, batch_size=2, pet_config=pet(True))
    cfg = {"context": {"device_target": "CPU", "mode": 0}, "seed": 7, "output_dir": str(tmp_path),
           "load_checkpoint": str(tmp_path / "w.ckpt"), "model": {"model_config": model_cfg}}
    model, _ = build_model(cfg, use_past=True)
    state = {**hf_to_ms({k: v.detach().numpy() for k, v in hf.state_dict().items()}), **prefix_weights(True)}
    load_weights_into(model, state)
    write_ms_checkpoint(state, tmp_path / "w.ckpt")
    prompts = [[5, 17, 33, 9, 71, 2, 40], [8, 3, 99]]
    want = Generator(model, decode_chunk=1).generate(prompts, GenerationConfig(max_new_tokens=NEW, eos_token_id=[-1]))

    info = run_export(cfg)
    assert info["model"]["pre_seq_len"] == P
    cache_spec = info["graphs"]["prefill"]["inputs"][-1]
    assert cache_spec["shape"] == [L, 2, 2, SEQ + P, KV, HD]
    prefill = ms.nn.GraphCell(ms.load(str(tmp_path / info["graphs"]["prefill"]["file"])))
    decode = ms.nn.GraphCell(ms.load(str(tmp_path / info["graphs"]["decode"]["file"])))
    lengths = np.array([len(q) for q in prompts], np.int32)
    ids = np.zeros((2, SEQ), np.int32)
    for r, q in enumerate(prompts):
        ids[r, :len(q)] = q
    pos = np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape).copy()
    cache = ms.Tensor(np.zeros(cache_spec["shape"], np.float32))
    logits, cache = prefill(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(lengths - 1), cache)
    got = [[], []]
    for step in range(NEW):
        chosen = logits.asnumpy().argmax(-1).astype(np.int32)
        for r, t in enumerate(chosen):
            got[r].append(int(t))
        if step + 1 < NEW:
            logits, cache = decode(ms.Tensor(chosen.reshape(-1, 1)), ms.Tensor((lengths + step).reshape(-1, 1)), cache)
    assert got == want
    # The prefix sits in slots 0..P-1 of every row: layer 0's keys there are the encoder's (un-rotated) output.
    keys0 = cache.asnumpy()[0, 0, :, :P]                       # [rows, P, kv, hd]
    np.testing.assert_allclose(keys0[1], numpy_prefix(prefix_weights(True))[0], atol=1e-5)


# --------------------------------------------------------------------------------------------- the CLI
DECODE = "model.model_config.max_decode_length=64"   # prompt + answer <= 64 tokens
PROMPT = "类型#裙*颜色#红色*图案#刺绣"


@pytest.mark.slow
def test_finetune_trains_and_saves_only_the_prefix(tiny_ptuning, tiny_trained):
    from glm.checkpoint import load_state

    width = 2 * 2 * 2 * 32                                   # layers x (key, value) x kv groups x kv_channels
    assert tiny_ptuning.summary["trainable_parameters"] == 16 * width == 4096
    assert "(4,096 trainable)" in tiny_ptuning.log
    assert len(tiny_ptuning.losses) == 12
    params, meta = load_state(tiny_ptuning.weights)
    assert sorted(params) == [TABLE] and params[TABLE].shape == (16, width)
    assert meta["kind"] == "adapter" and meta["base_checkpoint"] == str(tiny_trained.weights)
    assert meta["pet"] == {"pet_type": "ptuning2", "pre_seq_len": 16, "prefix_projection": False,
                           "projection_dim": 128, "dropout_prob": 0.0}
    # The trained prefix lowers the loss on training samples (12 steps on a fine-tuned base move it a little,
    # ~3.01 -> ~2.99; the per-step log is too noisy to show it): compared with a zero prefix, ~ the initial one.
    from glm.build import build_model, build_tokenizer, load_checkpoints
    from glm.config import load_config
    from glm.data import load_adgen

    setup_context("CPU", 0)
    cfg = load_config(REPO / TINY2_PTUNING)
    model, pet_settings = build_model(cfg)
    load_checkpoints(model, str(tiny_ptuning.weights), pet_settings, required=True, run_mode="eval")
    model.set_train(False)
    _, samples, _ = load_adgen(REPO / "data/sample/train.json", build_tokenizer(cfg), phase="train", version=2,
                               max_source_length=48, max_target_length=79)
    ids, labels = ms.Tensor(samples["input_ids"][:16]), ms.Tensor(samples["labels"][:16])
    trained = float(model(ids, labels).asnumpy())
    table = next(p for p in model.get_parameters() if p.name == TABLE)
    table.set_data(ms.Tensor(np.zeros(table.shape, np.float32)))
    assert trained < float(model(ids, labels).asnumpy()) - 0.01


@pytest.mark.slow
def test_predict_and_eval_need_only_the_prefix_file(tiny_ptuning, tiny_trained, tmp_path):
    """`--load_checkpoint prefix.ckpt` alone: the base comes from the file's record. The answer is the
    in-process model's (base + prefix named explicitly) and not the base model's."""
    from glm.build import build_model, build_tokenizer, generation_config, load_checkpoints
    from glm.config import apply_overrides, load_config

    proc = run_glm("--config", TINY2_PTUNING, "--run_mode", "predict", "--load_checkpoint", str(tiny_ptuning.weights),
                   "--output_dir", str(tmp_path / "p"), "--predict_data", PROMPT, DECODE)
    assert "not in the checkpoint" not in proc.stderr      # base + prefix: nothing is missing
    got = json.loads((tmp_path / "p" / "predict_results.jsonl").read_text(encoding="utf-8"))["response"]

    setup_context("CPU", 0)

    def build(config: str, checkpoints: str):
        cfg = apply_overrides(load_config(REPO / config), [DECODE])
        model, pet_settings = build_model(cfg, use_past=True, batch_size=1)
        load_checkpoints(model, checkpoints, pet_settings, required=True, run_mode="predict")
        return cfg, model

    cfg, model = build(TINY2_PTUNING, f"{tiny_trained.weights},{tiny_ptuning.weights}")
    tok = build_tokenizer(cfg)
    prompt = tok.build_generation_input(PROMPT)
    want = tok.decode(Generator(model).generate([prompt], generation_config(cfg, tok))[0])
    assert got == want and got.strip()
    # The prefix is in the answer: next-token logits differ from the base model's.
    _, base = build(TINY2, str(tiny_trained.weights))
    ids = ms.Tensor(np.array([prompt], np.int32))
    assert np.abs(model(ids).asnumpy() - base(ids).asnumpy()).max() > 0.05

    run_glm("--config", TINY2_PTUNING, "--run_mode", "eval", "--load_checkpoint", str(tiny_ptuning.weights),
            "--output_dir", str(tmp_path / "e"), "eval_dataset.max_eval_samples=2")
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["samples"] == 2 and metrics["empty_predictions"] == 0
    assert metrics["checkpoint"] == str(tiny_ptuning.weights)


@pytest.mark.slow
def test_dry_run_of_mindformers_ptuning2_config(tmp_path):
    """configs/glm2/run_glm2_6b_ptuning2.yaml (MindFormers' file, same keys and values) with only its paths
    overridden (and the device: this machine has no Ascend): the 6B model is built (deferred),
    128 x 28 x 2 x 2 x 128 prefix parameters train, and one masked training sample is shown."""
    from glm.config import load_config

    path = "configs/glm2/run_glm2_6b_ptuning2.yaml"
    cfg = load_config(path)
    assert cfg["model"]["arch"]["type"] == "ChatGLM2WithPtuning2"
    assert cfg["model"]["model_config"]["pet_config"] == {"pet_type": "ptuning2", "pre_seq_len": 128,
                                                          "prefix_projection": False, "projection_dim": 128,
                                                          "dropout_prob": 0.0}
    assert (cfg["lr_schedule"]["type"], cfg["lr_schedule"]["learning_rate"], cfg["optimizer"]["weight_decay"]) == \
        ("linear", 5e-3, 0.0)
    proc = run_glm("--config", path, "--run_mode", "finetune", "--dry_run", "--load_checkpoint", "random",
                   "--device_target", "CPU", "--output_dir", str(tmp_path), "train_dataset.data_loader.dataset_dir=data/sample/train.json",
                   "train_dataset.tokenizer.vocab_file=data/sample/tokenizer.model")
    assert "1,835,008 trainable (P-Tuning v2 prefix)" in proc.stdout
    assert 128 * 28 * 2 * 2 * 128 == 1_835_008
    assert "x -100, then" in proc.stdout and "+ eos" in proc.stdout and "问：" in proc.stdout
