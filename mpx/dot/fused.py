"""An FFN's down projection fused with the SwiGLU (or GeGLU) that feeds it.

`swiglu_dot_general(gate, up, w, ...)` is `dot_general(swiglu(gate, up), w, ...)` whose
backward pass recomputes `swiglu(gate, up)` from what SwiGLU keeps anyway (gate and up,
or their FP8 1x128 tiles) instead of keeping a quantized copy of the product: DeepSeek-V3
report, 3.3, "we cache the inputs of the SwiGLU operator and recompute its output in the
backward pass". One tensor of the FFN's width per layer fewer (1 byte per element under
FP8 residuals).

The forward value is `dot_general`'s, bit for bit. In the backward pass, wgrad quantizes
the recomputed product once in its 128x1 tiles (instead of requantizing the forward's
1x128 FP8 copy, which rounds twice); with FP8 SwiGLU tiles the recomputed product uses
the dequantized gate and up, as SwiGLU's own gradient does. wgrad runs first, then dgrad
and SwiGLU's gradient, each from its own recomputed gate and up (`mpx.ordering.after`),
so the recomputed product and dgrad's f32 result are never alive together
(`benchmarks.train_step` measures the peak).

Fused for `DeepSeekV3` with `fp8_residuals` and `recompute_swiglu` (its defaults); any
other recipe, or none, is the plain composition of `mpx.activations.swiglu` and
`dot_general`. `activation="gelu_tanh"` does the same for GeGLU (`mpx.activations.glu`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mpx import activations
from mpx import recipes as recipes_lib
from mpx.dot import backends
from mpx.dot.general import MatmulConfig, quantized_forward, setup_operands, dot_general, grads
from mpx.sharding import explicit
from mpx.target import Target
from mpx.target import current as current_target
from mpx.config import check_choice
from mpx.dot.spec import IMPLS, plan, resolve_impl, to_canonical, transposed

__all__ = ["recomputes_swiglu", "swiglu_dot_general"]


@dataclasses.dataclass(frozen=True)
class _FusedConfig:
    dot: MatmulConfig
    residual_format: str | None  # SwiGLU's residuals: None (as they came) or an FP8 format
    dtypes: tuple  # gate's and up's dtypes (their gradients')
    activation: str = "silu"  # of the gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)


def recomputes_swiglu(recipe) -> bool:
    """Whether `swiglu_dot_general` under `recipe` recomputes the SwiGLU product in the
    backward pass (DeepSeekV3 with fp8_residuals and recompute_swiglu) rather than
    composing swiglu and `dot_general` (which keeps the product's quantized copy or the
    product itself)."""
    recipe = recipes_lib.get(recipe)
    return recipe is not None and recipe.fp8_residuals and recipe.recompute_swiglu


@explicit.auto_inside(lambda gate, up, rhs, dimension_numbers, **_: explicit.plain_spec(
    lambda: jax.lax.dot_general(gate, rhs, dimension_numbers)))
def swiglu_dot_general(gate, up, rhs, dimension_numbers, *, recipe=None, residual_format: str | None = None,
                       preferred_element_type=None, rhs_kind: str = "weight", impl: str = "auto",
                       activation: str = "silu", target: Target | None = None):
    """`dot_general(mpx.activations.swiglu(gate, up, residual_format), rhs, ...)`, whose
    backward pass recomputes the SwiGLU product instead of keeping it (module docstring).

    Args:
      gate, up: the FFN's two projections, one shape (any float dtype).
      rhs, dimension_numbers, recipe, preferred_element_type, rhs_kind, impl, target: as
        in `dot_general`, with the SwiGLU product as lhs.
      residual_format: as in `mpx.activations.swiglu`.
      activation: the gate's, as in `mpx.activations.glu` ("silu": SwiGLU).

    Returns:
      As `dot_general` (stateless recipes only: no state).

    Raises:
      ValueError: as `dot_general`; gate and up of different shapes; an unknown activation.
    """
    check_choice("impl", impl, IMPLS)
    if jnp.shape(gate) != jnp.shape(up):
        raise ValueError(f"gate and up must have one shape; got {jnp.shape(gate)} and {jnp.shape(up)}")
    if not recomputes_swiglu(recipe):
        hidden = activations.glu(gate, up, residual_format, activation)
        return dot_general(hidden, rhs, dimension_numbers, recipe=recipe, preferred_element_type=preferred_element_type,
                           rhs_kind=rhs_kind, impl=impl, target=target)
    recipe, gate, rhs, lay = setup_operands(gate, rhs, dimension_numbers, recipe, None, rhs_kind)
    up = jnp.asarray(up)
    out_dtype = jnp.result_type(jnp.float32, rhs) if preferred_element_type is None else preferred_element_type
    target = current_target(target)
    cfg = MatmulConfig(plan(recipe, rhs_kind), resolve_impl(impl, target), lay.batched, jnp.dtype(jnp.float32), rhs.dtype,
                  jnp.dtype(out_dtype), target, True)
    activations.activate(activation, jnp.zeros((), jnp.float32))  # names a bad activation
    fused = _FusedConfig(cfg, residual_format, (jnp.dtype(gate.dtype), jnp.dtype(up.dtype)), activation)
    gate_c, up_c = (to_canonical(v, lay.lhs_perm, lay.lhs_shape) for v in (gate, up))
    out = _swiglu_qmatmul(fused, gate_c, up_c, to_canonical(rhs, lay.rhs_perm, lay.rhs_shape))
    return out.reshape(lay.out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _swiglu_qmatmul(cfg: _FusedConfig, gate, up, rhs):
    return _swiglu_qmatmul_fwd(cfg, gate, up, rhs)[0]


def _swiglu_qmatmul_fwd(cfg: _FusedConfig, gate, up, rhs):
    hidden, swiglu_residuals = activations._glu_fwd(cfg.residual_format, cfg.dtypes, cfg.activation, gate, up)
    out, (_, keep_rhs) = quantized_forward(cfg.dot, hidden, rhs, None, None)  # its FP8 copy of hidden: dropped
    return out, (swiglu_residuals, keep_rhs)


def _swiglu_qmatmul_bwd(cfg: _FusedConfig, residuals, g):
    swiglu_residuals, keep_rhs = residuals
    gate, up = activations.swiglu_inputs(cfg.residual_format, swiglu_residuals, g)
    hidden_t = jnp.swapaxes(activations.activate(cfg.activation, gate) * up, -1, -2)  # recomputed, transposed while quantized
    lhs_t = backends.prepare(hidden_t, transposed(cfg.dot.plan.wgrad_lhs), cfg.dot.impl)
    d_hidden, d_rhs = grads(cfg.dot, lhs_t, keep_rhs, g)  # wgrad first (DeepSeekV3)
    gate, up = activations.swiglu_inputs(cfg.residual_format, swiglu_residuals, d_hidden)  # again, not kept alive
    d_gate, d_up = activations.swiglu_grads(gate, up, d_hidden, cfg.dtypes, cfg.activation)
    return d_gate, d_up, d_rhs.astype(cfg.dot.rhs_dtype)


_swiglu_qmatmul.defvjp(_swiglu_qmatmul_fwd, _swiglu_qmatmul_bwd)
