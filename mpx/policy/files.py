"""Policies as YAML: `load`, `from_dict`, `to_dict` (files under configs/policies/)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

from mpx import config as config_lib
from mpx import recipes as recipes_lib
from mpx.policy.precision import FIELDS, Precision, changed_fields, dtype_name, parse_dtype
from mpx.policy.presets import PRESETS, preset
from mpx.policy.rules import Policy, Rule

__all__ = ["from_dict", "load", "get", "to_dict"]

_TOP_KEYS = ("name", "base", "default", "rules")
_YAML_FIELDS = {"param": "param_dtype", "compute": "compute_dtype", "output": "output_dtype",
                "accum": "accum_dtype", "recipe": "recipe"}
_RULE_KEYS = ("match", "role") + tuple(_YAML_FIELDS)


def _check_keys(d: Any, allowed: Iterable[str], where: str, hint=lambda key: "") -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping; got {type(d).__name__}: {d!r}")
    allowed = tuple(allowed)
    for key in d:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}{hint(key)}; allowed: {', '.join(allowed)}")


def _recipe_from_yaml(spec: Any, where: str) -> recipes_lib.Recipe | None:
    """`none`/null, a name ("deepseek_v3"), or {name: ..., field: value, ...}."""
    if spec is None or isinstance(spec, str):
        return _wrap(recipes_lib.get, where, spec)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"{where}: recipe must be a name, none, or a mapping with 'name'; got {spec!r}")
    name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    if name not in recipes_lib.RECIPES:
        raise ValueError(f"{where}: unknown recipe {name!r}; known recipes: {', '.join(recipes_lib.RECIPES)}")
    fields = {f.name: f.default for f in dataclasses.fields(recipes_lib.RECIPES[name])}
    _check_keys(params, ("name",) + tuple(fields), f"{where}: recipe {name}", recipes_lib.renamed_hint)
    for key, value in params.items():
        if not _same_kind(value, fields[key]):
            raise ValueError(f"{where}: recipe {name}.{key} must be a {type(fields[key]).__name__}; got {value!r}")
    return _wrap(recipes_lib.get, where, name, **params)


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _wrap(fn, where: str, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def _fields_from_yaml(d: Mapping, where: str) -> dict[str, Any]:
    out = {}
    for key, field in _YAML_FIELDS.items():
        if key == "recipe" and key in d:
            out[field] = _recipe_from_yaml(d[key], where)
        elif key in d:
            out[field] = _wrap(parse_dtype, where, d[key], what=f"{key} dtype")
    return out


def _default_from_yaml(spec: Any, base: Precision, where: str) -> Precision:
    if spec is None:
        return base
    if isinstance(spec, str):
        return _wrap(Precision.parse, where, spec)
    _check_keys(spec, _YAML_FIELDS, where)
    return base.replace(**_fields_from_yaml(spec, where))


def _rule_from_yaml(spec: Any, where: str) -> Rule:
    _check_keys(spec, _RULE_KEYS, where)
    if "match" not in spec and "role" not in spec:
        raise ValueError(f"{where}: rule needs a 'match' pattern or a 'role'; keys: {', '.join(_RULE_KEYS)}")
    return _wrap(Rule, where, spec.get("match", "*"), role=spec.get("role"), **_fields_from_yaml(spec, where))


def _base_policy(base: Any, source: str, seen: frozenset[str]) -> Policy | None:
    if base is None:
        return None
    if isinstance(base, str) and base.endswith((".yaml", ".yml")):
        directory = os.path.dirname(source) if os.path.exists(source) else "."
        return _load(os.path.join(directory, base), seen)
    if not isinstance(base, str) or base not in PRESETS:
        raise ValueError(f"{source}: unknown base {base!r}; use a preset ({', '.join(PRESETS)}) or a .yaml file")
    return preset(base)


def from_dict(d: Mapping, *, source: str = "<dict>", _seen: frozenset[str] = frozenset()) -> Policy:
    """A policy from its YAML-shaped dict.

    Keys: name, base (a preset name or a .yaml path relative to `source`; its rules come
    after this dict's rules and its default is the starting default), default (a mapping
    of param/compute/output/accum/recipe, or a "p=..,c=.." string), rules (a list of
    mappings with `match` and/or `role` (`mpx.policy.ROLES`; `match` defaults to "*"
    then) and any of param/compute/output/accum/recipe). A recipe is a name, none, or
    {name: deepseek_v3, block: 128, ...}.

    Args:
      d: the mapping.
      source: where it came from, for error messages (a file path).

    Returns:
      The `Policy`.

    Raises:
      ValueError: unknown keys (naming the allowed ones), dtypes, recipes, recipe fields;
        the message starts with `source` and the rule index ("rules[2]").
    """
    _check_keys(d, _TOP_KEYS, source)
    base = _base_policy(d.get("base"), source, _seen)
    default = _default_from_yaml(d.get("default"), base.default if base else Precision(), f"{source}: default")
    specs = d.get("rules") or []
    if not isinstance(specs, list):
        raise ValueError(f"{source}: rules must be a list; got {type(specs).__name__}")
    rules = tuple(_rule_from_yaml(spec, f"{source}: rules[{i}]") for i, spec in enumerate(specs))
    name = d.get("name") or (base.name if base else "custom")
    return Policy(rules + (base.rules if base else ()), default, str(name))


def load(path: str | os.PathLike) -> Policy:
    """Loads a policy from a YAML file (see `from_dict` for the format).

    Raises:
      ValueError: as `from_dict`, prefixed with the file path; also for a base cycle.
      FileNotFoundError: if the file does not exist.
    """
    return _load(os.fspath(path), frozenset())


def get(spec: str) -> Policy:
    """A policy by preset name ("fp8") or by YAML file path ("my_policy.yaml").

    Raises:
      ValueError: neither a preset nor an existing .yaml/.yml file (naming the presets),
        or an invalid file (as `load`).
    """
    if spec in PRESETS:
        return preset(spec)
    if spec.endswith((".yaml", ".yml")):
        if not config_lib.locate(spec).is_file():
            raise ValueError(f"no policy file {spec!r}")
        return load(spec)
    raise ValueError(f"unknown policy {spec!r}: give a preset ({', '.join(PRESETS)}) or a .yaml policy file")


def _load(path: str, seen: frozenset[str]) -> Policy:
    import yaml  # only the YAML edge needs it

    path = os.fspath(config_lib.locate(path))  # configs/... names the policies mpx ships
    key = os.path.abspath(path)
    if key in seen:
        raise ValueError(f"{path}: base cycle through {sorted(seen)}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if data is not None and not isinstance(data, Mapping):
        raise ValueError(f"{path}: a policy file holds a mapping (name, base, default, rules); "
                         f"got {type(data).__name__}")
    return from_dict(data if data is not None else {}, source=path, _seen=seen | {key})


def to_dict(policy: Policy) -> dict[str, Any]:
    """The YAML-shaped dict of `policy` (no base); `from_dict(to_dict(p)) == p`."""
    return {
        "name": policy.name,
        "default": _fields_to_yaml({f: getattr(policy.default, f) for f in FIELDS}),
        "rules": [{"match": r.pattern, **({} if r.role is None else {"role": r.role}), **_fields_to_yaml(r.overrides())}
                  for r in policy.rules],
    }


def _fields_to_yaml(fields: Mapping[str, Any]) -> dict[str, Any]:
    names = {v: k for k, v in _YAML_FIELDS.items()}
    return {names[f]: _recipe_to_yaml(v) if f == "recipe" else dtype_name(v) for f, v in fields.items()}


def _recipe_to_yaml(recipe: recipes_lib.Recipe | None) -> Any:
    if recipe is None:
        return "none"
    changed = changed_fields(recipe)
    return {"name": recipe.name, **changed} if changed else recipe.name
