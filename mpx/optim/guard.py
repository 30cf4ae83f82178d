"""`skip_nonfinite`: an optax wrapper that turns a step with NaN/inf into a no-op.

When the incoming gradients or the inner transformation's updates contain NaN or inf,
the wrapped transformation outputs zero updates and keeps the inner state exactly as it
was (moments, counts and schedules are bit-identical), and counts the skipped step.
Used with dynamic loss scaling, a float16 overflow then costs one step instead of
the run. Skipped steps do not advance the inner step count, so learning-rate schedules
inside the wrapper see only applied steps.

Unlike `nan_to_num`, nothing is hidden: `state.skipped` says how often it happened, and
a training loop should log it and stop when it keeps growing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mpx.optim.loss_scale import all_finite

__all__ = ["SkipNonFiniteState", "skip_nonfinite"]


class SkipNonFiniteState(NamedTuple):
    """State of `skip_nonfinite`.

    Attributes:
      inner_state: the wrapped transformation's state.
      skipped: int32 scalar, steps skipped because of NaN/inf.
      total: int32 scalar, steps seen (applied + skipped).
      last_finite: bool scalar, whether the latest step was applied.
    """

    inner_state: Any
    skipped: jax.Array
    total: jax.Array
    last_finite: jax.Array


def _select(pred: jax.Array, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wraps `inner` so that steps with non-finite grads or updates are skipped.

    Args:
      inner: any optax GradientTransformation (e.g. an `optax.chain`).

    Returns:
      A GradientTransformation with `SkipNonFiniteState`. On a finite step it returns
      inner's updates and state; otherwise zero updates (same dtypes) and inner's
      previous state, unchanged bit for bit.
    """

    def init_fn(params):
        zero = jnp.zeros([], jnp.int32)
        return SkipNonFiniteState(inner.init(params), zero, zero, jnp.array(True))

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_inner = optax.with_extra_args_support(inner).update(
            updates, state.inner_state, params, **extra_args)
        finite = all_finite(updates) & all_finite(new_updates)
        out = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        inner_state = _select(finite, new_inner, state.inner_state)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        total = optax.safe_increment(state.total)
        return out, SkipNonFiniteState(inner_state, skipped, total, finite)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
