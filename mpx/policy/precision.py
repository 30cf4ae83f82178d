"""Precision: the dtypes and FP8 recipe one layer gets, and the "p=f32,c=bf16" grammar."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mpx import formats as formats_lib
from mpx import recipes as recipes_lib

__all__ = [
    "DTYPE_FIELDS", "FIELDS", "parse_dtype", "dtype_name", "recipe_label", "changed_fields", "parse_recipe",
    "INHERIT", "Precision"
]

_DTYPES = {
    "f32": jnp.float32, "fp32": jnp.float32, "float32": jnp.float32,
    "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
    "f16": jnp.float16, "fp16": jnp.float16, "float16": jnp.float16, "half": jnp.float16,
}
_ALLOWED_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
_SHORT_NAMES = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float16): "f16"}
DTYPE_FIELDS = ("param_dtype", "compute_dtype", "output_dtype", "accum_dtype")
FIELDS = DTYPE_FIELDS + ("recipe",)


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
    """A recipe's name plus its non-default fields: "deepseek_v3(scale_format=ue8m0)"; "-" for None."""
    if recipe is None:
        return "-"
    changed = changed_fields(recipe)
    inner = ", ".join(f"{k}={v}" for k, v in changed.items())
    return f"{recipe.name}({inner})" if inner else recipe.name


def changed_fields(recipe: recipes_lib.Recipe) -> dict[str, Any]:
    defaults = type(recipe)()
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)
            if getattr(recipe, f.name) != getattr(defaults, f.name)}


def parse_recipe(value: Any) -> recipes_lib.Recipe | None:
    """A recipe instance, a recipe name ("deepseek_v3", "none") or None."""
    if value is None or isinstance(value, str):
        return recipes_lib.get(value)
    if recipes_lib.is_recipe(value):
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
        for field in DTYPE_FIELDS:
            object.__setattr__(self, field, parse_dtype(getattr(self, field), what=field))
        object.__setattr__(self, "recipe", parse_recipe(self.recipe))

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

