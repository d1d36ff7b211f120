"""The ChatGLM2/ChatGLM3 causal language model.

    input_ids -> embedding -> N x GLMBlock -> final RMSNorm -> output_layer -> logits

`GLMForCausalLM.construct(input_ids, labels, positions, segments, label_rows)` is the training/full-sequence
path. Labels arrive already shifted by the data pipeline (labels[t] is the target for position t). The loss
projects only the rows that have a label (`label_rows`, a static budget K per run) and does so chunk by chunk
(glm/model/loss.py), so no [B*S, V] logits exist. A row may pack several samples: `segments` (1, 2, ... per
sample, 0 for padding) block attention between them and `positions` restart per sample.
`CachedStep` and `LastLogits` are thin cells over the same parameters for incremental decoding with the
static KV cache and for recompute-style decoding.
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from glm.model.config import GLMConfig
from glm.model.layers import NEG_INF, GLMBlock, Linear, RMSNorm, rope_table
from glm.model.loss import ChunkedCrossEntropy, chunk_rows, logits_cross_entropy
from glm.model.ptuning import PrefixEncoder, freeze_all_but_prefix
from glm.runtime import ms, resolve_dtype


class Embedding(nn.Cell):
    def __init__(self, vocab: int, hidden: int, param_dtype: ms.Type, init_std: float):
        super().__init__()
        self.embedding_table = Parameter(initializer(Normal(init_std), (vocab, hidden), param_dtype),
                                         name="embedding_table")

    def construct(self, input_ids: Tensor) -> Tensor:
        return ops.gather(self.embedding_table, input_ids, 0).astype(ms.float32)


class Encoder(nn.Cell):
    def __init__(self, cfg: GLMConfig, param_dtype: ms.Type, compute_dtype: ms.Type, norm_dtype: ms.Type):
        super().__init__()
        self.layers = nn.CellList([GLMBlock(cfg, param_dtype, compute_dtype, norm_dtype)
                                   for _ in range(cfg.num_layers)])
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon, ms.float32, norm_dtype)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_index=None, past=None,
                  prefix=None):
        """`past`, when given, is an explicit cache: one (keys, values) pair of [B*max_len, kv, hd] tensors
        per layer. The updated pairs are returned next to the hidden states (exported graphs and
        multi-step decoding thread the cache through instead of writing the cache Parameters).
        `prefix` (P-Tuning v2): [2 x num_layers, B, P, kv, hd], layer i's keys at 2i, values at 2i + 1."""
        if past is None:
            if prefix is None:
                for layer in self.layers:
                    x = layer(x, cos, sin, mask, cache_index)
            else:
                for i in range(len(self.layers)):
                    x = self.layers[i](x, cos, sin, mask, cache_index, None, (prefix[2 * i], prefix[2 * i + 1]))
            return self.final_layernorm(x)
        new = ()
        for i in range(len(self.layers)):
            pair_prefix = None if prefix is None else (prefix[2 * i], prefix[2 * i + 1])
            x, pair = self.layers[i](x, cos, sin, mask, cache_index, past[i], pair_prefix)
            new = new + (pair,)
        return self.final_layernorm(x), new


class Transformer(nn.Cell):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        param_dtype = resolve_dtype(cfg.param_init_type, "model.model_config.param_init_type")
        compute_dtype = resolve_dtype(cfg.compute_dtype, "model.model_config.compute_dtype")
        norm_dtype = resolve_dtype(cfg.layernorm_compute_type, "model.model_config.layernorm_compute_type")
        self.embedding = Embedding(cfg.padded_vocab_size, cfg.hidden_size, param_dtype, cfg.initializer_range)
        self.encoder = Encoder(cfg, param_dtype, compute_dtype, norm_dtype)
        self.output_layer = Linear(cfg.hidden_size, cfg.padded_vocab_size, False, param_dtype, compute_dtype,
                                   cfg.initializer_range)


class GLMForCausalLM(nn.Cell):
    """ChatGLM2/3 with the training loss; see the module docstring for the inference cells."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = Transformer(config)
        self.pad_token_id = config.pad_token_id
        # P-Tuning v2: the prefix fills the first `prefix_len` cache slots of every row; tokens follow.
        self.prefix_len = config.prefix_len
        self.max_len = config.seq_length + self.prefix_len      # cache slots per row
        cos, sin = rope_table(config.seq_length, config.head_dim, 10000.0 * config.rope_ratio)
        self.rope_cos, self.rope_sin = Tensor(cos), Tensor(sin)
        self.slots = Tensor(np.arange(self.max_len, dtype=np.int32))
        self.loss = ChunkedCrossEntropy(chunk_rows(config.padded_vocab_size))
        self.prefix_encoder = None
        if self.prefix_len:
            self.prefix_encoder = PrefixEncoder(config.ptuning, config.num_layers, config.num_kv_heads,
                                                config.head_dim, resolve_dtype(config.compute_dtype),
                                                config.initializer_range)
            self.prefix_slots = Tensor(np.arange(self.prefix_len, dtype=np.int32).reshape(1, -1))
            freeze_all_but_prefix(self)

    def hidden_states(self, input_ids: Tensor, positions=None, segments=None) -> Tensor:
        """Full-sequence forward: [B, S] -> [B, S, H] (fp32).

        Token i attends to key j <= i; without `segments` to every non-pad key, with them ([B, S], 1, 2, ...
        per packed sample, 0 for padding) only to keys of its own nonzero segment. `positions` [B, S] index
        the rotary tables (default 0 .. S-1)."""
        b, s = input_ids.shape
        causal = (self.slots[:s].reshape(1, s) <= self.slots[:s].reshape(s, 1)).reshape(1, s, s)   # j <= i
        if segments is None:
            keep = ops.logical_and(causal, (input_ids != self.pad_token_id).reshape(-1, 1, s))
        else:
            same = segments.reshape(b, s, 1) == segments.reshape(b, 1, s)
            keep = ops.logical_and(ops.logical_and(causal, same), (segments != 0).reshape(b, 1, s))
        mask = ops.select(keep, ops.zeros_like(keep, dtype=ms.float32),
                          ops.full_like(keep, NEG_INF, dtype=ms.float32)).reshape(-1, 1, s, s)
        if positions is None:
            cos, sin = self.rope_cos[:s].reshape(1, s, 1, -1), self.rope_sin[:s].reshape(1, s, 1, -1)
        else:
            cos = ops.gather(self.rope_cos, positions, 0).reshape(b, s, 1, -1)
            sin = ops.gather(self.rope_sin, positions, 0).reshape(b, s, 1, -1)
        x = self.transformer.embedding(input_ids)
        if self.prefix_encoder is None:
            return self.transformer.encoder(x, cos, sin, mask)
        # Every token sees the whole prefix (each packed sample too, as it would alone): P always-open key
        # columns in front of the mask.
        mask = ops.concat((ops.zeros((b, 1, s, self.prefix_len), ms.float32), mask), -1)
        return self.transformer.encoder(x, cos, sin, mask, None, None, self.prefix_encoder(b))

    def logits(self, hidden: Tensor) -> Tensor:
        return self.transformer.output_layer(hidden).astype(ms.float32)

    def construct(self, input_ids: Tensor, labels=None, positions=None, segments=None, label_rows=None) -> Tensor:
        """labels None: logits [B, S, V]. labels [B, S] (label_rows None): mean CE over labels != -100.
        label_rows [K] (flat indices r * S + t) with labels [K]: mean CE over those rows' labels != -100;
        only these K rows reach the output layer."""
        hidden = self.hidden_states(input_ids, positions, segments)
        if labels is None:
            return self.logits(hidden)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if label_rows is not None:
            hidden = ops.gather(hidden, label_rows, 0)
        head = self.transformer.output_layer
        if self.training and not head.mergeable:
            # LoRA with dropout on the output layer itself: its adapter sees dropout(x), which no single
            # weight reproduces, so these K rows get plain logits.
            return logits_cross_entropy(head(hidden), labels.reshape(-1))
        return self.loss(hidden, head.merged_weight(), labels.reshape(-1))

    def cached_hidden(self, input_ids: Tensor, positions: Tensor, past=None, write_prefix: bool = False):
        """Forward over new tokens at `positions` [B, S], reading and writing the KV cache
        (the model's own, or an explicit `past`, see `Encoder.construct`).

        P-Tuning v2: position p lives in cache slot prefix_len + p, and `write_prefix` (the prefill) also
        writes the prefix into slots 0 .. prefix_len - 1; decode steps read it from there."""
        b, s = input_ids.shape
        slots = positions if not self.prefix_len else positions + self.prefix_len
        allowed = self.slots.reshape(1, 1, -1) <= slots.reshape(b, s, 1)              # [B, S, max_len]
        mask = ops.select(allowed, ops.zeros_like(allowed, dtype=ms.float32),
                          ops.full_like(allowed, NEG_INF, dtype=ms.float32)).reshape(b, 1, s, -1)
        cos = ops.gather(self.rope_cos, positions, 0).reshape(b, s, 1, -1)
        sin = ops.gather(self.rope_sin, positions, 0).reshape(b, s, 1, -1)
        row = ops.arange(b, dtype=ms.int32).reshape(b, 1) * self.max_len
        x = self.transformer.embedding(input_ids)
        if not (self.prefix_len and write_prefix):
            return self.transformer.encoder(x, cos, sin, mask, row + slots, past)
        index = ops.concat((row + self.prefix_slots, row + slots), 1)                  # [B, P + S]
        return self.transformer.encoder(x, cos, sin, mask, index, past, self.prefix_encoder(b))


def _take_last(hidden: Tensor, last_index: Tensor) -> Tensor:
    """hidden [B, S, H], last_index [B] -> [B, H] (each row's own last valid position)."""
    b, _, h = hidden.shape
    idx = last_index.reshape(b, 1, 1).broadcast_to((b, 1, h))
    return ops.gather_elements(hidden, 1, idx).reshape(b, h)


class CachedStep(nn.Cell):
    """One incremental step with the static KV cache: prefill (S = prompt length) or decode (S = 1).

    inputs: input_ids [B, S] (right padded), positions [B, S], last_index [B]
    returns: fp32 logits [B, V] at each row's `last_index`.
    """

    def __init__(self, lm: GLMForCausalLM, prefill: bool = False):
        super().__init__(auto_prefix=False)   # keep the model's parameter names
        if not lm.config.use_past:
            raise ValueError("CachedStep needs a model built with use_past=True")
        self.lm = lm
        self.prefill = prefill   # P-Tuning v2: the prefill step also writes the prefix into the cache

    def construct(self, input_ids: Tensor, positions: Tensor, last_index: Tensor) -> Tensor:
        hidden = self.lm.cached_hidden(input_ids, positions, None, self.prefill)
        return self.lm.logits(_take_last(hidden, last_index))


class GreedyChunk(nn.Cell):
    """`steps` greedy decode steps in one graph call, each argmax fed back as the next input.

    A tiny model's decode step is ~0.6 ms of kernels but ~2 ms per call once the framework's launch
    and the host loop are added; running several steps per call pays those once per chunk.

    inputs: tokens [B, 1] (the last chosen token of each row), positions [B, 1] (where it goes)
    returns: tokens [B, steps] int32 and finite [B, steps] (False where a row's logits had NaN/inf).
    Positions are clamped to the cache, so steps past the end only overwrite the last slot; callers
    discard tokens beyond their budget.
    """

    def __init__(self, lm: GLMForCausalLM, steps: int, vocab: int | None = None):
        super().__init__(auto_prefix=False)
        if not lm.config.use_past:
            raise ValueError("GreedyChunk needs a model built with use_past=True")
        self.lm, self.steps = lm, steps
        self.vocab = vocab if vocab and vocab < lm.config.padded_vocab_size else None   # argmax over real ids only
        self.last_slot = lm.config.seq_length - 1

    def construct(self, tokens: Tensor, positions: Tensor):
        b = tokens.shape[0]
        layers = self.lm.transformer.encoder.layers
        # The cache goes through the steps as a tensor and is written back once: writing the cache
        # Parameters between steps makes the graph copy every weight it reads afterwards (TensorMove).
        past = tuple((layer.self_attention.key_cache, layer.self_attention.value_cache) for layer in layers)
        chosen, finite = [], []
        for _ in range(self.steps):
            hidden, past = self.lm.cached_hidden(tokens, positions, past)
            logits = self.lm.logits(hidden.reshape(b, -1))
            if self.vocab is not None:
                logits = logits[:, :self.vocab]
            finite.append(ops.isfinite(logits.max(axis=-1)))   # max(-1) is (values, indices) in PyNative
            tokens = ops.argmax(logits, -1).astype(ms.int32).reshape(b, 1)
            chosen.append(tokens)
            positions = ops.minimum(positions + 1, self.last_slot)
        for i in range(len(layers)):
            ops.assign(layers[i].self_attention.key_cache, past[i][0])
            ops.assign(layers[i].self_attention.value_cache, past[i][1])
        return ops.concat(chosen, 1), ops.stack(finite, 1)


class LastLogits(nn.Cell):
    """Full recompute (no cache): logits [B, V] at each row's `last_index`."""

    def __init__(self, lm: GLMForCausalLM):
        super().__init__(auto_prefix=False)
        self.lm = lm

    def construct(self, input_ids: Tensor, last_index: Tensor) -> Tensor:
        return self.lm.logits(_take_last(self.lm.hidden_states(input_ids), last_index))


def count_parameters(net: nn.Cell, trainable_only: bool = False) -> int:
    params = net.trainable_params() if trainable_only else [p for p in net.get_parameters()
                                                           if not p.name.endswith("_cache")]
    return int(sum(int(np.prod(p.shape)) for p in params))
