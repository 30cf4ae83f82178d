"""Grouped (ragged) matmuls for mixture-of-experts layers, quantized like `dot_general`.

    out[m] = lhs[m] . rhs[e(m)]      rows of lhs sorted by group, e(m) the group of row m

`ragged_dot(lhs (M, K), rhs (E, K, N), group_sizes (E,))` multiplies each run of rows by
its own weight, as `jax.lax.ragged_dot` does: the rows of group 0 come first, then those
of group 1, and so on; rows past `sum(group_sizes)` give zeros. A mixture-of-experts
layer sorts its (token, expert) pairs by expert and calls it once, so every token is
multiplied by its own experts only, never by all of them.

With a recipe the six operands are quantized as `mpx.dot.plan(recipe)` says for a weight
rhs, exactly as `dot_general` would for one expert:

    forward  Y  = X . W_e      X 1x128 tiles along K (per row), W_e 128x128 blocks per expert
    dgrad    dX = dY . W_e^T   dY 1x128 tiles along N, the same blocks of W_e
    wgrad    dW_e = X_e^T dY_e X and dY 128x1 tiles along the rows

(per-tensor recipes: one scale per operand). Under `fp8_residuals` (the recipes' default)
the backward pass keeps the forward's FP8 rows, not the input rows. The row tiles of wgrad are taken over the
sorted rows, so a tile at the border of two experts' rows shares its scale between them;
each element is still quantized in a 128-row tile that holds it. The quantized operands
are multiplied in float32 (`jax.lax.ragged_dot` of the dequantized values): the exact
product of the FP8 operands up to f32 rounding, on every target. No Hopper FP8 grouped
GEMM kernel is wired up yet, so an H100 runs these products as f32 GEMMs.

Only stateless recipes (DeepSeekV3, CurrentScaling) apply: an amax history per expert
has no meaning for one grouped product.
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
from mpx.dot.general import tensor_amax
from mpx.dot.spec import DotPlan, OperandSpec, plan
from mpx.scaled import ScaledArray, dequantize
from mpx.scales import compute_scale

__all__ = ["ragged_dot", "prequantized_ragged_dot"]


@dataclasses.dataclass(frozen=True)
class _Config:
    plan: DotPlan
    lhs_dtype: Any
    rhs_dtype: Any
    out_dtype: Any
    fp8_residuals: bool  # keep the FP8 lhs for the backward pass, not the input


def _check(lhs, rhs_shape, group_sizes) -> None:
    if lhs.ndim != 2 or len(rhs_shape) != 3 or lhs.shape[1] != rhs_shape[1]:
        raise ValueError(f"ragged_dot needs lhs (M, K) and rhs (E, K, N); got lhs {tuple(lhs.shape)}, rhs "
                         f"{tuple(rhs_shape)}")
    if group_sizes.shape != (rhs_shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be ({rhs_shape[0]},) integers, one per group of rhs; got "
                         f"{group_sizes.dtype} {tuple(group_sizes.shape)}")


def _dequantized(x: jax.Array, spec: OperandSpec, scale: jax.Array | None = None) -> jax.Array:
    """x quantized under `spec` and brought back to float32 (exact FP8 values times scales)."""
    return dequantize(backends.quantize_operand(x, spec, scale), jnp.float32)


def _product(lhs, rhs, group_sizes):
    return lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _quantized(cfg: _Config, lhs, rhs, group_sizes, lhs_scale, rhs_scale):
    return _forward(cfg, lhs, rhs, group_sizes, lhs_scale, rhs_scale)[0]


def _forward(cfg: _Config, lhs, rhs, group_sizes, lhs_scale, rhs_scale):
    p = cfg.plan
    rhs_q = backends.quantize_operand(rhs, p.fprop_rhs, rhs_scale)  # 1 byte per weight, kept for dgrad
    lhs_q = backends.quantize_operand(lhs, p.fprop_lhs, lhs_scale)
    out = _product(dequantize(lhs_q, jnp.float32), dequantize(rhs_q, jnp.float32), group_sizes)
    keep_rhs = rhs_q if p.dgrad_rhs == p.fprop_rhs else rhs
    # With fp8_residuals the FP8 rows (1 byte each) wait for wgrad, which dequantizes and
    # quantizes them again in its own tiles, as `dot_general` does.
    keep_lhs = lhs_q if cfg.fp8_residuals else lhs
    return out.astype(cfg.out_dtype), (keep_lhs, keep_rhs, group_sizes)


def _backward(cfg: _Config, residuals, g):
    p = cfg.plan
    keep_lhs, keep_rhs, group_sizes = residuals
    lhs = dequantize(keep_lhs, jnp.float32) if isinstance(keep_lhs, ScaledArray) else keep_lhs
    rhs_d = dequantize(keep_rhs, jnp.float32) if isinstance(keep_rhs, ScaledArray) else \
        _dequantized(keep_rhs, p.dgrad_rhs)
    d_lhs = _product(_dequantized(g, p.dgrad_dy), jnp.swapaxes(rhs_d, 1, 2), group_sizes)
    lhs_w, dy_w = _dequantized(lhs, p.wgrad_lhs), _dequantized(g, p.wgrad_dy)
    # Linear in r: any primal point gives the same pullback; rhs_d carries the operands'
    # sharding type (varying over a shard_map axis under expert parallelism).
    _, pullback = jax.vjp(lambda r: _product(lhs_w, r, group_sizes), rhs_d)
    (d_rhs,) = pullback(dy_w)  # dW_e = X_e^T dY_e over each group's rows
    return d_lhs.astype(cfg.lhs_dtype), d_rhs.astype(cfg.rhs_dtype), None, None, None


_quantized.defvjp(_forward, _backward)


def _recipe(recipe):
    recipe = recipes_lib.get(recipe)
    if recipe is not None and recipes_lib.is_stateful(recipe):
        raise ValueError(f"ragged_dot takes stateless recipes (DeepSeekV3, CurrentScaling); {recipe.name!r} keeps an "
                         "amax history, which one grouped product of many experts cannot share")
    return recipe


def _tensor_scales(recipe, lhs, rhs):
    """Per-tensor forward scales, computed outside the VJP (None for tiled recipes)."""
    if recipe.tiled:
        return None, None
    kw = dict(margin=recipe.margin, pow2=recipe.pow2_scale)
    return tuple(compute_scale(tensor_amax(x), recipe.fwd_format, **kw) for x in (lhs, rhs))


def ragged_dot(lhs, rhs, group_sizes, *, recipe=None, preferred_element_type=None,
               compute_dtype=None) -> jax.Array:
    """Differentiable grouped matmul `out[m] = lhs[m] . rhs[group(m)]`, FP8 under a recipe.

    Args:
      lhs: (M, K) rows sorted by group.
      rhs: (E, K, N), one weight per group.
      group_sizes: (E,) integers, the number of rows of each group, in order.
      recipe: None (a plain grouped matmul in `compute_dtype`), a stateless recipe
        (`DeepSeekV3`, `CurrentScaling`) or its name.
      preferred_element_type: output dtype; default `jnp.result_type(lhs, rhs)`.
      compute_dtype: the operands' dtype without a recipe (bf16: bf16 GEMMs with f32
        accumulation); default their own.

    Returns:
      (M, N) in `preferred_element_type`.

    Raises:
      ValueError: shapes that do not fit, group_sizes that are not (E,) integers, an
        unknown or a stateful recipe.
    """
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    _check(lhs, rhs.shape, group_sizes)
    recipe = _recipe(recipe)
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
    if recipe is None:
        dtype = compute_dtype or jnp.result_type(lhs, rhs)
        return lax.ragged_dot(lhs.astype(dtype), rhs.astype(dtype), group_sizes,
                              preferred_element_type=jnp.float32).astype(out_dtype)
    cfg = _Config(plan(recipe, "weight"), lhs.dtype, rhs.dtype, out_dtype, recipe.fp8_residuals)
    return _quantized(cfg, lhs, rhs, group_sizes, *_tensor_scales(recipe, lhs, rhs))


def prequantized_ragged_dot(lhs, rhs: ScaledArray, group_sizes, *, recipe=None, compute_dtype=jnp.bfloat16,
                            preferred_element_type=jnp.float32) -> jax.Array:
    """Forward-only grouped product with expert weights quantized ahead of time (serving).

    lhs is quantized as the recipe's forward lhs (DeepSeekV3: 1x128 tiles per row;
    CurrentScaling: one scale), or kept in `compute_dtype` without a recipe
    (weight-only); rhs (E, K, N) enters as its dequantized values.

    Raises:
      TypeError: rhs is not a ScaledArray.
      ValueError: as `ragged_dot`.
    """
    if not isinstance(rhs, ScaledArray):
        raise TypeError(f"prequantized_ragged_dot needs a ScaledArray rhs; got {type(rhs).__name__}")
    lhs, group_sizes = jnp.asarray(lhs), jnp.asarray(group_sizes)
    _check(lhs, rhs.shape, group_sizes)
    recipe = _recipe(recipe)
    w = dequantize(rhs, jnp.float32)
    if recipe is None:
        x = lhs.astype(compute_dtype).astype(jnp.float32)
    else:
        spec = plan(recipe, "weight").fprop_lhs
        scale = None if recipe.tiled else _tensor_scales(recipe, lhs, lhs)[0]
        x = _dequantized(lhs, spec, scale)
    return _product(x, w, group_sizes).astype(preferred_element_type)
