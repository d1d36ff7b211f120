"""Learning-rate schedules (plain Python, evaluated per optimizer step) and AdamW with fp32 state.

The schedule is a function of the global step computed on the host and fed to the optimizer as a
tensor, so resuming at step N gives exactly the learning rate an uninterrupted run would use.
"""

from __future__ import annotations

import math

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from glm import GLMError
from glm.config import LR_TYPES
from glm.runtime import ms


class LRSchedule:
    """lr(step) for step = 0, 1, ... (0 is the first optimizer step).

    Warmup rises linearly from `warmup_lr_init` and reaches `learning_rate` at the end of warmup; the
    first step therefore never has lr 0 (the reference gives lr 0 to step 0 when warmup_steps is 0).
    """

    def __init__(self, kind: str, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                 lr_end: float = 0.0, warmup_lr_init: float = 0.0, power: float = 1.0):
        if kind not in LR_TYPES:
            raise GLMError(f"lr_schedule.type: expected one of {sorted(LR_TYPES)}, got {kind!r}")
        self.kind = LR_TYPES[kind]
        self.lr, self.lr_end, self.power = float(learning_rate), float(lr_end), float(power)
        self.total = max(1, int(total_steps))
        self.warmup = max(0, min(int(warmup_steps), self.total))
        self.warmup_lr_init = float(warmup_lr_init)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            frac = (step + 1) / self.warmup
            return self.warmup_lr_init + (self.lr - self.warmup_lr_init) * frac
        if self.kind == "constant":
            return self.lr
        decay_steps = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay_steps)
        if self.kind == "linear":   # MindFormers' LinearWithWarmUpLR: down to 0, lr_end not used
            return self.lr * (1.0 - progress)
        if self.kind == "polynomial":
            return (self.lr - self.lr_end) * (1.0 - progress) ** self.power + self.lr_end
        return self.lr_end + 0.5 * (self.lr - self.lr_end) * (1.0 + math.cos(math.pi * progress))


def build_schedule(section: dict, total_steps: int) -> LRSchedule:
    total = section.get("total_steps", -1)
    total = total_steps if total in (None, -1) else int(total)
    warmup = section.get("warmup_steps") or 0
    if section.get("warmup_ratio"):
        warmup = int(float(section["warmup_ratio"]) * total)
    return LRSchedule(section.get("type", "polynomial"), float(section.get("learning_rate", 5e-5)), total,
                      int(warmup), float(section.get("lr_end", 0.0) or 0.0),
                      float(section.get("warmup_lr_init", 0.0) or 0.0), float(section.get("power", 1.0) or 1.0))


class AdamW(nn.Cell):
    """AdamW (decoupled weight decay, bias-corrected) with fp32 moments, whatever the parameter dtype.

    1-D parameters (norm weights, biases) get no weight decay. `construct(grads, lr, step)` applies one
    update; `step` is the 1-based update count used for bias correction.

    fp32 parameters go through MindSpore's fused `AdamWeightDecay` kernel (one pass over p, m, v and g
    instead of a dozen elementwise ops: 2x faster on CPU). That kernel has no bias correction, so it is
    folded into its scalar inputs: with c1 = 1 - b1^t and c2 = 1 - b2^t,
        lr * (m / c1) / (sqrt(v / c2) + eps) = (lr sqrt(c2) / c1) * m / (sqrt(v) + eps sqrt(c2)),
    and the decay input is rescaled so that the decoupled decay stays lr * wd * p.
    """

    def __init__(self, params: list, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(auto_prefix=False)
        self.params = ms.ParameterTuple(params)
        self.exp_avg = ms.ParameterTuple([
            Parameter(Tensor(np.zeros(p.shape, np.float32)), name="adam_m." + p.name, requires_grad=False)
            for p in params])
        self.exp_avg_sq = ms.ParameterTuple([
            Parameter(Tensor(np.zeros(p.shape, np.float32)), name="adam_v." + p.name, requires_grad=False)
            for p in params])
        self.decay = tuple(float(weight_decay) if len(p.shape) > 1 else 0.0 for p in params)
        self.fused = tuple(p.dtype == ms.float32 for p in params)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.beta1_t, self.beta2_t = Tensor(beta1, ms.float32), Tensor(beta2, ms.float32)
        self.adam = ops.AdamWeightDecay()

    def construct(self, grads, lr: Tensor, step: Tensor):
        b1, b2 = self.beta1, self.beta2
        bc1 = 1.0 - ops.pow(b1, step)
        bc2 = 1.0 - ops.pow(b2, step)
        sqrt_bc2 = ops.sqrt(bc2)
        lr_fused = lr * sqrt_bc2 / bc1
        eps_fused = self.eps * sqrt_bc2
        for i in range(len(self.params)):
            p, m, v = self.params[i], self.exp_avg[i], self.exp_avg_sq[i]
            g = grads[i].astype(ms.float32)
            if self.fused[i]:
                decay = self.decay[i] * lr / lr_fused
                self.adam(p, m, v, lr_fused, self.beta1_t, self.beta2_t, eps_fused, decay, g)
                continue
            m_new = b1 * m + (1.0 - b1) * g
            v_new = b2 * v + (1.0 - b2) * ops.square(g)
            upd = (m_new / bc1) / (ops.sqrt(v_new / bc2) + self.eps)
            p32 = p.astype(ms.float32)
            if self.decay[i] > 0:
                p32 = p32 - lr * self.decay[i] * p32
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            ops.assign(p, (p32 - lr * upd).astype(p.dtype))
        return lr


def build_optimizer(section: dict, params: list) -> AdamW:
    kind = section.get("type", "AdamWeightDecay")
    if kind not in ("AdamWeightDecay", "FP32StateAdamWeightDecay", "AdamW"):
        raise GLMError(f"optimizer.type: expected AdamWeightDecay, FP32StateAdamWeightDecay or AdamW, got {kind!r}")
    if not params:
        raise GLMError("optimizer: the model has no trainable parameters")
    return AdamW(params, float(section.get("beta1", 0.9)), float(section.get("beta2", 0.95)),
                 float(section.get("eps", 1e-8)), float(section.get("weight_decay", 0.0)))
