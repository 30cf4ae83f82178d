"""The differentiable quantized `dot_general`: a custom VJP over canonical operands.

Forward `lhs (B, M, K) . rhs (B, K, N)`; backward dgrad `dY . rhs^T` and wgrad
`lhs^T . dY`, each operand quantized as `mpx.dot.plan` says (`grads`: in which order).
Per-tensor forward scales (current, delayed, static scaling) are computed outside the
VJP, so scale state never gets a gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from mpx import formats as formats_lib
from mpx import recipes as recipes_lib
from mpx.dot import backends
from mpx.ordering import after, kept
from mpx.config import check_choice
from mpx.dot.spec import (
    IMPLS,
    DotPlan,
    OperandSpec,
    DotState,
    check_state,
    dims,
    layout,
    plan,
    resolve_impl,
    to_canonical,
    transposed,
)
from mpx.recipes import AmaxHistory
from mpx.scaled import ScaledArray
from mpx.sharding import explicit
from mpx.target import Target
from mpx.target import current as current_target
from mpx.scales import broadcast_scale, compute_amax, compute_scale

__all__ = [
    "MatmulConfig", "quantized_forward", "grads", "dgrad", "wgrad", "tensor_amax", "setup_operands",
    "quantized_operands", "dot_general"
]


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Static configuration of one quantized matmul (a nondiff argument)."""

    plan: DotPlan
    impl: str
    batched: bool
    lhs_dtype: Any
    rhs_dtype: Any
    out_dtype: Any  # the result's dtype, so the incoming gradient has it too (bf16: half the bytes)
    target: Target  # the machine compiled for (barriers, chunk sizes, FP8 GEMMs)
    fp8_residuals: bool  # keep the quantized operands for the backward pass


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qmatmul(cfg: MatmulConfig, lhs, rhs, lhs_scale, rhs_scale):
    return quantized_forward(cfg, lhs, rhs, lhs_scale, rhs_scale)[0]


def quantized_forward(cfg: MatmulConfig, lhs, rhs, lhs_scale, rhs_scale):
    p, impl = cfg.plan, cfg.impl
    lhs_q = backends.quantize_parts(lhs, p.fprop_lhs, lhs_scale)
    rhs_q = backends.quantize_parts(rhs, p.fprop_rhs, rhs_scale)
    a, b = backends.from_grid(*lhs_q, p.fprop_lhs, impl), backends.from_grid(*rhs_q, p.fprop_rhs, impl)
    blocks = (backends.block_of(p.fprop_lhs, lhs.shape), backends.block_of(p.fprop_rhs, rhs.shape))
    out = backends.dot(a, b, dims(cfg.batched, 1, 0), cfg.target, blocks, cfg.out_dtype)
    if cfg.fp8_residuals:
        # The FP8 operands (E4M3 data + f32 scales) instead of the inputs: 1 byte per
        # element. The rhs is kept unquantized when dgrad groups it differently.
        keep_rhs = _stored(rhs_q, p.fprop_rhs) if p.dgrad_rhs == p.fprop_rhs else (rhs, None)
        return out, (_stored(lhs_q, p.fprop_lhs), keep_rhs)
    # The inputs: dgrad reuses the prepared rhs when its spec is unchanged; wgrad
    # re-prepares lhs transposed (with the forward scale when its spec is unchanged).
    keep_rhs = b if p.dgrad_rhs == p.fprop_rhs else rhs
    return out, ((lhs, lhs_scale if p.wgrad_lhs == p.fprop_lhs else None), keep_rhs)


def _stored(q, spec: OperandSpec):
    """(E4M3 data, scales) as the backward pass reads them: the data `kept` in a buffer of
    its own, or XLA on CPU quantizes the unquantized input again in the backward pass
    and keeps that input alive instead."""
    grid, scale = q
    return kept(grid.astype(formats_lib.get(spec.fmt).storage_dtype)), scale  # exact: grid values


def _loaded(stored, when=None) -> tuple[jax.Array, jax.Array]:
    """(f32 grid values, scale) of a stored FP8 operand; the values computed after `when`
    if given."""
    data, scale = stored
    grid = formats_lib.upcast(data, jnp.float32)
    return (grid if when is None else after(grid, when)), scale


def _qmatmul_bwd(cfg: MatmulConfig, residuals, g):
    keep_lhs, keep_rhs = residuals
    d_lhs, d_rhs = grads(cfg, _wgrad_lhs(cfg, keep_lhs, g), keep_rhs, g)
    return d_lhs.astype(cfg.lhs_dtype), d_rhs.astype(cfg.rhs_dtype), None, None


def grads(cfg: MatmulConfig, lhs_t, keep_rhs, g) -> tuple[jax.Array, jax.Array]:
    """(f32 d_lhs, f32 d_rhs) from wgrad's prepared lhs^T, the forward's kept rhs and the
    incoming gradient g. When dgrad and wgrad group dY alike they share its prepared
    form; otherwise (DeepSeekV3: 1x128 and 128x1 tiles) wgrad runs first and dgrad waits
    for its result, so their operands are never alive together."""
    if cfg.plan.wgrad_dy == cfg.plan.dgrad_dy:
        d_lhs, dy, rhs_shape = dgrad(cfg, keep_rhs, g)
        return d_lhs, wgrad(cfg, lhs_t, dy, g, rhs_shape)
    d_rhs = wgrad(cfg, lhs_t, None, g, _rhs_shape(cfg, keep_rhs))
    return dgrad(cfg, keep_rhs, after(g, d_rhs))[0], d_rhs


def dgrad(cfg: MatmulConfig, keep_rhs, g):
    """(f32 d_lhs = dY . rhs^T, dY as dgrad prepared it, rhs's shape) from the forward's
    kept rhs and the incoming gradient g."""
    p, impl = cfg.plan, cfg.impl
    dy = backends.prepare(g, p.dgrad_dy, impl)
    rhs_shape = _rhs_shape(cfg, keep_rhs)
    rhs = _dgrad_rhs(cfg, keep_rhs, g)
    blocks = (backends.block_of(p.dgrad_dy, g.shape), backends.block_of(p.dgrad_rhs, rhs_shape))
    return backends.dot(dy, rhs, dims(cfg.batched, 1, 1), cfg.target, blocks), dy, rhs_shape  # (M, N) x (K, N)


def _dgrad_rhs(cfg: MatmulConfig, keep_rhs, g):
    """The rhs as dgrad multiplies it, from what the forward kept; built once the
    gradient g is here."""
    p, impl = cfg.plan, cfg.impl
    if not cfg.fp8_residuals:
        return keep_rhs if isinstance(keep_rhs, tuple) else backends.prepare(keep_rhs, p.dgrad_rhs, impl)
    if keep_rhs[1] is not None:  # the stored FP8 operand
        return backends.from_grid(*_loaded(keep_rhs, when=g), p.dgrad_rhs, impl)
    return backends.prepare(keep_rhs[0], p.dgrad_rhs, impl)


def wgrad(cfg: MatmulConfig, lhs_t, dy, g, rhs_shape) -> jax.Array:
    """f32 d_rhs = lhs^T . dY from wgrad's prepared lhs^T (K, M), dgrad's prepared dY
    (reused when wgrad groups it the same way; None otherwise) and the incoming gradient g."""
    p, impl = cfg.plan, cfg.impl
    dy_w = dy if p.wgrad_dy == p.dgrad_dy else backends.prepare(g, p.wgrad_dy, impl)
    lhs_t_shape = g.shape[:-2] + (rhs_shape[-2], g.shape[-2])
    blocks = (backends.block_of(transposed(p.wgrad_lhs), lhs_t_shape), backends.block_of(p.wgrad_dy, g.shape))
    return backends.dot(lhs_t, dy_w, dims(cfg.batched, 1, 0), cfg.target, blocks)


def _rhs_shape(cfg: MatmulConfig, keep_rhs) -> tuple[int, ...]:
    if not cfg.fp8_residuals:
        return (keep_rhs[0] if isinstance(keep_rhs, tuple) else keep_rhs).shape
    return keep_rhs[0].shape


def _wgrad_lhs(cfg: MatmulConfig, keep_lhs, g):
    """lhs^T as wgrad's operand, materialized while quantizing, so the wgrad GEMM is
    (K, M) x (M, N): XLA on CPU runs bf16 GEMMs with a transposed lhs at f32 speed.

    From stored FP8 operands: with the forward's grouping (per-tensor recipes) the data
    is transposed as it is; otherwise (DeepSeekV3: 1x128 tiles along K forward, 128x1
    along tokens here) the stored operand is dequantized and quantized again in the
    wgrad tiles, so wgrad sees the forward's rounding plus its own.
    """
    p, impl, spec = cfg.plan, cfg.impl, transposed(cfg.plan.wgrad_lhs)
    # Built once this layer's gradient `g` is here (`mpx.ordering.after`), not for every
    # layer at the start of the backward pass, where XLA on CPU would schedule it.
    if not cfg.fp8_residuals:
        lhs, lhs_scale = keep_lhs
        return backends.prepare(jnp.swapaxes(after(lhs, g), -1, -2), spec, impl, lhs_scale)
    # Transposed as FP8 data: one byte per element moves, not a float32 copy.
    grid_t, scale_t = _loaded(tuple(jnp.swapaxes(a, -1, -2) for a in keep_lhs), when=g)
    if p.wgrad_lhs == p.fprop_lhs:
        return backends.from_grid(grid_t, scale_t, spec, impl)
    x_hat_t = grid_t * broadcast_scale(scale_t, grid_t.shape, backends.block_of(transposed(p.fprop_lhs), grid_t.shape))
    return backends.prepare(x_hat_t, spec, impl)


_qmatmul.defvjp(quantized_forward, _qmatmul_bwd)


# --------------------------------------------------------------------------- forward scales


def tensor_amax(x: jax.Array) -> jax.Array:
    """max |x| over the whole array (no gradient), a float32 scalar."""
    return compute_amax(lax.stop_gradient(x), x.shape).reshape(())


def _forward_scale(recipe, history: AmaxHistory | None, amax: jax.Array) -> jax.Array:
    """Per-tensor forward scale: just in time, or from `history`."""
    kw = dict(margin=recipe.margin, scale_format=recipe.scale_format)
    if history is None:
        return compute_scale(amax, recipe.fwd_format, **kw)
    return recipes_lib.delayed_scale(history, recipe.fwd_format, algo=recipe.amax_algo, current_amax=amax, **kw)


def _forward_scales(recipe, state: DotState | None, lhs, rhs):
    """(lhs_scale, rhs_scale, new_state): per-tensor scales computed outside the vjp."""
    if recipe.tiled:  # scaled per tile inside the dot
        return None, None, state
    amax = (tensor_amax(lhs), tensor_amax(rhs))
    state = None if state is None else lax.stop_gradient(state)
    hists = (None, None) if state is None else (state.lhs, state.rhs)
    scales = tuple(_forward_scale(recipe, h, a) for h, a in zip(hists, amax))
    if recipe.updates_history:
        state = DotState(*(recipes_lib.update_history(h, a) for h, a in zip(hists, amax)))
    return (*scales, state)


# --------------------------------------------------------------------------- public API


def setup_operands(lhs, rhs, dimension_numbers, recipe, state, rhs_kind):
    recipe = recipes_lib.get(recipe)
    check_choice("rhs_kind", rhs_kind, ("weight", "activation"))
    check_state(recipe, state)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    return recipe, lhs, rhs, layout(lhs.shape, rhs.shape, dimension_numbers)


def quantized_operands(lhs, rhs, dimension_numbers, *, recipe, state: DotState | None = None,
                       rhs_kind: str = "weight") -> tuple[ScaledArray, ScaledArray]:
    """The forward operands exactly as `dot_general` quantizes them.

    Args:
      lhs, rhs, dimension_numbers, recipe, state, rhs_kind: as in `dot_general`.

    Returns:
      (q_lhs, q_rhs) in canonical layout: q_lhs (B, M, K), q_rhs (B, K, N), without the
      B axis when there are no batch dims. `dequantize(q_lhs) . dequantize(q_rhs)` in
      float32 is what the quantized forward computes.

    Raises:
      ValueError: as `dot_general`.
    """
    recipe, lhs, rhs, lay = setup_operands(lhs, rhs, dimension_numbers, recipe, state, rhs_kind)
    if recipe is None:
        raise ValueError("quantized_operands needs a recipe; recipe=None quantizes nothing")
    lhs_c = to_canonical(lhs, lay.lhs_perm, lay.lhs_shape)
    rhs_c = to_canonical(rhs, lay.rhs_perm, lay.rhs_shape)
    lhs_scale, rhs_scale, _ = _forward_scales(recipe, state, lhs_c, rhs_c)
    p = plan(recipe, rhs_kind)
    return (backends.quantize_operand(lhs_c, p.fprop_lhs, lhs_scale),
            backends.quantize_operand(rhs_c, p.fprop_rhs, rhs_scale))


@explicit.auto_inside(explicit.dot_specs)
def dot_general(lhs, rhs, dimension_numbers, *, recipe=None, state: DotState | None = None,
                preferred_element_type=None, rhs_kind: str = "weight", impl: str = "auto",
                target: Target | None = None):
    """A differentiable quantized `lax.dot_general` with float32 accumulation.

    Args:
      lhs, rhs: floating arrays (f32, bf16, f16).
      dimension_numbers: ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)) as in
        `jax.lax.dot_general`.
      recipe: None (plain dot), a recipe object (`mpx.recipes.CurrentScaling`,
        `DelayedScaling`, `StaticScaling`, `DeepSeekV3`) or its name.
      state: a `DotState` for stateful recipes (from `init_state`), else None.
      preferred_element_type: output dtype; default `jnp.result_type(lhs, rhs)`.
      rhs_kind: "weight" (128x128 blocks under DeepSeekV3) or "activation" (rhs tiled
        128-wide along its contraction dims, e.g. both operands are activations).
      impl: "auto", "fp8", "upcast_bf16" or "dequant_f32" (see `mpx.dot`).
      target: the machine compiled for (`mpx.target`); default `mpx.target.current()`.

    Returns:
      The product in lax.dot_general's layout (batch, lhs free, rhs free) and
      `preferred_element_type`; `(out, new_state)` when `state` is given. On a mesh with
      Explicit axes it is sharded as lax.dot_general's (`mpx.sharding.explicit`).

    Raises:
      ValueError: for mismatched dimension numbers, an unknown recipe, impl or rhs_kind,
        a stateful recipe without state, or state with a stateless recipe.
      TypeError: for a state that is not a `DotState`.
    """
    check_choice("impl", impl, IMPLS)
    recipe, lhs, rhs, lay = setup_operands(lhs, rhs, dimension_numbers, recipe, state, rhs_kind)
    if recipe is None:
        return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=preferred_element_type)
    out_dtype = jnp.result_type(lhs, rhs) if preferred_element_type is None else preferred_element_type
    lhs_c = to_canonical(lhs, lay.lhs_perm, lay.lhs_shape)
    rhs_c = to_canonical(rhs, lay.rhs_perm, lay.rhs_shape)
    lhs_scale, rhs_scale, new_state = _forward_scales(recipe, state, lhs_c, rhs_c)
    target = current_target(target)
    cfg = MatmulConfig(plan(recipe, rhs_kind), resolve_impl(impl, target), lay.batched, lhs.dtype, rhs.dtype,
                  jnp.dtype(out_dtype), target, recipe.fp8_residuals)
    out = _qmatmul(cfg, lhs_c, rhs_c, lhs_scale, rhs_scale).reshape(lay.out_shape)
    return out if state is None else (out, new_state)
