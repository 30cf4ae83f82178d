"""Forward-only products with weights quantized ahead of time (serving).

`prequantized_matmul(x, w_q)` multiplies activations by a `ScaledArray` weight without
dequantizing it: its FP8 values enter a bf16 GEMM as they are and its scales multiply
f32 partial sums. Activations are quantized by the core steps (`mpx.scales`) as the
recipe says.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mpx import formats as formats_lib
from mpx import recipes as recipes_lib
from mpx import kernels
from mpx.kernels import block_fp8
from mpx.dot.backends import decode_kernel_fits, dot, grouped_dot
from mpx.dot.general import tensor_amax
from mpx.config import check_choice
from mpx.dot.spec import IMPLS, DotState, check_state, dims
from mpx.target import Target
from mpx.target import current as current_target
from mpx.formats import upcast
from mpx.scaled import Blocks, ScaledArray, dequantize, quantize, quantize_with_scale
from mpx.scales import compute_amax, compute_scale, grid_values, pad_axis_to

__all__ = ["PREQUANTIZED_IMPLS", "prequantized_matmul", "block_fp8_takes"]

PREQUANTIZED_IMPLS = IMPLS + ("fold_f32", "cpu_kernel")


# Serving stores each weight once as a ScaledArray (FP8 data + f32 scales) and multiplies
# it without dequantizing it: the contraction K is split into groups over which both
# operands' scales are constant; each group is one bf16 x bf16 -> f32 GEMM of exact FP8
# values (bf16 holds every E4M3/E5M2 value), and the f32 partial sums are scaled and
# added, as a block-scaled FP8 GEMM promotes its partial sums every 128 elements
# (DeepSeek-V3 report, 3.3). Per-output-channel and per-tensor weight scales with a
# per-tensor (or no) activation scale need one group: one GEMM whose f32 result is
# scaled per column, exactly.


def _scale_groups(k: int, lhs_group: int, rhs_group: int) -> tuple[int, int] | None:
    """(group width, K padded to whole groups), or None when the scale groups do not nest."""
    up = lambda n, m: -(-n // m) * m  # noqa: E731
    if lhs_group >= k and rhs_group >= k:
        return k, k
    if rhs_group >= k or lhs_group >= k:
        group = min(lhs_group, rhs_group)
        return group, up(k, group)
    lo, hi = sorted((lhs_group, rhs_group))
    return None if hi % lo else (lo, up(k, hi))


def _prequantized_lhs_scale(recipe, state: DotState | None, lhs: jax.Array) -> jax.Array | None:
    """The per-tensor lhs scale of a per-tensor recipe (None for DeepSeekV3 and no recipe)."""
    if recipe is None or recipe.tiled:
        return None
    amax, kw = tensor_amax(lhs), dict(margin=recipe.margin, scale_format=recipe.scale_format)
    if not recipe.stateful:  # current scaling
        return compute_scale(amax, recipe.fwd_format, **kw)
    # Static / delayed: the recorded amax (calibration), never updated while serving; an
    # empty state falls back to this call's amax.
    return recipes_lib.delayed_scale(lax.stop_gradient(state).lhs, recipe.fwd_format, algo=recipe.amax_algo,
                                     current_amax=amax, **kw)


def _lhs_operand(x: jax.Array, recipe, scale, tile: int, compute_dtype, grid_dtype=jnp.bfloat16):
    """x (B, M, K) as (values, scales): FP8 grid values in `grid_dtype` (x in compute_dtype
    without a recipe) and the scales: (B, M, K / tile) per DeepSeek tile, a scalar, or None."""
    if recipe is None:
        return x.astype(compute_dtype), None
    fmt = formats_lib.get(recipe.fwd_format)
    if scale is not None:
        grid = grid_values(x, jnp.reshape(scale, (1, 1, 1)), fmt, x.shape)
        return grid.astype(grid_dtype), scale
    block = (1, 1, tile)
    scale = compute_scale(compute_amax(x, block), fmt, scale_format=recipe.scale_format)  # (B, M, K / tile)
    return grid_values(x, scale, fmt, block).astype(grid_dtype), scale


def _rhs_group_scales(rhs: ScaledArray, group: int, n_groups: int) -> jax.Array:
    """One rhs scale per (B, K group, column): (B, nG, N)."""
    _, rows, cols = rhs.block
    scale = rhs.scale
    if scale.shape[1] == 1:  # one scale along K (per channel or per tensor)
        scale = jnp.broadcast_to(scale, (scale.shape[0], n_groups, scale.shape[2]))
    else:  # groups nest in the row blocks: each row block covers rows // group groups
        scale = jnp.repeat(scale, rows // group, axis=1)[:, :n_groups]
    return jnp.repeat(scale, cols, axis=2)[:, :, :rhs.shape[-1]] if cols > 1 else scale


def _check_prequantized(lhs: jax.Array, rhs: ScaledArray) -> None:
    if not isinstance(rhs, ScaledArray):
        raise TypeError(f"rhs must be a ScaledArray (from mpx.quantize); got {type(rhs).__name__}")
    if rhs.ndim not in (2, 3):
        raise ValueError(f"rhs must be (K, N) or (E, K, N); got shape {rhs.shape}")
    if lhs.shape[-1] != rhs.shape[-2]:
        raise ValueError(f"lhs {lhs.shape} and rhs {rhs.shape} do not contract: K {lhs.shape[-1]} != {rhs.shape[-2]}")
    if rhs.ndim == 3 and (lhs.ndim != 3 or lhs.shape[0] != rhs.shape[0]):
        raise ValueError(f"a batched rhs {rhs.shape} needs lhs (E, M, K) with E={rhs.shape[0]}; got {lhs.shape}")
    if rhs.ndim == 3 and rhs.block[0] != 1:
        raise ValueError(f"a batched rhs needs block size 1 along its batch axis; got block {rhs.block}")


def prequantized_matmul(lhs, rhs: ScaledArray, *, recipe=None, state: DotState | None = None,
                        compute_dtype=jnp.bfloat16, preferred_element_type=jnp.float32,
                        impl: str = "auto", target: Target | None = None) -> jax.Array:
    """Forward-only product of activations with a weight quantized ahead of time (serving).

        out[..., n] = sum_k q(lhs)[..., k] * dequantize(rhs)[k, n]      (f32 accumulation)

    The rhs is never dequantized: its FP8 values enter the GEMM as they are and its
    scales multiply f32 partial sums (see the comment above). lhs is quantized as the
    recipe says: DeepSeekV3 in 1 x `block` tiles along K with online scales (per token);
    CurrentScaling per tensor, online; StaticScaling / DelayedScaling per tensor from the
    recorded amax in `state.lhs` (calibration), online when that is still empty; None
    keeps lhs in `compute_dtype` (weight-only quantization).

    Args:
      lhs: (..., K) activations, or (E, M, K) when rhs is batched (one matmul per expert).
      rhs: ScaledArray (K, N) or (E, K, N) with blocks over its last two axes: whole (per
        tensor), (K, 1) (per output channel) or (b, b) (e.g. 128x128).
      recipe: None, a recipe or its name.
      state: the `DotState` of a stateful recipe; read, never updated.
      compute_dtype: dtype of lhs in the GEMM when recipe is None (bf16 or f32).
      preferred_element_type: output dtype.
      impl: "auto", "upcast_bf16" (the grouped GEMM above), "fp8" (a per-tensor lhs scale
        and one K group: the Hopper `convert(f8) * scalar -> dot` pattern on the raw FP8
        data, column scales after; K groups on a target with FP8 tensor cores:
        `mpx.kernels.block_fp8`; otherwise as "upcast_bf16"), "fold_f32" (both
        operands dequantized into f32, scales folded in, one f32 GEMM: the decode path,
        see `_folded_prequantized`), "cpu_kernel" (the same folded activations times the
        stored FP8 weight in `mpx.kernels.decode_matmul`, which reads it as one byte per
        weight; a 2-D rhs) or "dequant_f32" (the reference: the same product through
        `quantize` / `dequantize`, f32 GEMM at HIGHEST precision). "auto" is "fp8" on
        GPU; on CPU for decode-sized products (`Target.decode_sized`) "cpu_kernel" where
        the kernel is available (`mpx.kernels.status()`) and fits, else "fold_f32"; and
        "upcast_bf16" for more rows (prefill).
      target: the machine compiled for (`mpx.target`); default `mpx.target.current()`.

    Returns:
      (..., N), or (E, M, N) for a batched rhs, in `preferred_element_type`.

    Raises:
      TypeError: rhs is not a ScaledArray.
      ValueError: shapes that do not contract, a batched rhs blocked across experts, an
        unknown recipe or impl, a stateful recipe without state.
    """
    check_choice("impl", impl, PREQUANTIZED_IMPLS)
    recipe = recipes_lib.get(recipe)
    lhs = jnp.asarray(lhs)
    _check_prequantized(lhs, rhs)
    check_state(recipe, state)
    batched = rhs.ndim == 3
    x3 = lhs if batched else lhs.reshape(1, -1, lhs.shape[-1])
    rhs3 = rhs if batched else ScaledArray(rhs.data[None], rhs.scale[None], rhs.fmt, (1,) + tuple(rhs.block))
    scale = _prequantized_lhs_scale(recipe, state, x3)
    k = x3.shape[-1]
    tile = recipe.block if recipe is not None and recipe.tiled else k
    groups = _scale_groups(k, tile, rhs3.block[1])
    target = current_target(target)
    impl = _prequantized_impl(impl, x3.shape[1], rhs, target)
    if impl == "cpu_kernel":
        out = _kernel_prequantized(x3, rhs, recipe, scale, min(tile, k), compute_dtype)
    elif impl == "fold_f32":
        out = _folded_prequantized(x3, rhs3, recipe, scale, min(tile, k), compute_dtype)
    elif groups is None or impl == "dequant_f32":
        out = _reference_prequantized(x3, rhs3, recipe, scale, compute_dtype)
    elif impl == "fp8" and groups[0] == k and scale is not None:
        out = _fp8_prequantized(x3, rhs3, recipe, scale, target)
    elif impl == "fp8" and recipe is not None and block_fp8_takes(groups[0], target):
        out = _block_fp8_prequantized(x3, rhs3, recipe, scale, groups, tile, target)
    else:
        out = _upcast_prequantized(x3, rhs3, recipe, scale, groups, tile, compute_dtype, target)
    shape = out.shape if batched else lhs.shape[:-1] + (rhs.shape[-1],)
    return out.reshape(shape).astype(preferred_element_type)


def _prequantized_impl(impl: str, rows: int, rhs: ScaledArray, target: Target) -> str:
    if impl != "auto":  # "cpu_kernel" on a rhs it cannot read: decode_matmul says why
        return impl
    if rhs.ndim == 2 and decode_kernel_fits(rows, rhs.data, target):
        return "cpu_kernel"
    return "fold_f32" if target.decode_sized(rows) else target.default_impl


def _folded_lhs(x3, recipe, scale, tile: int, compute_dtype) -> jax.Array:
    """x3 quantized as the recipe says, its scales folded into f32 values: (B, M, K)."""
    k = x3.shape[-1]
    k_pad = -(-k // tile) * tile
    xv, sx = _lhs_operand(pad_axis_to(x3, 2, k_pad), recipe, scale, tile, compute_dtype, jnp.float32)
    xv = xv.astype(jnp.float32)
    if sx is not None and jnp.ndim(sx) == 3:  # per-tile scales (B, M, K / tile)
        b, m, _ = xv.shape
        xv = (xv.reshape(b, m, k_pad // tile, tile) * sx[..., None]).reshape(b, m, k_pad)
    elif sx is not None:
        xv = xv * sx
    return xv[:, :, :k]


def _folded_prequantized(x3, rhs3: ScaledArray, recipe, scale, tile: int, compute_dtype):
    """Both operands dequantized into f32 with their scales folded in, one f32 GEMM.

    The same quantized values as the grouped GEMM; only where the scales multiply differs
    (each product value x scale rounds once in f32, 2**-24 relative, exact for
    power-of-two scales). Inside a decode loop the weight's dequantization is loop
    invariant, so XLA computes it once per compiled call and every token pays for one
    f32 matmul, the cost of an fp32 weight.
    """
    xv = _folded_lhs(x3, recipe, scale, tile, compute_dtype)
    return lax.dot_general(xv, dequantize(rhs3), dims(True, 1, 0), preferred_element_type=jnp.float32)


def _kernel_prequantized(x3, rhs: ScaledArray, recipe, scale, tile: int, compute_dtype):
    """The folded activations times the stored FP8 weight in the CPU decode kernel
    (`mpx.kernels`): each weight read as its one byte, its block scales multiplying the
    block's partial sums. The same quantized values as "fold_f32", f32 sums."""
    xv = _folded_lhs(x3, recipe, scale, tile, compute_dtype)
    return kernels.decode_matmul(xv[0], rhs.data, rhs.scale, rhs.block)[None]


def _grouped_lhs(x3, recipe, scale, groups, tile: int, compute_dtype, grid_dtype=jnp.bfloat16):
    """x3 padded to whole K groups and quantized as the recipe says: (values in
    `grid_dtype`, scales per (B, M, K group) for DeepSeek tiles, a scalar, or None)."""
    group, k_pad = groups
    tile = min(tile, k_pad) if tile < x3.shape[-1] else k_pad
    xv, sx = _lhs_operand(pad_axis_to(x3, 2, k_pad), recipe, scale, tile, compute_dtype, grid_dtype)
    if sx is not None and jnp.ndim(sx) == 3 and tile > group:
        sx = jnp.repeat(sx, tile // group, axis=2)  # lhs tiles span several rhs blocks
    return xv, sx


def _upcast_prequantized(x3, rhs3: ScaledArray, recipe, scale, groups, tile: int, compute_dtype, target):
    group, k_pad = groups
    xv, sx = _grouped_lhs(x3, recipe, scale, groups, tile, compute_dtype)
    wdtype = jnp.float32 if jnp.dtype(xv.dtype) == jnp.float32 else jnp.bfloat16
    wv = pad_axis_to(upcast(rhs3.data, wdtype), 1, k_pad)  # exact: bf16 holds every FP8 value
    sw = _rhs_group_scales(rhs3, group, k_pad // group)
    return grouped_dot(xv, sx, wv, sw, group, target)


def block_fp8_takes(group: int, target: Target) -> bool:
    """Whether `mpx.kernels.block_fp8` multiplies K groups of `group` on `target`."""
    return target.fp8_gemms and group in block_fp8.GROUPS and block_fp8.available()


def _block_fp8_prequantized(x3, rhs3: ScaledArray, recipe, scale, groups, tile: int, target: Target):
    """The activations quantized as the recipe says (DeepSeek tiles or one scale) times the
    stored FP8 weight in `mpx.kernels.block_fp8`: FP8 tensor cores, the weight read in
    its (K, N) layout, each K group's partial sums scaled per row and column."""
    group, k_pad = groups
    xv, sx = _grouped_lhs(x3, recipe, scale, groups, tile, None, formats_lib.get(recipe.fwd_format).storage_dtype)
    b, m, n_groups = xv.shape[0], xv.shape[1], k_pad // group
    rows = sx if jnp.ndim(sx) == 3 else jnp.broadcast_to(jnp.reshape(sx, (1, 1, 1)), (b, m, n_groups))
    wv = pad_axis_to(rhs3.data, 1, k_pad)
    product = lambda x, r, w, c: block_fp8.matmul(x, r, w, c, group=group, out_dtype=jnp.float32,  # noqa: E731
                                                  interpret=target.interpret)
    return jax.vmap(product)(xv, rows.astype(jnp.float32), wv, _rhs_group_scales(rhs3, group, n_groups))


def _reference_prequantized(x3, rhs3: ScaledArray, recipe, scale, compute_dtype) -> jax.Array:
    """dequantize(q(lhs)) . dequantize(rhs) in f32 with HIGHEST precision."""
    if recipe is None:
        xd = x3.astype(compute_dtype).astype(jnp.float32)
    elif scale is not None:
        xd = dequantize(quantize_with_scale(x3, scale, recipe.fwd_format, x3.shape))
    else:
        xd = dequantize(quantize(x3, recipe.fwd_format, Blocks((1, recipe.block)),
                                       scale_format=recipe.scale_format))
    return lax.dot_general(xd, dequantize(rhs3), dims(True, 1, 0), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _fp8_prequantized(x3, rhs3: ScaledArray, recipe, scale, target):
    """Per-tensor lhs x one-K-group rhs: raw FP8 data into the Hopper GEMM pattern."""
    q = quantize_with_scale(x3, scale, recipe.fwd_format, x3.shape)
    out = dot((q.data, jnp.reshape(scale, ()), None), (rhs3.data, jnp.ones((), jnp.float32), None), dims(True, 1, 0), target)
    return out * _rhs_group_scales(rhs3, rhs3.shape[1], 1)
