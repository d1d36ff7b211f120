"""Sequence packing (glm/packing.py) and the label budget, on the shipped sample data: numpy only, no model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_data import SAMPLE, batches_of, section

from glm.packing import first_fit, pack_samples, sample_lengths, select_labels

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_train(**extra) -> dict:
    return section(SAMPLE / "train.json", src=48, tgt=79, **extra)


def build(sec: dict | None = None, pack: bool = True, **kw):
    from glm.data import build_dataset

    return build_dataset(sec or tiny_train(), batch_size=kw.pop("batch_size", 4), seq_length=kw.pop("seq_length", 128),
                         pack=pack, **kw)


def check_packed(rows: dict, samples: dict, lengths: np.ndarray) -> None:
    """Every sample exactly once, at its (row, offset), with its own tokens and labels, positions 0.. and
    segment k = its place in the row; everything else is padding."""
    ids, labels = samples["input_ids"], samples["labels"]
    covered = np.zeros(rows["input_ids"].shape, bool)
    for i, n in enumerate(lengths):
        r, o = rows["row_of"][i], rows["offset"][i]
        assert not covered[r, o:o + n].any(), f"sample {i} overlaps another"
        covered[r, o:o + n] = True
        np.testing.assert_array_equal(rows["input_ids"][r, o:o + n], ids[i, :n])
        np.testing.assert_array_equal(rows["labels"][r, o:o + n], labels[i, :n])
        np.testing.assert_array_equal(rows["positions"][r, o:o + n], np.arange(n))
        seg = rows["segments"][r, o]
        assert (rows["segments"][r, o:o + n] == seg).all()
        assert seg == 1 + int((rows["offset"][rows["row_of"] == r] < o).sum())
        assert (labels[i, n:] == -100).all() and (ids[i, n:] == 0).all()   # nothing of the sample is dropped
    assert (rows["segments"][~covered] == 0).all() and (rows["labels"][~covered] == -100).all()
    assert (rows["positions"][~covered] == 0).all() and (rows["input_ids"][~covered] == 0).all()
    # the labels of a row are exactly the union of its samples' labels: no label crosses a sample boundary
    assert (rows["labels"] != -100).sum() == (labels != -100).sum()


def test_pack_every_sample_once_with_its_own_tokens_and_deterministic():
    data = build(pack=False)
    samples = data.samples
    lengths = sample_lengths(samples["input_ids"], samples["labels"], 0)
    rows = pack_samples(samples, lengths, seed=0, pad_id=0)
    check_packed(rows, samples, lengths)
    again = pack_samples(samples, lengths, seed=0, pad_id=0)
    for k in rows:
        np.testing.assert_array_equal(rows[k], again[k])
    other = pack_samples(samples, lengths, seed=1, pad_id=0)
    assert not np.array_equal(other["row_of"], rows["row_of"])   # the seed decides the placement
    assert len(rows["input_ids"]) < 0.7 * len(samples["input_ids"])


def test_first_fit_fills_the_first_row_with_room():
    lengths = np.array([5, 4, 3, 6, 2])
    row_of, offset = first_fit(lengths, 8, seed=3)
    order = np.random.default_rng(3).permutation(5)
    free: list[int] = []
    for i in order:   # the rule, spelled out
        r = next((k for k, f in enumerate(free) if f >= lengths[i]), len(free))
        if r == len(free):
            free.append(8)
        assert (row_of[i], offset[i]) == (r, 8 - free[r])
        free[r] -= lengths[i]


def test_sample_lengths_keep_an_answer_token_equal_to_pad():
    ids = np.array([[5, 6, 0, 7, 2, 0, 0], [5, 0, 0, 0, 0, 0, 0]])
    labels = np.array([[-100, 0, 7, 2, -100, -100, -100], [-100] * 7])
    np.testing.assert_array_equal(sample_lengths(ids, labels, 0), [5, 1])


def test_dataset_batches_are_packed_rows_with_stats_and_resume_skip(capsys):
    data = build()
    assert data.packed and data.columns == ["input_ids", "labels", "positions", "segments"]
    n_rows = data.num_rows
    stats = data.stats["packing"]
    lengths = sample_lengths(data.samples["input_ids"], data.samples["labels"], 0)
    assert stats["samples"] == 300 == len(data.samples["input_ids"]) and stats["rows"] == n_rows < 300
    assert stats["padding_before"] == pytest.approx(1 - lengths.sum() / (300 * 128), abs=1e-4)
    assert stats["padding_after"] == pytest.approx(1 - lengths.sum() / (n_rows * 128), abs=1e-4)
    assert stats["padding_after"] < stats["padding_before"]
    assert f"packing: 300 samples -> {n_rows} rows of 128 tokens" in capsys.readouterr().out
    assert data.num_batches == n_rows // 4
    # MindSpore pipeline == numpy twin, new columns included; skip-on-resume drops whole batches of rows
    ms_batches = batches_of(data.for_epoch(2, 3))
    np_batches = list(data.iter_batches(2))
    assert len(ms_batches) == len(np_batches) - 3
    for a, b in zip(ms_batches, np_batches[3:]):
        for c in data.columns:
            np.testing.assert_array_equal(a[c], b[c])
    seen = np.concatenate([b["input_ids"] for b in np_batches])
    assert len({r.tobytes() for r in seen}) == len(seen)   # an epoch reads each row once


def test_packing_off_and_pad_labels_keep_one_sample_per_row():
    plain = build(pack=False)
    assert not plain.packed and plain.num_rows == 300 and plain.columns == ["input_ids", "labels"]
    assert plain.stats["packing"]["enabled"] is False
    assert plain.stats["packing"]["padding_after"] == plain.stats["packing"]["padding_before"]
    pads = build(tiny_train(ignore_pad_token_for_loss=False))
    assert not pads.packed and "ignore_pad_token_for_loss" in pads.stats["packing"]["why_off"]


def test_sharding_splits_rows_disjointly():
    shards = [build(num_shards=2, shard_id=r, epoch=1) for r in range(2)]
    ids = [np.concatenate([b["input_ids"] for b in s.iter_batches(1)]) for s in shards]
    a, b = ({r.tobytes() for r in x} for x in ids)
    assert not a & b and len(a) + len(b) == 2 * shards[0].batches_per_epoch() * 4


def test_label_budget_covers_every_batch_of_every_epoch_and_shard_and_ignores_resume_position():
    shards = [build(num_shards=2, shard_id=r, batch_size=3) for r in range(2)]
    k = shards[0].label_budget(3)
    assert k % 16 == 0 and k == shards[1].label_budget(3)
    most = max(int((b["labels"] != -100).sum()) for s in shards for e in range(3) for b in s.iter_batches(e))
    assert most <= k < most + 16   # tight: the largest batch, rounded up
    resumed = build(num_shards=2, shard_id=1, batch_size=3, epoch=2, skip_batches=5)
    assert resumed.label_budget(3) == k


def test_select_labels_round_trips():
    labels = np.full((3, 6), -100, np.int32)
    labels[0, 2:4], labels[2, 0], labels[2, 5] = [7, 8], 9, 0
    rows, ids = select_labels(labels, 16)
    assert rows.dtype == ids.dtype == np.int32 and rows.shape == ids.shape == (16,)
    np.testing.assert_array_equal(rows[:4], [2, 3, 12, 17])
    np.testing.assert_array_equal(ids[:4], [7, 8, 9, 0])
    assert (rows[4:] == 0).all() and (ids[4:] == -100).all()
    np.testing.assert_array_equal(labels.reshape(-1)[rows[:4]], ids[:4])
    with pytest.raises(Exception, match="label budget 3"):
        select_labels(labels, 3)


def test_conversations_pack_too():
    sec = section(SAMPLE / "chat_train.json", src=96, tgt=96, tok="ChatGLM3Tokenizer")
    sec["data_loader"]["format"] = "conversations"
    data = build(sec, batch_size=2, seq_length=None)
    assert data.packed and data.num_rows < len(data.samples["input_ids"])
    lengths = sample_lengths(data.samples["input_ids"], data.samples["labels"], 0)
    check_packed(data.rows, data.samples, lengths)


@pytest.mark.skipif(not (SHARED / "adgen" / "train.json").is_file(), reason="ADGEN train not in /work/shared/data")
def test_adgen_train_padding_report(tmp_path):
    """The numbers the issue asks for: ADGEN train (first 5000 lines), real ChatGLM3 tokenizer, 64/128."""
    lines = (SHARED / "adgen" / "train.json").read_text(encoding="utf-8").splitlines()[:5000]
    path = tmp_path / "train.json"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocab = SHARED / "tokenizers" / "chatglm3" / "tokenizer.model"
    data = build(section(path, tok="ChatGLM3Tokenizer", vocab=vocab), batch_size=8, seq_length=None)
    p = data.stats["packing"]
    print(json.dumps(p))
    assert p["rows"] < p["samples"] and p["padding_after"] < p["padding_before"]


# Packed rows vs one sample per row through the model (loss and gradients): tests/test_packing_train.py.
