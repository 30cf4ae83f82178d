"""Tests for mpx.formats: the format registry, `cast` and `representable_values`.

References: `ml_dtypes.finfo` and numpy casts through ml_dtypes for the native formats,
the OCP 8-bit (FP8) and Microscaling (MX) specifications for the limits, and hand-written
tables of cast edge cases (saturation, ties to even, subnormals, NaN, inf, -0).

What "bit-exact with ml_dtypes" covers here:
  * native formats, on every value with |x| <= fmt.max (ml_dtypes itself does not
    saturate, so out-of-range values are compared with the edge tables instead);
  * bf16 on float32 normals only: XLA on CPU flushes float32 subnormal inputs to zero;
  * simulated formats against the ml_dtypes type with the same encoding: e2m3/e3m2 vs
    float6_e2m3fn/float6_e3m2fn, e2m1 vs float4_e2m1fn, simulated(5, 2, ieee=True) vs
    float8_e5m2, simulated(5, 10, ieee=True) vs float16, simulated(8, 7, ieee=True) vs
    bfloat16 (subnormals included: the simulated cast works on bits), and
    simulated(4, 3) vs float8_e4m3fn for |x| < 464 only. simulated(4, 3) is all-finite
    (max 480) while e4m3fn spends its top code on NaN (max 448): they agree below 464,
    the midpoint between 448 and 480, and differ above it.

`cast` compiles itself (one XLA kernel per format and shape, also when called eagerly);
op-by-op execution under jax.disable_jit is compared with it bit for bit in
test_scaled's property test, which runs the same cast.
"""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mpx import formats

NAN, INF = float("nan"), float("inf")
NATIVE_8BIT = ["e4m3", "e5m2", "e4m3fnuz", "e5m2fnuz"]
NATIVE_SMALL = NATIVE_8BIT + ["e2m1"]
NATIVE_WIDE = ["fp16", "bf16"]
SIMULATED = ["e2m3", "e3m2", "e4m4", "e5m4", "e5m3"]


def _f32(x):
    return np.asarray(x).astype(np.float32)  # through ml_dtypes: no XLA compile per shape


def _same_floats(got, want) -> np.ndarray:
    """Elementwise: equal values with equal signs (so -0 != +0), or both NaN."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    both_nan = np.isnan(got) & np.isnan(want)
    return both_nan | ((got == want) & (np.signbit(got) == np.signbit(want)))


# --------------------------------------------------------------------------- registry


# (max, min_normal, min_subnormal, eps, has_inf, has_nan) from the OCP FP8 spec (e4m3, e5m2),
# the OCP MX spec (e2m1, e2m3, e3m2, e8m0), IEEE 754 (fp16, bf16 as truncated fp32) and the
# fnuz definitions (bias 2**(e-1), NaN at the -0 code, no inf). Simulated e4m4/e5m4/e5m3
# use bias 2**(e-1)-1 with every code finite.
SPEC = {
    "fp32": (float(np.finfo(np.float32).max), 2.0**-126, 2.0**-149, 2.0**-23, True, True),
    "bf16": ((2 - 2.0**-7) * 2.0**127, 2.0**-126, 2.0**-133, 2.0**-7, True, True),
    "fp16": (65504.0, 2.0**-14, 2.0**-24, 2.0**-10, True, True),
    "e4m3": (448.0, 2.0**-6, 2.0**-9, 2.0**-3, False, True),
    "e5m2": (57344.0, 2.0**-14, 2.0**-16, 2.0**-2, True, True),
    "e4m3fnuz": (240.0, 2.0**-7, 2.0**-10, 2.0**-3, False, True),
    "e5m2fnuz": (57344.0, 2.0**-15, 2.0**-17, 2.0**-2, False, True),
    "e8m0": (2.0**127, 2.0**-127, 2.0**-127, 1.0, False, True),
    "e2m1": (6.0, 1.0, 0.5, 0.5, False, False),
    "e2m3": (7.5, 1.0, 0.125, 0.125, False, False),
    "e3m2": (28.0, 0.25, 0.0625, 0.25, False, False),
    "e4m4": (496.0, 2.0**-6, 2.0**-10, 2.0**-4, False, False),
    "e5m4": (126976.0, 2.0**-14, 2.0**-18, 2.0**-4, False, False),
    "e5m3": (122880.0, 2.0**-14, 2.0**-17, 2.0**-3, False, False),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_limits_match_spec(name):
    fmt = formats.get(name)
    want_max, want_min_normal, want_min_sub, want_eps, want_inf, want_nan = SPEC[name]
    assert (fmt.max, fmt.min_normal, fmt.min_subnormal, fmt.eps) == (
        want_max, want_min_normal, want_min_sub, want_eps)
    assert (fmt.has_inf, fmt.has_nan) == (want_inf, want_nan)
    assert fmt.half_ulp == fmt.eps / 2


NATIVE_DTYPES = {
    "fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16,
    "e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
    "e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "e8m0": ml_dtypes.float8_e8m0fnu, "e2m1": ml_dtypes.float4_e2m1fn,
}
ML_DTYPES_OF_SIMULATED = {"e2m3": ml_dtypes.float6_e2m3fn, "e3m2": ml_dtypes.float6_e3m2fn}


@pytest.mark.parametrize("name", sorted(NATIVE_DTYPES) + sorted(ML_DTYPES_OF_SIMULATED))
def test_limits_match_ml_dtypes_finfo(name):
    fmt = formats.get(name)
    info = ml_dtypes.finfo(NATIVE_DTYPES.get(name) or ML_DTYPES_OF_SIMULATED[name])
    assert fmt.max == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.eps == float(info.eps)
    assert (fmt.exponent_bits, fmt.mantissa_bits) == (int(info.nexp), int(info.nmant))
    if name in NATIVE_DTYPES:
        assert fmt.dtype == jnp.dtype(NATIVE_DTYPES[name]) and not fmt.simulated
        assert fmt.bits == 8 * np.dtype(NATIVE_DTYPES[name]).itemsize or name == "e2m1"
    else:
        assert fmt.simulated and fmt.storage_dtype == jnp.float32 and fmt.bytes_per_element == 4


def test_bits_and_storage():
    assert [formats.get(n).bits for n in ("fp32", "bf16", "e4m3", "e8m0", "e2m1", "e2m3", "e4m4", "e5m4")] == [
        32, 16, 8, 8, 4, 6, 9, 10]
    assert formats.get("e4m3").bytes_per_element == 1 and formats.get("bf16").bytes_per_element == 2


@pytest.mark.parametrize("alias, name", [
    ("float8_e4m3fn", "e4m3"), ("FP8", "e4m3"), ("bfloat16", "bf16"), ("half", "fp16"),
    ("fp9", "e4m4"), ("FP10", "e5m4"), ("fp4", "e2m1"), ("float8_e8m0fnu", "e8m0"),
    (jnp.float8_e5m2, "e5m2"), (jnp.dtype(jnp.float32), "fp32"), (np.float16, "fp16"),
])
def test_get_aliases_and_dtypes(alias, name):
    assert formats.get(alias) is formats.get(name)
    assert formats.get(formats.get(name)) is formats.get(name)


@pytest.mark.parametrize("bad", ["e9m9", "fp7", jnp.int8, 3.5])
def test_get_unknown_names_the_value(bad):
    with pytest.raises(ValueError, match="known formats") as err:
        formats.get(bad)
    assert ("e9m9" in str(err.value)) == (bad == "e9m9")


@pytest.mark.parametrize("e, m, ieee", [(1, 2, False), (9, 2, True), (4, 11, False), (4, -1, False), (8, 3, False)])
def test_simulated_rejects_widths_float32_cannot_hold(e, m, ieee):
    with pytest.raises(ValueError, match=f"e{e}m{m}"):
        formats.simulated(e, m, ieee=ieee)


def test_simulated_ieee_reserves_top_code():
    assert formats.simulated(5, 2, ieee=True).max == 57344.0  # = e5m2
    assert formats.simulated(5, 2).max == 114688.0  # all codes finite: one more binade
    assert formats.simulated(8, 7, ieee=True).max == float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)


def test_register_adds_a_format():
    fmt = formats.register(formats.simulated(3, 3, name="test_e3m3"))
    assert formats.get("test_e3m3") is fmt and "test_e3m3" in formats.names()


# --------------------------------------------------------------------------- representable values


def _all_finite_nonnegative(dtype, nbits: int) -> np.ndarray:
    codes = np.arange(2**nbits, dtype=np.uint16 if nbits == 16 else np.uint8)
    with np.errstate(invalid="ignore"):  # NaN codes
        values = codes.view(dtype).astype(np.float64)
    return np.unique(values[np.isfinite(values) & (values >= 0)])


@pytest.mark.parametrize("name, dtype, nbits", [
    ("e4m3", ml_dtypes.float8_e4m3fn, 8), ("e5m2", ml_dtypes.float8_e5m2, 8),
    ("e4m3fnuz", ml_dtypes.float8_e4m3fnuz, 8), ("e5m2fnuz", ml_dtypes.float8_e5m2fnuz, 8),
    ("e8m0", ml_dtypes.float8_e8m0fnu, 8), ("e2m1", ml_dtypes.float4_e2m1fn, 4),
    ("e2m3", ml_dtypes.float6_e2m3fn, 6), ("e3m2", ml_dtypes.float6_e3m2fn, 6),
    ("fp16", np.float16, 16), ("bf16", ml_dtypes.bfloat16, 16),
])
def test_representable_values_enumerate_every_code(name, dtype, nbits):
    np.testing.assert_array_equal(formats.representable_values(name), _all_finite_nonnegative(dtype, nbits))


def test_representable_values_of_simulated_fp9():
    values = formats.representable_values("e4m4")
    # 2**4 - 1 positive subnormals, 15 binades of 16 values, zero.
    assert len(values) == 1 + 15 + 15 * 16 and values[-1] == 496.0 and values[1] == 2.0**-10


def test_representable_values_refuses_fp32():
    with pytest.raises(ValueError, match="fp32"):
        formats.representable_values("fp32")


# --------------------------------------------------------------------------- cast: edge tables

# (input, expected) per format. "Just above max" rows saturate where a plain astype would
# give NaN (e4m3fn) or inf (e5m2, fp16). Halfway cases round to the even neighbour.
EDGE_TABLES = {
    "e4m3": [
        (448, 448), (449, 448), (464, 448), (480, 448), (1e30, 448), (-500, -448),
        (INF, 448), (-INF, -448), (NAN, NAN), (0.0, 0.0), (-0.0, -0.0),
        (432, 448), (424, 416), (1.0625, 1.0), (1.1875, 1.25), (-1.0625, -1.0),
        (2.0**-9, 2.0**-9), (2.0**-10, 0.0), (-(2.0**-10), -0.0), (2.0**-10 * 1.0001, 2.0**-9),
        (1.5 * 2.0**-9, 2.0**-8), (2.5 * 2.0**-9, 2.0**-8), (7.5 * 2.0**-9, 2.0**-6),
    ],
    "e5m2": [
        (57344, 57344), (60000, 57344), (61440, 57344), (1e10, 57344), (-1e10, -57344),
        (INF, INF), (-INF, -INF), (NAN, NAN), (-0.0, -0.0),
        (53248, 49152), (1.125, 1.0), (1.375, 1.5),
        (2.0**-16, 2.0**-16), (2.0**-17, 0.0), (3 * 2.0**-17, 2.0**-15), (-(2.0**-18), -0.0),
    ],
    "e4m3fnuz": [
        (240, 240), (250, 240), (INF, 240), (-INF, -240), (NAN, NAN),
        (-0.0, 0.0),  # fnuz has no -0: its code is NaN
        (1.0625, 1.0), (2.0**-10, 2.0**-10), (2.0**-11, 0.0), (-(2.0**-12), 0.0), (3 * 2.0**-11, 2.0**-9),
    ],
    "e5m2fnuz": [
        (57344, 57344), (61440, 57344), (INF, 57344), (-INF, -57344), (NAN, NAN), (-0.0, 0.0),
        (2.0**-17, 2.0**-17), (2.0**-18, 0.0), (1.125, 1.0),
    ],
    "e2m1": [  # values 0, .5, 1, 1.5, 2, 3, 4, 6; no NaN code (see test_e2m1_has_no_nan)
        (6, 6), (7, 6), (1e9, 6), (INF, 6), (-INF, -6), (-0.0, -0.0),
        (5, 4), (2.5, 2), (3.5, 4), (0.25, 0.0), (-0.25, -0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0),
    ],
    "fp16": [
        (65504, 65504), (65519, 65504), (65520, 65504), (1e6, 65504), (INF, INF), (-INF, -INF),
        (NAN, NAN), (-0.0, -0.0), (1 + 2.0**-11, 1.0), (1 + 3 * 2.0**-11, 1 + 2.0**-9),
        (2.0**-24, 2.0**-24), (2.0**-25, 0.0), (3 * 2.0**-25, 2.0**-23),
    ],
    "bf16": [
        (float(np.finfo(np.float32).max), (2 - 2.0**-7) * 2.0**127), (INF, INF), (-INF, -INF),
        (NAN, NAN), (-0.0, -0.0), (1 + 2.0**-8, 1.0), (1 + 3 * 2.0**-8, 1 + 2.0**-6),
    ],
    "e2m3": [  # simulated FP6, all codes finite
        (7.5, 7.5), (7.75, 7.5), (8, 7.5), (INF, 7.5), (-INF, -7.5), (NAN, NAN), (-0.0, -0.0),
        (7.25, 7.0), (1.0625, 1.0), (1.1875, 1.25), (0.0625, 0.0), (0.1875, 0.25), (-0.0625, -0.0),
    ],
    "e3m2": [
        (28, 28), (30, 28), (32, 28), (INF, 28), (NAN, NAN), (-0.0, -0.0),
        (26, 24), (1.125, 1.0), (1.375, 1.5), (0.03125, 0.0), (0.09375, 0.125),
    ],
    "e4m4": [  # simulated "FP9"
        (496, 496), (500, 496), (1e6, 496), (INF, 496), (-INF, -496), (NAN, NAN), (-0.0, -0.0),
        (1.03125, 1.0), (1.09375, 1.125), (2.0**-10, 2.0**-10), (2.0**-11, 0.0), (3 * 2.0**-11, 2.0**-9),
    ],
    "e5m4": [  # simulated "FP10"
        (126976, 126976), (130000, 126976), (INF, 126976), (NAN, NAN), (-0.0, -0.0),
        (1.03125, 1.0), (1.09375, 1.125), (2.0**-18, 2.0**-18), (2.0**-19, 0.0), (3 * 2.0**-19, 2.0**-17),
    ],
    "e8m0": [  # unsigned powers of two; no zero; halfway rounds up (as XLA and ml_dtypes)
        (1.0, 1.0), (3.0, 4.0), (1.5, 2.0), (0.75, 1.0), (2.0**127, 2.0**127), (3e38, 2.0**127),
        (INF, 2.0**127), (NAN, NAN), (0.0, 2.0**-127), (-4.0, 2.0**-127), (2.0**-126, 2.0**-126),
    ],
}


@pytest.mark.parametrize("name", sorted(EDGE_TABLES))
def test_cast_edge_table(name):
    inputs, want = (np.array(col, np.float64) for col in zip(*EDGE_TABLES[name]))
    got = _f32(formats.cast(jnp.asarray(inputs, jnp.float32), name))
    bad = ~_same_floats(got, want)
    assert not bad.any(), f"{name}: inputs {inputs[bad]} gave {got[bad]}, want {want[bad]}"


def test_e2m1_has_no_nan():
    # No NaN code exists: XLA and ml_dtypes both map NaN to -0. (Scaled arrays still
    # report it through a NaN scale: see test_scaled.)
    fmt = formats.get("e2m1")
    assert not fmt.has_nan
    got = _f32(formats.cast(jnp.array([NAN]), fmt))
    want = np.array([NAN], np.float32).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert _same_floats(got, want).all()


@pytest.mark.parametrize("name", NATIVE_SMALL + NATIVE_WIDE + SIMULATED)
def test_finite_inputs_never_become_nan_or_inf(name):
    fmt = formats.get(name)
    f32 = np.finfo(np.float32)
    above = [min(fmt.max * k, float(f32.max)) for k in (1 + fmt.eps / 4, 1 + fmt.eps / 2, 1.5, 2)]
    x = np.array([f32.max, -f32.max, 1e20, -1e20, f32.tiny, *above], np.float32)
    got = _f32(formats.cast(jnp.asarray(x), fmt))
    assert np.isfinite(got).all()
    assert np.abs(got).max() == fmt.max


@pytest.mark.parametrize("name", ["e4m3", "e2m3", "fp16"])
def test_cast_keeps_shape_and_sets_dtype(name):
    fmt = formats.get(name)
    x = jnp.ones((2, 3, 4), jnp.float32)
    y = formats.cast(x, fmt)
    assert y.shape == (2, 3, 4) and y.dtype == fmt.storage_dtype
    assert formats.cast(jnp.arange(3), fmt).dtype == fmt.storage_dtype  # ints go through f32
    assert formats.cast(y, fmt) is y or np.array_equal(_f32(formats.cast(y, fmt)), _f32(y))


# --------------------------------------------------------------------------- cast: bit-exact vs ml_dtypes


def _probe_values(fmt: formats.Format, rng: np.random.Generator, limit: float) -> np.ndarray:
    """Grid values, midpoints, midpoints +- one float32 ulp, and random values, both signs."""
    grid = formats.representable_values(fmt)
    mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
    random = (rng.standard_normal(4000) * np.exp2(rng.uniform(-20, 20, 4000))).astype(np.float32)
    x = np.concatenate([grid.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
                        np.nextafter(mids, np.float32(0)), random])
    x = np.concatenate([x, -x])
    return x[np.abs(x) < limit]


def _assert_cast_matches(x: np.ndarray, fmt, reference_dtype, input_dtype=np.float32):
    x = x.astype(input_dtype)
    want = x.astype(reference_dtype).astype(np.float32)
    got = _f32(formats.cast(jnp.asarray(x), fmt))
    bad = ~_same_floats(got, want)
    assert not bad.any(), f"{fmt}: {x[bad][:5]} -> {got[bad][:5]}, ml_dtypes {want[bad][:5]}"


@pytest.mark.parametrize("name", NATIVE_SMALL + ["fp16"])
def test_native_cast_is_bit_exact_with_ml_dtypes(name):
    fmt = formats.get(name)
    x = _probe_values(fmt, np.random.default_rng(0), np.nextafter(np.float32(fmt.max), np.float32(np.inf)))
    _assert_cast_matches(x, fmt, fmt.dtype)


def test_bf16_cast_is_bit_exact_on_float32_normals():
    fmt = formats.get("bf16")
    x = _probe_values(fmt, np.random.default_rng(1), np.float32(fmt.max))
    x = x[np.abs(x) >= np.finfo(np.float32).tiny]  # XLA on CPU flushes f32 subnormal inputs
    _assert_cast_matches(x, fmt, ml_dtypes.bfloat16)


@pytest.mark.parametrize("name", NATIVE_8BIT)
@pytest.mark.parametrize("input_dtype", [ml_dtypes.bfloat16, np.float16], ids=["from_bf16", "from_fp16"])
def test_native_cast_from_half_precision_inputs(name, input_dtype):
    fmt = formats.get(name)
    x = _probe_values(fmt, np.random.default_rng(2), min(fmt.max, 65504.0))
    _assert_cast_matches(x, fmt, fmt.dtype, input_dtype=input_dtype)


@pytest.mark.parametrize("fmt, reference, limit", [
    (formats.get("e2m3"), ml_dtypes.float6_e2m3fn, 7.5),
    (formats.get("e3m2"), ml_dtypes.float6_e3m2fn, 28.0),
    (formats.simulated(2, 1), ml_dtypes.float4_e2m1fn, 6.0),
    (formats.simulated(5, 2, ieee=True), ml_dtypes.float8_e5m2, 57344.0),
    (formats.simulated(4, 3), ml_dtypes.float8_e4m3fn, 464.0),  # all-finite vs fn: see module doc
    (formats.simulated(5, 10, ieee=True), np.float16, 65504.0),
    (formats.simulated(8, 7, ieee=True), ml_dtypes.bfloat16, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)),
], ids=["e2m3", "e3m2", "sim_e2m1", "sim_e5m2", "sim_e4m3", "sim_fp16", "sim_bf16"])
def test_simulated_cast_is_bit_exact_with_ml_dtypes(fmt, reference, limit):
    x = _probe_values(fmt, np.random.default_rng(3), np.float32(limit) * (1 + 2.0**-24))
    x = x[np.abs(x) < limit] if limit == 464.0 else x
    _assert_cast_matches(x, fmt, reference)


def test_simulated_e4m3_differs_from_e4m3fn_only_at_the_top_code():
    sim = formats.simulated(4, 3)
    assert sim.max == 480.0 and formats.get("e4m3").max == 448.0
    got = _f32(formats.cast(jnp.array([470.0, 480.0, 500.0]), sim))
    np.testing.assert_array_equal(got, [480.0, 480.0, 480.0])


def test_simulated_subnormals_of_eight_exponent_bits():
    # emin = -126: the format's subnormals are float32 subnormals, built from bits.
    fmt = formats.simulated(8, 3, ieee=True)
    x = np.array([2.0**-129, 2.0**-130, 3 * 2.0**-130, 2.0**-131, -(2.0**-129)], np.float32)
    got = np.asarray(formats.cast(jnp.asarray(x), fmt))
    want = np.array([2.0**-129, 0.0, 2.0**-128, 0.0, -(2.0**-129)], np.float32)
    assert _same_floats(got, want).all(), got


def test_ulp_exponent():
    assert [formats.ulp_exponent(v) for v in (1.0, 1.5, 448.0, 2.0**-9, 0.75)] == [0, 0, 8, -9, -1]


# --------------------------------------------------------------------------- upcast


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("to", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("jitted", [True, False], ids=["jit", "eager"])
def test_upcast_is_exact_on_every_code(dtype, to, jitted):
    """All 256 codes: the same value (sign of zero included) as ml_dtypes' widening, NaN
    codes NaN, the e4m3 subnormals (exponent field 0) included."""
    import jax

    codes = np.arange(256, dtype=np.uint8).view(dtype)
    upcast = jax.jit(formats.upcast, static_argnums=1) if jitted else formats.upcast
    got = np.asarray(upcast(jnp.asarray(codes), to)).astype(np.float32)
    want = codes.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.array_equal(np.signbit(got[~nan]), np.signbit(want[~nan]))
    assert np.asarray(upcast(jnp.asarray(codes), to)).dtype == np.dtype(to)


def test_upcast_passes_other_dtypes_through_astype():
    x = jnp.asarray([1.5, -2.0], jnp.float16)
    assert formats.upcast(x, jnp.float32).dtype == jnp.float32
    assert formats.upcast(x, jnp.float32).tolist() == [1.5, -2.0]
