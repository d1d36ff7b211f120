"""Generation semantics on a tiny random model, in-process: seeded sampling, per-row eos stopping,
max_new_tokens / max_length, repetition penalty and the streaming callback."""

from __future__ import annotations

import numpy as np
import pytest

from glm import GLMError
from glm.generate import GenerationConfig, Generator
from glm.model.config import GLMConfig
from glm.model.glm import GLMForCausalLM
from glm.runtime import ms, setup_context

V, SEQ, ROWS = 160, 64, 3
NO_EOS = [-1]   # an id the model can never produce


@pytest.fixture(scope="module")
def gen3() -> Generator:
    setup_context("CPU", 0)
    ms.set_seed(7)
    cfg = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
                    ffn_hidden_size=96, padded_vocab_size=V, seq_length=SEQ, use_past=True, batch_size=ROWS)
    model = GLMForCausalLM(cfg)
    rng = np.random.default_rng(0)
    for p in model.get_parameters():   # random weights with clearly different logits between tokens
        if len(p.shape) > 1:
            p.set_data(ms.Tensor(rng.normal(0, 0.2, p.shape).astype(np.float32)))
    return Generator(model, use_cache=True)


def prompts(n: int = ROWS, lengths=(5, 11, 8, 3), seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, V, lengths[i % len(lengths)]).tolist() for i in range(n)]


def greedy(g: Generator, ps, **kw) -> list[list[int]]:
    return g.generate(ps, GenerationConfig(**{"max_new_tokens": 16, "eos_token_id": NO_EOS, **kw}))


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(gen3):
    ps = prompts()
    cfg = dict(max_new_tokens=16, eos_token_id=NO_EOS, do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    a = gen3.generate(ps, GenerationConfig(seed=11, **cfg))
    b = gen3.generate(ps, GenerationConfig(seed=11, **cfg))
    c = gen3.generate(ps, GenerationConfig(seed=12, **cfg))
    assert a == b
    assert all(len(r) == 16 for r in a + c)
    assert a != c
    # Sampling really samples: it is not the greedy path.
    assert a != greedy(gen3, ps)
    # top_k=1 sampling is greedy whatever the seed.
    k1 = {**cfg, "top_k": 1}
    assert gen3.generate(ps, GenerationConfig(seed=3, **k1)) == gen3.generate(ps, GenerationConfig(seed=4, **k1)) \
        == greedy(gen3, ps)


def _cut(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[:i]
    return row


def test_each_eos_id_stops_its_row_right_before_it_while_other_rows_continue(gen3):
    ps = prompts()
    free = greedy(gen3, ps, max_new_tokens=20)
    assert len({tuple(r) for r in free}) == ROWS, "rows should differ for this test to mean anything"
    # Row 0 stops at a token it greedily produces (at its first occurrence, k > 0) that row 1 never produces.
    k0 = next(k for k in range(1, 20) if free[0][k] not in free[0][:k] and free[0][k] not in free[1])
    t0 = free[0][k0]
    out = greedy(gen3, ps, max_new_tokens=20, eos_token_id=[t0])
    assert out[0] == free[0][:k0]
    assert out[1] == free[1]                     # row 1 ran on to the limit
    assert out[2] == _cut(free[2], {t0})
    # A second eos id: row 1 now stops at its own token, row 0 still at t0 (each id of the list counts).
    k1 = next(k for k in range(1, 20) if free[1][k] not in free[1][:k] and free[1][k] not in free[0][:k0 + 1])
    t1 = free[1][k1]
    out2 = greedy(gen3, ps, max_new_tokens=20, eos_token_id=[t0, t1])
    assert out2[0] == _cut(free[0], {t0, t1}) and len(out2[0]) <= k0
    assert out2[1] == free[1][:k1]
    assert out2[2] == _cut(free[2], {t0, t1})
    # eos at the very first step: an empty answer for that row only.
    first = free[0][0]
    out3 = greedy(gen3, ps, eos_token_id=[first])
    assert out3[0] == []
    assert out3[1] == _cut(free[1][:16], {first})


def test_max_new_tokens_and_max_length_are_honoured(gen3):
    ps = prompts()
    free = greedy(gen3, ps, max_new_tokens=20)
    for n in (1, 5, 13):
        out = greedy(gen3, ps, max_new_tokens=n)
        assert [len(r) for r in out] == [n] * ROWS
        assert out == [r[:n] for r in free]     # a shorter budget is a prefix of a longer one
    # max_length counts prompt + new tokens (like HF), for the longest prompt of the batch.
    longest = max(len(p) for p in ps)
    out = gen3.generate(ps, GenerationConfig(max_length=longest + 7, eos_token_id=NO_EOS))
    assert [len(r) for r in out] == [7] * ROWS and out == [r[:7] for r in free]
    # Both clamp to seq_length: the longest prompt + its new tokens fill the window exactly.
    out = greedy(gen3, ps, max_new_tokens=10_000)
    assert [len(r) for r in out] == [SEQ - longest] * ROWS
    out = gen3.generate(ps, GenerationConfig(max_length=10_000, eos_token_id=NO_EOS))
    assert [len(r) for r in out] == [SEQ - longest] * ROWS


def test_repetition_penalty_changes_the_output_and_reduces_repeats(gen3):
    ps = prompts()
    plain = greedy(gen3, ps, max_new_tokens=24)
    penalised = greedy(gen3, ps, max_new_tokens=24, repetition_penalty=5.0)
    assert plain != penalised

    def repeats(rows, ps):
        return sum(len(p) + len(r) - len(set(p) | set(r)) for p, r in zip(ps, rows))

    assert repeats(penalised, ps) < repeats(plain, ps)
    # The penalty sees prompt tokens too: with a huge penalty no row repeats a token of its prompt or output
    # while unseen tokens are left (V = 160 > prompt + 24).
    strict = greedy(gen3, ps, max_new_tokens=24, repetition_penalty=1e6)
    for p, r in zip(ps, strict):
        assert len(set(r)) == len(r) and not set(r) & set(p)


def test_streamer_sees_exactly_the_returned_tokens_in_order(gen3):
    ps = prompts(n=5)     # more prompts than rows: two chunks, the streamer's row index is global
    seen: list[tuple[int, int]] = []
    free = greedy(gen3, ps, max_new_tokens=12)
    eos = free[3][4]      # stop row 3 (second chunk) early, so rows have different lengths
    out = gen3.generate(ps, GenerationConfig(max_new_tokens=12, eos_token_id=[eos]),
                        streamer=lambda r, t: seen.append((r, t)))
    assert len(out[3]) <= 4 and len({len(r) for r in out}) > 1
    assert [[t for r, t in seen if r == i] for i in range(5)] == out
    assert eos not in [t for _, t in seen]
    assert len(seen) == sum(len(r) for r in out)
    # Tokens of a chunk arrive step by step (row 0's k-th token before row 1's (k+1)-th), chunks in order.
    first_chunk = [r for r, _ in seen if r < ROWS]
    assert first_chunk[:ROWS] == list(range(ROWS))
    assert max(i for i, (r, _) in enumerate(seen) if r < ROWS) < min(i for i, (r, _) in enumerate(seen) if r >= ROWS)


def test_prompt_errors_are_glm_errors(gen3):
    with pytest.raises(GLMError, match="prompt 1: it is empty"):
        greedy(gen3, [[5, 6], []])
    with pytest.raises(GLMError, match=f"prompt 0: {SEQ} tokens do not fit model.model_config.seq_length {SEQ}"):
        greedy(gen3, [[5] * SEQ])
    assert gen3.generate([], GenerationConfig(max_new_tokens=3)) == []
    # max_length counts the prompt: a prompt that fills it leaves no room, which is an error, not an empty answer.
    with pytest.raises(GLMError, match="prompt 1: 11 tokens leave no room for an answer under max_length 11"):
        gen3.generate(prompts(), GenerationConfig(max_length=11, eos_token_id=NO_EOS))
    assert [len(r) for r in gen3.generate(prompts(), GenerationConfig(max_length=12, eos_token_id=NO_EOS))] == [1] * 3


def test_nan_logits_are_a_glm_error_not_token_0(gen3):
    """A token whose embedding is NaN poisons the logits of the rows that read it (a broken checkpoint)."""
    emb = next(p for p in gen3.model.get_parameters() if p.name.endswith("embedding_table"))
    saved = emb.asnumpy().copy()
    ps = prompts()
    free = greedy(gen3, ps, max_new_tokens=6)

    def poison(token: int) -> None:
        table = saved.copy()
        table[token] = np.nan
        emb.set_data(ms.Tensor(table))

    try:
        # In a prompt: row 1's prefill logits are NaN; the error names that row instead of answering 0, 0, ...
        bad = ps[1][0]
        assert bad not in ps[0] + ps[2]
        poison(bad)
        with pytest.raises(GLMError, match="generation: row 1 has NaN or all -inf logits"):
            greedy(gen3, ps, max_new_tokens=6)
        # Generated: row 0's first new token is NaN, so its decode-step logits are (prefill was fine).
        t = free[0][0]
        assert t not in sum(ps, []) and t not in free[1][:1] + free[2][:1]
        poison(t)
        with pytest.raises(GLMError, match="generation: row 0 has NaN"):
            greedy(gen3, ps, max_new_tokens=6)
        # Rows that are not generating do not count: here the filler rows of the static batch read the NaN
        # token (it is the pad id) but the two real rows answer as before.
        poison(t := 7)
        two = ps[:2]
        assert t not in sum(two, []) + free[0] + free[1]
        assert greedy(gen3, two, max_new_tokens=6, pad_token_id=t) == free[:2]
    finally:
        emb.set_data(ms.Tensor(saved))
    assert greedy(gen3, ps, max_new_tokens=6) == free


def test_chunked_greedy_equals_one_step_at_a_time(gen3):
    """Greedy decoding runs several steps per graph call; it must give exactly the one-step tokens,
    including budgets that end mid-chunk, eos stops mid-chunk and the streamed order."""
    assert gen3.decode_chunk == 8   # 2 layers -> 16 // 2
    one = Generator(gen3.model, use_cache=True, decode_chunk=1)
    ps = prompts()
    for budget in (1, 7, 13, 21):
        assert greedy(gen3, ps, max_new_tokens=budget) == greedy(one, ps, max_new_tokens=budget)
    ref = greedy(one, ps, max_new_tokens=21)
    eos = ref[1][4]   # a token row 1 emits mid-way: rows stop on it at different steps
    streamed_chunked, streamed_one = [], []
    out = gen3.generate(ps, GenerationConfig(max_new_tokens=21, eos_token_id=[eos]),
                        streamer=lambda r, t: streamed_chunked.append((r, t)))
    assert out == one.generate(ps, GenerationConfig(max_new_tokens=21, eos_token_id=[eos]),
                               streamer=lambda r, t: streamed_one.append((r, t)))
    assert len(out[1]) == ref[1].index(eos) and eos not in out[1]
    assert streamed_chunked == streamed_one


def test_per_row_settings_match_each_prompt_alone_and_streamer_can_end_a_row(gen3):
    """The server batches requests with their own budgets, sampling settings and seeds: each row's answer
    is what it would get alone; a streamer returning True ends its row (stop string, gone client)."""
    ps = prompts()
    cfgs = [GenerationConfig(max_new_tokens=4, eos_token_id=NO_EOS),
            GenerationConfig(max_new_tokens=12, eos_token_id=NO_EOS, do_sample=True, temperature=1.5, seed=5),
            GenerationConfig(max_new_tokens=9, eos_token_id=NO_EOS, do_sample=True, top_p=0.9, seed=8)]
    together = gen3.generate(ps, cfgs)
    alone = [gen3.generate([p], [c])[0] for p, c in zip(ps, cfgs)]
    assert together == alone and [len(r) for r in together] == [4, 12, 9]
    assert together[0] == greedy(gen3, ps[:1], max_new_tokens=4)[0]
    seen: list[tuple[int, int]] = []

    def stop_row1_after_3(row: int, token: int) -> bool:
        seen.append((row, token))
        return row == 1 and sum(r == 1 for r, _ in seen) == 3

    cut = gen3.generate(ps, cfgs, streamer=stop_row1_after_3)
    assert cut[1] == together[1][:3] and cut[0] == together[0] and cut[2] == together[2]
    for row in range(3):
        assert [t for r, t in seen if r == row] == cut[row]
