"""Shared test fixtures: tiny trained runs, built once per test session and reused by every test file.

Each training subprocess costs ~10-15 s of start-up and graph compilation before its first step, so a
test that needs "some trained weights" or "a run folder with checkpoints" takes one of these instead of
training its own. They are built on first use (a session that never asks for one never pays for it) and,
under pytest-xdist, by one worker while the others wait for it (a file lock in the session's base temp).

The folders are shared: treat them as READ-ONLY. To resume, corrupt or extend a run, copy it first:
`run.copy_to(tmp_path / "x")` (a full copy whose files you may change) — never write into `run.out`.

Session fixtures (all from configs/glm2/run_glm2_tiny*.yaml, `--load_checkpoint random`, warmup 2):

- `tiny_run` -> TinyRun: 8 steps, checkpoints every 2 steps, keep 3. `out` holds
  checkpoint/rank_0/glm2-tiny_rank_0-1_{4,6,8}.ckpt (resumable train state), `weights` =
  checkpoint_network/rank_0/glm2-tiny_rank_0-network.ckpt, metrics.jsonl, train_summary.json,
  data_stats.json, config.resolved.yaml, log/glm.log, plots/*.png and TensorBoard events under
  tensorboard/<run_id>/ (`tensorboard.tensorboard_dir` on). `args` are its CLI arguments after
  `run_glm.py`, so a test can run the same command (e.g. with `--resume_training`) in a copy.
- `tiny_trained` -> TinyRun: 30 steps (loss ~7.5 -> ~3.2), weights only (no train-state checkpoints):
  the model for eval / predict / chat / serve / export tests; it answers in ADGEN-like text.
- `tiny_lora` -> TinyRun: a rank-8 LoRA adapter on the fused query_key_value of both layers, 4 steps on
  `tiny_run.weights`; `weights` = checkpoint_network/rank_0/glm2-tiny-lora_rank_0-adapter.ckpt (it
  records its base checkpoint, so `--load_checkpoint <adapter>` alone loads base + adapter).
- `tiny_ptuning` -> TinyRun: a P-Tuning v2 prefix (pre_seq_len 16) trained 12 steps on `tiny_trained.weights`
  (configs/glm2/run_glm2_tiny_ptuning2.yaml); `weights` = checkpoint_network/rank_0/
  glm2-tiny-ptuning2_rank_0-adapter.ckpt, the prefix only (it records its base, like the LoRA adapter).

TinyRun also gives `records` / `losses` (metrics.jsonl), `summary` (train_summary.json) and `log`
(log/glm.log: everything the run printed). Helpers for driving the CLI are in tests/cli_utils.py.

The suite runs on one pytest-xdist worker per core (setup.cfg's addopts: `-n auto`; `-n 0` runs it in one
process, e.g. with --pdb): keep new tests independent of order and of other tests' files.

Markers: `slow` (multi-process or long runs, > ~20 s; every test that uses a shared run is marked
automatically) runs in CI like every other test; deselect it locally with `-m "not slow"`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_utils import FAST, TINY2, TINY2_LORA, TINY2_PTUNING, run_glm


@dataclass(frozen=True)
class TinyRun:
    out: Path                  # the run's output_dir: read-only, copy_to() before writing
    weights: Path              # the final weights file (network or LoRA adapter)
    config: str                # config path relative to the repo root
    args: tuple[str, ...]      # the run's arguments after run_glm.py (its --output_dir is `out`)

    @property
    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "train_summary.json").read_text())

    @property
    def log(self) -> str:
        return (self.out / "log" / "glm.log").read_text(encoding="utf-8")

    def copy_to(self, dest: Path) -> Path:
        """A private copy of the run folder (checkpoints included) to resume or damage."""
        shutil.copytree(self.out, dest)
        return dest


SHARED_RUNS = frozenset({"tiny_run", "tiny_trained", "tiny_lora"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs a shared run may pay for training it: it is `slow` (deselect with -m "not slow")."""
    for item in items:
        if SHARED_RUNS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _shared(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` once per session, also across xdist workers (who share the base temp's parent)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / "shared-runs" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    done = folder.parent / f"{name}.done"
    with open(folder.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)   # a half-built folder of a failed attempt
            build(folder)
            done.write_text("ok")
    return folder


def _run_args(out: Path) -> tuple[str, ...]:
    return ("--config", TINY2, "--run_mode", "finetune", "--output_dir", str(out), "--load_checkpoint", "random",
            "--max_steps", "8", *FAST, "runner_config.plot_curves=True",
            f"tensorboard.tensorboard_dir={out / 'tensorboard'}", "callbacks.CheckpointMonitor.save_checkpoint_steps=2",
            "callbacks.CheckpointMonitor.keep_checkpoint_max=3")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    out = _shared(tmp_path_factory, "tiny_run", lambda o: run_glm(*_run_args(o)))
    return TinyRun(out, out / "checkpoint_network/rank_0/glm2-tiny_rank_0-network.ckpt", TINY2, _run_args(out))


TRAINED_STEPS = 30


def _trained_args(out: Path) -> tuple[str, ...]:
    return ("--config", TINY2, "--run_mode", "finetune", "--output_dir", str(out), "--load_checkpoint", "random",
            "--max_steps", str(TRAINED_STEPS), *FAST, "callbacks.CheckpointMonitor.save_checkpoint_steps=1000",
            "lr_schedule.total_steps=300")   # the schedule the eval/predict tests were tuned on (max_steps alone
    # now shortens it to 30 steps, as in HF Trainer)


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> TinyRun:
    out = _shared(tmp_path_factory, "tiny_trained", lambda o: run_glm(*_trained_args(o)))
    return TinyRun(out, out / "checkpoint_network/rank_0/glm2-tiny_rank_0-network.ckpt", TINY2, _trained_args(out))


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, tiny_run) -> TinyRun:
    def args(out: Path) -> tuple[str, ...]:
        return ("--config", TINY2_LORA, "--run_mode", "finetune", "--output_dir", str(out), "--load_checkpoint",
                str(tiny_run.weights), "--max_steps", "4", *FAST)

    out = _shared(tmp_path_factory, "tiny_lora", lambda o: run_glm(*args(o)))
    return TinyRun(out, out / "checkpoint_network/rank_0/glm2-tiny-lora_rank_0-adapter.ckpt", TINY2_LORA, args(out))


PTUNING_STEPS = 12


@pytest.fixture(scope="session")
def tiny_ptuning(tmp_path_factory, tiny_trained) -> TinyRun:
    def args(out: Path) -> tuple[str, ...]:
        return ("--config", TINY2_PTUNING, "--run_mode", "finetune", "--output_dir", str(out), "--load_checkpoint",
                str(tiny_trained.weights), "--max_steps", str(PTUNING_STEPS), *FAST,
                "callbacks.CheckpointMonitor.save_checkpoint_steps=1000")

    out = _shared(tmp_path_factory, "tiny_ptuning", lambda o: run_glm(*args(o)))
    return TinyRun(out, out / "checkpoint_network/rank_0/glm2-tiny-ptuning2_rank_0-adapter.ckpt", TINY2_PTUNING,
                   args(out))
