"""Building blocks of the GLM transformer: linear, RMSNorm, rotary embedding, attention and MLP.

Shapes use B = batch, S = query length, T = key length, nh = query heads, kv = key/value groups,
hd = head dim. Parameter names follow MindFormers/HF ChatGLM so their checkpoints load unchanged.
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from glm.model.config import GLMConfig

NEG_INF = -1e9  # additive mask value, applied in fp32 so it cannot overflow


class Linear(nn.Cell):
    """y = x W^T (+ b), with W stored as [out, in] like torch/MindFormers and computed in `compute_dtype`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, param_dtype: ms.Type,
                 compute_dtype: ms.Type, init_std: float = 0.02):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(initializer(Normal(init_std), (out_features, in_features), param_dtype),
                                name="weight")
        self.has_bias = bias
        if bias:
            self.bias = Parameter(initializer("zeros", (out_features,), param_dtype), name="bias")
        self.compute_dtype = compute_dtype
        self.matmul = ops.MatMul(transpose_b=True)
        self.mergeable = True   # merged_weight() reproduces the layer exactly (LoRA with dropout does not)

    def construct(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).astype(self.compute_dtype),
                        self.weight.astype(self.compute_dtype))
        if self.has_bias:
            y = y + self.bias.astype(self.compute_dtype)
        return y.reshape(shape[:-1] + (self.out_features,))

    def merged_weight(self) -> Tensor:
        """W [out, in] in the compute dtype, such that this layer is x W^T (+ b): the fused loss
        (glm/model/loss.py) multiplies by it directly instead of calling the layer."""
        return self.weight.astype(self.compute_dtype)


class RMSNorm(nn.Cell):
    """x * rsqrt(mean(x^2) + eps) * w, computed in `compute_dtype` (fp32 by default)."""

    def __init__(self, dim: int, eps: float, param_dtype: ms.Type, compute_dtype: ms.Type):
        super().__init__()
        self.weight = Parameter(initializer("ones", (dim,), param_dtype), name="weight")
        self.eps = eps
        self.dim = dim
        self.mean_col = Tensor(np.full((dim, 1), 1.0 / dim, np.float32))
        self.compute_dtype = compute_dtype

    def construct(self, x: Tensor) -> Tensor:
        x = x.astype(self.compute_dtype)
        # mean(x^2) as a matmul with a 1/dim column: CPU ReduceMean over the hidden axis is ~2x slower,
        # forward and backward.
        sq = ops.square(x)
        var = ops.matmul(sq.reshape(-1, self.dim), self.mean_col.astype(sq.dtype)).reshape(x.shape[:-1] + (1,))
        return x * ops.rsqrt(var + self.eps) * self.weight.astype(self.compute_dtype)


def rope_table(max_len: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_len, head_dim] for `apply_rope`.

    ChatGLM rotates the first head_dim/2 channels in *adjacent* pairs (2i, 2i+1) by angle pos * theta_i,
    theta_i = base^(-2i / (head_dim/2)); both channels of a pair share the angle. The second half of
    each head passes through, hence cos 1 and sin 0 there.
    """
    rot = head_dim // 2
    theta = 1.0 / (base ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
    ang = np.repeat(np.outer(np.arange(max_len, dtype=np.float64), theta), 2, axis=1)   # [L, rot]
    cos = np.ones((max_len, head_dim), np.float64)
    sin = np.zeros((max_len, head_dim), np.float64)
    cos[:, :rot], sin[:, :rot] = np.cos(ang), np.sin(ang)
    return cos.astype(np.float32), sin.astype(np.float32)


def pair_rotation(head_dim: int) -> np.ndarray:
    """R [hd, hd] with (x R)[2i] = -x[2i+1] and (x R)[2i+1] = x[2i] on the rotated half, 0 elsewhere."""
    r = np.zeros((head_dim, head_dim), np.float32)
    for i in range(head_dim // 4):
        r[2 * i + 1, 2 * i] = -1.0
        r[2 * i, 2 * i + 1] = 1.0
    return r


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, rotation: Tensor) -> Tensor:
    """x * cos + rotate_pairs(x) * sin, with x [..., hd] and cos/sin broadcastable to it.

    The pair swap is a tiny matmul with `pair_rotation`: on CPU that is cheaper, forward and backward,
    than slicing, stacking and concatenating the halves (no strided copies, no slice gradients).
    """
    hd = x.shape[-1]
    swapped = ops.matmul(x.reshape(-1, hd), rotation.astype(x.dtype)).reshape(x.shape)
    return x * cos.astype(x.dtype) + swapped * sin.astype(x.dtype)


class Softmax(nn.Cell):
    """Softmax over the last axis with a hand-written backward.

    dx = y * (dy - sum(y * dy)); the row sum is a matmul with a ones vector, because MindSpore's CPU
    ReduceSum over a short last axis is ~10x slower than that (measured: 4.6 vs 0.45 ms on 2M values).
    """

    def construct(self, x: Tensor) -> Tensor:
        return ops.softmax(x, -1)

    def bprop(self, x: Tensor, out: Tensor, dout: Tensor):
        yd = out * dout
        row_sum = ops.matmul(yd, ops.ones((x.shape[-1], 1), yd.dtype))
        return (yd - out * row_sum,)


class SelfAttention(nn.Cell):
    """Fused-QKV multi-query attention with an optional static KV cache.

    The cache holds post-rotary K/V before the group repeat, as [B * max_len, kv, hd] so that every
    row can write at its own position with a single `scatter_update` (rows with different prompt
    lengths decode side by side).
    """

    def __init__(self, cfg: GLMConfig, param_dtype: ms.Type, compute_dtype: ms.Type):
        super().__init__()
        self.nh, self.kv, self.hd = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
        self.group = self.nh // self.kv
        self.q_size, self.kv_size = self.nh * self.hd, self.kv * self.hd
        self.query_key_value = Linear(cfg.hidden_size, cfg.qkv_size, cfg.add_qkv_bias or cfg.add_bias_linear,
                                      param_dtype, compute_dtype, cfg.initializer_range)
        self.dense = Linear(self.q_size, cfg.hidden_size, cfg.add_bias_linear, param_dtype, compute_dtype,
                            cfg.initializer_range)
        self.scale = 1.0 / math.sqrt(self.hd)
        self.rotation = Tensor(pair_rotation(self.hd))
        self.softmax = Softmax()
        self.compute_dtype = compute_dtype
        self.attn_dropout = nn.Dropout(p=cfg.attention_dropout) if cfg.attention_dropout > 0 else None
        self.use_past = cfg.use_past
        # Cache slots per row: P-Tuning's prefix takes the first pre_seq_len, the tokens follow.
        self.max_len = cfg.seq_length + cfg.prefix_len
        if cfg.use_past:
            shape = (cfg.batch_size * self.max_len, self.kv, self.hd)
            self.key_cache = Parameter(Tensor(np.zeros(shape), compute_dtype), name="key_cache",
                                       requires_grad=False)
            self.value_cache = Parameter(Tensor(np.zeros(shape), compute_dtype), name="value_cache",
                                         requires_grad=False)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q [B,S,nh,hd], k/v [B,T,kv,hd], additive fp32 mask [B,1,S,T] -> [B,S,nh*hd]."""
        b, s, _, _ = q.shape
        t = k.shape[1]
        # Query heads g*group .. g*group+group-1 share kv group g: fold them into the query axis
        # ([B, kv, group*S, hd]) instead of repeating K/V `group` times.
        qg = (q * self.scale).reshape(b, s, self.kv, self.group, self.hd).transpose(0, 2, 3, 1, 4)
        qg = qg.reshape(b, self.kv, self.group * s, self.hd)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        scores = ops.BatchMatMul(transpose_b=True)(qg, k).astype(ms.float32)
        scores = scores.reshape(b, self.kv, self.group, s, t) + ops.stop_gradient(mask).reshape(b, 1, 1, s, t)
        probs = self.softmax(scores).astype(self.compute_dtype)
        if self.attn_dropout is not None:
            probs = self.attn_dropout(probs)
        ctx = ops.BatchMatMul()(probs.reshape(b, self.kv, self.group * s, t), v)
        ctx = ctx.reshape(b, self.kv, self.group, s, self.hd).transpose(0, 3, 1, 2, 4)
        return ctx.reshape(b, s, self.q_size)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_index=None, past=None,
                  prefix=None):
        """Without `cache_index`: plain causal attention. With it ([B, S] flat slots b*max_len + slot of
        each new token): write K/V into the cache and attend over all of it. The cache is this layer's
        Parameters, or - when `past` = (keys, values) tensors is given, as in exported graphs - those
        tensors, returned updated as `(out, (keys, values))`. cos/sin: [B or 1, S, 1, hd].

        `prefix` = (keys, values) [B, P, kv, hd] (P-Tuning v2) go in front of this call's keys and values,
        un-rotated; with a cache, `cache_index` then also covers the P prefix slots ([B, P + S])."""
        b, s = x.shape[0], x.shape[1]
        qkv = self.query_key_value(x)
        # Rotary on q and k in one go: they are the first nh + kv heads of the fused projection.
        qk = apply_rope(qkv[..., :self.q_size + self.kv_size].reshape(b, s, self.nh + self.kv, self.hd),
                        cos, sin, self.rotation)
        q, k = qk[:, :, :self.nh], qk[:, :, self.nh:]
        v = qkv[..., self.q_size + self.kv_size:].reshape(b, s, self.kv, self.hd)
        if prefix is not None:
            k = ops.concat((prefix[0], k.astype(self.compute_dtype)), 1)
            v = ops.concat((prefix[1], v.astype(self.compute_dtype)), 1)
        new_past = None
        if cache_index is not None:
            k_new, v_new = k.astype(self.compute_dtype), v.astype(self.compute_dtype)
            if past is None:
                ops.scatter_update(self.key_cache, cache_index, k_new)
                ops.scatter_update(self.value_cache, cache_index, v_new)
                keys, values = self.key_cache, self.value_cache
            else:
                slots = cache_index.reshape(b, -1, 1)
                keys = ops.tensor_scatter_update(past[0], slots, k_new)
                values = ops.tensor_scatter_update(past[1], slots, v_new)
                new_past = (keys, values)
            k = keys.reshape(b, self.max_len, self.kv, self.hd)
            v = values.reshape(b, self.max_len, self.kv, self.hd)
        out = self.dense(self._attend(q, k, v, mask))
        return out if past is None else (out, new_past)


class MLP(nn.Cell):
    """SwiGLU: dense_4h_to_h(silu(gate) * up), where dense_h_to_4h produces [gate | up]."""

    def __init__(self, cfg: GLMConfig, param_dtype: ms.Type, compute_dtype: ms.Type):
        super().__init__()
        self.ffn = cfg.ffn_hidden_size
        self.dense_h_to_4h = Linear(cfg.hidden_size, 2 * self.ffn, cfg.add_bias_linear, param_dtype,
                                    compute_dtype, cfg.initializer_range)
        self.dense_4h_to_h = Linear(self.ffn, cfg.hidden_size, cfg.add_bias_linear, param_dtype,
                                    compute_dtype, cfg.initializer_range)

    def construct(self, x: Tensor) -> Tensor:
        u = self.dense_h_to_4h(x)
        return self.dense_4h_to_h(ops.silu(u[..., :self.ffn]) * u[..., self.ffn:])


class GLMBlock(nn.Cell):
    """Pre-norm transformer block; the residual stream stays in fp32 (as the reference does)."""

    def __init__(self, cfg: GLMConfig, param_dtype: ms.Type, compute_dtype: ms.Type, norm_dtype: ms.Type):
        super().__init__()
        eps = cfg.layernorm_epsilon
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, ms.float32, norm_dtype)
        self.self_attention = SelfAttention(cfg, param_dtype, compute_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, ms.float32, norm_dtype)
        self.mlp = MLP(cfg, param_dtype, compute_dtype)
        self.dropout = nn.Dropout(p=cfg.hidden_dropout) if cfg.hidden_dropout > 0 else None

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_index=None, past=None,
                  prefix=None):
        h = self.input_layernorm(x)
        if past is None:
            a = self.self_attention(h, cos, sin, mask, cache_index, None, prefix)
        else:
            a, past = self.self_attention(h, cos, sin, mask, cache_index, past, prefix)
        a = a.astype(ms.float32)
        if self.dropout is not None:
            a = self.dropout(a)
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x)).astype(ms.float32)
        if self.dropout is not None:
            m = self.dropout(m)
        return x + m if past is None else (x + m, past)
