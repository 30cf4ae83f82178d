"""Tests for mpx.metrics against float64 numpy references.

The metrics reduce in float32, so each tolerance is a float32 eps times the number of
summed terms (the worst-case growth of a float32 sum's rounding error).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpx import metrics

EPS32 = float(np.finfo(np.float32).eps)
N = 512
TOL = N * EPS32


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((8, N // 8)).astype(np.float32)
    approx = (reference + 0.05 * rng.standard_normal(reference.shape)).astype(np.float32)
    return approx, reference


def _f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


def test_cosine_similarity(pair):
    a, b = _f64(*pair)
    want = np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    np.testing.assert_allclose(float(metrics.cosine_similarity(*pair)), want, rtol=TOL)


def test_relative_error(pair):
    a, b = _f64(*pair)
    want = np.linalg.norm(a - b) / np.linalg.norm(b)
    np.testing.assert_allclose(float(metrics.relative_error(*pair)), want, rtol=TOL)


def test_sqnr_db(pair):
    a, b = _f64(*pair)
    want = 10 * np.log10(np.sum(b**2) / np.sum((a - b) ** 2))
    # An absolute tolerance in dB: 10 log10(1 + r) ~ 4.3 r for a relative error r.
    np.testing.assert_allclose(float(metrics.sqnr_db(*pair)), want, atol=10 * TOL)


def test_max_error_over_amax(pair):
    a, b = _f64(*pair)
    want = np.max(np.abs(a - b)) / np.max(np.abs(b))
    np.testing.assert_allclose(float(metrics.max_error_over_amax(*pair)), want, rtol=4 * EPS32)


def _np_log_softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


@pytest.mark.parametrize("axis", [-1, 0])
def test_kl_divergence(pair, axis):
    approx, reference = pair
    a, b = _f64(approx * 3, reference * 3)  # logits with some spread
    log_p, log_q = _np_log_softmax(b, axis), _np_log_softmax(a, axis)
    want = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=axis))
    got = float(metrics.kl_divergence(approx * 3, reference * 3, axis=axis))
    # KL cancels: each log-probability carries ~eps * |log p| absolute error.
    atol = 8 * EPS32 * (np.abs(log_p).max() + np.abs(log_q).max())
    np.testing.assert_allclose(got, want, rtol=TOL, atol=atol)
    assert got > 0


def test_top1_agreement():
    reference = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]], np.float32)
    approx = np.array([[0.2, 0.8, 0.0], [0.0, 1.0, 2.0], [0.0, 0.0, 4.0], [1.0, 2.5, 2.0]], np.float32)
    assert float(metrics.top1_agreement(approx, reference)) == 0.75
    want = np.mean(np.argmax(approx, axis=0) == np.argmax(reference, axis=0))
    assert float(metrics.top1_agreement(approx, reference, axis=0)) == pytest.approx(want, rel=EPS32)


def test_identical_inputs_are_perfect(pair):
    _, reference = pair
    assert float(metrics.cosine_similarity(reference, reference)) == pytest.approx(1.0, abs=TOL)
    assert float(metrics.relative_error(reference, reference)) == 0.0
    assert float(metrics.sqnr_db(reference, reference)) == np.inf
    assert float(metrics.max_error_over_amax(reference, reference)) == 0.0
    assert float(metrics.kl_divergence(reference, reference)) == pytest.approx(0.0, abs=TOL)
    assert float(metrics.top1_agreement(reference, reference)) == 1.0


def test_zero_reference_never_gives_nan():
    zeros, ones = np.zeros(16, np.float32), np.ones(16, np.float32)
    assert float(metrics.relative_error(zeros, zeros)) == 0.0  # 0 / 0 guarded
    assert float(metrics.max_error_over_amax(zeros, zeros)) == 0.0
    assert float(metrics.cosine_similarity(ones, zeros)) == 0.0
    assert not np.isnan(float(metrics.relative_error(ones, zeros)))  # huge, not NaN
    assert not np.isnan(float(metrics.max_error_over_amax(ones, zeros)))


def test_low_precision_inputs_are_upcast(pair):
    approx, reference = pair
    got = float(metrics.relative_error(jnp.asarray(approx, jnp.bfloat16), reference))
    a, b = _f64(np.asarray(jnp.asarray(approx, jnp.bfloat16).astype(jnp.float32)), reference)
    np.testing.assert_allclose(got, np.linalg.norm(a - b) / np.linalg.norm(b), rtol=TOL)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        metrics.sqnr_db(jnp.ones(3), jnp.ones(4))


def test_metrics_run_under_jit(pair):
    fns = [metrics.cosine_similarity, metrics.relative_error, metrics.sqnr_db,
           metrics.max_error_over_amax, metrics.kl_divergence, metrics.top1_agreement]
    for fn in fns:
        eager, jitted = float(fn(*pair)), float(jax.jit(fn)(*pair))
        np.testing.assert_allclose(jitted, eager, rtol=TOL)
        assert jax.jit(fn)(*pair).dtype == jnp.float32


def test_summary_has_every_elementwise_metric(pair):
    summary = metrics.summary(*pair)
    assert set(summary) == {"cosine", "relative_error", "sqnr_db", "max_error_over_amax"}
    assert all(isinstance(v, float) for v in summary.values())
    assert summary["sqnr_db"] == pytest.approx(float(metrics.sqnr_db(*pair)))
