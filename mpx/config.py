"""Strict YAML configs: plain mappings mapped 1:1 onto frozen dataclasses.

One loader for every config file mpx reads (training runs, model configs for the memory
planner): unknown keys are errors that name the key, the closest allowed one and the
file or `--set` that set it; wrong types name the key, the value and the expected type;
ranges are checked by each dataclass's own `__post_init__`.

A file may `extends: other.yaml` (relative to itself); sections are deep-merged, later
files win, then `key=value` overrides with dotted keys apply in order. A caller decides
which sections a later value replaces whole instead of merging (`replaces_whole`).

Example:
    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class Opt:
    ...     lr: float = 1e-3
    ...     steps: int = 10
    >>> from_dict(Opt, {"lr": 3e-4})
    Opt(lr=0.0003, steps=10)
    >>> from_dict(Opt, {"lrr": 1})
    Traceback (most recent call last):
    ...
    mpx.config.ConfigError: unknown key 'lrr' (did you mean 'lr'?); allowed keys at the top level: lr, steps
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import importlib.util
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

__all__ = [
    "ConfigError", "check_choice", "check", "check_keys", "from_dict", "to_dict", "parse_value", "merge",
    "SHIPPED", "locate", "read_yaml", "read_tree", "parse_override", "origin"
]

class ConfigError(ValueError):
    """A bad configuration value; `key` is the dotted key at fault ("" for a whole file)."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raises ValueError naming `name`, the bad `value` and the allowed `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check(name: str, value: Any, ok: bool, requirement: str) -> None:
    """Raises ValueError `name must be <requirement>; got <value>` unless `ok`."""
    if not ok:
        raise ValueError(f"{name} must be {requirement}; got {value!r}")



# ---------------------------------------------------------------------------
# Strict dict -> dataclass conversion.


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def check_keys(d: collections.abc.Mapping, allowed: list[str], where: str) -> None:
    for key in d:
        if key not in allowed:
            dotted = _join(where, str(key))
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            section = f"under {where!r}" if where else "at the top level"
            raise ConfigError(f"unknown key {dotted!r}{hint}; allowed keys {section}: "
                              f"{', '.join(allowed)}", dotted)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if tp is float:
        return "float"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return getattr(tp, "__name__", repr(tp))


def _mismatch(tp: Any, value: Any, where: str) -> ConfigError:
    return ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} "
                       f"({type(value).__name__})", where)


def _convert_union(args: tuple, value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1 and dataclasses.is_dataclass(options[0]):
        return from_dict(options[0], value, where)  # its own, more precise, errors
    for option in options:
        try:
            return _convert(option, value, where)
        except ConfigError:
            continue
    raise _mismatch(typing.Union[args], value, where)


def _convert_tuple(tp: Any, args: tuple, value: Any, where: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _mismatch(tp, value, where)
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    elif len(args) != len(value):
        raise _mismatch(tp, value, where)
    return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _convert_scalar(tp: Any, value: Any, where: str) -> Any:
    # bool is a subclass of int: `n_layers: true` must not pass for 1.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is Any:
        ok = True
    else:
        raise TypeError(f"from_dict does not support the field type {tp!r} (at {where!r})")
    if not ok:
        raise _mismatch(tp, value, where)
    return value


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(args, value, where)
    if origin is tuple:
        return _convert_tuple(tp, args, value, where)
    if origin is typing.Literal:
        if value not in args:
            raise _mismatch(tp, value, where)
        return value
    return _convert_scalar(tp, value, where)


def from_dict(cls: type, d: Any, where: str = "") -> Any:
    """Builds the frozen dataclass `cls` from a plain dict, strictly.

    Nested dataclasses, `X | None`, `tuple[X, ...]`, fixed tuples, `Literal` and
    bool/int/float/str fields are checked; ints are accepted for floats, bools are not
    accepted for ints. Missing keys take the field defaults. Choices and ranges are
    validated by the dataclass's own `__post_init__`.

    Args:
      cls: a dataclass type.
      d: a mapping of field names to values (nested mappings for nested dataclasses).
      where: dotted prefix of `d` for error messages ("" at the top).

    Returns:
      An instance of `cls`.

    Raises:
      ConfigError: an unknown key (with the closest allowed one), a wrong type (naming
        the key, the value and the expected type), or a value `cls` rejects (its key
        is the field's when `cls` raised a ConfigError keyed by it, else `where`).
    """
    if not isinstance(d, collections.abc.Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of keys to values, "
                          f"got {d!r} ({type(d).__name__})", where)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    check_keys(d, fields, where)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, _join(where, k)) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        # A ConfigError naming one field of `cls` (its key) is at that field's dotted key.
        key = _join(where, e.key) if isinstance(e, ConfigError) and e.key else where
        raise ConfigError(f"{where or cls.__name__}: {e}", key) from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples as lists): YAML/JSON-ready.

    `from_dict(type(cfg), to_dict(cfg)) == cfg`, and a YAML file of it loads back to
    `cfg` with `load`.
    """
    return _plain(cfg)


# YAML files, extends, overrides.


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3`, `nan` and `inf` as floats (YAML 1.1 wants
    `1.0e-3`, `.nan`, `.inf`), so a range check names a non-finite value instead of a
    type error calling it a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^(?:[-+]?(?:inf|Inf|INF)|nan|NaN|NAN)$"), list("-+iInN"))


def parse_value(text: str) -> Any:
    """A `--set` value as YAML: `1e-3` -> 0.001, `true` -> True, `null` -> None."""
    return yaml.load(text, Loader=_Loader)



def _record(origins: dict, dotted: str, value: Any, source: str) -> None:
    origins[dotted] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _record(origins, _join(dotted, str(key)), sub, source)


def _never(dotted: str, value: Any) -> bool:
    return False


def merge(base: dict, update: dict, origins: dict, source: str,
          replaces_whole: Callable[[str, Any], bool] = _never, prefix: str = "") -> None:
    """Deep-merges `update` into `base` in place, recording in `origins` who set each key.

    Args:
      base: the mapping merged into.
      update: the mapping merged from; its values win.
      origins: dotted key -> source, updated for every key `update` sets.
      source: the label recorded for `update` (a file path or `--set k=v`).
      replaces_whole: `(dotted_key, value) -> bool`; true for sections a later value
        replaces instead of merging into.
      prefix: dotted prefix of `base` (for recursion).
    """
    for key, value in update.items():
        dotted = _join(prefix, str(key))
        nested = isinstance(base.get(key), dict) and isinstance(value, dict)
        if nested and not replaces_whole(dotted, value):
            merge(base[key], value, origins, source, replaces_whole, dotted)
        else:
            for stale in [k for k in origins if k.startswith(dotted + ".")]:
                del origins[stale]
            base[key] = copy.deepcopy(value)
            _record(origins, dotted, value, source)


SHIPPED = "configs"  # mpx's own config files: a directory of the clone, a package once installed


def locate(path: str | Path) -> Path:
    """Where config file `path` is: `path` itself where it exists; else, for a relative path
    whose first part is configs/ (how the README and mpx's own files name them), the copy
    installed with mpx, so that those names work outside a clone too."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != SHIPPED:
        return path
    spec = importlib.util.find_spec(SHIPPED)
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        if (shipped := Path(root).joinpath(*path.parts[1:])).exists():
            return shipped
    return path


def read_yaml(path: str | Path) -> dict:
    """Reads one YAML file whose top level is a mapping (an empty file is `{}`).

    `path` goes through `locate` (configs/... names the files mpx ships).

    Raises:
      FileNotFoundError: `path` is not a file.
      ConfigError: invalid YAML or a top level that is not a mapping.
    """
    path = locate(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def read_tree(path: str | Path, replaces_whole: Callable[[str, Any], bool] = _never,
              chain: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """Reads `path` and the files it `extends`, merged; returns `(raw, origins)`.

    Raises:
      FileNotFoundError: `path` or a file it extends does not exist.
      ConfigError: invalid YAML, a non-string `extends`, or an `extends` cycle.
    """
    path = locate(path)
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"extends cycle: {cycle}")
    raw = read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        base, origins = {}, {}
    elif isinstance(parent, str):
        beside = path.parent / parent  # relative to the file; else configs/... (read_tree locates it)
        base, origins = read_tree(beside if beside.exists() else parent, replaces_whole, (*chain, path.resolve()))
    else:
        raise ConfigError(f"{path}: extends must be a path string, got {parent!r}", "extends")
    merge(base, raw, origins, str(path), replaces_whole)
    return base, origins


def parse_override(item: str) -> dict:
    """`a.b=1e-3` -> `{"a": {"b": 0.001}}` (the value parsed as YAML).

    Raises:
      ConfigError: no `=`, an empty key, or a value that is not valid YAML.
    """
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. optimizer.learning_rate=1e-3")
    try:
        value = parse_value(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: invalid value: {e}", key) from None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def origin(origins: dict, key: str, default: str) -> str:
    """Where `key` was set: every source of the keys under it, or of its parent."""
    inside = [src for k, src in origins.items() if not key or k == key or k.startswith(key + ".")]
    if inside:
        return ", ".join(dict.fromkeys(inside))
    while key:
        key = key.rpartition(".")[0]
        if key in origins:
            return origins[key]
    return default
