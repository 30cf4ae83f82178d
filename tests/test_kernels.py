"""The CPU decode kernel (mpx.kernels): exact decoding, products against a float64
reference, its place in the serving products, and that an install builds it."""

from __future__ import annotations

import platform
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import mpx
import mpx.dot as mdot
from mpx import kernels

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=kernels.status())
FP8 = (jnp.float8_e4m3fn, jnp.float8_e5m2)
EPS32 = 2.0 ** -24


def test_an_install_with_a_compiler_builds_the_kernel():
    """Where the install could compile it (x86-64 with AVX2/FMA/F16C and a C++ compiler),
    it is there: the kernel tests below must not skip quietly."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if platform.machine().lower() not in ("x86_64", "amd64") or not compiler or kernels._cpu_lacks():
        pytest.skip(f"no x86-64 AVX2 machine with a C++ compiler: {kernels.status()}")
    assert kernels.available(), kernels.status()
    assert kernels.status().startswith("CPU decode kernel: on")


def _stored(dtype, bits: np.ndarray) -> jax.Array:
    return jnp.asarray(bits.view(jnp.dtype(dtype)))


@needs_kernel
@pytest.mark.parametrize("dtype", FP8, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("transposed", [False, True])
def test_every_fp8_byte_decodes_exactly(dtype, transposed):
    """All 256 bytes: zeros, subnormals, normals, the largest value, NaN (and E5M2's
    infinities) come out as ml_dtypes converts them."""
    bits = np.arange(256, dtype=np.uint8)
    w = _stored(dtype, bits.reshape(256, 1) if transposed else bits.reshape(1, 256))
    got = np.asarray(kernels.decode_matmul(jnp.ones((1, 1)), w, transposed=transposed))[0]
    want = bits.view(jnp.dtype(dtype)).astype(np.float32)
    np.testing.assert_array_equal(got, want)  # NaN equals NaN; a product's zero has no sign


@needs_kernel
def test_bf16_bit_patterns_decode_exactly():
    """Every normal bf16, infinities and NaN exactly. A bf16 subnormal is a float32
    subnormal, and XLA runs CPU programs with denormals treated as zero (the kernel's
    helper threads take the caller's mode): it counts as 0. FP8 subnormals (above) are
    exact in that mode too: they never pass through a float32 subnormal."""
    bits = np.concatenate([np.arange(0, 1 << 16, 97, dtype=np.uint16),
                           np.array([0x0001, 0x8001, 0x007f, 0x0080, 0x7f80, 0xff80, 0x7fc0], np.uint16)])
    w = _stored(jnp.bfloat16, bits.reshape(1, -1))
    got = np.asarray(kernels.decode_matmul(jnp.ones((1, 1)), w))[0]
    want = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    normal = ~(np.abs(want) < 2.0 ** -126) | (want == 0)
    np.testing.assert_array_equal(got[normal], want[normal])
    assert np.all(got[~normal] == 0)


def _reference(x, w, scale, block, transposed):
    """float64 x . (w * broadcast(scale)), and the sum of |terms| (the rounding bound's scale)."""
    s = np.repeat(np.repeat(np.asarray(scale, np.float64), block[0], 0), block[1], 1)[:w.shape[0], :w.shape[1]]
    wd = np.asarray(w.astype(jnp.float32), np.float64) * s
    wk = wd.T if transposed else wd
    x = np.asarray(x, np.float64)
    return x @ wk, np.abs(x) @ np.abs(wk)


SHAPES = [(1, 1, 1), (3, 7, 13), (16, 200, 48), (5, 576, 1000), (2, 130, 70), (1, 1536, 576), (8, 64, 4096)]
BLOCKS = {"tensor": None, "channel": "channel", "128x128": (128, 128), "3x5": (3, 5)}


@needs_kernel
@pytest.mark.parametrize("dtype", FP8 + (jnp.bfloat16,), ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_products_match_a_float64_reference(dtype, transposed, blocks):
    """Ragged shapes (K, N not multiples of the vector width, the band or the block), any
    block scales, both layouts: within float32 summation rounding of the float64 sum."""
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        shape = (n, k) if transposed else (k, n)
        w = jnp.asarray(rng.standard_normal(shape) * 8, jnp.float32).astype(dtype)
        block = BLOCKS[blocks]
        if block == "channel":
            block = (1, k) if transposed else (k, 1)
        block = shape if block is None else block
        scale = jnp.asarray(rng.uniform(0.25, 4.0, tuple(-(-a // b) for a, b in zip(shape, block))), jnp.float32)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        got = np.asarray(kernels.decode_matmul(x, w, scale, block, transposed=transposed))
        want, magnitude = _reference(x, w, scale, block, transposed)
        assert got.shape == (m, n)
        assert np.all(np.abs(got - want) <= 2 * (k + 2) * EPS32 * magnitude + 1e-30), (m, k, n)


@needs_kernel
@pytest.mark.parametrize("transposed", [False, True])
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(transposed):
    """Every output is summed by one thread in a fixed order: a sequence decodes to the
    same bits whatever else is decoded with it, and run after run."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((576, 1536) if not transposed else (1536, 576)), jnp.float8_e4m3fn)
    x = jnp.asarray(rng.standard_normal((16, 576)), jnp.float32)
    batch = np.asarray(kernels.decode_matmul(x, w, transposed=transposed))
    for row in (0, 7, 15):
        alone = np.asarray(kernels.decode_matmul(x[row:row + 1], w, transposed=transposed))
        np.testing.assert_array_equal(alone[0], batch[row])
    np.testing.assert_array_equal(np.asarray(kernels.decode_matmul(x, w, transposed=transposed)), batch)


@needs_kernel
def test_nan_and_inf_in_the_activations_propagate():
    w = jnp.ones((4, 3), jnp.bfloat16)
    x = jnp.array([[1.0, jnp.nan, 0, 0], [jnp.inf, 0, 0, 0]], jnp.float32)
    got = np.asarray(kernels.decode_matmul(x, w))
    assert np.all(np.isnan(got[0])) and np.all(got[1] == np.inf)


@needs_kernel
def test_bad_operands_are_refused_with_what_is_allowed():
    w = jnp.ones((8, 4), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"do not contract"):
        kernels.decode_matmul(jnp.ones((2, 5)), w)
    with pytest.raises(ValueError, match=r"w must be 2-D in float8_e4m3fn, float8_e5m2, bfloat16; got float32"):
        kernels.decode_matmul(jnp.ones((2, 8)), jnp.ones((8, 4)))
    with pytest.raises(ValueError, match=r"scale \(1, 1\) does not fit w \(8, 4\) in blocks \(4, 4\); expected \(2, 1\)"):
        kernels.decode_matmul(jnp.ones((2, 8)), w, jnp.ones((1, 1)), (4, 4))


@needs_kernel
@pytest.mark.parametrize("transposed", [False, True])
def test_gradients_are_those_of_the_dequantized_product(transposed):
    rng = np.random.default_rng(2)
    shape = (12, 20) if transposed else (20, 12)
    w = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    scale = jnp.asarray([[2.0, 0.5]] if not transposed else [[2.0], [0.5]], jnp.float32)
    block = (20, 6) if not transposed else (6, 20)
    x = jnp.asarray(rng.standard_normal((3, 20)), jnp.float32)
    dense = np.repeat(np.repeat(np.asarray(scale), block[0], 0), block[1], 1)[:shape[0], :shape[1]]

    def ours(x, w):
        return jnp.sum(jnp.sin(kernels.decode_matmul(x, w, scale, block, transposed=transposed)))

    def plain(x, w):
        wd = w.astype(jnp.float32) * dense
        return jnp.sum(jnp.sin(x @ (wd.T if transposed else wd)))

    for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=1e-4)


@needs_kernel
def test_decode_sized_products_run_in_the_kernel_and_larger_ones_do_not():
    """rounded_dot with a bf16 weight (both layouts: a projection and a tied LM head) and
    prequantized_matmul with an FP8 weight lower to the kernel's custom call for decode
    rows, and to XLA's dot for prefill rows; the decode products equal XLA's within f32
    summation rounding."""
    rng = np.random.default_rng(3)
    w, emb = jnp.asarray(rng.standard_normal((96, 40)), jnp.bfloat16), jnp.asarray(rng.standard_normal((50, 96)),
                                                                                   jnp.bfloat16)
    stored = mpx.quantize(jnp.asarray(rng.standard_normal((96, 40)), jnp.float32), "e4m3", mpx.Blocks((128, 128)))
    products = {
        "projection": lambda x: mdot.rounded_dot(x, w, (((2,), (0,)), ((), ())), jnp.bfloat16),
        "lm head": lambda x: mdot.rounded_dot(x, emb, (((2,), (1,)), ((), ())), jnp.bfloat16),
        "fp8": lambda x: mdot.prequantized_matmul(x, stored, recipe="deepseek_v3"),
    }
    for name, product in products.items():
        for rows, in_kernel in ((1, True), (16, True), (64, False)):
            x = jnp.asarray(rng.standard_normal((1, rows, 96)), jnp.float32)
            text = jax.jit(product).lower(x).as_text()
            assert (kernels.TARGET in text) == in_kernel, (name, rows)
        x = jnp.asarray(rng.standard_normal((2, 3, 96)), jnp.float32)
        reference = {"projection": lambda x: x.astype(jnp.bfloat16).astype(jnp.float32) @ w.astype(jnp.float32),
                     "lm head": lambda x: x.astype(jnp.bfloat16).astype(jnp.float32) @ emb.astype(jnp.float32).T,
                     "fp8": lambda x: mdot.prequantized_matmul(x, stored, recipe="deepseek_v3", impl="fold_f32")}[name]
        np.testing.assert_allclose(product(x), reference(x), rtol=1e-5, atol=1e-5)
