"""Data dependences that order work in XLA's schedule where barriers do not.

A custom backward rule that recomputes from saved inputs (attention probabilities, an
activation's derivative) only saves memory if the recomputation runs when the backward
pass reaches its layer. XLA on CPU drops `lax.optimization_barrier` before scheduling,
and its scheduler then runs every layer's recomputation as soon as its inputs exist, at
the start of the backward pass, so all of them are alive at once. `after` makes the
recomputation's input depend on the layer's incoming gradient instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def after(x: Array, dependency: Array) -> Array:
    """x, unchanged, but computable only once `dependency` is.

    Adds min(|d|, 0) for one element d of `dependency`: exactly 0 for any non-NaN d (a
    NaN gradient is lost anyway), and a data dependence no XLA simplification removes.
    Costs one elementwise pass over x.

    Args:
      x: a floating array.
      dependency: any non-empty numeric array.

    Returns:
      x's values, in x's dtype.
    """
    first = jnp.ravel(dependency)[0].astype(x.dtype)
    return x + jnp.minimum(jnp.abs(first), jnp.zeros((), x.dtype))
