"""The run config: one YAML file in the MindFormers layout, `key=value` overrides, validation.

`load_config(path, overrides)` returns plain nested dicts with every known key present (defaults
filled); `glm.settings.resolve(cfg)` turns that into the typed `RunConfig` the run modes use. The keys,
their defaults, docs and statuses are declared once, in glm/settings.py (and GLMConfig for the model);
the schema below is derived from them. An unknown or misspelt key, a wrong type, an out-of-range value,
a refused key or an impossible combination is reported with the file, the dotted key and what was
expected -- all problems of a file at once, the most fundamental first (glm/policy.py).
Relative paths in a config (dataset_dir, vocab_file, output_dir, ...) are kept as written and resolved by
their users against the current working directory, as MindFormers does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from glm import GLMError
from glm.settings import (
    CALLBACK_TYPES,
    CHECKPOINT_CALLBACKS,
    LR_TYPES,
    MODEL_ALIASES,
    RUN_MODES,
    LossScaleConfig,
    RunConfig,
    _callbacks,
    _model_config,
    _scale_sense,
    model_schema,
    resolve,
    schema_of,
)
from glm.validate import collect_errors, hint, report, validate_section

__all__ = ["CHECKPOINT_CALLBACKS", "LR_TYPES", "RUN_MODES", "SCHEMA", "load_config", "validate_config",
           "apply_overrides", "save_resolved", "resolve"]

SCHEMA: dict = schema_of(RunConfig)
CALLBACKS = {name: schema_of(cls) for name, cls in CALLBACK_TYPES.items()}


# --------------------------------------------------------------------------------------- validation
def _hoist_datasets(cfg: dict) -> dict:
    """A file may define only `<name>_task.dataset_config`: make `<name>` that same dict (in place)."""
    for name in ("train_dataset", "eval_dataset"):
        task = cfg.get(f"{name}_task")
        if cfg.get(name) is None and isinstance(task, dict) and isinstance(task.get("dataset_config"), dict):
            cfg[name] = task["dataset_config"]
    return cfg


def validate_config(raw: dict) -> dict:
    """Validate a raw config dict (as read from YAML); return a new dict with all defaults filled.

    Every problem of the config is collected and raised as one GLMError (glm.policy.format_errors).
    Idempotent: validating an already validated config returns an equal dict."""
    from glm.policy import format_errors, problems

    with collect_errors() as errors:
        cfg = validate_section(_hoist_datasets(dict(raw)), SCHEMA, "")
        try:
            problems(resolve(cfg))
        except GLMError as e:
            report(str(e), rank=3)
    if errors:
        raise GLMError(format_errors(errors))
    if not cfg["output_dir"]:   # `output_dir: ''` means the default folder; said once, here
        cfg["output_dir"] = SCHEMA["output_dir"][1]
    if cfg["optimizer"]["learning_rate"] is not None:  # one source of truth for the trainer
        cfg["lr_schedule"]["learning_rate"] = cfg["optimizer"]["learning_rate"]
    return cfg


# --------------------------------------------------------------------------------------- overrides
def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, text = str(item).partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise GLMError(f"override {item!r}: expected dotted.key=value, e.g. runner_config.batch_size=2")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML (e.g. an unbalanced bracket): keep the text
    return key.split("."), value


def _callback_item(items: list, part: str, item: str) -> dict:
    if part.isdigit():
        if int(part) >= len(items):
            raise GLMError(f"override {item!r}: callbacks has {len(items)} entries, no index {part}")
        return items[int(part)]
    if part not in CALLBACKS:
        raise GLMError(f"override {item!r}: unknown callback {part!r}{hint(part, CALLBACKS)}")
    names = CHECKPOINT_CALLBACKS if part in CHECKPOINT_CALLBACKS else (part,)
    for entry in items:
        if isinstance(entry, dict) and entry.get("type") in names:
            return entry
    items.append({"type": part})  # overriding a callback the file lacks adds it
    return items[-1]


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Set dotted `key=value` items (values parsed as YAML) in `cfg` and return the validated result.

    Keys are checked against the schema (unknown key: error naming the closest match), then the
    whole config is validated again, so values get the same checks and conversions as the file's.
    Callbacks are addressed by index or type: `callbacks.CheckpointMonitor.save_checkpoint_steps=10`
    (a callback the config lacks is added)."""
    return validate_config(_set_overrides(cfg, overrides))


def _set_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    _hoist_datasets(cfg)  # so `train_dataset.x=...` edits the task's block rather than a new, partial one
    for item in overrides:
        parts, value = _parse_override(item)
        node, kind = cfg, SCHEMA
        for i, part in enumerate(parts):
            where = ".".join(parts[: i + 1])
            if kind is _callbacks:
                node = _callback_item(node, part, item)
                kind = CALLBACKS[node["type"]]
                if i == len(parts) - 1:
                    raise GLMError(f"override {item!r}: set a key of the callback, e.g. {where}.prefix=...")
                continue
            if kind is _model_config:
                kind = model_schema() if part not in MODEL_ALIASES else {part: (object, None)}
            elif kind is _scale_sense:
                kind = schema_of(LossScaleConfig)
            if not isinstance(kind, dict):
                parent = ".".join(parts[:i])
                raise GLMError(f"override {item!r}: {parent} is a single value, it has no key {part!r}")
            if part not in kind:
                prefix = ".".join(parts[:i]) + "." if i else ""
                raise GLMError(f"override {item!r}: unknown key {where!r}{hint(part, kind, prefix)}")
            if i == len(parts) - 1:
                node[part] = value
                break
            kind = kind[part][0]
            child = node.get(part)
            if kind is _callbacks:
                node[part] = child if isinstance(child, list) else []
            elif not isinstance(child, dict):
                node[part] = {}
            node = node[part]
    return cfg


# -------------------------------------------------------------------------------------- file I/O
def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Read, override and validate a YAML run config; errors name the file, the key and the problem."""
    path = Path(path)
    if not path.exists():
        raise GLMError(f"{path}: config file not found")
    if path.is_dir():
        raise GLMError(f"{path}: is a directory, expected a YAML config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GLMError(f"{path}:{line}: invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GLMError(f"{path}: cannot read: {e}") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else type(raw).__name__
        raise GLMError(f"{path}: expected a mapping of config keys at the top level, got {got}")
    try:
        return validate_config(_set_overrides(raw, overrides))
    except GLMError as e:
        raise GLMError(f"{path}: {e}") from None


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # write shared sections out in full, no &id001
        return True


def save_resolved(cfg: dict, output_dir: str | Path) -> Path:
    """Write `output_dir/config.resolved.yaml` atomically (glm.io: temp file, fsync, rename); return its path."""
    from glm.io import write_text_atomic

    text = yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return write_text_atomic(Path(output_dir) / "config.resolved.yaml", text)
