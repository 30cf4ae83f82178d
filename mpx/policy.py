"""Layer-wise precision policy: which dtypes and FP8 recipe each module path gets.

A `Policy` is an ordered tuple of `Rule`s and a default `Precision`. `resolve(path)`
returns the default with the fields of the first matching rule laid over it; rules set
only the fields they name and inherit the rest from the default.

Paths are module paths joined with "/" ("layers_3/attn/v_proj", "embed"). Patterns:

* "re:REGEX": `re.fullmatch(REGEX, path)` against the full path (no suffix rule;
  write "re:(.*/)?v_proj" for "v_proj anywhere").
* "/GLOB" (leading slash): anchored, `fnmatch(path, GLOB)` on the full path only.
* "GLOB": matches the full path, or any path ending in "/" + something matching
  GLOB, i.e. `fnmatch(path, GLOB) or fnmatch(path, "*/" + GLOB)`. So "v_proj" and
  "attn/v_proj" both match "layers_3/attn/v_proj", but "proj" matches neither.

Globs are `fnmatch.fnmatchcase` (case-sensitive); `*` matches across "/".

Presets (`preset(name)`) follow the precision map of DESIGN.md; YAML files under
`configs/policies/` mirror them (`load`, `from_dict`, `to_dict`).

Example:
    >>> import mpx.policy as P
    >>> p = P.preset("fp8")
    >>> p.resolve("layers_0/mlp/up").recipe.name, str(p.resolve("final_norm").compute_dtype)
    ('deepseek_v3', 'float32')
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mpx import formats as formats_lib
from mpx import recipes as recipes_lib

_DTYPES = {
    "f32": jnp.float32, "fp32": jnp.float32, "float32": jnp.float32,
    "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
    "f16": jnp.float16, "fp16": jnp.float16, "float16": jnp.float16, "half": jnp.float16,
}
_ALLOWED_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
_SHORT_NAMES = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float16): "f16"}
_DTYPE_FIELDS = ("param_dtype", "compute_dtype", "output_dtype", "accum_dtype")
_FIELDS = _DTYPE_FIELDS + ("recipe",)


def parse_dtype(name: Any, *, what: str = "dtype") -> jnp.dtype:
    """The dtype named by `name` ("f32"/"fp32"/"float32", "bf16", "f16"/"fp16") or a dtype.

    FP8 formats are not dtypes of a layer: they belong to the layer's recipe.

    Args:
      name: a name (case-insensitive) or a jnp/numpy dtype of float32/bfloat16/float16.
      what: what is being parsed, for the error message ("compute_dtype").

    Returns:
      A `numpy.dtype` (hashable, compares equal to `jnp.float32` etc.).

    Raises:
      ValueError: naming the bad value and the allowed names.
    """
    allowed = "f32 (fp32, float32), bf16 (bfloat16), f16 (fp16, float16)"
    if isinstance(name, str):
        key = name.strip().lower()
        if key in _DTYPES:
            return jnp.dtype(_DTYPES[key])
        raise ValueError(f"unknown {what} {name!r}; allowed: {allowed}{_low_bit_hint(key)}")
    try:
        dtype = jnp.dtype(name) if name is not None else None
    except TypeError:
        dtype = None
    if dtype not in _ALLOWED_DTYPES:
        raise ValueError(f"unsupported {what} {name!r}; allowed: {allowed}{_low_bit_hint(dtype)}")
    return dtype


def _low_bit_hint(value: Any) -> str:
    """Points FP8 (and narrower) format names at the recipe, where they belong."""
    try:
        fmt = formats_lib.get(value) if value is not None else None
    except ValueError:
        return ""
    if fmt is None or fmt.bits > 8:
        return ""
    return f" ({fmt.name} is an FP8/low-bit format: set it through the recipe, e.g. recipe: deepseek_v3)"


def dtype_name(dtype: Any) -> str:
    """Short name of a policy dtype: "f32", "bf16" or "f16"."""
    return _SHORT_NAMES[jnp.dtype(dtype)]


def recipe_label(recipe: recipes_lib.Recipe | None) -> str:
    """A recipe's name plus its non-default fields: "deepseek_v3(pow2_scale=True)"; "-" for None."""
    if recipe is None:
        return "-"
    changed = _changed_fields(recipe)
    inner = ", ".join(f"{k}={v}" for k, v in changed.items())
    return f"{recipe.name}({inner})" if inner else recipe.name


def _changed_fields(recipe: recipes_lib.Recipe) -> dict[str, Any]:
    defaults = type(recipe)()
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)
            if getattr(recipe, f.name) != getattr(defaults, f.name)}


def _parse_recipe(value: Any) -> recipes_lib.Recipe | None:
    """A recipe instance, a recipe name ("deepseek_v3", "none") or None."""
    if value is None or isinstance(value, str):
        return recipes_lib.get(value)
    if isinstance(value, recipes_lib.Recipe):
        return value
    raise ValueError(f"recipe must be a recipe, a recipe name or None; got {value!r}; "
                     f"known recipes: {', '.join(recipes_lib.RECIPES)}")


class _Inherit:
    """Sentinel for a rule field that is not set (inherited from the default)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INHERIT"

    def __reduce__(self):
        return (_Inherit, ())


INHERIT = _Inherit()


# --------------------------------------------------------------------------- Precision


@dataclasses.dataclass(frozen=True)
class Precision:
    """What one layer gets. Hashable (usable as a Flax module attribute / jit static).

    Attributes:
      param_dtype: storage dtype of the layer's parameters (f32 master weights).
      compute_dtype: dtype inputs and parameters are cast to for compute.
      output_dtype: dtype of the layer's output.
      accum_dtype: `preferred_element_type` of the layer's matmuls.
      recipe: FP8 recipe for the layer's matmuls, or None (no FP8).

    Dtypes may be given as names ("bf16") and are stored as `numpy.dtype`s; the recipe
    may be given by name ("deepseek_v3").
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32
    accum_dtype: Any = jnp.float32
    recipe: Any = None

    def __post_init__(self):
        for field in _DTYPE_FIELDS:
            object.__setattr__(self, field, parse_dtype(getattr(self, field), what=field))
        object.__setattr__(self, "recipe", _parse_recipe(self.recipe))

    @classmethod
    def parse(cls, spec: str) -> "Precision":
        """Parses the jmp-like grammar "p=f32,c=bf16,o=bf16,a=f32,r=deepseek_v3".

        Keys: p/param, c/compute, o/output, a/accum, r/recipe. Unset keys default as in
        jmp: param f32, compute = param, output = compute, accum f32, recipe none.

        Raises:
          ValueError: naming a malformed part, an unknown or repeated key, a bad value.
        """
        values = _parse_grammar(spec)
        param = values.get("param", "f32")
        compute = values.get("compute", param)
        return cls(param_dtype=param, compute_dtype=compute, output_dtype=values.get("output", compute),
                   accum_dtype=values.get("accum", "f32"), recipe=values.get("recipe", "none"))

    def __str__(self) -> str:
        return (f"p={dtype_name(self.param_dtype)},c={dtype_name(self.compute_dtype)},"
                f"o={dtype_name(self.output_dtype)},a={dtype_name(self.accum_dtype)},"
                f"r={recipe_label(self.recipe) if self.recipe is not None else 'none'}")

    def replace(self, **changes) -> "Precision":
        """A copy with some fields changed (names or dtypes accepted)."""
        return dataclasses.replace(self, **changes)

    def cast_to_param(self, tree):
        """Casts the floating leaves of `tree` to `param_dtype`."""
        return _cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree):
        """Casts the floating leaves of `tree` to `compute_dtype`."""
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        """Casts the floating leaves of `tree` to `output_dtype`."""
        return _cast_floating(tree, self.output_dtype)


def _cast_floating(tree, dtype):
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree_util.tree_map(cast, tree)


_GRAMMAR_KEYS = {"p": "param", "param": "param", "params": "param", "c": "compute", "compute": "compute",
                 "o": "output", "output": "output", "a": "accum", "accum": "accum", "r": "recipe", "recipe": "recipe"}


def _parse_grammar(spec: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or not value.strip():
            raise ValueError(f"bad precision part {part!r} in {spec!r}; expected key=value, e.g. 'p=f32,c=bf16'")
        if key not in _GRAMMAR_KEYS:
            raise ValueError(f"unknown precision key {key!r} in {spec!r}; allowed: {', '.join(_GRAMMAR_KEYS)}")
        if _GRAMMAR_KEYS[key] in values:
            raise ValueError(f"precision key {key!r} given twice in {spec!r}")
        values[_GRAMMAR_KEYS[key]] = value.strip()
    return values


# --------------------------------------------------------------------------- Rule


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
        for field in _DTYPE_FIELDS:
            if getattr(self, field) is not INHERIT:
                object.__setattr__(self, field, parse_dtype(getattr(self, field), what=field))
        if self.recipe is not INHERIT:
            object.__setattr__(self, "recipe", _parse_recipe(self.recipe))

    def matches(self, path: str | Iterable[str]) -> bool:
        """Whether this rule's pattern matches module `path` (str or tuple of names)."""
        return match_path(self.pattern, _join_path(path))

    def overrides(self) -> dict[str, Any]:
        """The fields this rule sets, by `Precision` field name."""
        return {f: getattr(self, f) for f in _FIELDS if getattr(self, f) is not INHERIT}

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
        dtypes = tuple(dtype_name(getattr(p, f)) for f in _DTYPE_FIELDS)
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


# --------------------------------------------------------------------------- presets

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def _half_rules() -> tuple[Rule, ...]:
    """What stays in f32 in every low-precision preset (and never gets an FP8 recipe)."""
    return (
        Rule("*norm*", compute_dtype=F32, output_dtype=F32, recipe=None),
        Rule("moe/router", param_dtype=F32, compute_dtype=F32, output_dtype=F32, accum_dtype=F32, recipe=None),
        # The embedding output feeds the f32 residual stream; attend() gives f32 logits.
        Rule("embed", output_dtype=F32, recipe=None),
        Rule("lm_head", output_dtype=F32, recipe=None),
    )


def _fp8_rules(recipe: recipes_lib.Recipe) -> tuple[Rule, ...]:
    """DESIGN.md's map: FP8 for Q/K/V/O projections, FFN and experts; QK^T and PV in bf16."""
    return (
        Rule("attn/qk", compute_dtype=BF16, recipe=None),
        Rule("attn/pv", compute_dtype=BF16, recipe=None),
        Rule("attn/q_proj", recipe=recipe),
        Rule("attn/k_proj", recipe=recipe),
        Rule("attn/v_proj", recipe=recipe),
        Rule("attn/o_proj", recipe=recipe),
        Rule("mlp/*", recipe=recipe),
        Rule("moe/experts/*", recipe=recipe),
    )


def fp32() -> Policy:
    """Everything in f32, no FP8 (the reference)."""
    return Policy((), Precision(), "fp32")


def _half(dtype, name: str) -> Policy:
    default = Precision(param_dtype=F32, compute_dtype=dtype, output_dtype=dtype, accum_dtype=F32)
    return Policy(_half_rules(), default, name)


def bf16() -> Policy:
    """f32 master weights, bf16 compute and outputs, f32 accumulation, norms/router/logits f32."""
    return _half(BF16, "bf16")


def fp16() -> Policy:
    """Like bf16 with float16 compute (needs loss scaling)."""
    return _half(F16, "fp16")


def _fp8(recipe: recipes_lib.Recipe, name: str) -> Policy:
    base = bf16()
    return Policy(_fp8_rules(recipe) + base.rules, base.default, name)


def fp8(recipe: recipes_lib.Recipe | None = None) -> Policy:
    """The DeepSeek-V3 layout: bf16 policy plus FP8 (DeepSeekV3 recipe) matmuls."""
    return _fp8(recipe or recipes_lib.DeepSeekV3(), "fp8")


def fp8_current() -> Policy:
    """As fp8 with per-tensor current scaling (E4M3 forward, E5M2 gradients)."""
    return _fp8(recipes_lib.CurrentScaling(), "fp8_current")


def fp8_delayed() -> Policy:
    """As fp8 with per-tensor delayed scaling from an amax history."""
    return _fp8(recipes_lib.DelayedScaling(), "fp8_delayed")


PRESETS: dict[str, Callable[[], Policy]] = {
    "fp32": fp32, "bf16": bf16, "fp16": fp16, "fp8": fp8, "fp8_current": fp8_current, "fp8_delayed": fp8_delayed,
}


def preset(name: str) -> Policy:
    """A preset policy by name: fp32, bf16, fp16, fp8, fp8_current, fp8_delayed.

    Raises:
      ValueError: naming the unknown preset and the known ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown policy preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------- YAML

_TOP_KEYS = ("name", "base", "default", "rules")
_YAML_FIELDS = {"param": "param_dtype", "compute": "compute_dtype", "output": "output_dtype",
                "accum": "accum_dtype", "recipe": "recipe"}
_RULE_KEYS = ("match",) + tuple(_YAML_FIELDS)


def _check_keys(d: Any, allowed: Iterable[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping; got {type(d).__name__}: {d!r}")
    allowed = tuple(allowed)
    for key in d:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}")


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
    _check_keys(params, ("name",) + tuple(fields), f"{where}: recipe {name}")
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
    if "match" not in spec:
        raise ValueError(f"{where}: rule needs a 'match' pattern; keys: {', '.join(_RULE_KEYS)}")
    return _wrap(Rule, where, spec["match"], **_fields_from_yaml(spec, where))


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
    mappings with `match` and any of param/compute/output/accum/recipe). A recipe is a
    name, none, or {name: deepseek_v3, block: 128, ...}.

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


def _load(path: str, seen: frozenset[str]) -> Policy:
    import yaml  # only the YAML edge needs it

    key = os.path.abspath(path)
    if key in seen:
        raise ValueError(f"{path}: base cycle through {sorted(seen)}")
    with open(path) as f:
        data = yaml.safe_load(f)
    return from_dict(data if data is not None else {}, source=path, _seen=seen | {key})


def to_dict(policy: Policy) -> dict[str, Any]:
    """The YAML-shaped dict of `policy` (no base); `from_dict(to_dict(p)) == p`."""
    return {
        "name": policy.name,
        "default": _fields_to_yaml({f: getattr(policy.default, f) for f in _FIELDS}),
        "rules": [{"match": r.pattern, **_fields_to_yaml(r.overrides())} for r in policy.rules],
    }


def _fields_to_yaml(fields: Mapping[str, Any]) -> dict[str, Any]:
    names = {v: k for k, v in _YAML_FIELDS.items()}
    return {names[f]: _recipe_to_yaml(v) if f == "recipe" else dtype_name(v) for f, v in fields.items()}


def _recipe_to_yaml(recipe: recipes_lib.Recipe | None) -> Any:
    if recipe is None:
        return "none"
    changed = _changed_fields(recipe)
    return {"name": recipe.name, **changed} if changed else recipe.name
