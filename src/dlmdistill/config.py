"""Configuration as dataclasses: help text on every field, YAML files, command-line overrides.

Every configurable object in dlmdistill is a dataclass whose fields carry ``metadata={"help": ...}``.
A run's configuration is a tree of such dataclasses (for example ``SFTRunConfig`` with sections
``model``, ``data``, ``training``, ``method``). This module turns YAML files and ``--key value``
arguments into that tree, strictly:

* an unknown key is an error that names the file (or the command line), the section and the key,
  with the closest valid names as suggestions;
* values are converted to the field's declared type (``int``, ``float``, ``bool``, ``str``,
  ``list[...]``, ``Literal[...]`` choices, ``X | None``) and a bad value names the field;
* command-line keys are either dotted (``--training.learning_rate 1e-4``) or a leaf name that is
  unique across sections (``--learning_rate 1e-4``).

Why one file of this length: it is one mechanism (types -> conversion -> dataclass building ->
validation -> where a value came from -> help text), each part used by the next.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .errors import UserError


class ConfigError(UserError):
    """A configuration value or key is invalid. The message names where it came from."""


class InvalidValueError(ConfigError):
    """A section's ``validate()`` rejected its values (raised by ``from_dict``): ``where`` names the section,
    ``reason`` is the check's message and ``obj`` the section that failed it."""

    def __init__(self, where: str, reason: str, obj: Any = None) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason, self.obj = where, reason, obj


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING) -> Any:  # noqa: A002
    """``dataclasses.field`` with mandatory help text."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------------
# type conversion


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to type ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in get_args(tp):
                return None
        errors = []
        for a in args:
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: cannot interpret {value!r} as {tp}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("["):
                value = yaml.safe_load(s)
            elif item_tp is str:
                value = [value]
            else:
                value = [v for v in s.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        out = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where=where)
    return value


def convert_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` (from YAML or the command line) as type ``tp``, as a configuration field of that type
    would hold it; a :class:`ConfigError` naming ``where`` if it cannot be."""
    return _convert(value, tp, where)


def check_not_empty(obj: Any, *names: str) -> None:
    """For a config's ``validate``: an optional text field (a path, a device) that was given must not be
    empty, since an empty value would silently mean the default. Raises ``ValueError`` naming the field."""
    for name in names:
        if getattr(obj, name) == "":
            raise ValueError(f"{name} is an empty string; give a value or leave {name} out for its default")


def check_ranges(obj: Any, *, at_least: dict[str, float] | None = None, unit: dict[str, bool] | None = None) -> None:
    """Range checks for a config's ``validate``: every field in ``at_least`` must be a finite number
    >= its bound; every field in ``unit`` must lie in [0, 1] (``True``) or [0, 1) (``False``).
    Raises ``ValueError`` naming the field and the value (``from_dict`` adds where it came from)."""
    for name, low in (at_least or {}).items():
        value = getattr(obj, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
            raise ValueError(f"{name} must be >= {low}, got {value!r}")
    for name, closed in (unit or {}).items():
        value = getattr(obj, name)
        ok = isinstance(value, (int, float)) and 0 <= value and (value <= 1 if closed else value < 1)
        if not ok:
            raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value!r}")


# --------------------------------------------------------------------------------------------
# dict <-> dataclass


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


#: False while ``load_config`` checks a file's keys and types alone (its values are checked once, after the
#: command line is merged)
_CHECK_VALUES: contextvars.ContextVar[bool] = contextvars.ContextVar("check_values", default=True)


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a (possibly nested) mapping; unknown keys are errors. Every section's
    ``validate()`` runs once, sections left at their defaults included."""
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if key not in names:
            raise ConfigError(
                f"{where}: unknown key {key!r} for {cls.__name__}.{_suggest(key, names)} "
                f"Valid keys: {', '.join(names)}"
            )
        f = fields[key]
        if _is_dataclass_type(hints[key]) and isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            # a partly given section keeps the parent's defaults for the rest (not the section class's)
            value = deep_merge(_shallow_dict(f.default_factory()), value)
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None
    if _CHECK_VALUES.get():
        for name in names:  # the sections given were checked when they were built
            value = getattr(obj, name)
            if name not in kwargs and dataclasses.is_dataclass(value) and not isinstance(value, type):
                validate_tree(value, f"{where}.{name}")
        _validate(obj, where)
    return obj


def _validate(obj: Any, where: str) -> None:
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except (ValueError, TypeError) as e:
            raise InvalidValueError(where, str(e), obj) from None


def validate_tree(obj: Any, where: str = "config") -> None:
    """Run ``validate()`` of every section of a config tree. ``from_dict`` does this once for what it builds;
    a configuration assembled by hand in Python is checked with this."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_tree(value, f"{where}.{f.name}")
    _validate(obj, where)


def _shallow_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance as a mapping, nested sections as mappings too (values not copied)."""
    return {f.name: (_shallow_dict(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v)
            for f in dataclasses.fields(obj)}


def to_dict(obj: Any) -> dict[str, Any]:
    """The dataclass tree as plain YAML/JSON-serialisable data."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def leaf_paths(cls: type, prefix: str = "") -> dict[str, tuple[str, dataclasses.Field]]:
    """Map dotted path -> (path, field) for every leaf of a dataclass tree."""
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if _is_dataclass_type(hints[f.name]):
            out.update(leaf_paths(hints[f.name], prefix=f"{path}."))
        else:
            out[path] = (path, f)
    return out


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(cls: type, args: list[str]) -> dict[str, Any]:
    """Turn ``["--training.lr", "1e-4", "--steps=8", "--flag"]`` into a nested mapping.

    A key may be dotted or a leaf name that is unique in the tree. A key with no value is ``true``.
    """
    paths = leaf_paths(cls)
    sections = {p.rsplit(".", i)[0] for p in paths for i in range(1, p.count(".") + 1)}
    by_leaf: dict[str, list[str]] = {}
    for p in paths:
        by_leaf.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:]
        value: Any
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            vals = []
            j = i + 1
            while j < len(args) and not (args[j].startswith("--") and len(args[j]) > 2 and not _is_number(args[j])):
                vals.append(args[j])
                j += 1
            value = True if not vals else (vals[0] if len(vals) == 1 else vals)
            i = j
        key = key.replace("-", "_")
        if key in sections:  # a whole section as a YAML mapping: --eval.generation '{steps: 8}'
            mapping = yaml.safe_load(value) if isinstance(value, str) else None
            if not isinstance(mapping, dict):
                raise ConfigError(f"command line: --{key} takes a mapping such as '{{key: value}}', got {value!r}")
            for sub, v in _flatten(mapping, key).items():
                _set_path(out, sub, v)
            continue
        if key in paths:
            path = key
        elif key in by_leaf and len(by_leaf[key]) == 1:
            path = by_leaf[key][0]
        elif key in by_leaf:
            raise ConfigError(f"command line: --{key} is ambiguous; use one of {', '.join('--' + p for p in by_leaf[key])}")
        else:
            raise ConfigError(f"command line: unknown option --{key}.{_suggest(key, list(paths) + list(by_leaf))}")
        _set_path(out, path, value)
    return out


def _flatten(mapping: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in YAML file ``path``; a missing file, a folder, text that is not UTF-8 or invalid
    YAML is a :class:`ConfigError` naming the file (and line)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a YAML config file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: invalid YAML{at}: {' '.join(str(problem).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                under: dict[str, Any] | None = None, under_name: str = "") -> Any:
    """Load ``cls`` from an optional YAML file, then apply command-line overrides. ``under``: values that
    the file and the command line override (e.g. a run's own settings), called ``under_name`` in messages.
    ``prepare``, if given, rewrites the merged data before it is built and checked (e.g. one field standing
    for another).

    When a check fails on values the command line did not give, the message says where each came from
    (the file, ``under_name`` or the default) and which option overrides it (:func:`origin_note`)."""
    file_data: dict[str, Any] = {}
    cli: dict[str, Any] = {}
    where = "config"
    if path is not None:
        file_data = load_yaml(path)
        where = str(path)
    data = file_data
    if overrides:
        # check the YAML's keys and types alone first so that their errors name the file; value checks
        # (validate()) wait for the command line, which may supply what the file lacks (e.g. a teacher)
        token = _CHECK_VALUES.set(False)
        try:
            from_dict(cls, data, where=where)
        finally:
            _CHECK_VALUES.reset(token)
        cli = parse_overrides(cls, overrides)
        data = deep_merge(data, cli)
        where = f"{where} + command line" if path else "command line"
    data = deep_merge(under or {}, data)
    try:
        return from_dict(cls, prepare(data) if prepare else data, where=where)
    except InvalidValueError as e:
        layers = [(file_data, str(path)), (under or {}, under_name)]
        note = origin_note(cls, e, where, typed=cli, layers=layers)
        if not note:
            raise
        raise InvalidValueError(e.where, f"{e.reason}; {note}", e.obj) from None


def origin_note(cls: type, error: InvalidValueError, root: str, typed: dict[str, Any],
                layers: list[tuple[dict[str, Any], str]]) -> str:
    """Where the values named in ``error`` come from, for those not ``typed`` on the command line: the first
    of ``layers`` (``(data, name)``) that holds it, else the default; and the option that overrides it.
    A class may say that a field is set from another (``derived_from = {"generation.steps": "steps"}``):
    its origin and option are the other's. '' when every value named was typed."""
    section = error.where[len(root) + 1:] if error.where.startswith(root + ".") else ""
    prefix = f"{section}." if section else ""
    named: dict[str, str] = {}  # leaf name -> the shallowest path of the section with that name
    for p in leaf_paths(cls):
        name = p.rsplit(".", 1)[-1]
        if p.startswith(prefix) and re.search(rf"\b{re.escape(name)}\b", error.reason) and \
                (name not in named or p.count(".") < named[name].count(".")):
            named[name] = p
    typed_names = {k.rsplit(".", 1)[-1] for k in _flatten(typed, "")}
    derived = getattr(cls, "derived_from", {})
    notes = []
    for name, p in named.items():
        if name in typed_names:
            continue
        value = error.obj
        for part in p[len(prefix):].split("."):
            value = getattr(value, part, None)
        source = derived.get(p, p)
        found = next((label for data, label in layers if label and _has_path(data, source)), None)
        origin = f"comes from {found}" if found else f"is the default of {source}"
        notes.append(f"{name} {value!r} {origin} ({option_name(cls, source)} overrides it)")
    return "; ".join(notes)


def option_name(cls: type, path: str) -> str:
    """The command-line option for the dotted ``path``: the leaf name when it is unique or the path is
    top-level, else the dotted path."""
    leaves = [p.rsplit(".", 1)[-1] for p in leaf_paths(cls)]
    name = path.rsplit(".", 1)[-1]
    return f"--{name}" if "." not in path or leaves.count(name) == 1 else f"--{path}"


def _has_path(data: dict[str, Any], path: str) -> bool:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def save_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def type_name(tp: Any) -> str:
    """A field type as the help shows it: ``int``, ``str | None``, ``list[int]``, ``one of 'a', 'b'``."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(tp))}]" if get_args(tp) else origin.__name__
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def format_help(cls: type) -> str:
    """One line per option: dotted path, type, the default in effect, help."""
    lines: list[str] = []

    def walk(c: type, default: Any, prefix: str) -> None:
        hints = _type_hints(c)
        for f in dataclasses.fields(c):
            tp = hints[f.name]
            value = getattr(default, f.name) if default is not None else (
                f.default if f.default is not dataclasses.MISSING else
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if _is_dataclass_type(tp):
                lines.append(f"\n[{prefix}{f.name}]  {f.metadata.get('help', '')}")
                walk(tp, value, f"{prefix}{f.name}.")
                continue
            tname = type_name(tp)
            lines.append(f"  --{prefix}{f.name} ({tname}, default {value!r})\n      {f.metadata.get('help', '')}")

    walk(cls, None, "")
    return "\n".join(lines)
