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


def _ffn_stack_temp_bytes(layers: int, n=1024, d=256, f=512) -> float:
    """Compiled temp bytes per (n, f) element of the gradient of a residual stack of FP8
    FFNs (gate, up, fused SwiGLU + down projection with FP8 SwiGLU tiles)."""
    keys = jax.random.split(jax.random.key(0), 3 * layers + 1)
    x = jax.random.normal(keys[0], (n, d)).astype(jnp.bfloat16)
    ws = [(jax.random.normal(keys[3 * i + 1], (d, f)) * d**-0.5, jax.random.normal(keys[3 * i + 2], (d, f)) * d**-0.5,
           jax.random.normal(keys[3 * i + 3], (f, d)) * f**-0.5) for i in range(layers)]
    dims, recipe = (((1,), (0,)), ((), ())), recipes.DeepSeekV3()

    def loss(x, ws):
        for w_gate, w_up, w_down in ws:
            gate = mdot.dot_general(x, w_gate, dims, recipe=recipe, preferred_element_type=jnp.bfloat16)
            up = mdot.dot_general(x, w_up, dims, recipe=recipe, preferred_element_type=jnp.bfloat16)
            x = x + mdot.swiglu_dot_general(gate, up, w_down, dims, recipe=recipe, residual_format="e4m3",
                                            preferred_element_type=jnp.bfloat16)
        return jnp.sum(x.astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (n * f)


def test_each_ffn_adds_its_fp8_swiglu_tiles_not_their_f32_dequantization(monkeypatch):
    """Per extra layer the backward pass holds the FP8 gate and up tiles (2 bytes per
    element, plus the small rest); with `after` on the dequantized values instead of the
    FP8 data, XLA dequantizes every layer's tiles into f32 at the start of the backward
    pass (8 more bytes per element)."""
    per_layer = lambda: (_ffn_stack_temp_bytes(4) - _ffn_stack_temp_bytes(1)) / 3  # noqa: E731
    assert 2 <= per_layer() < 4
    late = activations.after

    def dequantized_then_after(residual_format, residuals, when):
        gate, up = (mpx.dequantize(q) for q in residuals)
        return late(gate, when).astype(jnp.float32), up.astype(jnp.float32)

    monkeypatch.setattr(activations, "swiglu_inputs", dequantized_then_after)
    assert per_layer() >= 8
