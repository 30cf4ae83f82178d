"""Rules and policies: module-path patterns (and layer roles) mapped to precision fields;
the first match wins.

Every `mpx.nn` layer declares a role, the part it plays in a model's precision map, so
that a policy can say "every projection in FP8" without knowing the model's module
paths. `ROLES`:

| role      | layers                                                         |
|-----------|----------------------------------------------------------------|
| linear    | projections and FFNs (Dense, DenseGeneral, SwiGLUDense, experts) |
| attention | the attention products QK^T (`<block>/qk`) and PV (`<block>/pv`) |
| norm      | RMSNorm, LayerNorm                                             |
| router    | MoE gating                                                     |
| embed     | token embeddings (and a tied LM head, which is the embedding)  |
| head      | an untied LM head                                              |
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mpx import recipes as recipes_lib
from mpx.policy.precision import (DTYPE_FIELDS, FIELDS, INHERIT, Precision, parse_recipe, dtype_name,
                                  parse_dtype, recipe_label)

__all__ = ["ROLES", "check_role", "match_path", "Rule", "Policy", "module_paths"]

ROLES = ("linear", "attention", "norm", "router", "embed", "head")


def check_role(role: str | None, what: str = "role") -> None:
    """Raises ValueError unless role is None or one of `ROLES`."""
    if role is not None and role not in ROLES:
        raise ValueError(f"{what} must be one of {', '.join(ROLES)}; got {role!r}")


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
      role: if set, the rule matches only layers of that role (one of `ROLES`), and
        only where the caller says which role a path has.
    """

    pattern: str
    param_dtype: Any = INHERIT
    compute_dtype: Any = INHERIT
    output_dtype: Any = INHERIT
    accum_dtype: Any = INHERIT
    recipe: Any = INHERIT
    role: str | None = None

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
        check_role(self.role, "Rule.role")

    def matches(self, path: str | Iterable[str], role: str | None = None) -> bool:
        """Whether this rule matches module `path` (str or tuple of names) of `role`."""
        return (self.role is None or self.role == role) and match_path(self.pattern, _join_path(path))

    @property
    def label(self) -> str:
        """The pattern, with the role when the rule has one: "'*' (role norm)"."""
        return repr(self.pattern) + ("" if self.role is None else f" (role {self.role})")

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

    def match(self, path: str | Iterable[str], role: str | None = None) -> int | None:
        """Index of the first rule matching `path` of `role`, or None when the default applies."""
        path = _join_path(path)
        return next((i for i, rule in enumerate(self.rules) if rule.matches(path, role)), None)

    def resolve(self, path: str | Iterable[str], role: str | None = None) -> Precision:
        """The precision of module `path` ("layers_3/attn/v_proj" or a tuple of names).

        Args:
          path: the module path.
          role: the layer's role (one of `ROLES`; `mpx.nn` layers pass their own). Rules
            with a role match only paths given that role; None: only role-free rules.
        """
        check_role(role)
        index = self.match(path, role)
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

    def unmatched_rules(self, paths_or_params, roles: Callable[[str], str | None] | None = None) -> list[Rule]:
        """The rules that match none of the given paths (a list of paths or a params tree),
        each path of the role `roles(path)` gives (None: no roles)."""
        return [self.rules[i] for i in self._unmatched(_with_roles(module_paths(paths_or_params), roles))]

    def _unmatched(self, paths: list[tuple[str, str | None]]) -> list[int]:
        return [i for i, rule in enumerate(self.rules) if not any(rule.matches(p, r) for p, r in paths)]

    def explain(self, paths_or_params, extra_paths: Iterable[str] = (),
                roles: Callable[[str], str | None] | None = None) -> str:
        """An aligned table of the precision each path gets, and the rules matching nothing.

        Args:
          paths_or_params: module paths, or a (Flax) params tree whose module paths are
            the parents of its leaves ("layers_0/attn/q_proj/kernel" -> "layers_0/attn/q_proj").
          extra_paths: more paths, e.g. parameterless ops ("layers_0/attn/qk").
          roles: the role of each path (a model's table, e.g. `models.precision.role_of`);
            None: paths have no role, so only role-free rules match.

        Returns:
          The table as a string (print it). Rule indices are 0-based positions in `rules`.
        """
        paths = list(dict.fromkeys(module_paths(paths_or_params) + [_join_path(p) for p in extra_paths]))
        paths = _with_roles(paths, roles)
        header = ("path", "role", "param", "compute", "output", "accum", "recipe", "rule")
        rows = [header] + [self._row(p, r) for p, r in paths]
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        lines = [f"policy {self.name!r}: {len(paths)} paths, {len(self.rules)} rules"]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines += [f"rule {i} {self.rules[i].label} matches no layer" for i in self._unmatched(paths)]
        return "\n".join(lines)

    def _row(self, path: str, role: str | None) -> tuple[str, ...]:
        index = self.match(path, role)
        p = self.resolve(path, role)
        rule = "default" if index is None else f"{index} {self.rules[index].label}"
        dtypes = tuple(dtype_name(getattr(p, f)) for f in DTYPE_FIELDS)
        return (path or "(root)", role or "-") + dtypes + (recipe_label(p.recipe), rule)


def _with_roles(paths: list[str], roles) -> list[tuple[str, str | None]]:
    return [(p, None if roles is None else roles(p)) for p in paths]


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

