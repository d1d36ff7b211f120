"""Dropout with a saveable random state, so that a resumed run draws the masks the uninterrupted run drew.

MindSpore's `nn.Dropout` (the `Dropout` kernel) keeps its random state inside the compiled kernel: it is
seeded when the graph is built, advances on every call, and can be neither read nor set. A process that
resumes at step N therefore restarts the mask sequence from step 0. (The generator-driven `DropoutExt`,
whose state `ms.get_rng_state()` exposes, has no CPU kernel in MindSpore 2.10.)

`CountedDropout` instead derives each mask from a counter-based hash: every call reads and increments one
int64 counter Parameter (shared by all dropout layers, in call order, which the graph's side-effect
ordering keeps fixed) and hashes (seed, rank, counter, element index) into a uniform number with integer
ops that exist on every backend. The counter is the whole random state: the trainer saves it with the
checkpoint and restores it on resume. The counter is held by a `jit_class` object, not a Cell, so it is
not one of the model's parameters (weights files and parameter counts are unchanged).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from glm.runtime import ms

_M31 = 0x7FFFFFFF          # hash values stay below 2**31, so int64 products never overflow
_MUL = 0x45D9F3B           # < 2**27
COUNTER_NAME = "rng.dropout_counter"


def _mix(x: Tensor) -> Tensor:
    """A 31-bit integer finaliser (xor-shift / multiply rounds) on int64 values in [0, 2**31)."""
    x = ops.bitwise_xor(x, ops.floor_div(x, 65536))
    x = ops.bitwise_and(x * _MUL, _M31)
    x = ops.bitwise_xor(x, ops.floor_div(x, 65536))
    x = ops.bitwise_and(x * _MUL, _M31)
    return ops.bitwise_xor(x, ops.floor_div(x, 65536))


def _mix_int(x: int) -> int:
    """`_mix` on the host, for the constant part of the key."""
    x &= _M31
    for _ in range(2):
        x ^= x >> 16
        x = (x * _MUL) & _M31
    return x ^ (x >> 16)


@ms.jit_class
class DropoutState:
    """The random state of every `CountedDropout` of a model: a call counter (saved in checkpoints)."""

    def __init__(self, seed: int, rank: int = 0):
        self.counter = Parameter(Tensor(np.zeros((1,), np.int64)), name=COUNTER_NAME, requires_grad=False)
        self.one = Tensor(np.ones((1,), np.int64))
        self.key = _mix_int(_mix_int(int(seed)) ^ (int(rank) * 0x2545F49 & _M31))

    def value(self) -> int:
        return int(self.counter.asnumpy()[0])


class CountedDropout(nn.Cell):
    """Inverted dropout (as `nn.Dropout`): zero with probability p while training, scale the rest by 1/(1-p)."""

    def __init__(self, p: float, state: DropoutState, stream: int):
        super().__init__()
        self.p = float(p)
        self.scale = 1.0 / (1.0 - self.p)
        self.state = state
        self.stream = (int(stream) * 0x3C6EF35 + state.key) & _M31

    def construct(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        count = self.state.counter * 1
        ops.assign_add(self.state.counter, self.state.one)
        salt = _mix(ops.bitwise_and(count * 0x1B873593 + self.stream, _M31))
        idx = ops.arange(0, x.size, dtype=ms.int64).reshape(x.shape)
        bits = _mix(ops.bitwise_xor(_mix(idx), salt))
        keep = bits.astype(ms.float32) * (1.0 / 2147483648.0) >= self.p
        return x * ops.stop_gradient(keep.astype(x.dtype)) * self.scale

    def extend_repr(self) -> str:
        return f"p={self.p}"


def use_counted_dropout(model: nn.Cell, seed: int, rank: int = 0) -> Optional[DropoutState]:
    """Replace every active `nn.Dropout` in `model` by a `CountedDropout` sharing one state; None if there
    is no dropout (p = 0 everywhere)."""
    found = [(name, cell) for name, cell in model.cells_and_names()
             if name and isinstance(cell, nn.Dropout) and float(cell.p or 0.0) > 0.0]
    if not found:
        return None
    state = DropoutState(seed, rank)
    for i, (name, cell) in enumerate(found):
        parent_name, _, attr = name.rpartition(".")
        parent = model
        for part in parent_name.split(".") if parent_name else []:
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        setattr(parent, attr, CountedDropout(cell.p, state, i))
    return state
