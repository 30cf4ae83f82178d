"""Tests for mpx.attention, mpx.activations and mpx.ordering: custom VJPs that keep less for
the backward pass must give autodiff's values and gradients, and really keep less."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpx
from mpx import activations, attention, ordering
from mpx import nn as mnn
from mpx.dot import general as dot_general_lib
from mpx.dot import rounded_dot

F32_EPS = float(jnp.finfo(jnp.float32).eps)
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)
F32 = attention.Dtypes(jnp.dtype("float32"), jnp.dtype("float32"), jnp.dtype("float32"))
BF16 = attention.Dtypes(jnp.dtype("bfloat16"), jnp.dtype("float32"), jnp.dtype("bfloat16"))
QK = (((4,), (3,)), ((0, 1), (0, 1)))
PV = (((4,), (2,)), ((0, 1), (0, 1)))


def reference_attention(q, k, v, mask, qk, pv):
    """What autodiff differentiates without the custom VJP (mpx.nn's generic path)."""
    logits = rounded_dot(q, k, QK, qk.compute, qk.accum).astype(qk.output)
    probs = mnn.attention_weights(logits, mask)
    return rounded_dot(probs, v, PV, pv.compute, pv.accum).astype(pv.output)


def _inputs(b=2, g=2, r=2, t=16, d=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, g, r, t, d)) * d**-0.5
    k, v = jax.random.normal(keys[1], (b, g, t, d)), jax.random.normal(keys[2], (b, g, t, d))
    mask = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None, None, None]  # causal (1, 1, 1, T, S)
    d_out = jax.random.normal(keys[3], (b, g, r, t, d))
    return q, k, v, mask, d_out


def _value_and_grads(fn, q, k, v, mask, d_out, dtypes):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask, dtypes, dtypes), q, k, v)
    return out, vjp(d_out.astype(out.dtype))


@pytest.mark.parametrize("dtypes", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("masked", [True, False])
def test_softmax_attention_forward_is_the_plain_forward(dtypes, masked):
    q, k, v, mask, _ = _inputs()
    mask = mask if masked else None
    got = jax.jit(attention.softmax_attention, static_argnums=(4, 5))(q, k, v, mask, dtypes, dtypes)
    want = jax.jit(reference_attention, static_argnums=(4, 5))(q, k, v, mask, dtypes, dtypes)
    assert got.dtype == dtypes.output
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtypes,bound", [(F32, 8 * F32_EPS), (BF16, 2 * BF16_EPS)], ids=["f32", "bf16"])
def test_softmax_attention_gradients_match_autodiff(dtypes, bound):
    """FlashAttention's backward equals autodiff's up to rounding in the dtypes used: a
    few f32 ulps in f32 (different summation orders); in bf16 the rounding of the bf16
    gradients (measured 0.6 eps), far below what a wrong formula gives."""
    q, k, v, mask, d_out = _inputs()
    _, got = _value_and_grads(attention.softmax_attention, q, k, v, mask, d_out, dtypes)
    _, want = _value_and_grads(reference_attention, q, k, v, mask, d_out, dtypes)
    for name, g, w in zip("qkv", got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        err = np.max(np.abs(g - w)) / np.max(np.abs(w))
        assert err <= bound, f"d{name}: relative error {err:.2e} > {bound:.2e}"


def test_softmax_attention_row_without_visible_keys_passes_no_gradient():
    """where() hides masked logits from the gradient even when a row sees no key."""
    q, k, v, mask, d_out = _inputs(t=8)
    mask = mask.at[..., 3, :].set(False)  # query 3 sees nothing: uniform weights, no gradient to logits
    _, got = _value_and_grads(attention.softmax_attention, q, k, v, mask, d_out, F32)
    _, want = _value_and_grads(reference_attention, q, k, v, mask, d_out, F32)
    np.testing.assert_array_equal(got[0][..., 3, :], 0.0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=8 * F32_EPS * float(jnp.max(jnp.abs(w))))


def test_softmax_attention_rejects_a_float_mask():
    q, k, v, mask, _ = _inputs()
    with pytest.raises(TypeError, match="bool or int8; got float32"):
        attention.softmax_attention(q, k, v, mask.astype(jnp.float32), F32, F32)


def test_softmax_attention_keeps_no_query_by_key_residual():
    """Autodiff keeps (T, S) logits and probabilities; the custom VJP keeps q, k, v and
    two (T,) statistics per head."""
    q, k, v, mask, _ = _inputs(t=128, d=16)
    t_by_s = q.shape[0] * q.shape[1] * q.shape[2] * 128 * 128 * 4  # one f32 (B, G, R, T, S) buffer
    saved = {}
    for name, fn in [("custom", attention.softmax_attention), ("autodiff", reference_attention)]:
        saved[name] = mpx.inspect.residual_bytes(lambda q, k, v: fn(q, k, v, mask, BF16, BF16), q, k, v)["total"]
    assert saved["custom"] < t_by_s / 2 < saved["autodiff"] - t_by_s


@pytest.mark.parametrize("t,block,mask_kind", [
    (64, 16, "causal"), (50, 16, "causal"), (50, 16, "causal-2d"), (64, 16, "keys"), (50, 16, "none"),
    (64, 64, "causal")], ids=["split-causal", "padded-causal", "padded-causal-2d", "split-keys",
                              "padded-none", "one-block"])
def test_query_blocks_give_the_unblocked_values_and_autodiff_gradients(t, block, mask_kind):
    """Query blocks change no forward value beyond f32 summation order (each block's rows
    see every key; the CPU's GEMM kernels may sum a 16-row block in another order than 64
    rows, so bits can differ by an ulp or two) and the gradients stay within the unblocked
    bound: causal masks vary along the queries and are split with them, key masks
    (B, 1, 1, 1, S) are shared, T = 50 is padded."""
    q, k, v, mask, d_out = _inputs(t=t)
    if mask_kind == "keys":
        mask = (jnp.arange(t) < t - 5)[None, None, None, None, :]  # the last 5 keys are padding
    elif mask_kind == "causal-2d":
        mask = mask[0, 0, 0]  # (T, S)
    mask = None if mask_kind == "none" else mask
    blocked = lambda q, k, v, m, a, b: attention.softmax_attention(q, k, v, m, a, b, query_block=block)  # noqa: E731
    out, got = _value_and_grads(blocked, q, k, v, mask, d_out, F32)
    want_out, want = _value_and_grads(reference_attention, q, k, v, mask, d_out, F32)
    out_err = float(jnp.max(jnp.abs(out - want_out)) / jnp.max(jnp.abs(want_out)))
    assert out_err <= 4 * F32_EPS, f"output: relative error {out_err:.2e}"
    for name, g, w in zip("qkv", got, want):
        err = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        assert err <= 8 * F32_EPS, f"d{name}: relative error {err:.2e}"


def test_softmax_attention_rejects_an_empty_query_block():
    q, k, v, mask, _ = _inputs()
    with pytest.raises(ValueError, match="query_block must be a positive number of queries; got 0"):
        attention.softmax_attention(q, k, v, mask, F32, F32, query_block=0)


def test_query_blocks_bound_the_backward_passs_temp_memory():
    """One block's (T, S) buffers at a time: with 8 blocks the compiled backward needs at
    least two f32 (T, S) buffers less than with one, and no more than one such buffer."""
    q, k, v, mask, d_out = _inputs(b=2, g=2, r=2, t=512, d=16)
    t_by_s = 2 * 2 * 2 * 512 * 512 * 4

    def temp(block):
        fn = lambda q, k, v: attention.softmax_attention(q, k, v, mask, F32, F32, query_block=block)  # noqa: E731
        grads = jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v)[1](d_out))
        return grads.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    whole, blocked = temp(512), temp(64)
    assert blocked <= t_by_s < 3 * t_by_s <= whole, (blocked / t_by_s, whole / t_by_s)


def _stack_temp_bytes(fn, layers: int, t: int = 256) -> int:
    q, k, v, mask, _ = _inputs(b=2, g=2, r=2, t=t, d=16)

    def loss(q):
        x = q
        for _ in range(layers):
            x = fn(x, k, v, mask, F32, F32)
        return jnp.sum(x)

    return jax.jit(jax.grad(loss)).lower(q).compile().memory_analysis().temp_size_in_bytes


def test_stacked_attention_backward_recomputes_one_layer_at_a_time():
    """Each extra layer adds less than one (T, S) f32 buffer of compiled temp memory: the
    recomputation waits for its layer's gradient (mpx.ordering.after) instead of running
    for every layer at the start of the backward pass."""
    t_by_s = 2 * 2 * 2 * 256 * 256 * 4
    extra = _stack_temp_bytes(attention.softmax_attention, 4) - _stack_temp_bytes(attention.softmax_attention, 1)
    assert extra < 3 * t_by_s, f"3 more layers cost {extra / t_by_s:.1f} (T, S) buffers"
    plain = _stack_temp_bytes(reference_attention, 4) - _stack_temp_bytes(reference_attention, 1)
    assert plain >= 3 * t_by_s  # autodiff keeps each layer's probabilities: the bound can fail


# --------------------------------------------------------------------------- swiglu


def test_swiglu_matches_autodiff_and_keeps_only_its_inputs():
    keys = jax.random.split(jax.random.key(1), 3)
    gate = (jax.random.normal(keys[0], (64, 96)) * 3).astype(jnp.bfloat16)
    up = jax.random.normal(keys[1], (64, 96)).astype(jnp.bfloat16)
    d_out = jax.random.normal(keys[2], (64, 96))
    plain = lambda g, u: jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)  # noqa: E731
    out, vjp = jax.vjp(activations.swiglu, gate, up)
    want_out, want_vjp = jax.vjp(plain, gate, up)
    np.testing.assert_array_equal(out, want_out)
    for g, w in zip(vjp(d_out), want_vjp(d_out)):
        assert g.dtype == jnp.bfloat16
        # the f32 gradients differ by f32 ulps, so the bf16 results by at most one rounding
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=BF16_EPS, atol=BF16_EPS * float(jnp.max(jnp.abs(w.astype(jnp.float32)))))
    saved = mpx.inspect.residual_bytes(activations.swiglu, gate, up)
    assert saved == {"bfloat16": 2 * gate.size * 2, "total": 2 * gate.size * 2}
    assert mpx.inspect.residual_bytes(plain, gate, up)["total"] >= 3 * gate.size * 4


def test_swiglu_fp8_residuals_keep_e4m3_tiles_and_cost_only_their_rounding():
    """residual_format="e4m3": the forward value is unchanged; the gradients come from
    inputs rounded to E4M3 in 1x128 tiles, so they differ from the exact ones (RMS,
    relative) by less than twice E4M3's half-ulp (2**-4) and by more than twice bf16's
    (2**-8): a backward pass that used the bf16 inputs would differ by 0."""
    keys = jax.random.split(jax.random.key(3), 3)
    gate = (jax.random.normal(keys[0], (64, 384)) * 3).astype(jnp.bfloat16)
    up = jax.random.normal(keys[1], (64, 384)).astype(jnp.bfloat16)
    d_out = jax.random.normal(keys[2], (64, 384))
    out, vjp = jax.vjp(activations.swiglu, gate, up)
    fp8_out, fp8_vjp = jax.vjp(lambda g, u: activations.swiglu(g, u, "e4m3"), gate, up)
    np.testing.assert_array_equal(fp8_out, out)
    half_ulp, bf16_half_ulp = mpx.formats.get("e4m3").half_ulp, mpx.formats.get("bf16").half_ulp
    for got, want in zip(fp8_vjp(d_out), vjp(d_out)):
        assert got.dtype == jnp.bfloat16
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        err = np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))
        assert 2 * bf16_half_ulp <= err <= 2 * half_ulp, err
    saved = mpx.inspect.residual_bytes(lambda g, u: activations.swiglu(g, u, "e4m3"), gate, up)
    assert saved["float8_e4m3fn"] == 2 * gate.size
    assert saved["float32"] == 2 * gate.size // 128 * 4  # one scale per 1x128 tile
    assert "bfloat16" not in saved or saved["bfloat16"] == 0


# --------------------------------------------------------------------------- ordering


def test_after_returns_x_unchanged_but_depends_on_the_dependency():
    x = jnp.array([1.5, -0.0, jnp.inf, 3e38], jnp.float32)
    for dep in (jnp.array([2.0]), jnp.array([-jnp.inf]), jnp.zeros((2, 3), jnp.bfloat16)):
        got = ordering.after(x, dep)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, x)
    jaxpr = jax.make_jaxpr(ordering.after)(x, jnp.ones(3))
    used = [v for eqn in jaxpr.jaxpr.eqns for v in eqn.invars]
    assert any(v is jaxpr.jaxpr.invars[1] for v in used)


@pytest.mark.parametrize("dtype,bitwise", [("float8_e4m3fn", False), ("float8_e5m2", False), ("bfloat16", True)])
def test_after_keeps_the_bits_of_narrow_floats(dtype, bitwise):
    """FP8 data (and bf16 with bitwise=True) gets 0 added to its bit patterns: every bit
    stays, NaN and -0 included, and the result still depends on the dependency."""
    x = jnp.array([jnp.nan, 1.5, -0.0, -448.0, 2.0**-9], jnp.float32).astype(dtype)
    bits = lambda v: jax.lax.bitcast_convert_type(v, f"uint{8 * v.dtype.itemsize}")  # noqa: E731
    for dep in (jnp.array([2.0]), jnp.array([-jnp.inf]), jnp.zeros((2, 3), jnp.bfloat16)):
        got = jax.jit(lambda v, d: ordering.after(v, d, bitwise=bitwise))(x, dep)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(bits(got), bits(x))
    jaxpr = jax.make_jaxpr(lambda v, d: ordering.after(v, d, bitwise=bitwise))(x, jnp.ones(3))
    assert any(v is jaxpr.jaxpr.invars[1] for eqn in jaxpr.jaxpr.eqns for v in eqn.invars)
    assert "add" in {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "bfloat16", "float32"])
def test_kept_returns_x_bit_for_bit(dtype):
    x = jnp.array([jnp.nan, 1.5, -0.0, -448.0], jnp.float32).astype(dtype)
    bits = lambda v: jax.lax.bitcast_convert_type(v, f"uint{8 * v.dtype.itemsize}")  # noqa: E731
    got = jax.jit(ordering.kept)(x)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(bits(got), bits(x))


def _fp8_stack_temp_bytes(layers=4, n=1024, f=512) -> float:
    """Compiled temp bytes per (n, f) element of the gradient of a stack of FP8 layers fed
    by an f32 elementwise product, as an FFN's down projection is."""
    keys = jax.random.split(jax.random.key(0), layers + 1)
    x = jax.random.normal(keys[0], (n, f)).astype(jnp.bfloat16)
    ws = [jax.random.normal(key, (f, f)) * f**-0.5 for key in keys[1:]]

    def loss(x, ws):
        for w in ws:
            h = jax.nn.silu(x.astype(jnp.float32)) * x.astype(jnp.float32)
            x = mpx.dot.dot_general(h, w, (((1,), (0,)), ((), ())), recipe=mpx.recipes.DeepSeekV3(),
                                    preferred_element_type=jnp.bfloat16)
        return jnp.sum(x.astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (n * f)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="kept is applied on CPU only")
def test_fp8_layers_backward_reads_their_stored_e4m3_inputs(monkeypatch):
    """Without `kept`, XLA on CPU quantizes each layer's f32 input again in the backward
    pass and keeps that input alive (4 bytes per element) instead of the E4M3 copy (1):
    3 bytes per element for each layer but the last."""
    with_kept = _fp8_stack_temp_bytes()
    monkeypatch.setattr(dot_general_lib, "kept", lambda x: x)
    without = _fp8_stack_temp_bytes()
    assert without - with_kept >= 2 * 3, (with_kept, without)


# --------------------------------------------------------------------------- rms_norm


def test_rms_norm_matches_autodiff_and_keeps_x_and_its_inverse_rms():
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (4, 32, 64)) * 3 + 1
    scale = 1 + 0.1 * jax.random.normal(keys[1], (64,))
    d_out = jax.random.normal(keys[2], x.shape)

    def plain(x, scale):
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return normed * scale

    out, vjp = jax.vjp(lambda x, s: activations.rms_norm(x, s, 1e-6), x, scale)
    want_out, want_vjp = jax.vjp(plain, x, scale)
    np.testing.assert_array_equal(out, want_out)
    for got, want in zip(vjp(d_out), want_vjp(d_out)):
        np.testing.assert_allclose(got, want, rtol=0, atol=64 * F32_EPS * float(jnp.max(jnp.abs(want))))
    saved = mpx.inspect.residual_bytes(lambda x, s: activations.rms_norm(x, s, 1e-6), x, scale)["total"]
    assert saved == x.size * 4 + scale.size * 4 + x.size // 64 * 4  # x, scale, (..., 1) inverse RMS
    assert mpx.inspect.residual_bytes(plain, x, scale)["total"] >= 2 * x.size * 4


# PV in FP8 (attention.Fp8Values, the fp8 presets' attention)

E4M3 = mpx.formats.get("e4m3")
FP8_VALUES = attention.Fp8Values("e4m3", "e5m2")


def _dequantized_heads(x, fmt):
    """x (B, G, ...) through FP8 quantization with one scale per batch row and head
    (mpx.quantize), back in f32."""
    return mpx.dequantize(mpx.quantize(x, fmt, (1, 1) + x.shape[2:])).astype(jnp.float32)


def _fp8_pv_reference(q, k, v, mask, d_out, values):
    """The FP8 PV products written out with the core quantizer: probabilities at the fixed
    power-of-two scale, V and dO per batch row and head, f32 products of the dequantized
    operands."""
    logits = rounded_dot(q, k, QK, jnp.float32)
    probs = mnn.attention_weights(logits, mask)
    p8 = mpx.formats.cast(probs * values.probs_scale, values.fwd_format).astype(jnp.float32) / values.probs_scale
    v8, g8 = _dequantized_heads(v, values.fwd_format), _dequantized_heads(d_out, values.bwd_format)
    hi = jax.lax.Precision.HIGHEST
    out = jnp.einsum("bgrts,bgsd->bgrtd", p8, v8, precision=hi)
    d_v = jnp.einsum("bgrts,bgrtd->bgsd", p8, g8, precision=hi)
    return out, d_v


def test_fp8_values_scale_probabilities_by_the_largest_power_of_two_in_range():
    assert attention.Fp8Values("e4m3").probs_scale == 256.0  # E4M3 max 448
    assert attention.Fp8Values("e5m2").probs_scale == 32768.0  # E5M2 max 57344
    assert attention.Fp8Values.of(mpx.recipes.DeepSeekV3()) == attention.Fp8Values("e4m3", "e4m3")
    assert attention.Fp8Values.of(mpx.recipes.CurrentScaling()) == attention.Fp8Values("e4m3", "e5m2")


@pytest.mark.parametrize("t,block", [(16, 64), (50, 16)], ids=["one-block", "padded-blocks"])
def test_fp8_pv_output_and_dv_are_the_quantized_products(t, block):
    """Forward P V and dV = P^T dO equal the products of the core quantizer's FP8 operands
    (f32 summation order aside: within dot-exact's 1e-5 of max|y|), one query block or
    several with padding."""
    q, k, v, mask, d_out = _inputs(t=t)
    fn = lambda q, k, v: attention.softmax_attention(q, k, v, mask, F32, F32, query_block=block,  # noqa: E731
                                                     values=FP8_VALUES)
    out, vjp = jax.vjp(fn, q, k, v)
    _, _, d_v = vjp(d_out)
    want_out, want_dv = _fp8_pv_reference(q, k, v, mask, d_out, FP8_VALUES)
    for name, got, want in (("output", out, want_out), ("dV", d_v, want_dv)):
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        assert err <= 1e-5, f"{name}: {err:.2e} of max|y| from the quantized product"


def _half_ulp_bound(p, v, fmt, v_scale, p_scale):
    """Worst case |P V - P8 V8| for round-to-nearest: each operand off by at most its half
    ulp relative, or half the smallest subnormal step times its scale near zero."""
    u, tiny = fmt.half_ulp, fmt.min_subnormal / 2
    e_p = jnp.maximum(u * p, tiny / p_scale)
    e_v = jnp.maximum(u * jnp.abs(v), tiny * v_scale)
    dims = "bgrts,bgsd->bgrtd"
    return jnp.einsum(dims, e_p, jnp.abs(v)) + jnp.einsum(dims, p, e_v) + jnp.einsum(dims, e_p, e_v)


def test_fp8_pv_error_is_within_e4m3_rounding_and_far_above_bf16s():
    """Two-sided: the FP8 output stays within the E4M3 rounding bound of the f32 result
    everywhere, and is measurably further from it than the bf16 path (so FP8 ran)."""
    q, k, v, mask, _ = _inputs(t=64, d=16)
    want = reference_attention(q, k, v, mask, F32, F32)
    got = attention.softmax_attention(q, k, v, mask, F32, F32, values=FP8_VALUES)
    half = attention.softmax_attention(q, k, v, mask, BF16, BF16).astype(jnp.float32)
    probs = mnn.attention_weights(rounded_dot(q, k, QK, jnp.float32), mask)
    v_scale = float(jnp.max(jnp.abs(v))) / E4M3.max  # no head's scale is larger
    bound = _half_ulp_bound(probs, v, E4M3, v_scale, FP8_VALUES.probs_scale)
    assert bool(jnp.all(jnp.abs(got - want) <= bound * (1 + 1e-5) + 1e-6))
    fp8_err, bf16_err = float(jnp.max(jnp.abs(got - want))), float(jnp.max(jnp.abs(half - want)))
    assert fp8_err > 4 * bf16_err, f"FP8 error {fp8_err:.2e} not measurably above bf16's {bf16_err:.2e}"


def test_fp8_pv_gradients_follow_f32s_within_fp8_error_and_differ_from_bf16s():
    """dQ, dK and dV of the FP8 PV path against f32 autodiff: close at the scale of E5M2's
    (gradients) and E4M3's rounding, and further off than bf16's gradients."""
    q, k, v, mask, d_out = _inputs(t=64, d=16)
    fp8 = lambda q, k, v, m, a, b: attention.softmax_attention(q, k, v, m, a, b, values=FP8_VALUES)  # noqa: E731
    _, got = _value_and_grads(fp8, q, k, v, mask, d_out, F32)
    _, want = _value_and_grads(reference_attention, q, k, v, mask, d_out, F32)
    _, half = _value_and_grads(attention.softmax_attention, q, k, v, mask, d_out, BF16)
    bound = 2 * (mpx.formats.get("e5m2").half_ulp + E4M3.half_ulp)  # relative to max|grad|
    for name, g, w, h in zip("qkv", got, want, half):
        scale = float(jnp.max(jnp.abs(w)))
        err = float(jnp.max(jnp.abs(g - w))) / scale
        bf16_err = float(jnp.max(jnp.abs(h.astype(jnp.float32) - w))) / scale
        assert 2 * bf16_err < err <= bound, f"d{name}: {err:.3f} (bf16 {bf16_err:.4f}, bound {bound:.3f})"


def test_fp8_pv_clips_instead_of_overflowing_and_keeps_masked_rows_finite():
    """Large values saturate through their scales (no NaN from an e4m3fn overflow),
    and a query that sees no key still gets uniform weights and finite gradients."""
    q, k, v, mask, d_out = _inputs(t=8)
    v = v.at[0, 0, 0, 0].set(1e6)
    mask = mask.at[..., 3, :].set(False)
    fn = lambda q, k, v: attention.softmax_attention(q, k, v, mask, F32, F32, values=FP8_VALUES)  # noqa: E731
    out, vjp = jax.vjp(fn, q, k, v)
    grads = vjp(d_out * 1e6)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
    np.testing.assert_array_equal(grads[0][..., 3, :], 0.0)


def test_the_fp8_presets_run_pv_in_fp8_and_qk_in_bf16():
    for name in ("fp8", "fp8_current", "fp8_delayed"):
        policy = mpx.policy.preset(name)
        assert policy.resolve("layers_0/attn/pv", "attention").recipe is not None, name
        assert policy.resolve("layers_0/attn/qk", "attention").recipe is None, name
    assert mpx.policy.preset("bf16").resolve("layers_0/attn/pv", "attention").recipe is None


def test_fp8_pv_of_one_sequence_does_not_depend_on_its_batch_or_on_unseen_keys():
    """Scales per batch row and head: a row's output is the same alone or beside a row of
    huge values; keys no query sees (stale cache slots) neither move the scale nor leak NaN."""
    q, k, v, mask, _ = _inputs(t=16)
    fn = lambda q, k, v, m: attention.softmax_attention(q, k, v, m, F32, F32, values=FP8_VALUES)  # noqa: E731
    loud = v.at[1].multiply(1e4)
    np.testing.assert_array_equal(fn(q, k, loud, mask)[0], fn(q[:1], k[:1], v[:1], mask)[0])
    seen = (jnp.arange(16) < 12)[None, None, None, None, :]  # keys 12-15: padding, seen by nobody
    stale = v.at[:, :, 12:].set(jnp.nan).at[:, :, 12, 0].set(1e30)
    clean = v.at[:, :, 12:].set(0.0)
    np.testing.assert_array_equal(fn(q, k, stale, seen), fn(q, k, clean, seen))
    assert bool(jnp.all(jnp.isfinite(fn(q, k, stale, seen))))
