"""Packed rows train exactly like one sample per row: the same samples, packed (positions restarting,
attention blocked between samples) or not, give the same loss and gradient through TrainStep, on a small
random model and the shipped sample data (in-process, a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest
from test_packing import build

from glm.model.config import GLMConfig
from glm.model.glm import GLMForCausalLM
from glm.packing import round_budget, select_labels
from glm.runtime import ms, setup_context


def small_model(pet: dict | None = None) -> GLMForCausalLM:
    cfg = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
                    ffn_hidden_size=96, padded_vocab_size=2048, seq_length=128, pet_config=pet)
    model = GLMForCausalLM(cfg)
    rng = np.random.default_rng(0)
    for p in model.get_parameters():   # random weights with clearly different logits between tokens
        if len(p.shape) > 1:
            p.set_data(ms.Tensor(rng.normal(0, 0.2, p.shape).astype(np.float32)))
    return model


def grads_of(model: GLMForCausalLM, micro: tuple) -> tuple[float, list[np.ndarray]]:
    """(loss, gradients) of one micro-batch (input_ids, label_ids, positions, segments, label_rows), the
    arguments TrainStep passes, in that order."""
    fn = ms.value_and_grad(lambda *a: model(*a), None, model.trainable_params())
    loss, grads = fn(*(None if a is None else ms.Tensor(a) for a in micro))
    return float(loss), [g.asnumpy() for g in grads]


@pytest.fixture
def pynative():
    """PyNative for these few calls: no graph compilation (the graph path is what every CLI run takes)."""
    setup_context("CPU", 1)
    yield
    setup_context("CPU", 0)


PTUNING = {"pet_type": "ptuning2", "pre_seq_len": 4, "prefix_projection": False, "dropout_prob": 0.0}


@pytest.mark.parametrize("pet", [None, PTUNING], ids=["full", "ptuning2"])
def test_packed_rows_give_the_loss_and_gradient_of_the_same_samples_unpacked(pet, pynative):
    data = build(batch_size=3)
    rows = data.rows
    first = next(data.iter_batches(0))
    # The samples of the first packed batch, in their own unpacked rows.
    picked = [np.flatnonzero(rows["row_of"] == r) for r in data._epoch_rows(0, None)[:3]]
    picked = np.concatenate(picked)
    assert len(picked) > 3   # several samples share a row
    ids, labels = data.samples["input_ids"][picked], data.samples["labels"][picked]
    assert (labels != -100).sum() == (first["labels"] != -100).sum()

    model = small_model(pet)
    k = round_budget(max((labels != -100).sum(), (first["labels"] != -100).sum()))
    packed = (first["input_ids"], select_labels(first["labels"], k)[1], first["positions"], first["segments"],
              select_labels(first["labels"], k)[0])
    plain_rows, plain_ids = select_labels(labels, k)
    loss_p, grads_p = grads_of(model, packed)
    loss_u, grads_u = grads_of(model, (ids, plain_ids, None, None, plain_rows))
    assert np.isfinite(loss_p) and loss_p == pytest.approx(loss_u, abs=1e-5)
    scale = max(float(np.abs(g).max()) for g in grads_u)
    assert scale > 0
    assert max(float(np.abs(a - b).max()) for a, b in zip(grads_p, grads_u)) <= 1e-5 * max(1.0, scale)
    # and the dense (all positions) loss of the unpacked rows is that value too
    dense = float(model(ms.Tensor(ids), ms.Tensor(labels)).asnumpy())
    assert dense == pytest.approx(loss_u, abs=1e-5)
