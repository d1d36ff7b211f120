"""The launcher (glm/launch.py) through its shims scripts/run_standalone.sh and scripts/run_distribute.sh and
through `python -m glm.launch`, driven with a stand-in for the `glm` entry point (GLM_ENTRY).

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
    (tmp_path / "cfg.yaml").write_text("seed: 0\noutput_dir: 'out'   # relative to $PWD\n")
    write_rank_table(tmp_path / "rt.json", 2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "GLM_", "RANK_", "MS_"))
           and k not in ("MASTER_ADDR", "NODE_RANK", "CLUSTER_TIME_OUT", "ASCEND_RT_VISIBLE_DEVICES",
                         "CUDA_VISIBLE_DEVICES")}
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

        def call(self, script: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
            """The script's work in-process (no bash, no new interpreter): for the argument checks."""
            from click.testing import CliRunner

            from glm.launch_scripts import scripts_command

            old = os.getcwd()
            os.chdir(tmp_path)
            try:
                r = CliRunner().invoke(scripts_command, [script.stem, *args], env={**self.env, **extra})
            finally:
                os.chdir(old)
            return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)

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
    line = [x for x in log.splitlines() if x.startswith("FAKE_WORKER MS_ROLE")][-1]   # the latest launch
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
    r = job.call(STANDALONE, *args)
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
    r = job.call(DISTRIBUTE, *args)
    assert r.returncode != 0
    assert message in r.stderr and "Usage: bash scripts/run_distribute.sh" in r.stderr
    assert not job.out.exists()


def test_distribute_invalid_rank_table(job) -> None:
    write_rank_table(job.cwd / "rt4.json", 4)
    r = job.call(DISTRIBUTE, "rt4.json", "cfg.yaml", "[0,2]", "train")
    assert r.returncode != 0 and "it has 4 ranks but RANK_SIZE is 2" in r.stderr
    (job.cwd / "bad.json").write_text('{"version": "1.0"}')
    r = job.call(DISTRIBUTE, "bad.json", "cfg.yaml", "[0,2]", "train")
    assert r.returncode != 0 and "bad.json" in r.stderr and "status" in r.stderr
    assert not pids_matching(job.marker)


# ----------------------------------------------------------------------------------------------
# dry run
# ----------------------------------------------------------------------------------------------

def test_dry_runs(job) -> None:
    r = job.run(STANDALONE, "cfg.yaml", "3", "export", GLM_LAUNCH_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert "DEVICE_ID=3" in r.stdout and "--use_parallel False" in r.stdout and "--device_id 3" in r.stdout
    assert f"--output_dir {job.out}" in r.stdout and " export --config " in r.stdout
    r = job.run(DISTRIBUTE, "rt.json", "cfg.yaml", "[0,2]", "finetune", GLM_LAUNCH_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        assert f"RANK_TABLE_FILE={job.cwd}/rt.json RANK_ID={rank} DEVICE_ID={rank} RANK_SIZE=2" in r.stdout
        assert f"log {job.out}/log/rank_{rank}/glm.log" in r.stdout
    r = job.run(DISTRIBUTE, "none", "cfg.yaml", "[0,2]", "train", GLM_LAUNCH_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    port = job.env["MASTER_PORT"]
    assert (f"scheduler: MS_ROLE=MS_SCHED RANK_ID=0 RANK_SIZE=2 MS_WORKER_NUM=2 MS_SCHED_HOST=127.0.0.1 "
            f"MS_SCHED_PORT={port} MS_TOPO_TIMEOUT=120, log {job.out}/log/scheduler.log") in r.stdout
    for rank in (0, 1):
        assert (f"rank {rank} (device {rank}): MS_ROLE=MS_WORKER MS_NODE_ID={rank} RANK_ID={rank} DEVICE_ID={rank} "
                f"RANK_SIZE=2 MS_WORKER_NUM=2") in r.stdout
    assert not job.out.exists() and not pids_matching(job.marker)


# ----------------------------------------------------------------------------------------------
# standalone
# ----------------------------------------------------------------------------------------------

def test_standalone_runs_and_logs(job) -> None:
    # The job runs in the foreground (it writes its own log, output_dir/log/glm.log, like any single run).
    r = job.run(STANDALONE, "cfg.yaml", "1", "eval")
    assert r.returncode == 0, r.stderr
    assert f"log {job.out}/log/glm.log" in r.stderr
    env = fake_env(r.stdout)
    assert env["DEVICE_ID"] == "1" and env["RANK_ID"] == ""
    assert env["ARGV"] == f"eval --config {job.cwd}/cfg.yaml --use_parallel False --device_id 1 --output_dir {job.out}"
    r = job.run(STANDALONE, "cfg.yaml", "0", "train", FAKE_FAIL_RANK="", FAKE_FAIL_CODE="4")
    assert r.returncode == 0
    r = job.run(STANDALONE, "cfg.yaml", "0", "train", RANK_ID="0", FAKE_FAIL_RANK="0", FAKE_FAIL_CODE="4",
                FAKE_FAIL_AFTER="0")
    assert r.returncode == 4 and "FAKE_WORKER rank 0 failing" in r.stdout


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
        assert env["ARGV"] == f"finetune --config {job.cwd}/cfg.yaml --use_parallel True --output_dir {job.out}"
    assert not pids_matching(job.marker)


def test_rank_table_single_node_offset_range(job) -> None:
    r = job.run(DISTRIBUTE, "rt.json", "cfg.yaml", "[4,6]", "predict", "hello world")
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        env = fake_env(job.log(rank))
        assert (env["RANK_ID"], env["DEVICE_ID"], env["RANK_SIZE"]) == (str(rank), str(4 + rank), "2")
        assert env["ARGV"].endswith("--output_dir " + str(job.out) + " --predict_data hello world")


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
        env = fake_env(job.log(rank))
        assert (env["MS_ROLE"], env["RANK_ID"], env["MS_NODE_ID"], env["RANK_SIZE"]) == ("MS_WORKER", str(rank),
                                                                                        str(rank), "2")
        assert (env["MS_WORKER_NUM"], env["MS_SCHED_PORT"]) == ("2", job.env["MASTER_PORT"])
        assert env["ARGV"] == f"train --config {job.cwd}/cfg.yaml --use_parallel True --output_dir {job.out}"
    assert "MS_ROLE=MS_SCHED" in (job.out / "log" / "scheduler.log").read_text()
    assert not pids_matching(job.marker)


def test_msrun_worker_failure(job) -> None:
    # FAKE_SCHED_SLEEP imitates the real scheduler, which only notices a dead worker after a ~30 s
    # heartbeat time-out: the launcher sees the worker's exit itself and stops the scheduler too.
    start = time.monotonic()
    r = job.run(DISTRIBUTE, "--msrun", "cfg.yaml", "[0,2]", "finetune", FAKE_FAIL_RANK="1",
                FAKE_FAIL_AFTER="1", FAKE_SLEEP="300", FAKE_SCHED_SLEEP="300", FAKE_SPAWN_CHILD="1")
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    assert elapsed < 30, elapsed
    assert f"rank 1 failed (exit code 3); see its log: {job.out}/log/rank_1/glm.log" in r.stderr
    assert "FAKE_WORKER rank 1 failing" in job.log(1)
    assert not pids_matching(job.marker)


def test_msrun_multi_node_dry_run(job) -> None:
    r = job.run(DISTRIBUTE, "none", "cfg.yaml", "[2,4]", "train", "4", GLM_LAUNCH_DRY_RUN="1",
                MASTER_ADDR="10.0.0.1")
    assert r.returncode == 0, r.stderr
    assert "scheduler" not in r.stdout   # node 1 joins node 0's scheduler
    assert ("rank 3 (device 1): MS_ROLE=MS_WORKER MS_NODE_ID=3 RANK_ID=3 DEVICE_ID=1 RANK_SIZE=4 MS_WORKER_NUM=4 "
            "MS_SCHED_HOST=10.0.0.1") in r.stdout


def test_msrun_single_node_offset_range(job) -> None:
    # msrun numbers devices from 0 on every machine: devices 2,3 are reached through the visible-device lists.
    r = job.run(DISTRIBUTE, "none", "cfg.yaml", "[2,4]", "eval")
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        env = fake_env(job.log(rank))
        assert (env["RANK_ID"], env["DEVICE_ID"], env["RANK_SIZE"]) == (str(rank), str(rank), "2")
        assert env["ASCEND_RT_VISIBLE_DEVICES"] == "2,3" and env["CUDA_VISIBLE_DEVICES"] == "2,3"
    r = job.run(DISTRIBUTE, "none", "cfg.yaml", "[2,4]", "eval", ASCEND_RT_VISIBLE_DEVICES="6,7")
    assert r.returncode == 0, r.stderr
    env = fake_env(job.log(1))
    assert env["ASCEND_RT_VISIBLE_DEVICES"] == "6,7" and env["CUDA_VISIBLE_DEVICES"] == "2,3"  # the user's list wins
    assert not pids_matching(job.marker)


def test_msrun_second_node_runs(job) -> None:
    # Node 1 of 2, for real through msrun with the stand-in (no cluster forms: the stand-in never connects).
    port = free_port()
    r = job.run(DISTRIBUTE, "none", "cfg.yaml", "[2,4]", "finetune", "--nodes", "2", "--master_addr",
                "127.0.0.1", f"--master_port={port}", MASTER_PORT="1", FAKE_SLEEP="1")
    assert r.returncode == 0, r.stderr
    assert "node 1 of 2, 2 local workers, 4 ranks in all" in r.stderr
    for rank in (2, 3):
        env = fake_env(job.log(rank))
        assert (env["MS_ROLE"], env["MS_NODE_ID"], env["RANK_ID"]) == ("MS_WORKER", str(rank), str(rank))
        assert (env["DEVICE_ID"], env["RANK_SIZE"], env["MS_WORKER_NUM"]) == (str(rank - 2), "4", "4")
        assert (env["MS_SCHED_HOST"], env["MS_SCHED_PORT"]) == ("127.0.0.1", str(port))  # the flags, not MASTER_PORT
        assert env["ASCEND_RT_VISIBLE_DEVICES"] == "" and env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["ARGV"] == f"finetune --config {job.cwd}/cfg.yaml --use_parallel True --output_dir {job.out}"
    assert not (job.out / "log" / "rank_0").exists() and not (job.out / "log" / "rank_1").exists()
    assert not (job.out / "log" / "scheduler.log").exists()
    assert not pids_matching(job.marker)


def test_msrun_options_dry_run(job) -> None:
    dry = {"GLM_LAUNCH_DRY_RUN": "1", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "7000", "NODE_RANK": "0"}
    # the options win over the environment; `--opt VALUE` and `--opt=VALUE`, anywhere on the line
    r = job.run(DISTRIBUTE, "--master_addr", "10.0.0.1", "none", "cfg.yaml", "[8,12]", "--nodes=3", "predict",
                "data.json", "--master_port", "29500", "--node_rank", "2", **dry)
    assert r.returncode == 0, r.stderr
    assert ("rank 11 (device 3): MS_ROLE=MS_WORKER MS_NODE_ID=11 RANK_ID=11 DEVICE_ID=3 RANK_SIZE=12 "
            "MS_WORKER_NUM=12 MS_SCHED_HOST=10.0.0.1 MS_SCHED_PORT=29500") in r.stdout
    assert "rank 7 " not in r.stdout and "scheduler" not in r.stdout
    assert r.stdout.rstrip().endswith("--predict_data data.json")
    # the environment still works without options; RANK_SIZE and --nodes may be given together
    r = job.run(DISTRIBUTE, "none", "cfg.yaml", "[4,8]", "train", "8", "--nodes", "2",
                **{**dry, "NODE_RANK": "1"})
    assert r.returncode == 0, r.stderr
    assert "rank 7 (device 3): MS_ROLE=MS_WORKER MS_NODE_ID=7 RANK_ID=7 DEVICE_ID=3 RANK_SIZE=8" in r.stdout
    assert "MS_SCHED_HOST=10.9.9.9 MS_SCHED_PORT=7000" in r.stdout
    r = job.run(DISTRIBUTE, "--help")
    assert r.returncode == 0 and "--master_port PORT" in r.stdout
    assert not job.out.exists()


@pytest.mark.parametrize("args, env, message", [
    (["--master_port", "0"], {}, "master port must be a number from 1 to 65535, got '0'"),
    (["--master_port=65536"], {}, "master port must be a number from 1 to 65535, got '65536'"),
    ([], {"MASTER_PORT": "http"}, "master port must be a number from 1 to 65535, got 'http'"),
    (["--master_addr", "10.0.0.1;reboot"], {}, "master address must be an IP address or a host name"),
    (["--master_addr"], {}, "--master_addr needs a value"),
    (["--master_port="], {}, "--master_port needs a value"),
    (["--nodes", "0"], {}, "--nodes must be a positive integer, got '0'"),
    (["--node_rank", "1"], {}, "--node_rank 1 must be smaller than the number of nodes (1)"),
    (["--nodes", "2", "--node_rank", "2"], {}, "--node_rank 2 must be smaller than the number of nodes (2)"),
    (["--nodes", "2", "--node_rank", "1"], {}, "--node_rank 1 disagrees with DEVICE_RANGE [0,2], which holds "
                                               "the ranks of node 0; use [2,4]"),
    (["--node_rank", "x"], {}, "--node_rank must be a non-negative integer, got 'x'"),
    ([], {"NODE_RANK": "3"}, "NODE_RANK 3 must be smaller than the number of nodes (1)"),
    (["6", "--nodes", "2"], {}, "--nodes 2 x 2 ranks per node (DEVICE_RANGE [0,2]) is 4 ranks, but RANK_SIZE is 6"),
    (["5"], {}, "RANK_SIZE 5 is not a multiple of the 2 ranks per node"),
    (["--bogus", "1"], {}, "unknown option --bogus"),
    ([], {"CLUSTER_TIME_OUT": "soon"}, "CLUSTER_TIME_OUT must be a number of seconds"),
])
def test_msrun_bad_options(job, args: list[str], env: dict, message: str) -> None:
    r = job.call(DISTRIBUTE, "none", "cfg.yaml", "[0,2]", "train", *args, GLM_LAUNCH_DRY_RUN="1", **env)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Usage: bash scripts/run_distribute.sh" in r.stderr
    assert "[dry run]" not in r.stdout and not job.out.exists()


def test_msrun_bad_range_for_nodes(job) -> None:
    r = job.call(DISTRIBUTE, "none", "cfg.yaml", "[1,3]", "train", "4", GLM_LAUNCH_DRY_RUN="1")
    assert r.returncode == 2 and "DEVICE_RANGE [1,3] is not one whole node: START must be a multiple of 2" in r.stderr
    r = job.call(DISTRIBUTE, "none", "cfg.yaml", "[4,6]", "train", "--nodes", "2", GLM_LAUNCH_DRY_RUN="1")
    assert r.returncode == 2 and "DEVICE_RANGE [4,6] is beyond the 4 ranks of --nodes 2" in r.stderr
    # msrun options make no sense with a rank table
    r = job.call(DISTRIBUTE, "rt.json", "cfg.yaml", "[0,2]", "train", "--master_port", "9000", GLM_LAUNCH_DRY_RUN="1")
    assert r.returncode == 2 and "--master_port is only for the msrun form" in r.stderr


# ----------------------------------------------------------------------------------------------
# key=value overrides, output_dir from the resolved config, `python -m glm.launch`
# ----------------------------------------------------------------------------------------------

def test_overrides_reach_every_rank_and_move_the_logs(job) -> None:
    # rank-table form, msrun form and standalone: the override is on every rank's command line, and an
    # overridden output_dir is where the logs go (the config is resolved, not grepped).
    moved = job.cwd / "moved"
    for form in ("rt.json", "none"):
        r = job.run(DISTRIBUTE, form, "cfg.yaml", "[0,2]", "finetune", "runner_config.epochs=3",
                    f"output_dir={moved}", FAKE_SLEEP="0.5")
        assert r.returncode == 0, r.stderr
        for rank in (0, 1):
            argv = fake_env((moved / "log" / f"rank_{rank}" / "glm.log").read_text())["ARGV"]
            assert argv == (f"finetune --config {job.cwd}/cfg.yaml --use_parallel True --output_dir {moved} "
                            f"runner_config.epochs=3 output_dir={moved}")
    # The second launch into the same folder appended to the rank logs: both launches are there.
    log = (moved / "log" / "rank_1" / "glm.log").read_text()
    assert log.count("# glm-launcher ") == 2 and log.count("FAKE_WORKER rank 1 done") == 2
    r = job.run(STANDALONE, "cfg.yaml", "0", "eval", "runner_config.batch_size=2")
    assert r.returncode == 0, r.stderr
    assert fake_env(r.stdout)["ARGV"].endswith("--output_dir " + str(job.out) + " runner_config.batch_size=2")
    # predict data and overrides together; a bad override is the config's one-line error, before any launch
    r = job.run(DISTRIBUTE, "none", "cfg.yaml", "[0,2]", "predict", "a prompt", "seed=3", GLM_LAUNCH_DRY_RUN="1")
    assert r.returncode == 0 and r.stdout.rstrip().endswith("--predict_data 'a prompt' seed=3"), r.stderr
    r = job.run(DISTRIBUTE, "none", "cfg.yaml", "[0,2]", "finetune", "runner_config.epoch=3")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "runner_config.epoch" in r.stderr
    assert "Usage:" not in r.stderr


def test_python_m_glm_launch(job) -> None:
    cmd = [sys.executable, "-m", "glm.launch", "--config", "cfg.yaml", "--devices", "[0,2]", "--run_mode", "eval",
           "--rank_table", "rt.json", "seed=7"]
    env = {**job.env, "PYTHONPATH": f"{REPO}{os.pathsep}{job.env.get('PYTHONPATH', '')}"}
    r = subprocess.run(cmd, cwd=job.cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        env_ = fake_env(job.log(rank))
        assert (env_["RANK_ID"], env_["DEVICE_ID"], env_["RANK_SIZE"]) == (str(rank), str(rank), "2")
        assert env_["ARGV"].endswith(f"--output_dir {job.out} seed=7")
    r = subprocess.run([*cmd[:6], "[0,3)", *cmd[7:]], cwd=job.cwd, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr == "error: --devices must look like [0,8] (two non-negative integers), " \
                                             "got '[0,3)'\n"
