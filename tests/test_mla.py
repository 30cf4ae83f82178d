"""Multi-head latent attention: the absorbed latent-cache form against the expanded form,
the cache's size, YaRN and interleaved RoPE."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpx
from models import config as config_lib
from models import rope as rope_lib
from models import transformer
from models.config import RopeScaling
from serve import kv_cache

DS = config_lib.preset("deepseek_v3_tiny")


def _decode(model, variables, tokens, kind, prompt=8):
    """Logits of `tokens` by prefill of `prompt` tokens then one token per step, with a cache."""
    b, t = tokens.shape
    cache = kv_cache.init(model.config, b, kind, length=32)
    logits, aux = model.apply(variables, tokens[:, :prompt], cache=cache)
    steps = [logits]
    for i in range(prompt, t):
        logits, aux = model.apply(variables, tokens[:, i:i + 1], jnp.full((b, 1), i), aux["cache"])
        steps.append(logits)
    return jnp.concatenate(steps, axis=1), aux["cache"]


@pytest.mark.parametrize("q_lora", [96, None])
def test_absorbed_decode_over_the_latent_cache_equals_the_expanded_form(q_lora):
    cfg = dataclasses.replace(DS, q_lora_rank=q_lora)
    model = transformer.Transformer(cfg, mpx.policy.preset("fp32"))
    tokens = jax.random.randint(jax.random.key(1), (2, 14), 0, cfg.vocab_size)
    variables = model.init(jax.random.key(0), tokens)
    full, _ = model.apply(variables, tokens)
    cached, cache = _decode(model, variables, tokens, "fp32")
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4 * float(jnp.abs(full).max()))
    assert set(cache[0]) == {"latent", "k_rope"}
    assert cache[0]["latent"].shape == (2, 32, cfg.kv_lora_rank) and cache[0]["k_rope"].shape == (2, 32, 16)


def test_fp8_latent_cache_is_close_but_not_equal():
    dense = dataclasses.replace(DS, n_experts=0, first_k_dense=0)  # no routing to flip
    model = transformer.Transformer(dense, mpx.policy.preset("fp32"))
    tokens = jax.random.randint(jax.random.key(2), (1, 12), 0, DS.vocab_size)
    variables = model.init(jax.random.key(0), tokens)
    f32, _ = _decode(model, variables, tokens, "fp32")
    fp8, cache = _decode(model, variables, tokens, "fp8")
    err = float(mpx.metrics.relative_error(fp8, f32))
    # 4.8% measured: without embed_scale this random model's residual stream is small, so
    # the attention output (and its cache's rounding) dominates the logits.
    assert 1e-4 < err < 1e-1
    assert isinstance(cache[1]["latent"], mpx.ScaledArray)


def test_latent_cache_bytes_per_token_against_a_gqa_cache_of_the_same_heads():
    gqa = dataclasses.replace(DS, kv_lora_rank=None, q_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0,
                              v_head_dim=0, rope_scaling=RopeScaling(), head_dim_override=48)
    latent = kv_cache.bytes_per_token(DS, "bf16")
    assert latent == DS.n_layers * (64 + 16) * 2
    assert kv_cache.bytes_per_token(gqa, "bf16") == DS.n_layers * 2 * 4 * 48 * 2
    assert kv_cache.bytes_per_token(DS, "fp8") == DS.n_layers * (64 * (1 + 4 / 64) + 16 * (1 + 4 / 16))
    assert kv_cache.nbytes(kv_cache.init(DS, 1, "bf16", length=10)) == 10 * latent


def test_yarn_frequencies_follow_the_paper():
    s = RopeScaling("yarn", factor=4.0, original_max_len=16, beta_fast=32.0, beta_slow=1.0)
    dim, theta = 16, 10000.0
    got = np.asarray(rope_lib.rope_frequencies(dim, theta, s))
    base = theta ** (-np.arange(0, dim, 2) / dim)
    corr = lambda r: dim * math.log(16 / (r * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
    low, high = max(math.floor(corr(32.0)), 0), min(math.ceil(corr(1.0)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0, 1)
    np.testing.assert_allclose(got, base / 4 * ramp + base * (1 - ramp), rtol=1e-6)
    assert got[0] == pytest.approx(base[0]) and got[-1] == pytest.approx(base[-1] / 4)  # fast kept, slow divided
    # The temperature: m(a) = 0.1 a ln(factor) + 1.
    t = RopeScaling("yarn", factor=40.0, mscale=1.0, mscale_all_dim=0.5)
    m = lambda a: 0.1 * a * math.log(40) + 1  # noqa: E731
    assert t.rotary_gain == pytest.approx(m(1.0) / m(0.5))
    cfg = dataclasses.replace(DS, rope_scaling=t)
    assert cfg.attn_scale == pytest.approx(m(0.5) ** 2 / math.sqrt(48))


def test_interleaved_rope_rotates_adjacent_pairs():
    x = jax.random.normal(jax.random.key(3), (1, 5, 2, 8))
    pos = jnp.arange(5)[None]
    got = rope_lib.rope(x, pos, 100.0, interleave=True)
    # Reference: rotate (x[2i], x[2i+1]) by angle pos * f_i, then list the evens' results first.
    freqs = 100.0 ** (-np.arange(4) / 4)
    ang = np.arange(5)[:, None] * freqs
    a, b = np.asarray(x)[0, ..., 0::2], np.asarray(x)[0, ..., 1::2]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    want = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
