"""Checking nested config mappings against a schema (the schema itself lives in glm/config.py).

A schema entry is `key: (kind, default[, minimum])`, where kind is a type or tuple of types, a
frozenset of allowed values, a nested schema dict, or a function `(value, where) -> value`.
A nested schema with default None is an optional section: it stays None when absent. Every error is a
`GLMError` naming the dotted key and what was expected.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable
from typing import Any

from glm import GLMError

NONE = type(None)   # for kinds such as (int, NONE)
_NONE_STRINGS = ("None", "none", "null", "Null", "NULL", "~")  # MindFormers YAMLs write `pre_seq_len: None`
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list", dict: "a mapping", NONE: "null"}


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
    for key in section:
        if key not in schema:
            path = f"{where}.{key}" if where else str(key)
            raise GLMError(f"{path}: unknown key{hint(key, schema, f'{where}.' if where else '')}")
    out = {}
    for key, (kind, default, *minimum) in schema.items():
        path = f"{where}.{key}" if where else key
        value = _value(section[key], kind, default, path) if key in section else _default(kind, default, path)
        if minimum and isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum[0]:
            raise GLMError(f"{path}: expected a value >= {minimum[0]}, got {value!r}")
        out[key] = value
    return out
