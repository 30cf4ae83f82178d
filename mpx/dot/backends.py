"""Backend paths of the quantized GEMM: how quantized operands are multiplied.

The quantization itself (amax, scale, rounding to the grid, broadcast) is
`mpx.scales`'; this module only decides how its results enter a GEMM:

* `prepare`: an operand as the GEMM consumes it, `(values, scalar or None)`. Per-tensor
  scales stay outside (the result is multiplied by them); block scales are folded into
  the values while upcasting to bf16 ("upcast_bf16"), or the operand is dequantized to
  f32 ("dequant_f32", the reference), or kept as raw FP8 data ("fp8", per tensor).
* `dot`: the GEMM, f32 accumulation, with XLA-on-CPU layout guards; on a GPU with FP8
  tensor cores, block-scaled FP8 operands go to `mpx.kernels.block_fp8`.
* `grouped_dot`: sum over K groups of (bf16 GEMM of exact FP8 values) x scales, as a
  block-scaled FP8 GEMM promotes its partial sums every 128 elements.
* `decode_kernel_fits`: whether a decode-sized product (`Target.decode_sized`) runs in
  the CPU decode kernel (`mpx.kernels`), which reads an FP8 or bf16 weight as stored
  rather than through a float32 copy.

Every machine-dependent choice reads the `mpx.target.Target` the caller passes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from mpx import formats as formats_lib
from mpx import kernels
from mpx.kernels import block_fp8
from mpx.target import Target
from mpx.dot.spec import OperandSpec, dims
from mpx.ordering import after, kept
from mpx.scaled import ScaledArray, dequantize, quantize, quantize_with_scale, resolve_block
from mpx.scales import broadcast_scale, compute_amax, compute_scale, grid_values, pad_axis_to, scale_shape

__all__ = [
    "Prepared", "MAX_SCANNED_GROUPS", "quantize_operand", "quantize_parts", "from_grid", "prepare",
    "block_of", "is_f8", "dot", "block_fp8_fits", "guarded_dot", "grouped_product", "grouped_dot",
    "decode_kernel_fits"
]

# A prepared operand is what a dot consumes: (values, scalar or None, block scales or
# None). The result of the dot is multiplied by the scalars; block scales are either
# folded into the values already, or multiply the dot's K-group partial sums.
Prepared = tuple[jax.Array, jax.Array | None, jax.Array | None]

# The most K groups `grouped_product` runs as a scan of per-group GEMMs; past it (wgrad
# over many tokens) both operands are dequantized into f32 for one f32 GEMM, which is
# exact up to f32 rounding too.
MAX_SCANNED_GROUPS = 8


def quantize_operand(x: jax.Array, spec: OperandSpec, scale: jax.Array | None = None) -> ScaledArray:
    """x quantized per `spec` through the core `quantize` (with `scale` when given)."""
    if scale is not None:
        return quantize_with_scale(x, scale, spec.fmt, resolve_block(spec.granularity, x.shape))
    return quantize(x, spec.fmt, spec.granularity, margin=spec.margin, scale_format=spec.scale_format)


def quantize_parts(x: jax.Array, spec: OperandSpec, scale: jax.Array | None = None):
    """(grid values in float32, scales of shape ceil(x.shape / block)) for x under `spec`.

    The core steps (`mpx.scales`), without the round trip through the f8 dtype:
    `grid.astype(fmt.dtype)` is `quantize_operand(x, spec, scale).data`, bit for bit.
    """
    block = resolve_block(spec.granularity, x.shape)
    if scale is None:
        scale = compute_scale(compute_amax(x, block), spec.fmt, margin=spec.margin, scale_format=spec.scale_format)
    scale = jnp.asarray(scale, jnp.float32).reshape(scale_shape(x.shape, block))
    return grid_values(x, scale, spec.fmt, block), scale


def from_grid(grid: jax.Array, scale: jax.Array, spec: OperandSpec, impl: str) -> Prepared:
    """A quantized operand (grid values, per-block scales) in the form `impl` multiplies.

    * "dequant_f32": dequantized f32 values (the reference).
    * per-tensor scales: grid values (raw FP8 data for "fp8") and the scalar.
    * "fp8" with block scales: raw FP8 data and the scales, never folded.
    * "fold_bf16": block scales folded into bf16 values; each value gains up to 2**-9
      relative error unless the scales are powers of two.
    * otherwise ("upcast_bf16"): block scales folded when that is exact (ue8m0 or ue8m3
      scales on FP8 values), else kept for `dot` to apply to K-group partial sums.
    """
    fmt = formats_lib.get(spec.fmt)
    block = resolve_block(spec.granularity, grid.shape)
    if impl == "dequant_f32":  # through the f8 data and the core's dequantize, as `prepare`
        return dequantize(ScaledArray(grid.astype(fmt.storage_dtype), scale, fmt, block)), None, None
    dtype = jnp.bfloat16 if fmt.mantissa_bits <= 7 else jnp.float32  # holds the grid exactly
    if tuple(block) == tuple(grid.shape):  # per tensor: the scale multiplies the result
        values = grid.astype(fmt.storage_dtype if impl == "fp8" else dtype)
        return values, scale.reshape(()), None
    if impl == "fp8":  # raw FP8 data; the block scales multiply K-group partial sums (`dot`)
        return grid.astype(fmt.storage_dtype), None, scale
    if impl != "fold_bf16" and not spec.folds_exactly:
        return grid.astype(dtype), None, scale
    return (grid * broadcast_scale(scale, grid.shape, block)).astype(dtype), None, None


def prepare(x: jax.Array, spec: OperandSpec, impl: str, scale: jax.Array | None = None) -> Prepared:
    """Quantizes x per `spec` into the operand form `impl` multiplies (see `from_grid`)."""
    if impl == "dequant_f32":  # the reference goes through the core's quantize, f8 data included
        return dequantize(quantize_operand(x, spec, scale)), None, None
    return from_grid(*quantize_parts(x, spec, scale), spec, impl)


def block_of(spec: OperandSpec, shape) -> tuple[int, ...]:
    """The block shape `spec` gives an operand of `shape`."""
    return tuple(resolve_block(spec.granularity, shape))


def is_f8(x: jax.Array) -> bool:
    """Whether x holds a one-byte float dtype."""
    return jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 1


def dot(a: Prepared, b: Prepared, dimension_numbers, target: Target, blocks=(None, None),
        out_dtype=jnp.float32) -> jax.Array:
    """(a_values . b_values) * a_scalar * b_scalar in float32, block scales per K group,
    returned in `out_dtype` (one rounding of the f32 result).

    Operands are canonical: a (B?, M, K) contracts its last axis, b is (B?, K, N) or
    (B?, N, K) as `dimension_numbers` say. When an operand carries block scales
    (`blocks` gives its block shape), the product is `grouped_product`'s.

    On a target with barriers (XLA on CPU), bf16 operands and the result pass through
    optimization barriers (`Target.barriers`).
    """
    (xa, sa, ba), (xb, sb, bb) = a, b
    scalars = [s for s in (sa, sb) if s is not None]
    if ba is not None or bb is not None:  # rounded to out_dtype inside unless scalars follow
        out_block = jnp.float32 if scalars else out_dtype
        if block_fp8_fits(a, b, dimension_numbers, blocks, target):
            out = _block_fp8_product(a, b, dimension_numbers, blocks, out_block, target)
        else:
            out = grouped_product((xa, ba), (xb, bb), dimension_numbers, target, blocks, out_block)
    else:
        out = _plain_dot(xa, xb, dimension_numbers, target)
    return (out * math.prod(scalars) if scalars else out).astype(out_dtype)


def block_fp8_fits(a: Prepared, b: Prepared, dimension_numbers, blocks, target: Target) -> bool:
    """Whether a block-scaled product of FP8 operands runs in `mpx.kernels.block_fp8`:
    on a target with FP8 tensor cores, for a K group width the kernel takes."""
    if not (target.fp8_gemms and is_f8(a[0]) and is_f8(b[0]) and block_fp8.available()):
        return False
    return _kernel_group(blocks, _k_last(dimension_numbers, b[0]), a[0].shape[-1]) is not None


def _kernel_group(blocks, k_last: bool, k: int) -> int | None:
    """The kernel's K group width for this product, or None when it takes none: the
    blocks' width, or (one group narrower than any, as when wgrad contracts over fewer
    than 128 tokens) the narrowest width that holds all of K, zero-padded."""
    group = _group(blocks, k_last)
    if group in block_fp8.GROUPS:
        return group
    return next((g for g in block_fp8.GROUPS if group == k <= g), None)


def _k_last(dimension_numbers, xb: jax.Array) -> bool:
    """Whether the canonical b is (B?, N, K) rather than (B?, K, N)."""
    return dimension_numbers[0][1][0] == xb.ndim - 1


def _group(blocks, k_last: bool) -> int:
    """The K group width of a block-scaled product (blocks: the two block shapes)."""
    ba, bb = blocks
    return ba[-1] if ba is not None else bb[-1 if k_last else -2]


def _block_fp8_product(a: Prepared, b: Prepared, dimension_numbers, blocks, out_dtype, target: Target) -> jax.Array:
    """`grouped_product` in `mpx.kernels.block_fp8`: each operand's block scales
    broadcast to a scale per row (a) and per column (b) of every K group; b read in its
    layout."""
    (xa, _, sa), (xb, _, sb) = a, b
    k_last = _k_last(dimension_numbers, xb)
    group = _kernel_group(blocks, k_last, xa.shape[-1])
    ng = -(-xa.shape[-1] // group)
    ba, bb = blocks

    def product(xa, sa, xb, sb):
        m, n = xa.shape[0], xb.shape[0 if k_last else 1]
        rows = jnp.ones((m, ng), jnp.float32) if sa is None else broadcast_scale(sa, (m, ng), (ba[-2], 1))
        if sb is None:
            cols = jnp.ones((ng, n), jnp.float32)
        elif k_last:
            cols = broadcast_scale(sb, (n, ng), (bb[-2], 1)).T
        else:
            cols = broadcast_scale(sb, (ng, n), (1, bb[-1]))
        return block_fp8.matmul(xa, rows, xb, cols, group=group, b_layout="nk" if k_last else "kn",
                                out_dtype=out_dtype, interpret=target.interpret)

    if xa.ndim == 2:
        return product(xa, sa, xb, sb)
    return jax.vmap(product, in_axes=(0, None if sa is None else 0, 0, None if sb is None else 0))(xa, sa, xb, sb)


def _plain_dot(xa: jax.Array, xb: jax.Array, dimension_numbers, target: Target) -> jax.Array:
    precision = lax.Precision.DEFAULT
    if is_f8(xa) and is_f8(xb):
        # convert(f8) * scalar -> dot: XLA's GEMM rewriter makes it a cuBLASLt FP8 GEMM
        # (the caller multiplies the result by the scalars, which XLA moves onto it).
        xa, xb = xa.astype(jnp.float32), xb.astype(jnp.float32)
    else:
        xa, xb = (v.astype(jnp.bfloat16) if is_f8(v) else v for v in (xa, xb))
        dtype = jnp.promote_types(xa.dtype, xb.dtype)
        xa, xb = xa.astype(dtype), xb.astype(dtype)
        if dtype == jnp.float32:
            precision = lax.Precision.HIGHEST
    return guarded_dot(xa, xb, dimension_numbers, target, precision=precision)


def guarded_dot(xa: jax.Array, xb: jax.Array, dimension_numbers, target: Target, *,
                precision=lax.Precision.DEFAULT, accum=jnp.float32) -> jax.Array:
    """`lax.dot_general`; on a target with barriers (XLA on CPU) and bf16 operands, behind
    optimization barriers on operands and result (see `dot`)."""
    guard = target.barriers and xa.dtype == jnp.bfloat16
    if guard:
        xa, xb = lax.optimization_barrier((xa, xb))
    out = lax.dot_general(xa, xb, dimension_numbers, precision=precision, preferred_element_type=accum)
    return lax.optimization_barrier(out) if guard else out


def grouped_product(a, b, dimension_numbers, target: Target, blocks, out_dtype=jnp.float32) -> jax.Array:
    """sum_g (a_g . b_g) * scale_a_g * scale_b_g over K groups, in f32, returned in
    `out_dtype`.

    Each K group is one GEMM of exact grid values (bf16 x bf16 products are exact in
    f32, accumulated in f32) whose partial sums are scaled and added to an f32
    accumulator, as DeepSeek-V3's block-scaled GEMM promotes its partial sums every 128
    elements: exact up to f32 rounding. The groups run in a `lax.scan` of 2-D GEMMs: on
    CPU one batched GEMM over the groups is slower, and it would hold every group's
    partial sums at once. A product of many rows runs in chunks of rows
    (`Target.row_chunk`): XLA has no GEMM that adds into its output, so the running sum and one
    group's partial sums are two f32 buffers of the chunk's size, not of the whole
    result's.

    Args:
      a: (values (B?, M, K), scales or None), scales of shape ceil(shape / block).
      b: (values (B?, K, N) or (B?, N, K), scales or None).
      dimension_numbers: canonical; a contracts its last axis.
      target: the compile target (barriers, chunk sizes).
      blocks: (a's block shape, b's block shape); an entry is None without scales.

    Returns:
      (B?, M, N) float32.

    Raises:
      ValueError: when the operands' K groups differ in width.
    """
    (xa, sa), (xb, sb) = a, b
    batched = xa.ndim == 3
    k_last = _k_last(dimension_numbers, xb)
    if not batched:
        xa, xb = xa[None], xb[None]
        sa, sb = (None if s is None else s[None] for s in (sa, sb))
        blocks = tuple(None if bl is None else (1, *bl) for bl in blocks)
    ba, bb = blocks
    group = _group(blocks, k_last)
    if ba is not None and bb is not None and bb[-1 if k_last else -2] != group:
        raise ValueError(f"K groups of the two operands differ: blocks {ba} and {bb}")
    bsz, m, k = xa.shape
    ng = -(-k // group)
    chunks = _row_chunks(m, bsz, ba, ng, target.row_chunk)
    if chunks > 1:
        batched_dims = (((2,), (2 if k_last else 1,)), ((0,), (0,)))
        out = _by_rows(lambda xa_, sa_: grouped_product((xa_, sa_), (xb, sb), batched_dims, target, blocks, out_dtype),
                       xa, sa, chunks, xb.shape[1] if k_last else xb.shape[2], out_dtype)
        return out if batched else out[0]
    if ng > MAX_SCANNED_GROUPS:  # many small GEMMs: dequantize into f32 operands instead
        out = _dequantized_product((xa, sa, ba), (xb, sb, bb), k_last, target, out_dtype)
        return out if batched else out[0]
    xa, xb = pad_axis_to(xa, 2, ng * group), pad_axis_to(xb, 2 if k_last else 1, ng * group)
    n = xb.shape[1] if k_last else xb.shape[2]
    xs = (_groups_first(xa, ng, 2), _groups_first(xb, ng, 2 if k_last else 1),
          _row_scales(sa, ba, (bsz, m, ng)), _col_scales(sb, bb, (bsz, n, ng), k_last))
    gdims = (((2,), (2 if k_last else 1,)), ((0,), (0,)))

    def scaled_partial(group_xs):
        x, w, rows, cols = group_xs
        partial = _plain_dot(x, w, gdims, target)  # (B, M, N)
        if rows is not None:
            partial = partial * rows[:, :, None]
        if cols is not None:
            partial = partial * cols[:, None, :]
        return partial

    # The first group starts the sum: a zero-filled accumulator would be one more
    # output-sized buffer, which XLA on CPU allocates at the start of the program.
    out = scaled_partial(jax.tree.map(lambda x: None if x is None else x[0], xs))
    if ng > 1:
        rest = jax.tree.map(lambda x: None if x is None else x[1:], xs)
        # Each group's GEMM waits for the running sum (`after`): otherwise XLA on CPU runs
        # the GEMMs of an unrolled scan first and holds all their partial sums at once.
        # The wait adds 0 to the bf16 bit patterns: an f32 addition would let XLA convert
        # every group to f32 ahead of the loop.
        def add_group(acc, group_xs):
            return acc + scaled_partial((after(group_xs[0], acc, bitwise=True), *group_xs[1:])), None

        out, _ = lax.scan(add_group, out, rest)
    out = out.astype(out_dtype)
    return out if batched else out[0]


def _dequantized_product(a, b, k_last: bool, target: Target, out_dtype) -> jax.Array:
    """(B, M, N) = dequantized a . dequantized b in f32 GEMMs, over chunks of about
    `Target.col_chunk` of b's columns one after another where each column has scales of its
    own: only one chunk of b is dequantized into f32 at a time.

    Chunk c holds columns c, c + chunks, ... (interleaved, as `_by_rows` interleaves
    rows): on a mesh that shards the columns in contiguous blocks every device holds its
    share of every chunk. The chunks are unrolled: as a loop over dynamic slices, XLA
    on CPU converted the whole operand to f32 ahead of the loop."""
    (xa, sa, ba), (xb, sb, bb) = a, b
    fa = _dequantized(xa, sa, ba)
    axis = 1 if k_last else 2
    n = xb.shape[axis]
    width = target.col_chunk
    chunks = n // width if n >= width and n % width == 0 and (bb is None or bb[axis] == 1) else 1
    split = lambda x: x.reshape(*x.shape[:axis], -1, chunks, *x.shape[axis + 1:])  # noqa: E731
    xb, sb, outs = split(xb), None if sb is None else split(sb), []
    for c in range(chunks):
        xb_c = lax.index_in_dim(xb, c, axis=axis + 1, keepdims=False)
        if outs:  # after the previous chunk's GEMM, or XLA runs them all at once
            xb_c = after(xb_c, outs[-1], bitwise=True)
        sb_c = None if sb is None else lax.index_in_dim(sb, c, axis=axis + 1, keepdims=False)
        fb = _dequantized(xb_c, sb_c, bb)
        outs.append(_plain_dot(fa, fb, (((2,), (2 if k_last else 1,)), ((0,), (0,))), target).astype(out_dtype))
    out = jnp.stack(outs, axis=-1)  # (B, M, N / chunks, chunks): column j * chunks + c
    return out.reshape(*out.shape[:2], n)


def _dequantized(x: jax.Array, scale: jax.Array | None, block) -> jax.Array:
    """Grid values x times their block scales (if any), in f32."""
    x = x.astype(jnp.float32)
    return x if scale is None else x * broadcast_scale(scale, x.shape, block)


def _row_chunks(m: int, bsz: int, block, ng: int, row_chunk: int) -> int:
    """How many chunks of rows `grouped_product` splits m rows into: 1 (no split) for a
    single K group, a batch (its chunks would need a transposed copy), scales shared by
    several rows (the chunks interleave rows), or rows that do not split evenly into
    chunks of at least 128 rows."""
    if ng < 2 or bsz != 1 or m <= row_chunk or ng > MAX_SCANNED_GROUPS or (block is not None and block[1] != 1):
        return 1
    for n in range(-(-m // row_chunk), m // 128 + 1):
        if m % n == 0:
            return n
    return 1


def _by_rows(product, xa: jax.Array, sa: jax.Array | None, chunks: int, n: int, out_dtype) -> jax.Array:
    """product(rows of xa, their scales) -> (1, rows, n), over `chunks` chunks of rows one
    at a time, written into one (1, M, n) result. xa is (1, M, K), sa (1, M, nG) (a scale
    per row) or None.

    Chunk c holds rows c, c + chunks, c + 2 chunks, ...: on a mesh that shards the rows
    in contiguous blocks, every device holds its share of every chunk, so the loop moves
    no data between devices (contiguous chunks would gather each one). The result buffer
    starts from zeros that depend on xa (`after`): a loop's output that depends on
    nothing is allocated by XLA on CPU at the start of the program, for every layer at
    once."""
    m = xa.shape[1]
    rows = m // chunks
    interleaved = lambda x: x.reshape(1, rows, chunks, *x.shape[2:])  # noqa: E731 (row r * chunks + c)
    xa = interleaved(kept(xa))  # a buffer in xa's dtype: XLA would carry the f32 it was made from into the loop
    sa = None if sa is None else interleaved(sa)

    def chunk(i, out):
        xa_i = lax.dynamic_index_in_dim(xa, i, axis=2, keepdims=False)
        sa_i = None if sa is None else lax.dynamic_index_in_dim(sa, i, axis=2, keepdims=False)
        return lax.dynamic_update_index_in_dim(out, product(xa_i, sa_i), i, axis=2)

    out = lax.fori_loop(0, chunks, chunk, after(jnp.zeros((1, rows, chunks, n), out_dtype), xa))
    return out.reshape(1, m, n)


def _groups_first(x: jax.Array, ng: int, axis: int) -> jax.Array:
    """(B, ..., nG * g, ...) with K at `axis` -> (nG, B, ..., g, ...)."""
    shape = x.shape[:axis] + (ng, x.shape[axis] // ng) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _row_scales(scale, block, shape) -> jax.Array | None:
    """Per-row, per-group scales (nG, B, M) from a's (B, M / bm, nG), or None."""
    if scale is None:
        return None
    return jnp.moveaxis(broadcast_scale(scale, shape, (1, block[1], 1)), 2, 0)


def _col_scales(scale, block, shape, k_last: bool) -> jax.Array | None:
    """Per-column, per-group scales (nG, B, N) from b's (B, nG, N / bn) (or (B, N / bn, nG)
    when b is (B, N, K)), or None."""
    if scale is None:
        return None
    if k_last:
        return jnp.moveaxis(broadcast_scale(scale, shape, (1, block[1], 1)), 2, 0)
    bsz, n, ng = shape
    return jnp.moveaxis(broadcast_scale(scale, (bsz, ng, n), (1, 1, block[2])), 1, 0)


def grouped_dot(xv, sx, wv, sw, group: int, target: Target) -> jax.Array:
    """sum_g (xv_g . wv_g) * sx_g * sw_g in f32.

    xv (B, M, nG * group), wv (B, nG * group, N); sx (B, M, nG), a scalar or None;
    sw (B, nG, N). Returns (B, M, N).
    """
    b, m, k = xv.shape
    n, ng = wv.shape[-1], k // group
    if ng == 1:  # sx is (B, M, 1), a scalar or None: scale the rows and columns of one GEMM
        out = dot((xv, None, None), (wv, None, None), dims(True, 1, 0), target) * sw  # (B, M, N)
        return out if sx is None else out * sx
    xg = jnp.swapaxes(xv.reshape(b, m, ng, group), 1, 2).reshape(b * ng, m, group)
    partial = dot((xg, None, None), (wv.reshape(b * ng, group, n), None, None), dims(True, 1, 0), target)
    partial = partial.reshape(b, ng, m, n) * sw[:, :, None, :]
    if sx is not None and jnp.ndim(sx) == 3:
        partial = partial * jnp.swapaxes(sx, 1, 2)[..., None]
    out = jnp.sum(partial, axis=1)
    return out * sx if sx is not None and jnp.ndim(sx) == 0 else out


def decode_kernel_fits(rows: int, weight, target: Target) -> bool:
    """Whether a decode-sized product with a 2-D `weight` (its stored array) runs in
    `mpx.kernels.decode_matmul`, which reads it in its stored width (FP8, bf16)."""
    return target.decode_sized(rows) and kernels.supports(weight) and kernels.available()
