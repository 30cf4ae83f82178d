"""Rotary position embedding: frequencies (plain, linear, Llama 3.1 and YaRN context
extension) and the rotation in the "rotate half" or the interleaved channel layout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.config import RopeScaling

Array = jax.Array


def _yarn(freqs: Array, dim: int, theta: float, s: RopeScaling) -> Array:
    """YaRN (arXiv:2309.00071, as transformers and DeepSeek compute it): frequencies that
    turn more than beta_fast times over the pre-training context are kept, those that turn
    less than beta_slow times are divided by the factor, a linear ramp in between."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / max(high - low, 1e-3), 0, 1)
    return freqs / s.factor * ramp + freqs * (1 - ramp)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> Array:
    """RoPE's angular frequencies (K/2,) f32: theta^(-2i/K), then context-extended.

    "linear" divides every frequency by the factor; "llama3" (Llama 3.1) divides the
    low frequencies (wavelength above original_max_len / low_freq_factor), keeps the
    high ones (below original_max_len / high_freq_factor) and blends in between; "yarn"
    ramps between them by rotations over original_max_len (`_yarn`).
    """
    half = head_dim // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (K/2,)
    if scaling.kind == "linear":
        return freqs / scaling.factor
    if scaling.kind == "yarn":
        return _yarn(freqs, head_dim, theta, scaling)
    if scaling.kind == "llama3":
        wavelen = 2 * math.pi / freqs
        low_wavelen = scaling.original_max_len / scaling.low_freq_factor
        high_wavelen = scaling.original_max_len / scaling.high_freq_factor
        scaled = jnp.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
        smooth = (scaling.original_max_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, blended, scaled)
    return freqs


def rope(x: Array, positions: Array, theta: float, scaling: RopeScaling = RopeScaling(),
         interleave: bool = False) -> Array:
    """Rotary position embedding of x (B, T, H, K) at integer positions (B, T), in f32.

    Pairs channel i with channel i + K/2 (the "rotate half" layout of Hugging Face's
    Llama-family checkpoints, whose q/k weights therefore load without permutation).
    With `interleave` (DeepSeek's layout) it pairs channels 2i and 2i + 1 and returns the
    rotated pairs in the rotate-half order, as transformers does; queries and keys both
    get that order, so their dot products are those of the interleaved rotation. YaRN
    multiplies cos and sin by `scaling.rotary_gain`.
    """
    freqs = rope_frequencies(x.shape[-1], theta, scaling)  # (K/2,)
    angles = positions[..., None].astype(jnp.float32) * freqs  # (B, T, K/2)
    gain = scaling.rotary_gain
    sin, cos = (gain * f(angles)[:, :, None, :] for f in (jnp.sin, jnp.cos))
    dtype, x = x.dtype, x.astype(jnp.float32)
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(dtype)
