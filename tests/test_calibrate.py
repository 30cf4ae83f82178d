"""Tests for mpx.calibrate: streaming histograms and the max/percentile/MSE/KL methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpx
from mpx import calibrate as C


def _gaussian_with_outliers(outlier: float, n: int = 50_000, count: int = 20) -> jax.Array:
    x = jax.random.normal(jax.random.key(0), (n,))
    return x.at[:count].set(outlier * jnp.tile(jnp.array([1.0, -1.0, 0.9, 0.8]), count // 4))


def _quantization_mse(x: jax.Array, amax, fmt: str) -> float:
    q = mpx.quantize(x, fmt, scale=mpx.compute_scale(amax, fmt))
    return float(jnp.mean(jnp.square(mpx.dequantize(q) - x)))


def test_histogram_counts_every_element_and_tracks_amax():
    x = jnp.array([0.0, -0.5, 0.25, 3.0, -7.5])
    h = C.observe(C.init_histogram(64), x)
    assert float(h.amax) == 7.5
    assert int(h.exponent) == 3  # 7.5 < 2**3
    assert float(jnp.sum(h.counts)) == x.size
    # 3.0 lies in bin floor(3.0 / (8 / 64)) = 24.
    assert float(h.counts[24]) == 1.0 and float(h.counts[0]) == 1.0


def test_streaming_equals_one_pass_and_merge_is_exact():
    x = _gaussian_with_outliers(40.0)
    small, large = x[:1000] * 0.01, x[1000:]
    one_pass = C.observe(C.init_histogram(), jnp.concatenate([small, large]))
    streamed = C.observe(C.observe(C.init_histogram(), small), large)  # the range grows by 2**d
    merged = C.merge(C.observe(C.init_histogram(), small), C.observe(C.init_histogram(), large))
    for h in (streamed, merged):
        np.testing.assert_array_equal(np.asarray(h.counts), np.asarray(one_pass.counts))
        assert int(h.exponent) == int(one_pass.exponent) and float(h.amax) == float(one_pass.amax)


def test_observe_under_jit_equals_eager():
    x = _gaussian_with_outliers(8.0)
    eager = C.observe(C.init_histogram(), x)
    jitted = jax.jit(C.observe)(C.init_histogram(), x)
    np.testing.assert_array_equal(np.asarray(jitted.counts), np.asarray(eager.counts))
    amaxes = jax.jit(lambda h: [C.calibrated_amax(h, m) for m in C.METHODS])(eager)
    for method, value in zip(C.METHODS, amaxes):
        assert float(value) == float(C.calibrated_amax(eager, method)), method


def test_max_is_the_exact_amax():
    x = _gaussian_with_outliers(40.0)
    h = C.observe(C.init_histogram(), x)
    assert float(C.calibrated_amax(h, "max")) == float(jnp.max(jnp.abs(x)))


def test_percentile_is_the_upper_edge_of_the_bin_reaching_it():
    # 1024 values at the centres of the odd bins of [0, 2): the 99th percentile is the
    # 1014th value, (1013 + 0.5) / 512, in bin 2027 of width 2**-10: upper edge 2028 / 1024.
    x = (jnp.arange(1024, dtype=jnp.float32) + 0.5) / 512.0
    h = C.observe(C.init_histogram(2048), x)
    assert float(C.calibrated_amax(h, "percentile", percentile=99.0)) == 2028 / 1024
    assert float(C.calibrated_amax(h, "percentile", percentile=100.0)) == float(h.amax)


def test_kl_keeps_the_range_when_every_value_is_on_the_grid():
    # Powers of two up to 8 land on distinct E4M3 values at scale 8 / 448: Q = P, KL = 0,
    # and any clipping moves mass into the last bin (KL > 0), so the answer is amax.
    x = jnp.array([2.0**e for e in range(-3, 4)] * 10)
    h = C.observe(C.init_histogram(), x)
    assert float(C.calibrated_amax(h, "kl")) == 8.0


def test_small_formats_clip_outliers_and_mse_lowers_the_error():
    # E2M1 (FP4) has 15 values: with outliers at 8 sigma the bulk gets one or two levels
    # unless the range is clipped.
    x = _gaussian_with_outliers(8.0)
    h = C.observe(C.init_histogram(), x)
    amax = float(h.amax)
    chosen = {m: float(C.calibrated_amax(h, m, "e2m1")) for m in ("mse", "kl")}
    chosen["percentile"] = float(C.calibrated_amax(h, "percentile", percentile=99.9))  # 0.04% are outliers
    assert all(value < amax for value in chosen.values()), chosen
    assert _quantization_mse(x, chosen["mse"], "e2m1") < _quantization_mse(x, amax, "e2m1")


def test_e4m3_never_clips_by_mse_in_its_normal_range():
    # FP8's relative rounding error is the same at every scale in the normal range, so
    # clipping moderate outliers only adds clipping error: MSE keeps amax.
    x = _gaussian_with_outliers(40.0)
    h = C.observe(C.init_histogram(), x)
    assert float(C.calibrated_amax(h, "mse", "e4m3")) == float(h.amax)
    clipped = C.calibrated_amax(h, "percentile", percentile=99.9)
    assert float(clipped) < float(h.amax)
    assert _quantization_mse(x, h.amax, "e4m3") < _quantization_mse(x, clipped, "e4m3")


def test_empty_histogram_gives_zero_for_every_method():
    h = C.init_histogram()
    for method in C.METHODS:
        assert float(C.calibrated_amax(h, method)) == 0.0, method


def test_nan_surfaces_in_amax():
    h = C.observe(C.init_histogram(), jnp.array([1.0, jnp.nan]))
    assert bool(jnp.isnan(h.amax))


@pytest.mark.parametrize("call, match", [
    (lambda: C.init_histogram(1000), "power of two"),
    (lambda: C.calibrated_amax(C.init_histogram(), "entropy"), "unknown calibration method 'entropy'"),
    (lambda: C.calibrated_amax(C.init_histogram(), "max", percentile=99.0), "takes options"),
    (lambda: C.amax_percentile(C.init_histogram(), 0.0), r"percentile must be in \(0, 100\]"),
    (lambda: C.merge(C.init_histogram(64), C.init_histogram(128)), "64 and 128 bins"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
