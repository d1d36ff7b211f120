"""Real data-parallel training on CPU: scripts/run_distribute.sh (msrun form, glm/launch.py) with 2 ranks of the
tiny finetune, compared with one process at twice the batch; key=value overrides reach every rank; a killed
rank stops the job; merging per-rank checkpoints."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_utils import REPO, TINY2, max_diff, read_ckpt, run_glm

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("setsid") is None or shutil.which("pgrep") is None,
                                 reason="needs setsid and pgrep (util-linux, procps)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(tmp: Path, out: Path, **runner) -> Path:
    """The tiny config with an absolute output_dir and its data paths made absolute."""
    from glm.config import load_config

    cfg = load_config(REPO / TINY2)
    cfg["output_dir"] = str(out)
    cfg["runner_config"].update(runner)
    for name in ("train_dataset", "eval_dataset"):
        cfg[name]["data_loader"]["dataset_dir"] = str(REPO / cfg[name]["data_loader"]["dataset_dir"])
        cfg[name]["tokenizer"]["vocab_file"] = str(REPO / cfg[name]["tokenizer"]["vocab_file"])
    for key in ("train_dataset_task", "eval_dataset_task"):
        cfg.pop(key, None)
    path = tmp / f"cfg_{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def launch_env() -> dict:
    return {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "CLUSTER_TIME_OUT": "60"}


def launch(cfg: Path, cwd: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts/run_distribute.sh"), "none", str(cfg), "[0,2]", "finetune",
                           *overrides], cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=timeout)


def net(out: Path, rank: int) -> dict:
    return read_ckpt(out / "checkpoint_network" / f"rank_{rank}" / f"glm2-tiny_rank_{rank}-network.ckpt")


def assert_same_training(a: Path, b: Path, eps: float = 1e-8) -> None:
    """The two runs' weights agree to 1e-6 wherever the gradient is above Adam's noise floor.

    The two runs sum the same per-token gradients in a different order (two half batches + all-reduce vs one
    batch), so each gradient differs by float rounding (~1e-7 relative). Adam divides by sqrt(v) + eps: where
    |g| >> eps that rounding stays ~1e-7 in the weights, but where the true gradient is ~0 (the key bias, whose
    gradient softmax cancels exactly; an embedding entry that cancels by chance) the gradient IS rounding
    noise and Adam turns it into an lr-sized step. Measured (3 steps, lr sum 2e-3): where sqrt(v) >= eps the
    max difference is 1.4e-7; the only entries above 1e-6 (1.0e-5 for embedding[994, 102]; 1.2e-6 for key
    biases with optimizer AdamW) all had sqrt(v) < 1e-9. A real mismatch (mean vs sum, another lr, other
    data) moves the weights with real gradients, which stay held to 1e-6.
    """
    ckpt_a = read_ckpt(a / "checkpoint" / "rank_0" / "glm2-tiny_rank_0-1_3.ckpt")
    ckpt_b = read_ckpt(b / "checkpoint" / "rank_0" / "glm2-tiny_rank_0-1_3.ckpt")
    keys = [k for k in ckpt_a if k.startswith("transformer.")]
    assert keys and set(keys) == {k for k in ckpt_b if k.startswith("transformer.")}
    signal_diff = noise_diff = 0.0
    for k in keys:
        diff = np.abs(ckpt_a[k].astype(np.float64) - ckpt_b[k])
        signal = np.sqrt(np.minimum(ckpt_a["adam_v." + k], ckpt_b["adam_v." + k])) >= eps
        signal_diff = max(signal_diff, float(diff[signal].max(initial=0.0)))
        noise_diff = max(noise_diff, float(diff[~signal].max(initial=0.0)))
    assert signal_diff <= 1e-6
    # Noise-level entries: bounded by a tenth of the largest step Adam can take in 3 steps (lr sum 2e-3
    # x (1 - b1) / sqrt(1 - b2) = 9e-4); measured 1.0e-5.
    assert noise_diff <= 1e-4


def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    dp = tmp_path / "dp"
    # The step limit and the output folder come as key=value overrides: both ranks must apply them.
    r = launch(make_config(tmp_path, tmp_path / "unused", batch_size=2), tmp_path, "runner_config.max_steps=3",
               f"output_dir={dp}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not (tmp_path / "unused").exists()
    for rank in (0, 1):
        log = (dp / "log" / f"rank_{rank}" / "glm.log").read_text()
        assert "world 2" in log and "done: 3 steps" in log
    assert max_diff(net(dp, 0), net(dp, 1)) == 0.0
    single = tmp_path / "single"
    run_glm("--config", TINY2, "--run_mode", "finetune", "--output_dir", str(single), "--batch_size", "4",
            "--max_steps", "3")
    assert_same_training(dp, single)
    # The logged loss is the global batch's, so it matches the single process too.
    dp_loss = [line for line in (dp / "metrics.jsonl").read_text().splitlines()]
    one_loss = [line for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [yaml.safe_load(a)["loss"] for a in dp_loss] == pytest.approx(
        [yaml.safe_load(b)["loss"] for b in one_loss], abs=1e-5)

    # Per-rank checkpoints merge into one file holding the trained weights.
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "glm", "transform-ckpt", "--src_ckpt_dir",
                    str(dp / "checkpoint_network"), "--dst_ckpt_dir", str(merged), "--prefix", "glm2_tiny"],
                   check=True, cwd=REPO, capture_output=True, text=True)
    files = list(merged.rglob("*.ckpt"))
    assert len(files) == 1
    # It is rank 0's network file, which equals the single process's (above): the file eval/predict load.
    assert max_diff(read_ckpt(files[0]), net(dp, 0)) == 0.0


def test_a_killed_rank_stops_the_job_within_60s(tmp_path):
    out = tmp_path / "killed"
    cfg = make_config(tmp_path, out, batch_size=2, epochs=50)   # long enough to be killed mid-run
    p = subprocess.Popen(["bash", str(REPO / "scripts/run_distribute.sh"), "none", str(cfg), "[0,2]", "finetune"],
                         cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Kill rank 1 once both ranks train: rank 0 (the only one that prints steps) has logged its first step.
    log = out / "log" / "rank_0" / "glm.log"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and "step 1/" in log.read_text(errors="replace")):
        time.sleep(0.5)
    assert p.poll() is None, p.communicate()
    victims = [pid for pid in _pids(str(cfg)) if _env(pid).get("RANK_ID") == "1" and _env(pid).get("MS_ROLE") !=
               "MS_SCHED"]
    assert victims, "rank 1 worker not found"
    killed_at = time.time()
    os.kill(victims[0], signal.SIGKILL)
    try:
        _, err = p.communicate(timeout=90)
    finally:
        p.kill()
    assert p.returncode != 0
    assert time.time() - killed_at < 60
    assert f"rank 1 failed (killed by SIGKILL); see its log: {out}/log/rank_1/glm.log" in err
    time.sleep(1)
    assert not _pids(str(cfg)), "processes left behind"


def _pids(marker: str) -> list[int]:
    r = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def _env(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(x.decode(errors="replace").split("=", 1) for x in raw if b"=" in x)
