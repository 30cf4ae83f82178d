"""Gated activations whose backward pass keeps their low-precision inputs, not f32 copies.

`swiglu(gate, up) = silu(gate) * up`, formed in f32 from gate and up as the FFN's
projections return them (bf16 under the bf16 and FP8 presets). Autodiff of that
expression keeps five f32 tensors of the FFN's width per layer (both upcasts, the
sigmoid, silu's output and the product's other factor): at 16 x 256 tokens and a width
of 768, 63 MB per layer, more than the rest of the block. This custom VJP keeps gate and
up as they came (2 bytes per element each under bf16) and recomputes the sigmoid in the
backward pass, where XLA fuses it with the gradient into one elementwise pass:

    s = sigmoid(g)      d_up = d * g * s      d_gate = d * up * s * (1 + g * (1 - s))

Values and gradients are the same f32 arithmetic autodiff would do, up to the order of
the operations in d_gate (a few f32 ulps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpx.ordering import after

Array = jax.Array
_F32 = jnp.float32


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) * up in f32, from gate and up of one shape (any float dtype).

    Returns:
      f32 array of their shape. Gradients come back in gate's and up's dtypes.
    """
    return jax.nn.silu(gate.astype(_F32)) * up.astype(_F32)


def _swiglu_fwd(gate: Array, up: Array):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_out: Array):
    gate, up = residuals
    gate = after(gate, d_out)  # recompute when the backward pass reaches this layer
    g, u, d = gate.astype(_F32), up.astype(_F32), d_out.astype(_F32)
    # sigmoid as 0.5 + 0.5 tanh(g / 2): a different expression from the forward's, so XLA
    # cannot merge the two and keep the forward's f32 sigmoid alive until here.
    s = 0.5 + 0.5 * jnp.tanh(0.5 * g)
    d_gate = d * u * s * (1.0 + g * (1.0 - s))
    return d_gate.astype(gate.dtype), (d * g * s).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
