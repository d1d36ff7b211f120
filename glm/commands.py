"""The tool subcommands of `glm`: convert, merge-lora, rank-table, merge-rank-tables, transform-ckpt,
validate, plot, launch.

Each is a thin click wrapper over one function in the module that does the work (imported when the
command runs, so `glm --help` stays fast); errors go through `glm.cli.handle_errors` like every command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from glm import GLMError

if TYPE_CHECKING:
    from glm.settings import RunConfig

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("convert", context_settings=CONTEXT, short_help="Convert weights HF <-> MindSpore.")
@click.option("--input_path", "--torch_ckpt_dir", "input_path", required=True,
              help="HF folder/file (default direction) or MindSpore .ckpt/.safetensors (--reversed).")
@click.option("--output_path", "--mindspore_ckpt_path", "output_path", required=True,
              help="MindSpore .ckpt/.safetensors file, or the HF output folder with --reversed.")
@click.option("--reversed", "to_hf", is_flag=True, help="MindSpore -> HF safetensors folder.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Cast every floating tensor (default: keep; bf16 -> float32 for MindSpore).")
@click.option("--layout", type=click.Choice(["chatglm_hf", "glm_hf"]), default="chatglm_hf", show_default=True,
              help="Names of the HF output with --reversed (glm_hf: transformers GlmForCausalLM).")
@click.option("--max_shard_size", default="5GB", show_default=True, help="HF output shard size with --reversed.")
@click.option("--config", default=None, help="--reversed: run config (YAML) for config.json and the tokenizer "
                                             "files (default: the one recorded in the checkpoint).")
@click.option("--base", default=None, help="--reversed with a LoRA adapter: base weights to merge it into "
                                           "(default: the recorded base).")
def convert_command(input_path: str, output_path: str, to_hf: bool, dtype: str | None, layout: str,
                    max_shard_size: str, config: str | None, base: str | None) -> None:
    """Convert ChatGLM2/3 weights between HF and MindSpore.

    HF -> MindSpore: a folder of *.safetensors or pytorch_model*.bin (ChatGLM or GlmForCausalLM names) to a
    .ckpt or .safetensors file. With --reversed, a MindSpore checkpoint to an HF safetensors folder.
    dtypes are kept, except that bfloat16 becomes float32 in MindSpore checkpoints. The HF folder also gets
    config.json, generation_config.json and the tokenizer files, so from_pretrained loads it; a LoRA
    adapter is merged into its base on the way out.
    """
    from glm.convert import convert

    if not to_hf:   # these shape the HF output only: given for HF -> MindSpore they would be ignored
        ctx = click.get_current_context()
        given = [f"--{n}" for n in ("layout", "max_shard_size", "config", "base")
                 if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise GLMError(f"{', '.join(given)}: only with --reversed (MindSpore -> HF); "
                           "HF -> MindSpore reads the names and config from the input")
    s = convert(input_path, output_path, to_hf=to_hf, dtype=dtype, layout=layout, max_shard_size=max_shard_size,
                config=config, base=base)
    click.echo(f"converted {s['tensors']} tensors ({s['params']:,} parameters, {s['bytes'] / 1e6:,.1f} MB, "
               f"{'/'.join(s['dtypes'])}) {s['src']} -> {s['dst']} in {s['seconds']:.1f} s")


@click.command("merge-lora", context_settings=CONTEXT, short_help="Fold a LoRA adapter into its base weights.")
@click.option("--adapter", required=True, help="Adapter checkpoint written by a LoRA run.")
@click.option("--base", default=None, help="Base weights (.ckpt/.safetensors/HF folder); "
                                           "default: the one recorded in the adapter.")
@click.option("--output", required=True, help="Merged checkpoint (.ckpt or .safetensors).")
def merge_lora_command(adapter: str, base: str | None, output: str) -> None:
    """Fold a LoRA adapter into its base weights and write a plain checkpoint.

    W' = W + (lora_alpha / lora_rank) * B @ A for every adapted linear; the result loads into a model
    built without pet_config and gives the same logits as base + adapter.
    """
    from glm.merge_lora import merge_lora

    click.echo(merge_lora(adapter, output, base=base))


@click.command("rank-table", context_settings=CONTEXT, short_help="Write (or --check) an HCCL rank table.")
@click.option("--device_num", default="[0,8)", show_default=True,
              help="Device range of this server, first included, last excluded.")
@click.option("--visible_devices", default="0,1,2,3,4,5,6,7", show_default=True,
              help="Device ids, indexed by --device_num.")
@click.option("--server_ip", default="", help="server_id (default: this host's IP).")
@click.option("--device_num_per_node", type=int, default=8, show_default=True)
@click.option("--device_ips", default="", help="IPs of the devices in the range, comma-separated "
                                               "(default: hccn_tool, else /etc/hccn.conf).")
@click.option("--hccn_conf", default="/etc/hccn.conf", hidden=True)
@click.option("--output", default="", help="Output file (default ./hccl_{N}p_{ids}_{server_ip}.json).")
@click.option("--check", metavar="FILE", default="", help="Validate FILE instead of writing a table.")
@click.option("--rank_size", type=click.IntRange(min=1), default=None,
              help="With --check: the number of ranks FILE must have.")
def rank_table_command(device_num: str, visible_devices: str, server_ip: str, device_num_per_node: int,
                       device_ips: str, hccn_conf: str, output: str, check: str, rank_size: int | None) -> None:
    """Write the HCCL rank table ("version 1.0") of one Ascend server, or check one.

    As in MindFormers, a range crossing device 4 must be the whole server: [0,8) or [0,16).
    Merge the tables of several servers with `glm merge-rank-tables`.
    """
    from glm.rank_table import check_rank_table, rank_table_size, write_server_rank_table

    if check:
        table = check_rank_table(check, rank_size)
        click.echo(f"rank table {check}: ok ({table['server_count']} server(s), {rank_table_size(table)} ranks)")
        return
    if rank_size is not None:
        raise GLMError("--rank_size goes with --check FILE")
    out, _ = write_server_rank_table(device_num, visible_devices, server_ip, device_num_per_node, device_ips,
                                     hccn_conf, output)
    click.echo(f"rank table written to {out}")


@click.command("merge-rank-tables", context_settings=CONTEXT,
               short_help="Merge one-server rank tables into one table.")
@click.argument("files", nargs=-1, required=True)
@click.option("--output", default="", help="Output file (default ./hccl_{servers}s_{ranks}p.json).")
def merge_rank_tables_command(files: tuple[str, ...], output: str) -> None:
    """Merge one-server HCCL rank tables (from `glm rank-table`) into a multi-server table.

    Servers are taken in argument order and rank_id is renumbered 0..N-1 across all of them.
    """
    from glm.rank_table import merge_rank_table_files, rank_table_size

    out, merged = merge_rank_table_files(list(files), output)
    click.echo(f"merged rank table ({merged['server_count']} servers, {rank_table_size(merged)} ranks) "
               f"written to {out}")


@click.command("transform-ckpt", context_settings=CONTEXT, short_help="Merge or re-slice distributed checkpoints.")
@click.option("--src_ckpt_strategy", default=None,
              help="Strategy file or directory of the source; empty/None for data-parallel or complete checkpoints.")
@click.option("--dst_ckpt_strategy", default=None,
              help="Strategy file or directory of the destination; empty/None for one complete checkpoint.")
@click.option("--src_ckpt_dir", required=True, help="Directory holding rank_0/, rank_1/, ...")
@click.option("--dst_ckpt_dir", required=True, help="Output directory.")
@click.option("--prefix", default="checkpoint_", show_default=True, help="Output file prefix.")
@click.option("--check_values", is_flag=True, help="Data parallel: also compare every rank's values with rank 0.")
def transform_ckpt_command(src_ckpt_strategy: str | None, dst_ckpt_strategy: str | None, src_ckpt_dir: str,
                           dst_ckpt_dir: str, prefix: str, check_values: bool) -> None:
    """Merge per-rank checkpoints (SRC_CKPT_DIR/rank_K/*.ckpt) into one, or re-slice them.

    Without a source strategy (data parallel), the ranks must hold the same model and rank 0's copy is
    written as DST_CKPT_DIR/rank_0/{prefix}0.ckpt; with one, ms.transform_checkpoints re-slices. Merge the
    weights-only files of OUTPUT_DIR/checkpoint_network/, not the training state of OUTPUT_DIR/checkpoint/.
    """
    from glm.transform_ckpt import transform

    transform(src_ckpt_strategy, dst_ckpt_strategy, src_ckpt_dir, dst_ckpt_dir, prefix, check_values)


@click.command("validate", context_settings=CONTEXT, short_help="Check a config without building the model.")
@click.argument("config_path", metavar="CONFIG")
@click.option("--run_mode", default=None, help="Check for this run mode (default: the config's run_mode).")
@click.argument("overrides", nargs=-1)
def validate_command(config_path: str, run_mode: str | None, overrides: tuple[str, ...]) -> None:
    """Check CONFIG (with key=value OVERRIDES) as a run would, without building the model.

    Every key and value is checked, the files the run mode reads (datasets, tokenizer, checkpoints) must
    exist and the tokenizer must load. Exit 0 and one `ok` line, or one `error:` line and exit 2.
    """
    from glm.cli import print_notices, resolve_run_config
    from glm.settings import resolve

    cfg = resolve_run_config(config_path, run_mode, {}, overrides)
    print_notices(cfg)
    run = resolve(cfg)
    checked = _check_run_files(run)
    click.echo(f"{config_path}: ok (run_mode {run.run_mode}, output_dir {run.output_dir}"
               f"{', ' + str(len(checked)) + ' file(s) found' if checked else ''})")


def _check_run_files(run: RunConfig) -> list[str]:
    """The files `run`'s run mode reads (glm.run_inputs, as the run finds them), each checked to exist
    (GLMError naming the key otherwise), and its tokenizer loaded. Returns the paths."""
    import os

    from glm.run_inputs import DATA_OF_MODE, RANDOM_INIT, checkpoint_paths, tokenizer_section

    wanted: list[tuple[str, str]] = []
    name = DATA_OF_MODE.get(run.run_mode)
    if name is not None:
        data = run.dataset(name)
        wanted += [(f"{name}.data_loader.dataset_dir", data.data_loader.dataset_dir),
                   (f"{name}.tokenizer.vocab_file", data.tokenizer.vocab_file)]
        tokenizer = data.tokenizer
    elif run.run_mode != "export":
        tokenizer, where = tokenizer_section(run)
        wanted.append((f"{where}.vocab_file", tokenizer.vocab_file))
    else:
        tokenizer = None
    wanted += [("load_checkpoint", p) for p in checkpoint_paths(run.load_checkpoint) if p != RANDOM_INIT]
    for key, path in wanted:
        if not path:
            raise GLMError(f"{key}: not set; run_mode {run.run_mode} reads it")
        if not os.path.exists(path):
            raise GLMError(f"{key}: {path} does not exist (relative paths are read from {os.getcwd()})")
    if tokenizer is not None:   # it loads (a wrong file is the usual mistake); still no model
        from glm.tokenizer import load_tokenizer

        load_tokenizer(tokenizer.type, tokenizer.vocab_file)
    return [path for _, path in wanted]


@click.command("plot", context_settings=CONTEXT, short_help="Plot a run's curves (loss, lr, ...) as PNGs.")
@click.argument("run_dir", metavar="RUN_DIR")
def plot_command(run_dir: str) -> None:
    """Plot the curves of RUN_DIR/metrics.jsonl into RUN_DIR/plots/ (also during a run)."""
    from glm.runlog import plot_run

    for path in plot_run(run_dir):
        click.echo(f"wrote {path}")


@click.command("launch", context_settings=CONTEXT,
               short_help="Run a job on several devices or machines (msrun or rank table).")
@click.option("--config", "config_path", required=True, help="YAML config; its output_dir holds the logs.")
@click.option("--devices", required=True, metavar="[START,END]",
              help="Devices START..END-1 of this machine, e.g. [0,8].")
@click.option("--run_mode", required=True, help="train | finetune | eval | predict.")
@click.option("--rank_table", default=None, help="HCCL rank table (Ascend); without it, the msrun form.")
@click.option("--rank_size", type=int, default=None, help="Total ranks over all machines (multi-machine only).")
@click.option("--nodes", default=None, help="msrun: number of machines.")
@click.option("--node_rank", default=None, help="msrun: this machine's index (follows from --devices).")
@click.option("--master_addr", default=None, help="msrun: node 0's address [MASTER_ADDR, 127.0.0.1].")
@click.option("--master_port", default=None, help="msrun: scheduler port [MASTER_PORT, 8118].")
@click.option("--predict_data", default=None, help="predict: a prompt or a file.")
@click.option("--dry_run", is_flag=True, help="Print each process's environment and the command; start nothing.")
@click.argument("overrides", nargs=-1)
def launch_command(config_path: str, devices: str, run_mode: str, rank_table: str | None, rank_size: int | None,
                   nodes: str | None, node_rank: str | None, master_addr: str | None, master_port: str | None,
                   predict_data: str | None, dry_run: bool, overrides: tuple[str, ...]) -> int:
    """Run RUN_MODE on devices START..END-1, one supervised process per device.

    OVERRIDES (dotted key=value) reach every rank. Rank k logs to OUTPUT_DIR/log/rank_k/glm.log; if a rank
    fails, the others are stopped and the failed rank's log is named. Environment: CLUSTER_TIME_OUT (120 s),
    GLM_KILL_TIMEOUT (5 s between SIGTERM and SIGKILL), MASTER_ADDR, MASTER_PORT, NODE_RANK.
    """
    from glm.launch import FLAG_NAMES, launch, plan_launch

    plan = plan_launch(config_path, devices, run_mode, rank_table=rank_table, rank_size=rank_size, nodes=nodes,
                       node_rank=node_rank, master_addr=master_addr, master_port=master_port,
                       predict_data=predict_data, overrides=overrides, names=FLAG_NAMES)
    return launch(plan, dry_run)


COMMANDS = (convert_command, merge_lora_command, rank_table_command, merge_rank_tables_command,
            transform_ckpt_command, validate_command, plot_command, launch_command)
