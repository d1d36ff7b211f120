"""Logit processing, token choice and stop tracking for batched generation (numpy, model-agnostic).

Semantics follow Hugging Face ``generate`` where the MindFormers reference is quirky (reference_behaviour.md §3):

* the repetition penalty runs over each row's *real* tokens (prompt + generated so far), never over padding;
  the reference also penalised the pad id 0 because it scanned the whole padded row;
* removed tokens get ``-inf`` (not -50000) and top-p sees the whole vocabulary (not only the top 200);
* top-p keeps the smallest set of most-probable tokens whose cumulative probability reaches ``top_p``;
* several eos ids are supported (ChatGLM3 chat stops on ``[2, 64795, 64797]``).

Order of operations (as in HF): repetition penalty, then, only when sampling: temperature, top-k, top-p.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np

from glm import GLMError

# Slack when comparing a cumulative probability with top_p: the softmax's round-off must not decide whether a
# nucleus that reaches p exactly gets one extra token.
_TOP_P_EPS = 1e-6


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_generation_args(
    *, repetition_penalty: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> None:
    """Raise GLMError naming the first bad key."""
    if not (_is_real(repetition_penalty) and repetition_penalty > 0):
        raise GLMError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty!r}")
    if not (_is_real(temperature) and temperature > 0):
        raise GLMError(f"temperature must be > 0 (set do_sample: false for greedy decoding), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise GLMError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (_is_real(top_p) and 0 < top_p <= 1):
        raise GLMError(f"top_p must be in (0, 1] (1.0 = off), got {top_p!r}")


def apply_repetition_penalty(scores: np.ndarray, generated: Sequence[Sequence[int]], penalty: float) -> None:
    """In place: for each distinct token in a row's real tokens, score < 0 → ×penalty, score ≥ 0 → /penalty."""
    for b, tokens in enumerate(generated):
        if len(tokens) == 0:
            continue
        ids = np.unique(np.asarray(tokens, dtype=np.int64))  # each distinct token penalised once
        sel = scores[b, ids]
        scores[b, ids] = np.where(sel < 0, sel * penalty, sel / penalty)


def apply_top_k(scores: np.ndarray, top_k: int) -> None:
    """In place: keep the k largest scores per row (ties with the k-th are kept, as in HF), others → -inf."""
    vocab = scores.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        return
    kth = np.partition(scores, vocab - top_k, axis=-1)[:, vocab - top_k, None]
    scores[scores < kth] = -np.inf


def apply_top_p(scores: np.ndarray, top_p: float) -> None:
    """In place: keep the smallest most-probable set whose cumulative probability is >= top_p, others → -inf.

    A token is kept iff the probability mass of the tokens ranked above it is < top_p; the best is always kept.
    """
    if top_p >= 1.0:
        return
    order = np.argsort(-scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1).astype(np.float64)
    probs = _softmax(sorted_scores)
    mass_above = np.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_above < top_p - _TOP_P_EPS
    keep_sorted[:, 0] = True
    remove = np.zeros_like(keep_sorted)
    np.put_along_axis(remove, order, ~keep_sorted, axis=-1)
    scores[remove] = -np.inf


def process_logits(
    logits: np.ndarray,
    generated: Sequence[Sequence[int]],
    *,
    repetition_penalty: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = False,
) -> np.ndarray:
    """Return processed scores [B, V] (a float32 copy; ``logits`` is not modified).

    ``generated[b]`` is row b's real token list (prompt + generated so far, no padding). Temperature, top-k and
    top-p only apply when ``do_sample`` is true (greedy ignores them, like the reference).
    """
    validate_generation_args(
        repetition_penalty=repetition_penalty, temperature=temperature, top_k=top_k, top_p=top_p
    )
    scores = np.array(logits, dtype=np.float32, copy=True)
    if scores.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {scores.shape}")
    if len(generated) != scores.shape[0]:
        raise ValueError(f"{len(generated)} token rows for a batch of {scores.shape[0]} logits")
    if repetition_penalty != 1.0:
        apply_repetition_penalty(scores, generated, repetition_penalty)
    if do_sample:
        if temperature != 1.0:
            scores /= np.float32(temperature)
        apply_top_k(scores, int(top_k))
        apply_top_p(scores, float(top_p))
    return scores


def _softmax(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # an all -inf / NaN junk row yields NaN quietly; see check_finite
        x = x - np.max(x, axis=-1, keepdims=True)
        e = np.exp(x)
        return e / np.sum(e, axis=-1, keepdims=True)


def check_finite(scores: np.ndarray, active: Optional[np.ndarray] = None) -> None:
    """Raise GLMError if an active row has NaN logits or nothing left to choose (all -inf).

    NaN logits (fp16 overflow, a broken checkpoint) would otherwise decode as a silent token 0 or garbage.
    """
    check_finite_rows(np.isfinite(np.max(scores, axis=-1)), active)


def check_finite_rows(finite: np.ndarray, active: Optional[np.ndarray] = None) -> None:
    """`check_finite` on per-row flags (True = the row's best logit is finite), as computed in-graph."""
    bad = ~np.asarray(finite, dtype=bool)
    if active is not None:
        bad &= np.asarray(active, dtype=bool)
    rows = np.flatnonzero(bad)
    if rows.size:
        raise GLMError(f"generation: row {int(rows[0])} has NaN or all -inf logits; check the checkpoint and precision")


def choose_tokens(scores: np.ndarray, do_sample: bool, rng: np.random.Generator) -> np.ndarray:
    """Next token per row: argmax (greedy) or a draw from softmax(scores) using ``rng`` (seeded by the caller).

    Never raises on NaN rows (batch filler rows may legitimately hold junk); call ``check_finite`` on the
    rows that matter.
    """
    if not do_sample:
        return np.argmax(scores, axis=-1).astype(np.int64)
    probs = _softmax(np.asarray(scores, dtype=np.float64))
    cdf = np.cumsum(probs, axis=-1)
    # Inverse-CDF sampling, vectorised over the batch: first index whose cdf exceeds u·total.
    u = rng.random(probs.shape[0])[:, None] * cdf[:, -1:]
    idx = np.sum(cdf <= u, axis=-1)
    # Round-off can push idx past the last token with non-zero probability (e.g. a -inf tail): clamp to it.
    last_nonzero = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(idx, last_nonzero).astype(np.int64)


class StopCriteria:
    """Per-row finished flags for one ``generate`` call.

    A row finishes when it emits any eos id, when it has produced ``max_new_tokens`` tokens, or when
    prompt + generated reaches ``max_length``. At least one limit is required. Finished rows keep emitting
    ``pad_token_id`` until the whole batch is done. Usage::

        stop = StopCriteria(eos, [len(p) for p in prompts], max_new_tokens=256)
        while not stop.done:
            active = stop.active                      # rows whose token this step is real
            tokens = stop.step(choose_tokens(...))    # pad for rows that had already finished
    """

    def __init__(
        self,
        eos_token_id: Union[int, Sequence[int]],
        prompt_lengths: Sequence[int],
        *,
        max_new_tokens: Union[int, Sequence[int], None] = None,   # one limit, or one per row
        max_length: Optional[int] = None,
        pad_token_id: int = 0,
    ) -> None:
        ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
        if not ids:
            raise GLMError("eos_token_id must name at least one token id")
        if max_new_tokens is None and max_length is None:
            raise GLMError("generation needs max_new_tokens or max_length")
        if max_new_tokens is not None and np.any(np.asarray(max_new_tokens) <= 0):
            raise GLMError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        self.eos_ids = np.asarray(ids, dtype=np.int64)
        self.prompt_lengths = np.asarray(prompt_lengths, dtype=np.int64)
        if max_length is not None:
            too_long = np.flatnonzero(self.prompt_lengths >= max_length)
            if too_long.size:
                b = int(too_long[0])
                raise GLMError(
                    f"prompt {b} has {self.prompt_lengths[b]} tokens, which leaves no room under "
                    f"max_length {max_length}; raise max_length or shorten the prompt"
                )
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.finished = np.zeros(len(self.prompt_lengths), dtype=bool)
        self.num_generated = np.zeros(len(self.prompt_lengths), dtype=np.int64)

    @property
    def active(self) -> np.ndarray:
        """Rows still generating (a copy)."""
        return ~self.finished

    @property
    def done(self) -> bool:
        return bool(self.finished.all())

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Record one step's chosen tokens [B]; return them with pad in rows that had already finished."""
        tokens = np.asarray(tokens, dtype=np.int64)
        out = np.where(self.finished, self.pad_token_id, tokens)
        active = ~self.finished
        self.num_generated += active
        hit = active & np.isin(tokens, self.eos_ids)
        if self.max_new_tokens is not None:
            hit |= active & (self.num_generated >= self.max_new_tokens)
        if self.max_length is not None:
            hit |= active & (self.prompt_lengths + self.num_generated >= self.max_length)
        self.finished |= hit
        return out
