"""Number formats: a registry of native and simulated floating-point formats, and `cast`.

A `Format` describes a floating-point format by its bits and limits. Native formats
(`fp32`, `bf16`, `fp16`, the FP8 variants, `e8m0`, `e2m1`) carry a JAX dtype and are
cast by XLA; simulated formats (`e4m4` "FP9", `e5m4` "FP10", the FP6 formats `e2m3`
and `e3m2`, or any `simulated(e, m)`) are rounded in float32 with the same semantics.

`cast(x, fmt)` is the one way values enter a format in mpx:

* round to nearest, ties to even;
* finite values beyond the format's range saturate to +-max (they never become NaN:
  a plain `astype(float8_e4m3fn)` turns |x| >= 464 into NaN);
* NaN stays NaN;
* +-inf stays +-inf in formats that have inf (fp32, bf16, fp16, e5m2) and saturates
  to +-max in formats that have none (e4m3, the fnuz formats, e2m1, simulated).

`e8m0` is a scale format (unsigned powers of two, no zero): `cast` clips to
[2^-127, 2^127] so zero and negative inputs become 2^-127 rather than NaN (it rounds
halfway cases up, like XLA and ml_dtypes).

`e2m1` has no NaN code: a NaN cast to it becomes -0 (as in XLA and ml_dtypes). Scaled
arrays still surface it, because a NaN in a block makes that block's scale NaN.

Example:
    >>> import jax.numpy as jnp, mpx
    >>> mpx.cast(jnp.array([1.0625, 500.0, -jnp.inf]), "e4m3").astype(jnp.float32).tolist()
    [1.0, 448.0, -448.0]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = [
    "Format", "simulated", "register", "names", "get", "cast", "upcast", "saturate", "round_to_grid",
    "representable_values", "ulp_exponent"
]


@dataclasses.dataclass(frozen=True)
class Format:
    """A floating-point number format.

    Attributes:
      name: registry name, e.g. "e4m3".
      exponent_bits, mantissa_bits: field widths (mantissa excludes the implicit bit).
      max: largest finite value.
      min_normal: smallest positive normal value.
      min_subnormal: smallest positive value (equals min_normal without subnormals).
      eps: spacing of values just above 1.0 (2**-mantissa_bits).
      has_inf, has_nan: whether the format encodes inf / NaN.
      dtype: the JAX dtype that stores it, or None for simulated formats (held in f32).
      signed: False only for e8m0.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float
    min_normal: float
    min_subnormal: float
    eps: float
    has_inf: bool
    has_nan: bool
    dtype: Any = None
    signed: bool = True

    @property
    def simulated(self) -> bool:
        """True when no native dtype exists and values are held in float32."""
        return self.dtype is None

    @property
    def storage_dtype(self):
        """The dtype arrays of this format are stored in (float32 when simulated)."""
        return jnp.float32 if self.dtype is None else self.dtype

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def bytes_per_element(self) -> float:
        """Storage cost: native bits / 8 (0.5 for e2m1); simulated formats are stored as f32 (4)."""
        return 4.0 if self.dtype is None else self.bits / 8

    @property
    def half_ulp(self) -> float:
        """Worst-case relative rounding error in the normal range (2**-(m+1))."""
        return 2.0 ** -(self.mantissa_bits + 1)

    def __repr__(self) -> str:
        kind = "simulated" if self.simulated else jnp.dtype(self.dtype).name
        return f"Format({self.name}: e{self.exponent_bits}m{self.mantissa_bits}, max={self.max:g}, {kind})"


def _native(name: str, dtype, *, signed: bool = True) -> Format:
    info = ml_dtypes.finfo(dtype)
    exponent_bits = int(info.nexp)
    mantissa_bits = int(info.nmant)
    np_dtype = np.dtype(dtype)
    return Format(
        name=name,
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        max=float(info.max),
        min_normal=float(info.smallest_normal),
        min_subnormal=float(info.smallest_subnormal),
        eps=float(info.eps),
        has_inf=bool(np.isinf(np.array(np.inf, np.float32).astype(np_dtype))),
        has_nan=bool(np.isnan(np.array(np.nan, np.float32).astype(np_dtype))),
        dtype=jnp.dtype(dtype),
        signed=signed,
    )


def simulated(exponent_bits: int, mantissa_bits: int, *, name: str | None = None, ieee: bool = False) -> Format:
    """A simulated format with the given bit widths, rounded in float32.

    Args:
      exponent_bits: 2..8 exponent bits; the bias is 2**(e-1) - 1.
      mantissa_bits: 0..10 explicit mantissa bits.
      name: registry name; defaults to "e{e}m{m}".
      ieee: if True the top exponent code is reserved for inf/NaN (like e5m2);
        if False every code is finite (like the OCP MX FP6/FP4 formats), which is the
        default for the simulated FP6/FP9/FP10 formats.

    Returns:
      A `Format` with dtype None and subnormals.

    Raises:
      ValueError: if the widths are outside what float32 can simulate exactly
        (8 exponent bits need ieee=True: an all-finite top binade exceeds float32's).
    """
    if not 2 <= exponent_bits <= 8 or not 0 <= mantissa_bits <= 10:
        raise ValueError(
            f"simulated formats need 2 <= exponent_bits <= 8 and 0 <= mantissa_bits <= 10 "
            f"(float32 must hold them exactly); got e{exponent_bits}m{mantissa_bits}"
        )
    if exponent_bits == 8 and not ieee:
        raise ValueError(
            f"simulated e8m{mantissa_bits} with ieee=False would reach 2**128, beyond float32; "
            f"use ieee=True (top exponent code reserved, like bf16) or fewer exponent bits"
        )
    bias = 2 ** (exponent_bits - 1) - 1
    top = 2**exponent_bits - 1 - (1 if ieee else 0)
    max_value = 2.0 ** (top - bias) * (2.0 - 2.0**-mantissa_bits)
    min_normal = 2.0 ** (1 - bias)
    return Format(
        name=name or f"e{exponent_bits}m{mantissa_bits}",
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        max=max_value,
        min_normal=min_normal,
        min_subnormal=min_normal * 2.0**-mantissa_bits,
        eps=2.0**-mantissa_bits,
        has_inf=ieee,
        has_nan=ieee,
        dtype=None,
    )


_REGISTRY: dict[str, Format] = {}
_ALIASES = {
    "float32": "fp32", "f32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16", "f16": "fp16", "half": "fp16",
    "float8_e4m3fn": "e4m3", "e4m3fn": "e4m3", "fp8": "e4m3",
    "float8_e5m2": "e5m2",
    "float8_e4m3fnuz": "e4m3fnuz",
    "float8_e5m2fnuz": "e5m2fnuz",
    "float8_e8m0fnu": "e8m0", "e8m0fnu": "e8m0",
    "float4_e2m1fn": "e2m1", "fp4": "e2m1",
    "fp9": "e4m4", "fp10": "e5m4",
}


def register(fmt: Format) -> Format:
    """Adds a format to the registry (so `get(fmt.name)` finds it) and returns it."""
    _REGISTRY[fmt.name] = fmt
    return fmt


def _register_builtins() -> None:
    for name, dtype in [
        ("fp32", jnp.float32), ("bf16", jnp.bfloat16), ("fp16", jnp.float16),
        ("e4m3", jnp.float8_e4m3fn), ("e5m2", jnp.float8_e5m2),
        ("e4m3fnuz", jnp.float8_e4m3fnuz), ("e5m2fnuz", jnp.float8_e5m2fnuz),
        ("e2m1", jnp.float4_e2m1fn),
    ]:
        register(_native(name, dtype))
    register(_native("e8m0", jnp.float8_e8m0fnu, signed=False))
    # jnp has float6 dtypes but XLA cannot run them: simulate (all codes finite, as OCP MX).
    register(simulated(2, 3, name="e2m3"))
    register(simulated(3, 2, name="e3m2"))
    register(simulated(4, 4, name="e4m4"))
    register(simulated(5, 4, name="e5m4"))
    register(simulated(5, 3, name="e5m3"))


_register_builtins()


def names() -> list[str]:
    """All registered format names."""
    return sorted(_REGISTRY)


def get(fmt: str | Format | Any) -> Format:
    """Looks up a format by name ("e4m3"), alias ("float8_e4m3fn") or dtype.

    Raises:
      ValueError: naming the unknown format and the registered ones.
    """
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str):
        key = _ALIASES.get(fmt.lower(), fmt.lower())
        if key in _REGISTRY:
            return _REGISTRY[key]
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(names())}")
    try:
        dtype = jnp.dtype(fmt)
    except TypeError:
        raise ValueError(f"cannot interpret {fmt!r} as a format; known formats: {', '.join(names())}") from None
    for candidate in _REGISTRY.values():
        if candidate.dtype is not None and candidate.dtype == dtype:
            return candidate
    raise ValueError(f"dtype {dtype} has no registered format; known formats: {', '.join(names())}")


def cast(x: jax.Array, fmt: str | Format) -> jax.Array:
    """Casts `x` into `fmt` with saturation and round-to-nearest-even.

    Args:
      x: a floating array of any shape.
      fmt: a format name or `Format`.

    Returns:
      An array of `fmt.storage_dtype` (float32 for simulated formats) and x's shape.
    """
    fmt = get(fmt)
    x = jnp.asarray(x)
    if x.dtype == fmt.dtype:
        return x
    return _cast(x, fmt)


@functools.partial(jax.jit, static_argnums=1)  # one compiled kernel, also when called eagerly
def _cast(x: jax.Array, fmt: Format) -> jax.Array:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if fmt.name == "e8m0":
        return _cast_e8m0(x.astype(jnp.float32), fmt)
    if fmt.simulated:
        return _round_simulated(x.astype(jnp.float32), fmt)
    return saturate(x, fmt).astype(fmt.dtype)


def _cast_e8m0(x: jax.Array, fmt: Format) -> jax.Array:
    """Casts float32 to e8m0, with 2**-127 for zero, negative and tiny inputs.

    2**-127 is a float32 subnormal, which XLA on CPU flushes to zero (and e8m0 has no
    zero: it would read as NaN), so the smallest code is built from its bits instead.
    """
    tiny = jnp.finfo(jnp.float32).tiny  # 2**-126, the smallest normal float32
    rounded = jnp.clip(x, tiny, fmt.max).astype(fmt.dtype)
    smallest = jax.lax.bitcast_convert_type(jnp.zeros(x.shape, jnp.uint8), fmt.dtype)
    return jnp.where(x < tiny, smallest, rounded)  # NaN compares False: stays NaN


def upcast(data: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """FP8 data (float8_e4m3fn or float8_e5m2) as `dtype` values, exactly.

    XLA on CPU converts f8 element by element in scalar code; moving the bits into a
    wider float instead is a few vectorized integer ops, and costs nothing extra on GPU.

    * E5M2 is the top byte of a float16.
    * E4M3 to float32: its exponent and mantissa fields, placed in a float32's with the
      bias difference (127 - 7) added, are the same normal value; subnormals
      (exponent field 0) are the mantissa times 2**-9; S.1111.111 is NaN.
    * E4M3 to bf16: its fields placed in a float16's read as the value divided by 2**8
      in the normal and subnormal range alike (the biases differ by 8), so one exact
      multiply by 256 restores it.

    Args:
      data: an array of any shape; other dtypes go through `astype`.
      dtype: the result dtype (bf16 or f32: both hold every FP8 value exactly).

    Returns:
      data's values as `dtype`.
    """
    kind = jnp.dtype(data.dtype)
    if kind == jnp.dtype(jnp.float8_e5m2):
        bits = jax.lax.bitcast_convert_type(data, jnp.uint8).astype(jnp.uint16) << 8
        return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(dtype)
    if kind != jnp.dtype(jnp.float8_e4m3fn):
        return data.astype(dtype)
    if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
        return _e4m3_to_f32(data)
    b = jax.lax.bitcast_convert_type(data, jnp.uint8).astype(jnp.uint16)
    half = jax.lax.bitcast_convert_type(((b & 0x80) << 8) | ((b & 0x7F) << 7), jnp.float16)
    value = half.astype(jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype) * 256.0
    return jnp.where((b & 0x7F) == 0x7F, jnp.nan, value).astype(dtype)


def _e4m3_to_f32(data: jax.Array) -> jax.Array:
    b = jax.lax.bitcast_convert_type(data, jnp.uint8).astype(jnp.uint32)
    magnitude, sign = b & 0x7F, (b & 0x80) << 24
    normal = (magnitude << 20) + ((127 - 7) << 23)
    subnormal = jax.lax.bitcast_convert_type(magnitude.astype(jnp.float32) * 2.0**-9, jnp.uint32)
    value = jax.lax.bitcast_convert_type(sign | jnp.where(magnitude < 8, subnormal, normal), jnp.float32)
    return jnp.where(magnitude == 0x7F, jnp.nan, value)


def saturate(x: jax.Array, fmt: str | Format) -> jax.Array:
    """Clips finite values (and inf, where `fmt` has no inf) to +-fmt.max; keeps NaN.

    Values are clipped in x's own dtype when it can hold fmt.max exactly, else in f32.
    """
    fmt = get(fmt)
    if jnp.finfo(x.dtype).max < fmt.max:
        return x  # x's dtype cannot exceed the format's range (e.g. bf16 -> fp32)
    clipped = jnp.clip(x, -fmt.max, fmt.max)
    if fmt.has_inf:
        clipped = jnp.where(jnp.isinf(x), x, clipped)
    return clipped


def round_to_grid(v: jax.Array, fmt: str | Format) -> jax.Array:
    """`cast(v, fmt)` as float32 values, for float32 v: the rounding step of quantization.

    Equals `cast(v, fmt).astype(float32)` bit for bit (saturation, round-to-nearest-even,
    subnormals, NaN and inf). For FP8 formats it rounds with vectorizable integer ops
    instead of XLA CPU's scalar f32 -> f8 converts; other formats go through `cast`.

    Args:
      v: float32 array.
      fmt: a format name or `Format`.

    Returns:
      float32 array of v's shape holding values of `fmt`.
    """
    fmt = get(fmt)
    if fmt.simulated or fmt.bits != 8 or not fmt.has_nan or not fmt.signed:  # FP8 element formats only
        return cast(v, fmt).astype(jnp.float32)
    v = saturate(v, fmt)
    drop = 23 - fmt.mantissa_bits
    bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
    half = jnp.uint32((1 << (drop - 1)) - 1) + ((bits >> drop) & jnp.uint32(1))
    normal = jax.lax.bitcast_convert_type((bits + half) & jnp.uint32((0xFFFFFFFF >> drop) << drop), jnp.float32)
    # Below min_normal the grid is uniform: multiples of min_subnormal (a power of two).
    subnormal = jnp.round(v * (1.0 / fmt.min_subnormal)) * fmt.min_subnormal
    return jnp.where(jnp.abs(v) < fmt.min_normal, subnormal, normal)


def _round_simulated(x: jax.Array, fmt: Format) -> jax.Array:
    """Rounds float32 `x` to `fmt`'s grid (RNE, subnormals, saturation), held in float32.

    Works on the float32 bit pattern with integer arithmetic only: no float operation
    touches the value, so the result is exact on every backend, including XLA on CPU
    (which flushes float32 subnormals in arithmetic) and backends whose exp2/log2 are
    approximate.
    """
    m = fmt.mantissa_bits
    emin = 2 - 2 ** (fmt.exponent_bits - 1)  # exponent of the smallest normal
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = bits & jnp.uint32(0x80000000)
    mag = bits & jnp.uint32(0x7FFFFFFF)
    exp_field = (mag >> 23).astype(jnp.int32)
    binade = jnp.maximum(exp_field, 1) - 127  # float32 subnormals sit in binade -126
    # Normal range of fmt: keep m mantissa bits; a carry moves into the exponent field.
    drop = jnp.uint32(23 - m)
    normal = _shift_right_rne(mag, drop) << drop
    # Subnormal range of fmt: count multiples of its smallest subnormal.
    significand = (mag & jnp.uint32(0x7FFFFF)) | jnp.where(exp_field > 0, jnp.uint32(0x800000), jnp.uint32(0))
    shift = jnp.clip(23 - m + emin - binade, 1, 31).astype(jnp.uint32)
    count = _shift_right_rne(significand, shift)  # at most 2**m (= the smallest normal)
    if emin - m >= -126:  # the smallest subnormal is a float32 normal: exact product
        scaled = count.astype(jnp.float32) * np.float32(fmt.min_subnormal)
        subnormal = jax.lax.bitcast_convert_type(scaled, jnp.uint32)
    else:  # emin == -126: fmt's subnormals are float32 subnormals, built bit by bit
        subnormal = count << jnp.uint32(23 - m)
    out = jnp.where(binade >= emin, normal, subnormal)
    # Non-negative float32 bit patterns order like their values: saturate with min.
    out = jnp.minimum(out, jnp.uint32(np.float32(fmt.max).view(np.uint32)))
    inf_bits = jnp.uint32(0x7F800000)
    if fmt.has_inf:
        out = jnp.where(mag == inf_bits, inf_bits, out)
    out = jnp.where(mag > inf_bits, mag, out)  # NaN stays NaN
    return jax.lax.bitcast_convert_type(sign | out, jnp.float32)


def _shift_right_rne(v: jax.Array, shift: jax.Array) -> jax.Array:
    """round(v / 2**shift), ties to even, for uint32 v < 2**31 and 1 <= shift <= 31."""
    one = jnp.uint32(1)
    below_half = (one << (shift - one)) - one
    odd = (v >> shift) & one
    return (v + below_half + odd) >> shift


def representable_values(fmt: str | Format) -> np.ndarray:
    """All finite non-negative values of `fmt`, sorted (for tests and tables).

    Built from the format's bits and limits (`min_normal`, `mantissa_bits`, `max`), not
    from its dtype, so it serves as an independent reference for the fnuz formats
    (bias 2**(e-1)) and e8m0 (no zero, no subnormals) too.

    Raises:
      ValueError: for formats with more than 2**16 values (fp32), naming the format.
    """
    fmt = get(fmt)
    m = fmt.mantissa_bits
    emin = ulp_exponent(fmt.min_normal)
    emax = ulp_exponent(fmt.max)
    if (emax - emin + 1) * 2**m > 2**16:
        raise ValueError(f"format {fmt.name} has too many values to enumerate (mantissa_bits={m})")
    values = {0.0} if fmt.signed else set()
    if fmt.min_subnormal < fmt.min_normal:
        values.update(k * fmt.min_subnormal for k in range(1, 2**m))
    for e in range(emin, emax + 1):
        values.update(v for k in range(2**m) if (v := 2.0**e * (1 + k * 2.0**-m)) <= fmt.max)
    return np.array(sorted(values), dtype=np.float64)


def ulp_exponent(value: float) -> int:
    """floor(log2(|value|)) for a positive finite value (helper for error bounds)."""
    return math.frexp(value)[1] - 1
