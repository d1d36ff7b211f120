"""Batched text generation over the model's static KV cache (or full recompute, for reference).

Prompts of different lengths share one batch: they are right-padded, the prefill returns each row's
logits at its own last token, and every decode step writes each row at its own position. Rows that
finished keep running (the batch shape is static) but their tokens are discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

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
    def generate(self, prompts: list[list[int]], gen: GenerationConfig,
                 streamer: Optional[Callable[[int, int], None]] = None) -> list[list[int]]:
        """Return the new tokens of every prompt (eos excluded). `streamer(row, token)` sees each token."""
        if not prompts:
            return []
        rng = np.random.default_rng(gen.seed)
        outputs: list[list[int]] = []
        for start in range(0, len(prompts), self.rows):
            chunk = prompts[start:start + self.rows]
            cb = None
            if streamer is not None:
                cb = (lambda off: (lambda r, t: streamer(r + off, t)))(start)
            outputs.extend(self._generate_chunk(chunk, gen, rng, cb))
        return outputs

    # ------------------------------------------------------------------ internals
    def _budget(self, prompts: list[list[int]], gen: GenerationConfig) -> int:
        longest = max(len(p) for p in prompts)
        limit = self.cfg.seq_length
        for i, p in enumerate(prompts):
            if not p:
                raise GLMError(f"prompt {i}: it is empty after tokenization")
            if len(p) >= limit:
                raise GLMError(f"prompt {i}: {len(p)} tokens do not fit model.model_config.seq_length "
                               f"{limit} (at least one new token is needed)")
        if gen.max_new_tokens is not None:
            return max(0, min(gen.max_new_tokens, limit - longest))
        max_length = min(gen.max_length or limit, limit)
        if longest >= max_length:   # silently answering nothing would look like a model that says nothing
            i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
            raise GLMError(f"prompt {i}: {longest} tokens leave no room for an answer under max_length {max_length} "
                           "(model.model_config.max_decode_length); raise it or shorten the prompt")
        return max_length - longest

    def _generate_chunk(self, prompts, gen, rng, streamer) -> list[list[int]]:
        n = len(prompts)
        budget = self._budget(prompts, gen)
        rows = prompts + [[gen.pad_token_id]] * (self.rows - n)     # fill the static batch
        lengths = np.array([len(p) for p in rows], np.int32)
        seqs = [list(map(int, p)) for p in rows]
        new: list[list[int]] = [[] for _ in range(n)]
        if budget == 0:
            return new
        stop = StopCriteria(gen.eos_token_id, lengths, max_new_tokens=budget, pad_token_id=gen.pad_token_id)
        stop.finished[n:] = True
        eos = set(int(e) for e in gen.eos_token_id)
        logits = self._first_logits(rows, lengths)
        chunked = self.use_cache and self.decode_chunk > 1 and _is_greedy(gen)
        while True:
            if gen.vocab_size and gen.vocab_size < logits.shape[-1]:
                logits = logits[:, :gen.vocab_size]   # untrained padding rows of the head are not tokens
            check_finite(logits, stop.active)   # NaN logits would otherwise decode as token 0
            scores = process_logits(logits, seqs, repetition_penalty=gen.repetition_penalty,
                                    temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                                    do_sample=gen.do_sample)
            active = stop.active
            tokens = self._record(stop.step(choose_tokens(scores, gen.do_sample, rng)), active, new, seqs, eos,
                                  streamer)
            lengths = lengths + active
            if stop.done:
                return new
            if chunked:
                return self._greedy_chunks(tokens, lengths, stop, new, seqs, eos, streamer, gen.vocab_size)
            logits = self._next_logits(tokens, lengths - active, seqs)

    @staticmethod
    def _record(tokens: np.ndarray, active: np.ndarray, new, seqs, eos: set, streamer) -> np.ndarray:
        """Append this step's tokens to the active rows' outputs (eos excluded) and stream them."""
        for r in np.flatnonzero(active[:len(new)]):
            t = int(tokens[r])
            if t in eos:
                continue
            new[r].append(t)
            seqs[r].append(t)
            if streamer is not None:
                streamer(int(r), t)
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
                tokens = self._record(stop.step(chunk[:, j]), active, new, seqs, eos, streamer)
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
