"""scripts/run_standalone.sh and scripts/run_distribute.sh, driven with a stand-in for run_glm.py.

The stand-in (tests/fixtures/fake_worker.py) is copied to a uniquely named file per test, so
`pgrep -f <name>` finds every process a launch left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STANDALONE = REPO / "scripts" / "run_standalone.sh"
DISTRIBUTE = REPO / "scripts" / "run_distribute.sh"
FAKE = Path(__file__).resolve().parent / "fixtures" / "fake_worker.py"

pytestmark = pytest.mark.skipif(shutil.which("setsid") is None or shutil.which("pgrep") is None,
                                reason="needs setsid and pgrep (util-linux, procps)")


def pids_matching(marker: str) -> list[int]:
    r = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


@pytest.fixture
def job(tmp_path: Path):
    """A working directory with a config, a 2-device rank table and a uniquely named stand-in."""
    marker = f"glm_fake_{uuid.uuid4().hex[:12]}"
    entry = tmp_path / f"{marker}.py"
    shutil.copy(FAKE, entry)
    (tmp_path / "cfg.yaml").write_text("seed: 0\noutput_dir: 'out'   # relative to $PWD\nparallel:\n"
                                       "  output_dir: nested_is_ignored\n")
    write_rank_table(tmp_path / "rt.json", 2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "GLM_", "RANK_", "MS_"))}
    env.update(PYTHON=sys.executable, GLM_ENTRY=str(entry), GLM_KILL_TIMEOUT="3",
               MASTER_PORT=str(free_port()), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")

    class Job:
        cwd = tmp_path
        out = tmp_path / "out"

        def __init__(self) -> None:
            self.marker = marker
            self.env = env

        def run(self, script: Path, *args: str, timeout: float = 90, **extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env={**self.env, **extra},
                                  capture_output=True, text=True, timeout=timeout)

        def log(self, rank: int) -> str:
            return (self.out / "log" / f"rank_{rank}" / "glm.log").read_text()

    yield Job()
    for pid in pids_matching(marker):  # never leave a stray stand-in behind, even when a test fails
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def write_rank_table(path: Path, n: int) -> None:
    devices = [{"device_id": str(i), "device_ip": f"192.168.1.{i + 1}", "rank_id": str(i)} for i in range(n)]
    path.write_text(json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                                "server_list": [{"server_id": "10.0.0.1", "device": devices}]}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_env(log: str) -> dict[str, str]:
    line = next(x for x in log.splitlines() if x.startswith("FAKE_WORKER MS_ROLE"))
    fields, _, argv = line[len("FAKE_WORKER "):].partition(" ARGV=")
    env = dict(f.split("=", 1) for f in fields.split())
    env["ARGV"] = argv
    return env


# ----------------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ([], "expected 3 arguments, got 0"),
    (["cfg.yaml", "0"], "expected 3 arguments, got 2"),
    (["cfg.yaml", "0", "train", "x"], "expected 3 arguments, got 4"),
    (["missing.yaml", "0", "train"], "not found"),
    (["cfg.yaml", "zero", "train"], "DEVICE_ID must be"),
    (["cfg.yaml", "0", "serve"], "RUN_STATUS must be"),
])
def test_standalone_bad_arguments(job, args: list[str], message: str) -> None:
    r = job.run(STANDALONE, *args)
    assert r.returncode != 0
    assert message in r.stderr and "Usage: bash scripts/run_standalone.sh" in r.stderr
    assert not job.out.exists()


@pytest.mark.parametrize("args, message", [
    (["rt.json", "cfg.yaml", "[0,2]"], "expected 4 to 6 arguments, got 3"),
    (["rt.json", "cfg.yaml", "[0,2]", "predict", "4", "data", "x"], "expected 4 to 6 arguments, got 7"),
    (["rt.json", "cfg.yaml", "0,2", "train"], "DEVICE_RANGE must look like [0,8]"),
    (["rt.json", "cfg.yaml", "[0,2)", "train"], "DEVICE_RANGE must look like [0,8]"),
    (["rt.json", "cfg.yaml", "[a,2]", "train"], "DEVICE_RANGE must look like [0,8]"),
    (["rt.json", "cfg.yaml", "[3,1]", "train"], "START must be smaller than END"),
    (["rt.json", "cfg.yaml", "[2,2]", "train"], "START must be smaller than END"),
    (["missing.json", "cfg.yaml", "[0,2]", "train"], "rank table"),
    (["rt.json", "missing.yaml", "[0,2]", "train"], "config file"),
    (["rt.json", "cfg.yaml", "[0,2]", "export"], "RUN_STATUS must be"),
    (["rt.json", "cfg.yaml", "[0,2]", "train", "two"], "RANK_SIZE must be"),
    (["rt.json", "cfg.yaml", "[0,8]", "train", "4"], "RANK_SIZE 4 is too small"),
    (["rt.json", "cfg.yaml", "[0,2]", "train", "2", "data"], "only accepted with RUN_STATUS predict"),
])
def test_distribute_bad_arguments(job, args: list[str], message: str) -> None:
    r = job.run(DISTRIBUTE, *args)
    assert r.returncode != 0
    assert message in r.stderr and "Usage: bash scripts/run_distribute.sh" in r.stderr
    assert not job.out.exists()


def test_distribute_invalid_rank_table(job) -> None:
    write_rank_table(job.cwd / "rt4.json", 4)
    r = job.run(DISTRIBUTE, "rt4.json", "cfg.yaml", "[0,2]", "train")
    assert r.returncode != 0 and "it has 4 ranks but RANK_SIZE is 2" in r.stderr
    (job.cwd / "bad.json").write_text('{"version": "1.0"}')
    r = job.run(DISTRIBUTE, "bad.json", "cfg.yaml", "[0,2]", "train")
    assert r.returncode != 0 and "bad.json" in r.stderr and "status" in r.stderr
    assert not pids_matching(job.marker)


# ----------------------------------------------------------------------------------------------
# dry run
# ----------------------------------------------------------------------------------------------

def test_dry_runs(job) -> None:
    r = job.run(STANDALONE, "cfg.yaml", "3", "export", GLM_LAUNCH_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert "DEVICE_ID=3" in r.stdout and "--use_parallel False" in r.stdout and "--device_id 3" in r.stdout
    assert f"--output_dir {job.out}" in r.stdout
    r = job.run(DISTRIBUTE, "rt.json", "cfg.yaml", "[0,2]", "finetune", GLM_LAUNCH_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        assert f"RANK_TABLE_FILE={job.cwd}/rt.json RANK_ID={rank} DEVICE_ID={rank} RANK_SIZE=2" in r.stdout
        assert f"log {job.out}/log/rank_{rank}/glm.log" in r.stdout
    r = job.run(DISTRIBUTE, "none", "cfg.yaml", "[0,2]", "train", GLM_LAUNCH_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert "--worker_num=2 --local_worker_num=2" in r.stdout and "--join=True" in r.stdout
    assert f"--log_dir={job.out}/log/msrun" in r.stdout and "--node_rank=0" in r.stdout
    assert not job.out.exists() and not pids_matching(job.marker)


# ----------------------------------------------------------------------------------------------
# standalone
# ----------------------------------------------------------------------------------------------

def test_standalone_runs_and_logs(job) -> None:
    r = job.run(STANDALONE, "cfg.yaml", "1", "eval")
    assert r.returncode == 0, r.stderr
    env = fake_env(job.log(0))
    assert env["DEVICE_ID"] == "1" and env["RANK_ID"] == ""
    assert env["ARGV"] == (f"--config {job.cwd}/cfg.yaml --use_parallel False --run_mode eval "
                           f"--device_id 1 --output_dir {job.out}")
    r = job.run(STANDALONE, "cfg.yaml", "0", "train", FAKE_FAIL_RANK="", FAKE_FAIL_CODE="4")
    assert r.returncode == 0
    r = job.run(STANDALONE, "cfg.yaml", "0", "train", RANK_ID="0", FAKE_FAIL_RANK="0", FAKE_FAIL_CODE="4",
                FAKE_FAIL_AFTER="0")
    assert r.returncode == 4 and "see " + str(job.out / "log/rank_0/glm.log") in r.stderr


# ----------------------------------------------------------------------------------------------
# rank-table launch
# ----------------------------------------------------------------------------------------------

def test_rank_table_all_succeed(job) -> None:
    r = job.run(DISTRIBUTE, "rt.json", "cfg.yaml", "[0,2]", "finetune", FAKE_SLEEP="1")
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        env = fake_env(job.log(rank))
        assert (env["RANK_ID"], env["DEVICE_ID"], env["RANK_SIZE"]) == (str(rank), str(rank), "2")
        assert env["RANK_TABLE_FILE"] == str(job.cwd / "rt.json")
        assert env["ARGV"] == (f"--config {job.cwd}/cfg.yaml --use_parallel True --run_mode finetune "
                               f"--output_dir {job.out}")
    assert not pids_matching(job.marker)


def test_rank_table_single_node_offset_range(job) -> None:
    r = job.run(DISTRIBUTE, "rt.json", "cfg.yaml", "[4,6]", "predict", "hello world")
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        env = fake_env(job.log(rank))
        assert (env["RANK_ID"], env["DEVICE_ID"], env["RANK_SIZE"]) == (str(rank), str(4 + rank), "2")
        assert env["ARGV"].endswith("--run_mode predict --output_dir " + str(job.out) + " --predict_data hello world")


def test_rank_table_multi_node_numbering(job) -> None:
    write_rank_table(job.cwd / "rt4.json", 4)
    r = job.run(DISTRIBUTE, "rt4.json", "cfg.yaml", "[2,4]", "predict", "4", "data.json")
    assert r.returncode == 0, r.stderr
    for rank in (2, 3):
        env = fake_env(job.log(rank))
        assert (env["RANK_ID"], env["DEVICE_ID"], env["RANK_SIZE"]) == (str(rank), str(rank - 2), "4")
        assert env["ARGV"].endswith("--predict_data data.json")
    assert not (job.out / "log" / "rank_0").exists()


def test_rank_table_failure_stops_everything(job) -> None:
    start = time.monotonic()
    r = job.run(DISTRIBUTE, "rt.json", "cfg.yaml", "[0,2]", "train", FAKE_FAIL_RANK="1", FAKE_FAIL_CODE="3",
                FAKE_FAIL_AFTER="1", FAKE_SLEEP="300", FAKE_SPAWN_CHILD="1")
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    assert elapsed < 60, elapsed
    assert f"rank 1 failed (exit code 3); see its log: {job.out}/log/rank_1/glm.log" in r.stderr
    assert "FAKE_WORKER rank 1 failing" in r.stderr  # the tail of the failed rank's log is shown
    assert not pids_matching(job.marker)


def test_rank_table_sigterm_stops_ranks(job) -> None:
    proc = subprocess.Popen(["bash", str(DISTRIBUTE), "rt.json", "cfg.yaml", "[0,2]", "train"], cwd=job.cwd,
                            env={**job.env, "FAKE_SLEEP": "300", "FAKE_SPAWN_CHILD": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(pids_matching(job.marker)) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(pids_matching(job.marker)) == 4  # 2 ranks + 2 grandchildren
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "interrupted" in err
    assert not pids_matching(job.marker)


# ----------------------------------------------------------------------------------------------
# msrun launch (no rank table)
# ----------------------------------------------------------------------------------------------

def test_msrun_all_succeed(job) -> None:
    r = job.run(DISTRIBUTE, "none", "cfg.yaml", "[0,2]", "train", FAKE_SLEEP="1")
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        assert (job.out / "log" / f"rank_{rank}" / "glm.log").is_symlink()
        env = fake_env(job.log(rank))
        assert (env["MS_ROLE"], env["RANK_ID"], env["RANK_SIZE"]) == ("MS_WORKER", str(rank), "2")
        assert env["MS_WORKER_NUM"] == "2"
        assert env["ARGV"] == (f"--config {job.cwd}/cfg.yaml --use_parallel True --run_mode train "
                               f"--output_dir {job.out}")
    assert (job.out / "log" / "msrun" / "scheduler.log").is_file()
    assert not pids_matching(job.marker)


def test_msrun_worker_failure(job) -> None:
    # FAKE_SCHED_SLEEP imitates the real scheduler, which only notices a dead worker after a ~30 s
    # heartbeat time-out: the launcher kills the job GLM_MSRUN_GRACE seconds after the failure.
    start = time.monotonic()
    r = job.run(DISTRIBUTE, "--msrun", "cfg.yaml", "[0,2]", "finetune", FAKE_FAIL_RANK="1",
                FAKE_FAIL_AFTER="1", FAKE_SLEEP="300", FAKE_SCHED_SLEEP="300", FAKE_SPAWN_CHILD="1",
                GLM_MSRUN_GRACE="3")
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    assert elapsed < 60, elapsed
    assert f"rank 1 failed (exit code 3); see its log: {job.out}/log/rank_1/glm.log" in r.stderr
    assert "FAKE_WORKER rank 1 failing" in job.log(1)
    assert not pids_matching(job.marker)


def test_msrun_multi_node_dry_run(job) -> None:
    r = job.run(DISTRIBUTE, "none", "cfg.yaml", "[2,4]", "train", "4", GLM_LAUNCH_DRY_RUN="1",
                MASTER_ADDR="10.0.0.1")
    assert r.returncode == 0, r.stderr
    assert "--worker_num=4 --local_worker_num=2 --master_addr=10.0.0.1" in r.stdout
    assert "--node_rank=1" in r.stdout and "rank 3 (device 1): RANK_ID=3 DEVICE_ID=1" in r.stdout
