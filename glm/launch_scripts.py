"""The positional interface of scripts/run_distribute.sh and scripts/run_standalone.sh (MindFormers' own),
parsed here and handed to the launcher; each script is a line that runs

    python -m glm.launch_scripts run_distribute|run_standalone ARGS...

Usage errors print the script's usage after the error line (exit 2); everything else goes through
glm's one error path (glm.cli.handle_errors).
"""

from __future__ import annotations

import os
import re
import shlex
import sys

import click

from glm import GLMError
from glm.cli import Command
from glm.launch import (
    DIST_RUN_MODES,
    LaunchUsageError,
    check_run_mode,
    config_file,
    default_entry,
    launch,
    plan_launch,
    resolve_output_dir,
)

_OVERRIDE = re.compile(r"[A-Za-z_][\w.\-]*=")
_MSRUN_OPTS = ("--master_addr", "--master_port", "--nodes", "--node_rank")

DISTRIBUTE_USAGE = """\
Usage: bash scripts/run_distribute.sh RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] [PREDICT_DATA] [key=value ...]
       bash scripts/run_distribute.sh none CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] [PREDICT_DATA] [key=value ...] [MSRUN OPTIONS]
  RANK_TABLE_FILE  HCCL rank-table JSON (glm rank-table), or `none` / `--msrun` for the msrun form
                   (no rank table; the only form that works on CPU and GPU)
  CONFIG_PATH      YAML config; its output_dir (after the overrides; default ./output) holds the logs
  DEVICE_RANGE     [START,END]: devices START..END-1 of this machine, e.g. [0,8]
  RUN_STATUS       train | finetune | eval | predict
  RANK_SIZE        total ranks over all machines (multi-machine only). Without it: one machine,
                   DEVICE_ID=i, RANK_ID=i-START. With it: RANK_ID=i, DEVICE_ID=i-START, so the
                   k-th server runs DEVICE_RANGE [8k,8k+8] and RANK_SIZE 8*servers.
  PREDICT_DATA     predict only: the 5th argument on one machine, the 6th after RANK_SIZE otherwise
  key=value        config overrides (dotted keys), passed to every rank
Every rank runs from the current directory; rank k logs to OUTPUT_DIR/log/rank_k/glm.log.
If a rank fails, the others are stopped and the script exits non-zero naming the rank's log.
MSRUN OPTIONS (msrun form only, anywhere on the line, `--opt VALUE` or `--opt=VALUE`; they win over
the environment variables in brackets):
  --master_addr ADDR  scheduler host, the IP or name of node 0 [MASTER_ADDR, default 127.0.0.1]
  --master_port PORT  scheduler port, 1-65535 [MASTER_PORT, default 8118]
  --nodes N           number of machines; RANK_SIZE defaults to N*(END-START), and must equal it if given
  --node_rank K       this machine's index, 0 <= K < nodes [NODE_RANK]; on several machines it follows from
                      DEVICE_RANGE (K = START/(END-START)) and, if given, must agree with it
Examples:
  bash scripts/run_distribute.sh hccl_8p_01234567_10.0.0.1.json configs/glm2/run_glm2_6b_lora.yaml [0,8] finetune
  bash scripts/run_distribute.sh none configs/glm2/run_glm2_6b_lora.yaml [0,2] finetune runner_config.epochs=3
  bash scripts/run_distribute.sh none cfg.yaml [8,16] finetune --nodes 2 --master_addr 10.0.0.1    # node 1 of 0..1
Environment: PYTHON (interpreter), CLUSTER_TIME_OUT (120 s), GLM_KILL_TIMEOUT (5 s from SIGTERM to SIGKILL),
  GLM_LAUNCH_DRY_RUN=1 (print each rank's environment and command, launch nothing).
Same as: glm launch --config CONFIG_PATH --devices DEVICE_RANGE --run_mode RUN_STATUS [...] (glm launch --help)
"""

STANDALONE_USAGE = """\
Usage: bash scripts/run_standalone.sh CONFIG_PATH DEVICE_ID RUN_STATUS [key=value ...]
  CONFIG_PATH  YAML config (relative paths are resolved against the current directory)
  DEVICE_ID    device number, e.g. 0
  RUN_STATUS   train | finetune | eval | predict | export
  key=value    config overrides (dotted keys)
Runs `glm RUN_STATUS --config CONFIG_PATH --use_parallel False --device_id DEVICE_ID --output_dir OUTPUT_DIR`
in the foreground from the current directory, with DEVICE_ID exported; the run logs to OUTPUT_DIR/log/glm.log
(OUTPUT_DIR: the config's output_dir after the overrides). The exit code is the job's.
Example: bash scripts/run_standalone.sh configs/glm2/run_glm2_6b_lora.yaml 0 finetune
Environment: PYTHON (interpreter), GLM_LAUNCH_DRY_RUN=1 (print the environment and command, run nothing)
"""


def split_msrun_options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Take the msrun options (`--opt VALUE` / `--opt=VALUE`, anywhere) out of argv."""
    rest, opts = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _MSRUN_OPTS:
            if not eq:
                if i + 1 >= len(argv):
                    raise LaunchUsageError(f"{name} needs a value")
                value = argv[i + 1]
                i += 1
            if not value:
                raise LaunchUsageError(f"{name} needs a value")
            opts[name[2:]] = value
        elif arg.startswith("--") and arg != "--msrun":
            raise LaunchUsageError(f"unknown option {arg}")
        else:
            rest.append(arg)
        i += 1
    return rest, opts


def split_overrides(args: list[str], first: int) -> tuple[list[str], tuple[str, ...]]:
    """key=value words after the first `first` positional arguments are config overrides."""
    head = args[:first]
    tail = [a for a in args[first:] if not _OVERRIDE.match(a)]
    return head + tail, tuple(a for a in args[first:] if _OVERRIDE.match(a))


def run_distribute(argv: list[str]) -> int:
    args, opts = split_msrun_options(argv)
    args, overrides = split_overrides(args, 4)
    if not 4 <= len(args) <= 6:
        raise LaunchUsageError(f"expected 4 to 6 arguments, got {len(args)}")
    table, config, devices, run_mode, *extra = args
    rank_size = predict_data = None
    if run_mode == "predict":
        if len(extra) == 1:
            predict_data = extra[0]
        elif len(extra) == 2:
            rank_size, predict_data = extra
    elif len(extra) == 2:
        raise LaunchUsageError("PREDICT_DATA is only accepted with RUN_STATUS predict")
    elif extra:
        rank_size = extra[0]
    plan = plan_launch(config, devices, run_mode, rank_table=None if table in ("none", "--msrun") else table,
                       rank_size=rank_size, predict_data=predict_data, overrides=overrides, **opts)
    return launch(plan)


def run_standalone(argv: list[str]) -> int:
    args, overrides = split_overrides(argv, 3)
    if len(args) != 3:
        raise LaunchUsageError(f"expected 3 arguments, got {len(args)}")
    config, device_id, run_mode = args
    cfg_path = config_file(config)
    if not device_id.isdigit():
        raise LaunchUsageError(f"DEVICE_ID must be a non-negative integer, got '{device_id}'")
    check_run_mode(run_mode, (*DIST_RUN_MODES, "export"), "RUN_STATUS")
    out = resolve_output_dir(cfg_path, overrides)
    cmd = [*default_entry(), run_mode, "--config", str(cfg_path), "--use_parallel", "False",
           "--device_id", device_id, "--output_dir", str(out), *overrides]
    if os.environ.get("GLM_LAUNCH_DRY_RUN") == "1":
        print(f"[dry run] standalone, log {out / 'log' / 'glm.log'}")
        print(f"DEVICE_ID={device_id} {shlex.join(cmd)}")
        return 0
    print(f"glm-launcher: {run_mode} on device {device_id}, log {out / 'log' / 'glm.log'}", file=sys.stderr,
          flush=True)
    # The job replaces this process: the terminal, Ctrl-C and the exit code are its own, and it writes its
    # own log (output_dir/log/glm.log, like any single-process run).
    os.execve(cmd[0], cmd, {**os.environ, "DEVICE_ID": device_id})


SCRIPTS = {"run_distribute": (run_distribute, DISTRIBUTE_USAGE), "run_standalone": (run_standalone, STANDALONE_USAGE)}


@click.command("glm.launch_scripts", cls=Command,
               context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("script", type=click.Choice(list(SCRIPTS)))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def scripts_command(script: str, args: tuple[str, ...]) -> int:
    run, usage = SCRIPTS[script]
    if any(a in ("-h", "--help") for a in args):
        click.echo(usage, nl=False)
        return 0
    try:
        return run(list(args))
    except LaunchUsageError as e:   # the script's usage after the error line, as shell scripts do; printed
        raise GLMError(f"{e}\n{usage.rstrip()}") from None   # by glm's one error path (exit 2)


def main(argv: list[str] | None = None) -> None:
    scripts_command.main(argv, prog_name="python -m glm.launch_scripts")


if __name__ == "__main__":
    main()
