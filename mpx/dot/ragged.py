"""Grouped (ragged) matmuls for mixture-of-experts layers, quantized like `dot_general`.

    out[m] = lhs[m] . rhs[g(m)]      rows of lhs sorted by group, g(m) the group of row m

`ragged_dot(lhs (M, K), rhs (E, K, N), group_sizes (E,))` multiplies each run of rows by
its own weight, as `jax.lax.ragged_dot` does: the rows of group 0 come first, then those
of group 1, and so on; rows past `sum(group_sizes)` give zeros. A mixture-of-experts
layer sorts its (token, expert) pairs by expert and calls it once.

How it computes (the grouped GEMM of DeepSeek's DeepGEMM "contiguous" layout): each
group's rows are placed at a multiple of a row tile (`tile_rows`) in a padded buffer, so
every tile belongs to one group, and a `lax.scan` over the tiles multiplies each by its
group's weight; the weight gradient accumulates tile by tile into its group's slice.
The work is the rows plus at most `tile - 1` padding rows per non-empty group, never
rows x groups. (`jax.lax.ragged_dot` itself is not used: on CPU, and on GPU as compiled
by XLA here, it becomes a dense product of every row with every group's weight, masked,
which is exactly the work dispatch by sorting is meant to avoid.)

With a recipe the six operands are quantized as `mpx.dot.plan(recipe)` says for a weight
rhs, exactly as `dot_general` would for one expert:

    forward  Y  = X . W_e      X 1x128 tiles along K (per row), W_e 128x128 blocks per expert
    dgrad    dX = dY . W_e^T   dY 1x128 tiles along N, the same blocks of W_e
    wgrad    dW_e = X_e^T dY_e X and dY 128x1 tiles along the rows of the padded buffer

(per-tensor recipes: one scale per operand). With 128-row tiles, wgrad's row tiles are
the groups' own (no tile holds two experts' rows). Under `fp8_residuals` (the recipes'
default) the backward pass keeps the forward's FP8 rows, not the input rows. The
quantized operands are multiplied in float32: the exact product of the FP8 operands up
to f32 rounding, on every target (no Hopper FP8 grouped GEMM kernel is wired up yet).
Without a recipe the operands are cast to `compute_dtype` and multiplied with f32
accumulation.

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

__all__ = ["ragged_dot", "prequantized_ragged_dot", "tile_rows"]

MAX_TILE = 128  # DeepSeek-V3's block: a tile of this many rows is one wgrad scale group


def tile_rows(rows: int, groups: int) -> int:
    """The row tile for `rows` rows in `groups` groups: the power of two nearest the mean
    group size, between 8 and `MAX_TILE`, so padding stays below about one tile per
    group (decode: few rows, small tiles; training: 128)."""
    mean = max(rows // max(groups, 1), 1)
    return int(min(MAX_TILE, max(8, 1 << (mean.bit_length() - 1))))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the sorted rows sit in the tile-aligned buffer (all traced but the sizes)."""

    dest: jax.Array  # (M,) buffer row of each row; rows past the groups -> padded_rows (dropped)
    tile_group: jax.Array  # (tiles,) the group of each tile
    tile: int
    padded_rows: int


def _layout(group_sizes: jax.Array, rows: int, tile: int) -> _Layout:
    groups = group_sizes.shape[0]
    padded_rows = -(-(rows + min(groups, rows) * (tile - 1)) // tile) * tile
    ends = jnp.cumsum(group_sizes)
    padded = (group_sizes + tile - 1) // tile * tile
    padded_ends = jnp.cumsum(padded)
    index = jnp.arange(rows)
    group = jnp.searchsorted(ends, index, side="right")  # groups for rows past the last group
    inside = group < groups
    g = jnp.minimum(group, groups - 1)
    dest = jnp.where(inside, padded_ends[g] - padded[g] + index - (ends[g] - group_sizes[g]), padded_rows)
    tile_group = jnp.searchsorted(padded_ends, jnp.arange(padded_rows // tile) * tile, side="right")
    return _Layout(dest, jnp.minimum(tile_group, groups - 1), tile, padded_rows)


def _pad(x: jax.Array, lay: _Layout) -> jax.Array:
    """(M, C) sorted rows -> (padded_rows, C), each group starting on a tile, zeros between."""
    return jnp.zeros((lay.padded_rows, x.shape[1]), x.dtype).at[lay.dest].set(x, mode="drop")


def _unpad(y: jax.Array, lay: _Layout) -> jax.Array:
    return jnp.take(y, lay.dest, axis=0, mode="fill", fill_value=0)


def _tiles(x: jax.Array, lay: _Layout) -> jax.Array:
    return x.reshape(lay.padded_rows // lay.tile, lay.tile, x.shape[1])


def _tiled_product(x: jax.Array, w: jax.Array, lay: _Layout) -> jax.Array:
    """(padded_rows, K) x (E, K, N) -> (padded_rows, N) f32: each tile times its group's weight."""
    def tile(_, args):
        xt, g = args
        return None, jnp.dot(xt, w[g], preferred_element_type=jnp.float32)

    _, y = lax.scan(tile, None, (_tiles(x, lay), lay.tile_group))
    return y.reshape(lay.padded_rows, w.shape[2])


def _tiled_wgrad(x: jax.Array, dy: jax.Array, w: jax.Array, lay: _Layout) -> jax.Array:
    """(E, K, N) f32: each group's X^T dY, accumulated tile by tile into its slice. The
    accumulator starts as zeros like the weight `w`, so under `shard_map` (expert
    parallelism) it has the operands' sharding type."""
    def tile(dw, args):
        xt, gt, g = args
        return dw.at[g].add(jnp.dot(xt.T, gt, preferred_element_type=jnp.float32)), None

    dw, _ = lax.scan(tile, jnp.zeros_like(w, jnp.float32), (_tiles(x, lay), _tiles(dy, lay), lay.tile_group))
    return dw


@dataclasses.dataclass(frozen=True)
class _Config:
    plan: DotPlan | None  # None: no quantization, operands cast to compute_dtype
    compute_dtype: Any
    lhs_dtype: Any
    rhs_dtype: Any
    out_dtype: Any
    fp8_residuals: bool  # keep the FP8 lhs for the backward pass, not the input
    tile: int


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


def _operand(cfg: _Config, x, spec: OperandSpec | None, scale=None):
    """An operand as the GEMM takes it: dequantized FP8 values, or cast to compute_dtype."""
    if cfg.plan is None:
        return x.astype(cfg.compute_dtype)
    return _dequantized(x, spec, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped(cfg: _Config, lhs, rhs, group_sizes, lhs_scale, rhs_scale):
    return _forward(cfg, lhs, rhs, group_sizes, lhs_scale, rhs_scale)[0]


def _forward(cfg: _Config, lhs, rhs, group_sizes, lhs_scale, rhs_scale):
    p, lay = cfg.plan, _layout(group_sizes, lhs.shape[0], cfg.tile)
    x = _pad(lhs, lay)
    if p is None:
        keep_x, keep_rhs = x, rhs
        xq, w = x.astype(cfg.compute_dtype), rhs.astype(cfg.compute_dtype)
    else:
        x_q = backends.quantize_operand(x, p.fprop_lhs, lhs_scale)
        w_q = backends.quantize_operand(rhs, p.fprop_rhs, rhs_scale)  # 1 byte per weight, kept for dgrad
        xq, w = dequantize(x_q, jnp.float32), dequantize(w_q, jnp.float32)
        # With fp8_residuals the FP8 rows (1 byte each) wait for wgrad, which dequantizes
        # and quantizes them again in its own tiles, as `dot_general` does.
        keep_x = x_q if cfg.fp8_residuals else x
        keep_rhs = w_q if p.dgrad_rhs == p.fprop_rhs else rhs
    out = _unpad(_tiled_product(xq, w, lay), lay)
    return out.astype(cfg.out_dtype), (keep_x, keep_rhs, group_sizes)


def _backward(cfg: _Config, residuals, g):
    p = cfg.plan
    keep_x, keep_rhs, group_sizes = residuals
    lay = _layout(group_sizes, g.shape[0], cfg.tile)
    dy = _pad(g, lay)
    x = dequantize(keep_x, jnp.float32) if isinstance(keep_x, ScaledArray) else keep_x
    if isinstance(keep_rhs, ScaledArray):
        w = dequantize(keep_rhs, jnp.float32)
    else:
        w = _operand(cfg, keep_rhs, None if p is None else p.dgrad_rhs)
    dy_d = _operand(cfg, dy, None if p is None else p.dgrad_dy)
    d_lhs = _unpad(_tiled_product(dy_d, jnp.swapaxes(w, 1, 2), lay), lay)
    x_w = _operand(cfg, x, None if p is None else p.wgrad_lhs)
    dy_w = _operand(cfg, dy, None if p is None else p.wgrad_dy)
    d_rhs = _tiled_wgrad(x_w, dy_w, w, lay)
    return d_lhs.astype(cfg.lhs_dtype), d_rhs.astype(cfg.rhs_dtype), None, None, None


_grouped.defvjp(_forward, _backward)


def _recipe(recipe):
    recipe = recipes_lib.get(recipe)
    if recipe is not None and recipes_lib.is_stateful(recipe):
        raise ValueError(f"ragged_dot takes stateless recipes (DeepSeekV3, CurrentScaling); {recipe.name!r} keeps an "
                         "amax history, which one grouped product of many experts cannot share")
    return recipe


def _tensor_scale(recipe, x):
    """x's per-tensor forward scale, computed outside the VJP (None for tiled recipes)."""
    if recipe is None or recipe.tiled:
        return None
    return compute_scale(tensor_amax(x), recipe.fwd_format, margin=recipe.margin, scale_format=recipe.scale_format)


def ragged_dot(lhs, rhs, group_sizes, *, recipe=None, preferred_element_type=None, compute_dtype=None,
               tile: int | None = None) -> jax.Array:
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
      tile: rows per tile of the grouped GEMM; default `tile_rows(M, E)`.

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
    cfg = _Config(None if recipe is None else plan(recipe, "weight"), compute_dtype or jnp.result_type(lhs, rhs),
                  lhs.dtype, rhs.dtype, out_dtype, recipe is not None and recipe.fp8_residuals,
                  tile or tile_rows(lhs.shape[0], rhs.shape[0]))
    return _grouped(cfg, lhs, rhs, group_sizes.astype(jnp.int32), _tensor_scale(recipe, lhs), _tensor_scale(recipe, rhs))


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
    lhs, group_sizes = jnp.asarray(lhs), jnp.asarray(group_sizes).astype(jnp.int32)
    _check(lhs, rhs.shape, group_sizes)
    recipe = _recipe(recipe)
    lay = _layout(group_sizes, lhs.shape[0], tile_rows(lhs.shape[0], rhs.shape[0]))
    x = _pad(lhs, lay)
    if recipe is None:
        x = x.astype(compute_dtype).astype(jnp.float32)
    else:
        x = _dequantized(x, plan(recipe, "weight").fprop_lhs, _tensor_scale(recipe, lhs))
    y = _tiled_product(x, dequantize(rhs, jnp.float32), lay)
    return _unpad(y, lay).astype(preferred_element_type)
