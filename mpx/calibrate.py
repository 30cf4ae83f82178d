"""Calibration: streaming activation histograms and the clipping ranges they give.

Static FP8 scaling quantizes an activation with a scale fixed ahead of time, from
statistics over calibration batches. The statistic here is a histogram of |x| that is
updated batch by batch inside jit:

    counts[i] = number of |x| in [i w, (i + 1) w),   w = 2**exponent / bins

`exponent` grows with the largest |x| seen, so the range [0, 2**exponent) always covers
every observation; when it grows by d, each 2**d neighbouring bins are merged. Bin
edges are powers of two apart, so merging is exact: observing a then b gives the same
histogram as observing their concatenation.

From a histogram, `calibrated_amax(hist, method, fmt)` returns the amax to quantize
with (scale = amax / fmt.max, `mpx.compute_scale`), by one of four methods:

* "max": the largest |x| seen (no clipping).
* "percentile": the upper edge of the bin where the CDF of |x| reaches `percentile`.
* "mse": the clipping threshold minimizing the expected squared error of quantizing
  into `fmt` (clipping error above the threshold, rounding error below it).
* "kl": the threshold minimizing KL(P || Q) between the histogram P (with the clipped
  mass folded into its last bin) and its quantized version Q, built from the unclipped
  bins, in which every bin that rounds to the same `fmt` value shares that value's mass
  (TensorRT's entropy calibration, with the FP8 grid in place of INT8's uniform levels).

FP8 is a floating-point grid: its relative rounding error is the same at every scale
in the normal range, so unlike INT8, clipping only pays when the bulk of the values
would otherwise fall into the subnormal range (outliers ~2**15 above the bulk for
E4M3). "mse" and "kl" then return amax or close to it; "percentile" clips regardless.

Candidate thresholds for "mse" and "kl" are bin upper edges spaced 2**(1/16) apart
(geometrically), from the top of the histogram down to 1/2**`search_octaves` of it.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from mpx import calibrate
    >>> h = calibrate.observe(calibrate.init_histogram(), jax.random.normal(jax.random.key(0), (4096,)))
    >>> float(calibrate.calibrated_amax(h, "max")) == float(h.amax)
    True
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mpx import formats as formats_lib
from mpx.scales import exp2_int, floor_log2

METHODS = ("max", "percentile", "mse", "kl")
DEFAULT_BINS = 2048
_MIN_EXPONENT = -126  # an empty histogram's range: [0, 2**-126)
_STEPS_PER_OCTAVE = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Histogram:
    """A streaming histogram of |x| (a pytree; update it with `observe`).

    Attributes:
      counts: float32 (bins,), counts of |x| per bin of width 2**exponent / bins.
      exponent: int32 scalar; every |x| seen is below 2**exponent.
      amax: float32 scalar, the largest |x| seen (0 before any observation).
    """

    counts: jax.Array
    exponent: jax.Array
    amax: jax.Array

    @property
    def bins(self) -> int:
        return self.counts.shape[-1]


def init_histogram(bins: int = DEFAULT_BINS) -> Histogram:
    """An empty histogram with `bins` bins (a power of two).

    Raises:
      ValueError: if bins is not a power of two >= 2.
    """
    if not isinstance(bins, int) or bins < 2 or bins & (bins - 1):
        raise ValueError(f"bins must be a power of two >= 2; got {bins!r}")
    return Histogram(jnp.zeros((bins,), jnp.float32), jnp.int32(_MIN_EXPONENT), jnp.float32(0.0))


def _rebin(counts: jax.Array, shift: jax.Array) -> jax.Array:
    """Counts after the range grows by 2**shift: bin i moves into bin i >> shift."""
    index = jnp.right_shift(jnp.arange(counts.shape[-1], dtype=jnp.int32), jnp.minimum(shift, 31))
    return jnp.zeros_like(counts).at[index].add(counts)


def _bin_index(ax: jax.Array, exponent: jax.Array, bins: int) -> jax.Array:
    # |x| * bins / 2**exponent is exact (a power-of-two factor); floor gives the bin.
    factor = exp2_int(int(np.log2(bins)) - exponent)
    return jnp.clip(jnp.floor(ax * factor), 0, bins - 1).astype(jnp.int32)


def _range_exponent(amax: jax.Array) -> jax.Array:
    """The smallest e with amax < 2**e (floor(log2 amax) + 1), for amax > 0."""
    return floor_log2(jnp.maximum(amax, jnp.finfo(jnp.float32).tiny)) + 1


def observe(hist: Histogram, x: jax.Array) -> Histogram:
    """The histogram with every element of x added (jit-friendly, pure).

    NaN in x makes `amax` NaN (a non-finite activation is a bug to surface, not a value
    to calibrate around).

    Args:
      hist: the histogram so far.
      x: a floating array of any shape.

    Returns:
      The updated `Histogram`.
    """
    return _observe(hist, jnp.asarray(x))


@jax.jit
def _observe(hist: Histogram, x: jax.Array) -> Histogram:
    ax = jnp.abs(x.astype(jnp.float32)).ravel()
    batch_amax = jnp.max(ax) if ax.size else jnp.float32(0.0)
    amax = jnp.maximum(hist.amax, batch_amax)
    exponent = jnp.where(amax > 0, jnp.maximum(hist.exponent, _range_exponent(amax)), hist.exponent)
    counts = _rebin(hist.counts, exponent - hist.exponent)
    counts = counts.at[_bin_index(ax, exponent, hist.bins)].add(1.0)
    return Histogram(counts, exponent.astype(jnp.int32), amax)


def merge(a: Histogram, b: Histogram) -> Histogram:
    """One histogram of everything `a` and `b` saw (e.g. from two devices), exactly.

    Raises:
      ValueError: if the bin counts differ.
    """
    if a.bins != b.bins:
        raise ValueError(f"cannot merge histograms of {a.bins} and {b.bins} bins")
    exponent = jnp.maximum(a.exponent, b.exponent)
    counts = _rebin(a.counts, exponent - a.exponent) + _rebin(b.counts, exponent - b.exponent)
    return Histogram(counts, exponent, jnp.maximum(a.amax, b.amax))


def bin_width(hist: Histogram) -> jax.Array:
    """Width of each bin: 2**exponent / bins (float32)."""
    return exp2_int(hist.exponent - int(np.log2(hist.bins)))


def bin_edges(hist: Histogram) -> jax.Array:
    """(bins + 1,) bin edges, from 0 to 2**exponent."""
    return jnp.arange(hist.bins + 1, dtype=jnp.float32) * bin_width(hist)


# --------------------------------------------------------------------------- methods


def amax_percentile(hist: Histogram, percentile: float = 99.99) -> jax.Array:
    """Upper edge of the first bin where the CDF of |x| reaches `percentile` (<= amax).

    Raises:
      ValueError: for a percentile outside (0, 100].
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100]; got {percentile!r}")
    return _amax_percentile(hist, float(percentile))


@functools.partial(jax.jit, static_argnums=(1,))
def _amax_percentile(hist: Histogram, percentile: float) -> jax.Array:
    cdf = jnp.cumsum(hist.counts)
    target = cdf[-1] * (percentile / 100.0)
    index = jnp.argmax(cdf >= target)
    return jnp.minimum((index + 1).astype(jnp.float32) * bin_width(hist), hist.amax)


def _candidate_bins(bins: int, octaves: int) -> np.ndarray:
    """Static edge indices bins * 2**(-j/16), j = 0 .. 16 * octaves, deduplicated, descending."""
    steps = np.arange(octaves * _STEPS_PER_OCTAVE + 1)
    t = np.unique(np.round(bins * 2.0 ** (-steps / _STEPS_PER_OCTAVE)).astype(np.int64))
    return t[(t >= 1) & (t <= bins)][::-1]


def _top_bin(hist: Histogram) -> jax.Array:
    """Index + 1 of the bin holding amax: candidate edges beyond it clip nothing."""
    return jnp.minimum(jnp.floor(hist.amax / bin_width(hist)).astype(jnp.int32) + 1, hist.bins)


def _candidates(hist: Histogram, octaves: int) -> jax.Array:
    """Candidate upper-edge indices t (threshold t * w), laid geometrically from the bin
    holding amax down, so the first candidate clips nothing."""
    relative = _candidate_bins(hist.bins, octaves) / hist.bins  # 1, 2**-1/16, ...
    top = _top_bin(hist).astype(jnp.float32)
    return jnp.maximum(jnp.round(top * relative).astype(jnp.int32), 1)


def _ulp(v: jax.Array, fmt: formats_lib.Format) -> jax.Array:
    """Spacing of the format's grid at magnitude v (subnormal spacing below min_normal)."""
    binade = floor_log2(jnp.maximum(v, jnp.float32(fmt.min_normal)))
    return exp2_int(binade - fmt.mantissa_bits)


def _mse(hist: Histogram, threshold: jax.Array, fmt: formats_lib.Format) -> jax.Array:
    """Expected squared error of quantizing the histogram with amax = threshold."""
    w = bin_width(hist)
    centers = (jnp.arange(hist.bins, dtype=jnp.float32) + 0.5) * w
    scale = threshold / fmt.max
    clipped = jnp.square(centers - threshold)
    # Values spread over a bin round to grid points `ulp` apart: uniform error, ulp^2 / 12.
    rounding = jnp.square(_ulp(centers / scale, fmt) * scale) / 12.0
    err = jnp.where(centers > threshold, clipped, rounding)
    return jnp.sum(hist.counts * err) / jnp.maximum(jnp.sum(hist.counts), 1.0)


def amax_mse(hist: Histogram, fmt="e4m3", *, search_octaves: int = 8) -> jax.Array:
    """The candidate threshold with the least expected squared quantization error."""
    return _amax_mse(hist, formats_lib.get(fmt), int(search_octaves))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _amax_mse(hist: Histogram, fmt: formats_lib.Format, search_octaves: int) -> jax.Array:
    t = _candidates(hist, search_octaves)
    thresholds = t.astype(jnp.float32) * bin_width(hist)
    errors = jax.vmap(lambda c: _mse(hist, c, fmt))(thresholds)
    return jnp.minimum(thresholds[jnp.argmin(errors)], hist.amax)


def _grid_index(values: jax.Array, grid: np.ndarray) -> jax.Array:
    """Index of each value's nearest point of the sorted non-negative `grid`."""
    right = jnp.clip(jnp.searchsorted(jnp.asarray(grid), values), 1, len(grid) - 1)
    left_gap = values - jnp.asarray(grid)[right - 1]
    right_gap = jnp.asarray(grid)[right] - values
    return jnp.where(left_gap <= right_gap, right - 1, right)


def _kl(hist: Histogram, t: jax.Array, fmt: formats_lib.Format, grid: np.ndarray) -> jax.Array:
    """KL(P || Q) for the threshold t * w (see the module docstring).

    P folds the clipped mass into its last bin; Q is built from the unclipped bins only
    (as TensorRT does), so clipping costs divergence and rounding costs smoothing.
    """
    idx = jnp.arange(hist.bins)
    inside = idx < t
    kept = jnp.where(inside, hist.counts, 0.0)
    p = kept + jnp.where(idx == t - 1, jnp.sum(hist.counts) - jnp.sum(kept), 0.0)
    w = bin_width(hist)
    centers = (idx.astype(jnp.float32) + 0.5) * w
    group = _grid_index(centers * (fmt.max / (t.astype(jnp.float32) * w)), grid)
    group = jnp.where(inside, group, len(grid))  # bins beyond t: a group of their own
    mass = jax.ops.segment_sum(kept, group, num_segments=len(grid) + 1)
    count = jax.ops.segment_sum((p > 0).astype(jnp.float32), group, num_segments=len(grid) + 1)
    q = jnp.where(p > 0, mass[group] / jnp.maximum(count[group], 1.0), 0.0)
    p_n, q_n = p / jnp.maximum(jnp.sum(p), 1.0), q / jnp.maximum(jnp.sum(q), 1.0)
    # A bin with mass in P but none in Q (only clipped mass) costs as if Q held 1e-30.
    return jnp.sum(jnp.where(p > 0, p_n * (jnp.log(p_n) - jnp.log(jnp.maximum(q_n, 1e-30))), 0.0))


def amax_kl(hist: Histogram, fmt="e4m3", *, search_octaves: int = 8) -> jax.Array:
    """The candidate threshold with the least KL divergence between P and quantized Q."""
    return _amax_kl(hist, formats_lib.get(fmt), int(search_octaves))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _amax_kl(hist: Histogram, fmt: formats_lib.Format, search_octaves: int) -> jax.Array:
    grid = np.unique(np.abs(formats_lib.representable_values(fmt)))
    grid = grid[np.isfinite(grid)].astype(np.float32)
    t = _candidates(hist, search_octaves)
    kls = jax.vmap(lambda c: _kl(hist, c, fmt, grid))(t)
    return jnp.minimum(t[jnp.argmin(kls)].astype(jnp.float32) * bin_width(hist), hist.amax)


def calibrated_amax(hist: Histogram, method: str = "max", fmt="e4m3", **options) -> jax.Array:
    """The amax to quantize with, from a histogram, by `method` (see the module docstring).

    Args:
      hist: a `Histogram` that has observed the calibration data.
      method: "max", "percentile", "mse" or "kl".
      fmt: the element format the activations will be quantized into.
      **options: `percentile=` for "percentile"; `search_octaves=` for "mse" and "kl".

    Returns:
      float32 scalar amax (0 for an empty histogram); `mpx.compute_scale(amax, fmt)` is
      the dequantization scale.

    Raises:
      ValueError: for an unknown method or option.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; known methods: {', '.join(METHODS)}")
    allowed = {"max": (), "percentile": ("percentile",), "mse": ("search_octaves",), "kl": ("search_octaves",)}
    unknown = set(options) - set(allowed[method])
    if unknown:
        raise ValueError(f"calibration method {method!r} takes options {allowed[method] or 'none'}; "
                         f"got {sorted(unknown)}")
    if method == "max":
        return hist.amax
    if method == "percentile":
        return amax_percentile(hist, **options)
    if method == "mse":
        return amax_mse(hist, fmt, **options)
    return amax_kl(hist, fmt, **options)


__all__ = [
    "DEFAULT_BINS", "METHODS", "Histogram", "amax_kl", "amax_mse", "amax_percentile", "bin_edges", "bin_width",
    "calibrated_amax", "init_histogram", "merge", "observe",
]
