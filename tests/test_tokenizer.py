"""Tokenizer tests. The real ChatGLM tokenizer and ADGEN live in ../shared (beside the checkout), never in the repo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from glm import GLMError
from glm.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_MODEL = SHARED / "data" / "tokenizers" / "chatglm2" / "tokenizer.model"
ADGEN_DEV = SHARED / "data" / "adgen" / "dev.json"
SAMPLE_MODEL = REPO / "data" / "sample" / "tokenizer.model"

needs_real = pytest.mark.skipif(not REAL_MODEL.is_file(), reason=f"real ChatGLM tokenizer not found at {REAL_MODEL}")
needs_adgen = pytest.mark.skipif(not ADGEN_DEV.is_file(), reason=f"ADGEN dev.json not found at {ADGEN_DEV}")


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(REAL_MODEL))


@pytest.fixture(scope="module")
def glm2():
    return ChatGLM2Tokenizer(REAL_MODEL)


@pytest.fixture(scope="module")
def glm3():
    return ChatGLM3Tokenizer(REAL_MODEL)


@needs_real
def test_real_special_ids(glm2, glm3):
    assert glm2.sp_vocab_size == 64789
    assert [glm3.special_tokens[t] for t in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")] == list(range(64789, 64794))
    assert [glm3.convert_tokens_to_ids(f"<|{r}|>") for r in ("system", "user", "assistant", "observation")] == \
        [64794, 64795, 64796, 64797]
    assert (glm2.vocab_size, glm3.vocab_size) == (64794, 64798)
    assert (glm2.eos_id, glm2.pad_id, glm2.prefix) == (2, 0, [64790, 64792])
    assert glm2.stop_token_ids == [2]
    assert glm3.stop_token_ids == [2, 64795, 64797]


@needs_real
def test_real_encode_known_ids(glm2, glm3):
    for tok in (glm2, glm3):
        assert tok.encode("你好", add_special_tokens=False) == [36474, 54591]
        assert tok.encode("你好") == [64790, 64792, 36474, 54591]
        assert tok.encode("晚上睡不着应该怎么办") == [64790, 64792, 30910, 32820, 54266, 31876, 35153]
    assert glm2.encode_batch(["你好", "晚上睡不着应该怎么办"], max_length=4) == \
        [[64790, 64792, 36474, 54591], [64790, 64792, 30910, 32820]]


@needs_real
def test_truncation_counts_specials(glm2):
    text = "晚上睡不着应该怎么办"
    assert glm2.encode(text, max_length=5) == [64790, 64792, 30910, 32820, 54266]
    assert glm2.encode(text, add_special_tokens=False, max_length=2) == [30910, 32820]
    assert len(glm2.encode(text, max_length=5, truncation=False)) == 7
    with pytest.raises(GLMError, match="max_length=1"):
        glm2.encode(text, max_length=1)


@needs_real
def test_glm2_build_prompt(glm2, sp):
    assert glm2.build_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："
    history = [("你好", "你好👋"), ("1+1=?", "2")]
    expected = ("[Round 1]\n\n问：你好\n\n答：你好👋\n\n[Round 2]\n\n问：1+1=?\n\n答：2\n\n"
                "[Round 3]\n\n问：晚上睡不着\n\n答：")
    assert glm2.build_prompt("晚上睡不着", history) == expected
    assert glm2.build_generation_input("晚上睡不着", history) == [64790, 64792] + sp.encode(expected)


@needs_real
def test_glm3_build_chat_input(glm3, sp):
    # The reference's documented example: [gMASK] sop <|user|> sp("\n") 你好 <|assistant|>.
    assert glm3.build_chat_input("你好") == [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
    tools = [{"name": "天气", "parameters": {"city": "北京"}}]
    history = [{"role": "system", "content": "你是助手", "tools": tools},
               {"role": "user", "content": "北京天气"},
               {"role": "assistant", "metadata": "天气", "content": "调用"},
               {"role": "observation", "content": "晴"}]
    expected = ([64790, 64792, 64794] + sp.encode("\n")
                + sp.encode("你是助手\n" + json.dumps(tools, indent=4, ensure_ascii=False))
                + [64795] + sp.encode("\n") + sp.encode("北京天气")
                + [64796] + sp.encode("天气\n") + sp.encode("调用")
                + [64797] + sp.encode("\n") + sp.encode("晴")
                + [64795] + sp.encode("\n") + sp.encode("谢谢") + [64796])
    assert glm3.build_chat_input("谢谢", history) == expected
    # (query, response) pairs are accepted too, so generation code can pass a GLM2-style history.
    assert glm3.build_generation_input("b", [("a", "x")]) == glm3.build_chat_input(
        "b", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(GLMError, match="unknown chat role 'tool'"):
        glm3.build_chat_input("x", role="tool")
    with pytest.raises(GLMError, match="unknown chat role 'bot'"):
        glm3.build_chat_input("x", [{"role": "bot", "content": "y"}])


@needs_real
def test_decode_skips_specials(glm2, glm3):
    ids = glm3.build_chat_input("你好") + [54591, 2, 0, 0]  # 54591 = "好"
    assert glm3.decode(ids) == "\n 你好好"
    assert glm3.decode(ids, skip_special_tokens=False) == "[gMASK]sop<|user|>\n 你好<|assistant|>好"
    assert glm2.decode([64790, 64792, 30910, 32820, 54266, 2, 0]) == "晚上睡不着"  # 54266 = "睡不着"
    with pytest.raises(GLMError, match="token id 64794 is outside"):
        glm2.decode([64794])
    with pytest.raises(GLMError, match="token id -100"):
        glm3.decode([5, -100])


def test_pad_left_and_right():
    tok = ChatGLM2Tokenizer(SAMPLE_MODEL)
    ids, lengths = tok.pad([[5, 6, 7], [8]], side="left")
    assert ids.dtype == np.int32 and ids.tolist() == [[5, 6, 7], [0, 0, 8]] and lengths.tolist() == [3, 1]
    ids, _ = tok.pad([[5, 6, 7], [8]], side="right", length=5)
    assert ids.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0]]
    with pytest.raises(GLMError, match="cannot pad a sequence of 3 tokens to length 2"):
        tok.pad([[5, 6, 7]], length=2)
    with pytest.raises(GLMError, match="side"):
        tok.pad([[5]], side="middle")


@needs_real
@needs_adgen
def test_adgen_dev_summaries_round_trip(glm2, glm3):
    summaries = [json.loads(line)["summary"] for line in ADGEN_DEV.read_text(encoding="utf-8").splitlines()]
    assert len(summaries) == 1070
    # The ChatGLM model normalises with the "identity" rule, so every summary round-trips, including the 300
    # with a literal "<UNK>": it is plain text (pieces ▁< UN K >), never sp's unk id 0, which decode drops as pad.
    assert sum("<UNK>" in s for s in summaries) == 300
    encoded = glm2.encode_batch(summaries)
    assert not any(0 in ids[2:] for ids in encoded)
    assert [glm2.decode(ids) for ids in encoded] == summaries
    assert [glm3.decode(ids) for ids in encoded] == summaries


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(GLMError, match="unknown tokenizer type 'GPT2Tokenizer'.*ChatGLM2Tokenizer"):
        load_tokenizer("GPT2Tokenizer", SAMPLE_MODEL)
    with pytest.raises(GLMError, match="nope.model' does not exist"):
        load_tokenizer("ChatGLM2Tokenizer", tmp_path / "nope.model")
    with pytest.raises(GLMError, match="is a directory"):
        load_tokenizer("ChatGLM2Tokenizer", tmp_path)
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"this is not a protobuf\x00\xff")
    with pytest.raises(GLMError, match="tokenizer.model' is not a sentencepiece model") as e:
        load_tokenizer("ChatGLM3Tokenizer", junk)
    assert "\n" not in str(e.value)


def test_sample_tokenizer_layout_and_round_trip():
    tok = load_tokenizer("ChatGLM3Tokenizer", SAMPLE_MODEL)
    sp = tok.sp
    n = sp.vocab_size()
    assert (sp.id_to_piece(0), sp.id_to_piece(1), sp.id_to_piece(2)) == ("<unk>", "<s>", "</s>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.special_tokens == {"[MASK]": n, "[gMASK]": n + 1, "[sMASK]": n + 2, "sop": n + 3, "eop": n + 4,
                                  "<|system|>": n + 5, "<|user|>": n + 6, "<|assistant|>": n + 7,
                                  "<|observation|>": n + 8}
    texts = []
    for name in ("train.json", "dev.json"):
        for line in (REPO / "data" / "sample" / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["content"], row["summary"]]
    assert len(texts) >= 600
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts
    # byte_fallback: text far outside the training data still round-trips instead of becoming <unk>.
    odd = "Ω 😀 [Round 9] abc"
    assert 0 not in tok.encode(odd) and tok.decode(tok.encode(odd)) == odd
