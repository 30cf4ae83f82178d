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

`quantize(x, fmt, granularity)` runs all three. Quantization multiplies by the inverse
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

Shape = tuple[int, ...]


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
    """OCP Microscaling: a power-of-two (E8M0) scale per `size` elements along `axis`."""

    size: int = 32
    axis: int = -1

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


def scale_shape(shape: Shape, block: Shape) -> Shape:
    """ceil(dim / block) per axis: the shape of the scale array."""
    return tuple(-(-d // b) for d, b in zip(shape, block))


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


def _to_blocks(x: jax.Array, block: Shape) -> jax.Array:
    """Zero-pads x to whole blocks and reshapes to (n0, b0, n1, b1, ...)."""
    pads = [(0, -d % b) for d, b in zip(x.shape, block)]
    if any(p for _, p in pads):
        x = jnp.pad(x, pads)
    split = []
    for d, b in zip(x.shape, block):
        split += [d // b, b]
    return x.reshape(split)


def _block_axes(ndim: int) -> tuple[int, ...]:
    return tuple(range(1, 2 * ndim, 2))


def compute_amax(x: jax.Array, block: Shape) -> jax.Array:
    """max |x| over each block, as float32 of shape ceil(x.shape / block).

    NaN in a block gives a NaN amax (and so a NaN scale): non-finite input is reported,
    never hidden. Use `nonfinite_counts` or `check_finite` to find it.
    """
    _check_block(x.shape, block)
    blocks = _to_blocks(x, block)  # zero padding cannot raise a block's max |x|
    axes = _block_axes(x.ndim)
    # max(max x, -min x) is max |x| exactly; XLA on CPU vectorizes plain max/min
    # reductions but not a reduction over abs(x) (6x faster on 4096x4096 in 1x128 tiles).
    amax = jnp.maximum(jnp.max(blocks, axis=axes), -jnp.min(blocks, axis=axes))
    return jnp.abs(amax).astype(jnp.float32)  # abs: an all-zero block may give -0


def compute_scale(
    amax: jax.Array, fmt: str | Format, *, margin: float = 0.0, pow2: bool = False
) -> jax.Array:
    """Dequantization scale mapping `amax` onto fmt.max / 2**margin.

    Args:
      amax: float32 per-block maxima (any shape).
      fmt: target element format.
      margin: headroom in powers of two (margin=1 leaves a factor 2 below fmt.max).
      pow2: round the scale up to a power of two (E8M0 / ue8m0 scales; dequantization
        is then exact in any binary format).

    Returns:
      float32 scales, same shape as amax. All-zero blocks get scale 1 (finite);
      NaN/inf amax stays NaN/inf so the problem surfaces.
    """
    fmt = formats_lib.get(fmt)
    amax = jnp.asarray(amax).astype(jnp.float32)
    if isinstance(margin, (int, float)):  # static options: one compiled kernel, also eagerly
        return _compute_scale_jit(amax, fmt, float(margin), bool(pow2))
    return _compute_scale(amax, fmt, margin, pow2)


def _compute_scale(amax: jax.Array, fmt: Format, margin, pow2: bool) -> jax.Array:
    target = fmt.max * 2.0 ** (-margin)
    # Multiply by the reciprocal, as jitted XLA does for a division anyway, so eager and
    # jitted scales agree bit for bit. For bf16/fp32-sized targets 1/target is a float32
    # subnormal (flushed to zero on CPU, and XLA folds constant factors together), so
    # amax is first scaled down by 2**64 through its exponent bits, which nothing folds.
    shift = max(0, formats_lib.ulp_exponent(fmt.max) - 64)
    if shift:
        scale = _exact_scale_down(amax, shift) * ((2.0**shift) / target)
    else:
        scale = amax * (1.0 / target)
    if pow2:
        scale = _tightest_pow2(amax, scale, target)
    # A zero (or float32-subnormal) scale would give an inverse scale of inf: use 1.
    # Written as "small -> 1" so that a NaN scale (False in any comparison) stays NaN.
    tiny = jnp.finfo(jnp.float32).tiny
    return jnp.where(scale < tiny, jnp.ones_like(scale), scale)


_compute_scale_jit = jax.jit(_compute_scale, static_argnums=(1, 2, 3))


def _exact_scale_down(x: jax.Array, k: int) -> jax.Array:
    """x * 2**-k for non-negative float32 x, by subtracting k from the exponent bits.

    Results below the normal range become 0; inf and NaN pass through.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    exponent = (bits >> jnp.uint32(23)) & jnp.uint32(0xFF)
    scaled = jax.lax.bitcast_convert_type(bits - jnp.uint32(k << 23), jnp.float32)
    out = jnp.where(exponent > jnp.uint32(k), scaled, jnp.zeros_like(x))
    return jnp.where(exponent == jnp.uint32(0xFF), x, out)


def _tightest_pow2(amax: jax.Array, scale: jax.Array, target: float) -> jax.Array:
    """The smallest power of two p with amax / p <= target.

    `scale = amax / target` is rounded (XLA divides by multiplying with a rounded
    reciprocal), so pow2_ceil(scale) can be off by a factor of two either way; the checks
    below are exact because dividing by a power of two is.
    """
    p = pow2_ceil(scale)
    p = jnp.where(amax * (1.0 / p) > target, p * 2.0, p)
    half = p * 0.5
    fits = (half >= jnp.finfo(jnp.float32).tiny) & (amax * (1.0 / half) <= target)
    return jnp.where(fits, half, p)


@jax.jit
def pow2_ceil(x: jax.Array) -> jax.Array:
    """The smallest power of two >= x, exactly, for positive normal float32 x.

    Works on the bit pattern (jnp.exp2 / jnp.log2 are approximate on some backends, so
    exp2(ceil(log2(x))) can be off by an ulp or a whole factor of two). Zero, inf and NaN
    pass through unchanged; float32 subnormals give zero or the smallest normal.

    Args:
      x: float32 array of non-negative values.

    Returns:
      float32 array of powers of two, x's shape.
    """
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    exponent = bits & jnp.uint32(0x7F800000)
    has_fraction = (bits & jnp.uint32(0x007FFFFF)) != 0
    special = exponent == jnp.uint32(0x7F800000)  # inf or NaN
    up = jnp.where(has_fraction & ~special, exponent + jnp.uint32(0x00800000), bits)
    return jax.lax.bitcast_convert_type(up, jnp.float32)


@jax.jit
def exp2_int(n: jax.Array) -> jax.Array:
    """2.0**n as float32, exactly, for integer n (clipped to the normal range [-126, 127])."""
    biased = (jnp.clip(jnp.asarray(n, jnp.int32), -126, 127) + 127).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(biased << jnp.uint32(23), jnp.float32)


@jax.jit
def floor_log2(x: jax.Array) -> jax.Array:
    """floor(log2(x)) as int32, exactly, for positive normal float32 x (from the bits)."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    return ((bits >> jnp.uint32(23)) & jnp.uint32(0xFF)).astype(jnp.int32) - 127


def broadcast_scale(scale: jax.Array, shape: Shape, block: Shape) -> jax.Array:
    """Repeats each per-block scale over its block and trims ragged ends to `shape`.

    Args:
      scale: array of shape ceil(shape / block).
      shape: the full array's shape.
      block: per-axis block shape.

    Returns:
      An array of `shape` (scale's dtype) holding each element's block scale.
    """
    shape, block = tuple(shape), tuple(block)
    if scale.shape != scale_shape(shape, block):
        raise ValueError(f"scale has shape {scale.shape}; expected {scale_shape(shape, block)} "
                         f"for shape {shape} in blocks {block}")
    return _broadcast_scale(scale, shape, block)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _broadcast_scale(scale: jax.Array, shape: Shape, block: Shape) -> jax.Array:
    # (n0, 1, n1, 1, ...) broadcast to (n0, b0, n1, b1, ...): no gather (jnp.repeat), so
    # XLA fuses it into the multiply that consumes it. Ragged ends are sliced off.
    expanded = scale.reshape(tuple(s for n in scale.shape for s in (n, 1)))
    split = tuple(s for n, b in zip(scale.shape, block) for s in (n, b))
    padded = jnp.broadcast_to(expanded, split).reshape(tuple(n * b for n, b in zip(scale.shape, block)))
    if padded.shape == shape:
        return padded
    return padded[tuple(slice(0, d) for d in shape)]


def _scale_blocks(x: jax.Array, factor: jax.Array, block: Shape) -> jax.Array:
    """x times each block's factor (factor has shape ceil(x.shape / block))."""
    return x * broadcast_scale(factor, x.shape, block)


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
    _check_block(x.shape, block)
    want = scale_shape(x.shape, block)
    scale = jnp.asarray(scale, jnp.float32)
    if scale.shape != want:
        if scale.size != 1:
            raise ValueError(f"scale has shape {scale.shape}; expected {want} for x{tuple(x.shape)} in blocks {block}")
        scale = jnp.broadcast_to(scale.reshape(()), want)
    data = formats_lib.cast(_scale_blocks(x.astype(jnp.float32), 1.0 / scale, block), fmt)
    return ScaledArray(data=data, scale=scale, fmt=fmt, block=block)


def _check_block(shape: Shape, block: Shape) -> None:
    if len(block) != len(shape):
        raise ValueError(f"block {tuple(block)} has {len(block)} axes but the array has shape {tuple(shape)}")
    for b in block:
        if b <= 0:
            raise ValueError(f"block sizes must be positive; got block {tuple(block)} for shape {tuple(shape)}")


# --------------------------------------------------------------------------- one-call API


def quantize(
    x: jax.Array,
    fmt: str | Format,
    granularity: Granularity | Sequence[int] = PerTensor(),
    *,
    scale: jax.Array | None = None,
    pow2_scale: bool = False,
    margin: float = 0.0,
) -> ScaledArray:
    """Quantizes x into `fmt` with one scale per block of `granularity`.

    Args:
      x: floating array of any rank (f32, bf16, f16).
      fmt: element format name or `Format` ("e4m3", "e5m2", "e2m1", "e4m4", ...).
      granularity: PerTensor(), PerAxis(axes), Blocks(shape) or MX(size, axis). MX forces
        power-of-two scales.
      scale: optional static dequantization scale(s) (e.g. from calibration or a
        delayed-scaling history); skips the amax computation.
      pow2_scale: round scales up to powers of two.
      margin: headroom in powers of two below fmt.max.

    Returns:
      A `ScaledArray` with `dequantize(q) ~= x`.

    Raises:
      ValueError: for a block shape that does not fit x, or a scale of the wrong shape.
    """
    fmt = formats_lib.get(fmt)
    x = jnp.asarray(x)
    block = resolve_block(granularity, x.shape)
    pow2 = bool(pow2_scale or isinstance(granularity, MX))
    if isinstance(margin, (int, float)):  # static options: one compiled kernel, also eagerly
        return _quantize_jit(x, scale, fmt, block, pow2, float(margin))
    return _quantize(x, scale, fmt, block, pow2, margin)


def _quantize(x, scale, fmt: Format, block: Shape, pow2: bool, margin) -> ScaledArray:
    if scale is None:
        scale = compute_scale(compute_amax(x, block), fmt, margin=margin, pow2=pow2)
    return quantize_with_scale(x, scale, fmt, block)


_quantize_jit = jax.jit(_quantize, static_argnums=(2, 3, 4, 5))


def dequantize(q: ScaledArray, dtype=jnp.float32) -> jax.Array:
    """data * broadcast(scale), computed in float32 and returned as `dtype`.

    Raises:
      TypeError: if q is not a ScaledArray.
    """
    if not isinstance(q, ScaledArray):
        raise TypeError(f"dequantize expects a ScaledArray; got {type(q).__name__}")
    return _dequantize(q.data, q.scale, q.block, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize(data: jax.Array, scale: jax.Array, block: Shape, dtype) -> jax.Array:
    return _scale_blocks(formats_lib.upcast(data, jnp.float32), scale, block).astype(dtype)


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


def check_finite(x: jax.Array, what: str = "input") -> None:
    """Raises ValueError if x holds NaN or inf, saying how many and where the first is.

    Eager only (it reads values): call it on data before it enters a jitted step.
    """
    counts = {k: int(v) for k, v in nonfinite_counts(x).items()}
    if counts["nan"] or counts["inf"]:
        where = tuple(int(i) for i in _first_nonfinite(jnp.asarray(x)))
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
    return _scale_blocks(half_ulp, q.scale, q.block)


def blocks_count(shape: Shape, block: Shape) -> int:
    """Number of blocks (= scales) for an array of `shape`."""
    return math.prod(scale_shape(shape, block))
