"""P-Tuning v2 (pet_type: ptuning2): parity with THUDM's forward, cache == recompute, only the prefix trains,
prefix-only checkpoints, dry run of MindFormers' config, export.

The oracle is transformers' GlmForCausalLM (the ChatGLM2/3 function) with its key/value cache pre-filled
with the un-rotated prefix and explicit positions from 0 - THUDM's `past_key_values = get_prompt(...)`.
The prefix itself is computed here in numpy from the encoder's weights, as THUDM's PrefixEncoder does:
table [P, L*2*kv*hd] (-> Linear -> tanh -> Linear) -> [P, 2L, kv, hd], layer i keys = block 2i, values 2i+1.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the parity oracle (pip install -e '.[parity]')")
transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

from glm.generate import GenerationConfig, Generator  # noqa: E402
from glm.model.config import GLMConfig  # noqa: E402
from glm.model.glm import GLMForCausalLM, count_parameters  # noqa: E402
from glm.model.ptuning import TABLE  # noqa: E402
from glm.runtime import ms, setup_context  # noqa: E402
from glm.weights import hf_to_ms, load_weights_into  # noqa: E402

L, H, NH, KV, F, V, SEQ, P = 2, 64, 4, 2, 96, 160, 64, 6
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
    gen = GenerationConfig(max_new_tokens=12, eos_token_id=[-1])   # no eos: always 12 tokens
    chunked = Generator(cached, use_cache=True).generate(prompts, gen)
    stepwise = Generator(cached, use_cache=True, decode_chunk=1).generate(prompts, gen)
    recompute = Generator(full, use_cache=False).generate(prompts, gen)
    prefix = numpy_prefix(prefix_weights(True))
    oracle = []
    for p in prompts:
        seq = list(p)
        for _ in range(12):
            seq.append(int(hf_logits(hf, np.array([seq]), prefix)[0, -1].argmax()))
        oracle.append(seq[len(p):])
    assert chunked == stepwise == recompute == oracle
    assert len({tuple(t) for t in oracle}) == 3
