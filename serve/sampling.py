"""Sampling strategies: tiny frozen dataclasses, each `(logits (B, V), key) -> ids (B,)`.

    Greedy()                          argmax
    RandomSampling(temperature)       softmax(logits / T)
    TopK(k, temperature)              only the k most likely tokens
    TopP(p, temperature)              the smallest set whose probability reaches p

They are hashable, so a jitted decode step takes one as a static argument (one compile
per strategy). `logit_scale` (see `scale_logits`) multiplies logits before any strategy:
temperature scaling at the output layer, to offset the logit compression
of an FP8 model (serve/quantize.py fits it).

Example:
    >>> import jax, jax.numpy as jnp
    >>> logits = jnp.array([[0.0, 3.0, 1.0]])
    >>> int(Greedy()(logits, jax.random.key(0))[0])
    1
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = -jnp.inf


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use Greedy() for temperature 0); got {temperature!r}")


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token (deterministic; the key is unused)."""

    def __call__(self, logits: Array, key: Array) -> Array:
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class RandomSampling:
    """A sample from softmax(logits / temperature)."""

    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)

    def __call__(self, logits: Array, key: Array) -> Array:
        return jax.random.categorical(key, logits.astype(jnp.float32) / self.temperature).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
    """A sample among the k most likely tokens (exactly k candidates, ties by index)."""

    k: int
    temperature: float = 1.0

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"top-k needs an int k >= 1; got {self.k!r}")
        _check_temperature(self.temperature)

    def __call__(self, logits: Array, key: Array) -> Array:
        k = min(self.k, logits.shape[-1])
        top, index = jax.lax.top_k(logits.astype(jnp.float32), k)  # (B, k)
        choice = jax.random.categorical(key, top / self.temperature)  # (B,)
        return jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the most likely tokens whose probabilities first reach p."""

    p: float
    temperature: float = 1.0

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise ValueError(f"top-p needs p in (0, 1]; got {self.p!r}")
        _check_temperature(self.temperature)

    def __call__(self, logits: Array, key: Array) -> Array:
        scaled = logits.astype(jnp.float32) / self.temperature
        order = jnp.argsort(-scaled, axis=-1)
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = before < self.p  # always keeps the most likely token
        choice = jax.random.categorical(key, jnp.where(keep, ranked, _NEG))
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


Sampler = Greedy | RandomSampling | TopK | TopP


def make(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> Sampler:
    """The strategy command-line options describe.

    temperature 0 means greedy (top_k / top_p must then be unset); top_k and top_p are
    exclusive.

    Raises:
      ValueError: negative temperature, both top_k and top_p, or top_k/top_p with
        temperature 0, naming the values.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if top_k is not None and top_p is not None:
        raise ValueError(f"give top-k or top-p, not both; got top_k={top_k}, top_p={top_p}")
    if temperature == 0:
        if top_k is not None or top_p is not None:
            raise ValueError("top-k / top-p sampling needs a temperature > 0 (temperature 0 is greedy)")
        return Greedy()
    if top_k is not None:
        return TopK(top_k, temperature)
    if top_p is not None:
        return TopP(top_p, temperature)
    return RandomSampling(temperature)


def scale_logits(logits: Array, logit_scale: float) -> Array:
    """logits * logit_scale in f32 (1.0 leaves them unchanged)."""
    logits = logits.astype(jnp.float32)
    return logits if logit_scale == 1.0 else logits * jnp.float32(logit_scale)
