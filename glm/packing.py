"""Sequence packing of train samples into rows, and the static label budget of a run (issue 14).

Packing: every train sample is `length` real tokens followed by padding in a row of width W (= max_source +
max_target + 1). `pack_samples` places the samples, once at load time, into rows of the same width W by
first-fit in a seeded order (np.random.default_rng(seed).permutation: independent of the epoch, so every
epoch, rank and resumed run sees the same rows). A row carries, per position:

    input_ids  the samples' tokens one after another, then pad_id
    labels     each sample's own pre-shifted labels (never a label across a sample boundary), then -100
    positions  0, 1, ... restarting at every sample (0 on padding)
    segments   1, 2, ... numbering the samples of the row (0 on padding)

and the model lets a token attend to key j iff both are in the same nonzero segment and j <= i, so a packed
row computes exactly what its samples compute in rows of their own.

Label budget: the training graph keeps one static shape per run, so the label-only loss takes a fixed
number K of label positions per micro-batch. `label_budget` is the largest label count of any micro-batch
the run will read, rounded up to a multiple of 16; `select_labels` turns a batch into `label_rows`
(flat indices r * W + t, filler entries 0) and `label_ids` (filler -100).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from glm import GLMError
from glm.data import IGNORE_INDEX

PACKED_COLUMNS = ("positions", "segments")
BUDGET_MULTIPLE = 16


def sample_lengths(input_ids: np.ndarray, labels: np.ndarray, pad_id: int) -> np.ndarray:
    """Real tokens of each unpacked train row: through the last non-pad token or the token after the last
    label, whichever is later (an answer may hold pad_id itself, e.g. <unk> = 0, and still be trained on)."""
    n, width = input_ids.shape
    cols = np.arange(width)
    last_tok = np.where(input_ids != pad_id, cols, -1).max(axis=1) + 1 if width else np.zeros(n, np.int64)
    last_lab = np.where(labels != IGNORE_INDEX, cols, -2).max(axis=1) + 2 if width else np.zeros(n, np.int64)
    return np.minimum(np.maximum(last_tok, last_lab), width).astype(np.int64)


def padding_fraction(tokens: int, rows: int, width: int) -> float:
    return 1.0 - tokens / (rows * width) if rows * width else 0.0


def first_fit(lengths: np.ndarray, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, offset) of every sample: samples visited in a seeded random order, each put in the first row
    with room left (a new row when none has), at that row's current end."""
    n = len(lengths)
    if n and int(lengths.max()) > width:
        raise GLMError(f"a train sample of {int(lengths.max())} tokens does not fit a row of {width}")
    free = np.empty(n, np.int64)   # room left in each opened row (at most one row per sample)
    rows = 0
    row_of, offset = np.empty(n, np.int64), np.empty(n, np.int64)
    for i in np.random.default_rng(seed).permutation(n):
        length = int(lengths[i])
        fits = np.flatnonzero(free[:rows] >= length)
        r = int(fits[0]) if fits.size else rows
        if r == rows:
            free[r] = width
            rows += 1
        row_of[i], offset[i] = r, width - free[r]
        free[r] -= length
    return row_of, offset


def pack_samples(samples: dict[str, np.ndarray], lengths: np.ndarray, *, seed: int,
                 pad_id: int) -> dict[str, np.ndarray]:
    """Rows [R, W] of input_ids / labels / positions / segments (int32) holding every sample exactly once,
    plus `row_of` / `offset` [N] (where each sample went, for tests and tools)."""
    ids, labels = samples["input_ids"], samples["labels"]
    width = ids.shape[1]
    row_of, offset = first_fit(lengths, width, seed)
    n_rows = int(row_of.max()) + 1 if len(row_of) else 0
    out = {"input_ids": np.full((n_rows, width), pad_id, np.int32),
           "labels": np.full((n_rows, width), IGNORE_INDEX, np.int32),
           "positions": np.zeros((n_rows, width), np.int32),
           "segments": np.zeros((n_rows, width), np.int32)}
    # Segment numbers in the order samples sit in their row (by offset), 1-based.
    order = np.lexsort((offset, row_of))
    seg = np.empty(len(order), np.int64)
    if len(order):
        first = np.r_[True, row_of[order][1:] != row_of[order][:-1]]
        starts = np.flatnonzero(first)
        counts = np.diff(np.r_[starts, len(order)])
        seg[order] = np.arange(len(order)) - np.repeat(starts, counts) + 1
    for i in range(len(lengths)):
        r, o, n = int(row_of[i]), int(offset[i]), int(lengths[i])
        out["input_ids"][r, o:o + n] = ids[i, :n]
        out["labels"][r, o:o + n] = labels[i, :n]
        out["positions"][r, o:o + n] = np.arange(n)
        out["segments"][r, o:o + n] = seg[i]
    out["row_of"], out["offset"] = row_of.astype(np.int32), offset.astype(np.int32)
    return out


def packing_stats(lengths: np.ndarray, width: int, rows: int, packed: bool) -> dict:
    """data_stats.json's "packing" entry: samples, rows and the padding fraction before and after."""
    tokens, n = int(lengths.sum()), len(lengths)
    return {"enabled": packed, "samples": n, "rows": rows, "row_width": width, "tokens": tokens,
            "padding_before": round(padding_fraction(tokens, n, width), 4),
            "padding_after": round(padding_fraction(tokens, rows, width), 4)}


def format_packing(stats: dict) -> str:
    p = stats["packing"]
    before, after = 100 * p["padding_before"], 100 * p["padding_after"]
    if not p["enabled"]:
        return (f"  packing off: {p['samples']} samples in {p['rows']} rows of {p['row_width']} tokens, "
                f"padding {before:.1f}%{(' (' + p['why_off'] + ')') if p.get('why_off') else ''}")
    return (f"  packing: {p['samples']} samples -> {p['rows']} rows of {p['row_width']} tokens; "
            f"padding {before:.1f}% -> {after:.1f}%")


def round_budget(count: int) -> int:
    return max(BUDGET_MULTIPLE, -(-int(count) // BUDGET_MULTIPLE) * BUDGET_MULTIPLE)


def batch_label_counts(row_counts: np.ndarray, positions: Iterable[np.ndarray], batch_size: int) -> np.ndarray:
    """Label count of every batch of `batch_size` consecutive entries of each index array in `positions`
    (one array per epoch and shard, batches as the dataset cuts them; a short last batch included)."""
    out = []
    for idx in positions:
        counts = row_counts[idx]
        n_full = len(counts) // batch_size
        out.append(counts[:n_full * batch_size].reshape(n_full, batch_size).sum(axis=1))
        if len(counts) % batch_size:
            out.append(counts[n_full * batch_size:].sum(keepdims=True))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def select_labels(labels: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """(label_rows, label_ids), int32 [budget]: the flat index r * W + t of every position with a label, in
    row-major order, then filler entries (index 0, label -100) up to `budget`."""
    flat = labels.reshape(-1)
    where = np.flatnonzero(flat != IGNORE_INDEX)
    if len(where) > budget:
        raise GLMError(f"a batch has {len(where)} label positions, more than the run's label budget {budget} "
                       "(computed from the planned batches before training)")
    rows = np.zeros(budget, np.int32)
    ids = np.full(budget, IGNORE_INDEX, np.int32)
    rows[:len(where)] = where
    ids[:len(where)] = flat[where]
    return rows, ids
