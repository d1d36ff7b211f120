"""LR schedules, AdamW and the train step's global-norm clipping, against closed forms and numpy references.

Only public behaviour is used: `LRSchedule(...)(step)`, `AdamW(params, ...)` and its `(grads, lr, step)`
call's effect on the parameters, and `TrainStep(...).run(...)`'s results and effect on the parameters.
Everything runs in-process on small tensors (a few seconds, most of it graph compilation).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from glm import GLMError
from glm.optim import AdamW, LRSchedule, build_optimizer, build_schedule, lr_multiplier
from glm.runtime import ms, setup_context
from glm.settings import LRScheduleConfig, OptimizerConfig
from glm.train_step import TrainStep

LR = 1e-3


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    setup_context("CPU", 0)


# ------------------------------------------------------------------------------------------ schedules
def test_polynomial_without_warmup_starts_at_the_learning_rate():
    s = LRSchedule("polynomial", LR, total_steps=10, warmup_steps=0, lr_end=1e-5)
    assert s(0) > 0 and s(0) == pytest.approx(LR, rel=1e-12)       # the reference gives step 0 lr 0
    assert s(5) == pytest.approx((LR - 1e-5) * 0.5 + 1e-5, rel=1e-12)
    assert s(10) == pytest.approx(1e-5, rel=1e-12)                   # lr_end at total_steps
    assert s(20) == pytest.approx(1e-5, rel=1e-12)                   # and it stays there
    values = [s(t) for t in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_polynomial_warmup_rises_linearly_to_the_learning_rate_at_step_w_minus_1():
    w = 4
    s = LRSchedule("polynomial", LR, total_steps=12, warmup_steps=w)
    warm = [s(t) for t in range(w)]
    assert warm == pytest.approx([LR * (t + 1) / w for t in range(w)], rel=1e-12)
    assert warm[0] > 0 and warm[-1] == pytest.approx(LR, rel=1e-12)
    assert np.allclose(np.diff(warm), LR / w, rtol=1e-12)               # linear
    assert s(w) == pytest.approx(LR, rel=1e-12)                          # decay starts from the peak
    assert s(w + 4) == pytest.approx(LR * (1 - 4 / 8), rel=1e-12)
    assert s(12) == 0.0
    # warmup_lr_init: the ramp starts above it and still ends at learning_rate
    s = LRSchedule("polynomial", LR, total_steps=12, warmup_steps=w, warmup_lr_init=1e-4)
    assert s(0) == pytest.approx(1e-4 + (LR - 1e-4) / w, rel=1e-12) and s(w - 1) == pytest.approx(LR)
    # power 2
    s = LRSchedule("polynomial", LR, total_steps=10, power=2.0)
    assert s(5) == pytest.approx(LR * 0.25, rel=1e-12)


def test_cosine_and_constant_values():
    s = LRSchedule("cosine", LR, total_steps=10, warmup_steps=2, lr_end=1e-4)
    assert [s(0), s(1)] == pytest.approx([LR / 2, LR], rel=1e-12)
    assert s(2) == pytest.approx(LR, rel=1e-12)
    assert s(4) == pytest.approx(1e-4 + 0.5 * (LR - 1e-4) * (1 + math.cos(math.pi * 2 / 8)), rel=1e-12)
    assert s(6) == pytest.approx(1e-4 + 0.5 * (LR - 1e-4), rel=1e-12)   # half way: the mid point
    assert s(10) == pytest.approx(1e-4, rel=1e-12)
    c = LRSchedule("constant", LR, total_steps=10, warmup_steps=2)
    assert [c(t) for t in (0, 1, 2, 5, 9, 10)] == pytest.approx([LR / 2, LR, LR, LR, LR, LR], rel=1e-12)
    # MindFormers' names map to the same schedules
    assert LRSchedule("CosineWithWarmUpLR", LR, 10)(5) == LRSchedule("cosine", LR, 10)(5)
    assert LRSchedule("constant_with_warmup", LR, 10, 2)(0) == LRSchedule("ConstantWarmUpLR", LR, 10, 2)(0)
    with pytest.raises(GLMError, match="lr_schedule.type"):
        LRSchedule("cosine_with_restarts", LR, 10)


def test_linear_decays_to_zero_as_mindformers_linear_with_warmup():
    # MindFormers' LinearWithWarmUpLR after warmup: lr * (T - t) / (T - W), no lr_end.
    s = LRSchedule("linear", LR, total_steps=10, warmup_steps=2, lr_end=5e-4)
    assert [s(t) for t in (2, 6, 10)] == pytest.approx([LR, LR * 4 / 8, 0.0], rel=1e-12)
    assert s.lr_end == 0.0 and LRSchedule("LinearWithWarmUpLR", LR, 10)(3) == LRSchedule("linear", LR, 10)(3)


def test_cosine_num_cycles():
    s = LRSchedule("cosine", LR, total_steps=10, num_cycles=1.0)   # a full cosine wave: back up at the end
    assert s(5) == pytest.approx(0.0, abs=1e-15) and s(10) == pytest.approx(LR, rel=1e-12)


def _section(**kw) -> LRScheduleConfig:
    return dataclasses.replace(LRScheduleConfig(), **kw)


def test_build_schedule_reads_the_config_section():
    s = build_schedule(_section(type="polynomial", learning_rate=2e-3, warmup_ratio=0.1, lr_end=1e-5),
                       total_steps=100)
    assert [s(0), s(9), s(100)] == pytest.approx([2e-4, 2e-3, 1e-5], rel=1e-12)
    s = build_schedule(_section(learning_rate=1e-3, total_steps=20), total_steps=100)   # explicit total wins
    assert s(10) == pytest.approx(5e-4, rel=1e-12) and s(20) == 0.0
    s = build_schedule(_section(learning_rate=1e-3, warmup_epochs=0.5), total_steps=100, steps_per_epoch=20)
    assert s.warmup == 10
    # lr_scale: lr x global batch / lr_scale_factor (MindFormers), e.g. 64 / 256
    s = build_schedule(_section(learning_rate=1e-3, type="constant"), 100, scale=lr_multiplier(True, 256, 64))
    assert s(50) == pytest.approx(2.5e-4, rel=1e-12) and lr_multiplier(False, 256, 64) == 1.0


# ------------------------------------------------------------------------------------------ AdamW
def adamw_reference(p, grads, lrs, b1, b2, eps, wd, bias_correction=True):
    """Decoupled AdamW, float64: torch's AdamW (bias-corrected) or MindSpore's AdamWeightDecay (not)."""
    p = p.astype(np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if bias_correction else (1.0, 1.0)
        upd = (m / c1) / (np.sqrt(v / c2) + eps)
        p = p - lr * wd * p - lr * upd
    return p


def test_adamw_matches_numpy_and_decays_only_matrices():
    rs = np.random.RandomState(0)
    w0, b0 = rs.randn(3, 4).astype(np.float32), rs.randn(4).astype(np.float32)
    w = ms.Parameter(ms.Tensor(w0), name="opt_test.w")
    b = ms.Parameter(ms.Tensor(b0), name="opt_test.b")
    b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.5
    opt = AdamW([w, b], beta1=b1, beta2=b2, eps=eps, weight_decay=wd)
    gw = [rs.randn(3, 4).astype(np.float32) for _ in range(3)]
    gb = [rs.randn(4).astype(np.float32) for _ in range(3)]
    lrs = [0.1, 0.05, 0.02]
    for t in range(3):
        opt((ms.Tensor(gw[t]), ms.Tensor(gb[t])), ms.Tensor(lrs[t], ms.float32), ms.Tensor(float(t + 1), ms.float32))
    w_ref = adamw_reference(w0, gw, lrs, b1, b2, eps, wd)
    b_ref = adamw_reference(b0, gb, lrs, b1, b2, eps, 0.0)      # 1-D: no weight decay
    assert np.abs(w.asnumpy() - w_ref).max() < 1e-6
    assert np.abs(b.asnumpy() - b_ref).max() < 1e-6
    # The test can tell decay from no decay: the two references differ by far more than the tolerance.
    assert np.abs(adamw_reference(w0, gw, lrs, b1, b2, eps, 0.0) - w_ref).max() > 1e-2
    assert np.abs(adamw_reference(b0, gb, lrs, b1, b2, eps, wd) - b_ref).max() > 1e-2


@pytest.mark.parametrize("kind", ["AdamWeightDecay", "FP32StateAdamWeightDecay", "FusedAdamWeightDecay", "AdamW"])
def test_optimizer_types_compute_their_namesakes(kind):
    """AdamWeightDecay and its MindFormers variants: MindSpore's update, no bias correction; AdamW: torch's."""
    rs = np.random.RandomState(2)
    w0, h0 = rs.randn(3, 4).astype(np.float32), rs.randn(3, 4).astype(np.float16)
    w = ms.Parameter(ms.Tensor(w0), name=f"{kind}.w")                 # fp32: the fused kernel
    h = ms.Parameter(ms.Tensor(h0, ms.float16), name=f"{kind}.h")     # fp16: the elementwise path
    section = dataclasses.replace(OptimizerConfig(), type=kind, beta1=0.9, beta2=0.95, eps=1e-8,
                                  weight_decay=0.1)
    opt = build_optimizer(section, [w, h])
    grads = [rs.randn(3, 4).astype(np.float32) for _ in range(3)]
    lrs = [0.01, 0.01, 0.005]
    for t in range(3):
        g = ms.Tensor(grads[t])
        opt((g, g.astype(ms.float16)), ms.Tensor(lrs[t], ms.float32), ms.Tensor(float(t + 1), ms.float32))
    corrected = kind == "AdamW"
    ref = adamw_reference(w0, grads, lrs, 0.9, 0.95, 1e-8, 0.1, bias_correction=corrected)
    other = adamw_reference(w0, grads, lrs, 0.9, 0.95, 1e-8, 0.1, bias_correction=not corrected)
    assert np.abs(w.asnumpy() - ref).max() < 1e-6
    assert np.abs(other - ref).max() > 1e-3             # the two updates are far apart
    ref_h = adamw_reference(h0.astype(np.float32), grads, lrs, 0.9, 0.95, 1e-8, 0.1, bias_correction=corrected)
    assert np.abs(h.asnumpy().astype(np.float64) - ref_h).max() < 5e-3   # fp16 storage


def test_build_optimizer_needs_parameters():
    with pytest.raises(GLMError, match="no trainable parameters"):
        build_optimizer(OptimizerConfig(), [])


# ------------------------------------------------------------------------------------------ clipping
class Affine(ms.nn.Cell):
    """loss = mean((x W + b - y)^2): a 2-D and a 1-D parameter with closed-form gradients."""

    def __init__(self, w0, b0, tag):
        super().__init__()
        self.w = ms.Parameter(ms.Tensor(w0), name=f"{tag}.w")
        self.b = ms.Parameter(ms.Tensor(b0), name=f"{tag}.b")

    def construct(self, x, y, positions=None, segments=None, label_rows=None):
        # TrainStep passes the model's five inputs (glm/train_step.py); the packing ones are unused here.
        return ms.ops.square(ms.ops.matmul(x, self.w) + self.b - y).mean()


def affine_grads(w, b, x, y):
    d = 2.0 * (x @ w + b - y) / y.size
    return x.T @ d, d.sum(0)


@pytest.mark.parametrize("max_norm", [1e-3, None], ids=["clipped", "unclipped"])
def test_train_step_clips_the_global_norm_and_returns_the_pre_clip_norm(max_norm):
    rs = np.random.RandomState(1)
    w0, b0 = rs.randn(5, 3).astype(np.float32), rs.randn(3).astype(np.float32)
    batches = [(rs.randn(8, 5).astype(np.float32), rs.randn(8, 3).astype(np.float32)) for _ in range(2)]
    model = Affine(w0, b0, f"clip_{max_norm}")
    # eps 1: the update is ~ the gradient itself, so clipping shows in the weights (with eps 1e-8 Adam's
    # normalisation would hide the clipping scale).
    b1, b2, eps, lr = 0.9, 0.95, 1.0, 0.1
    opt = AdamW(model.trainable_params(), beta1=b1, beta2=b2, eps=eps, weight_decay=0.0)
    step = TrainStep(model, opt, max_norm, None, 1)

    w, b = w0.astype(np.float64), b0.astype(np.float64)
    mw, vw, mb, vb = 0.0, 0.0, 0.0, 0.0
    for t, (x, y) in enumerate(batches, start=1):
        loss, finite, norm = step.run([(x, y)], [1.0], lr, t)
        gw, gb = affine_grads(w, b, x, y)
        ref_norm = math.sqrt((gw ** 2).sum() + (gb ** 2).sum())
        assert finite and loss == pytest.approx(((x @ w + b - y) ** 2).mean(), rel=1e-5)
        assert norm == pytest.approx(ref_norm, rel=1e-5)           # before clipping
        factor = min(1.0, max_norm / ref_norm) if max_norm else 1.0
        if max_norm:
            assert factor < 1e-2                                     # the clip really bites
        gw, gb = gw * factor, gb * factor
        mw, vw = b1 * mw + (1 - b1) * gw, b2 * vw + (1 - b2) * gw ** 2
        mb, vb = b1 * mb + (1 - b1) * gb, b2 * vb + (1 - b2) * gb ** 2
        w = w - lr * (mw / (1 - b1 ** t)) / (np.sqrt(vw / (1 - b2 ** t)) + eps)
        b = b - lr * (mb / (1 - b1 ** t)) / (np.sqrt(vb / (1 - b2 ** t)) + eps)
        assert np.abs(model.w.asnumpy() - w).max() < 1e-6
        assert np.abs(model.b.asnumpy() - b).max() < 1e-6
    # The clipped and the unclipped trajectories are far apart, so each case tests its own path.
    if max_norm:
        assert np.abs(model.w.asnumpy() - w0).max() < 1e-3
    else:
        assert np.abs(model.w.asnumpy() - w0).max() > 1e-2
