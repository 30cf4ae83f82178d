"""Rules and policies: module-path patterns mapped to precision fields; the first match wins."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mpx import recipes as recipes_lib
from mpx.policy.precision import (DTYPE_FIELDS, FIELDS, INHERIT, Precision, parse_recipe, dtype_name,
                                  parse_dtype, recipe_label)

__all__ = ["match_path", "Rule", "Policy", "module_paths"]


def match_path(pattern: str, path: str) -> bool:
    """Whether `pattern` matches module `path` (see the module docstring for the rules)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    if pattern.startswith("/"):
        return fnmatch.fnmatchcase(path, pattern[1:])
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*/" + pattern)


def _join_path(path: str | Iterable[str]) -> str:
    return path if isinstance(path, str) else "/".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Sets some precision fields for the module paths matching `pattern`.

    Fields left at `INHERIT` come from the policy's default. `recipe=None` is a real
    setting ("no FP8 here"), distinct from `INHERIT`.

    Attributes:
      pattern: glob, "/glob" (anchored) or "re:regex" (see the module docstring).
      param_dtype, compute_dtype, output_dtype, accum_dtype, recipe: as in `Precision`.
    """

    pattern: str
    param_dtype: Any = INHERIT
    compute_dtype: Any = INHERIT
    output_dtype: Any = INHERIT
    accum_dtype: Any = INHERIT
    recipe: Any = INHERIT

    def __post_init__(self):
        if not isinstance(self.pattern, str) or self.pattern in ("", "re:", "/"):
            raise ValueError(f"rule pattern must be a non-empty string; got {self.pattern!r}")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise ValueError(f"bad regex in rule pattern {self.pattern!r}: {e}") from None
        for field in DTYPE_FIELDS:
            if getattr(self, field) is not INHERIT:
                object.__setattr__(self, field, parse_dtype(getattr(self, field), what=field))
        if self.recipe is not INHERIT:
            object.__setattr__(self, "recipe", parse_recipe(self.recipe))

    def matches(self, path: str | Iterable[str]) -> bool:
        """Whether this rule's pattern matches module `path` (str or tuple of names)."""
        return match_path(self.pattern, _join_path(path))

    def overrides(self) -> dict[str, Any]:
        """The fields this rule sets, by `Precision` field name."""
        return {f: getattr(self, f) for f in FIELDS if getattr(self, f) is not INHERIT}

    def apply(self, base: Precision) -> Precision:
        """`base` with this rule's fields laid over it."""
        return dataclasses.replace(base, **self.overrides())


# --------------------------------------------------------------------------- Policy


@dataclasses.dataclass(frozen=True)
class Policy:
    """An ordered list of rules over module paths; the first match wins.

    Attributes:
      rules: tuple of `Rule`s (a list is converted).
      default: the `Precision` of paths no rule matches, and the base rules override.
      name: a label for reports and checkpoints.
    """

    rules: tuple[Rule, ...] = ()
    default: Precision = Precision()
    name: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        for i, rule in enumerate(self.rules):
            if not isinstance(rule, Rule):
                raise TypeError(f"Policy.rules[{i}] must be a Rule; got {type(rule).__name__}: {rule!r}")
        if not isinstance(self.default, Precision):
            raise TypeError(f"Policy.default must be a Precision; got {type(self.default).__name__}")

    def match(self, path: str | Iterable[str]) -> int | None:
        """Index of the first rule matching `path`, or None when the default applies."""
        path = _join_path(path)
        return next((i for i, rule in enumerate(self.rules) if rule.matches(path)), None)

    def resolve(self, path: str | Iterable[str]) -> Precision:
        """The precision of module `path` ("layers_3/attn/v_proj" or a tuple of names)."""
        index = self.match(path)
        return self.default if index is None else self.rules[index].apply(self.default)

    def with_rules(self, *rules: Rule, name: str | None = None) -> "Policy":
        """A policy with `rules` placed before (so overriding) this policy's rules."""
        return Policy(tuple(rules) + self.rules, self.default, self.name if name is None else name)

    def map_recipes(self, fn: Callable[[recipes_lib.Recipe], recipes_lib.Recipe]) -> "Policy":
        """A policy with `fn` applied to every recipe it sets (default and rules; None kept)."""
        default = self.default if self.default.recipe is None else self.default.replace(recipe=fn(self.default.recipe))
        rules = tuple(dataclasses.replace(r, recipe=fn(r.recipe)) if r.recipe not in (INHERIT, None) else r
                      for r in self.rules)
        return Policy(rules, default, self.name)

    def unmatched_rules(self, paths_or_params) -> list[Rule]:
        """The rules that match none of the given paths (a list of paths or a params tree)."""
        return [self.rules[i] for i in self._unmatched(module_paths(paths_or_params))]

    def _unmatched(self, paths: list[str]) -> list[int]:
        return [i for i, rule in enumerate(self.rules) if not any(rule.matches(p) for p in paths)]

    def explain(self, paths_or_params, extra_paths: Iterable[str] = ()) -> str:
        """An aligned table of the precision each path gets, and the rules matching nothing.

        Args:
          paths_or_params: module paths, or a (Flax) params tree whose module paths are
            the parents of its leaves ("layers_0/attn/q_proj/kernel" -> "layers_0/attn/q_proj").
          extra_paths: more paths, e.g. parameterless ops ("layers_0/attn/qk").

        Returns:
          The table as a string (print it). Rule indices are 0-based positions in `rules`.
        """
        paths = list(dict.fromkeys(module_paths(paths_or_params) + [_join_path(p) for p in extra_paths]))
        header = ("path", "param", "compute", "output", "accum", "recipe", "rule")
        rows = [header] + [self._row(p) for p in paths]
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        lines = [f"policy {self.name!r}: {len(paths)} paths, {len(self.rules)} rules"]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines += [f"rule {i} {self.rules[i].pattern!r} matches no layer" for i in self._unmatched(paths)]
        return "\n".join(lines)

    def _row(self, path: str) -> tuple[str, ...]:
        index = self.match(path)
        p = self.resolve(path)
        rule = "default" if index is None else f"{index} {self.rules[index].pattern!r}"
        dtypes = tuple(dtype_name(getattr(p, f)) for f in DTYPE_FIELDS)
        return (path or "(root)",) + dtypes + (recipe_label(p.recipe), rule)


def module_paths(paths_or_params) -> list[str]:
    """Module paths from a path, a list of paths, or a params tree (in order, deduplicated).

    A params tree is a nested mapping (dict, FrozenDict); each leaf's parent path is a
    module path. A Flax variables dict (top-level key "params") is read collection by
    collection with the collection names stripped.
    """
    if isinstance(paths_or_params, str):
        return [paths_or_params]
    if isinstance(paths_or_params, Mapping):
        out: list[str] = []
        trees = paths_or_params.values() if "params" in paths_or_params else [paths_or_params]
        for tree in trees:
            if isinstance(tree, Mapping):
                _collect(tree, (), out)
        return list(dict.fromkeys(out))
    return list(dict.fromkeys(_join_path(p) for p in paths_or_params))


def _collect(tree: Mapping, prefix: tuple[str, ...], out: list[str]) -> None:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _collect(value, prefix + (str(key),), out)
        else:
            out.append("/".join(prefix))

