"""Logit processing, token choice and stop criteria: hand-built vectors with exact expected values."""

from __future__ import annotations

import numpy as np
import pytest

from glm import GLMError
from glm.sampling import StopCriteria, check_finite, choose_tokens, process_logits


def _kept(scores: np.ndarray) -> list[int]:
    return np.flatnonzero(np.isfinite(scores)).tolist()


def test_repetition_penalty_math_and_pad_untouched():
    logits = np.array([[2.0, -1.0, 3.0, -4.0, 0.0, 5.0]], dtype=np.float32)
    # Row tokens: 1 (negative), 2 twice (positive, penalised once), 4 (zero). Pad id 0 is not in the row.
    out = process_logits(logits, [[2, 1, 2, 4]], repetition_penalty=2.0)
    np.testing.assert_array_equal(out, [[2.0, -2.0, 1.5, -4.0, 0.0, 5.0]])
    np.testing.assert_array_equal(logits, [[2.0, -1.0, 3.0, -4.0, 0.0, 5.0]])  # input not modified


def test_repetition_penalty_per_row_and_below_one():
    logits = np.array([[1.0, -1.0, 2.0], [1.0, -1.0, 2.0]], dtype=np.float32)
    out = process_logits(logits, [[0], [1, 2]], repetition_penalty=0.5)
    np.testing.assert_array_equal(out, [[2.0, -1.0, 2.0], [1.0, -0.5, 4.0]])
    out = process_logits(logits, [[], [2]], repetition_penalty=1.0)  # 1.0 = off, empty row fine
    np.testing.assert_array_equal(out, logits)


def test_greedy_ignores_sampling_knobs():
    logits = np.array([[0.1, 3.0, 2.0, -1.0]], dtype=np.float32)
    out = process_logits(logits, [[]], temperature=0.5, top_k=1, top_p=0.1, do_sample=False)
    np.testing.assert_array_equal(out, logits)


def test_temperature_scales():
    logits = np.array([[1.0, -2.0, 4.0]], dtype=np.float32)
    out = process_logits(logits, [[]], temperature=0.5, do_sample=True)
    np.testing.assert_allclose(out, [[2.0, -4.0, 8.0]])
    out = process_logits(logits, [[]], temperature=2.0, do_sample=True)
    np.testing.assert_allclose(out, [[0.5, -1.0, 2.0]])


def test_top_k_keeps_exactly_k():
    logits = np.array([[0.3, 2.0, -1.0, 5.0, 1.0, 4.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
    out = process_logits(logits, [[], []], top_k=3, do_sample=True)
    assert _kept(out[0]) == [1, 3, 5]
    assert _kept(out[1]) == [0, 1, 2]
    assert np.all(out[0, [0, 2, 4]] == -np.inf)
    np.testing.assert_array_equal(out[0, [1, 3, 5]], [2.0, 5.0, 4.0])
    assert _kept(process_logits(logits, [[], []], top_k=1, do_sample=True)[0]) == [3]
    assert len(_kept(process_logits(logits, [[], []], top_k=100, do_sample=True)[0])) == 6  # k >= V: no-op


@pytest.mark.parametrize("top_p,expected", [(0.5, [0]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (0.95, [0, 1, 2]),
                                            (0.96, [0, 1, 2, 3]), (0.01, [0]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_minimal_nucleus(top_p, expected):
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    # Shuffle the vocabulary order so the sort is exercised; positions map back through perm.
    perm = np.array([2, 0, 3, 1])
    logits = np.log(probs[perm]).astype(np.float32)[None, :]
    out = process_logits(logits, [[]], top_p=top_p, do_sample=True)
    kept_ids = sorted(int(np.flatnonzero(perm == i)[0]) for i in expected)
    assert _kept(out[0]) == kept_ids
    np.testing.assert_array_equal(out[0, kept_ids], logits[0, kept_ids])  # survivors untouched


def test_top_k_then_top_p_order():
    # top_k=3 first drops 0.05, so the renormalised probs are 0.5/0.95, 0.3/0.95 (sum 0.842), 0.15/0.95.
    # p=0.84 is then reached by two tokens; without top-k the first two only sum to 0.8 and three are kept.
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]])).astype(np.float32)
    assert _kept(process_logits(logits, [[]], top_k=3, top_p=0.84, do_sample=True)[0]) == [0, 1]
    assert _kept(process_logits(logits, [[]], top_p=0.84, do_sample=True)[0]) == [0, 1, 2]
    assert _kept(process_logits(logits, [[]], top_k=3, top_p=0.85, do_sample=True)[0]) == [0, 1, 2]


def test_greedy_is_argmax():
    scores = np.array([[0.1, 3.0, 2.0], [-5.0, -6.0, -4.0]], dtype=np.float32)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(choose_tokens(scores, False, rng), [1, 2])


def test_nan_or_all_masked_logits_fail_loudly():
    scores = np.array([[0.0, 1.0], [np.nan, 1.0], [-np.inf, -np.inf]], dtype=np.float32)
    with pytest.raises(GLMError, match="row 1 has NaN"):
        check_finite(scores)
    with pytest.raises(GLMError, match="row 2 has NaN or all -inf"):
        check_finite(scores, active=np.array([True, False, True]))
    check_finite(scores, active=np.array([True, False, False]))  # junk in inactive (filler) rows is ignored
    # choose_tokens itself does not raise, so filler rows cannot break a batch.
    assert choose_tokens(scores, True, np.random.default_rng(0))[0] in (0, 1)
    assert choose_tokens(scores, False, np.random.default_rng(0))[0] == 1


def test_sampling_reproducible_and_seed_dependent():
    flat = np.zeros((4, 1000), dtype=np.float32)
    a = choose_tokens(flat, True, np.random.default_rng(123))
    b = choose_tokens(flat, True, np.random.default_rng(123))
    c = choose_tokens(flat, True, np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int64 and a.shape == (4,)


def test_sampled_frequencies_match_softmax():
    probs = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    with np.errstate(divide="ignore"):
        row = np.log(probs).astype(np.float32)  # last token -inf: must never be drawn
    scores = np.repeat(row[None, :], 20000, axis=0)  # 20000 rows = 20000 independent draws in one call
    draws = choose_tokens(scores, True, np.random.default_rng(7))
    freq = np.bincount(draws, minlength=5) / len(draws)
    assert freq[4] == 0.0
    # Binomial std at n=20000 is <= 0.0036; 0.015 is > 4 sigma.
    np.testing.assert_allclose(freq, probs, atol=0.015)


def test_sampling_respects_filtered_tokens():
    logits = np.array([[1.0, 1.0, 1.0, 1.0]] * 500, dtype=np.float32)
    scores = process_logits(logits, [[]] * 500, top_k=2, do_sample=True)  # ties: all four kept (HF keeps ties)
    assert len(_kept(scores[0])) == 4
    logits[:, 2] = 2.0
    logits[:, 0] = 1.5
    scores = process_logits(logits, [[]] * 500, top_k=2, do_sample=True)
    draws = choose_tokens(scores, True, np.random.default_rng(0))
    assert set(draws.tolist()) == {0, 2}


def test_stop_criteria_multiple_eos_and_padding():
    # ChatGLM3 chat: stop on eos 2, <|user|> 64795, <|observation|> 64797.
    stop = StopCriteria([2, 64795, 64797], prompt_lengths=[5, 3, 4, 6], max_new_tokens=4, pad_token_id=0)
    assert not stop.done
    out = stop.step(np.array([10, 64795, 11, 12]))
    np.testing.assert_array_equal(out, [10, 64795, 11, 12])  # the stop token itself is still emitted
    np.testing.assert_array_equal(stop.finished, [False, True, False, False])
    out = stop.step(np.array([64797, 99, 2, 13]))
    np.testing.assert_array_equal(out, [64797, 0, 2, 13])  # finished row 1 now emits pad
    np.testing.assert_array_equal(stop.finished, [True, True, True, False])
    np.testing.assert_array_equal(stop.active, [False, False, False, True])
    stop.step(np.array([5, 5, 5, 14]))
    assert not stop.done
    out = stop.step(np.array([5, 5, 5, 15]))  # 4th token of row 3 hits max_new_tokens
    np.testing.assert_array_equal(out, [0, 0, 0, 15])
    assert stop.done
    np.testing.assert_array_equal(stop.num_generated, [2, 1, 2, 4])


def test_stop_criteria_single_eos_and_max_length():
    stop = StopCriteria(2, prompt_lengths=[3, 5], max_length=7)
    stop.step(np.array([9, 9]))
    np.testing.assert_array_equal(stop.finished, [False, False])
    stop.step(np.array([9, 9]))  # row 1: 5 + 2 = 7 = max_length
    np.testing.assert_array_equal(stop.finished, [False, True])
    stop.step(np.array([2, 9]))
    assert stop.done


def test_stop_criteria_errors():
    with pytest.raises(GLMError, match="max_new_tokens or max_length"):
        StopCriteria(2, [3])
    with pytest.raises(GLMError, match="prompt 1 has 8 tokens.*max_length 8"):
        StopCriteria(2, [3, 8], max_length=8)
    with pytest.raises(GLMError, match="max_new_tokens must be > 0"):
        StopCriteria(2, [3], max_new_tokens=0)
    with pytest.raises(GLMError, match="eos_token_id"):
        StopCriteria([], [3], max_new_tokens=1)


@pytest.mark.parametrize("kwargs,key", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
])
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(GLMError, match=f"^{key} must be"):
        process_logits(np.zeros((1, 4), dtype=np.float32), [[]], do_sample=True, **kwargs)
