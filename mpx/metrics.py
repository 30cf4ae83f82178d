"""Accuracy metrics for comparing a low-precision result with a float32 reference.

All functions take (approximate, reference) arrays of the same shape, compute in
float32 and return float32 scalars. They are jitted (one compiled kernel per shape,
also when called eagerly) and can run inside a caller's jit.

Example:
    >>> import jax.numpy as jnp, mpx
    >>> ref = jnp.linspace(-1.0, 1.0, 64)
    >>> approx = mpx.dequantize(mpx.quantize(ref, "e4m3"))
    >>> bool(mpx.metrics.sqnr_db(approx, ref) > 25.0)
    True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "cosine_similarity", "relative_error", "sqnr_db", "max_error_over_amax", "kl_divergence",
    "top1_agreement", "summary"
]

_TINY = jnp.finfo(jnp.float32).tiny


def _f32(*xs):
    return [jnp.asarray(x).astype(jnp.float32) for x in xs]


def _check_shapes(a, b):
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: approx {a.shape} vs reference {b.shape}")


@jax.jit
def cosine_similarity(approx: jax.Array, reference: jax.Array) -> jax.Array:
    """Cosine of the angle between the flattened arrays (1.0 = same direction)."""
    a, b = _f32(approx, reference)
    _check_shapes(a, b)
    a, b = a.ravel(), b.ravel()
    denom = jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), _TINY)
    return jnp.dot(a, b) / denom


@jax.jit
def relative_error(approx: jax.Array, reference: jax.Array) -> jax.Array:
    """||approx - reference|| / ||reference|| (Frobenius norms)."""
    a, b = _f32(approx, reference)
    _check_shapes(a, b)
    return jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), _TINY)


@jax.jit
def sqnr_db(approx: jax.Array, reference: jax.Array) -> jax.Array:
    """Signal-to-quantization-noise ratio in dB: 10 log10(||ref||^2 / ||approx - ref||^2).

    Identical arrays give +inf.
    """
    a, b = _f32(approx, reference)
    _check_shapes(a, b)
    signal = jnp.sum(b * b)
    noise = jnp.sum((a - b) ** 2)
    return 10.0 * (jnp.log10(signal) - jnp.log10(noise))


@jax.jit
def max_error_over_amax(approx: jax.Array, reference: jax.Array) -> jax.Array:
    """max |approx - reference| / max |reference|: worst error relative to the range."""
    a, b = _f32(approx, reference)
    _check_shapes(a, b)
    return jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), _TINY)


@functools.partial(jax.jit, static_argnames="axis")
def kl_divergence(approx_logits: jax.Array, reference_logits: jax.Array, axis: int = -1) -> jax.Array:
    """Mean KL(P_ref || P_approx) between softmax distributions along `axis` (nats)."""
    a, b = _f32(approx_logits, reference_logits)
    _check_shapes(a, b)
    log_p = jax.nn.log_softmax(b, axis=axis)
    log_q = jax.nn.log_softmax(a, axis=axis)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis)
    return jnp.mean(kl)


@functools.partial(jax.jit, static_argnames="axis")
def top1_agreement(approx_logits: jax.Array, reference_logits: jax.Array, axis: int = -1) -> jax.Array:
    """Fraction of positions whose argmax agrees."""
    a, b = _f32(approx_logits, reference_logits)
    _check_shapes(a, b)
    return jnp.mean(jnp.argmax(a, axis=axis) == jnp.argmax(b, axis=axis))


def summary(approx: jax.Array, reference: jax.Array) -> dict[str, float]:
    """All elementwise metrics as Python floats (eager), for reports."""
    return {
        "cosine": float(cosine_similarity(approx, reference)),
        "relative_error": float(relative_error(approx, reference)),
        "sqnr_db": float(sqnr_db(approx, reference)),
        "max_error_over_amax": float(max_error_over_amax(approx, reference)),
    }
