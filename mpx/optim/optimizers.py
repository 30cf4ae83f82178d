"""Adam and AdamW whose two moments are stored in any float dtype (bf16 by default).

`optax.adam(mu_dtype=...)` can lower only the first moment; here both `mu` and `nu`
are stored in the requested dtypes while every update is computed in float32:

    g   = grad (cast to f32)
    mu  = b1 * mu + (1 - b1) * g           (f32, stored as mu_dtype)
    nu  = b2 * nu + (1 - b2) * g**2        (f32, stored as nu_dtype)
    u   = mu_hat / (sqrt(nu_hat) + eps)    (bias-corrected, f32)

The stored copies are rounded to nearest (ties to even) and saturated to the storage
dtype's finite range, so a bf16 `nu` (non-negative) never rounds up to inf and the
update stays finite: `sqrt(nu_hat) + eps >= eps > 0`.

Rounding caveat: a moment stored in bf16 (8 significant bits) stops moving when its
per-step change is below half an ulp, i.e. when `1 - b < 2**-9`. With b2 = 0.999 a bf16
`nu` therefore never decays; the default b2 = 0.95 (as in DeepSeek-V3 and most LLM
recipes) is safe. `scale_by_adam` warns when the decay is too slow for the dtype.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["ScaleByAdamState", "store", "scale_by_adam", "adamw", "adam"]

F32 = jnp.float32


class ScaleByAdamState(NamedTuple):
    """State of `scale_by_adam`.

    Attributes:
      count: int32 scalar, number of updates applied.
      mu: first moment, params' structure, stored as `mu_dtype`.
      nu: second moment, params' structure, stored as `nu_dtype`.
    """

    count: jax.Array
    mu: Any
    nu: Any


def _check_float_dtype(name: str, dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 2:
        raise ValueError(f"{name} must be a float dtype of 16 or 32 bits (bf16, fp16, f32); got {dtype}")
    return dtype


def _warn_if_stuck(name: str, decay: float, dtype: jnp.dtype) -> None:
    # The relative spacing of `dtype` is in [eps/2, eps]; a decay step of (1 - b) * m
    # below half of that rounds back to m, so the moment never moves.
    half_ulp = float(jnp.finfo(dtype).eps) / 4
    if 1.0 - decay < half_ulp:
        warnings.warn(
            f"{name}={decay} is too close to 1 for {dtype} moments: the per-step change "
            f"(1 - {name}) = {1.0 - decay:.2g} is below {dtype}'s half ulp and rounds away; "
            "use a float32 moment or a smaller decay", stacklevel=3)


def store(x: jax.Array, dtype) -> jax.Array:
    """Rounds an f32 array to `dtype` (nearest, ties to even), saturating finite values.

    Without saturation f32 values above bf16's max round up to inf; NaN and inf pass
    through unchanged so that non-finite guards still see them.
    """
    dtype = jnp.dtype(dtype)
    if dtype == x.dtype:
        return x
    big = float(jnp.finfo(dtype).max)
    clipped = jnp.where(jnp.isfinite(x), jnp.clip(x, -big, big), x)
    return clipped.astype(dtype)


def scale_by_adam(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, *,
                  mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Adam's rescaling with moments stored in `mu_dtype` / `nu_dtype`, math in f32.

    Args:
      b1, b2: decay rates of the first and second moments, in [0, 1).
      eps: added to sqrt(nu_hat); keeps the update finite when nu rounds to 0.
      mu_dtype, nu_dtype: storage dtypes of the moments (16 or 32-bit floats).

    Returns:
      A GradientTransformation whose updates are float32 and whose state is a
      `ScaleByAdamState`.

    Raises:
      ValueError: for decays outside [0, 1), eps <= 0 or a non-float / 8-bit dtype.
    """
    for name, decay in (("b1", b1), ("b2", b2)):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"{name} must be in [0, 1); got {decay}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 so the update stays finite; got {eps}")
    mu_dtype = _check_float_dtype("mu_dtype", mu_dtype)
    nu_dtype = _check_float_dtype("nu_dtype", nu_dtype)
    _warn_if_stuck("b1", b1, mu_dtype)
    _warn_if_stuck("b2", b2, nu_dtype)

    def init_fn(params):
        zeros = lambda dtype: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)
        return ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(mu_dtype), nu=zeros(nu_dtype))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        # optax.scale_by_adam's expressions in its order: with f32 moments, jitted updates
        # match optax bit for bit (eagerly, optax's inner jit may differ in the last bit).
        mu = jax.tree.map(lambda g, m: (1 - b1) * g.astype(F32) + b1 * m.astype(F32), updates, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * g.astype(F32) ** 2 + b2 * v.astype(F32), updates, state.nu)
        mu_correction = (1 - b1 ** count).astype(F32)
        nu_correction = (1 - b2 ** count).astype(F32)
        new_updates = jax.tree.map(
            lambda m, v: (m / mu_correction) / (jnp.sqrt(v / nu_correction) + eps), mu, nu)
        mu = jax.tree.map(lambda m: store(m, mu_dtype), mu)
        nu = jax.tree.map(lambda v: store(v, nu_dtype), nu)
        return new_updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adamw(learning_rate, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0,
          mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16, mask=None) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) with low-precision moment storage.

    Args:
      learning_rate: a float or an optax schedule (step -> learning rate).
      b1, b2, eps: Adam's hyperparameters (see `scale_by_adam`).
      weight_decay: decoupled decay coefficient, multiplied by the learning rate.
      mu_dtype, nu_dtype: storage dtypes of the moments.
      mask: optax mask (pytree of bools or a function params -> pytree of bools)
        selecting which params are decayed; None decays all.

    Returns:
      `optax.chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)`;
      updates are float32, ready to add to float32 master weights.
    """
    return optax.chain(
        scale_by_adam(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def adam(learning_rate, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
         mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Adam with low-precision moment storage: `adamw` with weight_decay = 0.

    Args and Returns: as `adamw`.
    """
    return adamw(learning_rate, b1, b2, eps, 0.0, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
