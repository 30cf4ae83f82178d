"""Softmax attention whose backward pass recomputes the probabilities instead of keeping them.

`softmax_attention` is the grouped-query core `mpx.nn.grouped_attention` runs when QK^T
has no FP8 recipe (every preset). Its forward pass is the plain one, op for op:

    logits = (q @ k^T) in qk.compute, accumulated in qk.accum, rounded to qk.output
    probs  = softmax(where(mask, logits, f32 min)) in f32
    out    = (probs @ v) in pv.compute, accumulated in pv.accum, rounded to pv.output

Autodiff of that would keep the (T, S) logits and probabilities of every layer in f32 until
the backward pass reaches it: at training lengths more than every other activation
together. This custom VJP keeps q, k, v and the
softmax's row max and row sum, (T,) per head, and recomputes the probabilities
(equal to the forward's up to the f32 summation order of the recomputed QK^T) in the
backward pass. The backward is FlashAttention's, tiled along the queries only:

    dV = P^T dO      dP = dO V^T      dS = P * (dP - rowsum(P * dP))
    dQ = dS K        dK = dS^T Q

with each dot's operands rounded as the forward's were and the softmax gradient in f32.
Both passes run `query_block` queries at a time (a `lax.scan`; every block sees all S
keys, so each row's softmax is complete within its block and the forward values do not
depend on the block size): one block's (T, S) buffers are alive at a time, 10 bytes per
query, key and head in the backward pass. dK and dV are summed over the blocks in f32.
The recomputation is made to wait for the incoming gradient (`mpx.ordering.after`), so
XLA cannot hoist every layer's recomputation to the start of the backward pass (which
would bring the memory back).

PV in FP8 (`Fp8Values`, the fp8 presets: the seed's "Value projection in FP8", as
FlashAttention-3 does it): the three PV products (out = P V, dV = P^T dO, dP = dO V^T)
take FP8 operands. The probabilities, in [0, 1], are cast at a fixed power-of-two scale
(256 for E4M3: no amax, no rounding from the scale, down to 2^-17 resolved); V
(forward format) and dO (backward format) are scaled from their amax once per call, one
scale per batch row and key/value head (so a sequence's result never depends on the
others in its batch; keys no query sees are zeroed first). Each product accumulates in f32 and is multiplied by the two scales: the
pattern XLA's GEMM rewriter turns into an FP8 cuBLASLt GEMM on Hopper. QK^T, dQ and dK
stay in qk's dtypes, and the softmax and its gradient in f32.

Shapes: B batch, G key/value heads, R query heads per key/value head, T queries, S keys,
D head dim.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mpx import formats as formats_lib
from mpx import target as target_lib
from mpx.dot import backends
from mpx.dot.rounded import rounded_dot
from mpx.ordering import after
from mpx.scaled import quantize
from mpx.sharding import explicit

__all__ = ["QUERY_BLOCK", "Dtypes", "Fp8Values", "softmax_attention", "visible_keys", "hide"]

Array = jax.Array
_F32 = jnp.float32
# (B, G, R, T, D) x (B, G, S, D) -> (B, G, R, T, S), batched over B and G
_QK = (((4,), (3,)), ((0, 1), (0, 1)))
# (B, G, R, T, S) x (B, G, S, D) -> (B, G, R, T, D)
_PV = (((4,), (2,)), ((0, 1), (0, 1)))
# Keys-major, for the backward pass:
# (B, G, S, D) x (B, G, R, T, D) -> (B, G, S, R, T): K Q^T, and V dO^T
_KQ = (((3,), (4,)), ((0, 1), (0, 1)))
# (B, G, S, R, T) x (B, G, R, T, D) -> (B, G, S, D), contracting R and T: P^T dO, dS^T Q
_OVER_QUERIES = (((3, 4), (2, 3)), ((0, 1), (0, 1)))
# (B, G, S, R, T) x (B, G, S, D) -> (B, G, R, T, D), contracting S: dS K
_OVER_KEYS = (((2,), (2,)), ((0, 1), (0, 1)))
# Queries per block of `softmax_attention`: one block's (T, S) buffers are alive at a time.
QUERY_BLOCK = 64


class Dtypes(NamedTuple):
    """One contraction's dtypes: operands rounded to `compute`, summed in `accum`,
    the result rounded to `output` (a `mpx.Precision` without a recipe)."""

    compute: jnp.dtype
    accum: jnp.dtype
    output: jnp.dtype

    @classmethod
    def of(cls, precision) -> "Dtypes":
        """The dtypes of a `mpx.Precision` (its recipe, if any, is not read)."""
        return cls(jnp.dtype(precision.compute_dtype), jnp.dtype(precision.accum_dtype),
                   jnp.dtype(precision.output_dtype))


class Fp8Values(NamedTuple):
    """The PV products in FP8: V and the probabilities in `fwd_format`, dO in `bwd_format`
    (format names of `mpx.formats`), scaled as the module docstring says."""

    fwd_format: str = "e4m3"
    bwd_format: str = "e5m2"

    @classmethod
    def of(cls, recipe) -> "Fp8Values":
        """The formats of an FP8 recipe (any `mpx.recipes` recipe: its fwd/bwd formats)."""
        return cls(recipe.fwd_format, recipe.bwd_format)

    @property
    def probs_scale(self) -> float:
        """The largest power of two within the forward format's range: probabilities (at
        most 1) times it never saturate, and the scaling itself rounds nothing."""
        return 2.0 ** math.floor(math.log2(formats_lib.get(self.fwd_format).max))


@explicit.auto_inside(explicit.like_first)
def softmax_attention(q: Array, k: Array, v: Array, mask: Array | None, qk: Dtypes, pv: Dtypes,
                      query_block: int = QUERY_BLOCK, values: Fp8Values | None = None) -> Array:
    """Grouped-query softmax attention, differentiable, keeping no (T, S) residual.

    Args:
      q: (B, G, R, T, D) queries, already multiplied by the softmax scale.
      k, v: (B, G, S, D) keys and values.
      mask: bool (or int8) broadcastable to (B, G, R, T, S), True where a key is
        visible, or None. A row that sees no key gets uniform weights and passes no
        gradient to its logits, as the plain path does.
      qk, pv: the dtypes of the QK^T and PV contractions.
      query_block: the most queries per block: T is cut into ceil(T / query_block)
        blocks of equal size (the last one padded), and one block's (T, S) buffers
        exist at a time, forward and backward.
      values: run the PV products in FP8 with these formats (pv's compute and accum
        dtypes then do not apply; its output dtype does); None: in pv's dtypes.

    Returns:
      (B, G, R, T, D) in `pv.output`.

    Raises:
      ValueError: `query_block` below 1.
    """
    if query_block < 1:
        raise ValueError(f"query_block must be a positive number of queries; got {query_block}")
    visible = visible_keys(mask)
    if visible is not None:  # (T, S) or (B, 1, T, S) -> five axes, to split along T
        visible = visible.reshape((1,) * (5 - visible.ndim) + visible.shape)
    return _attention(qk, pv, values, min(query_block, q.shape[3]), q, k, v, visible)


def visible_keys(mask: Array | None) -> Array | None:
    """An attention mask as bool (True: the key is visible), or None.

    Raises:
      TypeError: a mask that is not bool or (u)int8.
    """
    if mask is None:
        return None
    if mask.dtype not in (jnp.bool_, jnp.int8, jnp.uint8):
        raise TypeError(f"attention mask must be bool or int8; got {mask.dtype}")
    return mask.astype(jnp.bool_)


def hide(logits: Array, visible: Array | None) -> Array:
    """f32 logits with hidden keys set to the lowest f32 (softmax weight 0)."""
    logits = logits.astype(_F32)
    return logits if visible is None else jnp.where(visible, logits, jnp.finfo(_F32).min)


def _logits(a: Array, b: Array, dimension_numbers, visible: Array | None, qk: Dtypes) -> Array:
    return hide(rounded_dot(a, b, dimension_numbers, qk.compute, qk.accum).astype(qk.output), visible)


def _softmax_stats(logits: Array) -> tuple[Array, Array]:
    """Row max and row sum of exp(logits - max), as jax.nn.softmax forms them."""
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    return row_max, jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True)


def _probs(logits: Array, row_max: Array, row_sum: Array) -> Array:
    return jnp.exp(logits - row_max) / row_sum


def _head_fp8(x: Array, fmt: str) -> tuple[Array, Array]:
    """x (B, G, ...) in `fmt` with one current (amax) scale per batch row and key/value
    head, so no sequence's numbers depend on the others in its batch: (FP8 data, f32
    dequantization scales (B, G))."""
    q = quantize(x, fmt, (1, 1) + x.shape[2:])
    return q.data, q.scale.reshape(x.shape[:2])


def _values_operand(v: Array, values: Fp8Values | None, visible) -> tuple[Array, Array | None]:
    """V as the PV products take it: itself, or (FP8 data, scales) under `values`. Keys no
    query sees (padding, cache slots past a row's length) are zeroed first: they get no
    weight, and neither their values nor stale garbage may move the scale."""
    if values is None:
        return v, None
    if visible is not None:  # (B', G', R', T', S) -> a key seen by any query of the row
        seen = jnp.any(visible, axis=(2, 3))[..., None]  # (B', G', S, 1)
        v = jnp.where(seen, v, jnp.zeros((), v.dtype))
    return _head_fp8(v, values.fwd_format)


def _per_head(scale: Array, ndim: int) -> Array:
    """A scalar or (B, G) scales, broadcast against a (B, G, ...) product of `ndim` axes."""
    return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim))


def _probs_operand(probs: Array, values: Fp8Values | None) -> tuple[Array, Array | None]:
    """The probabilities as the PV products take them: themselves, or under `values` cast
    at the fixed scale with its dequantization scale."""
    if values is None:
        return probs, None
    scale = values.probs_scale
    return formats_lib.cast(probs * scale, values.fwd_format), jnp.asarray(1.0 / scale, _F32)


def _pv_dot(pv: Dtypes, a: tuple[Array, Array | None], b: tuple[Array, Array | None], dimension_numbers) -> Array:
    """One PV product of operands as `_values_operand`, `_probs_operand` and `_head_fp8`
    give them, as (values, scale): in pv's dtypes where the scales are None, else f32
    (a . b) * scales of the FP8 operands (an FP8 GEMM on Hopper, its result multiplied)."""
    (a, sa), (b, sb) = a, b
    if sa is None:
        return rounded_dot(a, b, dimension_numbers, pv.compute, pv.accum)
    out = backends.dot((a, None, None), (b, None, None), dimension_numbers, target_lib.current())
    return out * _per_head(sa, out.ndim) * _per_head(sb, out.ndim)


def _block_forward(qk: Dtypes, pv: Dtypes, values: Fp8Values | None, q, k, v, visible):
    """One query block: (output, row max, row sum). v is `_values_operand`'s (values, scale)."""
    logits = _logits(q, k, _QK, visible, qk)
    row_max, row_sum = _softmax_stats(logits)
    out = _pv_dot(pv, _probs_operand(_probs(logits, row_max, row_sum), values), v, _PV)
    return out.astype(pv.output), row_max, row_sum


def _block_backward(qk: Dtypes, pv: Dtypes, values: Fp8Values | None, q, k, v, visible, row_max, row_sum, d_out):
    """One query block's (dQ, dK, dV), dK and dV in f32 (summed over the blocks). v and
    d_out are (values, scale) pairs, FP8 with their scales under `values`."""
    # Everything here runs keys-major, (B, G, S, R, T): the layout dV and dK contract in,
    # and one the forward pass never formed, so XLA's common-subexpression pass cannot
    # merge the recomputed logits into the forward's and keep those alive instead.
    visible = None if visible is None else jnp.moveaxis(visible, -1, 2)
    logits = _logits(k, q, _KQ, visible, qk)
    probs = _probs(logits, jnp.moveaxis(row_max, -1, 2), jnp.moveaxis(row_sum, -1, 2))
    d_v = _pv_dot(pv, _probs_operand(probs, values), d_out, _OVER_QUERIES)  # (B, G, S, D)
    d_probs = _pv_dot(pv, v, d_out, _KQ).astype(_F32)  # (B, G, S, R, T)
    d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=2, keepdims=True))
    if visible is not None:  # where() passes no gradient to hidden keys, even in a row with none visible
        d_logits = jnp.where(visible, d_logits, 0.0)
    d_logits = d_logits.astype(qk.output)  # the forward rounded the logits to qk.output
    d_q = rounded_dot(d_logits, k, _OVER_KEYS, qk.compute, qk.accum)  # (B, G, R, T, D)
    d_k = rounded_dot(d_logits, q, _OVER_QUERIES, qk.compute, qk.accum)  # (B, G, S, D)
    return d_q.astype(q.dtype), d_k.astype(_F32), d_v.astype(_F32)


def _split(x: Array, n: int, fill) -> Array:
    """(B, G, R, T, ...) -> (n, B, G, R, ceil(T / n) ...): axis 3 padded with `fill` and
    cut into n blocks."""
    size = -(-x.shape[3] // n)
    pad = [(0, 0)] * x.ndim
    pad[3] = (0, n * size - x.shape[3])
    x = jnp.pad(x, pad, constant_values=fill)
    return jnp.moveaxis(x.reshape(x.shape[:3] + (n, size) + x.shape[4:]), 3, 0)


def _join(x: Array, length: int) -> Array:
    """The inverse of `_split`: (n, B, G, R, size, ...) -> (B, G, R, length, ...)."""
    x = jnp.moveaxis(x, 0, 3)
    return x.reshape(x.shape[:3] + (-1,) + x.shape[5:])[:, :, :, :length]


def _query_blocks(visible: Array | None, n: int, length: int):
    """The mask per query block: split when it varies along the queries, else shared."""
    if visible is None or visible.shape[3] == 1:
        return None, visible
    visible = jnp.broadcast_to(visible, visible.shape[:3] + (length,) + visible.shape[4:])
    return _split(visible, n, True), None


def _forward(qk: Dtypes, pv: Dtypes, values: Fp8Values | None, block: int, q, k, v, visible):
    t = q.shape[3]
    n = -(-t // block)
    vq = _values_operand(v, values, visible)
    if n == 1:
        out, row_max, row_sum = _block_forward(qk, pv, values, q, k, vq, visible)
        return out, (q, k, v, visible, row_max, row_sum)
    split_mask, shared_mask = _query_blocks(visible, n, t)

    def one_block(_, xs):
        q_b, mask_b = xs
        mask_b = shared_mask if mask_b is None else mask_b
        return None, _block_forward(qk, pv, values, q_b, k, vq, mask_b)

    _, (out, row_max, row_sum) = jax.lax.scan(one_block, None, (_split(q, n, 0), split_mask))
    return _join(out, t), (q, k, v, visible, row_max, row_sum)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _attention(qk: Dtypes, pv: Dtypes, values: Fp8Values | None, block: int, q, k, v, visible):
    return _forward(qk, pv, values, block, q, k, v, visible)[0]


def _backward(qk: Dtypes, pv: Dtypes, values: Fp8Values | None, block: int, residuals, d_out):
    q, k, v, visible, row_max, row_sum = residuals
    q = after(q, d_out)  # the recomputation waits for this layer's gradient
    vq = _values_operand(after(v, d_out), values, visible)  # V is kept as given, quantized again here
    g = (d_out, None) if values is None else _head_fp8(d_out, values.bwd_format)
    t = q.shape[3]
    n = -(-t // block)
    if n == 1:
        d_q, d_k, d_v = _block_backward(qk, pv, values, q, k, vq, visible, row_max, row_sum, g)
        return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype), None
    split_mask, shared_mask = _query_blocks(visible, n, t)
    q_blocks = _split(q, n, 0)

    def one_block(sums, xs):
        i, mask_b, max_b, sum_b, d_out_b = xs
        mask_b = shared_mask if mask_b is None else mask_b
        d_q, d_k, d_v = _block_backward(qk, pv, values, q_blocks[i], k, vq, mask_b, max_b, sum_b,
                                        (d_out_b, g[1]))
        return (sums[0] + d_k, sums[1] + d_v, sums[2].at[i].set(d_q)), None

    # Buffers made from d_out, or XLA allocates every layer's at the start of the pass.
    sums = tuple(after(jnp.zeros(shape, dtype), d_out)
                 for shape, dtype in ((k.shape, _F32), (v.shape, _F32), (q_blocks.shape, q.dtype)))
    xs = (jnp.arange(n), split_mask, row_max, row_sum, _split(g[0], n, 0))
    (d_k, d_v, d_q), _ = jax.lax.scan(one_block, sums, xs)
    return _join(d_q, t), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attention.defvjp(_forward, _backward)
