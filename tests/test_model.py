"""Numerical parity of the GLM model with transformers' GlmForCausalLM (the same function as ChatGLM2/3).

A tiny random GlmForCausalLM is converted with the project's converter (glm.weights.hf_to_ms) and
must give the same logits, the same greedy tokens with and without the KV cache, and the same tokens
for a batch of prompts of different lengths as for each prompt alone.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the parity oracle (pip install -e '.[parity]')")
transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

from glm import GLMError  # noqa: E402
from glm.generate import GenerationConfig, Generator  # noqa: E402
from glm.model.config import GLMConfig  # noqa: E402
from glm.model.glm import GLMForCausalLM  # noqa: E402
from glm.runtime import ms, setup_context  # noqa: E402
from glm.weights import hf_to_ms, load_weights_into  # noqa: E402

L, H, NH, KV, F, V, SEQ = 2, 64, 4, 2, 96, 160, 96


def hf_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GlmConfig(
        num_hidden_layers=L, hidden_size=H, num_attention_heads=NH, num_key_value_heads=KV,
        intermediate_size=F, vocab_size=V, head_dim=H // NH, rms_norm_eps=1e-5, attention_bias=True,
        max_position_embeddings=256, pad_token_id=0, eos_token_id=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    model = transformers.GlmForCausalLM(cfg).float().eval()
    # transformers initialises with std 0.02: scale up so that logits differ clearly between tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


def our_model(hf, **kw) -> GLMForCausalLM:
    cfg = GLMConfig(num_layers=L, hidden_size=H, num_attention_heads=NH, kv_channels=H // NH,
                    multi_query_group_num=KV, ffn_hidden_size=F, padded_vocab_size=V, seq_length=SEQ, **kw)
    net = GLMForCausalLM(cfg)
    state = hf_to_ms({k: v.detach().numpy() for k, v in hf.state_dict().items()})
    load_weights_into(net, state)
    return net


@pytest.fixture(scope="module")
def models():
    setup_context("CPU", 0)
    hf = hf_model()
    return hf, our_model(hf, use_past=True, batch_size=3), our_model(hf, batch_size=3)


@pytest.fixture(scope="module")
def generators(models):
    """One generator per model, so every test reuses the compiled graphs."""
    _, cached, full = models
    return Generator(cached, use_cache=True), Generator(full, use_cache=False)


def prompts(n: int, lengths=(5, 17, 9), seed: int = 1) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    return [list(map(int, rs.randint(3, V, size))) for size in lengths[:n]]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_logits_match_transformers_fp32(models):
    hf, _, net = models
    for seed, shape in [(0, (2, 17)), (1, (1, 64)), (2, (3, 5))]:
        ids = np.random.RandomState(seed).randint(3, V, shape).astype(np.int32)
        with torch.no_grad():
            ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        out = net(ms.Tensor(ids)).asnumpy()
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < 1e-4
        assert np.abs(ref).max() > 1.0   # the comparison is not between near-zero numbers


def test_greedy_32_tokens_cache_equals_recompute_equals_oracle(models, generators):
    hf = models[0]
    gen = GenerationConfig(max_new_tokens=32, eos_token_id=[-1])   # no eos: always 32 tokens
    for p in prompts(3):
        with_cache = generators[0].generate([p], gen)[0]
        without = generators[1].generate([p], gen)[0]
        assert len(with_cache) == 32
        assert with_cache == without == hf_greedy(hf, p, 32)


def test_batch_of_different_lengths_equals_one_at_a_time(generators):
    gen = GenerationConfig(max_new_tokens=20, eos_token_id=[-1])
    ps = prompts(3)
    batched = generators[0].generate(ps, gen)
    alone = [generators[0].generate([p], gen)[0] for p in ps]
    assert batched == alone
    assert len({tuple(x) for x in batched}) == 3


def test_training_loss_is_mean_ce_over_shifted_labels(models):
    hf, _, net = models
    ids = np.random.RandomState(3).randint(3, V, (2, 12)).astype(np.int32)
    labels = np.full_like(ids, -100)
    labels[:, 4:11] = ids[:, 5:12]        # pre-shifted, as the data pipeline makes them
    labels[1, 8:] = -100
    with torch.no_grad():
        logits = hf(torch.tensor(ids, dtype=torch.long)).logits
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(labels, dtype=torch.long)
                                                .reshape(-1), ignore_index=-100).item()
    loss = float(net(ms.Tensor(ids), ms.Tensor(labels)).asnumpy())
    assert abs(loss - ref) < 1e-5


def test_graph_and_pynative_give_the_same_logits(models):
    hf, _, _ = models
    ids = np.random.RandomState(4).randint(3, V, (2, 10)).astype(np.int32)
    setup_context("CPU", 1)
    try:
        pynative = our_model(hf)(ms.Tensor(ids)).asnumpy()
    finally:
        setup_context("CPU", 0)
    graph = our_model(hf)(ms.Tensor(ids)).asnumpy()
    assert np.abs(graph - pynative).max() < 1e-5


@pytest.mark.parametrize("change, keys", [
    ({"hidden_size": 60}, "num_attention_heads (4) x kv_channels (16) must equal hidden_size (60)"),
    ({"multi_query_group_num": 3}, "multi_query_group_num (3) must divide num_attention_heads (4)"),
    ({"num_layers": 0}, "model.model_config.num_layers: expected a positive integer"),
    ({"compute_dtype": "float64"}, "model.model_config.compute_dtype"),
])
def test_bad_shapes_fail_at_build_time_naming_the_keys(change, keys):
    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
                ffn_hidden_size=32, padded_vocab_size=64, seq_length=16)
    with pytest.raises(GLMError) as e:
        GLMConfig.from_dict({**base, **change})
    assert keys in str(e.value)


def test_unknown_model_key_names_the_closest(capsys):
    with pytest.raises(GLMError, match=r"unknown key 'num_layer' \(did you mean 'num_layers'\?\)"):
        GLMConfig.from_dict({"num_layer": 2})


def test_bfloat16_on_cpu_falls_back_to_float32_with_one_warning(capsys):
    import glm.runtime as rt

    rt._warned_bf16 = False
    cfg = GLMConfig(num_layers=1, hidden_size=32, num_attention_heads=2, kv_channels=16, ffn_hidden_size=16,
                    padded_vocab_size=32, seq_length=8, compute_dtype="bfloat16", param_init_type="bfloat16")
    net = GLMForCausalLM(cfg)
    out = net(ms.Tensor(np.ones((1, 8), np.int32)))
    err = capsys.readouterr().err
    assert err.count("bfloat16") == 1 and "float32" in err
    assert out.dtype == ms.float32
    assert net.transformer.output_layer.weight.dtype == ms.float32
