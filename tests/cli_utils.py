"""Helpers for tests that drive `run_glm.py` as a user would: a subprocess in the repo root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY2 = "configs/glm2/run_glm2_tiny.yaml"
TINY2_LORA = "configs/glm2/run_glm2_tiny_lora.yaml"
TINY2_PTUNING = "configs/glm2/run_glm2_tiny_ptuning2.yaml"
# Fast settings for tests: a short warmup; no PNG curves (matplotlib costs ~1-2 s per run; the runs that
# check the curves turn them back on with runner_config.plot_curves=True).
FAST = ["lr_schedule.warmup_steps=2", "runner_config.plot_curves=False"]


def run_glm(*args: str, check: bool = True, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "run_glm.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"run_glm.py {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def read_ckpt(path: str | Path) -> dict[str, np.ndarray]:
    from glm.runtime import ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items() if hasattr(v, "asnumpy")}


def max_diff(a: dict, b: dict, prefix: str = "transformer.") -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in keys)
