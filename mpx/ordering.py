"""Data dependences and buffers that order work in XLA's schedule where barriers do not.

A custom backward rule that recomputes from saved inputs (attention probabilities, an
activation's derivative) only saves memory if the recomputation runs when the backward
pass reaches its layer. XLA on CPU drops `lax.optimization_barrier` before scheduling,
and its scheduler then runs every layer's recomputation as soon as its inputs exist, at
the start of the backward pass, so all of them are alive at once. `after` makes the
recomputation's input depend on the layer's incoming gradient instead.

A value kept for the backward pass only saves memory if the backward pass reads it. XLA
on CPU duplicates cheap elementwise producers into every consumer: a backward rule that
reads a stored FP8 operand gets the quantization fused in from the unquantized input,
which then stays alive (4 bytes per element instead of 1). `kept` puts a value in a
buffer of its own that XLA cannot recompute from its producer's inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpx.target import current as current_target

__all__ = ["after", "kept"]

Array = jax.Array


def after(x: Array, dependency: Array, *, bitwise: bool = False) -> Array:
    """x, unchanged, but computable only once `dependency` is.

    Adds min(|d|, 0) for one element d of `dependency`: exactly 0 for any non-NaN d (a
    NaN gradient is lost anyway), and a data dependence no XLA simplification removes.
    Costs one elementwise pass over x. One-byte floats (FP8 data, which has no
    arithmetic), and 16-bit floats with `bitwise`, get that 0 added to their bit
    patterns as unsigned integers: XLA on CPU computes a bf16 addition in f32, and may
    then convert a whole array to f32 ahead of a loop that adds to slices of it.

    Args:
      x: a floating array.
      dependency: any non-empty numeric array.
      bitwise: 16-bit floats through their bit patterns too.

    Returns:
      x's values, in x's dtype.
    """
    size = jnp.dtype(x.dtype).itemsize
    if size == 1 or (bitwise and size == 2):  # add 0 to the bit patterns
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}"))
        zero = jnp.minimum(jnp.abs(_first(dependency).astype(jnp.float32)), 0.0).astype(bits.dtype)
        return jax.lax.bitcast_convert_type(bits + zero, x.dtype)
    first = _first(dependency).astype(x.dtype)
    return x + jnp.minimum(jnp.abs(first), jnp.zeros((), x.dtype))


def kept(x: Array) -> Array:
    """x, unchanged, as a buffer of its own: later consumers read it, not its inputs.

    The value leaves a `lax.cond` whose two branches both return x (one through a
    bitcast round trip, so XLA cannot merge them), and fusion does not cross a
    conditional. The predicate is a constant True behind an optimization barrier, which
    XLA does not fold (`tests/test_attention.py` measures the effect), and
    reads no data, so a sharded x costs no collective. Costs one copy of x. On CPU only:
    elsewhere x comes back as it is (on GPU a conditional reads its predicate on the
    host, and XLA's GPU fusion has not shown the duplication).

    Args:
      x: an array whose dtype has a same-width unsigned integer type
        (1, 2, 4 or 8 bytes per element).
    """
    if not current_target().is_cpu:
        return x
    bits = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    same = lambda v: jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(v, bits), v.dtype)
    keep = jax.lax.optimization_barrier(jnp.bool_(True))
    return jax.lax.cond(keep, lambda v: v, same, x)


def _first(x: Array) -> Array:
    # An index, not ravel: on a sharded array a reshape to 1-D could move the whole array.
    return x[(0,) * x.ndim]
