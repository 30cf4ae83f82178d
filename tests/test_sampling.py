"""Tests for serve.sampling: strategies, determinism under a seed, restricted support."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve import sampling

LOGITS = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))  # probabilities, most likely: 1, 3, 4


def _draws(sampler, logits=LOGITS, n=2000):
    keys = jax.random.split(jax.random.key(0), n)
    return np.asarray(jax.vmap(lambda k: sampler(logits, k)[0])(keys))


def test_greedy_takes_the_argmax_of_each_row():
    logits = jnp.array([[0.0, 2.0, 1.0], [5.0, -1.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(sampling.Greedy()(logits, jax.random.key(0))), [1, 0])


@pytest.mark.parametrize("sampler", [sampling.RandomSampling(0.8), sampling.TopK(2), sampling.TopP(0.6)])
def test_sampling_is_deterministic_under_a_key(sampler):
    logits = jnp.tile(LOGITS, (4, 1))
    a = sampler(logits, jax.random.key(7))
    b = sampler(logits, jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.dtype == jnp.int32 and a.shape == (4,)


def test_random_sampling_follows_the_softmax():
    n = 4000
    freq = np.bincount(_draws(sampling.RandomSampling(1.0), n=n), minlength=5) / n
    probs = np.asarray(jax.nn.softmax(LOGITS[0]))
    # Five binomial standard deviations per token.
    assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / n)), (freq, probs)


def test_top_k_restricts_the_support_to_the_k_most_likely():
    drawn = set(_draws(sampling.TopK(2)).tolist())
    assert drawn == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Sorted: 0.4 (id 1), 0.3 (id 3), 0.15 (id 4), ...: 0.4 + 0.3 reaches 0.6.
    assert set(_draws(sampling.TopP(0.6)).tolist()) == {1, 3}
    assert set(_draws(sampling.TopP(0.71)).tolist()) == {1, 3, 4}
    assert set(_draws(sampling.TopP(0.01)).tolist()) == {1}  # always keeps the top token


def test_low_temperature_concentrates_on_the_argmax():
    assert set(_draws(sampling.RandomSampling(0.01)).tolist()) == {1}


def test_make_maps_options_to_strategies():
    assert sampling.make() == sampling.Greedy()
    assert sampling.make(0.7) == sampling.RandomSampling(0.7)
    assert sampling.make(0.7, top_k=5) == sampling.TopK(5, 0.7)
    assert sampling.make(0.7, top_p=0.9) == sampling.TopP(0.9, 0.7)


@pytest.mark.parametrize("call, match", [
    (lambda: sampling.make(-1.0), "temperature must be >= 0"),
    (lambda: sampling.make(1.0, top_k=3, top_p=0.5), "not both"),
    (lambda: sampling.make(0.0, top_k=3), "needs a temperature > 0"),
    (lambda: sampling.TopK(0), "k >= 1"),
    (lambda: sampling.TopP(1.5), r"p in \(0, 1\]"),
    (lambda: sampling.RandomSampling(0.0), "temperature must be > 0"),
])
def test_bad_options_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_scale_logits():
    x = jnp.array([1.0, -2.0])
    np.testing.assert_array_equal(np.asarray(sampling.scale_logits(x, 1.0)), [1.0, -2.0])
    np.testing.assert_array_equal(np.asarray(sampling.scale_logits(x, 2.0)), [2.0, -4.0])
