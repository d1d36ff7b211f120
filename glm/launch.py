"""`glm launch` (`python -m glm.launch`): one process per device, supervised.

    glm launch --config cfg.yaml --devices [0,8] --run_mode finetune [key=value ...]             # msrun form
    glm launch --config cfg.yaml --devices [0,8] --run_mode finetune --rank_table hccl_8p.json   # rank table
    glm launch --config cfg.yaml --devices [8,16] --run_mode finetune --nodes 2 --master_addr 10.0.0.1

Two forms, as in MindFormers:
* rank table (Ascend HCCL): one process per device with RANK_TABLE_FILE, RANK_ID, DEVICE_ID, RANK_SIZE.
* msrun (dynamic networking; the only form on CPU and GPU): the processes `msrun` would start, started
  here: on node 0 a scheduler (MS_ROLE=MS_SCHED), and one worker per device (MS_ROLE=MS_WORKER,
  MS_NODE_ID = RANK_ID, DEVICE_ID = local index) with MS_WORKER_NUM, MS_SCHED_HOST/PORT, MS_TOPO_TIMEOUT.
  Starting them here rather than through msrun lets the launcher see every rank's exit directly.

Devices START..END-1 of this machine ([START,END], END excluded). On one machine rank = device - START;
with RANK_SIZE (or --nodes) the job spans machines and rank = device index over all machines. Every rank
runs `glm RUN_MODE --config CFG --use_parallel True --output_dir OUT [key=value ...]` from the current
directory, where OUT is the resolved config's output_dir (overrides included); rank k logs to
OUT/log/rank_k/glm.log (appended, each launch starting with a `# glm-launcher` header). If a rank fails, every other process is stopped (SIGTERM, then SIGKILL after
GLM_KILL_TIMEOUT seconds) and the launcher exits 1 naming the failed rank's log.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from glm import GLMError

DIST_RUN_MODES = ("train", "finetune", "eval", "predict")
_HOST = re.compile(r"[A-Za-z0-9._:-]+")
# Variables of a surrounding job that would change how MindSpore initialises communication.
_CLUSTER_VARS = ("MS_ROLE", "MS_NODE_ID", "MS_WORKER_NUM", "MS_SCHED_HOST", "MS_SCHED_PORT", "MS_TOPO_TIMEOUT",
                 "RANK_TABLE_FILE", "RANK_ID", "DEVICE_ID", "RANK_SIZE")
# Names the messages use for each input: the positional scripts' or `glm launch`'s flags.
SCRIPT_NAMES = {"range": "DEVICE_RANGE", "rank_size": "RANK_SIZE", "run_mode": "RUN_STATUS",
                "predict_data": "PREDICT_DATA"}
FLAG_NAMES = {"range": "--devices", "rank_size": "--rank_size", "run_mode": "--run_mode",
              "predict_data": "--predict_data"}


class LaunchUsageError(GLMError):
    """Bad launcher arguments (the positional scripts print their usage after it)."""


@dataclass
class Proc:
    """One process to start: a rank (rank >= 0) or the msrun-form scheduler (rank -1)."""

    rank: int
    device: int
    env: dict[str, str]
    log: Path


@dataclass
class LaunchPlan:
    config: Path
    run_mode: str
    output_dir: Path
    command: list[str]           # what every process runs
    procs: list[Proc] = field(default_factory=list)
    summary: str = ""


# ------------------------------------------------------------------------------------------ planning
def parse_device_range(text: str, names: dict = SCRIPT_NAMES) -> tuple[int, int]:
    m = re.fullmatch(r"\[(\d+),(\d+)\]", text.strip())
    if not m:
        raise LaunchUsageError(f"{names['range']} must look like [0,8] (two non-negative integers), got '{text}'")
    start, end = int(m.group(1)), int(m.group(2))
    if start >= end:
        raise LaunchUsageError(f"{names['range']} [{start},{end}]: START must be smaller than END")
    return start, end


def _uint(value: str | int | None, message: str, minimum: int = 0) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < minimum:
        raise LaunchUsageError(message)
    return int(text)


def config_file(config: str) -> Path:
    """The config path, absolute; it must be a file."""
    path = Path(os.path.abspath(os.path.expanduser(config)))
    if not path.is_file():
        raise LaunchUsageError(f"config file {path} not found")
    return path


def check_run_mode(run_mode: str, allowed: tuple[str, ...], name: str) -> None:
    if run_mode not in allowed:
        listed = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
        raise LaunchUsageError(f"{name} must be {listed}, got '{run_mode}'")


def resolve_output_dir(config: Path, overrides: tuple[str, ...]) -> Path:
    """The config's output_dir after the overrides (default ./output), absolute against the current directory."""
    from glm.config import load_config

    cfg = load_config(config, overrides)
    return Path(os.path.abspath(os.path.expanduser(str(cfg["output_dir"]))))


def default_entry() -> list[str]:
    """How a rank starts `glm`: GLM_ENTRY (a script, run with this Python) or glm/__main__.py."""
    entry = os.environ.get("GLM_ENTRY") or str(Path(__file__).resolve().parent / "__main__.py")
    return [sys.executable, entry]


def plan_launch(config: str, devices: str, run_mode: str, *, rank_table: str | None = None,
                rank_size: int | str | None = None, nodes: int | str | None = None,
                node_rank: int | str | None = None, master_addr: str | None = None,
                master_port: int | str | None = None, predict_data: str | None = None,
                overrides: tuple[str, ...] = (), names: dict = SCRIPT_NAMES) -> LaunchPlan:
    """Check the arguments against each other and work out every process's environment and log."""
    start, end = parse_device_range(devices, names)
    check_run_mode(run_mode, DIST_RUN_MODES, names["run_mode"])
    if predict_data is not None and run_mode != "predict":
        raise LaunchUsageError(f"{names['predict_data']} is only accepted with {names['run_mode']} predict")
    cfg_path = config_file(config)
    table = Path(os.path.abspath(rank_table)) if rank_table else None
    if table is not None and not table.is_file():
        raise LaunchUsageError(f"rank table {table} not found")
    multi = rank_size is not None   # RANK_SIZE given: this machine is one of several
    if multi:
        rank_size = _uint(rank_size, f"{names['rank_size']} must be a positive integer, got '{rank_size}'", 1)
        if end > rank_size:
            raise LaunchUsageError(f"{names['rank_size']} {rank_size} is too small for {names['range']} "
                                   f"[{start},{end}] (ranks are START..END-1)")
    else:
        rank_size = end - start
    if table is not None:
        given = [n for n, v in (("--master_addr", master_addr), ("--master_port", master_port),
                                ("--nodes", nodes), ("--node_rank", node_rank)) if v is not None]
        if given:
            raise LaunchUsageError(f"{given[0]} is only for the msrun form (no rank table)")
        from glm.rank_table import check_rank_table

        check_rank_table(str(table), rank_size)
    else:
        cluster = _msrun_cluster(start, end, rank_size, multi, nodes, node_rank, master_addr, master_port, names)

    out = resolve_output_dir(cfg_path, overrides)
    command = [*default_entry(), run_mode, "--config", str(cfg_path), "--use_parallel", "True",
               "--output_dir", str(out)]
    if predict_data is not None:
        command += ["--predict_data", predict_data]
    plan = LaunchPlan(cfg_path, run_mode, out, command + list(overrides))
    base = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARS}
    if table is not None:
        for i in range(start, end):
            rank, device = (i, i - start) if multi else (i - start, i)
            plan.procs.append(Proc(rank, device, {**base, "RANK_TABLE_FILE": str(table), "RANK_ID": str(rank),
                                                  "DEVICE_ID": str(device), "RANK_SIZE": str(rank_size)},
                                   out / "log" / f"rank_{rank}" / "glm.log"))
        plan.summary = f"rank table {table}, {end - start} local ranks of {rank_size}"
        return plan
    _msrun_procs(plan, cluster, base, start, end)
    return plan


@dataclass
class _Cluster:
    """The msrun form's settings, checked."""

    addr: str
    port: int
    nodes: int
    node_rank: int
    rank_size: int
    multi: bool
    timeout: str


def _msrun_cluster(start: int, end: int, rank_size: int, multi: bool, nodes: int | str | None,
                   node_rank: int | str | None, master_addr: str | None, master_port: int | str | None,
                   names: dict) -> _Cluster:
    """Options win over MASTER_ADDR / MASTER_PORT / NODE_RANK; all checked against the device range."""
    env, local_n, where = os.environ, end - start, f"{names['range']} [{start},{end}]"
    addr = master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
    if not _HOST.fullmatch(addr):
        raise LaunchUsageError(f"master address must be an IP address or a host name, got '{addr}'")
    port = str(master_port if master_port is not None else env.get("MASTER_PORT") or "8118")
    if not (port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise LaunchUsageError(f"master port must be a number from 1 to 65535, got '{port}'")
    if nodes is not None:
        nodes = _uint(nodes, f"--nodes must be a positive integer, got '{nodes}'", 1)
        if multi and rank_size != nodes * local_n:
            raise LaunchUsageError(f"--nodes {nodes} x {local_n} ranks per node ({where}) is {nodes * local_n} "
                                   f"ranks, but {names['rank_size']} is {rank_size}")
        if not multi and nodes > 1:
            rank_size, multi = nodes * local_n, True
            if end > rank_size:
                raise LaunchUsageError(f"{where} is beyond the {rank_size} ranks of --nodes {nodes} "
                                       "(ranks are START..END-1)")
    elif multi:
        if rank_size % local_n:
            raise LaunchUsageError(f"{names['rank_size']} {rank_size} is not a multiple of the {local_n} ranks "
                                   f"per node of {where}")
        nodes = rank_size // local_n
    else:
        nodes = 1
    if multi and start % local_n:
        raise LaunchUsageError(f"{where} is not one whole node: START must be a multiple of {local_n} (END-START)")
    derived = start // local_n if multi else 0
    given, source = (node_rank, "--node_rank") if node_rank is not None else (env.get("NODE_RANK"), "NODE_RANK")
    if given not in (None, ""):
        k = _uint(given, f"{source} must be a non-negative integer, got '{given}'")
        if k >= nodes:
            raise LaunchUsageError(f"{source} {k} must be smaller than the number of nodes ({nodes})")
        if k != derived:
            raise LaunchUsageError(f"{source} {k} disagrees with {where}, which holds the ranks of node {derived}; "
                                   f"use [{k * local_n},{(k + 1) * local_n}]")
    timeout = env.get("CLUSTER_TIME_OUT") or "120"
    if not timeout.isdigit():
        raise LaunchUsageError(f"CLUSTER_TIME_OUT must be a number of seconds, got '{timeout}'")
    return _Cluster(addr, int(port), nodes, derived, rank_size, multi, timeout)


def _msrun_procs(plan: LaunchPlan, c: _Cluster, base: dict, start: int, end: int) -> None:
    """What msrun starts: a scheduler on node 0 and one worker per local device."""
    local_n, out = end - start, plan.output_dir
    cluster = {"MS_WORKER_NUM": str(c.rank_size), "MS_SCHED_HOST": c.addr, "MS_SCHED_PORT": str(c.port),
               "MS_TOPO_TIMEOUT": c.timeout, "RANK_SIZE": str(c.rank_size)}
    if not c.multi and start > 0:
        # Every machine numbers its devices from 0: devices START.. are reached through the visible-device
        # lists (Ascend, GPU), unless the user set them.
        visible = ",".join(str(d) for d in range(start, end))
        for var in ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
            base.setdefault(var, visible)
    if c.node_rank == 0:
        plan.procs.append(Proc(-1, -1, {**base, **cluster, "MS_ROLE": "MS_SCHED", "RANK_ID": "0"},
                               out / "log" / "scheduler.log"))
    for k in range(local_n):
        rank = c.node_rank * local_n + k
        plan.procs.append(Proc(rank, k, {**base, **cluster, "MS_ROLE": "MS_WORKER", "MS_NODE_ID": str(rank),
                                         "RANK_ID": str(rank), "DEVICE_ID": str(k)},
                               out / "log" / f"rank_{rank}" / "glm.log"))
    plan.summary = (f"msrun form, node {c.node_rank} of {c.nodes}, {local_n} local workers, {c.rank_size} ranks "
                    f"in all, scheduler {c.addr}:{c.port}")


# ------------------------------------------------------------------------------------------ running
_SHOWN_VARS = ("RANK_TABLE_FILE", "MS_ROLE", "MS_NODE_ID", "RANK_ID", "DEVICE_ID", "RANK_SIZE", "MS_WORKER_NUM",
               "MS_SCHED_HOST", "MS_SCHED_PORT", "MS_TOPO_TIMEOUT", "ASCEND_RT_VISIBLE_DEVICES",
               "CUDA_VISIBLE_DEVICES")


def describe(proc: Proc) -> str:
    """The variables the launcher sets for `proc` (those it inherits unchanged are left out), as KEY=VALUE."""
    set_here = [k for k in _SHOWN_VARS if k in proc.env
                and (os.environ.get(k) != proc.env[k] or k in ("RANK_ID", "DEVICE_ID", "RANK_SIZE"))]
    return " ".join(f"{k}={shlex.quote(proc.env[k])}" for k in set_here)


def _name(proc: Proc) -> str:
    return "scheduler" if proc.rank < 0 else f"rank {proc.rank}"


def print_plan(plan: LaunchPlan) -> None:
    for proc in plan.procs:
        click.echo(f"[dry run] {_name(proc)} (device {proc.device}): {describe(proc)}, log {proc.log}"
                   if proc.rank >= 0 else f"[dry run] scheduler: {describe(proc)}, log {proc.log}")
    click.echo(shlex.join(plan.command))


def _group_alive(p: subprocess.Popen) -> bool:
    """True while the process or anything left in its process group runs (the process is reaped first:
    a zombie leader would keep its group looking alive)."""
    p.poll()
    try:
        os.killpg(p.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return p.returncode is None or _has_members(p.pid)


def _has_members(pgid: int) -> bool:
    """Any live process in group `pgid` (after its leader exited): /proc, where there is one."""
    try:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if fields[0] != "Z" and int(fields[2]) == pgid:
                    return True
        return False
    except OSError:
        return True   # no /proc: assume alive, the SIGKILL below settles it


def stop_groups(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every process group, SIGKILL those still alive after `grace` seconds; reap the processes."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_group_alive(p) for p in procs):
        time.sleep(0.1)
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def show_log_tail(log: Path, lines: int = 20) -> None:
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    click.echo(f"---- last lines of {log} ----", err=True)
    for line in tail:
        click.echo(f"  | {line}", err=True)


def run_plan(plan: LaunchPlan, poll: float = 0.5) -> int:
    """Start every process of `plan` and supervise them; returns the launcher's exit code."""
    try:
        grace = float(os.environ.get("GLM_KILL_TIMEOUT") or "5")
    except ValueError:
        raise GLMError(f"GLM_KILL_TIMEOUT must be a number of seconds, got {os.environ['GLM_KILL_TIMEOUT']!r}") from None
    started: list[tuple[Proc, subprocess.Popen]] = []
    stopping = []

    def stop_all() -> None:
        stop_groups([p for _, p in started], grace)

    def on_signal(signum: int, frame: object) -> None:
        if stopping:
            return
        stopping.append(signum)
        click.echo("glm-launcher: interrupted, stopping all ranks", err=True)
        stop_all()
        sys.exit(128 + signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for proc in plan.procs:
            proc.log.parent.mkdir(parents=True, exist_ok=True)
            # Appended: a relaunch (e.g. --resume_training) keeps the earlier runs' lines.
            with open(proc.log, "a", encoding="utf-8") as f:
                f.write(f"# glm-launcher {time.strftime('%Y-%m-%d %H:%M:%S')} {_name(proc)}: {describe(proc)}\n"
                        f"# {shlex.join(plan.command)}\n")
                f.flush()
                # A session of its own: stopping a rank stops its children (data workers) too.
                p = subprocess.Popen(plan.command, env=proc.env, stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            started.append((proc, p))
            if proc.rank >= 0:
                click.echo(f"glm-launcher: rank {proc.rank} on device {proc.device} started (pid {p.pid}), "
                           f"log {proc.log}", err=True)
        workers = [(proc, p) for proc, p in started if proc.rank >= 0]
        done_at = 0.0
        while True:
            codes = [(proc, p.poll()) for proc, p in started]
            failed = next(((proc, c) for proc, c in codes if c not in (None, 0)), None)
            if failed is not None:
                proc, code = failed
                click.echo(f"error: {_name(proc)} exited ({_exit_text(code)}); stopping the other ranks", err=True)
                stop_all()
                show_log_tail(proc.log)
                click.echo(f"error: {_name(proc)} failed ({_exit_text(code)}); see its log: {proc.log}", err=True)
                return 1
            if all(c == 0 for proc, c in codes if proc.rank >= 0):
                if all(c is not None for _, c in codes):
                    break
                # Workers done, scheduler still up: it exits once it has seen them go; bound the wait.
                done_at = done_at or time.monotonic()
                if time.monotonic() - done_at > 30:
                    click.echo("warning: the scheduler did not exit 30 s after the workers; stopping it", err=True)
                    break
            time.sleep(poll)
        stop_all()   # stray children of finished ranks
        click.echo(f"glm-launcher: all {len(workers)} ranks finished; logs in {plan.output_dir}/log/rank_*/glm.log",
                   err=True)
        return 0
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def launch(plan: LaunchPlan, dry_run: bool = False) -> int:
    if dry_run or os.environ.get("GLM_LAUNCH_DRY_RUN") == "1":
        print_plan(plan)
        return 0
    click.echo(f"glm-launcher: {plan.summary}; logs in {plan.output_dir}/log/", err=True)
    return run_plan(plan)


def main(argv: list[str] | None = None) -> None:
    """`python -m glm.launch ...` = `glm launch ...`."""
    from glm.cli import run_cli
    from glm.commands import launch_command

    run_cli(launch_command, argv, prog_name="python -m glm.launch")


if __name__ == "__main__":
    main()
