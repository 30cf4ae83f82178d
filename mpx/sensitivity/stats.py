"""Per-tensor statistics that predict how a tensor takes to a narrow float format.

For a tensor x (weights, or a layer's input activations accumulated over batches):

* amax: max |x|.
* kurtosis: E[(x - mu)^4] / sigma^4 (3 for a Gaussian; large for heavy tails).
* outlier fraction: share of elements with |x - mu| > 6 sigma.
* saturated fraction: share of elements beyond E4M3's max (448) when cast unscaled,
  i.e. what a plain FP8 cast without a scale would clip.
* flushed fraction: share of nonzero elements that become zero in E4M3 under a
  per-tensor amax scale (amax -> 448): small values an outlier-driven scale flushes.

Moments accumulate as sums (`Moments`), so activations are summarized over any number
of calibration batches without keeping them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mpx import formats as formats_lib

__all__ = ["Moments", "zeros", "observe", "summary", "tensor_stats"]

_E4M3 = formats_lib.get("e4m3")


class Moments(NamedTuple):
    """Running sums over the elements seen so far (float32 scalars)."""

    count: jax.Array
    s1: jax.Array
    s2: jax.Array
    s3: jax.Array
    s4: jax.Array
    amax: jax.Array
    outliers: jax.Array
    saturated: jax.Array
    flushed: jax.Array
    nonzero: jax.Array


def zeros() -> Moments:
    """Empty sums."""
    return Moments(*([jnp.float32(0)] * len(Moments._fields)))


def observe(m: Moments, x: jax.Array) -> Moments:
    """`m` plus the elements of x (outliers judged against x's own mean and sigma)."""
    x = x.astype(jnp.float32).ravel()
    mu = jnp.mean(x)
    sigma = jnp.std(x)
    amax = jnp.max(jnp.abs(x))
    scale = jnp.where(amax > 0, amax / _E4M3.max, 1.0)
    scaled = jnp.abs(x) / scale
    flushed = jnp.sum((x != 0) & (scaled < _E4M3.min_subnormal / 2))
    return Moments(
        count=m.count + x.size, s1=m.s1 + jnp.sum(x), s2=m.s2 + jnp.sum(x * x), s3=m.s3 + jnp.sum(x**3),
        s4=m.s4 + jnp.sum(x**4), amax=jnp.maximum(m.amax, amax),
        outliers=m.outliers + jnp.sum(jnp.abs(x - mu) > 6 * sigma),
        saturated=m.saturated + jnp.sum(jnp.abs(x) > _E4M3.max), flushed=m.flushed + flushed,
        nonzero=m.nonzero + jnp.sum(x != 0))


def summary(m: Moments) -> dict[str, float]:
    """{"amax", "kurtosis", "outlier_fraction", "saturated_fraction", "flushed_fraction"}."""
    n = float(m.count)
    mean = float(m.s1) / n
    var = max(float(m.s2) / n - mean**2, 0.0)
    # Fourth central moment from raw moments.
    m4 = float(m.s4) / n - 4 * mean * float(m.s3) / n + 6 * mean**2 * float(m.s2) / n - 3 * mean**4
    return {
        "amax": float(m.amax),
        "kurtosis": m4 / var**2 if var > 0 else 0.0,
        "outlier_fraction": float(m.outliers) / n,
        "saturated_fraction": float(m.saturated) / n,
        "flushed_fraction": float(m.flushed) / max(float(m.nonzero), 1.0),
    }


def tensor_stats(x: jax.Array) -> dict[str, float]:
    """`summary` of one tensor."""
    return summary(observe(zeros(), x))
