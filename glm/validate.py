"""Checking nested config mappings against a schema (the typed sections live in glm/settings.py).

A schema entry is `key: (kind, default[, minimum])`, where kind is a type or tuple of types, a
frozenset of allowed values, a nested schema dict, or a function `(value, where) -> value`.
A nested schema with default None is an optional section: it stays None when absent. Every error is a
`GLMError` naming the dotted key and what was expected.

Inside `collect_errors()` the checks do not stop at the first problem: each bad key is recorded (and takes
its default) so that one run reports every error of a file.

`key(...)` / `section(...)` declare one dataclass field of a config section with its default, its one-line
doc and how the tool treats it (honoured / notice / refused / inert): glm/settings.py and GLMConfig use them,
and glm/settings.py derives the schema from those fields, so each default exists in exactly one place.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import difflib
from collections.abc import Iterable, Iterator
from typing import Any

from glm import GLMError

NONE = type(None)   # for kinds such as (int, NONE)
_NONE_STRINGS = ("None", "none", "null", "Null", "NULL", "~")  # MindFormers YAMLs write `pre_seq_len: None`
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list", dict: "a mapping", NONE: "null"}

# How a key is treated. HONOURED: changes the run as in MindFormers. NOTICE: performance/device-only, cannot
# apply here: listed in one summary line at start when set. REFUSED: would change the math (or the outputs)
# and is not implemented: an error when set. INERT: has no effect in MindFormers either (for GLM) or only
# matters together with another key that is itself reported.
HONOURED, NOTICE, REFUSED, INERT = "honoured", "notice", "refused", "inert"
_SAME = object()
FUNDAMENTAL = ("type", "pet_type")   # keys whose bad value is reported before all others


def key(default: Any = None, doc: str = "", *, kind: Any = None, min: Any = None, status: str = HONOURED,
        note: str = "", off: Any = _SAME, refuse: dict | None = None, ours: bool = False) -> Any:
    """One config key as a dataclass field.

    kind: what the YAML value may be (inferred from the default when omitted); min: lowest allowed number;
    status/note: how the key is treated and why; off: the value(s) that request nothing (for NOTICE/REFUSED:
    any other value is reported / refused; a tuple means several); refuse: {value: reason} for single values
    that are refused although the kind allows them; ours: a glm-launcher key, not one of MindFormers'.
    """
    meta = {"doc": doc, "kind": kind, "min": min, "status": status, "note": note,
            "off": default if off is _SAME else off, "refuse": refuse or {}, "ours": ours}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, doc: str, *, optional: bool = False, status: str = HONOURED, note: str = "",
            ours: bool = False) -> Any:
    """A nested section (another dataclass); optional sections are None when the file has none."""
    meta = {"doc": doc, "section": cls, "status": status, "note": note, "ours": ours, "optional": optional,
            "refuse": {}, "kind": None, "min": None, "off": None}
    if optional:
        return dataclasses.field(default=None, metadata=meta)
    return dataclasses.field(default_factory=cls, metadata=meta)


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def offs(f: dataclasses.Field) -> tuple:
    off = f.metadata.get("off")
    return off if isinstance(off, tuple) else (off,)


# ------------------------------------------------------------------------------------ error collection
_ERRORS: contextvars.ContextVar[list | None] = contextvars.ContextVar("glm_config_errors", default=None)


@contextlib.contextmanager
def collect_errors() -> Iterator[list]:
    """Within the block, schema errors are appended to the yielded list instead of raised."""
    errors: list = []
    token = _ERRORS.set(errors)
    try:
        yield errors
    finally:
        _ERRORS.reset(token)


def report(message: str, rank: int = 2) -> None:
    """Record an error (when collecting) or raise it. rank orders the list: 0 refused features,
    1 unknown keys, 2 bad values, 3 checks across keys."""
    errors = _ERRORS.get()
    if errors is None:
        raise GLMError(message)
    errors.append((rank, message))


def hint(key: Any, known: Iterable, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _is_check(kind: Any) -> bool:  # a validating function rather than a type
    return callable(kind) and not isinstance(kind, type)


def typed(value: Any, kind: Any, where: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if object in kinds:
        return copy.deepcopy(value)
    if isinstance(value, bool):  # bool is an int subclass: only accept it where a bool is expected
        if bool in kinds:
            return value
    elif isinstance(value, int) and int in kinds:
        return value
    elif isinstance(value, (int, float)) and float in kinds:
        return float(value)
    elif isinstance(value, str) and float in kinds and str not in kinds:
        try:  # PyYAML reads `1e-5` (no dot) as a string; `1.e-5` is a float
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tuple(k for k in kinds if k not in (int, float, bool))):
        return copy.deepcopy(value)
    expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
    raise GLMError(f"{where}: expected {expected}, got {value!r}")


def _value(value: Any, kind: Any, default: Any, where: str) -> Any:
    if value is None or (isinstance(value, str) and value in _NONE_STRINGS):
        if default is None or (isinstance(kind, tuple) and NONE in kind):
            return None
        if kind is str or isinstance(kind, dict) or _is_check(kind):  # '' / the filled section / []
            return _default(kind, default, where)
        expected = f"one of {sorted(kind, key=str)}" if isinstance(kind, frozenset) else _TYPE_NAMES.get(kind, "a value")
        raise GLMError(f"{where}: expected {expected}, got null")
    if isinstance(kind, dict):
        return validate_section(value, kind, where)
    if isinstance(kind, frozenset):
        if value not in kind:
            raise GLMError(f"{where}: expected one of {', '.join(map(repr, sorted(kind, key=str)))}, "
                           f"got {value!r}{hint(value, kind) if isinstance(value, str) else ''}")
        return value
    if _is_check(kind):
        return kind(value, where)
    return typed(value, kind, where)


def _default(kind: Any, default: Any, where: str) -> Any:
    if default is None:
        return None
    if isinstance(kind, dict):
        return validate_section(copy.deepcopy(default), kind, where)
    if _is_check(kind):
        return kind(copy.deepcopy(default), where)
    return copy.deepcopy(default)


def validate_section(section: Any, schema: dict, where: str) -> dict:
    """Check one mapping against its schema; return a new dict with every key, defaults filled."""
    if not isinstance(section, dict):
        raise GLMError(f"{where or 'top level'}: expected a mapping, got {section!r}")
    for name in section:
        if name not in schema:
            path = f"{where}.{name}" if where else str(name)
            report(f"{path}: unknown key{hint(name, schema, f'{where}.' if where else '')}", rank=1)
    out = {}
    for name, (kind, default, *minimum) in schema.items():
        path = f"{where}.{name}" if where else name
        try:
            value = _value(section[name], kind, default, path) if name in section else _default(kind, default, path)
            if minimum and isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum[0]:
                raise GLMError(f"{path}: expected a value >= {minimum[0]}, got {value!r}")
        except GLMError as e:   # a wrong `type` / `pet_type` decides what the rest means: report it first
            report(str(e), rank=0 if name in FUNDAMENTAL else 2)
            value = _default(kind, default, path) if name in section else None
        out[name] = value
    return out
