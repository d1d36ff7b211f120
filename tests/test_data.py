"""ADGEN loading, KeyWordGen preprocessing and the MindSpore pipeline.

Expected ids are built here from raw sentencepiece calls and the written-out rules, never from glm.data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from glm import GLMError
from glm.data import format_stats, load_adgen, read_jsonl
from glm.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_MODEL = SHARED / "data" / "tokenizers" / "chatglm2" / "tokenizer.model"
ADGEN_DEV = SHARED / "data" / "adgen" / "dev.json"
SAMPLE = REPO / "data" / "sample"
GMASK, SOP, EOS = 64790, 64792, 2

needs_real = pytest.mark.skipif(not (REAL_MODEL.is_file() and ADGEN_DEV.is_file()),
                                reason=f"real ChatGLM tokenizer / ADGEN dev.json not found under {SHARED}")


def first_dev_rows(n: int) -> list[dict]:
    with open(ADGEN_DEV, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def section(path, phase="train", version=2, src=64, tgt=128, tok="ChatGLM2Tokenizer", vocab=SAMPLE / "tokenizer.model",
            **extra) -> dict:
    return {"data_loader": {"type": "ADGenDataLoader", "dataset_dir": str(path), "shuffle": True, "phase": phase,
                            "version": version, "origin_columns": ["content", "summary"]},
            "tokenizer": {"type": tok, "vocab_file": str(vocab)}, "input_columns": ["input_ids", "labels"],
            "max_source_length": src, "max_target_length": tgt, "ignore_pad_token_for_loss": True,
            "num_parallel_workers": 8, "python_multiprocessing": False, "drop_remainder": True, "batch_size": 1,
            "repeat": 1, "numa_enable": False, "prefetch_size": 1, "seed": 0, **extra}


# ---------------------------------------------------------------- preprocessing against the real tokenizer

@needs_real
@pytest.mark.parametrize("version,src,tgt", [(2, 64, 128), (3, 64, 128), (2, 20, 9), (3, 12, 5)])
def test_train_samples_field_by_field(version, src, tgt):
    sp = spm.SentencePieceProcessor(model_file=str(REAL_MODEL))
    tok = ChatGLM2Tokenizer(REAL_MODEL) if version == 2 else ChatGLM3Tokenizer(REAL_MODEL)
    records, samples, stats = load_adgen(ADGEN_DEV, tok, phase="train", version=version, max_source_length=src,
                                         max_target_length=tgt)
    L = src + tgt + 1
    assert samples["input_ids"].shape == samples["labels"].shape == (1070, L)
    assert samples["input_ids"].dtype == samples["labels"].dtype == np.int32
    for i, row in enumerate(first_dev_rows(4)):
        prompt = f"[Round 1]\n\n问：{row['content']}\n\n答：" if version == 2 else row["content"]
        a = [GMASK, SOP] + sp.encode(prompt)[:src - 2]
        b = sp.encode(row["summary"])[:tgt]
        ids, labels = samples["input_ids"][i].tolist(), samples["labels"][i].tolist()
        la, lb = len(a), len(b)
        assert ids == a + b + [EOS] + [0] * (L - la - lb - 1)
        assert labels == [-100] * (la - 1) + b + [EOS] + [-100] * (L - la - lb)
        # Pre-shifted: the label at t is the input at t + 1 wherever a label is set.
        t = np.flatnonzero(np.array(labels) != -100)
        assert (np.array(ids)[t + 1] == np.array(labels)[t]).all()
        assert EOS in ids  # survives truncation
    # The summaries of the first rows are longer than 9 / 5 tokens, so truncation really happened.
    if tgt < 10:
        assert stats["truncated_target"] > 1000 and stats["truncated_source"] > 1000


@needs_real
@pytest.mark.parametrize("version", [2, 3])
def test_eval_samples_field_by_field(version):
    sp = spm.SentencePieceProcessor(model_file=str(REAL_MODEL))
    tok = ChatGLM3Tokenizer(REAL_MODEL)
    src, tgt = 40, 24
    records, samples, stats = load_adgen(ADGEN_DEV, tok, phase="eval", version=version, max_source_length=src,
                                         max_target_length=tgt)
    # Truncated = cut by tokens, as in training (the reference's character cut is deliberately not copied).
    prompts = [f"[Round 1]\n\n问：{r.prompt}\n\n答：" if version == 2 else r.prompt for r in records]
    cut = sum(len(sp.encode(p)) > src - 2 for p in prompts)
    assert stats["truncated_source"] == cut and 0 < cut
    assert stats["truncated_target"] == sum(len(sp.encode(r.answer)) > tgt for r in records) > 1000
    assert stats["target_tokens"]["max"] == max(len(sp.encode(r.answer)) for r in records)
    assert samples["input_ids"].shape == (1070, src) and samples["labels"].shape == (1070, tgt)
    assert samples["index"].tolist() == list(range(1070))
    for i, row in enumerate(first_dev_rows(3)):
        prompt = f"[Round 1]\n\n问：{row['content']}\n\n答：" if version == 2 else row["content"]
        a = [GMASK, SOP] + sp.encode(prompt)[:src - 2]
        b = sp.encode(row["summary"])[:tgt]  # no [gMASK] sop on labels (deliberate deviation)
        assert samples["input_ids"][i].tolist() == a + [0] * (src - len(a))
        assert samples["labels"][i].tolist() == b + [0] * (tgt - len(b))
        assert (records[i].prompt, records[i].answer) == (row["content"], row["summary"])
        assert row["summary"].startswith(tok.decode(samples["labels"][i]))


# ---------------------------------------------------------------- file handling

def test_bad_files(tmp_path):
    with pytest.raises(GLMError, match="missing.json' does not exist"):
        read_jsonl(tmp_path / "missing.json")
    with pytest.raises(GLMError, match="is a directory"):
        read_jsonl(tmp_path)
    (tmp_path / "empty.json").write_bytes(b"")
    with pytest.raises(GLMError, match="empty.json' is empty"):
        read_jsonl(tmp_path / "empty.json")
    gbk = tmp_path / "gbk.json"
    gbk.write_bytes(b'{"content": "a", "summary": "b"}\n' * 2 + '{"content": "类型", "summary": "裙"}\n'.encode("gbk"))
    with pytest.raises(GLMError, match="gbk.json' line 3: not valid UTF-8") as e:
        read_jsonl(gbk)
    assert "\n" not in str(e.value)
    bad = write_lines(tmp_path / "bad.json", ["not json", '{"content": "a"}', '{"content": " ", "summary": "b"}'])
    with pytest.raises(GLMError, match="bad.json': no valid line"):
        read_jsonl(bad)


def test_skipped_lines_warn_once(tmp_path, capsys):
    ok = '{"content": "类型#裙", "summary": "好看"}'
    path = write_lines(tmp_path / "mixed.json", [ok, "{oops", ok, "", '{"content": "x", "summary": ""}',
                                                  '{"content": "x"}', "[1, 2]", ok, '{"summary": "y"}'])
    records, counts = read_jsonl(path)
    assert [r.line for r in records] == [1, 3, 8]
    assert counts == {"lines_read": 9, "skipped": {"blank_line": 1, "invalid_json": 2, "missing_key": 2,
                                                   "wrong_type": 0, "empty_value": 1}}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "skipped 6 of 9 lines" in err[0] and "first at lines 2, 4, 5, 6, 7" in err[0]


def test_origin_columns_and_bom(tmp_path):
    path = tmp_path / "custom.json"
    path.write_bytes("\ufeff".encode() + '{"q": "问题", "a": "回答", "extra": 1}\r\n'.encode())
    records, counts = read_jsonl(path, origin_columns=["q", "a"])
    assert (records[0].prompt, records[0].answer, counts["lines_read"]) == ("问题", "回答", 1)
    # A raw U+2028 inside a JSON string is not a line break.
    path.write_text('{"content": "a\u2028b", "summary": "c"}\n', encoding="utf-8")
    records, counts = read_jsonl(path)
    assert (records[0].prompt, counts["lines_read"]) == ("a\u2028b", 1)


def test_stats_on_crafted_file(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(SAMPLE / "tokenizer.model"))
    rows = [("类型#裙", "短"), ("类型#裙*颜色#红色*风格#复古*图案#格子*版型#宽松", "这款裙子，" * 6),
            ("类型#裤", "九分的长度露出脚踝"), ("类型#上衣*材质#棉", "好")]
    lines = [json.dumps({"content": c, "summary": s}, ensure_ascii=False) for c, s in rows] + ["{bad", ""]
    path = write_lines(tmp_path / "crafted.json", lines)
    src, tgt = 8, 6
    _, samples, stats = load_adgen(path, ChatGLM3Tokenizer(SAMPLE / "tokenizer.model"), phase="train", version=3,
                                   max_source_length=src, max_target_length=tgt)
    src_len = [2 + len(sp.encode(c)) for c, _ in rows]
    tgt_len = [len(sp.encode(s)) for _, s in rows]
    assert stats["lines_read"] == 6 and stats["skipped"]["invalid_json"] == 1 and stats["skipped"]["blank_line"] == 1
    assert stats["samples"] == 4 == len(samples["input_ids"])
    assert stats["truncated_source"] == sum(n > src for n in src_len) >= 1
    assert stats["truncated_target"] == sum(n > tgt for n in tgt_len) >= 1
    assert stats["source_tokens"]["max"] == max(src_len) and stats["target_tokens"]["max"] == max(tgt_len)
    assert stats["target_tokens"]["p50"] == int(np.percentile(tgt_len, 50))
    text = format_stats(stats)
    assert f"samples {len(rows)}" in text and "invalid_json 1" in text and f"/{max(src_len)};" in text


# ---------------------------------------------------------------- pipeline (uses the shipped sample data)

def batches_of(dataset) -> list[dict]:
    return list(dataset.create_dict_iterator(output_numpy=True, num_epochs=1))


def test_seq_length_and_config_errors():
    from glm.data import build_dataset

    with pytest.raises(GLMError, match=r"seq_length 192 .* 64 \+ 128 \+ 1 = 193"):
        build_dataset(section(SAMPLE / "train.json"), batch_size=1, seq_length=192)
    # a plain mapping gets the config loader's checks (the one place they live) ...
    with pytest.raises(GLMError, match="eval_dataset.data_loader.version: expected one of 2, 3, got 1"):
        build_dataset(section(SAMPLE / "dev.json", version=1), batch_size=1, where="eval_dataset")
    with pytest.raises(GLMError, match="train_dataset.max_source_length: expected a value >= 1, got 0"):
        build_dataset(section(SAMPLE / "dev.json", src=0), batch_size=1)
    # ... and what the run reads must be set
    with pytest.raises(GLMError, match="train_dataset.tokenizer.vocab_file: not set"):
        build_dataset({**section(SAMPLE / "dev.json"), "tokenizer": {"type": "ChatGLM2Tokenizer"}}, batch_size=1)


def test_pipeline_batches_match_numpy_twin():
    from glm.data import build_dataset

    data = build_dataset(section(SAMPLE / "train.json", src=48, tgt=40), batch_size=8, seq_length=89, epoch=1)
    assert data.num_parallel_workers == min(8, os.cpu_count())
    assert data.num_batches == 300 // 8 and data.columns == ["input_ids", "labels"]
    got = batches_of(data.dataset)
    want = list(data.iter_batches(epoch=1))
    assert len(got) == len(want) == data.num_batches
    for g, w in zip(got, want):
        assert g["input_ids"].dtype == np.int32 and g["labels"].shape == (8, 89)
        assert (g["input_ids"] == w["input_ids"]).all() and (g["labels"] == w["labels"]).all()


def eval_indices(data, epoch=0, skip=0) -> list[list[int]]:
    return [b["index"].tolist() for b in batches_of(data.for_epoch(epoch, skip))]


def test_shuffle_is_seeded_per_epoch():
    from glm.data import build_dataset

    sec = section(SAMPLE / "train.json", phase="eval", src=64, tgt=64)
    a, b = (build_dataset(sec, batch_size=10) for _ in range(2))
    e0 = eval_indices(a, 0)
    assert e0 == eval_indices(b, 0)  # same seed, same epoch: same order
    assert e0 != eval_indices(a, 1)  # new epoch: new order
    assert sorted(sum(e0, [])) == list(range(300))
    other = build_dataset({**sec, "seed": 7}, batch_size=10)
    assert eval_indices(other, 0) != e0
    # shuffle: false keeps file order
    plain = build_dataset({**sec, "data_loader": {**sec["data_loader"], "shuffle": False}}, batch_size=10)
    assert sum(eval_indices(plain), []) == list(range(300))


def test_sharding_is_disjoint_and_complete():
    from glm.data import build_dataset

    sec = section(SAMPLE / "train.json", phase="eval", src=64, tgt=64)
    shards = [build_dataset(sec, batch_size=5, num_shards=3, shard_id=r, epoch=2) for r in range(3)]
    seen = [sum(eval_indices(d, 2), []) for d in shards]
    assert all(d.num_batches == 20 and len(s) == 100 for d, s in zip(shards, seen))
    assert sorted(sum(seen, [])) == list(range(300))
    # Each rank reads every third position of the same epoch permutation.
    perm = np.random.default_rng(0 + 2).permutation(300)
    assert seen[1] == perm[1::3].tolist()


def test_uneven_shards_wrap_like_mindspore():
    from glm.data import build_dataset

    # 40 samples over 3 ranks: MindSpore pads each rank to ceil(40 / 3) = 14 by wrapping around.
    sec = section(SAMPLE / "dev.json", phase="eval", src=64, tgt=128, drop_remainder=False)
    shards = [build_dataset(sec, batch_size=4, num_shards=3, shard_id=r, epoch=5) for r in range(3)]
    seen = [sum(eval_indices(d, 5), []) for d in shards]
    assert [len(s) for s in seen] == [14, 14, 14] and set(sum(seen, [])) == set(range(40))
    assert all(d.num_batches == 4 for d in shards)
    for d, s in zip(shards, seen):
        assert sum((b["index"].tolist() for b in d.iter_batches(5)), []) == s
    with pytest.raises(GLMError, match="skip_batches 5: expected 0..4"):
        shards[0].for_epoch(5, 5)


def test_skip_batches_drops_the_first_k():
    from glm.data import build_dataset

    sec = section(SAMPLE / "train.json", phase="eval", src=64, tgt=64)
    data = build_dataset(sec, batch_size=7, num_shards=2, shard_id=1, epoch=3, skip_batches=4)
    full = eval_indices(data, 3)
    assert [b["index"].tolist() for b in batches_of(data.dataset)] == full[4:]
    assert [b["index"].tolist() for b in data.iter_batches(3, 4)] == full[4:]
    assert data.num_batches == len(full) == 150 // 7


def test_eval_records_and_multiprocessing():
    from glm.data import build_dataset

    sec = section(SAMPLE / "dev.json", phase="eval", version=3, src=64, tgt=128, python_multiprocessing=True,
                  num_parallel_workers=2)
    data = build_dataset(sec, batch_size=4, where="eval_dataset")
    rows = [json.loads(line) for line in (SAMPLE / "dev.json").read_text(encoding="utf-8").splitlines()]
    batch = batches_of(data.dataset)[0]
    for i, ids in zip(batch["index"], batch["labels"]):
        assert data.records[i].answer == rows[i]["summary"] == data.tokenizer.decode(ids)


def test_repeat_yields_the_epoch_twice_in_the_same_order_and_skip_counts_across_passes():
    from glm.data import build_dataset

    # 40 dev samples, batch 6, no drop: 7 batches per pass (6 x 6 + 4); repeat 2 -> 14 batches.
    sec = section(SAMPLE / "dev.json", phase="eval", src=64, tgt=128, drop_remainder=False, repeat=2)
    data = build_dataset(sec, batch_size=6, epoch=1)
    assert data.repeat == 2 and data.num_batches == 7     # num_batches stays per pass (the trainer multiplies)
    got = [b["index"].tolist() for b in batches_of(data.dataset)]
    # Expected order: epoch 1's seeded permutation cut into batches, then exactly the same batches again.
    perm = np.random.default_rng(0 + 1).permutation(40).tolist()
    one_pass = [perm[i:i + 6] for i in range(0, 40, 6)]
    assert [len(b) for b in one_pass] == [6] * 6 + [4]
    assert got == one_pass + one_pass
    assert [b["index"].tolist() for b in data.iter_batches(1)] == got
    # A resume skips batches of the repeated epoch: within the first pass the second pass stays whole,
    # and a skip past the first pass lands inside the second.
    for skip in (2, 7, 9, 14):
        assert eval_indices(data, 1, skip) == got[skip:], skip
        assert [b["index"].tolist() for b in data.iter_batches(1, skip)] == got[skip:], skip
    with pytest.raises(GLMError, match=r"skip_batches 15: expected 0..14 \(batches per epoch of this shard x repeat 2\)"):
        data.for_epoch(1, 15)
    # Train phase: twice the batches of repeat 1, identical contents pass by pass.
    train2 = build_dataset(section(SAMPLE / "train.json", src=48, tgt=40, repeat=2), batch_size=8, seq_length=89)
    train1 = build_dataset(section(SAMPLE / "train.json", src=48, tgt=40), batch_size=8, seq_length=89)
    b2, b1 = batches_of(train2.dataset), batches_of(train1.dataset)
    assert len(b1) == 37 and len(b2) == 74
    for g, w in zip(b2, b1 + b1):
        assert (g["input_ids"] == w["input_ids"]).all() and (g["labels"] == w["labels"]).all()


def test_build_dataset_prints_the_stats_exactly_once(capsys):
    from glm.data import build_dataset

    data = build_dataset(section(SAMPLE / "dev.json", phase="eval", src=40, tgt=18), batch_size=4)
    batches_of(data.dataset)
    data.for_epoch(1)
    out = capsys.readouterr().out
    assert out.count(f"data {SAMPLE / 'dev.json'} (eval v2)") == 1 and out.count("truncated: ") == 1
    assert out == format_stats(data.stats) + "\n"
    sp = spm.SentencePieceProcessor(model_file=str(SAMPLE / "tokenizer.model"))
    rows = [json.loads(line) for line in (SAMPLE / "dev.json").read_text(encoding="utf-8").splitlines()]
    src_len = [2 + len(sp.encode(f"[Round 1]\n\n问：{r['content']}\n\n答：")) for r in rows]
    tgt_len = [len(sp.encode(r["summary"])) for r in rows]
    assert data.stats["truncated_source"] == sum(n > 40 for n in src_len) > 0
    assert data.stats["truncated_target"] == sum(n > 18 for n in tgt_len) > 0
    assert f"truncated: source {sum(n > 40 for n in src_len)}, target {sum(n > 18 for n in tgt_len)}" in out


def test_shipped_sample_is_what_the_tools_regenerate(tmp_path):
    """data/sample/{train,dev}.json and tokenizer.model, regenerated with the commands of data/sample/README.md,
    are byte-identical: the data generator is seeded, and sentencepiece's BPE trainer is deterministic with
    num_threads=1 (train_tokenizer.py sets it), so the whole model file, not only its pieces, must match."""
    import subprocess
    import sys

    readme = (SAMPLE / "README.md").read_text(encoding="utf-8")
    assert "--train 300 --dev 40 --seed 1234" in readme and "--vocab-size 1000" in readme
    py = [sys.executable]
    subprocess.run(py + ["tools/make_sample_data.py", "--out", str(tmp_path), "--train", "300", "--dev", "40",
                         "--seed", "1234"], cwd=REPO, check=True, capture_output=True)
    subprocess.run(py + ["tools/train_tokenizer.py", "--data", str(tmp_path / "train.json"),
                         str(tmp_path / "dev.json"), "--out", str(tmp_path / "tokenizer.model"), "--vocab-size", "1000"],
                   cwd=REPO, check=True, capture_output=True)
    for name in ("train.json", "dev.json", "tokenizer.model"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name


def test_empty_reference_is_an_error_in_eval_and_a_skipped_line_in_train(tmp_path, capsys):
    ok = '{"content": "类型#裙", "summary": "好看"}'
    path = write_lines(tmp_path / "dev.json", [ok, '{"content": "类型#裤", "summary": "  "}', ok,
                                               '{"content": "类型#裙", "summary": ""}'])
    tok = ChatGLM2Tokenizer(SAMPLE / "tokenizer.model")
    kw = dict(version=2, max_source_length=32, max_target_length=16)
    with pytest.raises(GLMError) as e:
        load_adgen(path, tok, phase="eval", **kw)
    assert str(e.value) == (f"dataset file {str(path)!r} line 2: empty reference ('summary' is '  '); eval scores "
                            "every line against its reference: fill it in or remove the line")
    records, _, stats = load_adgen(path, tok, phase="train", **kw)
    assert [r.line for r in records] == [1, 3] and stats["skipped"]["empty_value"] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 2 of 4 lines (empty_value 2); first at lines 2, 4" in err[0]
    # An empty prompt (content) in eval is still only a skipped line: the reference is there.
    write_lines(path, [ok, '{"content": "", "summary": "好看"}'])
    records, _, stats = load_adgen(path, tok, phase="eval", **kw)
    assert [r.line for r in records] == [1] and stats["skipped"]["empty_value"] == 1
