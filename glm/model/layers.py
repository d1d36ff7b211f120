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

    def construct(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).astype(self.compute_dtype),
                        self.weight.astype(self.compute_dtype))
        if self.has_bias:
            y = y + self.bias.astype(self.compute_dtype)
        return y.reshape(shape[:-1] + (self.out_features,))


class RMSNorm(nn.Cell):
    """x * rsqrt(mean(x^2) + eps) * w, computed in `compute_dtype` (fp32 by default)."""

    def __init__(self, dim: int, eps: float, param_dtype: ms.Type, compute_dtype: ms.Type):
        super().__init__()
        self.weight = Parameter(initializer("ones", (dim,), param_dtype), name="weight")
        self.eps = eps
        self.compute_dtype = compute_dtype

    def construct(self, x: Tensor) -> Tensor:
        x = x.astype(self.compute_dtype)
        var = ops.mean(ops.square(x), -1, keep_dims=True)
        return x * ops.rsqrt(var + self.eps) * self.weight.astype(self.compute_dtype)


def rope_table(max_len: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_len, head_dim/4] for rotating the first head_dim/2 channels in adjacent pairs."""
    rot = head_dim // 2
    theta = 1.0 / (base ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
    ang = np.outer(np.arange(max_len, dtype=np.float64), theta)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of the first half of each head; the second half passes through.

    x: [B, h, S, hd]; cos/sin broadcastable to [B, 1, S, hd/4]. ChatGLM pairs *adjacent* channels
    (not Llama's half split), which is what makes its checkpoints work.
    """
    b, h, s, hd = x.shape
    rot = hd // 2
    xr = x[..., :rot].reshape(b, h, s, rot // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    out = ops.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).reshape(b, h, s, rot)
    return ops.cat([out, x[..., rot:]], -1)


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
        self.compute_dtype = compute_dtype
        self.attn_dropout = nn.Dropout(p=cfg.attention_dropout) if cfg.attention_dropout > 0 else None
        self.use_past = cfg.use_past
        self.max_len = cfg.seq_length
        if cfg.use_past:
            shape = (cfg.batch_size * cfg.seq_length, self.kv, self.hd)
            self.key_cache = Parameter(Tensor(np.zeros(shape), compute_dtype), name="key_cache",
                                       requires_grad=False)
            self.value_cache = Parameter(Tensor(np.zeros(shape), compute_dtype), name="value_cache",
                                         requires_grad=False)

    def _split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = qkv.shape
        q = qkv[..., :self.q_size].reshape(b, s, self.nh, self.hd).transpose(0, 2, 1, 3)
        k = qkv[..., self.q_size:self.q_size + self.kv_size].reshape(b, s, self.kv, self.hd).transpose(0, 2, 1, 3)
        v = qkv[..., self.q_size + self.kv_size:].reshape(b, s, self.kv, self.hd).transpose(0, 2, 1, 3)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q [B,nh,S,hd], k/v [B,kv,T,hd], additive fp32 mask [B,1,S,T] -> [B,S,nh*hd]."""
        b, _, s, _ = q.shape
        t = k.shape[2]
        # Query heads g*group .. g*group+group-1 share kv group g: fold them into the query axis
        # instead of repeating K/V `group` times.
        qg = (q * self.scale).reshape(b, self.kv, self.group * s, self.hd)
        scores = ops.BatchMatMul(transpose_b=True)(qg, k).astype(ms.float32)
        scores = scores.reshape(b, self.kv, self.group, s, t) + mask.reshape(b, 1, 1, s, t)
        probs = ops.softmax(scores, -1).astype(self.compute_dtype)
        if self.attn_dropout is not None:
            probs = self.attn_dropout(probs)
        ctx = ops.BatchMatMul()(probs.reshape(b, self.kv, self.group * s, t), v)
        return ctx.reshape(b, self.nh, s, self.hd).transpose(0, 2, 1, 3).reshape(b, s, self.q_size)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_index=None, past=None):
        """Without `cache_index`: plain causal attention. With it ([B, S] flat slots b*max_len + position of
        each new token): write K/V into the cache and attend over all of it. The cache is this layer's
        Parameters, or - when `past` = (keys, values) tensors is given, as in exported graphs - those
        tensors, returned updated as `(out, (keys, values))`."""
        q, k, v = self._split_heads(self.query_key_value(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_past = None
        if cache_index is not None:
            b, s = x.shape[0], x.shape[1]
            k_new = k.transpose(0, 2, 1, 3).astype(self.compute_dtype)
            v_new = v.transpose(0, 2, 1, 3).astype(self.compute_dtype)
            if past is None:
                ops.scatter_update(self.key_cache, cache_index, k_new)
                ops.scatter_update(self.value_cache, cache_index, v_new)
                keys, values = self.key_cache, self.value_cache
            else:
                slots = cache_index.reshape(b, s, 1)
                keys = ops.tensor_scatter_update(past[0], slots, k_new)
                values = ops.tensor_scatter_update(past[1], slots, v_new)
                new_past = (keys, values)
            k = keys.reshape(b, self.max_len, self.kv, self.hd).transpose(0, 2, 1, 3)
            v = values.reshape(b, self.max_len, self.kv, self.hd).transpose(0, 2, 1, 3)
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

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_index=None, past=None):
        h = self.input_layernorm(x)
        if past is None:
            a = self.self_attention(h, cos, sin, mask, cache_index)
        else:
            a, past = self.self_attention(h, cos, sin, mask, cache_index, past)
        a = a.astype(ms.float32)
        if self.dropout is not None:
            a = self.dropout(a)
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x)).astype(ms.float32)
        if self.dropout is not None:
            m = self.dropout(m)
        return x + m if past is None else (x + m, past)
