"""Scaled arrays: low-precision data plus the scales that bring it back to real values.

    x  ~=  dequantize(q)  =  q.data * broadcast(q.scale)

`q.scale` is the *dequantization multiplier* (DeepSeek-V3's `weight_scale_inv`): one
float32 per block, with `scale.shape[i] == ceil(x.shape[i] / q.block[i])`. A ragged last
block along an axis is allowed and uses the same scale layout.

Quantization is three small public steps, so a caller with a known scale skips the first
two:

    amax  = compute_amax(x, block)                 # max |x| per block
    scale = compute_scale(amax, fmt, margin=..., pow2=...)
    q     = quantize_with_scale(x, scale, fmt, block)   # cast(x * (1/scale))

The steps live in `mpx.scales` (re-exported here), the one implementation of each that
`quantize` and `mpx.dot`'s fast paths share. `quantize(x, fmt, granularity)` runs all
three. Quantization multiplies by the inverse
scale (XLA rewrites `x / s` into `x * (1/s)` anyway; doing it explicitly keeps jitted
code and references bit-identical).

Example:
    >>> import jax, jax.numpy as jnp, mpx
    >>> x = jax.random.normal(jax.random.key(0), (256, 512))
    >>> q = mpx.quantize(x, "e4m3", mpx.Blocks((128, 128)))
    >>> q.data.dtype, q.scale.shape
    (dtype(float8_e4m3fn), (2, 4))
    >>> bool(jnp.max(jnp.abs(mpx.dequantize(q) - x)) < 0.07 * jnp.max(jnp.abs(x)))
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from mpx import formats as formats_lib
from mpx.formats import Format
from mpx.sharding import explicit
from mpx.scales import (  # noqa: F401  (compute_amax ... broadcast_scale: public here too)
    broadcast_scale,
    check_block,
    compute_amax,
    compute_scale,
    exp2_int,
    floor_log2,
    grid_values,
    mx_scale_ocp,
    pow2_ceil,
    scale_blocks,
    scale_mantissa_bits,
    scale_shape,
)

__all__ = [
    "MX_SCALE_RULES", "PerTensor", "PerAxis", "Blocks", "MX", "Granularity", "resolve_block", "ScaledArray",
    "quantize_with_scale", "quantize", "dequantize", "fake_quant", "nonfinite_counts", "check_finite",
    "quantization_error_bound", "blocks_count"
]

Shape = tuple[int, ...]
MX_SCALE_RULES = ("ceil", "ocp")


# --------------------------------------------------------------------------- granularities


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One scale for the whole array."""

    def block_shape(self, shape: Shape) -> Shape:
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class PerAxis:
    """One scale per index along `axes` (e.g. PerAxis(0) on a (out, in) weight: per row).

    The other axes are reduced over; scales keep a size-1 dimension for them.
    """

    axes: int | tuple[int, ...] = -1

    def block_shape(self, shape: Shape) -> Shape:
        keep = _normalize_axes(self.axes, len(shape))
        return tuple(1 if i in keep else d for i, d in enumerate(shape))


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Rectangular blocks, e.g. (1, 128) activation tiles or (128, 128) weight blocks.

    A block shape shorter than the array applies to its trailing axes (leading axes get
    block size 1, so (1, 128) on a (batch, seq, d) activation is per-token 1x128 tiles).
    A block size of -1 means "the whole axis".
    """

    block: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "block", tuple(int(b) for b in self.block))
        for b in self.block:
            if b == 0 or b < -1:
                raise ValueError(f"block sizes must be positive or -1 (whole axis); got {self.block}")

    def block_shape(self, shape: Shape) -> Shape:
        if len(self.block) > len(shape):
            raise ValueError(f"block {self.block} has more axes than the array's shape {tuple(shape)}")
        full = (1,) * (len(shape) - len(self.block)) + self.block
        return tuple(d if b == -1 else min(b, d) if d > 0 else b for b, d in zip(full, shape))


@dataclasses.dataclass(frozen=True)
class MX:
    """OCP Microscaling: a power-of-two (E8M0) scale per `size` elements along `axis`.

    `mx_scale` picks the scale rule. "ceil" (the default): the smallest power of two with
    amax / scale <= fmt.max, so no value clips. "ocp": the OCP MX spec's rule,
    2**(floor(log2(amax)) - emax), where values above fmt.max clip; use it to exchange
    data with MX hardware and checkpoints. Both keep dequantized values finite for any
    finite input.
    """

    size: int = 32
    axis: int = -1
    mx_scale: str = "ceil"

    def __post_init__(self):
        if self.mx_scale not in MX_SCALE_RULES:
            raise ValueError(f"MX mx_scale must be one of {MX_SCALE_RULES}; got {self.mx_scale!r}")

    def block_shape(self, shape: Shape) -> Shape:
        axis = _normalize_axes(self.axis, len(shape))[0]
        return tuple(min(self.size, d) if i == axis else 1 for i, d in enumerate(shape))


Granularity = PerTensor | PerAxis | Blocks | MX


def _normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array of rank {ndim}")
    return tuple(a % ndim for a in axes)


def resolve_block(granularity: Granularity | Sequence[int], shape: Shape) -> Shape:
    """The per-axis block shape a granularity gives for an array of `shape`."""
    if isinstance(granularity, (PerTensor, PerAxis, Blocks, MX)):
        return granularity.block_shape(tuple(shape))
    if isinstance(granularity, (tuple, list)):
        return Blocks(tuple(granularity)).block_shape(tuple(shape))
    raise TypeError(
        f"granularity must be PerTensor(), PerAxis(axes), Blocks(shape) or MX(size); got {granularity!r}"
    )


# --------------------------------------------------------------------------- ScaledArray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaledArray:
    """Quantized data with per-block dequantization scales.

    Invariant: `dequantize(q) = q.data * broadcast(q.scale)`, where `broadcast` repeats
    each scale over its block of `q.block` elements (ragged at the end of an axis).

    Attributes:
      data: array in `fmt.storage_dtype`, the shape of the original array.
      scale: float32, shape `ceil(data.shape / block)`.
      fmt: the element format (static).
      block: the block shape (static), one entry per axis.
    """

    data: jax.Array
    scale: jax.Array
    fmt: Format = dataclasses.field(metadata=dict(static=True))
    block: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> Shape:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def nbytes(self) -> int:
        """Bytes held: data in its storage dtype plus float32 scales."""
        return int(self.data.size * self.fmt.bytes_per_element + self.scale.size * 4)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


# --------------------------------------------------------------------------- the three steps


def quantize_with_scale(x: jax.Array, scale: jax.Array, fmt: str | Format, block: Shape) -> ScaledArray:
    """Quantizes x with given per-block dequantization scales: data = cast(x * (1/scale)).

    Args:
      x: floating array.
      scale: float32 of shape ceil(x.shape / block), or a scalar for one scale.
      fmt: element format.
      block: per-axis block shape (see `resolve_block`).
    """
    fmt = formats_lib.get(fmt)
    block = tuple(block)
    check_block(x.shape, block)
    want = scale_shape(x.shape, block)
    scale = jnp.asarray(scale, jnp.float32)
    if scale.shape != want:
        if scale.size != 1:
            raise ValueError(f"scale has shape {scale.shape}; expected {want} for x{tuple(x.shape)} in blocks {block}")
        scale = jnp.broadcast_to(scale.reshape(()), want)
    data = grid_values(x, scale, fmt, block).astype(fmt.storage_dtype)  # exact: values on the grid
    return ScaledArray(data=data, scale=scale, fmt=fmt, block=block)


# --------------------------------------------------------------------------- one-call API


def quantize(
    x: jax.Array,
    fmt: str | Format,
    granularity: Granularity | Sequence[int] = PerTensor(),
    *,
    scale: jax.Array | None = None,
    pow2_scale: bool = False,
    margin: float = 0.0,
    scale_format: str = "f32",
) -> ScaledArray:
    """Quantizes x into `fmt` with one scale per block of `granularity`.

    Args:
      x: floating array of any rank (f32, bf16, f16).
      fmt: element format name or `Format` ("e4m3", "e5m2", "e2m1", "e4m4", ...).
      granularity: PerTensor(), PerAxis(axes), Blocks(shape) or MX(size, axis). MX forces
        power-of-two scales.
      scale: optional static dequantization scale(s) (e.g. from calibration or a
        delayed-scaling history); skips the amax computation.
      pow2_scale: round scales up to powers of two (scale_format="ue8m0").
      margin: headroom in powers of two below fmt.max.
      scale_format: "f32", "ue8m0" (powers of two) or "ue8m3" (4 significant bits);
        see `mpx.scales.compute_scale`.

    Returns:
      A `ScaledArray` with `dequantize(q) ~= x`.

    Raises:
      ValueError: for a block shape that does not fit x, a scale of the wrong shape, or
        an unknown scale format.
    """
    fmt = formats_lib.get(fmt)
    x = jnp.asarray(x)
    block = resolve_block(granularity, x.shape)
    pow2 = bool(pow2_scale or isinstance(granularity, MX))
    scale_mantissa_bits(scale_format, pow2)  # validates the pair before any tracing
    if scale is None and isinstance(granularity, MX) and granularity.mx_scale == "ocp":
        scale = mx_scale_ocp(compute_amax(x, block), fmt)
    if isinstance(margin, (int, float)):  # static options: one compiled kernel, also eagerly
        return _quantize_jit(x, scale, fmt, block, pow2, float(margin), scale_format)
    return _quantize(x, scale, fmt, block, pow2, margin, scale_format)


def _quantized_specs(x, scale, fmt: Format, block: Shape, *_):
    spec = explicit.spec_of(x)  # data as x; scales as x where the shards hold whole blocks
    return ScaledArray(spec, explicit.fitted(spec, scale_shape(x.shape, block)), fmt, block)


@explicit.auto_inside(_quantized_specs)
def _quantize(x, scale, fmt: Format, block: Shape, pow2: bool, margin, scale_format: str = "f32") -> ScaledArray:
    if scale is None:
        scale = compute_scale(compute_amax(x, block), fmt, margin=margin, pow2=pow2, scale_format=scale_format)
    return quantize_with_scale(x, scale, fmt, block)


_quantize_jit = jax.jit(_quantize, static_argnums=(2, 3, 4, 5, 6))


def dequantize(q: ScaledArray, dtype=jnp.float32) -> jax.Array:
    """data * broadcast(scale), computed in float32 and returned as `dtype`.

    Raises:
      TypeError: if q is not a ScaledArray.
    """
    if not isinstance(q, ScaledArray):
        raise TypeError(f"dequantize expects a ScaledArray; got {type(q).__name__}")
    return _dequantize(q.data, q.scale, q.block, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(2, 3))
@explicit.auto_inside(explicit.like_first)
def _dequantize(data: jax.Array, scale: jax.Array, block: Shape, dtype) -> jax.Array:
    return scale_blocks(formats_lib.upcast(data, jnp.float32), scale, block).astype(dtype)


def fake_quant(
    x: jax.Array,
    fmt: str | Format,
    granularity: Granularity | Sequence[int] = PerTensor(),
    **kwargs: Any,
) -> jax.Array:
    """Quantize-dequantize with a straight-through gradient (quantization-aware training).

    Args:
      x: floating array.
      fmt, granularity, **kwargs: as in `quantize` (scale, pow2_scale, margin).

    Returns:
      `dequantize(quantize(x, fmt, granularity, **kwargs), x.dtype)`, exactly; its
      derivative with respect to x is the identity (no gradient flows into the scale).
    """
    qdq = dequantize(quantize(x, fmt, granularity, **kwargs), x.dtype)
    return _straight_through(x, jax.lax.stop_gradient(qdq))


@jax.custom_jvp
def _straight_through(x: jax.Array, y: jax.Array) -> jax.Array:
    """Returns y; its tangent is x's (unlike `x + stop_gradient(y - x)`, the value is
    exactly y: no rounding in y - x, and no inf - inf = NaN for saturated inputs)."""
    return y


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    _, y = primals
    x_dot, _ = tangents
    return y, x_dot


# --------------------------------------------------------------------------- finiteness


@jax.jit
def nonfinite_counts(x: jax.Array) -> dict[str, jax.Array]:
    """Counts of NaN and +-inf entries in x (jit-friendly; int32 scalars)."""
    return {"nan": jnp.sum(jnp.isnan(x), dtype=jnp.int32), "inf": jnp.sum(jnp.isinf(x), dtype=jnp.int32)}


def check_finite(x: Any, what: str = "input") -> None:
    """Raises ValueError if an array, or any floating leaf of a pytree of arrays (a params
    dict, ScaledArrays included), holds NaN or inf, saying which leaf, how many and where
    the first is. Integer, boolean and PRNG key leaves are finite by construction.

    Eager only (it reads values): call it on data before it enters a jitted step.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(x)[0]:
        dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.inexact):
            _check_finite_array(jnp.asarray(leaf), what + jax.tree_util.keystr(path))


def _check_finite_array(x: jax.Array, what: str) -> None:
    counts = {k: int(v) for k, v in nonfinite_counts(x).items()}
    if counts["nan"] or counts["inf"]:
        where = tuple(int(i) for i in _first_nonfinite(x))
        raise ValueError(
            f"{what} has {counts['nan']} NaN and {counts['inf']} inf values "
            f"(shape {tuple(x.shape)}, first at index {where}); quantizing it would not be meaningful"
        )


@jax.jit
def _first_nonfinite(x: jax.Array) -> jax.Array:
    return jnp.argwhere(~jnp.isfinite(x), size=1)[0]


@jax.jit
def quantization_error_bound(q: ScaledArray) -> jax.Array:
    """Per-element worst-case |x - dequantize(q)| for in-range x (broadcast to x's shape).

    Normal range: half an ulp of the element times the scale; subnormal range: half the
    smallest subnormal times the scale. Computed from the dequantized value.
    """
    fmt = q.fmt
    y = jnp.abs(q.data.astype(jnp.float32))
    binade = floor_log2(jnp.maximum(y, jnp.float32(fmt.min_normal)))
    half_ulp = exp2_int(binade - fmt.mantissa_bits - 1)
    return scale_blocks(half_ulp, q.scale, q.block)


def blocks_count(shape: Shape, block: Shape) -> int:
    """Number of blocks (= scales) for an array of `shape`."""
    return math.prod(scale_shape(shape, block))
