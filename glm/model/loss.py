"""Cross-entropy through the output layer, chunk by chunk (fused linear cross-entropy).

    hidden [K, H] --(chunk of C rows)--> logits [C, V] = hidden_c W^T --> mean CE over labels != -100

No [K, V] tensor exists: each chunk's logits, softmax and softmax-minus-onehot live only while that chunk
is processed (C = `chunk_rows(V)` keeps them at ~32 MB fp32). In training the gradient is computed in the
forward, chunk by chunk - d_hidden_c = G_c W and d_W += G_c^T hidden_c with G_c = softmax - onehot - so
the backward only multiplies the stored gradients by dout / n (loss scaling and the trainer's token weight
arrive there). That is 3 projections' worth of matmuls, as autodiff would do, but without the [K, V]
log-softmax and its gradient, and without MindSpore's CPU LogSoftmaxGrad (~7x a softmax on [1024, 4096]).

In graph mode a gradient nobody asks for is dropped with the forward ops that only feed it (measured: a
frozen W - LoRA elsewhere, P-Tuning - costs no d_W matmul). Outside training (`set_train(False)`: eval
loss, perplexity) only the loss is computed, still chunked; that path is also plain-differentiable.
"""

from __future__ import annotations

from mindspore import Tensor, nn, ops

from glm.runtime import ms

IGNORE = -100
CHUNK_BYTES = 32 * 1024 * 1024   # the largest fp32 [C, V] tensor a chunk may hold


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: max(16, 8 Mi / V) rounded down to a multiple of 16 (128 at V = 65024)."""
    return max(16, (CHUNK_BYTES // 4 // vocab) // 16 * 16)


def _chunk_nll(h: Tensor, weight: Tensor, labels: Tensor):
    """One chunk: (nll [c] with 0 where the label is -100, log-softmax [c, V] fp32, valid [c] fp32).

    LogSoftmax rather than max / exp / sum: CPU ReduceMax over [128, 65024] alone costs ~3x LogSoftmax."""
    z = ops.MatMul(transpose_b=True)(h.astype(weight.dtype), weight).astype(ms.float32)     # [c, V]
    return _nll(z, labels)


def _nll(logits: Tensor, labels: Tensor):
    """(nll [c] with 0 where the label is -100, log-softmax [c, V] fp32, valid [c] fp32) of fp32 logits."""
    logp = ops.log_softmax(logits, -1)
    valid = (labels != IGNORE).astype(ms.float32)
    picked = ops.gather_elements(logp, 1, ops.maximum(labels, 0).reshape(-1, 1)).reshape(-1)
    return -picked * valid, logp, valid


class _FusedLinearCE(nn.Cell):
    """(loss, d_hidden, d_weight); the two gradients are of the SUM of the row losses, the backward turns them
    into the mean's and multiplies by dout.

    Unnormalised, softmax - onehot is O(1), so in a float16 compute dtype the chunk matmuls do not underflow
    (divided by n it would be ~1e-6, below fp16's normal range: loss scaling only reaches it in the backward).
    """

    def __init__(self, chunk: int):
        super().__init__()
        self.chunk = chunk
        self.grad_weight = ops.MatMul(transpose_a=True)

    def construct(self, hidden: Tensor, weight: Tensor, labels: Tensor):
        k = hidden.shape[0]
        loss, d_hidden, d_weight = 0.0, [], None
        for start in range(0, k, self.chunk):
            end = min(start + self.chunk, k)
            h, lab = hidden[start:end], labels[start:end]
            if d_hidden:
                # One chunk after the other: unordered, the graph overlaps the chunks' [C, V] tensors (measured
                # peak RSS of the probe step at K = 1032: 3.44 GB unordered, 2.94 GB ordered). Ordered on d_hidden,
                # not d_weight, so a frozen output layer still drops its d_weight matmuls.
                h = ops.depend(h, d_hidden[-1])
            nll, logp, valid = _chunk_nll(h, weight, lab)
            loss = loss + nll.sum()
            g = ops.exp(logp) * valid.reshape(-1, 1)                        # softmax, ignored rows 0
            rows = ops.arange(end - start, dtype=ms.int32)
            g = ops.tensor_scatter_add(g, ops.stack([rows, ops.maximum(lab, 0)], 1), -valid)   # - onehot
            g = g.astype(weight.dtype)
            d_hidden.append(ops.matmul(g, weight).astype(ms.float32))
            dw = self.grad_weight(g, h.astype(weight.dtype)).astype(ms.float32)
            d_weight = dw if d_weight is None else d_weight + dw
        return loss / _count(labels), ops.concat(d_hidden, 0), d_weight

    def bprop(self, hidden: Tensor, weight: Tensor, labels: Tensor, out, dout):
        scale = dout[0].astype(ms.float32) / _count(labels)
        return (out[1] * scale).astype(hidden.dtype), (out[2] * scale).astype(weight.dtype), ops.zeros_like(labels)


def _count(labels: Tensor) -> Tensor:
    """max(#labels != -100, 1): the mean's denominator (an all-ignored batch gives loss 0, not NaN)."""
    return ops.maximum((labels != IGNORE).astype(ms.float32).sum(), 1.0)


class ChunkedCrossEntropy(nn.Cell):
    """`construct(hidden [K, H], weight [V, H], labels [K])` -> mean CE over labels != -100 (0 when none).

    `weight` is the output layer's weight in its compute dtype (`Linear.merged_weight`); rows are
    cut into chunks of `chunk` rows (`chunk_rows(V)` by default; any positive value is exact)."""

    def __init__(self, chunk: int):
        super().__init__()
        self.chunk = chunk
        self.fused = _FusedLinearCE(chunk)

    def construct(self, hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        labels = labels.astype(ms.int32)
        if self.training:
            loss, _, _ = self.fused(hidden, weight, labels)
            return loss
        k = hidden.shape[0]
        loss = 0.0
        for start in range(0, k, self.chunk):
            end = min(start + self.chunk, k)
            loss = loss + _chunk_nll(hidden[start:end], weight, labels[start:end])[0].sum()
        return loss / _count(labels)


def logits_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean CE over labels != -100 from materialised logits [K, V] (plain ops, autodiff)."""
    labels = labels.astype(ms.int32)
    return _nll(logits.astype(ms.float32), labels)[0].sum() / _count(labels)
