"""Tests for mpx.nn: each layer against a float32 reference, under each precision."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpx
from mpx import nn as mnn
from mpx.formats import get as get_format

E4M3 = get_format("e4m3")
BF16 = get_format("bf16")


def policy_with(recipe: str | None, compute="bf16", output="bf16"):
    return mpx.policy.from_dict({
        "name": "test",
        "default": {"param": "f32", "compute": compute, "output": output, "accum": "f32",
                    "recipe": recipe or "none"},
    })


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_dense_fp32_policy_equals_matmul():
    layer = mnn.Dense(48, policy=mpx.policy.preset("fp32"))
    x = _x((4, 32))
    v = layer.init(jax.random.key(1), x)
    y = layer.apply(v, x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, x @ v["params"]["kernel"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["deepseek_v3", "current"])
def test_dense_fp8_close_to_f32_reference(recipe):
    layer = mnn.Dense(64, policy=policy_with(recipe))
    x = _x((2, 8, 128))
    v = layer.init(jax.random.key(1), x)
    y = layer.apply(v, x)
    assert y.dtype == jnp.bfloat16
    ref = x @ v["params"]["kernel"]
    # Two E4M3 operands (half-ulp each) plus the bf16 output rounding.
    bound = 2 * E4M3.half_ulp + BF16.half_ulp
    assert float(mpx.metrics.relative_error(y, ref)) < bound


@pytest.mark.parametrize("recipe", ["deepseek_v3", "current"])
def test_fp8_dense_rounds_once_and_its_gradient_arrives_in_the_output_dtype(recipe):
    """The quantized dot returns bf16 itself (one rounding of its f32 sum, as casting an
    f32 result would), so its backward pass quantizes a bf16 gradient: no f32 copy."""
    layer = mnn.Dense(256, policy=policy_with(recipe))
    x, g = _x((2, 64, 256)), _x((2, 64, 256), seed=3).astype(jnp.bfloat16)
    v = layer.init(jax.random.key(1), x)
    y, vjp = jax.vjp(lambda x, k: layer.apply({"params": {"kernel": k}}, x), x, v["params"]["kernel"])
    kw = dict(recipe=recipe, preferred_element_type=jnp.float32)
    dims = (((2,), (0,)), ((), ()))
    ref = lambda x, k: mpx.dot.dot_general(x, k, dims, **kw)  # noqa: E731
    y_ref, vjp_ref = jax.vjp(lambda x, k: ref(x, k).astype(jnp.bfloat16), x, v["params"]["kernel"])
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    for got, want in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    calls = [e for e in jax.make_jaxpr(lambda x: layer.apply(v, x))(x).eqns if "custom_vjp" in e.primitive.name]
    assert calls and all(o.aval.dtype == jnp.bfloat16 for e in calls for o in e.outvars)


def test_dense_delayed_scaling_state_updates():
    layer = mnn.Dense(32, policy=policy_with("delayed"))
    x = 3.0 * _x((4, 32))
    v = layer.init(jax.random.key(1), x)
    assert "fp8_state" in v
    y, updated = layer.apply(v, x, mutable=["fp8_state"])
    hist = updated["fp8_state"]["kernel"]
    np.testing.assert_allclose(hist.lhs.history[0], jnp.max(jnp.abs(x)), rtol=1e-6)
    np.testing.assert_allclose(hist.rhs.history[0], jnp.max(jnp.abs(v["params"]["kernel"])), rtol=1e-6)
    # Without mutable the state is read but not changed, and the output is the same.
    y2 = layer.apply(v, x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y2, np.float32))


def test_dense_general_multi_axis_matches_reference():
    layer = mnn.DenseGeneral(16, axis=(-2, -1), policy=mpx.policy.preset("fp32"))
    x = _x((2, 5, 4, 8))
    v = layer.init(jax.random.key(1), x)
    y = layer.apply(v, x)
    ref = jnp.einsum("bthd,hdo->bto", x, v["params"]["kernel"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_misaligned_fp8_layer_warns_once_and_padding_is_exact():
    mnn._WARNED.clear()
    x = _x((3, 40))
    layer = mnn.Dense(24, policy=policy_with("current"), name="odd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = layer.init(jax.random.key(0), x)
        layer.apply(v, x)
    messages = [str(w.message) for w in caught if "multiples of 16" in str(w.message)]
    assert len(messages) == 1 and "odd" in messages[0]
    padded = mnn.Dense(24, policy=policy_with("current"), pad_to=16, name="odd")
    np.testing.assert_allclose(
        np.asarray(padded.apply(v, x), np.float32), np.asarray(layer.apply(v, x), np.float32), rtol=0, atol=0
    )


def test_rmsnorm_always_f32():
    x = _x((2, 6, 32)).astype(jnp.bfloat16)
    norm = mnn.RMSNorm(policy=mpx.policy.preset("fp8"), name="final_norm")
    v = norm.init(jax.random.key(0), x)
    y = norm.apply(v, x)
    assert y.dtype == jnp.float32
    x32 = x.astype(jnp.float32)
    ref = x32 / jnp.sqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_layernorm_reference():
    x = _x((3, 16)) * 5 + 2
    norm = mnn.LayerNorm()
    v = norm.init(jax.random.key(0), x)
    y = norm.apply(v, x)
    ref = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_embed_lookup_and_tied_attend():
    embed = mnn.Embed(50, 16, policy=mpx.policy.preset("fp32"))
    ids = jnp.array([[1, 2, 49]])
    v = embed.init(jax.random.key(0), ids)
    table = v["params"]["embedding"]
    np.testing.assert_array_equal(embed.apply(v, ids), table[ids])
    x = _x((1, 3, 16))
    logits = embed.apply(v, x, method=mnn.Embed.attend)
    np.testing.assert_allclose(logits, x @ table.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="integer token ids"):
        embed.apply(v, x)


def test_attention_weights_bool_and_int8_masks_agree():
    logits = _x((1, 1, 4, 4))
    m_bool = mnn.causal_mask(4, 4)
    m_int8 = mnn.causal_mask(4, 4, dtype=jnp.int8)
    a = mnn.attention_weights(logits, m_bool)
    b = mnn.attention_weights(logits, m_int8)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == jnp.float32
    assert float(a[0, 0, 0, 1]) == 0.0  # the future is masked
    with pytest.raises(TypeError, match="bool or int8"):
        mnn.attention_weights(logits, m_bool.astype(jnp.float32))


def test_dense_jit_matches_eager():
    layer = mnn.Dense(32, policy=policy_with("deepseek_v3"))
    x = _x((4, 128))
    v = layer.init(jax.random.key(1), x)
    eager = layer.apply(v, x)
    jitted = jax.jit(layer.apply)(v, x)
    np.testing.assert_array_equal(np.asarray(eager, np.float32), np.asarray(jitted, np.float32))


def test_presets_reach_a_model_of_any_module_paths_through_roles():
    """A user's model built from mpx.nn, with paths the presets never name, gets the fp8
    preset's precision map: FP8 projections (measurably not bf16), f32 norms."""
    import flax.linen as nn

    class Block(nn.Module):
        policy: mpx.Policy

        @nn.compact
        def __call__(self, x):
            h = mnn.RMSNorm(policy=self.policy, name="ln_1")(x)
            return mnn.Dense(256, policy=self.policy, name="w_in")(h)

    x = _x((16, 256))
    outs = {}
    for name in ("fp32", "bf16", "fp8"):
        model = Block(mpx.policy.preset(name))
        params = model.init(jax.random.key(0), x)
        outs[name] = np.asarray(model.apply(params, x), np.float32)
    err = {name: float(np.abs(outs[name] - outs["fp32"]).max()) for name in ("bf16", "fp8")}
    assert err["fp8"] > 4 * err["bf16"] > 0, err
    norm = mnn.RMSNorm(policy=mpx.policy.preset("fp8"), name="ln_1")
    assert norm.apply(norm.init(jax.random.key(0), x), x).dtype == jnp.float32
