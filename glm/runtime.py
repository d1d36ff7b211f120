"""MindSpore process set-up: log level, device, execution mode and dtypes.

Everything that must happen before or right after `import mindspore` lives here, so the rest of the
package can simply `import mindspore as ms`.
"""

from __future__ import annotations

import sys

import mindspore as ms  # glm/__init__.py has already set GLOG_v

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
_warned_bf16 = False


def setup_context(device_target: str = "CPU", mode: int = 0, device_id: int | None = None,
                  max_device_memory: str | None = None) -> None:
    """Select the device and the execution mode (0 graph, 1 PyNative)."""
    try:
        if device_id is not None and device_target != "CPU":
            ms.set_device(device_target, int(device_id))
        else:
            ms.set_device(device_target)
    except RuntimeError:
        # Once kernels ran the device is fixed; asking again for the same one (a second set-up in the
        # same process, e.g. in-process tests) is fine, only another one is an error.
        if ms.get_context("device_target") != device_target:
            raise
    ms.set_context(mode=int(mode))
    if max_device_memory and device_target == "Ascend":
        ms.set_context(max_device_memory=max_device_memory)
    if int(mode) == 1 and device_target == "CPU":
        # Async PyNative is ~12x slower on a small CPU box: its launch threads fight for the cores.
        ms.runtime.launch_blocking()


def device_target() -> str:
    return ms.get_context("device_target")


def resolve_dtype(name: str, what: str = "dtype") -> ms.Type:
    """Map a config dtype string to a MindSpore type; bf16 has no CPU kernels, so it falls back to fp32."""
    global _warned_bf16
    if name not in _DTYPES:
        from glm import GLMError

        raise GLMError(f"{what}: expected one of {sorted(_DTYPES)}, got {name!r}")
    dtype = _DTYPES[name]
    if dtype == ms.bfloat16 and device_target() == "CPU":
        if not _warned_bf16:
            print("warning: bfloat16 has no CPU kernels in MindSpore; computing in float32 instead",
                  file=sys.stderr)
            _warned_bf16 = True
        return ms.float32
    return dtype
