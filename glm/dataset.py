"""The MindSpore input pipeline for ADGEN, built from a `train_dataset` / `eval_dataset` YAML block.

Main path for the trainer: `build_dataset(...)` once, then `.dataset` (epoch given to build_dataset) or
`.for_epoch(epoch, skip_batches)` for later epochs; preprocessing runs once and every epoch only indexes numpy
arrays. `iter_batches` yields exactly the same batches without MindSpore (handy for tests and tools).

Batches are cut from `rows`: the samples themselves, or with `train_dataset.packing` (train phase only) the
packed rows of glm/packing.py, which add the columns `positions` and `segments`. Order is fully determined by
(seed, epoch, num_shards, shard_id, skip_batches) so a resumed run sees the same batches: shuffling is an
explicit permutation np.random.default_rng(seed + epoch) of the rows applied inside the source, and
GeneratorDataset itself never shuffles. With num_shards, GeneratorDataset gives rank r the positions
r, r + S, r + 2S, ... of that permutation, padded by wrapping around to ceil(N / S) rows per rank.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from glm import GLMError
from glm.chat_format import parse_reply, reply_text
from glm.data import IGNORE_INDEX, Record, format_stats, load_data
from glm.packing import (
    PACKED_COLUMNS,
    batch_label_counts,
    pack_samples,
    packing_stats,
    round_budget,
    sample_lengths,
)
from glm.runtime import ms  # sets GLOG_v before MindSpore is imported
from glm.settings import DatasetConfig
from glm.tokenizer import GLMTokenizer, load_tokenizer

ds = ms.dataset

TRAIN_COLUMNS = ["input_ids", "labels"]
EVAL_COLUMNS = ["input_ids", "labels", "index"]


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Sample order of one epoch: a seeded permutation, or 0..n-1."""
    if shuffle:
        return np.random.default_rng(seed + epoch).permutation(n)
    return np.arange(n)


def shard_positions(n: int, num_shards: int | None, shard_id: int | None) -> np.ndarray:
    """Positions (into the epoch order) read by one rank, mirroring GeneratorDataset's DistributedSampler."""
    if not num_shards:
        return np.arange(n)
    per_shard = -(-n // num_shards)
    return (np.arange(per_shard) * num_shards + shard_id) % n


class _Source:
    """Random-access source: item i = sample order[i] of the preprocessed arrays."""

    def __init__(self, arrays: list[np.ndarray], order: np.ndarray):
        self.arrays = arrays
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        j = self.order[i]
        return tuple(a[j] for a in self.arrays)


@dataclass
class AdgenDataset:
    """Preprocessed ADGEN data plus the batched MindSpore dataset for one epoch (of one shard)."""

    tokenizer: GLMTokenizer
    records: list[Record]  # raw (prompt, answer) text, indexed by the eval "index" column
    samples: dict[str, np.ndarray]  # int32 arrays over all samples, in file order
    stats: dict
    columns: list[str]  # ["input_ids", "labels"] for train (+ positions, segments when packed), + "index" for eval
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    drop_remainder: bool = True
    num_shards: int | None = None
    shard_id: int | None = None
    num_parallel_workers: int = 1
    python_multiprocessing: bool = False
    repeat: int = 1
    dataset: ds.Dataset | None = field(default=None, repr=False)
    num_batches: int = 0  # per epoch, per shard
    rows: dict[str, np.ndarray] | None = None  # what batches are cut from: the packed rows, or `samples`
    packed: bool = False

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = self.samples

    @property
    def num_rows(self) -> int:
        return len(self.rows["input_ids"])

    def prediction_text(self, tokens) -> str:
        """Generated tokens as text comparable with a record's answer: for conversations, a reply's metadata
        line is parsed ("tool\n{args}" for a tool call, the bare reply otherwise), as the reference is built."""
        text = self.tokenizer.decode(tokens)
        return reply_text(*parse_reply(text)) if self.stats.get("format") == "conversations" else text

    def _shard_size(self, shard_id: int | None = None) -> int:
        return len(shard_positions(self.num_rows, self.num_shards,
                                   self.shard_id if shard_id is None else shard_id))

    def batches_per_epoch(self) -> int:
        m = self._shard_size()
        return m // self.batch_size if self.drop_remainder else -(-m // self.batch_size)

    def _check_skip(self, skip_batches: int) -> None:
        total = self.batches_per_epoch() * self.repeat
        if not 0 <= skip_batches <= total:
            passes = f" x repeat {self.repeat}" if self.repeat > 1 else ""
            raise GLMError(f"skip_batches {skip_batches}: expected 0..{total} "
                           f"(batches per epoch of this shard{passes})")

    def for_epoch(self, epoch: int = 0, skip_batches: int = 0) -> ds.Dataset:
        """The batched MindSpore dataset of `epoch`, starting after its first `skip_batches` batches.

        With `repeat` R > 1 (never used by the shipped configs) an epoch is R identical passes over the same
        order (pass 1's batches, then the same batches again), and `skip_batches` counts from the start of the
        first pass (0..R x batches_per_epoch), as the trainer's step_in_epoch does when it resumes.
        """
        self._check_skip(skip_batches)
        order = epoch_order(self.num_rows, shuffle=self.shuffle, seed=self.seed, epoch=epoch)
        source = _Source([self.rows[c] for c in self.columns], order)
        data = ds.GeneratorDataset(source, column_names=self.columns, shuffle=False,
                                   num_shards=self.num_shards, shard_id=self.shard_id,
                                   num_parallel_workers=self.num_parallel_workers,
                                   python_multiprocessing=self.python_multiprocessing)
        if self.repeat > 1:
            # A skip before repeat() would be replayed by every pass: skip whole batches of the repeated stream.
            data = data.batch(self.batch_size, drop_remainder=self.drop_remainder).repeat(self.repeat)
            return data.skip(skip_batches) if skip_batches else data
        if skip_batches:
            data = data.skip(skip_batches * self.batch_size)  # skipping samples is cheaper than whole batches
        return data.batch(self.batch_size, drop_remainder=self.drop_remainder)

    def iter_batches(self, epoch: int = 0, skip_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Pure-numpy twin of `for_epoch` (same batches, same order, `repeat` passes included)."""
        self._check_skip(skip_batches)
        idx = self._epoch_rows(epoch, self.shard_id)
        per_pass = self.batches_per_epoch()
        for k in range(skip_batches, per_pass * self.repeat):
            b = k % per_pass
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield {c: self.rows[c][sel] for c in self.columns}

    def _epoch_rows(self, epoch: int, shard_id: int | None) -> np.ndarray:
        """The row indices one shard reads in `epoch`, in order (one pass)."""
        order = epoch_order(self.num_rows, shuffle=self.shuffle, seed=self.seed, epoch=epoch)
        return order[shard_positions(len(order), self.num_shards, shard_id)]

    def label_budget(self, epochs: int) -> int:
        """K of the label-only loss: the most labels any batch of epochs 0..epochs-1 holds, over every
        data-parallel shard (so all ranks, and a resumed run, compile the same graph), rounded up to a
        multiple of 16. Accumulation's micro-batches are these batches; `repeat` passes repeat them."""
        counts = (self.rows["labels"] != IGNORE_INDEX).sum(axis=1)
        per_pass = self.batches_per_epoch() * self.batch_size
        plans = (self._epoch_rows(epoch, shard if self.num_shards else None)[:per_pass]
                 for epoch in range(max(1, epochs)) for shard in range(self.num_shards or 1))
        sums = batch_label_counts(counts, plans, self.batch_size)
        return round_budget(int(sums.max()) if sums.size else 0)


def build_dataset(section: DatasetConfig | dict, *, batch_size: int, seq_length: int | None = None,
                  num_shards: int | None = None, shard_id: int | None = None, epoch: int = 0, skip_batches: int = 0,
                  where: str = "train_dataset", pack: bool = False) -> AdgenDataset:
    """Load, preprocess and batch the dataset described by a YAML block (`where` names it in errors).

    `pack`: the trainer passes `train_dataset.packing` here; every other reader (eval loss, perplexity,
    generation) reads one sample per row, whatever the block says (packing changes no result there).

    `section` is the loader's typed DatasetConfig (glm/settings.py: its keys are checked there, once); a
    plain mapping goes through the same loader checks first. `batch_size` overrides the block's own
    batch_size (as runner_config.batch_size does in the reference); `seq_length` is the model's, checked
    against max_source_length + max_target_length + 1 in train phase.
    """
    if not isinstance(section, DatasetConfig):
        from glm.settings import from_dict, schema_of
        from glm.validate import validate_section

        section = from_dict(DatasetConfig, validate_section(section, schema_of(DatasetConfig), where))
    loader, tok = section.data_loader, section.tokenizer
    lw = f"{where}.data_loader"
    for key_path, value in ((f"{lw}.dataset_dir", loader.dataset_dir), (f"{where}.tokenizer.vocab_file",
                                                                        tok.vocab_file)):
        if not value:
            raise GLMError(f"{key_path}: not set (the run reads it)")
    phase, max_src, max_tgt = loader.phase, section.max_source_length, section.max_target_length
    if phase == "train" and seq_length is not None and seq_length < max_src + max_tgt + 1:
        raise GLMError(f"model seq_length {seq_length} is smaller than {where}.max_source_length + "
                       f"max_target_length + 1 = {max_src} + {max_tgt} + 1 = {max_src + max_tgt + 1}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GLMError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if num_shards is not None and not (isinstance(shard_id, int) and 0 <= shard_id < num_shards):
        raise GLMError(f"shard_id {shard_id!r}: expected 0 <= shard_id < num_shards={num_shards}")

    tokenizer = load_tokenizer(tok.type, tok.vocab_file)
    records, samples, stats = load_data(
        loader.dataset_dir, tokenizer, phase=phase, version=loader.version, max_source_length=max_src,
        max_target_length=max_tgt, fmt=loader.format, columns=dataclasses.asdict(loader.columns),
        origin_columns=loader.origin_columns, where=lw, ignore_pad_token_for_loss=section.ignore_pad_token_for_loss)
    rows, packed = _rows(samples, stats, tokenizer, phase=phase, pack=pack, seed=section.seed,
                         ignore_pad=section.ignore_pad_token_for_loss)
    print(format_stats(stats), flush=True)

    data = AdgenDataset(
        tokenizer=tokenizer, records=records, samples=samples, stats=stats,
        rows=rows, packed=packed,
        columns=(TRAIN_COLUMNS + list(PACKED_COLUMNS) if packed else TRAIN_COLUMNS) if phase == "train"
        else EVAL_COLUMNS, batch_size=batch_size,
        shuffle=loader.shuffle, seed=section.seed, drop_remainder=section.drop_remainder,
        num_shards=num_shards, shard_id=shard_id,
        # Honour the YAML, but 8 workers on a 2-core box only add contention.
        num_parallel_workers=max(1, min(section.num_parallel_workers, os.cpu_count() or 1)),
        python_multiprocessing=section.python_multiprocessing, repeat=section.repeat)
    data.num_batches = data.batches_per_epoch()
    if data.num_batches == 0:
        unit = "packed rows" if packed else "samples"
        raise GLMError(f"{where}: {data._shard_size()} {unit} per shard make no full batch of {batch_size} "
                       f"(drop_remainder is true); lower the batch size or add data")
    data.dataset = data.for_epoch(epoch, skip_batches)
    return data


def _rows(samples: dict[str, np.ndarray], stats: dict, tokenizer: GLMTokenizer, *, phase: str, pack: bool,
          seed: int, ignore_pad: bool) -> tuple[dict[str, np.ndarray], bool]:
    """The rows batches are cut from (packed when `pack` and the layout allows it); records the
    "packing" entry of `stats` for train-phase data."""
    if phase != "train":
        return samples, False
    ids, labels = samples["input_ids"], samples["labels"]
    width = ids.shape[1]
    lengths = sample_lengths(ids, labels, tokenizer.pad_id)
    why_off = ""
    if pack and not ignore_pad:
        # The reference trains on the pad labels of every row; packing removes that padding, so it would
        # not be the same training: keep one sample per row.
        why_off, pack = "ignore_pad_token_for_loss is false: the pad labels are trained on", False
    if not pack:
        stats["packing"] = packing_stats(lengths, width, len(ids), False)
        if why_off:
            stats["packing"]["why_off"] = why_off
        return samples, False
    rows = pack_samples(samples, lengths, seed=seed, pad_id=tokenizer.pad_id)
    stats["packing"] = packing_stats(lengths, width, len(rows["input_ids"]), True)
    return rows, True
