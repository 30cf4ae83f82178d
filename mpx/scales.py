"""Per-block scale steps of quantization: amax, scale, broadcast and rounding to the grid.

    amax  = compute_amax(x, block)                       # max |x| per block
    scale = compute_scale(amax, fmt, margin=..., scale_format=...)
    grid  = grid_values(x, scale, fmt, block)            # round(x * (1/scale)), float32

These are the one implementation of each step in mpx: `mpx.scaled.quantize` stores the
grid in the format's dtype; `mpx.dot`'s fast paths feed it to a GEMM, with the scales
folded in or applied to partial sums. Shapes: `scale.shape == ceil(x.shape / block)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mpx import formats as formats_lib
from mpx.formats import Format

__all__ = [
    "scale_shape", "check_block", "pad_axis_to", "compute_amax", "SCALE_FORMATS", "scale_mantissa_bits",
    "folds_exactly", "compute_scale", "round_up_bits", "mx_scale_ocp", "pow2_ceil", "exp2_int", "floor_log2",
    "broadcast_scale", "scale_blocks", "grid_values"
]

Shape = tuple[int, ...]


def scale_shape(shape: Shape, block: Shape) -> Shape:
    """ceil(dim / block) per axis: the shape of the scale array."""
    return tuple(-(-d // b) for d, b in zip(shape, block))


def check_block(shape: Shape, block: Shape) -> None:
    """Raises ValueError unless `block` has one positive size per axis of `shape`."""
    if len(block) != len(shape):
        raise ValueError(f"block {tuple(block)} has {len(block)} axes but the array has shape {tuple(shape)}")
    for b in block:
        if b <= 0:
            raise ValueError(f"block sizes must be positive; got block {tuple(block)} for shape {tuple(shape)}")


def pad_axis_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    """x zero-padded at the end of `axis` to `size` (unchanged when already that long)."""
    if size <= x.shape[axis]:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def compute_amax(x: jax.Array, block: Shape) -> jax.Array:
    """max |x| over each block, as float32 of shape ceil(x.shape / block).

    NaN or inf in a block gives a NaN or inf amax, so a NaN scale and a NaN dequantized
    block: non-finite input is reported, never hidden. This is deliberate: an inf weight,
    activation or gradient that saturated instead would let a training step succeed on a
    clipped value, where a non-finite result makes the optimizer's guard drop the step.
    Use `mpx.scaled.nonfinite_counts` or `check_finite` to find the culprit.
    """
    block = tuple(block)
    check_block(x.shape, block)
    pads = [(0, -d % b) for d, b in zip(x.shape, block)]
    if any(p for _, p in pads):  # zero padding cannot raise a block's max |x|
        x = jnp.pad(x, pads)
    # Size-1 block axes are not split, and max(max x, -min x) stands for max |x|: XLA
    # on CPU vectorizes plain max/min reductions but not one over abs(x).
    split, axes = [], []
    for d, b in zip(x.shape, block):
        split += [d] if b == 1 else [d // b, b]
        if b != 1:
            axes.append(len(split) - 1)
    if jnp.dtype(x.dtype).itemsize == 2:
        amax = _amax16(x.reshape(split), tuple(axes))
    else:
        xb = x.reshape(split)
        amax = jnp.maximum(jnp.max(xb, axis=tuple(axes)), -jnp.min(xb, axis=tuple(axes)))
    # abs: an all-zero block may give -0.
    return jnp.abs(amax).astype(jnp.float32).reshape(scale_shape(x.shape, block))


def _amax16(xb: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """max |x| of a 16-bit float array over `axes`, on the bit patterns: with the sign
    bit cleared, their order as integers is the order of |x|, and NaN patterns lie above
    inf's, so NaN still wins. XLA on CPU computes a bf16 max in float32 and writes the
    float32 copy first (twice the array's bytes); the integer max reads the data as is."""
    bits = jax.lax.bitcast_convert_type(xb, jnp.uint16) & jnp.uint16(0x7FFF)
    return jax.lax.bitcast_convert_type(jnp.max(bits, axis=axes), xb.dtype)


# Scale formats: how many mantissa bits a scale keeps (None: all of float32's). Scales
# are rounded up to them, so amax / scale never exceeds the target. "ue8m0" scales are
# powers of two (MX, DeepSeek-V3.1, DeepGEMM); "ue8m3" scales keep 4 significant bits,
# so a scale times an E4M3 (4-bit) or E5M2 value has at most 8 significant bits: bf16
# holds the dequantized value exactly.
SCALE_FORMATS = {"f32": None, "ue8m0": 0, "ue8m3": 3}


def scale_mantissa_bits(scale_format: str, pow2: bool = False) -> int | None:
    """The mantissa bits `scale_format` keeps (None: float32); `pow2` means "ue8m0".

    Raises:
      ValueError: for an unknown scale format, or pow2 with a format other than ue8m0.
    """
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {tuple(SCALE_FORMATS)}; got {scale_format!r}")
    if pow2 and scale_format not in ("f32", "ue8m0"):
        raise ValueError(f"pow2 scales are scale_format='ue8m0'; got pow2=True with scale_format={scale_format!r}")
    return 0 if pow2 else SCALE_FORMATS[scale_format]


def folds_exactly(fmt: str | Format, scale_format: str) -> bool:
    """Whether every value of `fmt` times any `scale_format` scale is exact in the dtype
    that holds fmt's values (bf16 up to 7 mantissa bits, in its normal range): powers of
    two always; otherwise when the significant bits of element and scale fit bf16's 8."""
    bits = SCALE_FORMATS[scale_format]
    return bits == 0 or (bits is not None and formats_lib.get(fmt).mantissa_bits + bits + 2 <= 8)


def compute_scale(
    amax: jax.Array, fmt: str | Format, *, margin: float = 0.0, pow2: bool = False, scale_format: str = "f32"
) -> jax.Array:
    """Dequantization scale mapping `amax` onto fmt.max / 2**margin.

    Args:
      amax: float32 per-block maxima (any shape).
      fmt: target element format.
      margin: headroom in powers of two (margin=1 leaves a factor 2 below fmt.max).
      pow2: round the scale up to a power of two (the same as scale_format="ue8m0").
      scale_format: "f32", or round the scale up to a power of two ("ue8m0": E8M0
        scales, dequantization is exact in any binary format) or to 4 significant bits
        ("ue8m3": an E4M3 or E5M2 value times the scale is exact in bf16).

    Returns:
      float32 scales, same shape as amax. All-zero blocks get scale 1 (finite);
      NaN/inf amax stays NaN/inf so the problem surfaces.

    Raises:
      ValueError: for an unknown scale format, or pow2 with another one.
    """
    fmt = formats_lib.get(fmt)
    bits = scale_mantissa_bits(scale_format, pow2)
    amax = jnp.asarray(amax).astype(jnp.float32)
    if isinstance(margin, (int, float)):  # static options: one compiled kernel, also eagerly
        return _compute_scale_jit(amax, fmt, float(margin), bits)
    return _compute_scale(amax, fmt, margin, bits)


def _compute_scale(amax: jax.Array, fmt: Format, margin, bits: int | None) -> jax.Array:
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
    if bits == 0:
        scale = _tightest_pow2(amax, scale, target)
    elif bits is not None:
        scale = round_up_bits(scale, bits)
    # A finite amax near float32's max would give a scale whose product with values near
    # fmt.max overflows to inf on dequantization: cap it (the largest values then clip).
    # Formats with float32's range (bf16) saturate within it anyway: no cap.
    if formats_lib.ulp_exponent(fmt.max) < 64:
        cap = _max_finite_scale(fmt, bits)
        scale = jnp.where((scale > cap) & jnp.isfinite(scale), jnp.float32(cap), scale)
    # A zero (or float32-subnormal) scale would give an inverse scale of inf: use 1.
    # Written as "small -> 1" so that a NaN scale (False in any comparison) stays NaN.
    tiny = jnp.finfo(jnp.float32).tiny
    return jnp.where(scale < tiny, jnp.ones_like(scale), scale)


_compute_scale_jit = jax.jit(_compute_scale, static_argnums=(1, 2, 3))


def _max_finite_scale(fmt: Format, bits: int | None) -> float:
    """The largest scale with `bits` mantissa bits (None: any float32) whose product with
    fmt.max is finite in float32."""
    if bits == 0:  # fmt.max < 2**(e + 1) with at most 23 mantissa bits: the product stays finite
        return 2.0 ** (127 - formats_lib.ulp_exponent(fmt.max))
    f32_max = float(np.finfo(np.float32).max)
    cap = np.float32(f32_max / fmt.max)
    while float(cap) * fmt.max > f32_max:
        cap = np.nextafter(cap, np.float32(0))
    if bits is not None:  # down to `bits` mantissa bits: still below the bound
        low = np.uint32((1 << (23 - bits)) - 1)
        cap = (np.asarray(cap, np.float32).view(np.uint32) & ~low).view(np.float32)
    return float(cap)


def round_up_bits(x: jax.Array, bits: int) -> jax.Array:
    """The smallest float32 >= x with `bits` mantissa bits, exactly, for non-negative
    normal float32 x (on the bit pattern; a carry moves into the exponent). Zero, inf
    and NaN pass through; subnormals round up on the same bit grid."""
    raw = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    low = jnp.uint32((1 << (23 - bits)) - 1)
    up = (raw + low) & ~low
    special = (raw & jnp.uint32(0x7F800000)) == jnp.uint32(0x7F800000)
    return jax.lax.bitcast_convert_type(jnp.where(special, raw, up), jnp.float32)


def mx_scale_ocp(amax: jax.Array, fmt: str | Format) -> jax.Array:
    """The OCP Microscaling scale rule: 2**(floor(log2(amax)) - emax(fmt)).

    emax is the exponent of fmt's largest normal binade (2 for E2M1, 8 for E4M3, 15 for
    E5M2). Values above fmt.max after scaling are clipped by the cast. mpx's default MX
    rule instead takes the smallest power of two with amax / scale <= fmt.max (nothing
    clips; one binade coarser in some blocks). All-zero blocks get scale 1; NaN and inf
    stay; the exponent is clipped to float32's normal range [-126, 127].

    Args:
      amax: float32 per-block maxima.
      fmt: element format.

    Returns:
      float32 power-of-two scales, amax's shape.
    """
    fmt = formats_lib.get(fmt)
    amax = jnp.asarray(amax, jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    scale = exp2_int(floor_log2(jnp.maximum(amax, tiny)) - formats_lib.ulp_exponent(fmt.max))
    scale = jnp.where(amax < tiny, jnp.ones_like(scale), scale)
    return jnp.where(jnp.isfinite(amax), scale, amax)


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


def scale_blocks(x: jax.Array, factor: jax.Array, block: Shape) -> jax.Array:
    """x times each block's factor (factor has shape ceil(x.shape / block))."""
    return x * broadcast_scale(factor, x.shape, block)


def grid_values(x: jax.Array, scale: jax.Array, fmt: str | Format, block: Shape) -> jax.Array:
    """round(x * (1/scale)) on fmt's grid, as float32: the data of a quantized x.

    Args:
      x: floating array.
      scale: float32 dequantization scales, shape ceil(x.shape / block).
      fmt: element format.
      block: per-axis block shape.

    Returns:
      float32 array of x's shape holding values of `fmt` (saturated, RNE).
    """
    inv = broadcast_scale(1.0 / scale, x.shape, block)
    return formats_lib.round_to_grid(x.astype(jnp.float32) * inv, fmt)
