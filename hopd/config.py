"""Typed dataclass configs from YAML files plus `key=value` overrides, validated up front.

Overrides address fields by dotted path (`horizon.kind=truncated`, `optim.lr=3e-4`); values are
parsed as YAML scalars. Unknown keys fail with a "did you mean" suggestion; wrong types fail naming
the field, the value and the expected type. Every failure is a `ConfigError`, which the CLI turns
into one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config, override or input file: the message names the problem and the fix."""


class DiskFull(RuntimeError):
    """Writing a checkpoint or result failed for lack of space; the message says what is intact."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, or torch's serializer failing to write (what a full disk looks like through it)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    # safetensors' own error (not an OSError) carries the errno in its text: "IoError(Os {
    # code: 28, kind: StorageFull, message: "No space left on device" })"
    wrapped = isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError"
    return wrapped and any(s in text for s in ("unexpected pos", "failed writing",
                                                "No space left", "StorageFull",
                                                "Disk quota exceeded"))


def _suggest(key: str, options: list[str], prefix: str = "") -> str:
    """A close key, written in full (`optim.lr`, as an override would name it)."""
    close = difflib.get_close_matches(key, options, n=1)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" (valid keys: {', '.join(prefix + o for o in options)})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks/converts `value` to the annotated type `tp` (int, float, str, bool, list, ...)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [v.strip() for v in value.split(",")] if isinstance(value, str) else [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r}: expected a list")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}={value!r}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}={value!r}: expected a string")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Builds dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}'"
                              f"{_suggest(key, list(fields), prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, prefix=f"{where}.")
        else:
            kwargs[key] = _coerce(value, tp, where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_overrides(overrides: list[str], aliases: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values parsed as YAML scalars, except
    that only true/false are booleans (not YAML 1.1's yes/no/on/off)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: write it as key=value (e.g. optim.lr=3e-4)")
        key = (aliases or {}).get(key, key)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        check_size(value, f"override {key}")
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw  # YAML 1.1 reads yes/no/on/off as booleans: system_prompt=no is text
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if not p:
                raise ConfigError(f"override {item!r}: empty name in dotted key")
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{p}' is a value, not a section")
            node = nxt
        if not parts[-1]:
            raise ConfigError(f"override {item!r}: empty name in dotted key")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged by SafeLoader,
                continue  # whose explicit keys override the merged ones
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"key '{key}' is given twice (line {line}): keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:merge", _UniqueKeyLoader.construct_yaml_map)

MAX_VALUES = 10_000  # a config, an override or a data row holds at most this many values...
MAX_DEPTH = 32  # ...nested at most this deep, counted with every alias expanded


def check_size(value: Any, where: str) -> Any:
    """Refuses input whose aliases expand past MAX_VALUES values or that nests past MAX_DEPTH
    (a 300-byte YAML alias bomb otherwise becomes hundreds of MB in an error message)."""
    count = 0
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{where}: more than {MAX_VALUES:,} values once its aliases are "
                              "expanded; a config is a few dozen settings: remove the aliases")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep; a config "
                              "nests two levels (section.key)")
        if isinstance(v, dict):
            stack += [(x, depth + 1) for x in v.values()]
        elif isinstance(v, list):
            stack += [(x, depth + 1) for x in v]
    return value


def yaml_error(e: yaml.YAMLError) -> str:
    """Where a YAML error is and what it is, in plain words: ', line L, column C: reason'."""
    problem = (getattr(e, "problem", None) or str(e).splitlines()[0]).strip()
    context = getattr(e, "context", None) or ""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if "quoted scalar" in context and getattr(e, "context_mark", None) is not None:
        mark = e.context_mark  # where the quote opened, not where the file ended
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if "\\t" in problem or "'\t'" in problem or "tab" in problem:
        reason = "a tab character; YAML indents with spaces only: replace the tab with spaces"
    elif "quoted scalar" in context:
        reason = "a quote that is never closed: close it on the same line"
    elif "mapping values are not allowed" in problem:
        reason = "a ':' where a value was expected (a missing space after a key's ':' or a " \
            "value that needs quotes)"
    else:
        reason = f"{context + ': ' if context else ''}{problem}"
    return f" is not valid YAML{where}: {reason}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: give the path of a YAML file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)  # noqa: S506
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}): save it as "
                          "UTF-8") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: nested too deeply to read; a config nests two "
                          "levels (section.key)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}{yaml_error(e)}") from None
    if data is None:
        return {}
    check_size(data, f"config file {path}")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of keys")
    return data


def load(cls: type[T], path: str | Path | None, overrides: list[str],
         aliases: dict[str, str] | None = None) -> T:
    """YAML file (optional) + overrides -> validated dataclass (its `validate()` runs if any)."""
    data = read_yaml(path) if path else {}
    cfg = from_dict(cls, merge(data, parse_overrides(overrides, aliases)))
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def field_comments(cls: type) -> dict[str, str]:
    """The one-line comment after each field of a dataclass, read from its source."""
    import inspect
    import re

    out: dict[str, str] = {}
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return out
    for line in lines:
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def describe_fields(cfg: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value, meaning) for every leaf field of a (nested) dataclass instance."""
    rows: list[tuple[str, str, str]] = []
    notes = field_comments(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_fields(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", yaml.safe_dump(value, default_flow_style=True)
                         .strip().removesuffix("...").strip(), notes.get(f.name, "")))
    return rows
