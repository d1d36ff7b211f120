"""What the loader does with each key beyond its type: notices, refusals and checks across keys.

`problems(run)` reports (through glm/validate.py's `report`, so all of them are collected) every refused key
and every combination that cannot run; `notices(run)` lists the performance/device-only keys that are set
but cannot apply here, for the one summary line printed at start. Both read the statuses declared next to
each key in glm/settings.py and glm/model/config.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from glm import GLMError
from glm.model.config import GLMConfig
from glm.settings import (
    CALLBACK_NOTICES,
    CALLBACK_TYPES,
    LR_TYPES,
    PTUNING,
    PetConfig,
    RunConfig,
)
from glm.validate import NOTICE, REFUSED, offs, report


def _walk(obj: Any, where: str) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) of every key of a section, nested sections included."""
    for f in dataclasses.fields(obj):
        if "doc" not in f.metadata:
            continue
        value = getattr(obj, f.name)
        path = f"{where}.{f.name}" if where else f.name
        if f.metadata.get("section") is not None:
            if value is not None:
                yield from _walk(value, path)
            continue
        yield path, f, value
        if f.name == "pet_config" and isinstance(value, dict):
            pet = PetConfig(**value)
            yield from _walk(pet, path)


def _keys(run: RunConfig) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    for path, f, value in _walk(run, ""):
        # Without use_parallel MindFormers ignores the parallel sections (and resets the degrees to 1).
        if not run.use_parallel and path.startswith(("parallel.", "parallel_config.")):
            continue
        # The *_task blocks are the same datasets (aliases in MindFormers' files): report them once.
        if path.startswith(("train_dataset_task.", "eval_dataset_task.")):
            continue
        yield path, f, value
    for group in ("callbacks", "eval_callbacks"):
        for i, item in enumerate(getattr(run, group)):
            obj = CALLBACK_TYPES[item["type"]](**{k: v for k, v in item.items() if k != "type"})
            yield from _walk(obj, f"{group}[{i}]")


def _set(f: dataclasses.Field, value: Any) -> bool:
    return value not in offs(f)


def notices(run: RunConfig) -> list[str]:
    """Dotted keys that are set to something this device cannot apply (performance/device-only)."""
    out = [path for path, f, value in _keys(run) if f.metadata["status"] == NOTICE and _set(f, value)]
    for group in ("callbacks", "eval_callbacks"):
        for i, item in enumerate(getattr(run, group)):
            if item["type"] in CALLBACK_NOTICES:
                out.append(f"{group}[{i}] {item['type']} ({CALLBACK_NOTICES[item['type']]})")
    return out


def notice_line(run: RunConfig) -> str | None:
    found = notices(run)
    if not found:
        return None
    return (f"notice: {len(found)} performance/device-only setting(s) are accepted but not applied here: "
            f"{', '.join(found)} (see docs/config.md)")


def problems(run: RunConfig) -> None:
    """Report refused keys and impossible combinations (rank 0 first: the features that do not exist)."""
    for path, f, value in _keys(run):
        note = f.metadata.get("note")
        if f.metadata["status"] == REFUSED and _set(f, value):
            report(f"{path}: {value!r} is not supported{f' ({note})' if note else ''}", rank=0)
        elif isinstance(value, (str, int)) and value in f.metadata.get("refuse", {}):
            report(f"{path}: {value!r} {f.metadata['refuse'][value]}", rank=0)
    _pet_checks(run)
    _training_checks(run)
    _parallel_checks(run)
    _data_checks(run)


def _data_checks(run: RunConfig) -> None:
    """data_loader.format / columns against each other and the tokenizer (glm.data.resolve_columns' rules)."""
    from glm.data import resolve_columns

    for name in ("train_dataset", "eval_dataset"):
        data = getattr(run, name)
        if data is None:
            continue
        loader, where = data.data_loader, f"{name}.data_loader"
        try:
            resolve_columns(loader.format, loader.origin_columns, dataclasses.asdict(loader.columns), where)
        except GLMError as e:
            report(str(e), rank=2)
        if loader.format == "conversations" and data.tokenizer.type != "ChatGLM3Tokenizer":
            report(f"{where}.format: conversations needs {name}.tokenizer.type: ChatGLM3Tokenizer (role tokens), "
                   f"got {data.tokenizer.type!r}", rank=2)


def _pet_checks(run: RunConfig) -> None:
    mc: GLMConfig = run.model.model_config
    pet = mc.pet_config
    arch = run.model.arch.type
    where = "model.model_config.pet_config"
    if pet and pet["pet_type"] == "lora" and pet["lora_dropout"] >= 1:
        report(f"{where}.lora_dropout: expected a probability in [0, 1), got {pet['lora_dropout']!r}", rank=2)
    if arch == "ChatGLM2WithPtuning2" and not (pet and pet["pet_type"] == PTUNING):
        report(f"model.arch.type: 'ChatGLM2WithPtuning2' needs model.model_config.pet_config.pet_type: {PTUNING}",
               rank=0)
    if arch == "ChatGLM2WithLora" and not (pet and pet["pet_type"] == "lora"):
        report("model.arch.type: 'ChatGLM2WithLora' needs model.model_config.pet_config with pet_type: lora", rank=3)


def _training_checks(run: RunConfig) -> None:
    lr = run.lr_schedule
    if lr.total_steps == 0:
        report("lr_schedule.total_steps: expected -1 (whole run) or a positive number of steps, got 0", rank=2)
    if lr.warmup_ratio is not None and lr.warmup_ratio > 1:
        report(f"lr_schedule.warmup_ratio: expected a fraction in [0, 1], got {lr.warmup_ratio!r}", rank=2)
    if LR_TYPES.get(lr.type) == "linear" and lr.lr_end:
        report(f"lr_schedule.lr_end: the linear schedule decays to 0 (as MindFormers' LinearWithWarmUpLR), "
               f"got {lr.lr_end!r}; use type polynomial for a final lr", rank=3)
    for name in ("beta1", "beta2"):
        value = getattr(run.optimizer, name)
        if not value < 1:
            report(f"optimizer.{name}: expected a value in [0, 1), got {value!r}", rank=2)


def _parallel_checks(run: RunConfig) -> None:
    if not run.use_parallel:
        return
    from glm.parallel import check_parallel_support

    try:
        check_parallel_support(run.parallel, run.parallel_config, run.context.device_target)
    except GLMError as e:
        report(str(e), rank=3)


def format_errors(errors: list[tuple[int, str]]) -> str:
    """One error: its line. Several: a count, then one line each, the most fundamental first."""
    ordered = [msg for _, msg in sorted(errors, key=lambda e: e[0])]
    # `train_dataset_task.dataset_config` is usually a YAML alias of `train_dataset`: say each problem once.
    unique = list(dict.fromkeys(m.replace("_dataset_task.dataset_config.", "_dataset.") for m in ordered))
    if len(unique) == 1:
        return unique[0]
    return f"{len(unique)} config errors:\n" + "\n".join(f"  - {m}" for m in unique)
