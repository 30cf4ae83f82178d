"""Scaling recipes: how each matmul operand is quantized, and delayed-scaling state.

A recipe is a small frozen (hashable, jit-static) description. Scale *state* is data,
kept apart from the recipe and passed explicitly:

* `CurrentScaling`: just-in-time per-tensor scales from the operand's own amax;
  E4M3 forward operands, E5M2 gradients (the "HYBRID" format).
* `DelayedScaling`: forward scales from an amax history (`AmaxHistory`, a pytree)
  updated by a pure function; gradients use current scaling (see `mpx.dot`).
* `StaticScaling`: fixed scales from calibration (the state is a calibrated amax
  that is never updated).
* `DeepSeekV3`: E4M3 everywhere, 1x128 activation tiles, 128x128 weight blocks,
  1x128 per-token gradient tiles, online scales (DeepSeek-V3 report, section 3.3).

Delayed scaling across microbatches: each microbatch observes an amax; observations
are combined with `merge_amax` (the max), never summed and never overwritten by the
last microbatch.

Example:
    >>> import jax.numpy as jnp, mpx
    >>> r = mpx.recipes.DelayedScaling(history=4)
    >>> h = r.init_state()
    >>> h = mpx.recipes.update_history(h, jnp.float32(3.0))
    >>> float(mpx.recipes.history_amax(h, "max"))
    3.0
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from mpx import formats as formats_lib
from mpx.scales import SCALE_FORMATS, compute_scale

__all__ = [
    "AMAX_ALGOS", "Scaling", "CurrentScaling", "DelayedScaling", "StaticScaling", "DeepSeekV3", "Recipe",
    "RECIPES", "RENAMED_FIELDS", "renamed_hint", "get", "is_recipe", "is_stateful", "AmaxHistory",
    "init_history", "update_history", "history_amax", "delayed_scale", "merge_amax", "merge_amax_trees"
]

AMAX_ALGOS = ("max", "most_recent")


def _check_format(name: str, value: str) -> None:
    """Raises ValueError naming the field, the bad value and the known formats."""
    try:
        formats_lib.get(value)
    except ValueError as err:
        raise ValueError(f"{name}={value!r} is not a format: {err}") from None


class Scaling:
    """What every recipe answers, so that callers ask the recipe instead of testing its type.

    Class-level answers (a recipe overrides those that differ):
      tiled: operands are scaled per tile or block, online, inside the dot (DeepSeekV3:
        1x128 / 128x128, `block` wide); False: one scale per operand, computed outside
        the dot (per tensor).
      stateful: forward scales come from explicit state (`init_state()`).
      updates_history: each dot records its operands' amax in that state (delayed).
      swiglu_residuals, recompute_swiglu: what an FFN's down projection keeps for the
        backward pass (`DeepSeekV3`'s fields; False for the others).
    """

    tiled = False
    stateful = False
    updates_history = False
    swiglu_residuals = False
    recompute_swiglu = False


def _check_fields(recipe) -> None:
    """Raises ValueError for a recipe's unknown formats or scale format."""
    _check_format("fwd_format", recipe.fwd_format)
    _check_format("bwd_format", recipe.bwd_format)
    if recipe.scale_format not in SCALE_FORMATS:
        raise ValueError(f"{type(recipe).__name__}.scale_format must be one of {tuple(SCALE_FORMATS)}; "
                         f"got {recipe.scale_format!r}")


def _check_length(name: str, value) -> None:
    """Raises ValueError unless value is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


@dataclasses.dataclass(frozen=True)
class CurrentScaling(Scaling):
    """Per-tensor just-in-time scaling.

    Attributes:
      fwd_format: format of forward operands (activations and weights).
      bwd_format: format of output gradients.
      margin: headroom in powers of two.
      scale_format: "f32" (float scales), "ue8m0" (rounded up to powers of two) or
        "ue8m3" (rounded up to 4 significant bits).
      fp8_residuals: keep the FP8 operands for the backward pass, not the inputs.
    """

    fwd_format: str = "e4m3"
    bwd_format: str = "e5m2"
    margin: float = 0.0
    scale_format: str = "f32"
    fp8_residuals: bool = True

    def __post_init__(self):
        _check_fields(self)

    @property
    def name(self) -> str:
        return "current"


@dataclasses.dataclass(frozen=True)
class DelayedScaling(Scaling):
    """Per-tensor delayed scaling from an amax history (forward operands).

    Attributes:
      history: length of the amax history.
      amax_algo: "max" (max over the history) or "most_recent".
      margin: headroom in powers of two.
      fwd_format, bwd_format: as in CurrentScaling; gradients are scaled just in time.
      scale_format: as in CurrentScaling.
      fp8_residuals: keep the FP8 operands for the backward pass, not the inputs.
    """

    history: int = 16
    amax_algo: str = "max"
    margin: float = 0.0
    fwd_format: str = "e4m3"
    bwd_format: str = "e5m2"
    scale_format: str = "f32"
    fp8_residuals: bool = True

    stateful = True
    updates_history = True

    def __post_init__(self):
        _check_length("DelayedScaling.history", self.history)
        if self.amax_algo not in AMAX_ALGOS:
            raise ValueError(f"DelayedScaling.amax_algo must be one of {AMAX_ALGOS}; got {self.amax_algo!r}")
        _check_fields(self)

    @property
    def name(self) -> str:
        return "delayed"

    def init_state(self) -> "AmaxHistory":
        return init_history(self.history)


@dataclasses.dataclass(frozen=True)
class StaticScaling(Scaling):
    """Fixed per-tensor scales from calibration (post-training quantization).

    The state is an `AmaxHistory` of length 1 holding the calibrated amax; it is read,
    never updated. An all-zero (uncalibrated) state falls back to current scaling.
    Fields as in `CurrentScaling`.
    """

    fwd_format: str = "e4m3"
    bwd_format: str = "e5m2"
    margin: float = 0.0
    scale_format: str = "f32"
    fp8_residuals: bool = True

    stateful = True

    def __post_init__(self):
        _check_fields(self)

    @property
    def name(self) -> str:
        return "static"

    @property
    def amax_algo(self) -> str:
        return "most_recent"

    def init_state(self) -> "AmaxHistory":
        return init_history(1)


@dataclasses.dataclass(frozen=True)
class DeepSeekV3(Scaling):
    """The DeepSeek-V3 fine-grained FP8 recipe.

    Every operand is grouped 128-wide along the contraction dimension of the matmul it
    feeds: activations and output gradients in 1x128 tiles (per token), weights in
    128x128 blocks; the wgrad matmul groups both operands 128x1 along tokens. Scales are
    computed online; 128x128 blocks are never used on activation gradients.

    Attributes:
      block: tile / block edge (128 in the report).
      fwd_format: element format of activations and weights (E4M3).
      bwd_format: format of output gradients (E4M3 in the report).
      scale_format: "f32" (float scales, as in the report: applied exactly to f32
        partial sums per 128-wide K group), "ue8m0" (power-of-two scales, as
        DeepSeek-V3.1 and DeepGEMM use) or "ue8m3" (scales rounded up to 4 significant
        bits). ue8m0 and ue8m3 scales fold into bf16 operands exactly (an E4M3 value
        times a ue8m3 scale has at most 8 significant bits): one GEMM, no K groups,
        faster on CPU. Float scales put each tile's largest value exactly on the
        format's max; rounded-up scales do not, which costs SQNR on tiles with
        outliers (`benchmarks.scale_formats`).
      fp8_residuals: keep the FP8 operands (E4M3 data and scales) for the backward
        pass instead of the unquantized input (DeepSeek-V3 report, 3.3); wgrad then
        requantizes its 128x1 tiles from them. False keeps the input (more memory).
      swiglu_residuals: on an FFN's down projection, SwiGLU keeps its inputs (gate and
        up) as `fwd_format` 1x128 tiles for the backward pass, as the report (3.3)
        does: half the bytes of bf16 inputs, and gradients from the dequantized values.
        False keeps them as the projections return them.
      recompute_swiglu: with fp8_residuals, an FFN's down projection keeps no copy of
        its input: the backward pass recomputes the SwiGLU product from SwiGLU's
        residuals (the report, 3.3; `mpx.dot.swiglu_dot_general`). One tensor of the
        FFN's width per layer fewer, for a sigmoid per element more.
    """

    block: int = 128
    fwd_format: str = "e4m3"
    bwd_format: str = "e4m3"
    scale_format: str = "f32"
    fp8_residuals: bool = True
    swiglu_residuals: bool = True
    recompute_swiglu: bool = True

    tiled = True

    def __post_init__(self):
        _check_length("DeepSeekV3.block", self.block)
        _check_fields(self)

    @property
    def name(self) -> str:
        return "deepseek_v3"


Recipe = CurrentScaling | DelayedScaling | StaticScaling | DeepSeekV3
RECIPES = {"current": CurrentScaling, "delayed": DelayedScaling, "static": StaticScaling, "deepseek_v3": DeepSeekV3}


# Spellings of earlier versions, each with the field that replaced it.
RENAMED_FIELDS = {"fmt": "fwd_format", "grad_format": "bwd_format", "pow2_scale": "scale_format ('ue8m0')"}


def renamed_hint(key: str) -> str:
    """" (renamed: use X)" for a field spelled as an earlier version did, else ""."""
    return f" (renamed: use {RENAMED_FIELDS[key]})" if key in RENAMED_FIELDS else ""


def get(name: str | Recipe | None, **kwargs) -> Recipe | None:
    """A recipe by name ("current", "delayed", "static", "deepseek_v3"), or None.

    Raises:
      ValueError: naming the unknown recipe and the known ones, or a field the recipe
        does not have (with its new name when an earlier version spelled it so).
    """
    if name is None or is_recipe(name):
        return name
    if name in ("none", "null", ""):
        return None
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)} (or none)")
    fields = tuple(f.name for f in dataclasses.fields(RECIPES[name]))
    for key in kwargs:
        if key not in fields:
            raise ValueError(f"recipe {name} has no field {key!r}{renamed_hint(key)}; fields: {', '.join(fields)}")
    return RECIPES[name](**kwargs)


def is_recipe(value) -> bool:
    """Whether value is a recipe object (answers `Scaling`'s questions)."""
    return isinstance(value, Scaling)


def is_stateful(recipe: Recipe | None) -> bool:
    """True for recipes whose forward scales come from state (delayed, static)."""
    return recipe is not None and recipe.stateful


# --------------------------------------------------------------------------- amax history


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AmaxHistory:
    """Amax observations of one tensor, most recent first.

    Attributes:
      history: float32 (length,). Zeros mean "not observed yet".
    """

    history: jax.Array


def init_history(length: int) -> AmaxHistory:
    """A fresh, all-zero history of `length` observations.

    Raises:
      ValueError: if length is not an int >= 1.
    """
    _check_length("history length", length)
    return AmaxHistory(history=jnp.zeros((length,), jnp.float32))


def update_history(state: AmaxHistory, amax: jax.Array) -> AmaxHistory:
    """Shifts the history by one and records `amax` as the most recent observation.

    Pure: returns a new `AmaxHistory`; the oldest observation drops out.

    Args:
      state: the history, most recent first.
      amax: a scalar (or one-element array) observation.

    Raises:
      ValueError: if amax has more than one element.
    """
    amax = jnp.asarray(amax, jnp.float32)
    if amax.size != 1:
        raise ValueError(f"amax must be a scalar observation; got shape {amax.shape}")
    rolled = jnp.roll(state.history, 1)
    return AmaxHistory(history=rolled.at[0].set(amax.reshape(())))


def history_amax(state: AmaxHistory, algo: str = "max") -> jax.Array:
    """The amax a delayed scale is computed from: max over history or the latest."""
    if algo not in AMAX_ALGOS:
        raise ValueError(f"amax algo must be one of {AMAX_ALGOS}; got {algo!r}")
    return jnp.max(state.history) if algo == "max" else state.history[0]


def delayed_scale(state: AmaxHistory, fmt, *, algo: str = "max", margin: float = 0.0,
                  pow2: bool = False, current_amax: jax.Array | None = None,
                  scale_format: str = "f32") -> jax.Array:
    """The dequantization scale from a history; falls back to `current_amax` when empty.

    A fresh (all-zero) history would give scale 1 and saturate the first step's
    operands; with `current_amax` given, the first step scales just in time instead.
    """
    amax = history_amax(state, algo)
    if current_amax is not None:
        amax = jnp.where(amax > 0, amax, jnp.asarray(current_amax, jnp.float32).reshape(()))
    return compute_scale(amax, fmt, margin=margin, pow2=pow2, scale_format=scale_format)


def merge_amax(*observations: jax.Array) -> jax.Array:
    """Combines amax observations of the same tensor (e.g. across microbatches): the max.

    Raises:
      ValueError: if no observation is given.
    """
    if not observations:
        raise ValueError("merge_amax needs at least one observation; got none")
    out = jnp.asarray(observations[0], jnp.float32)
    for obs in observations[1:]:
        out = jnp.maximum(out, obs)
    return out


def merge_amax_trees(a, b):
    """Leafwise max of two pytrees of amax observations (microbatch accumulation)."""
    return jax.tree_util.tree_map(jnp.maximum, a, b)
