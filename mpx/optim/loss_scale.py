"""Loss scaling for float16 training: dynamic, static and no-op, all explicit pytrees.

float16 gradients underflow (its smallest subnormal is 2**-24); multiplying the loss by
a scale S before differentiation multiplies every gradient by S, and dividing them by S
afterwards (in f32) restores their values. A dynamic scale grows by `factor` after
`period` consecutive finite steps and shrinks by `factor` on a non-finite step, always
staying within [min_loss_scale, max_loss_scale] (never 0, never inf). bfloat16 and FP8
recipes with per-tensor scales do not need it: use `NoOpLossScale`.

The train step, with `state.loss_scale` one of these objects:

    def loss_fn(params, batch):
        return state.loss_scale.scale(model_loss(params, batch))
    grads = state.loss_scale.unscale(jax.grad(loss_fn)(state.params, batch))
    finite = all_finite(grads)
    loss_scale = state.loss_scale.adjust(finite)
    # and skip the update when not finite: see `skip_nonfinite`.

Every scale is a pytree (jax.tree_util.register_dataclass): `loss_scale` and
`counter` are leaves; `period`, `factor` and the bounds are static metadata.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = [
    "all_finite", "NoOpLossScale", "StaticLossScale", "DynamicLossScale", "dynamic_loss_scale",
    "static_loss_scale"
]

F32 = jnp.float32


def all_finite(tree) -> jax.Array:
    """True (a bool scalar array) iff every floating leaf of `tree` is free of NaN/inf.

    Integer and boolean leaves are always finite; an empty tree is finite.
    """
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not checks:
        return jnp.array(True)
    return jnp.stack(checks).all()


def _scale_tree(tree, multiplier: jax.Array):
    # Multiply in f32 and cast back: the scale itself never changes a leaf's dtype.
    return jax.tree.map(lambda x: (x.astype(F32) * multiplier).astype(x.dtype), tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoOpLossScale:
    """A loss scale of 1 that never changes (bf16 / fp8 / f32 training)."""

    @property
    def loss_scale(self) -> jax.Array:
        return jnp.ones([], F32)

    def scale(self, tree):
        """Returns `tree` unchanged."""
        return tree

    def unscale(self, tree):
        """Returns `tree` unchanged."""
        return tree

    def adjust(self, grads_finite: jax.Array) -> "NoOpLossScale":
        """Returns self."""
        del grads_finite
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StaticLossScale:
    """A fixed loss scale.

    Attributes:
      loss_scale: float32 scalar S.
    """

    loss_scale: jax.Array

    def scale(self, tree):
        """Multiplies every leaf (usually the loss) by S, keeping each leaf's dtype."""
        return _scale_tree(tree, jnp.asarray(self.loss_scale, F32))

    def unscale(self, tree):
        """Multiplies every leaf (usually the grads) by 1/S in f32, keeping dtypes."""
        return _scale_tree(tree, 1.0 / jnp.asarray(self.loss_scale, F32))

    def adjust(self, grads_finite: jax.Array) -> "StaticLossScale":
        """Returns self: a static scale never changes."""
        del grads_finite
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """A loss scale that grows while gradients stay finite and shrinks when they do not.

    Build one with `dynamic_loss_scale(...)`, which validates and sets dtypes.

    Attributes:
      loss_scale: float32 scalar S, always in [min_loss_scale, max_loss_scale].
      counter: int32 scalar, consecutive finite steps since the last change, < period.
      period: finite steps before S grows (static).
      factor: growth / shrink factor, > 1 (static).
      min_loss_scale, max_loss_scale: bounds of S, finite and > 0 (static).
    """

    loss_scale: jax.Array
    counter: jax.Array
    period: int = dataclasses.field(default=2000, metadata=dict(static=True))
    factor: float = dataclasses.field(default=2.0, metadata=dict(static=True))
    min_loss_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    max_loss_scale: float = dataclasses.field(default=2.0**24, metadata=dict(static=True))

    def __post_init__(self):
        # Only static fields are checked: data fields may be tracers or placeholders.
        _check_bounds(self.period, self.factor, self.min_loss_scale, self.max_loss_scale)

    def scale(self, tree):
        """Multiplies every leaf (usually the loss) by S, keeping each leaf's dtype."""
        return _scale_tree(tree, jnp.asarray(self.loss_scale, F32))

    def unscale(self, tree):
        """Multiplies every leaf (usually the grads) by 1/S in f32, keeping dtypes."""
        return _scale_tree(tree, 1.0 / jnp.asarray(self.loss_scale, F32))

    def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
        """The next state: grow after `period` finite steps, shrink on a non-finite one.

        Args:
          grads_finite: bool scalar, e.g. `all_finite(grads)`.

        Returns:
          A new DynamicLossScale; S stays float32 and within the bounds.
        """
        grads_finite = jnp.asarray(grads_finite, bool)
        s = jnp.asarray(self.loss_scale, F32)
        counter = jnp.asarray(self.counter, jnp.int32)
        grow = counter + 1 >= self.period
        grown = jnp.where(grow, jnp.minimum(s * F32(self.factor), F32(self.max_loss_scale)), s)
        shrunk = jnp.maximum(s * F32(1.0 / self.factor), F32(self.min_loss_scale))
        new_s = jnp.where(grads_finite, grown, shrunk)
        new_counter = jnp.where(grads_finite & ~grow, counter + 1, jnp.zeros_like(counter))
        return dataclasses.replace(self, loss_scale=new_s, counter=new_counter)


def _check_bounds(period, factor, min_loss_scale, max_loss_scale) -> None:
    if int(period) < 1:
        raise ValueError(f"period must be >= 1; got {period}")
    if not factor > 1.0:
        raise ValueError(f"factor must be > 1; got {factor}")
    f32_max = float(jnp.finfo(F32).max)
    if not 0.0 < min_loss_scale <= max_loss_scale <= f32_max:
        raise ValueError(
            f"need 0 < min_loss_scale <= max_loss_scale <= {f32_max:g} (finite); "
            f"got min_loss_scale={min_loss_scale}, max_loss_scale={max_loss_scale}")


def dynamic_loss_scale(initial: float = 2.0**15, *, period: int = 2000, factor: float = 2.0,
                       min_loss_scale: float = 1.0, max_loss_scale: float = 2.0**24) -> DynamicLossScale:
    """A fresh `DynamicLossScale` (float32 scale, int32 counter at 0).

    Args:
      initial: starting scale, within [min_loss_scale, max_loss_scale]; 2**15 is the
        usual fp16 choice.
      period: finite steps before the scale grows.
      factor: growth and shrink factor (2 halves the scale on overflow).
      min_loss_scale, max_loss_scale: bounds; finite and > 0.

    Raises:
      ValueError: for bounds that are not ordered, not finite or not positive, a
        factor <= 1, a period < 1, or an initial scale outside the bounds.
    """
    _check_bounds(period, factor, min_loss_scale, max_loss_scale)
    if not min_loss_scale <= initial <= max_loss_scale:
        raise ValueError(f"initial loss scale {initial} is outside [{min_loss_scale}, {max_loss_scale}]")
    return DynamicLossScale(loss_scale=jnp.asarray(initial, F32), counter=jnp.zeros([], jnp.int32),
                            period=int(period), factor=float(factor),
                            min_loss_scale=float(min_loss_scale), max_loss_scale=float(max_loss_scale))


def static_loss_scale(value: float) -> StaticLossScale:
    """A `StaticLossScale` with a float32 scale.

    Raises:
      ValueError: if `value` is not finite and > 0.
    """
    if not 0.0 < value < float("inf"):
        raise ValueError(f"static loss scale must be finite and > 0; got {value}")
    return StaticLossScale(loss_scale=jnp.asarray(value, F32))
