"""SwiGLU, GeGLU and RMSNorm with backward passes that keep their inputs, not f32 intermediates.

`swiglu(gate, up) = silu(gate) * up`, formed in f32 from gate and up as the FFN's
projections return them (bf16 under the bf16 and FP8 presets). Autodiff of that
expression keeps five f32 tensors of the FFN's width per layer (both upcasts, the
sigmoid, silu's output and the product's other factor), more than the rest of the block
(`benchmarks.train_step`). This custom VJP keeps gate and
up as they came (2 bytes per element each under bf16) and recomputes the sigmoid in the
backward pass, where XLA fuses it with the gradient into one elementwise pass:

    s = sigmoid(g)      d_up = d * g * s      d_gate = d * up * s * (1 + g * (1 - s))

Values and gradients are the same f32 arithmetic autodiff would do, up to the order of
the operations in d_gate (a few f32 ulps).

`glu(gate, up, activation=...)` is the same operator over another activation of the
gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU with the tanh-approximated GELU, Gemma's
`gelu_pytorch_tanh`), whose derivative the backward pass recomputes the same way.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp

from mpx.config import check_choice
from mpx.ordering import after, kept
from mpx.scaled import Blocks, ScaledArray, dequantize, quantize
from mpx.sharding import explicit

__all__ = [
    "SWIGLU_TILE", "ACTIVATIONS", "activate", "swiglu", "glu", "swiglu_inputs", "swiglu_grads", "rms_norm"
]

Array = jax.Array
_F32 = jnp.float32
# Tile width of SwiGLU inputs kept in FP8 (DeepSeek-V3's activation tiles).
SWIGLU_TILE = 128


_GELU_C = math.sqrt(2.0 / math.pi)
ACTIVATIONS = ("silu", "gelu_tanh")


def activate(activation: str, g: Array) -> Array:
    """The gated FFN's activation of f32 `g`: silu, or the tanh-approximated GELU."""
    if activation == "silu":
        return jax.nn.silu(g)
    return jax.nn.gelu(g, approximate=True)


def _activation_grad(activation: str, g: Array) -> tuple[Array, Array]:
    """(act(g), act'(g)) of f32 `g`, from expressions other than the forward's, so XLA
    cannot merge the two and keep the forward's f32 intermediates alive until here."""
    if activation == "silu":  # sigmoid as 0.5 + 0.5 tanh(g / 2)
        s = 0.5 + 0.5 * jnp.tanh(0.5 * g)
        return g * s, s * (1.0 + g * (1.0 - s))
    t = jnp.tanh(_GELU_C * (g + 0.044715 * g * g * g))
    return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * g * g)


def swiglu(gate: Array, up: Array, residual_format: str | None = None) -> Array:
    """silu(gate) * up in f32: `glu` with the "silu" activation."""
    return glu(gate, up, residual_format, "silu")


@explicit.auto_inside(explicit.like_first)
def glu(gate: Array, up: Array, residual_format: str | None = None, activation: str = "silu") -> Array:
    """act(gate) * up in f32, from gate and up of one shape (any float dtype).

    Args:
      gate, up: the FFN's two projections.
      activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
      residual_format: None keeps gate and up for the backward pass as they came; an
        FP8 format name ("e4m3") keeps them quantized in 1x128 tiles along the last
        axis, one f32 scale per tile (DeepSeek-V3 report, 3.3: "we cache the inputs of
        the SwiGLU operator ... in FP8 with our fine-grained quantization method"). The
        forward value is the same either way; the gradients then use the dequantized
        inputs (E4M3: up to 2**-4 relative error per element).

    Returns:
      f32 array of their shape. Gradients come back in gate's and up's dtypes.

    Raises:
      ValueError: an unknown activation.
    """
    check_choice("activation", activation, ACTIVATIONS)
    return _glu(residual_format, (jnp.dtype(gate.dtype), jnp.dtype(up.dtype)), activation, gate, up)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _glu(residual_format, dtypes, activation: str, gate: Array, up: Array) -> Array:
    return activate(activation, gate.astype(_F32)) * up.astype(_F32)


def _glu_fwd(residual_format, dtypes, activation: str, gate: Array, up: Array):
    out = _glu(residual_format, dtypes, activation, gate, up)
    if residual_format is None:
        return out, (gate, up)
    return out, (_tiles(gate, residual_format), _tiles(up, residual_format))


def _tiles(x: Array, fmt: str) -> ScaledArray:
    """x in `fmt`, 1 x SWIGLU_TILE tiles, the data `kept` in a buffer of its own."""
    q = quantize(x, fmt, Blocks((SWIGLU_TILE,)))
    return dataclasses.replace(q, data=kept(q.data))


def _glu_bwd(residual_format, dtypes, activation: str, residuals, d_out: Array):
    return swiglu_grads(*swiglu_inputs(residual_format, residuals, d_out), d_out, dtypes, activation)


def swiglu_inputs(residual_format: str | None, residuals, when: Array) -> tuple[Array, Array]:
    """(gate, up) in f32 from SwiGLU's backward residuals (as kept, or dequantized from
    their FP8 tiles), computed once `when` (the incoming gradient) is here: the backward
    pass recomputes them when it reaches this layer, not at its start."""
    if residual_format is None:
        gate, up = residuals
        return after(gate, when).astype(_F32), up.astype(_F32)
    # The FP8 data waits, not the dequantized values: XLA may materialize its f32 upcast
    # for several consumers, and would then compute it at the start of the backward pass.
    return tuple(dequantize(dataclasses.replace(q, data=after(q.data, when))).astype(_F32) for q in residuals)


def swiglu_grads(g: Array, u: Array, d_out: Array, dtypes, activation: str = "silu") -> tuple[Array, Array]:
    """(d_gate, d_up) in `dtypes` (gate's, up's) of act(g) * u for f32 inputs g, u."""
    d = d_out.astype(_F32)
    act, d_act = _activation_grad(activation, g)
    return (d * u * d_act).astype(dtypes[0]), (d * act).astype(dtypes[1])


_glu.defvjp(_glu_fwd, _glu_bwd)


@explicit.auto_inside(explicit.like_first)
def rms_norm(x: Array, scale: Array, epsilon: float) -> Array:
    """x / sqrt(mean(x^2) + epsilon) * scale over the last axis, in f32.

    The same f32 arithmetic as the plain expression, whose autodiff keeps the normalized
    x (an f32 tensor of x's shape) beside x itself. This VJP keeps x and the (..., 1)
    inverse RMS and recomputes the normalized x in the backward pass:

        n = x r      d_scale = sum(g n)      dx = r (g s - n mean(g s n))

    Args:
      x: (..., D) any float dtype; scale: (D,); epsilon: a Python float.

    Returns:
      f32 array of x's shape. Gradients come back in x's and scale's dtypes.
    """
    return _rms_norm(x, scale, epsilon)


@jax.custom_vjp
def _rms_norm(x: Array, scale: Array, epsilon: float) -> Array:
    return _rms_norm_fwd(x, scale, epsilon)[0]


def _inverse_rms(x32: Array, epsilon: float) -> Array:
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + epsilon)


def _rms_norm_fwd(x: Array, scale: Array, epsilon: float):
    x32 = x.astype(_F32)
    inv_rms = _inverse_rms(x32, epsilon)
    return x32 * inv_rms * scale.astype(_F32), (x, scale, inv_rms)


def _rms_norm_bwd(residuals, d_out: Array):
    x, scale, inv_rms = residuals
    inv_rms = after(inv_rms, d_out)  # recompute when the backward pass reaches this layer
    scale = after(scale, d_out)  # or XLA broadcasts every layer's scale at the start
    normed = x.astype(_F32) * inv_rms
    g_scaled = d_out.astype(_F32) * scale.astype(_F32)
    d_x = inv_rms * (g_scaled - normed * jnp.mean(g_scaled * normed, axis=-1, keepdims=True))
    d_scale = jnp.sum((d_out.astype(_F32) * normed).reshape(-1, x.shape[-1]), axis=0)
    return d_x.astype(x.dtype), d_scale.astype(scale.dtype), None


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)
