"""Tests for mpx.scaled: granularities, scales, quantize/dequantize, pytrees, finiteness.

References are numpy: per-block amax by padding and reshaping, each block's scale
broadcast with np.repeat, and casts through ml_dtypes with explicit clipping. Error
tolerances come from the format (half an ulp, half the smallest subnormal) plus float32
rounding of the scale products (a few float32 ulps), never from magic numbers.
"""

import dataclasses

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mpx
from mpx import formats, scaled

EPS32 = float(np.finfo(np.float32).eps)
TINY32 = float(np.finfo(np.float32).tiny)


# --------------------------------------------------------------------------- numpy references


def np_block_amax(x: np.ndarray, block) -> np.ndarray:
    """max |x| per block (zero-padded ragged ends), float32."""
    pads = [(0, -d % b) for d, b in zip(x.shape, block)]
    padded = np.pad(np.abs(x.astype(np.float32)), pads)
    split = [s for d, b in zip(padded.shape, block) for s in (d // b, b)]
    return padded.reshape(split).max(axis=tuple(range(1, 2 * x.ndim, 2)))


def np_broadcast(scale: np.ndarray, shape, block) -> np.ndarray:
    """Each block's scale repeated over its block, trimmed to shape."""
    out = np.asarray(scale)
    for axis, b in enumerate(block):
        out = np.repeat(out, b, axis=axis)
    return out[tuple(slice(0, d) for d in shape)]


def np_cast(y: np.ndarray, fmt: formats.Format) -> np.ndarray:
    """Saturating cast of float32 y through ml_dtypes (native formats), as float32."""
    clipped = np.clip(y.astype(np.float32), -fmt.max, fmt.max)
    return clipped.astype(fmt.dtype).astype(np.float32)


def np_error_bound(x: np.ndarray, full_scale: np.ndarray, fmt: formats.Format, deq: np.ndarray) -> np.ndarray:
    """Worst-case |x - dequantize(quantize(x))| derived from x and its block's scale alone.

    Normal range: half an ulp of |x|/scale's binade times the scale; subnormal range:
    half the smallest subnormal times the scale (the same formula with the binade clamped
    to the smallest normal's). Plus float32 rounding of 1/scale, x * (1/scale) and
    data * scale: at most 2 float32 eps of |x| + |dequantized|; plus the smallest float32
    normal, since XLA on CPU flushes float32 subnormal results to zero.
    """
    x64, s64 = x.astype(np.float64), full_scale.astype(np.float64)
    y = np.abs(x64) / s64
    binade = np.floor(np.log2(np.maximum(y, fmt.min_normal)))
    format_error = np.exp2(binade - fmt.mantissa_bits - 1) * s64
    return format_error + 2 * EPS32 * (np.abs(x64) + np.abs(deq.astype(np.float64))) + TINY32


def _f32(a) -> np.ndarray:
    return np.asarray(a).astype(np.float32)  # through ml_dtypes: no XLA compile per shape


def _bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------- granularities


@pytest.mark.parametrize("granularity, shape, block", [
    (mpx.PerTensor(), (6, 10), (6, 10)),
    (mpx.PerAxis(0), (6, 10), (1, 10)),
    (mpx.PerAxis(-1), (6, 10), (6, 1)),
    (mpx.PerAxis((0, 2)), (2, 3, 4), (1, 3, 1)),
    (mpx.Blocks((1, 128)), (2, 4, 256), (1, 1, 128)),  # per-token tiles of an activation
    (mpx.Blocks((128, 128)), (256, 384), (128, 128)),
    (mpx.Blocks((128, 128)), (100, 300), (100, 128)),  # block clipped to a short axis
    (mpx.Blocks((-1, 4)), (5, 8), (5, 4)),
    (mpx.MX(32), (3, 100), (1, 32)),
    (mpx.MX(32, axis=0), (64, 5), (32, 1)),
    ((2, 4), (4, 8), (2, 4)),  # a plain tuple means Blocks
])
def test_block_shapes(granularity, shape, block):
    assert scaled.resolve_block(granularity, shape) == block


@pytest.mark.parametrize("make, match", [
    (lambda: mpx.Blocks((0, 128)), r"\(0, 128\)"),
    (lambda: mpx.Blocks((-2,)), r"\(-2,\)"),
    (lambda: mpx.Blocks((1, 1, 128)).block_shape((4, 256)), r"\(4, 256\)"),
    (lambda: mpx.PerAxis(2).block_shape((4, 5)), "axis 2"),
    (lambda: mpx.MX(32, axis=-3).block_shape((4, 5)), "axis -3"),
    (lambda: scaled.compute_amax(jnp.ones((4, 4)), (2,)), r"\(4, 4\)"),
])
def test_bad_granularities_raise_valueerror_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_granularity_is_a_typeerror():
    with pytest.raises(TypeError, match="granularity"):
        scaled.resolve_block("per_tensor", (4, 4))


# --------------------------------------------------------------------------- scales and data


RAGGED_CASES = [
    ((130, 300), mpx.Blocks((128, 128)), (2, 3)),
    ((3, 100), mpx.MX(32), (3, 4)),
    ((5, 7, 33), mpx.Blocks((2, 4, 16)), (3, 2, 3)),
    ((9,), mpx.Blocks((4,)), (3,)),
    ((6, 10), mpx.PerAxis(1), (1, 10)),
]


REFERENCE_CASES = [(RAGGED_CASES[0], "e4m3"), (RAGGED_CASES[1], "e2m1"), (RAGGED_CASES[2], "e5m2"),
                   (RAGGED_CASES[3], "e4m3fnuz"), (RAGGED_CASES[4], "e4m3"), (RAGGED_CASES[0], "bf16")]


@pytest.mark.parametrize("case, name", REFERENCE_CASES)
def test_quantize_matches_numpy_reference(case, name):
    shape, granularity, want_scale_shape = case
    fmt = formats.get(name)
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32) * 3
    q = mpx.quantize(jnp.asarray(x), name, granularity)
    block = scaled.resolve_block(granularity, shape)
    assert q.scale.shape == want_scale_shape == scaled.scale_shape(shape, block)
    assert q.block == block and q.data.dtype == fmt.dtype and q.scale.dtype == jnp.float32
    pow2 = isinstance(granularity, mpx.MX)
    amax = np_block_amax(x, block)
    scale = np.asarray(q.scale)
    if pow2:
        np.testing.assert_array_equal(np.frexp(scale)[0], 0.5)  # exact powers of two
        ratio = amax.astype(np.float64) / scale
        assert (ratio <= fmt.max).all() and (ratio > fmt.max / 2).all()
    else:  # amax / fmt.max, up to the float32 rounding of the division
        np.testing.assert_allclose(scale, amax / np.float32(fmt.max), rtol=2 * EPS32)
    # Given the scale, the data is exactly the saturating cast of x * (1 / scale).
    inv = np_broadcast((np.float32(1) / scale).astype(np.float32), shape, block)
    np.testing.assert_array_equal(_f32(q.data), np_cast(x * inv, fmt))
    deq = np.asarray(mpx.dequantize(q))
    np.testing.assert_array_equal(deq, _f32(q.data) * np_broadcast(scale, shape, block))
    assert (np.abs(deq - x) <= np_error_bound(x, np_broadcast(scale, shape, block), fmt, deq)).all()


@pytest.mark.parametrize("shape, block", [((8, 12), (4, 3)), ((8, 12), (8, 12)), ((7, 13), (4, 5)),
                                          ((2, 3, 5), (1, 2, 5)), ((10,), (3,))])
def test_broadcast_scale_matches_numpy_repeat(shape, block):
    scale = np.arange(np.prod(scaled.scale_shape(shape, block)), dtype=np.float32).reshape(
        scaled.scale_shape(shape, block))
    got = scaled.broadcast_scale(jnp.asarray(scale), shape, block)
    np.testing.assert_array_equal(np.asarray(got), np_broadcast(scale, shape, block))


def test_headline_granularities():
    x = jax.random.normal(jax.random.key(1), (256, 384))
    act = mpx.quantize(x, "e4m3", mpx.Blocks((1, 128)))
    weight = mpx.quantize(x, "e4m3", mpx.Blocks((128, 128)))
    mx = mpx.quantize(x, "e2m1", mpx.MX(32))
    assert act.scale.shape == (256, 3) and weight.scale.shape == (2, 3) and mx.scale.shape == (256, 12)
    assert scaled.blocks_count(x.shape, weight.block) == 6
    assert weight.nbytes == 256 * 384 + 6 * 4 and mx.nbytes == 256 * 384 // 2 + 256 * 12 * 4
    # MX scales are E8M0-representable: casting them to e8m0 changes nothing.
    np.testing.assert_array_equal(_f32(formats.cast(mx.scale, "e8m0")), np.asarray(mx.scale))


def test_explicit_scale_scalar_and_per_block():
    x = jnp.arange(16.0).reshape(4, 4)
    q = mpx.quantize(x, "e4m3", mpx.Blocks((2, 2)), scale=2.0)
    assert q.scale.shape == (2, 2) and (np.asarray(q.scale) == 2.0).all()
    per_block = jnp.array([[1.0, 2.0], [4.0, 8.0]])
    q = mpx.quantize(x, "e4m3", mpx.Blocks((2, 2)), scale=per_block)
    np.testing.assert_array_equal(_f32(q.data), np_cast(np.asarray(x) / np_broadcast(per_block, (4, 4), (2, 2)),
                                                        formats.get("e4m3")))
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 2\)"):
        mpx.quantize(x, "e4m3", mpx.Blocks((2, 2)), scale=jnp.ones(3))


def test_explicit_scale_saturates_out_of_range_values():
    q = mpx.quantize(jnp.array([1000.0, -1e30, 1.0]), "e4m3", scale=1.0)
    np.testing.assert_array_equal(np.asarray(mpx.dequantize(q)), [448.0, -448.0, 1.0])


@pytest.mark.parametrize("margin", [0, 1, 3])
def test_margin_leaves_headroom(margin):
    x = jax.random.normal(jax.random.key(2), (8, 64))
    q = mpx.quantize(x, "e4m3", mpx.Blocks((1, 32)), margin=margin)
    base = mpx.quantize(x, "e4m3", mpx.Blocks((1, 32)))
    np.testing.assert_allclose(np.asarray(q.scale), np.asarray(base.scale) * 2.0**margin, rtol=2 * EPS32)
    assert float(jnp.max(jnp.abs(_f32(q.data)))) <= 448.0 * 2.0**-margin


@pytest.mark.parametrize("name", ["e4m3", "e2m1", "e4m3fnuz", "bf16"])
@pytest.mark.parametrize("margin", [0, 1, 0.5])
def test_pow2_scale_is_the_tightest_power_of_two(name, margin):
    fmt = formats.get(name)
    target = np.float32(fmt.max * 2.0**-margin)
    k = np.arange(-60, 60)
    base = (np.float64(target) * 2.0**k).astype(np.float32)
    rng = np.random.default_rng(0)
    amax = np.concatenate([base, np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(0)),
                           rng.uniform(1e-3, 1e3, 200).astype(np.float32)])
    amax = amax[np.isfinite(amax)]  # bf16's target * 2**k overflows float32 for k > 0
    scale = np.asarray(scaled.compute_scale(jnp.asarray(amax), fmt, margin=margin, pow2=True))
    np.testing.assert_array_equal(np.frexp(scale)[0], 0.5)
    # Scales below the float32 normal range fall back to 1 (bf16: amax below ~4).
    fallback = amax.astype(np.float64) / target < TINY32
    assert (scale[fallback] == 1.0).all()
    ratio = amax[~fallback].astype(np.float64) / scale[~fallback]
    assert (ratio <= target).all() and (ratio > target / 2).all()


def test_pow2_helpers_are_exact():
    k = np.arange(-126, 128)
    powers = np.exp2(k).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(scaled.exp2_int(jnp.asarray(k))), powers)
    np.testing.assert_array_equal(np.asarray(scaled.floor_log2(jnp.asarray(powers))), k)
    np.testing.assert_array_equal(np.asarray(scaled.pow2_ceil(jnp.asarray(powers))), powers)
    above = np.nextafter(powers[:-1], np.float32(np.inf))
    np.testing.assert_array_equal(np.asarray(scaled.pow2_ceil(jnp.asarray(above))), powers[1:])
    specials = np.asarray(scaled.pow2_ceil(jnp.array([0.0, np.inf, np.nan])))
    assert specials[0] == 0 and specials[1] == np.inf and np.isnan(specials[2])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_amax_of_16_bit_floats_matches_float32_including_nan_and_inf(dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 200)) * np.exp(rng.uniform(-8, 8, (6, 1)))).astype(np.float32)
    x[1, :] = -np.abs(x[1, :])  # an all-negative row: amax from the most negative value
    x[2, :128] = 0.0
    x[2, 0] = -0.0
    x[3, 5], x[4, 140], x[5, 7] = np.inf, -np.inf, np.nan
    x16 = jnp.asarray(x, dtype)
    got = np.asarray(scaled.compute_amax(x16, (1, 128)))  # 200 wide: a zero-padded ragged block
    want = np.asarray(scaled.compute_amax(x16.astype(jnp.float32), (1, 128)))
    np.testing.assert_array_equal(got, want)
    assert got[3, 0] == np.inf and got[4, 1] == np.inf and np.isnan(got[5, 0]) and got[2, 0] == 0.0


def test_round_up_bits_is_the_next_value_with_that_many_mantissa_bits():
    x = np.array([1.0, 1.0625, 1.125, 1.126, 1.875, 1.9, 3.0, 2.0**-126 * 1.01, 3.4e38], np.float32)
    want = np.array([1.0, 1.125, 1.125, 1.25, 1.875, 2.0, 3.0, 2.0**-126 * 1.125, 3.4e38], np.float32)
    got = np.asarray(mpx.scales.round_up_bits(jnp.asarray(x), 3))
    np.testing.assert_array_equal(got[:-1], want[:-1])
    assert got[-1] >= x[-1] and (got[-1:].view(np.uint32) & 0xFFFFF == 0).all()
    specials = np.asarray(mpx.scales.round_up_bits(jnp.array([0.0, np.inf, np.nan]), 3))
    assert specials[0] == 0 and specials[1] == np.inf and np.isnan(specials[2])


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_ue8m3_scales_are_tight_and_fold_into_bf16_exactly(name):
    fmt = formats.get(name)
    rng = np.random.default_rng(3)
    amax = np.concatenate([rng.lognormal(0, 8, 400), fmt.max * 2.0 ** np.arange(-20, 20)]).astype(np.float32)
    scale = np.asarray(scaled.compute_scale(jnp.asarray(amax), fmt, scale_format="ue8m3"))
    assert (scale.view(np.uint32) & 0xFFFFF == 0).all()  # 3 mantissa bits
    ratio = amax.astype(np.float64) / scale
    assert (ratio <= fmt.max * (1 + EPS32)).all() and (ratio > fmt.max / 1.125).all()
    # Every grid value times every scale is a bf16 value: the fold into bf16 is exact.
    grid = formats.representable_values(fmt).astype(np.float32)
    prod = (grid[None, :] * scale[:, None]).astype(np.float32)
    prod = prod[np.abs(prod) >= TINY32]
    np.testing.assert_array_equal(np.asarray(jnp.asarray(prod).astype(jnp.bfloat16).astype(jnp.float32)), prod)
    f32 = np.asarray(scaled.compute_scale(jnp.asarray(amax), fmt))
    bf16_of_f32 = (grid[None, :] * f32[:, None]).astype(np.float32)
    assert (np.asarray(jnp.asarray(bf16_of_f32).astype(jnp.bfloat16).astype(jnp.float32)) != bf16_of_f32).any()


def test_scale_format_errors_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"'e8m3'.*|.*ue8m3"):
        mpx.quantize(jnp.ones((4, 128)), "e4m3", mpx.Blocks((1, 128)), scale_format="e8m3")
    with pytest.raises(ValueError, match="pow2"):
        mpx.quantize(jnp.ones((4, 128)), "e4m3", mpx.Blocks((1, 128)), pow2_scale=True, scale_format="ue8m3")
    assert mpx.scales.folds_exactly("e4m3", "ue8m3") and mpx.scales.folds_exactly("e5m2", "ue8m3")
    assert not mpx.scales.folds_exactly("e4m4", "ue8m3") and mpx.scales.folds_exactly("e4m4", "ue8m0")
    assert not mpx.scales.folds_exactly("e4m3", "f32")


@pytest.mark.parametrize("name", ["e4m3", "e4m4"])
def test_all_zero_blocks_get_a_finite_scale(name):
    x = np.zeros((4, 64), np.float32)
    x[0, :32] = 1.5  # one non-zero block; the rest are all zero
    for granularity in (mpx.Blocks((1, 32)), mpx.MX(32)):
        q = mpx.quantize(x, name, granularity)
        assert np.isfinite(np.asarray(q.scale)).all() and (np.asarray(q.scale)[1:] == 1.0).all()
        np.testing.assert_allclose(np.asarray(mpx.dequantize(q)), x, rtol=2 * EPS32, atol=0)
    zeros = mpx.quantize(np.zeros((4, 64), np.float32), name)
    assert float(zeros.scale.reshape(())) == 1.0 and not np.asarray(mpx.dequantize(zeros)).any()
    tiny = mpx.quantize(np.full((4, 64), 1e-37, np.float32), name)  # amax/max: a float32 subnormal
    assert np.isfinite(np.asarray(tiny.scale)).all() and np.isfinite(np.asarray(mpx.dequantize(tiny))).all()


def test_zero_sign_survives_quantization():
    q = mpx.quantize(jnp.array([-0.0, 0.0, 1.0]), "e4m3")
    assert list(np.signbit(_f32(q.data))) == [True, False, False]
    assert list(np.signbit(np.asarray(mpx.dequantize(q)))) == [True, False, False]


@pytest.mark.parametrize("input_dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(input_dtype):
    x = jax.random.normal(jax.random.key(3), (4, 64)).astype(input_dtype)
    q = mpx.quantize(x, "e4m3", mpx.Blocks((1, 32)))
    deq = mpx.dequantize(q, input_dtype)
    assert deq.dtype == input_dtype
    ref = mpx.quantize(x.astype(jnp.float32), "e4m3", mpx.Blocks((1, 32)))
    assert _bits_equal(q.data, ref.data) and _bits_equal(q.scale, ref.scale)


def test_dequantize_rejects_plain_arrays():
    with pytest.raises(TypeError, match="ScaledArray"):
        mpx.dequantize(jnp.ones(3))


def test_quantization_error_bound_table():
    # e5m2 data at 2**15 (where an approximate log2 gave half the bound) and subnormals.
    data = jnp.array([57344.0, 32768.0, 1.0, 1.25, 2.0**-14, 2.0**-16, 0.0], jnp.float8_e5m2)
    q = scaled.ScaledArray(data=data, scale=jnp.array([2.0]), fmt=formats.get("e5m2"), block=(7,))
    want = 2.0 * np.array([2.0**12, 2.0**12, 2.0**-3, 2.0**-3, 2.0**-17, 2.0**-17, 2.0**-17])
    np.testing.assert_array_equal(np.asarray(scaled.quantization_error_bound(q)), want)


# --------------------------------------------------------------------------- non-finite inputs


def test_nonfinite_counts_under_jit():
    x = jnp.array([[1.0, jnp.nan, jnp.inf], [-jnp.inf, 2.0, jnp.nan]])
    counts = jax.jit(mpx.nonfinite_counts)(x)
    assert {k: int(v) for k, v in counts.items()} == {"nan": 2, "inf": 2}
    assert counts["nan"].dtype == jnp.int32


def test_check_finite_names_the_counts():
    x = np.ones((3, 4), np.float32)
    x[1, 2], x[2, 0], x[2, 3] = np.nan, -np.inf, np.inf
    with pytest.raises(ValueError, match=r"weights has 1 NaN and 2 inf .*\(3, 4\).*\(1, 2\)"):
        mpx.check_finite(x, "weights")
    mpx.check_finite(np.ones((3, 4), np.float32))  # finite: no error


def test_check_finite_takes_any_pytree_and_names_the_leaf():
    tree = {"w": np.ones((2, 3), np.float32), "q": mpx.quantize(jnp.ones((4, 4)), "e4m3", mpx.PerTensor()),
            "step": np.int32(3), "key": jax.random.key(0), "lr": 0.1}
    mpx.check_finite(tree, "params")  # ints, keys and Python floats pass
    tree["layers"] = [{"b": np.array([1.0, np.inf], np.float32)}]
    with pytest.raises(ValueError, match=r"params\['layers'\]\[0\]\['b'\] has 0 NaN and 1 inf .*\(1,\)"):
        mpx.check_finite(tree, "params")


@pytest.mark.parametrize("name, pow2", [("e4m3", False), ("e5m2", True), ("e2m1", True), ("e4m4", False)])
def test_nan_and_inf_surface_in_their_block_scale(name, pow2):
    x = np.ones((4, 64), np.float32)
    x[1, 5], x[3, 40] = np.nan, np.inf
    q = mpx.quantize(x, name, mpx.Blocks((1, 32)), pow2_scale=pow2)
    scale = np.asarray(q.scale)
    assert np.isnan(scale[1, 0]) and np.isinf(scale[3, 1])
    finite_blocks = np.ones_like(scale, bool)
    finite_blocks[1, 0] = finite_blocks[3, 1] = False
    assert np.isfinite(scale[finite_blocks]).all()
    deq = np.asarray(mpx.dequantize(q))
    assert np.isnan(deq[1, :32]).all()  # never hidden, even in e2m1 (no NaN code)
    assert np.isfinite(deq[0]).all() and np.isfinite(deq[2]).all()
    per_tensor = mpx.quantize(x, name, pow2_scale=pow2)
    assert np.isnan(np.asarray(per_tensor.scale)).all()


# --------------------------------------------------------------------------- pytrees, jit, vmap


def test_scaled_array_is_a_pytree_with_static_format_and_block():
    q = mpx.quantize(np.ones((4, 8), np.float32), "e4m3", mpx.Blocks((2, 4)))
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 2 and leaves[0] is q.data and leaves[1] is q.scale
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.fmt == q.fmt and rebuilt.block == q.block
    doubled = jax.tree_util.tree_map(lambda a: a * 2 if a.dtype == jnp.float32 else a, q)
    assert isinstance(doubled, scaled.ScaledArray)
    np.testing.assert_array_equal(np.asarray(doubled.dequantize()), 2 * np.asarray(q.dequantize()))
    assert q.shape == (4, 8) and q.ndim == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.scale = q.scale


def test_scaled_array_through_jit():
    x = jax.random.normal(jax.random.key(4), (16, 64))
    quant = jax.jit(lambda a: mpx.quantize(a, "e4m3", mpx.Blocks((8, 32))))
    q = quant(x)
    assert isinstance(q, scaled.ScaledArray) and q.block == (8, 32)
    deq = jax.jit(mpx.dequantize)(q)  # a ScaledArray as a jit argument
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(mpx.dequantize(q)))


def test_vmap_quantizes_each_example_separately():
    x = jax.random.normal(jax.random.key(5), (3, 8, 64)) * jnp.array([1.0, 100.0, 0.01])[:, None, None]
    fn = lambda a: mpx.quantize(a, "e4m3", mpx.Blocks((1, 32)))
    batched = jax.vmap(fn)(x)
    for i in range(3):
        one = fn(x[i])
        assert _bits_equal(batched.data[i], one.data) and _bits_equal(batched.scale[i], one.scale)
    roundtrip = jax.vmap(lambda a: mpx.dequantize(fn(a)))(x)
    np.testing.assert_array_equal(np.asarray(roundtrip), np.stack([np.asarray(mpx.dequantize(fn(x[i])))
                                                                   for i in range(3)]))


# --------------------------------------------------------------------------- fake_quant


def test_fake_quant_value_is_exactly_quantize_dequantize():
    x = jnp.array([1e10, 3.1, -jnp.inf, 1.0, -0.0, 1e-3])
    got = mpx.fake_quant(x, "e4m3", scale=1.0)
    want = mpx.dequantize(mpx.quantize(x, "e4m3", scale=1.0))
    assert _bits_equal(got, want)
    xb = jax.random.normal(jax.random.key(6), (4, 64)).astype(jnp.bfloat16)
    fq = mpx.fake_quant(xb, "e4m3", mpx.Blocks((1, 32)))
    assert fq.dtype == jnp.bfloat16
    assert _bits_equal(fq, mpx.dequantize(mpx.quantize(xb, "e4m3", mpx.Blocks((1, 32))), jnp.bfloat16))


@pytest.mark.parametrize("granularity", [mpx.Blocks((1, 32)), mpx.MX(32)])
def test_fake_quant_gradient_is_straight_through(granularity):
    x = jax.random.normal(jax.random.key(7), (4, 64)) * 10
    w = jax.random.normal(jax.random.key(8), (4, 64))
    loss = lambda a: jnp.sum(mpx.fake_quant(a, "e4m3", granularity) * w)
    grad = jax.grad(loss)(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(loss))(x)), np.asarray(w))
    # Saturated elements pass the gradient through too (explicit scale clips |x| > 448).
    g = jax.grad(lambda a: jnp.sum(mpx.fake_quant(a, "e4m3", scale=1.0)))(jnp.array([1000.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(g), [1.0, 1.0])


def test_fake_quant_under_vmap_and_jvp():
    x = jax.random.normal(jax.random.key(9), (3, 64))
    fq = lambda a: mpx.fake_quant(a, "e5m2", mpx.Blocks((32,)))
    np.testing.assert_array_equal(np.asarray(jax.vmap(fq)(x)), np.stack([np.asarray(fq(r)) for r in x]))
    _, tangent = jax.jvp(fq, (x[0],), (jnp.ones(64),))
    np.testing.assert_array_equal(np.asarray(tangent), np.ones(64))


# --------------------------------------------------------------------------- properties

# Hypothesis varies the data; formats and granularities are fixed cases, so each case
# compiles once rather than once per example. Together they cover saturating formats
# with and without inf, fp4, a simulated format and bf16, every granularity, ragged
# blocks (36 % 8, 36 % 16 and 5 % 3 are not 0) and both kinds of scale.
PROPERTY_SHAPE = (5, 36)
PROPERTY_CASES = [
    ("e4m3", mpx.Blocks((3, 16)), False),
    ("e5m2", mpx.PerAxis(0), False),
    ("e2m1", mpx.MX(8), True),
    ("e4m4", mpx.Blocks((1, 8)), True),
    ("bf16", mpx.PerTensor(), False),
]
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)
jit_quantize = jax.jit(mpx.quantize, static_argnums=(1, 2), static_argnames=("pow2_scale",))
jit_dequantize = jax.jit(mpx.dequantize)


def finite_arrays():
    """float32 arrays mixing magnitudes, without float32 subnormals (XLA on CPU flushes
    those to zero, which numpy references would not)."""
    elements = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    magnitudes = st.integers(-60, 60).map(lambda k: np.float32(2.0**k))
    flush = lambda x: np.where(np.abs(x) < TINY32, np.float32(0), x).astype(np.float32)
    arrays = hnp.arrays(np.float32, PROPERTY_SHAPE, elements=elements)
    return st.tuples(arrays, magnitudes).map(lambda pair: flush(pair[0] * pair[1]))


@pytest.mark.parametrize("name, granularity, pow2", PROPERTY_CASES)
@PROPERTY_SETTINGS
@given(x=finite_arrays())
def test_property_quantize_dequantize(name, granularity, pow2, x):
    """Finite in, finite out, and each element's error within the format's bound."""
    fmt = formats.get(name)
    q = jit_quantize(jnp.asarray(x), name, granularity, pow2_scale=pow2)
    deq = np.asarray(jit_dequantize(q))
    assert np.isfinite(np.asarray(q.scale)).all() and np.isfinite(_f32(q.data)).all() and np.isfinite(deq).all()
    full_scale = np_broadcast(np.asarray(q.scale), x.shape, q.block)
    # The scale covers the block: |x| / scale <= fmt.max up to float32 rounding.
    assert (np.abs(x.astype(np.float64)) / full_scale <= fmt.max * (1 + 2 * EPS32)).all()
    error = np.abs(deq.astype(np.float64) - x)
    independent = np_error_bound(x, full_scale, fmt, deq)
    assert (error <= independent).all(), (x[error > independent], deq[error > independent])
    library = np.asarray(scaled.quantization_error_bound(q), np.float64)
    assert (error <= library + 2 * EPS32 * (np.abs(x) + np.abs(deq)) + TINY32).all()


# Op-by-op execution compiles every primitive separately: one case (ragged 2-D blocks,
# power-of-two scales) keeps that affordable.
@PROPERTY_SETTINGS
@given(x=finite_arrays())
def test_property_jit_equals_no_jit_bit_for_bit(x):
    name, granularity, pow2 = "e4m3", mpx.Blocks((3, 16)), True
    q = jit_quantize(jnp.asarray(x), name, granularity, pow2_scale=pow2)
    deq = jit_dequantize(q)
    with jax.disable_jit():  # op by op, the library's own internal jit included
        eager = mpx.quantize(jnp.asarray(x), name, granularity, pow2_scale=pow2)
        eager_deq = mpx.dequantize(eager)
    assert _bits_equal(eager.data, q.data) and _bits_equal(eager.scale, q.scale) and _bits_equal(eager_deq, deq)


def representable_arrays(name: str, block):
    """(values on fmt's grid, per-block power-of-two scales) for PROPERTY_SHAPE."""
    grid = formats.representable_values(name)
    grid = np.concatenate([-grid, grid]).astype(np.float32)
    index = hnp.arrays(np.int64, PROPERTY_SHAPE, elements=st.integers(0, len(grid) - 1))
    exponents = hnp.arrays(np.int64, scaled.scale_shape(PROPERTY_SHAPE, block), elements=st.integers(-30, 30))
    return st.tuples(index.map(lambda i: grid[i]), exponents.map(lambda e: np.exp2(e).astype(np.float32)))


@pytest.mark.parametrize("name, granularity", [(n, g) for n, g, _ in PROPERTY_CASES if n != "bf16"])
@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_representable_values_round_trip_exactly(name, granularity, data):
    block = scaled.resolve_block(granularity, PROPERTY_SHAPE)
    values, scale = data.draw(representable_arrays(name, block))
    x = values * np_broadcast(scale, values.shape, block)  # exact: power-of-two scales
    q = jit_quantize(jnp.asarray(x), name, granularity, scale=jnp.asarray(scale))
    np.testing.assert_array_equal(_f32(q.data), values)
    np.testing.assert_array_equal(np.asarray(jit_dequantize(q)), x)
    # With computed power-of-two scales, a tensor holding +-max * 2**k also round-trips.
    fmt = formats.get(name)
    y = np.where(np.arange(values.size).reshape(values.shape) == 0, np.float32(fmt.max), values) * scale.flat[0]
    per_tensor = jit_quantize(jnp.asarray(y), name, mpx.PerTensor(), pow2_scale=True)
    assert float(per_tensor.scale.reshape(())) == scale.flat[0]
    np.testing.assert_array_equal(np.asarray(jit_dequantize(per_tensor)), y)


# --------------------------------------------------------------------------- MX scale rules


@pytest.mark.parametrize("rule", ["ceil", "ocp"])
@pytest.mark.parametrize("fmt", ["e2m1", "e4m3", "e5m2"])
def test_mx_dequantizes_finite_input_to_finite_values(rule, fmt):
    big = float(np.finfo(np.float32).max)
    x = jnp.array([[big, -0.9 * big, 3e38] + [1.0] * 29, [1e-30] * 32], jnp.float32)
    out = mpx.dequantize(mpx.quantize(x, fmt, mpx.MX(32, mx_scale=rule)))
    assert bool(jnp.all(jnp.isfinite(out))), out


def test_mx_ocp_rule_is_floor_log2_amax_minus_emax_and_clips():
    """OCP MX v1.0: shared exponent floor(log2(amax)) - emax_elem; elements clip to max."""
    amax = np.exp(np.random.default_rng(0).uniform(-20, 20, 64)).astype(np.float32)
    x = jnp.asarray(np.stack([amax, amax / 3], axis=1))
    for fmt, emax in (("e2m1", 2), ("e4m3", 8), ("e5m2", 15)):
        q = mpx.quantize(x, fmt, mpx.MX(2, mx_scale="ocp"))
        want = np.exp2(np.floor(np.log2(amax.astype(np.float64))) - emax)
        np.testing.assert_array_equal(np.asarray(q.scale)[:, 0], want.astype(np.float32))
        # amax / scale lies in [2**emax, 2**(emax + 1)): above fmt.max it clips to max.
        top = np.abs(np.asarray(q.data.astype(jnp.float32))[:, 0])
        assert np.all(top <= formats.get(fmt).max) and np.all(top >= 2.0**emax)
    ceil = mpx.quantize(x, "e2m1", mpx.MX(2))  # the default never clips: amax / scale <= max
    assert np.all(amax / np.asarray(ceil.scale)[:, 0] <= 6.0)


def test_mx_rejects_an_unknown_scale_rule():
    with pytest.raises(ValueError, match="mx_scale"):
        mpx.MX(32, mx_scale="floor")
