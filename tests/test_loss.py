"""Label-only, chunked (fused linear) cross-entropy and packed rows: same loss and gradients as the full
computation.

The oracle is written here with plain ops: logits for every position of every row, log_softmax over the
whole vocabulary, mean over labels != -100, gradients by MindSpore's autodiff. Models are tiny and random
(std 0.3 so that the softmax is far from uniform and every gradient is clearly nonzero).
"""

from __future__ import annotations

import numpy as np
import pytest

from glm.model.config import GLMConfig
from glm.model.glm import GLMForCausalLM
from glm.model.lora import apply_lora
from glm.model.loss import ChunkedCrossEntropy, chunk_rows
from glm.runtime import ms, setup_context

L, H, NH, KV, F, V, SEQ = 2, 32, 4, 2, 48, 97, 32
TOL = 1e-5


@pytest.fixture(autouse=True)
def pynative():
    """PyNative: no graph compile per shape, so each test takes seconds (test_graph_mode_... compiles)."""
    setup_context("CPU", 1)
    yield
    setup_context("CPU", 0)


def tiny(seed: int = 0, **kw) -> GLMForCausalLM:
    cfg = GLMConfig(num_layers=L, hidden_size=H, num_attention_heads=NH, kv_channels=H // NH,
                    multi_query_group_num=KV, ffn_hidden_size=F, padded_vocab_size=V, seq_length=SEQ,
                    add_qkv_bias=True, **kw)
    net = GLMForCausalLM(cfg)
    rs = np.random.RandomState(seed)
    for p in net.get_parameters():
        if not p.name.endswith("_cache") and "layernorm" not in p.name:
            p.set_data(ms.Tensor(rs.normal(0, 0.3, p.shape).astype(np.float32)))
    net.set_train(True)
    return net


def batch(seed: int = 1, b: int = 3, s: int = 11):
    """ids [b, s] with trailing pad (0) and labels [b, s] with -100 on the prompt, the pad and the last token."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, V, (b, s)).astype(np.int32)
    labels = np.full((b, s), -100, np.int32)
    for r in range(b):
        n = s - r * 2                       # real tokens of row r
        ids[r, n:] = 0
        labels[r, 2 + r:n - 1] = ids[r, 3 + r:n]
    return ids, labels


def label_only(labels: np.ndarray, k: int):
    """(label_rows, label_ids) [k]: flat indices of the labelled positions, fillers point at row 0 with -100."""
    flat = labels.reshape(-1)
    where = np.nonzero(flat != -100)[0]
    rows, ids = np.zeros(k, np.int32), np.full(k, -100, np.int32)
    rows[:len(where)], ids[:len(where)] = where, flat[where]
    return rows, ids


def reference(net: GLMForCausalLM, ids, labels, positions=None, segments=None):
    """Full logits [B*S, V] + plain log_softmax CE (autodiff): the computation label-only must equal."""
    logits = net.logits(net.hidden_states(ids, positions, segments)).reshape(-1, V)
    labels = labels.reshape(-1)
    valid = (labels != -100).astype(ms.float32)
    logp = ms.ops.log_softmax(logits, -1)
    nll = -ms.ops.gather_elements(logp, 1, ms.ops.maximum(labels, 0).reshape(-1, 1)).reshape(-1)
    return (nll * valid).sum() / ms.ops.maximum(valid.sum(), 1.0)


class Objective(ms.nn.Cell):
    """scale * loss: the oracle (`reference`) or the model's own, dense or with label_rows."""

    def __init__(self, net: GLMForCausalLM, oracle: bool, scale: float = 1.0):
        super().__init__(auto_prefix=False)
        self.net, self.oracle, self.scale = net, oracle, scale

    def construct(self, ids, labels, rows=None, positions=None, segments=None):
        if self.oracle:
            loss = reference(self.net, ids, labels, positions, segments)
        else:
            loss = self.net(ids, labels, positions, segments, rows)
        return loss * self.scale


def grads(net: GLMForCausalLM, oracle: bool, *args, scale: float = 1.0):
    """(loss, {name: gradient}) of every trainable parameter, in graph mode."""
    params = net.trainable_params()
    tensors = [None if a is None else ms.Tensor(a) for a in args]
    loss, g = ms.value_and_grad(Objective(net, oracle, scale), None, params)(*tensors)
    return float(loss.asnumpy()) / scale, {p.name: x.asnumpy() for p, x in zip(params, g)}


def assert_same(got, want):
    assert abs(got[0] - want[0]) < TOL, (got[0], want[0])
    assert got[1].keys() == want[1].keys() and got[1]
    for name in want[1]:
        np.testing.assert_allclose(got[1][name], want[1][name], rtol=0, atol=TOL, err_msg=name)


def test_chunk_rows_follows_the_vocabulary():
    assert chunk_rows(65024) == 128
    assert chunk_rows(1 << 30) == 16
    assert chunk_rows(97) % 16 == 0


@pytest.mark.parametrize("chunk", [5, None])
def test_label_only_loss_and_every_gradient_equal_the_full_computation(chunk):
    """K = 32 (a multiple of 16 above the 21 labels, fillers included); chunk 5 does not divide K. The
    backward is checked under a scaled loss (loss scaling / token weights multiply dout)."""
    net = tiny()
    if chunk:
        net.loss = ChunkedCrossEntropy(chunk)
        net.set_train(True)
    ids, labels = batch()
    rows, label_ids = label_only(labels, 32)
    want = grads(net, True, ids, labels, scale=2.5)
    assert want[0] > 1.0 and min(np.abs(g).max() for g in want[1].values()) > 1e-3
    got = grads(net, False, ids, label_ids, rows, scale=2.5)
    assert_same(got, want)
    dense = grads(net, False, ids, labels, scale=2.5)        # every row, no label_rows
    assert_same(dense, want)


def test_eval_mode_gives_the_same_loss_chunked_and_label_only():
    net = tiny()
    ids, labels = batch()
    rows, label_ids = label_only(labels, 32)
    want = float(reference(net, ms.Tensor(ids), ms.Tensor(labels)).asnumpy())
    net.set_train(False)
    net.loss = ChunkedCrossEntropy(7)
    assert abs(float(net(ms.Tensor(ids), ms.Tensor(labels)).asnumpy()) - want) < TOL
    got = net(ms.Tensor(ids), ms.Tensor(label_ids), None, None, ms.Tensor(rows))
    assert abs(float(got.asnumpy()) - want) < TOL


def test_filler_rows_do_not_count_and_all_ignored_gives_zero():
    net = tiny()
    ids, labels = batch()
    rows, label_ids = label_only(labels, 32)
    small = grads(net, False, ids, label_ids, rows)
    rows48, ids48 = label_only(labels, 48)
    rows48[21:] = 5                      # fillers may point anywhere: their label is -100
    assert_same(grads(net, False, ids, ids48, rows48), small)
    none = np.full(32, -100, np.int32)
    loss, g = grads(net, False, ids, none, rows)
    assert loss == 0.0
    assert all(np.isfinite(x).all() and not x.any() for x in g.values())


@pytest.mark.parametrize("targets", [r".*output_layer$", r".*(query_key_value|output_layer)$"])
def test_lora_on_the_output_layer_too(targets):
    net = tiny()
    apply_lora(net, {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
                     "target_modules": targets})
    rs = np.random.RandomState(5)
    for p in net.trainable_params():     # B starts at 0: make the adapter matter
        p.set_data(ms.Tensor(rs.normal(0, 0.3, p.shape).astype(np.float32)))
    net.set_train(True)
    ids, labels = batch()
    rows, label_ids = label_only(labels, 32)
    want = grads(net, True, ids, labels)
    assert all(n.endswith(("lora_a", "lora_b")) for n in want[1])
    assert_same(grads(net, False, ids, label_ids, rows), want)


def test_ptuning_prefix_gradients():
    net = tiny(pet_config={"pet_type": "ptuning2", "pre_seq_len": 4, "prefix_projection": True,
                           "projection_dim": 16, "dropout_prob": 0.0})
    ids, labels = batch()
    rows, label_ids = label_only(labels, 32)
    want = grads(net, True, ids, labels)
    assert all(n.startswith("prefix_encoder.") for n in want[1])
    assert_same(grads(net, False, ids, label_ids, rows), want)


def test_graph_mode_train_step_equals_the_oracle():
    """The trainer compiles forward + backward with ms.jit (glm/train_step.py): same loss and gradients there,
    label-only with a chunk that does not divide K, under a scaled loss."""
    net = tiny()
    net.loss = ChunkedCrossEntropy(5)
    net.set_train(True)
    ids, labels = batch()
    rows, label_ids = label_only(labels, 32)
    want = grads(net, True, ids, labels, scale=3.0)
    params = net.trainable_params()
    step = ms.jit(ms.value_and_grad(Objective(net, False, 3.0), None, params))
    loss, g = step(ms.Tensor(ids), ms.Tensor(label_ids), ms.Tensor(rows))
    assert_same((float(loss.asnumpy()) / 3.0, {p.name: x.asnumpy() for p, x in zip(params, g)}), want)


def packed_and_separate(seed: int = 2, lengths=(5, 7, 4), width: int = 20):
    """Samples A, B, C (ids, pre-shifted labels with -100 on a prompt and the last token) as one packed row
    (positions restarting, segments 1, 2, 3, trailing pad 0) and as one padded row each."""
    rs = np.random.RandomState(seed)
    samples = []
    for n in lengths:
        ids = rs.randint(3, V, n).astype(np.int32)
        labels = np.full(n, -100, np.int32)
        labels[1:n - 1] = ids[2:]
        samples.append((ids, labels))
    packed = [np.zeros((1, width), np.int32), np.full((1, width), -100, np.int32),
              np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)]      # ids, labels, positions, segments
    alone = [np.zeros((len(lengths), width), np.int32), np.full((len(lengths), width), -100, np.int32)]
    at = 0
    for i, (ids, labels) in enumerate(samples):
        n = len(ids)
        packed[0][0, at:at + n], packed[1][0, at:at + n] = ids, labels
        packed[2][0, at:at + n], packed[3][0, at:at + n] = np.arange(n), i + 1
        alone[0][i, :n], alone[1][i, :n] = ids, labels
        at += n
    return packed, alone


@pytest.mark.parametrize("ptuning", [False, True])
def test_packed_row_equals_samples_in_separate_rows(ptuning):
    """Per-sample loss (label_rows of that sample only) and the gradients of the batch loss, packed vs one row
    per sample; with P-Tuning v2 every packed sample sees the whole prefix, as it does alone."""
    pet = {"pet_config": {"pet_type": "ptuning2", "pre_seq_len": 4, "prefix_projection": False,
                          "dropout_prob": 0.0}} if ptuning else {}
    net = tiny(**pet)
    (ids, labels, positions, segments), (ids1, labels1) = packed_and_separate()
    for sample in (1, 2, 3):
        mine = (segments.reshape(-1) == sample) & (labels.reshape(-1) != -100)
        rows, label_ids = label_only(np.where(mine, labels.reshape(-1), -100).reshape(1, -1), 16)
        got = net(*[ms.Tensor(a) for a in (ids, label_ids, positions, segments, rows)])
        rows1, label_ids1 = label_only(np.where(np.arange(3)[:, None] == sample - 1, labels1, -100), 16)
        want = net(ms.Tensor(ids1), ms.Tensor(label_ids1), None, None, ms.Tensor(rows1))
        assert abs(float(got.asnumpy()) - float(want.asnumpy())) < TOL
    want = grads(net, True, ids1, labels1)
    assert_same(grads(net, True, ids, labels, None, positions, segments), want)     # full logits
    rows, label_ids = label_only(labels, 16)
    assert_same(grads(net, False, ids, label_ids, rows, positions, segments), want)
