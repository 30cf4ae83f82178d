"""Tests for mpx.dot.swiglu_dot_general: an FFN's down projection that recomputes the
SwiGLU product in its backward pass instead of keeping a quantized copy of it.

References: the composition `dot_general(swiglu(gate, up), w)` (forward value and the
SwiGLU gradients must match it bit for bit), and for wgrad the float64 product of the
operands it is specified to use (the recomputed product and the gradient, each
quantized once in 128x1 tiles), to f32 rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpx
import mpx.dot as mdot
from mpx import activations, recipes

DIMS = (((1,), (0,)), ((), ()))  # hidden (M, F) x w (F, N)
M, F, N = 256, 384, 256


def _inputs():
    key = jax.random.split(jax.random.key(0), 4)
    gate = (2 * jax.random.normal(key[0], (M, F))).astype(jnp.bfloat16)
    up = jax.random.normal(key[1], (M, F)).astype(jnp.bfloat16)
    w = 0.05 * jax.random.normal(key[2], (F, N))
    g = jax.random.normal(key[3], (M, N)).astype(jnp.bfloat16)
    return gate, up, w, g


def _fused(recipe, fmt):
    return lambda gate, up, w: mdot.swiglu_dot_general(gate, up, w, DIMS, recipe=recipe, residual_format=fmt,
                                                       preferred_element_type=jnp.bfloat16)


def _composed(recipe, fmt):
    return lambda gate, up, w: mdot.dot_general(activations.swiglu(gate, up, fmt), w, DIMS, recipe=recipe,
                                                preferred_element_type=jnp.bfloat16)


def _run(fn, gate, up, w, g):
    out, vjp = jax.vjp(fn, gate, up, w)
    return (out, *vjp(g))


@pytest.mark.parametrize("fmt", [None, "e4m3"])
@pytest.mark.parametrize("scale_format", ["f32", "ue8m3"])
def test_value_and_swiglu_gradients_match_the_composition_and_wgrad_is_exact(fmt, scale_format):
    gate, up, w, g = _inputs()
    recipe = recipes.DeepSeekV3(scale_format=scale_format)
    fused = jax.jit(lambda *a: _run(_fused(recipe, fmt), *a))(gate, up, w, g)
    composed = jax.jit(lambda *a: _run(_composed(recipe, fmt), *a))(gate, up, w, g)
    for got, want in zip(fused[:3], composed[:3]):  # value, d_gate, d_up
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # wgrad: the recomputed product quantized once per 128 tokens, against the gradient.
    dq = lambda v, block, sf=scale_format: np.asarray(mpx.dequantize(mpx.quantize(  # noqa: E731
        v, "e4m3", mpx.Blocks(block), scale_format=sf)), np.float64)
    g32, u32 = gate.astype(jnp.float32), up.astype(jnp.float32)
    if fmt is not None:  # SwiGLU's FP8 tiles keep float scales whatever the GEMMs use
        g32, u32 = (jnp.asarray(dq(v, (1, 128), "f32"), jnp.float32) for v in (g32, u32))
    hidden = jax.nn.silu(g32) * u32
    want = dq(hidden, (128, 1)).T @ dq(g.astype(jnp.float32), (128, 1))
    d_w = np.asarray(fused[3], np.float64)
    assert np.max(np.abs(d_w - want)) <= 1e-5 * np.max(np.abs(want))
    # ...which differs from the composition's wgrad (it requantizes a 1x128 FP8 copy).
    assert np.max(np.abs(d_w - np.asarray(composed[3], np.float64))) > 1e-3 * np.max(np.abs(want))


@pytest.mark.parametrize("recipe", [None, recipes.CurrentScaling(), recipes.DeepSeekV3(fp8_residuals=False),
                                    recipes.DeepSeekV3(recompute_swiglu=False)])
def test_other_recipes_are_the_composition(recipe):
    gate, up, w, g = _inputs()
    assert not mdot.recomputes_swiglu(recipe)
    for got, want in zip(_run(_fused(recipe, None), gate, up, w, g), _run(_composed(recipe, None), gate, up, w, g)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("fmt", [None, "e4m3"])
def test_backward_keeps_no_copy_of_the_product(fmt):
    gate, up, w, _ = _inputs()
    recipe = recipes.DeepSeekV3()
    fused = mpx.inspect.residual_bytes(_fused(recipe, fmt), gate, up, w)
    composed = mpx.inspect.residual_bytes(_composed(recipe, fmt), gate, up, w)
    assert composed["float8_e4m3fn"] - fused.get("float8_e4m3fn", 0) == M * F  # the product's E4M3 copy
    assert composed["total"] - fused["total"] >= M * F


def test_gate_and_up_of_different_shapes_fail():
    gate, up, w, _ = _inputs()
    with pytest.raises(ValueError, match="one shape"):
        mdot.swiglu_dot_general(gate, up[:, :256], w, DIMS, recipe=recipes.DeepSeekV3())
