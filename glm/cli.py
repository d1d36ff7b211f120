"""The `glm` command: one subcommand per run mode and per tool, one way to report errors.

    glm finetune --config configs/glm2/run_glm2_tiny.yaml [flags] [key=value ...]
    glm convert --input_path chatglm3-6b/ --output_path glm3_6b.ckpt
    glm launch --config cfg.yaml --devices [0,8] --run_mode finetune

Every subcommand is a plain function; its work lives in the module it imports when it runs, so
`glm --help` imports click and nothing heavy (no MindSpore). Errors follow one path (`handle_errors`): bad input
(GLMError, a bad flag) is one `error: ...` line and exit 2, Ctrl-C exit 130, anything else one line and
exit 1 (GLM_DEBUG=1 shows the traceback). The group and run_glm.py's command route their `main` through it,
so click's CliRunner sees exactly what a user sees.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, NoReturn

import click

from glm import GLMError, __version__
from glm.commands import COMMANDS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
BOOL = click.Choice(["True", "False", "true", "false", "1", "0"])


# ------------------------------------------------------------------------------------------ errors
def handle_errors(run: Callable[[], Any]) -> NoReturn:
    """The one error-handling path of every glm entry point: run `run()` and exit with its code."""
    try:
        code = run()
    except click.ClickException as e:   # UsageError and friends: one line, not click's usage block
        msg = " ".join(e.format_message().split())
        click.echo(f"error: {msg} (see --help)", err=True)
        sys.exit(2)
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    except GLMError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except MemoryError:
        click.echo("error: out of memory (the whole model is held in RAM for this command)", err=True)
        sys.exit(1)
    except Exception as e:   # a bug, not bad input: still one line unless asked for the traceback
        if os.environ.get("GLM_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"error: internal error {type(e).__name__}: {first} (set GLM_DEBUG=1 for the traceback)",
                   err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def run_cli(command: click.Command, args: list[str] | None = None, prog_name: str | None = None) -> NoReturn:
    """Run a click command (as a program) through `handle_errors`."""
    handle_errors(lambda: command.main(args, prog_name=prog_name, standalone_mode=False))


class _Handled:
    """A click command/group whose `main` goes through `handle_errors` (also under click's CliRunner)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        handle_errors(lambda: super(_Handled, self).main(args, prog_name, complete_var, standalone_mode=False,
                                                         **extra))


class Command(_Handled, click.Command):
    pass


# ---------------------------------------------------------------------------------------- run modes
def _train(cfg: dict, opts: dict) -> None:
    from glm.train import run_train

    run_train(cfg, cfg["run_mode"])   # resume_training is in cfg (flag or YAML)


def _eval(cfg: dict, opts: dict) -> None:
    from glm.evaluate import run_eval

    run_eval(cfg)


def _predict(cfg: dict, opts: dict) -> None:
    from glm.predict import run_predict

    run_predict(cfg, list(opts.get("predict_data") or ()))


def _chat(cfg: dict, opts: dict) -> None:
    from glm.chat import run_chat

    run_chat(cfg)


def _serve(cfg: dict, opts: dict) -> None:
    from glm.serve import run_serve

    run_serve(cfg)


def _export(cfg: dict, opts: dict) -> None:
    from glm.export import run_export

    run_export(cfg)


# How eval/predict/chat/serve encode prompts (glm/prompt_format.py); --raw_prompt is the older spelling of raw.
_FORMAT_OPTIONS = [
    click.option("--prompt_format", type=click.Choice(["auto", "raw", "glm2", "glm3_chat"]), default=None,
                 help="Prompt encoding; auto (default): the format the checkpoint was fine-tuned with."),
    click.option("--raw_prompt", is_flag=True, help="Same as --prompt_format raw: the text as is, no template."),
]
_PREDICT_OPTIONS = [
    click.option("--predict_data", multiple=True,
                 help="A prompt, several (repeat the flag), or a file (.txt one per line, .jsonl)."),
    *_FORMAT_OPTIONS,
]

_SERVE_OPTIONS = [
    click.option("--host", default=None, help="Address to listen on (serve.host, default 127.0.0.1)."),
    click.option("--port", type=click.IntRange(0, 65535), default=None,
                 help="TCP port (serve.port, default 8000; 0 = any free port, printed at start)."),
]

# run mode -> (function(resolved config, command-line options), one-line help, its own options). `glm <mode>`
# and `run_glm.py --run_mode <mode>` both dispatch through this dict.
RUN_MODES: dict[str, tuple[Callable[[dict, dict], None], str, list]] = {
    "train": (_train, "Train from the config's weights (or random) on train_dataset.", []),
    "finetune": (_train, "Fine-tune load_checkpoint (full or LoRA) on train_dataset.", []),
    "eval": (_eval, "Generate on eval_dataset and score it (BLEU-4, ROUGE).", _FORMAT_OPTIONS),
    "predict": (_predict, "Answer prompts given with --predict_data (text, .txt or .jsonl).", _PREDICT_OPTIONS),
    "export": (_export, "Export a MindIR graph for serving.", []),
    "chat": (_chat, "Talk to the model on the terminal, keeping the history.", _FORMAT_OPTIONS),
    "serve": (_serve, "Serve the model over an OpenAI-compatible HTTP API.", [*_SERVE_OPTIONS, *_FORMAT_OPTIONS]),
}

_FLAG_KEYS = {
    "load_checkpoint": "load_checkpoint", "resume_training": "resume_training", "output_dir": "output_dir",
    "device_target": "context.device_target", "device_id": "context.device_id", "mode": "context.mode",
    "seed": "seed", "train_dataset_dir": "train_dataset.data_loader.dataset_dir",
    "eval_dataset_dir": "eval_dataset.data_loader.dataset_dir", "batch_size": "runner_config.batch_size",
    "epochs": "runner_config.epochs", "gradient_accumulation_steps": "runner_config.gradient_accumulation_steps",
    "max_steps": "runner_config.max_steps", "prompt_format": "prompt_format", "host": "serve.host",
    "port": "serve.port",
}

_RUN_OPTIONS = [
    click.option("--config", "config_path", required=True, help="YAML config (MindFormers layout)."),
    click.option("--load_checkpoint", default=None,
                 help="Weights to start from: .ckpt/.safetensors file or HF folder; 'base,adapter' for LoRA; "
                      "'random' for random init."),
    click.option("--resume_training", default=None, is_flag=False, flag_value="latest",
                 help="Continue a run: alone or 'latest' = newest checkpoint in output_dir; or a file/folder."),
    click.option("--output_dir", default=None, help="Where checkpoints, logs and results go (default ./output)."),
    click.option("--device_target", type=click.Choice(["CPU", "GPU", "Ascend"]), default=None),
    click.option("--device_id", type=int, default=None),
    click.option("--mode", type=click.IntRange(0, 1), default=None, help="0 graph (default), 1 PyNative."),
    click.option("--seed", type=int, default=None),
    click.option("--use_parallel", type=BOOL, default=None, help="Data-parallel over ranks (see glm launch)."),
    click.option("--train_dataset_dir", default=None, help="Sets train_dataset.data_loader.dataset_dir."),
    click.option("--eval_dataset_dir", default=None, help="Sets eval_dataset.data_loader.dataset_dir."),
    click.option("--batch_size", type=click.IntRange(min=1), default=None, help="Sets runner_config.batch_size."),
    click.option("--epochs", type=click.IntRange(min=1), default=None),
    click.option("--gradient_accumulation_steps", type=click.IntRange(min=1), default=None),
    click.option("--max_steps", type=int, default=None, help="Stop training after this many optimizer steps."),
    click.option("--dry_run", is_flag=True,
                 help="Build and check everything, print the config, parameter counts and one sample; no training."),
]


def run_options(*extra: list) -> Callable[[Callable], Callable]:
    """The flags of every run mode (they mirror MindFormers' run_mindformer.py), then `extra` ones, then the
    key=value OVERRIDES."""
    own = list(dict.fromkeys(o for group in extra for o in group))   # run_glm.py: every mode's, once
    options = [*_RUN_OPTIONS, *own, click.argument("overrides", nargs=-1)]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def resolve_run_config(config_path: str, run_mode: str | None, flags: dict, overrides: tuple = ()) -> dict:
    """Load the YAML, apply the flags, then the key=value overrides; the run mode ends up in cfg['run_mode']."""
    from glm.config import apply_overrides, load_config

    resume = flags.get("resume_training")
    if resume and "=" in resume and not os.path.exists(resume):
        # `--resume_training key=value`: the bare flag swallowed the first override.
        overrides = (resume, *overrides)
        flags = {**flags, "resume_training": "latest"}
    cfg = load_config(config_path)
    pairs = [(key, flags[flag]) for flag, key in _FLAG_KEYS.items() if flags.get(flag) is not None]
    if flags.get("use_parallel") is not None:
        pairs.append(("use_parallel", flags["use_parallel"].lower() in ("true", "1")))
    if flags.get("raw_prompt"):
        pairs.append(("prompt_format", "raw"))
    run_mode = run_mode or cfg.get("run_mode") or "train"
    if run_mode == "export" and flags.get("batch_size") is not None:
        pairs.append(("model.model_config.batch_size", flags["batch_size"]))
    pairs.append(("run_mode", run_mode))
    return apply_overrides(cfg, [f"{k}={_yaml_scalar(v)}" for k, v in pairs] + list(overrides))


def print_notices(cfg: dict) -> None:
    """The one summary line of performance/device-only settings that are set but cannot apply here."""
    from glm.policy import notice_line
    from glm.settings import resolve

    line = notice_line(resolve(cfg))
    if line:
        click.echo(line, err=True)


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)   # quoted: paths stay strings
    return str(value)


def run_mode_main(run_mode: str | None, opts: dict) -> None:
    """Resolve the config and run one mode (or its dry run)."""
    cfg = resolve_run_config(opts["config_path"], run_mode, opts, tuple(opts.get("overrides") or ()))
    print_notices(cfg)
    if opts.get("dry_run"):
        from glm.dryrun import dry_run

        dry_run(cfg, cfg["run_mode"])
        return
    mode = cfg["run_mode"]
    if mode == "chat":   # interactive: a transcript without the questions is no log
        RUN_MODES["chat"][0](cfg, opts)
        return
    from glm.io import output_lock
    from glm.runlog import run_log

    # One writer per output folder, taken before anything is written there (the log included); a
    # distributed job's lock is taken by its rank 0 in run_train.
    with output_lock(cfg["output_dir"], what=mode, enabled=not cfg.get("use_parallel")), \
            run_log(cfg):   # a run id; output_dir/log/glm.log gets what the terminal shows
        RUN_MODES[mode][0](cfg, opts)


def _run_mode_command(name: str, help_line: str, extra: list) -> click.Command:
    @click.command(name, context_settings=CONTEXT, help=help_line + "\n\nOVERRIDES are dotted key=value "
                   "pairs applied after the flags, e.g. runner_config.epochs=3.", short_help=help_line)
    @run_options(extra)
    def command(**opts: Any) -> None:
        run_mode_main(name, opts)

    return command


@click.command("run_glm.py", cls=Command, context_settings=CONTEXT)
@click.option("--run_mode", type=click.Choice(list(RUN_MODES)), default=None,
              help="What to do; defaults to the config's run_mode.")
@run_options(*(extra for _, _, extra in RUN_MODES.values()))
def run_glm(run_mode: str | None, **opts: Any) -> None:
    """Train, fine-tune, evaluate, predict with or export ChatGLM2/ChatGLM3 from one YAML config.

    The MindFormers-style entry point (`python run_glm.py --run_mode M`); `glm M` is the same.
    OVERRIDES are dotted key=value pairs applied after the flags, e.g. runner_config.epochs=3.
    """
    run_mode_main(run_mode, opts)


# -------------------------------------------------------------------------------------- the group
class _Group(_Handled, click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:   # in the order they were added
        return list(self.commands)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="glm")
def cli() -> None:
    """glm-launcher: train, fine-tune, evaluate and convert ChatGLM2/ChatGLM3 on MindSpore.

    Run modes take --config YAML (MindFormers layout), flags, and dotted key=value overrides.
    `glm COMMAND --help` describes each command.
    """


for _name, (_fn, _help, _extra) in RUN_MODES.items():
    cli.add_command(_run_mode_command(_name, _help, _extra))


for _command in COMMANDS:   # the tools: click definitions only, their work is imported when they run
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the `glm` console script (and `python -m glm`)."""
    cli.main(argv, prog_name="glm")


def call(argv: list[str]) -> int:
    """`glm ARGV...` in-process, returning the exit code instead of exiting (tool shims, tests)."""
    try:
        cli.main(argv, prog_name="glm")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def run_glm_main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of run_glm.py."""
    run_glm.main(argv, prog_name="run_glm.py")
