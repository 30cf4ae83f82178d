"""The differentiable quantized `dot_general`: a custom VJP over canonical operands.

Forward `lhs (B, M, K) . rhs (B, K, N)`; backward dgrad `dY . rhs^T` and wgrad
`lhs^T . dY`, each operand quantized as `mpx.dot.plan` says. Per-tensor forward scales
(current, delayed, static scaling) are computed outside the VJP, so scale state never
gets a gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from mpx import recipes as recipes_lib
from mpx.dot import backends
from mpx.dot.spec import (
    IMPLS,
    DotPlan,
    DotState,
    check_choice,
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
from mpx.scales import compute_amax, compute_scale


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of one quantized matmul (a nondiff argument)."""

    plan: DotPlan
    impl: str
    batched: bool
    lhs_dtype: Any
    rhs_dtype: Any
    guard: bool  # optimization barriers around bf16 dots (XLA on CPU)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qmatmul(cfg: _Config, lhs, rhs, lhs_scale, rhs_scale):
    return _qmatmul_fwd(cfg, lhs, rhs, lhs_scale, rhs_scale)[0]


def _qmatmul_fwd(cfg: _Config, lhs, rhs, lhs_scale, rhs_scale):
    p = cfg.plan
    a = backends.prepare(lhs, p.fprop_lhs, cfg.impl, lhs_scale)
    b = backends.prepare(rhs, p.fprop_rhs, cfg.impl, rhs_scale)
    out = backends.dot(a, b, dims(cfg.batched, 1, 0), cfg.guard)
    # dgrad reuses the prepared rhs when its spec is unchanged; wgrad re-prepares lhs
    # transposed (with the forward scale when its spec is unchanged): same values.
    keep_rhs = b if p.dgrad_rhs == p.fprop_rhs else rhs
    keep_lhs_scale = lhs_scale if p.wgrad_lhs == p.fprop_lhs else None
    return out, (lhs, keep_lhs_scale, keep_rhs)


def _qmatmul_bwd(cfg: _Config, residuals, g):
    p, impl = cfg.plan, cfg.impl
    lhs, lhs_scale, keep_rhs = residuals
    dy = backends.prepare(g, p.dgrad_dy, impl)
    rhs = keep_rhs if isinstance(keep_rhs, tuple) else backends.prepare(keep_rhs, p.dgrad_rhs, impl)
    d_lhs = backends.dot(dy, rhs, dims(cfg.batched, 1, 1), cfg.guard)  # (M, N) x (K, N) -> (M, K)
    dy_w = dy if p.wgrad_dy == p.dgrad_dy else backends.prepare(g, p.wgrad_dy, impl)
    # lhs^T materialized while quantizing, so the wgrad GEMM is (K, M) x (M, N): XLA on
    # CPU runs bf16 GEMMs with a transposed lhs at f32 speed.
    lhs_t = backends.prepare(jnp.swapaxes(lhs, -1, -2), transposed(p.wgrad_lhs), impl, lhs_scale)
    d_rhs = backends.dot(lhs_t, dy_w, dims(cfg.batched, 1, 0), cfg.guard)
    return d_lhs.astype(cfg.lhs_dtype), d_rhs.astype(cfg.rhs_dtype), None, None


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


# --------------------------------------------------------------------------- forward scales


def tensor_amax(x: jax.Array) -> jax.Array:
    """max |x| over the whole array (no gradient), a float32 scalar."""
    return compute_amax(lax.stop_gradient(x), x.shape).reshape(())


def _forward_scale(recipe, history: AmaxHistory | None, amax: jax.Array) -> jax.Array:
    """Per-tensor forward scale: just in time, or from `history`."""
    kw = dict(margin=recipe.margin, pow2=recipe.pow2_scale)
    if history is None:
        return compute_scale(amax, recipe.fwd_format, **kw)
    return recipes_lib.delayed_scale(history, recipe.fwd_format, algo=recipe.amax_algo, current_amax=amax, **kw)


def _forward_scales(recipe, state: DotState | None, lhs, rhs):
    """(lhs_scale, rhs_scale, new_state): per-tensor scales computed outside the vjp."""
    if isinstance(recipe, recipes_lib.DeepSeekV3):
        return None, None, state
    amax = (tensor_amax(lhs), tensor_amax(rhs))
    state = None if state is None else lax.stop_gradient(state)
    hists = (None, None) if state is None else (state.lhs, state.rhs)
    scales = tuple(_forward_scale(recipe, h, a) for h, a in zip(hists, amax))
    if isinstance(recipe, recipes_lib.DelayedScaling):
        state = DotState(*(recipes_lib.update_history(h, a) for h, a in zip(hists, amax)))
    return (*scales, state)


# --------------------------------------------------------------------------- public API


def _setup(lhs, rhs, dimension_numbers, recipe, state, rhs_kind):
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
    recipe, lhs, rhs, lay = _setup(lhs, rhs, dimension_numbers, recipe, state, rhs_kind)
    if recipe is None:
        raise ValueError("quantized_operands needs a recipe; recipe=None quantizes nothing")
    lhs_c = to_canonical(lhs, lay.lhs_perm, lay.lhs_shape)
    rhs_c = to_canonical(rhs, lay.rhs_perm, lay.rhs_shape)
    lhs_scale, rhs_scale, _ = _forward_scales(recipe, state, lhs_c, rhs_c)
    p = plan(recipe, rhs_kind)
    return (backends.quantize_operand(lhs_c, p.fprop_lhs, lhs_scale),
            backends.quantize_operand(rhs_c, p.fprop_rhs, rhs_scale))


def dot_general(lhs, rhs, dimension_numbers, *, recipe=None, state: DotState | None = None,
                preferred_element_type=None, rhs_kind: str = "weight", impl: str = "auto"):
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

    Returns:
      The product in lax.dot_general's layout (batch, lhs free, rhs free) and
      `preferred_element_type`; `(out, new_state)` when `state` is given.

    Raises:
      ValueError: for mismatched dimension numbers, an unknown recipe, impl or rhs_kind,
        a stateful recipe without state, or state with a stateless recipe.
      TypeError: for a state that is not a `DotState`.
    """
    check_choice("impl", impl, IMPLS)
    recipe, lhs, rhs, lay = _setup(lhs, rhs, dimension_numbers, recipe, state, rhs_kind)
    if recipe is None:
        return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=preferred_element_type)
    out_dtype = jnp.result_type(lhs, rhs) if preferred_element_type is None else preferred_element_type
    lhs_c = to_canonical(lhs, lay.lhs_perm, lay.lhs_shape)
    rhs_c = to_canonical(rhs, lay.rhs_perm, lay.rhs_shape)
    lhs_scale, rhs_scale, new_state = _forward_scales(recipe, state, lhs_c, rhs_c)
    guard = jax.default_backend() == "cpu"
    cfg = _Config(plan(recipe, rhs_kind), resolve_impl(impl), lay.batched, lhs.dtype, rhs.dtype, guard)
    out = _qmatmul(cfg, lhs_c, rhs_c, lhs_scale, rhs_scale).reshape(lay.out_shape).astype(out_dtype)
    return out if state is None else (out, new_state)
