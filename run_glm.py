#!/usr/bin/env python
"""glm-launcher command line: flags -> config -> one function per run mode.

    python run_glm.py --config configs/glm2/run_glm2_tiny.yaml --run_mode finetune [key=value ...]

Flags mirror MindFormers' run_mindformer.py; any config key can also be set as a dotted
`key=value` argument (e.g. `model.model_config.seq_length=256`). MindSpore is imported only after the
arguments are parsed, so `--help` is instant.
"""

from __future__ import annotations

import os
import sys

import click

RUN_MODES = ["train", "finetune", "eval", "predict", "export", "chat"]
BOOL = click.Choice(["True", "False", "true", "false", "1", "0"])


def _bool(value: str | None) -> bool | None:
    return None if value is None else value.lower() in ("true", "1")


class _Command(click.Command):
    """Usage errors (bad flag value, unknown --run_mode, missing --config) as one `error: ...` line, exit 2,
    like every other bad input, instead of click's multi-line usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:   # UsageError and friends
            msg = " ".join(e.format_message().split())
            click.echo(f"error: {msg} (see --help)", err=True)
            sys.exit(e.exit_code or 2)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", required=True, help="YAML config (MindFormers layout).")
@click.option("--run_mode", type=click.Choice(RUN_MODES), default=None,
              help="What to do; defaults to the config's run_mode.")
@click.option("--load_checkpoint", default=None,
              help="Weights to start from: .ckpt/.safetensors file or HF folder; 'base,adapter' for LoRA; "
                   "'random' for random init.")
@click.option("--resume_training", default=None, is_flag=False, flag_value="latest",
              help="Continue a run: alone or 'latest' = newest checkpoint in output_dir; or a file/folder.")
@click.option("--output_dir", default=None, help="Where checkpoints, logs and results go (default ./output).")
@click.option("--device_target", type=click.Choice(["CPU", "GPU", "Ascend"]), default=None)
@click.option("--device_id", type=int, default=None)
@click.option("--mode", type=click.IntRange(0, 1), default=None, help="0 graph (default), 1 PyNative.")
@click.option("--seed", type=int, default=None)
@click.option("--use_parallel", type=BOOL, default=None, help="Data-parallel over ranks (msrun/rank table).")
@click.option("--train_dataset_dir", default=None, help="Sets train_dataset.data_loader.dataset_dir.")
@click.option("--eval_dataset_dir", default=None, help="Sets eval_dataset.data_loader.dataset_dir.")
@click.option("--predict_data", multiple=True,
              help="predict: a prompt, several (repeat the flag), or a file (.txt one per line, .jsonl).")
@click.option("--batch_size", type=click.IntRange(min=1), default=None, help="Sets runner_config.batch_size.")
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--gradient_accumulation_steps", type=click.IntRange(min=1), default=None)
@click.option("--max_steps", type=int, default=None, help="Stop training after this many optimizer steps.")
@click.option("--prompt_format", type=click.Choice(["auto", "raw", "glm2", "glm3_chat"]), default=None,
              help="eval/predict/chat prompt encoding; auto (default) = the format the checkpoint was fine-tuned with.")
@click.option("--raw_prompt", is_flag=True, help="Same as --prompt_format raw: the prompt text as is (no template).")
@click.option("--dry_run", is_flag=True,
              help="Build and check everything, print the config, parameter counts and one sample; no training.")
@click.argument("overrides", nargs=-1)
def main(config_path, run_mode, load_checkpoint, resume_training, output_dir, device_target, device_id, mode,
         seed, use_parallel, train_dataset_dir, eval_dataset_dir, predict_data, batch_size, epochs,
         gradient_accumulation_steps, max_steps, prompt_format, raw_prompt, dry_run, overrides):
    """Train, fine-tune, evaluate, predict with or export ChatGLM2/ChatGLM3 from one YAML config.

    OVERRIDES are dotted key=value pairs applied after the flags, e.g. runner_config.epochs=3.
    """
    from glm import GLMError

    try:
        cfg, run_mode = _resolve(config_path, run_mode, locals(), overrides)
        if dry_run:
            from glm.dryrun import dry_run as run_dry

            run_dry(cfg, run_mode)
        else:
            _dispatch(cfg, run_mode, predict_data, raw_prompt)
    except GLMError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:   # a bug, not bad input: still one line unless asked for the traceback
        if os.environ.get("GLM_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"error: internal error {type(e).__name__}: {first} (set GLM_DEBUG=1 for the traceback)",
                   err=True)
        sys.exit(1)


_FLAG_KEYS = {
    "load_checkpoint": "load_checkpoint", "resume_training": "resume_training", "output_dir": "output_dir",
    "device_target": "context.device_target", "device_id": "context.device_id", "mode": "context.mode",
    "seed": "seed", "train_dataset_dir": "train_dataset.data_loader.dataset_dir",
    "eval_dataset_dir": "eval_dataset.data_loader.dataset_dir", "batch_size": "runner_config.batch_size",
    "epochs": "runner_config.epochs", "gradient_accumulation_steps": "runner_config.gradient_accumulation_steps",
    "max_steps": "runner_config.max_steps", "prompt_format": "prompt_format",
}


def _resolve(config_path: str, run_mode: str | None, flags: dict, overrides) -> tuple[dict, str]:
    from glm.config import apply_overrides, load_config

    resume = flags.get("resume_training")
    if resume and "=" in resume and not os.path.exists(resume):
        # `--resume_training key=value`: the bare flag swallowed the first override.
        overrides = (resume, *overrides)
        flags = {**flags, "resume_training": "latest"}
    cfg = load_config(config_path)
    pairs = []
    for flag, key in _FLAG_KEYS.items():
        if flags.get(flag) is not None:
            pairs.append((key, flags[flag]))
    if flags.get("use_parallel") is not None:
        pairs.append(("use_parallel", _bool(flags["use_parallel"])))
    if flags.get("raw_prompt"):
        pairs.append(("prompt_format", "raw"))
    run_mode = run_mode or cfg.get("run_mode") or "train"
    if run_mode == "export" and flags.get("batch_size") is not None:
        pairs.append(("model.model_config.batch_size", flags["batch_size"]))
    pairs.append(("run_mode", run_mode))
    cfg = apply_overrides(cfg, [f"{k}={_yaml_scalar(v)}" for k, v in pairs] + list(overrides))
    return cfg, run_mode


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        import json

        return json.dumps(value, ensure_ascii=False)   # quoted: paths stay strings
    return str(value)


def _dispatch(cfg: dict, run_mode: str, predict_data, raw_prompt: bool) -> None:
    if run_mode in ("train", "finetune"):
        from glm.train import run_train

        run_train(cfg, run_mode, cfg.get("resume_training") or None)
    elif run_mode == "eval":
        from glm.evaluate import run_eval

        run_eval(cfg)
    elif run_mode == "predict":
        from glm.predict import run_predict

        run_predict(cfg, list(predict_data), raw=raw_prompt)
    elif run_mode == "chat":
        from glm.predict import run_chat

        run_chat(cfg)
    elif run_mode == "export":
        from glm.export import run_export

        run_export(cfg)


if __name__ == "__main__":
    main()
