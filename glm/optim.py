"""Learning-rate schedules (plain Python, evaluated per optimizer step) and AdamW with fp32 state.

The schedule is a function of the global step computed on the host and fed to the optimizer as a
tensor, so resuming at step N gives exactly the learning rate an uninterrupted run would use.
"""

from __future__ import annotations

import math

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from glm import GLMError
from glm.runtime import ms
from glm.settings import LR_TYPES, OPTIMIZERS, LRScheduleConfig, OptimizerConfig


class LRSchedule:
    """lr(step) for step = 0, 1, ... (0 is the first optimizer step).

    Warmup rises linearly from `warmup_lr_init` and reaches `learning_rate` at the end of warmup; the
    first step therefore never has lr 0 (the reference gives lr 0 to step 0 when warmup_steps is 0).
    After warmup, with progress p = (step - warmup) / (total - warmup) clamped to [0, 1]:
    polynomial (lr - lr_end)(1 - p)^power + lr_end; linear lr (1 - p) (MindFormers' LinearWithWarmUpLR has
    no lr_end); cosine lr_end + (lr - lr_end) max(0, (1 + cos(2 pi num_cycles p)) / 2); constant lr.
    """

    def __init__(self, kind: str, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                 lr_end: float = 0.0, warmup_lr_init: float = 0.0, power: float = 1.0, num_cycles: float = 0.5):
        if kind not in LR_TYPES:
            raise GLMError(f"lr_schedule.type: expected one of {sorted(LR_TYPES)}, got {kind!r}")
        self.kind = LR_TYPES[kind]
        self.lr, self.lr_end, self.power = float(learning_rate), float(lr_end), float(power)
        if self.kind == "linear":
            self.lr_end, self.power = 0.0, 1.0
        self.num_cycles = float(num_cycles)
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
        if self.kind in ("polynomial", "linear"):
            return (self.lr - self.lr_end) * (1.0 - progress) ** self.power + self.lr_end
        wave = 0.5 * (1.0 + math.cos(2.0 * math.pi * self.num_cycles * progress))
        return self.lr_end + (self.lr - self.lr_end) * max(0.0, wave)


def lr_multiplier(lr_scale: bool, lr_scale_factor: int, global_batch: int) -> float:
    """MindFormers' `lr_scale`: the peak lr times global batch / lr_scale_factor (1 when lr_scale is off)."""
    return global_batch / lr_scale_factor if lr_scale else 1.0


def build_schedule(section: LRScheduleConfig, total_steps: int, steps_per_epoch: int = 0,
                   scale: float = 1.0) -> LRSchedule:
    """The schedule of an `lr_schedule` section over a run of `total_steps` optimizer steps.

    total_steps -1 spans the run; warmup_ratio wins over warmup_epochs, which wins over warmup_steps (as in
    MindFormers); `scale` multiplies the peak lr (lr_multiplier)."""
    total = total_steps if section.total_steps in (None, -1) else int(section.total_steps)
    warmup = section.warmup_steps
    if section.warmup_ratio:
        warmup = int(section.warmup_ratio * total)
    elif section.warmup_epochs:
        warmup = int(section.warmup_epochs * steps_per_epoch)
    return LRSchedule(section.type, section.learning_rate * scale, total, int(warmup), section.lr_end,
                      section.warmup_lr_init, section.power, section.num_cycles)


class AdamW(nn.Cell):
    """Adam with decoupled weight decay and fp32 moments, whatever the parameter dtype.

    bias_correction False (optimizer.type AdamWeightDecay, FP32StateAdamWeightDecay, FusedAdamWeightDecay, as
    MindSpore's nn.AdamWeightDecay): m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (m / (sqrt(v) + eps)
    + wd p). bias_correction True (optimizer.type AdamW, as torch.optim.AdamW): m / (1 - b1^t) and
    v / (1 - b2^t) replace m and v; the decay stays lr wd p. On the first step the uncorrected update is
    (1 - b1) / sqrt(1 - b2) = 0.45x the corrected one (b1 0.9, b2 0.95).

    1-D parameters (norm weights, biases) get no weight decay. `construct(grads, lr, step)` applies one
    update; `step` is the 1-based update count used for bias correction.

    fp32 parameters go through MindSpore's fused `AdamWeightDecay` kernel (one pass over p, m, v and g
    instead of a dozen elementwise ops: 2x faster on CPU). That kernel has no bias correction, so for AdamW
    it is folded into its scalar inputs: with c1 = 1 - b1^t and c2 = 1 - b2^t,
        lr * (m / c1) / (sqrt(v / c2) + eps) = (lr sqrt(c2) / c1) * m / (sqrt(v) + eps sqrt(c2)),
    and the decay input is rescaled so that the decoupled decay stays lr * wd * p.
    """

    def __init__(self, params: list, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
                 weight_decay: float = 0.0, bias_correction: bool = True):
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
        self.bias_correction = bool(bias_correction)
        self.beta1_t, self.beta2_t = Tensor(beta1, ms.float32), Tensor(beta2, ms.float32)
        self.adam = ops.AdamWeightDecay()

    def construct(self, grads, lr: Tensor, step: Tensor):
        b1, b2 = self.beta1, self.beta2
        if self.bias_correction:
            bc1 = 1.0 - ops.pow(b1, step)
            bc2 = 1.0 - ops.pow(b2, step)
        else:
            bc1 = ops.ones((), ms.float32)
            bc2 = ops.ones((), ms.float32)
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


def build_optimizer(section: OptimizerConfig, params: list) -> AdamW:
    """The optimizer of an `optimizer` section: bias correction only for type AdamW (see OPTIMIZERS)."""
    if not params:
        raise GLMError("optimizer: the model has no trainable parameters")
    return AdamW(params, section.beta1, section.beta2, section.eps, section.weight_decay,
                 bias_correction=OPTIMIZERS[section.type])
