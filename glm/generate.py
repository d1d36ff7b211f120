"""Batched text generation over the model's static KV cache (or full recompute, for reference).

Prompts of different lengths share one batch: they are right-padded, the prefill returns each row's
logits at its own last token, and every decode step writes each row at its own position. Rows that
finished keep running (the batch shape is static) but their tokens are discarded.

Each prompt may carry its own `GenerationConfig` (the server batches requests with different sampling
settings, budgets and seeds), and the streamer may end a row early by returning True (a stop string was
produced, or the client went away).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Union

import numpy as np

from glm import GLMError
from glm.model.glm import CachedStep, GLMForCausalLM, GreedyChunk, LastLogits
from glm.runtime import ms
from glm.sampling import StopCriteria, check_finite, check_finite_rows, choose_tokens, process_logits


@dataclass
class GenerationConfig:
    max_new_tokens: Optional[int] = None
    max_length: Optional[int] = None          # prompt + new tokens, as in HF; clamped to seq_length
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: list = field(default_factory=lambda: [2])
    pad_token_id: int = 0
    seed: int = 0
    vocab_size: Optional[int] = None   # the tokenizer's: ids from here up (the model's padding rows) are never chosen


# streamer(row, token) -> True ends that row now (its token is kept); None/False goes on.
Streamer = Callable[[int, int], Optional[bool]]


def _is_greedy(gen: GenerationConfig) -> bool:
    """Argmax decoding: no sampling (or sampling among top_k=1, as the reference's eval YAMLs do)."""
    return (not gen.do_sample or gen.top_k == 1) and gen.repetition_penalty == 1.0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Generator:
    """Greedy/sampled decoding for a `GLMForCausalLM`.

    With `use_cache` the model must have been built with `use_past=True`; its `batch_size` is the
    number of rows decoded together (longer prompt lists are processed in chunks). Prompt lengths are
    padded up to a multiple of `bucket` so graph mode compiles a handful of shapes, not one per length.

    Greedy decoding without a repetition penalty runs `decode_chunk` steps per graph call
    (`GreedyChunk`); everything else - sampling, penalties - goes one step at a time through the
    host-side logit processing. `decode_chunk` defaults to 16 // num_layers (1 for real-size models,
    whose per-call overhead is negligible next to their kernels).
    """

    def __init__(self, model: GLMForCausalLM, use_cache: bool = True, bucket: int = 64,
                 decode_chunk: Optional[int] = None):
        self.model = model
        self.cfg = model.config
        self.use_cache = use_cache
        self.bucket = bucket
        self.rows = self.cfg.batch_size
        self.decode_chunk = max(1, 16 // self.cfg.num_layers) if decode_chunk is None else int(decode_chunk)
        self._greedy: Optional[GreedyChunk] = None
        model.set_train(False)
        if use_cache:
            self.step = CachedStep(model)
            # P-Tuning v2: the prefill also writes the prefix into the cache (a second graph only then).
            self.prefill = CachedStep(model, prefill=True) if model.prefix_len else self.step
        else:
            self.full = LastLogits(model)

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[list[int]], gen: Union[GenerationConfig, Sequence[GenerationConfig]],
                 streamer: Optional[Streamer] = None) -> list[list[int]]:
        """Return the new tokens of every prompt (eos excluded). `streamer(row, token)` sees each token and
        may return True to finish that row. `gen` is one config for all prompts, or one per prompt (each
        row then draws from its own generator seeded with its own `seed`)."""
        if not prompts:
            return []
        per_row = not isinstance(gen, GenerationConfig)
        gens = list(gen) if per_row else [gen] * len(prompts)
        if len(gens) != len(prompts):
            raise GLMError(f"generate: {len(gens)} generation configs for {len(prompts)} prompts")
        shared = None if per_row else np.random.default_rng(gen.seed)
        outputs: list[list[int]] = []
        for start in range(0, len(prompts), self.rows):
            chunk = prompts[start:start + self.rows]
            chunk_gens = gens[start:start + self.rows]
            rngs = [shared] * len(chunk) if shared is not None else \
                [np.random.default_rng(g.seed) for g in chunk_gens]
            cb = None
            if streamer is not None:
                cb = (lambda off: (lambda r, t: streamer(r + off, t)))(start)
            outputs.extend(self._generate_chunk(chunk, chunk_gens, rngs, cb, per_row))
        return outputs

    def warm_up(self, gen: GenerationConfig) -> None:
        """Compile the prefill, the one-step decode and the greedy chunk now (graph mode compiles on first
        use), so that the first user of a chat or a server does not wait for them."""
        prompt = [[gen.pad_token_id + 1] * 4] * self.rows
        self.generate(prompt, replace(gen, do_sample=False, max_new_tokens=self.decode_chunk + 2, max_length=None))
        self.generate(prompt, replace(gen, do_sample=True, top_k=0, max_new_tokens=2, max_length=None))

    # ------------------------------------------------------------------ internals
    def budget(self, prompt: Sequence[int], gen: GenerationConfig, index: int = 0) -> int:
        """New tokens `prompt` may get under `gen` and seq_length; GLMError (naming prompt `index`) if none."""
        limit = self.cfg.seq_length
        if not prompt:
            raise GLMError(f"prompt {index}: it is empty after tokenization")
        if len(prompt) >= limit:
            raise GLMError(f"prompt {index}: {len(prompt)} tokens do not fit model.model_config.seq_length "
                           f"{limit} (at least one new token is needed)")
        if gen.max_new_tokens is not None:
            return max(0, min(gen.max_new_tokens, limit - len(prompt)))
        max_length = min(gen.max_length or limit, limit)
        if len(prompt) >= max_length:   # silently answering nothing would look like a model that says nothing
            raise GLMError(f"prompt {index}: {len(prompt)} tokens leave no room for an answer under max_length "
                           f"{max_length} (model.model_config.max_decode_length); raise it or shorten the prompt")
        return max_length - len(prompt)

    def _generate_chunk(self, prompts, gens, rngs, streamer, per_row: bool) -> list[list[int]]:
        n = len(prompts)
        budgets = [self.budget(p, g, i) for i, (p, g) in enumerate(zip(prompts, gens))]
        if not per_row:   # one config: the budget is the longest prompt's, for every row (as before)
            budgets = [min(budgets)] * n
        pad = gens[0].pad_token_id
        rows = prompts + [[pad]] * (self.rows - n)     # fill the static batch
        lengths = np.array([len(p) for p in rows], np.int32)
        seqs = [list(map(int, p)) for p in rows]
        new: list[list[int]] = [[] for _ in range(n)]
        if max(budgets) == 0:
            return new
        limits = np.array(budgets + [1] * (self.rows - n), np.int64)
        stop = StopCriteria(gens[0].eos_token_id, lengths, max_new_tokens=np.maximum(limits, 1), pad_token_id=pad)
        stop.finished[n:] = True
        stop.finished[:n] |= limits[:n] == 0
        eos = set(int(e) for e in gens[0].eos_token_id)
        groups = _setting_groups(gens, self.rows)
        logits = self._first_logits(rows, lengths)
        chunked = self.use_cache and self.decode_chunk > 1 and all(_is_greedy(g) for g in gens)
        while True:
            if gens[0].vocab_size and gens[0].vocab_size < logits.shape[-1]:
                logits = logits[:, :gens[0].vocab_size]   # untrained padding rows of the head are not tokens
            check_finite(logits, stop.active)   # NaN logits would otherwise decode as token 0
            chosen = np.zeros(self.rows, np.int64)
            for g, members in groups:
                # One group (one config for all rows, the usual case): no per-step copy of the logits.
                whole = len(members) == self.rows
                scores = process_logits(logits if whole else logits[members],
                                        seqs if whole else [seqs[r] for r in members],
                                        repetition_penalty=g.repetition_penalty, temperature=g.temperature,
                                        top_k=g.top_k, top_p=g.top_p, do_sample=g.do_sample)
                if g.do_sample and per_row:   # each row its own draw: independent of its batch mates
                    for j, r in enumerate(members):
                        chosen[r] = choose_tokens(scores[j:j + 1], True, rngs[r])[0] if r < n else pad
                else:
                    chosen[members] = choose_tokens(scores, g.do_sample, rngs[0])
            active = stop.active
            tokens = self._record(stop.step(chosen), active, new, seqs, eos, streamer, stop)
            lengths = lengths + active
            if stop.done:
                return new
            if chunked:
                return self._greedy_chunks(tokens, lengths, stop, new, seqs, eos, streamer, gens[0].vocab_size)
            logits = self._next_logits(tokens, lengths - active, seqs)

    @staticmethod
    def _record(tokens: np.ndarray, active: np.ndarray, new, seqs, eos: set, streamer, stop) -> np.ndarray:
        """Append this step's tokens to the active rows' outputs (eos excluded) and stream them;
        a streamer that returns True finishes its row."""
        for r in np.flatnonzero(active[:len(new)]):
            t = int(tokens[r])
            if t in eos:
                continue
            new[r].append(t)
            seqs[r].append(t)
            if streamer is not None and streamer(int(r), t):
                stop.finished[r] = True
        return tokens

    def _greedy_chunks(self, tokens, lengths, stop, new, seqs, eos, streamer, vocab) -> list[list[int]]:
        """Greedy decoding `decode_chunk` tokens per graph call; the host replays the stop rules."""
        if self._greedy is None or self._greedy.vocab != vocab:
            self._greedy = GreedyChunk(self.model, self.decode_chunk, vocab)
        last_slot = self.cfg.seq_length - 1
        while True:
            # Each row's last token sits at position length - 1 of its sequence.
            pos = np.minimum(lengths - 1, last_slot).astype(np.int32).reshape(-1, 1)
            chunk, finite = self._greedy(ms.Tensor(tokens.astype(np.int32).reshape(-1, 1)), ms.Tensor(pos))
            chunk, finite = chunk.asnumpy(), finite.asnumpy()
            for j in range(chunk.shape[1]):
                active = stop.active
                check_finite_rows(finite[:, j], active)
                tokens = self._record(stop.step(chunk[:, j]), active, new, seqs, eos, streamer, stop)
                lengths = lengths + active
                if stop.done:
                    return new

    def _first_logits(self, rows: list[list[int]], lengths: np.ndarray) -> np.ndarray:
        width = min(_round_up(int(lengths.max()), self.bucket), self.cfg.seq_length)
        ids = np.full((self.rows, width), self.cfg.pad_token_id, np.int32)
        for i, p in enumerate(rows):
            ids[i, :len(p)] = p
        last = (lengths - 1).astype(np.int32)
        if self.use_cache:
            pos = np.broadcast_to(np.arange(width, dtype=np.int32), (self.rows, width)).copy()
            return self.prefill(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(last)).asnumpy()
        return self.full(ms.Tensor(ids), ms.Tensor(last)).asnumpy()

    def _next_logits(self, tokens: np.ndarray, lengths: np.ndarray, seqs) -> np.ndarray:
        if self.use_cache:
            # Finished rows feed pad at their next slot: harmless, their output is no longer read.
            tok = tokens.astype(np.int32).reshape(-1, 1)
            pos = np.minimum(lengths, self.cfg.seq_length - 1).astype(np.int32).reshape(-1, 1)
            zero = np.zeros(self.rows, np.int32)
            return self.step(ms.Tensor(tok), ms.Tensor(pos), ms.Tensor(zero)).asnumpy()
        return self._first_logits(seqs, np.array([len(s) for s in seqs], np.int32))


def _setting_groups(gens: Sequence[GenerationConfig], rows: int) -> list[tuple[GenerationConfig, list[int]]]:
    """Rows with the same logit settings, so that each group is processed in one vectorised call. Batch
    filler rows join the first group (with one config for all, the whole batch is one group, as before)."""
    groups: dict[tuple, tuple[GenerationConfig, list[int]]] = {}
    for r in range(rows):
        g = gens[r] if r < len(gens) else gens[0]
        key = (g.do_sample, g.temperature, g.top_k, g.top_p, g.repetition_penalty)
        groups.setdefault(key, (g, []))[1].append(r)
    return list(groups.values())
