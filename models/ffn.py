"""The dense gated FFN of a block (SwiGLU or GeGLU) and the init of residual-writing layers."""

from __future__ import annotations

import flax.linen as nn
import jax

from mpx import nn as mnn
from mpx.policy import Policy

Array = jax.Array


def residual_init(n_layers: int):
    """Init of projections that write into the residual stream (o_proj, FFN down).

    GPT-2's scaling: variance 1 / (2 * n_layers) of fan-in init, so the residual stream's
    variance does not grow with depth at initialization.
    """
    return nn.initializers.variance_scaling(1.0 / (2 * n_layers), "fan_in", "truncated_normal")


def swiglu_residual_format(down_recipe) -> str | None:
    """The format SwiGLU keeps its inputs in for the backward pass, given its down
    projection's recipe: the recipe's FP8 format when it asks for it
    (`DeepSeekV3.swiglu_residuals`, DeepSeek-V3 report 3.3), else None (gate and up as
    the projections return them)."""
    return down_recipe.fwd_format if down_recipe is not None and down_recipe.swiglu_residuals else None


def swiglu_residuals(module: nn.Module, policy: Policy | None) -> str | None:
    """`swiglu_residual_format` of the down projection under `module`."""
    return swiglu_residual_format(mnn.resolve_precision(module, policy, "down", role="linear").recipe)


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)), act silu (SwiGLU) or gelu_tanh (GeGLU); the product is
    formed in f32, and under FP8 the down projection recomputes it in the backward pass
    whatever the activation (`mpx.nn.SwiGLUDense`)."""

    d_ff: int
    n_layers: int = 1
    policy: Policy | None = None
    activation: str = "silu"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gate = mnn.Dense(self.d_ff, policy=self.policy, name="gate")(x)
        up = mnn.Dense(self.d_ff, policy=self.policy, name="up")(x)
        return mnn.SwiGLUDense(x.shape[-1], policy=self.policy, name="down", kernel_init=residual_init(self.n_layers),
                               residual_format=swiglu_residuals(self, self.policy), activation=self.activation)(gate, up)
