"""The unquantized low-precision GEMM: operands rounded to a compute dtype, f32 sums.

`rounded_dot` is what a layer without an FP8 recipe runs (bf16 in the bf16 and FP8
presets). Autodiff of `lax.dot_general(bf16, bf16, preferred_element_type=f32)` would
run both backward GEMMs in f32: the cotangent arrives in f32, so the transposed dots
upcast their bf16 operand and take the f32 path, at half the speed of a bf16 GEMM on
CPU and with an f32 copy of every saved input. When the caller rounds the result to
the compute dtype anyway (`cotangent_dtype`), the cotangent holds values of that dtype,
and rounding it back is exact: the backward GEMMs then run bf16 x bf16 -> f32 too,
with the same values.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mpx import kernels
from mpx.dot.backends import decode_kernel_fits, guarded_dot
from mpx.sharding import explicit
from mpx.target import Target
from mpx.target import current as current_target

__all__ = ["rounded_dot", "transpose_lhs", "transpose_rhs"]


@explicit.auto_inside(explicit.dot_specs)
def rounded_dot(lhs, rhs, dimension_numbers, compute_dtype, accum_dtype=jnp.float32, *,
                cotangent_dtype=None, target: Target | None = None) -> jax.Array:
    """`lax.dot_general` of lhs and rhs rounded to `compute_dtype`, accumulated in `accum_dtype`.

    On CPU a bf16 (or fp16) dot with f32 accumulation and few rows (`Target.decode_sized`:
    lhs elements outside the contracting and batch axes, a decode step) runs as an f32
    dot of the rounded operands; when rhs is a 2-D bf16 weight (contracted over one axis,
    lhs over its last) it runs in `mpx.kernels.decode_matmul`, which reads the weight as
    bf16 instead of through a float32 copy. The products are the same (a product of two bf16
    values is exact in f32) and both accumulate in f32, but XLA's CPU backend runs such
    small bf16 dots slower than f32 ones. Larger dots (every training product: batch x
    sequence rows) are a plain `compute_dtype` dot, where bf16 GEMMs are about twice as
    fast as f32 on CPU.

    Args:
      lhs, rhs: floating arrays.
      dimension_numbers: as in `jax.lax.dot_general`.
      compute_dtype: the dtype both operands are rounded to.
      accum_dtype: the accumulation (and output) dtype.
      cotangent_dtype: round the incoming gradient to this dtype before the backward
        GEMMs (which then multiply in `compute_dtype`, summing in `accum_dtype`). Exact
        when the caller rounds the result to it; None keeps autodiff's f32 backward.
      target: the machine compiled for (`mpx.target`); default `mpx.target.current()`.

    Returns:
      The product in `accum_dtype`, lax.dot_general's layout.
    """
    lhs, rhs = jnp.asarray(lhs).astype(compute_dtype), jnp.asarray(rhs).astype(compute_dtype)
    (contracting, _), (batch, _) = dimension_numbers
    rows = math.prod(n for i, n in enumerate(lhs.shape) if i not in (*contracting, *batch))
    narrow = jnp.dtype(compute_dtype).itemsize < 4 and jnp.dtype(accum_dtype) == jnp.dtype(jnp.float32)
    target = current_target(target)
    if narrow and target.decode_sized(rows):
        product = _kernel_product(lhs, rhs, dimension_numbers, rows, target)
        if product is not None:
            return product.astype(accum_dtype)
        lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    elif cotangent_dtype is not None:
        dn = _hashable(dimension_numbers)
        return _dot_with_rounded_grads(dn, jnp.dtype(accum_dtype), jnp.dtype(cotangent_dtype), target, lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=accum_dtype)


def _kernel_product(lhs, rhs, dimension_numbers, rows: int, target: Target):
    """lhs . rhs through the CPU decode kernel, or None where it does not apply: rhs a
    2-D weight of a kernel dtype, contracted over one axis with lhs's last, no batch."""
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or tuple(lc) != (lhs.ndim - 1,) or len(rc) != 1 or not decode_kernel_fits(rows, rhs, target):
        return None
    transposed = tuple(rc) == (1,)
    out = kernels.decode_matmul(lhs.reshape(rows, lhs.shape[-1]).astype(jnp.float32), rhs, transposed=transposed)
    return out.reshape(lhs.shape[:-1] + (out.shape[-1],))


def _hashable(dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _dot_with_rounded_grads(dn, accum, cotangent, target, lhs, rhs):
    return lax.dot_general(lhs, rhs, dn, preferred_element_type=accum)


def _fwd(dn, accum, cotangent, target, lhs, rhs):
    return _dot_with_rounded_grads(dn, accum, cotangent, target, lhs, rhs), (lhs, rhs)


def _bwd(dn, accum, cotangent, target, residuals, g):
    lhs, rhs = residuals
    g = g.astype(cotangent).astype(lhs.dtype)
    d_lhs = transpose_lhs(g, rhs, dn, lhs.ndim, accum, target)
    d_rhs = transpose_rhs(g, lhs, dn, rhs.ndim, accum, target)
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


_dot_with_rounded_grads.defvjp(_fwd, _bwd)


def _free_axes(ndim: int, *used) -> list[int]:
    taken = {a for axes in used for a in axes}
    return [a for a in range(ndim) if a not in taken]


def transpose_lhs(g, rhs, dimension_numbers, lhs_ndim: int, accum, target: Target) -> jax.Array:
    """d lhs of `lax.dot_general(lhs, rhs, dimension_numbers)` for output cotangent g.

    g's axes are (batch, lhs free, rhs free); contracting g's rhs-free axes with rhs's
    free axes leaves (batch, lhs free, lhs contracting in rhs's order), put back in
    lhs's axis order.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    l_free, r_free = _free_axes(lhs_ndim, lc, lb), _free_axes(rhs.ndim, rc, rb)
    g_r_free = tuple(range(len(lb) + len(l_free), g.ndim))
    out = guarded_dot(g, rhs, ((g_r_free, tuple(r_free)), (tuple(range(len(lb))), tuple(rb))), target, accum=accum)
    lc_in_r_order = [lc[i] for i in np.argsort(rc)]
    return lax.transpose(out, tuple(np.argsort(list(lb) + l_free + lc_in_r_order)))


def transpose_rhs(g, lhs, dimension_numbers, rhs_ndim: int, accum, target: Target) -> jax.Array:
    """d rhs of `lax.dot_general(lhs, rhs, dimension_numbers)` for output cotangent g."""
    (lc, rc), (lb, rb) = dimension_numbers
    l_free, r_free = _free_axes(lhs.ndim, lc, lb), _free_axes(rhs_ndim, rc, rb)
    g_l_free = tuple(range(len(lb), len(lb) + len(l_free)))
    out = guarded_dot(g, lhs, ((g_l_free, tuple(l_free)), (tuple(range(len(lb))), tuple(lb))), target, accum=accum)
    rc_in_l_order = [rc[i] for i in np.argsort(lc)]
    return lax.transpose(out, tuple(np.argsort(list(rb) + r_free + rc_in_l_order)))

