"""ADGEN ROUGE/BLEU and perplexity: golden values, hand-computed cases, reference equivalence, edge cases."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import jieba
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from glm import GLMError
from glm.metrics import ADGENMetric, PerplexityMetric, _lcs_len, adgen_scores, rouge_from_words

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "adgen" / "dev.json"


def _f(p: float, r: float) -> float:
    return 2 * p * r / (p + r + 1e-8)


def _reference_scores(pred: str, label: str) -> dict:
    """The reference ADGENMetric's per-pair computation, verbatim (fresh Rouge per pair, library LCS)."""
    hyp, ref = " ".join(jieba.cut(pred)), " ".join(jieba.cut(label))
    s = Rouge().get_scores(hyp, ref)[0]
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    out = {k: round(s[k]["f"] * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")}
    out["bleu-4"] = round(bleu * 100, 4)
    return out


def test_golden_pair_from_research_notes():
    got = adgen_scores("这件衬衫的款式非常宽松，显瘦。", "这件衬衫的款式非常的宽松，利落的线条可以很好的隐藏身材上的小缺点。")
    assert got == {"rouge-1": 59.2593, "rouge-2": 34.4828, "rouge-l": 51.6129, "bleu-4": 19.8979}


def test_identical_strings_score_100():
    text = "简约而不简单的牛仔外套，白色的衣身十分百搭。"
    assert adgen_scores(text, text) == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}


def test_no_overlap_scores_0():
    assert adgen_scores("今天天气很好", "我们去吃饭吧") == dict.fromkeys(("rouge-1", "rouge-2", "rouge-l", "bleu-4"), 0.0)


def test_set_ngram_rouge_by_hand():
    # hyp tokens [a b c a], ref tokens [a b d].
    # unigram sets {a,b,c} vs {a,b,d}: overlap 2 -> P=2/3, R=2/3
    # bigram sets {ab,bc,ca} vs {ab,bd}: overlap 1 -> P=1/3, R=1/2
    # LCS over token lists (bag): "a b" = 2 -> P=2/4, R=2/3
    got = rouge_from_words("a b c a", "a b d")
    assert got["rouge-1"] == pytest.approx(_f(2 / 3, 2 / 3), abs=1e-12)
    assert got["rouge-2"] == pytest.approx(_f(1 / 3, 1 / 2), abs=1e-12)
    assert got["rouge-l"] == pytest.approx(_f(2 / 4, 2 / 3), abs=1e-12)
    assert round(got["rouge-1"] * 100, 4) == 66.6667
    assert round(got["rouge-2"] * 100, 4) == 40.0
    assert round(got["rouge-l"] * 100, 4) == 57.1429


def test_char_bleu_by_hand():
    # chars abcd vs abce: p1=3/4, p2=2/3, p3=1/2, p4=0/1 -> method3 gives 1/(2*1)=1/2; equal lengths -> BP=1.
    # BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** 0.25 = (1/8) ** 0.25. jieba keeps "abcd"/"abce" as one word each: ROUGE 0.
    got = adgen_scores("abcd", "abce")
    assert got["bleu-4"] == round((1 / 8) ** 0.25 * 100, 4) == 59.4604
    assert got["rouge-1"] == got["rouge-2"] == got["rouge-l"] == 0.0


def test_bleu_runs_on_characters_not_words():
    # Same words, one character changed inside a word: char BLEU stays high, word ROUGE-1 drops.
    got = adgen_scores("这件衬衫的款式非常宽松", "这件衬衫的款式非常宽大")
    assert got["bleu-4"] > 70
    assert got["rouge-1"] < got["bleu-4"]


def test_lcs_matches_plain_dp():
    rnd = random.Random(1)
    for _ in range(300):
        a = [rnd.choice("abcde") for _ in range(rnd.randint(0, 40))]
        b = [rnd.choice("abcde") for _ in range(rnd.randint(0, 40))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
        assert _lcs_len(a, b) == table[len(a)][len(b)]


# Whitespace runs, newlines, quotes after sentence ends and ellipses exercise rouge_chinese's sentence splitter.
TRICKY = [
    ("好看。“真的”！再见？", "好看！“真的。”再见"),
    ("第一句。\n \n第二句……还有......结尾", "第一句。第二句…… 结尾"),
    ("a.b 3.5% 的 面料? 是的", "面料 是 3.5% 的? 对"),
    ("  前后 有 空格  ", "前后有空格"),
]


@pytest.mark.parametrize("pred,label", TRICKY)
def test_identical_to_reference_on_tricky_text(pred, label):
    assert adgen_scores(pred, label) == _reference_scores(pred, label)


def test_identical_to_reference_on_adgen_dev():
    if not DEV.is_file():
        pytest.skip(f"ADGEN dev set not found at {DEV}")
    labels = [json.loads(line)["summary"] for line in DEV.read_text(encoding="utf-8").splitlines()[:150]]
    n = len(labels)
    preds = [labels[i][: len(labels[i]) // 2] + labels[(i + 7) % n][len(labels[(i + 7) % n]) // 2 :] for i in range(n)]
    for pred, label in zip(preds, labels):
        assert adgen_scores(pred, label) == _reference_scores(pred, label)


def test_metric_averages_per_sample():
    m = ADGENMetric()
    pairs = [("这件衬衫的款式非常宽松，显瘦。", "这件衬衫的款式非常的宽松，利落的线条可以很好的隐藏身材上的小缺点。"),
             ("abcd", "abce")]
    m.update([pairs[0][0]], [pairs[0][1]])
    m.update([pairs[1][0]], [pairs[1][1]])
    res = m.result()
    assert res["rouge-1"] == pytest.approx((59.2593 + 0.0) / 2)
    assert res["rouge-l"] == pytest.approx((51.6129 + 0.0) / 2)
    assert res["bleu-4"] == pytest.approx((19.8979 + 59.4604) / 2)
    assert res["samples"] == 2 and res["empty_predictions"] == 0
    assert [r["index"] for r in m.per_sample] == [0, 1]
    assert m.per_sample[1]["bleu-4"] == 59.4604
    assert m.warnings() == []


def test_empty_prediction_scores_zero_and_is_counted():
    m = ADGENMetric()
    text = "简约而不简单的牛仔外套"
    m.update([text, "  \n", ""], [text, text, text], indices=[10, 11, 12])
    res = m.result()
    assert res["samples"] == 3 and res["empty_predictions"] == 2
    assert res["rouge-1"] == pytest.approx(100 / 3)
    assert res["bleu-4"] == pytest.approx(100 / 3)
    assert [r["empty_prediction"] for r in m.per_sample] == [False, True, True]
    assert m.per_sample[2] == {"index": 12, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0,
                               "empty_prediction": True}
    assert m.warnings() == ["2 of 3 predictions were empty"]


def test_all_zero_scores_warn():
    m = ADGENMetric()
    m.update(["", "今天天气很好"], ["我们去吃饭吧", "我们去吃饭吧"])
    assert m.result()["rouge-l"] == 0.0
    assert m.warnings() == ["1 of 2 predictions were empty",
                            "all scores are 0 — check the checkpoint and the prompt format"]


def test_empty_reference_names_the_sample_and_leaves_metric_unchanged():
    m = ADGENMetric()
    m.update(["好看"], ["好看"])
    with pytest.raises(GLMError, match=r"^eval sample 17: the reference \(summary\) is empty$"):
        m.update(["好看", "好看"], ["好看", "   "], indices=[16, 17])
    assert m.samples == 1
    with pytest.raises(GLMError, match="eval sample 1: the reference"):
        m.update(["好看"], [""])  # default indices continue the running count; the failed batch used none


def test_mismatched_lengths_and_no_samples():
    m = ADGENMetric()
    with pytest.raises(GLMError, match="2 predictions but 1 references"):
        m.update(["a", "b"], ["a"])
    with pytest.raises(GLMError, match="no samples were scored"):
        m.result()
    assert m.warnings() == ["no predictions were scored"]


def test_perplexity():
    m = PerplexityMetric()
    m.update(loss_sum=10 * math.log(3), num_tokens=10)
    m.update(loss_sum=30 * math.log(3), num_tokens=30)
    res = m.result()
    assert res["tokens"] == 40
    assert res["loss"] == pytest.approx(math.log(3))
    assert res["perplexity"] == pytest.approx(3.0)
    m.reset()
    m.update(2.0, 1)
    m.update(0.0, 3)
    assert m.result()["perplexity"] == pytest.approx(math.exp(0.5))
    m.update(1e6, 1)
    assert m.result()["perplexity"] == math.inf
    with pytest.raises(GLMError, match="no target tokens"):
        PerplexityMetric().result()
    with pytest.raises(GLMError, match="num_tokens"):
        m.update(1.0, -1)
