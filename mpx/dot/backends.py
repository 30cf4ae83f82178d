"""Backend paths of the quantized GEMM: how quantized operands are multiplied.

The quantization itself (amax, scale, rounding to the grid, broadcast) is
`mpx.scales`'; this module only decides how its results enter a GEMM:

* `prepare`: an operand as the GEMM consumes it, `(values, scalar or None)`. Per-tensor
  scales stay outside (the result is multiplied by them); block scales are folded into
  the values while upcasting to bf16 ("upcast_bf16"), or the operand is dequantized to
  f32 ("dequant_f32", the reference), or kept as raw FP8 data ("fp8", per tensor).
* `dot`: the GEMM, f32 accumulation, with XLA-on-CPU layout guards.
* `grouped_dot`: sum over K groups of (bf16 GEMM of exact FP8 values) x scales, as a
  block-scaled FP8 GEMM promotes its partial sums every 128 elements.
* `rounded_dot`: the unquantized bf16 GEMM, run as an f32 GEMM of the same rounded
  operands for decode-sized products on CPU (see `FOLD_MAX_ROWS`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from mpx import formats as formats_lib
from mpx.dot.spec import OperandSpec, dims
from mpx.scaled import PerTensor, ScaledArray, dequantize, quantize, quantize_with_scale, resolve_block
from mpx.scales import broadcast_scale, compute_amax, compute_scale, grid_values, scale_shape

# A prepared operand is what a dot consumes: (values, scalar or None). The result of
# the dot is multiplied by the scalars; block scales are already folded into values.
Prepared = tuple[jax.Array, jax.Array | None]

# The most rows (tokens, per batch entry) for which CPU runs a product in f32 instead of
# bf16: "fold_f32" for pre-quantized weights, and `rounded_dot`. For so few rows XLA's
# CPU backend runs a bf16 dot as an f32 dot of upcast operands anyway; on the tiny
# model's decode step the fold leaves ~10% fewer fused ops per token (109 vs 121).
# Training products have batch x sequence rows and never reach it.
FOLD_MAX_ROWS = 16


def quantize_operand(x: jax.Array, spec: OperandSpec, scale: jax.Array | None = None) -> ScaledArray:
    """x quantized per `spec` through the core `quantize` (with `scale` when given)."""
    if scale is not None:
        return quantize_with_scale(x, scale, spec.fmt, resolve_block(spec.granularity, x.shape))
    return quantize(x, spec.fmt, spec.granularity, pow2_scale=spec.pow2, margin=spec.margin)


def operand_scale(x: jax.Array, spec: OperandSpec, block) -> jax.Array:
    """The per-block dequantization scales `spec` gives x (the core amax and scale)."""
    return compute_scale(compute_amax(x, block), spec.fmt, margin=spec.margin, pow2=spec.pow2)


def fold(x: jax.Array, spec: OperandSpec, scale: jax.Array | None) -> Prepared:
    """Quantize x and fold block scales in while upcasting (bf16 holds f8 exactly).

    Bit-identical to upcasting `dequantize(quantize(...))` (per block) or the f8 data
    (per tensor, scale returned as the scalar): the same core steps, computed in one
    fused pass without a round trip through the f8 dtype.
    """
    fmt = formats_lib.get(spec.fmt)
    dtype = jnp.bfloat16 if fmt.mantissa_bits <= 7 else jnp.float32
    block = resolve_block(spec.granularity, x.shape)
    scale = operand_scale(x, spec, block) if scale is None else jnp.asarray(scale, jnp.float32)
    scale = scale.reshape(scale_shape(x.shape, block))
    grid = grid_values(x, scale, fmt, block)
    if tuple(block) == tuple(x.shape):  # per tensor: the scale multiplies the result
        return grid.astype(dtype), scale.reshape(())
    return (grid * broadcast_scale(scale, x.shape, block)).astype(dtype), None


def prepare(x: jax.Array, spec: OperandSpec, impl: str, scale: jax.Array | None = None) -> Prepared:
    """Quantizes x per `spec` into the operand form `impl` multiplies."""
    if impl == "dequant_f32":  # the reference goes through the core's quantize
        return dequantize(quantize_operand(x, spec, scale)), None
    if impl == "fp8" and isinstance(spec.granularity, PerTensor):
        q = quantize_operand(x, spec, scale)
        return q.data, q.scale.reshape(())
    return fold(x, spec, scale)


def is_f8(x: jax.Array) -> bool:
    """Whether x holds a one-byte float dtype."""
    return jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 1


def dot(a: Prepared, b: Prepared, dimension_numbers, guard: bool) -> jax.Array:
    """float32 (a_values . b_values) * a_scalar * b_scalar.

    With `guard` (XLA on CPU), bf16 operands and the result pass through optimization
    barriers: XLA CPU otherwise folds neighbouring transposes into the dot after it has
    chosen its kernel, and its fallback kernel rejects bf16 x bf16 -> f32 (jax 0.10).
    """
    (xa, sa), (xb, sb) = a, b
    precision = lax.Precision.DEFAULT
    if is_f8(xa) and is_f8(xb):
        # convert(f8) * scalar -> dot: XLA's GEMM rewriter makes it a cuBLASLt FP8 GEMM.
        xa, xb, sa, sb = xa.astype(jnp.float32) * sa, xb.astype(jnp.float32) * sb, None, None
        guard = False
    else:
        xa, xb = (v.astype(jnp.bfloat16) if is_f8(v) else v for v in (xa, xb))
        dtype = jnp.promote_types(xa.dtype, xb.dtype)
        xa, xb = xa.astype(dtype), xb.astype(dtype)
        guard = guard and dtype == jnp.bfloat16
        if dtype == jnp.float32:
            precision = lax.Precision.HIGHEST
    if guard:
        xa, xb = lax.optimization_barrier((xa, xb))
    out = lax.dot_general(xa, xb, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)
    if guard:
        out = lax.optimization_barrier(out)
    scalars = [s for s in (sa, sb) if s is not None]
    return out * math.prod(scalars) if scalars else out


def grouped_dot(xv, sx, wv, sw, group: int, guard: bool) -> jax.Array:
    """sum_g (xv_g . wv_g) * sx_g * sw_g in f32.

    xv (B, M, nG * group), wv (B, nG * group, N); sx (B, M, nG), a scalar or None;
    sw (B, nG, N). Returns (B, M, N).
    """
    b, m, k = xv.shape
    n, ng = wv.shape[-1], k // group
    if ng == 1:  # sx is (B, M, 1), a scalar or None: scale the rows and columns of one GEMM
        out = dot((xv, None), (wv, None), dims(True, 1, 0), guard) * sw  # (B, M, N)
        return out if sx is None else out * sx
    xg = jnp.swapaxes(xv.reshape(b, m, ng, group), 1, 2).reshape(b * ng, m, group)
    partial = dot((xg, None), (wv.reshape(b * ng, group, n), None), dims(True, 1, 0), guard)
    partial = partial.reshape(b, ng, m, n) * sw[:, :, None, :]
    if sx is not None and jnp.ndim(sx) == 3:
        partial = partial * jnp.swapaxes(sx, 1, 2)[..., None]
    out = jnp.sum(partial, axis=1)
    return out * sx if sx is not None and jnp.ndim(sx) == 0 else out


def cpu_decode_sized(rows: int) -> bool:
    """Whether a product of `rows` rows runs faster as an f32 dot here (CPU, decode)."""
    return rows <= FOLD_MAX_ROWS and jax.default_backend() == "cpu"


def rounded_dot(lhs, rhs, dimension_numbers, compute_dtype, accum_dtype=jnp.float32) -> jax.Array:
    """`lax.dot_general` of lhs and rhs rounded to `compute_dtype`, accumulated in `accum_dtype`.

    On CPU a bf16 (or fp16) dot with f32 accumulation and at most `FOLD_MAX_ROWS` rows
    (lhs elements outside the contracting and batch axes: a decode step) runs as an f32
    dot of the rounded operands. The products are the same (a product of two bf16
    values is exact in f32) and both accumulate in f32, but XLA's CPU backend runs such
    small bf16 dots slower than f32 ones. Larger dots (every training product: batch x
    sequence rows) are a plain `compute_dtype` dot, where bf16 GEMMs are about twice as
    fast as f32 on CPU.

    Args:
      lhs, rhs: floating arrays.
      dimension_numbers: as in `jax.lax.dot_general`.
      compute_dtype: the dtype both operands are rounded to.
      accum_dtype: the accumulation (and output) dtype.

    Returns:
      The product in `accum_dtype`, lax.dot_general's layout.
    """
    lhs, rhs = jnp.asarray(lhs).astype(compute_dtype), jnp.asarray(rhs).astype(compute_dtype)
    (contracting, _), (batch, _) = dimension_numbers
    rows = math.prod(n for i, n in enumerate(lhs.shape) if i not in (*contracting, *batch))
    narrow = jnp.dtype(compute_dtype).itemsize < 4 and jnp.dtype(accum_dtype) == jnp.dtype(jnp.float32)
    if narrow and cpu_decode_sized(rows):
        lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=accum_dtype)
