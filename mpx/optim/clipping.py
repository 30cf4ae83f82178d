"""Gradient clipping by global norm, computed in float32, fixed or adaptive.

* `clip_by_global_norm(max_norm)`: scale all gradients by min(1, max_norm / ||g||),
  with ||g|| = sqrt(sum of squares of every leaf), accumulated in f32 even when the
  gradients are bf16 (a bf16 sum of squares loses the small leaves).
* `clip_adaptive(factor, decay, warmup_steps)`: the threshold follows the run instead
  of being guessed up front. The state keeps an exponential moving average (EMA) of the
  global norm; after `warmup_steps` steps (unclipped, they only feed the EMA), a
  gradient whose norm exceeds `factor * EMA` is scaled down to `factor * EMA`. The EMA
  is then fed the *clipped* norm, so a burst of spikes cannot drag the threshold up
  with it. The EMA is bias-corrected (as Adam's moments are), so early thresholds are
  not pulled towards zero. A non-finite norm leaves the state untouched and the
  gradients as they are, for `skip_nonfinite` to catch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["global_norm", "clip_by_global_norm", "AdaptiveClipState", "clip_adaptive"]

F32 = jnp.float32


def global_norm(tree) -> jax.Array:
    """The f32 scalar sqrt(sum over all leaves of sum(x**2)), accumulated in f32."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros([], F32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(F32))) for x in leaves))


def _scale_to(tree, norm: jax.Array, threshold: jax.Array):
    """Scales `tree` by threshold / norm where norm > threshold; keeps leaf dtypes."""
    factor = jnp.where(norm > threshold, threshold / norm, jnp.ones([], F32))
    return jax.tree.map(lambda g: (g.astype(F32) * factor).astype(g.dtype), tree)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Clips the gradients' global norm to `max_norm` (norm computed in f32).

    Args:
      max_norm: positive threshold.

    Returns:
      A stateless GradientTransformation (optax.EmptyState).

    Raises:
      ValueError: if max_norm is not > 0.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0; got {max_norm}")

    def update_fn(updates, state, params=None):
        del params
        return _scale_to(updates, global_norm(updates), F32(max_norm)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class AdaptiveClipState(NamedTuple):
    """State of `clip_adaptive`.

    Attributes:
      ema: f32 scalar, (biased) EMA of the clipped global norm.
      count: int32 scalar, finite steps seen.
    """

    ema: jax.Array
    count: jax.Array


def clip_adaptive(factor: float = 2.0, decay: float = 0.99, warmup_steps: int = 100) -> optax.GradientTransformation:
    """Clips the global norm to `factor` times its running (EMA) average.

    Args:
      factor: threshold multiple of the EMA norm, > 1 (2 clips norms above twice
        their recent average).
      decay: EMA decay in [0, 1); 0.99 averages over about 100 steps.
      warmup_steps: first steps left unclipped while the EMA forms (>= 1).

    Returns:
      A GradientTransformation with `AdaptiveClipState`.

    Raises:
      ValueError: for factor <= 1, decay outside [0, 1) or warmup_steps < 1.
    """
    if not factor > 1.0:
        raise ValueError(f"factor must be > 1; got {factor}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1); got {decay}")
    if int(warmup_steps) < 1:
        raise ValueError(f"warmup_steps must be >= 1 (the EMA needs one norm); got {warmup_steps}")

    def init_fn(params):
        del params
        return AdaptiveClipState(ema=jnp.zeros([], F32), count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        norm = global_norm(updates)
        corrected = state.ema / (1 - decay ** state.count.astype(F32))
        threshold = jnp.where(state.count >= warmup_steps, F32(factor) * corrected, jnp.asarray(jnp.inf, F32))
        clipped = jnp.minimum(norm, threshold)
        finite = jnp.isfinite(norm)
        new_state = AdaptiveClipState(
            ema=jnp.where(finite, decay * state.ema + (1 - decay) * clipped, state.ema),
            count=jnp.where(finite, optax.safe_increment(state.count), state.count),
        )
        return _scale_to(updates, norm, threshold), new_state

    return optax.GradientTransformation(init_fn, update_fn)
