"""`--dry_run`: check a config end to end without training.

The config has already passed the loader's checks (every key, refused keys, parallel layout: the same
as a real run's). Then: the device exists; export's own checks; prints the resolved config; builds the
model (with its adapters) and counts its real parameters; loads `load_checkpoint` into it (required
unless training from scratch), so a checkpoint whose names or shapes do not fit fails here with the same
one-line error as a real run; and decodes one sample of the data the run mode reads (train: a training
sample next to its masked labels, the usual place where a wrong template or a missing eos shows up;
eval: an eval sample; predict/chat: the tokenizer only; export: no data). Training modes also print the
estimated peak memory per device, with the loss unchunked and chunked, against the device's memory
(glm/memory.py): the answer to "will it fit" before any weight is loaded onto a device.

The model is built with MindSpore's deferred initialisation, so parameters get memory only when a
checkpoint fills them: a 6B config is checked on a laptop in seconds (without a checkpoint, ~0.5 GB RSS).
"""

from __future__ import annotations

import contextlib

import numpy as np
import yaml

from glm.build import build_model, build_tokenizer, check_device, check_vocab, load_checkpoints
from glm.export import export_preflight
from glm.model.glm import count_parameters
from glm.run_inputs import DATA_OF_MODE, RANDOM_INIT, checkpoint_paths, tokenizer_section
from glm.settings import RunConfig, as_run


def _deferred_init():
    """`no_init_parameters()` where MindSpore still has it (deprecated after 2.9), else eager init."""
    try:
        from mindspore.nn.utils import no_init_parameters
    except ImportError:  # pragma: no cover - newer MindSpore
        return contextlib.nullcontext()
    return no_init_parameters()


def build_model_deferred(cfg: RunConfig | dict):
    """The model (and LoRA settings) as training builds it, but with parameter memory deferred."""
    with _deferred_init():
        return build_model(cfg)


def _show_ids(ids: np.ndarray, limit: int = 24) -> str:
    ids = [int(i) for i in ids]
    head = ", ".join(map(str, ids[:limit]))
    return f"[{head}{', ...' if len(ids) > limit else ''}] ({len(ids)} tokens)"


def dry_run(cfg: RunConfig | dict, run_mode: str) -> None:
    """Check what `run_mode` would check, in the same order and with the same messages, without running it."""
    run = as_run(cfg)
    check_device(run)
    if run_mode == "export":
        export_preflight(run)
    print("# resolved config")
    print(yaml.safe_dump(run.raw, sort_keys=False, allow_unicode=True).rstrip(), flush=True)
    model, pet = build_model_deferred(run)
    total, trainable = count_parameters(model), count_parameters(model, True)
    method = {"lora": " (LoRA)", "ptuning2": " (P-Tuning v2 prefix)"}.get((pet or {}).get("pet_type"), "")
    print(f"\nparameters: {total:,} total, {trainable:,} trainable{method}", flush=True)
    # Only training may start from random weights without saying so (finetune, eval, ... need weights).
    used = load_checkpoints(model, run.load_checkpoint, pet, required=run_mode != "train", run_mode=run_mode)
    if used:
        print(f"load_checkpoint: loaded {', '.join(used)}")
    elif checkpoint_paths(run.load_checkpoint) == [RANDOM_INIT]:
        print("load_checkpoint: random (random initialisation)")
    else:
        print("load_checkpoint: (none: random initialisation)")
    if run_mode in ("train", "finetune"):
        from glm.memory import report  # pure arithmetic on the parameter shapes: nothing is allocated

        print("\n" + report(run, model), flush=True)
    name = DATA_OF_MODE.get(run_mode)
    if name is None:
        if run_mode in ("predict", "chat", "serve"):
            tok, where = build_tokenizer(run), tokenizer_section(run)[1]
            check_vocab(tok, model.config, where)
            print(f"tokenizer: {where} ({tok.vocab_size} ids)")
        print(f"\n{run_mode} reads no dataset; dry run OK")
        return
    _show_sample(run, name, model.config)


def _show_sample(run: RunConfig, name: str, mcfg) -> None:
    from glm.dataset import build_dataset  # imports mindspore.dataset; no graph is compiled

    data = build_dataset(run.dataset(name), batch_size=run.runner_config.batch_size,
                         seq_length=mcfg.seq_length if name == "train_dataset" else None, where=name)
    tok = data.tokenizer
    check_vocab(tok, mcfg, f"{name}.tokenizer")
    ids, labels = data.samples["input_ids"][0], data.samples["labels"][0]
    real = ids[ids != mcfg.pad_token_id] if name == "train_dataset" else ids
    print(f"\nsample 0 of {len(data.records)} ({name}):")
    print(f"  input_ids   {_show_ids(ids)}")
    print(f"  input text  {tok.decode(real, skip_special_tokens=False)!r}")
    if name == "train_dataset":
        kept = labels[labels != -100]
        print(f"  labels      {int((labels == -100).sum())} x -100, then {_show_ids(kept)}")
        print(f"  label text  {tok.decode(kept)!r}" + ("  + eos" if len(kept) and kept[-1] == 2 else "  (NO eos!)"))
    else:
        print(f"  reference   {data.records[0].answer!r}")
    if name == "train_dataset":
        from glm.train_eval import eval_settings  # the run's checks: bad best_metric, no eval block, ...

        plan = eval_settings(run)
        if plan:
            print(f"do_eval: every {plan.step_interval} steps / {plan.epoch_interval} epochs (<= 0: off), best by "
                  f"{plan.best_metric} ({'higher' if plan.greater_is_better else 'lower'} is better), "
                  f"early_stopping_patience {plan.patience}")
    print(f"\nbatches per epoch: {data.num_batches} (batch {data.batch_size}); dry run OK")
