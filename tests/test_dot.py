"""Tests for mpx.dot: quantized dot_general / einsum, forward and gradients, scale state.

Error bounds come from the formats. Rounding x to a format with half-ulp u gives a
relative error delta with |delta| <= u and, for values spread over a binade, RMS at most
u / sqrt(3). A dot of two rounded operands then has a relative (Frobenius) error of
about sqrt((u_a^2 + u_b^2) / 3). Tests allow twice that (sampling spread, the few
subnormals) and, where scales are folded into bf16, add bf16's half-ulp to each u.
They also require at least a quarter of it, so a path that silently skipped
quantization would fail.
"""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpx
import mpx.dot as mdot
from mpx.dot import backends, subscripts
from mpx import formats, kernels, metrics, recipes

E4M3, E5M2, BF16 = formats.get("e4m3"), formats.get("e5m2"), formats.get("bf16")
F32_EPS = float(jnp.finfo(jnp.float32).eps)

MK_KN = (((1,), (0,)), ((), ()))       # x (M, K) @ W (K, N)
MK_NK = (((1,), (1,)), ((), ()))       # W stored (N, K): contract rhs dim 1
BATCHED = (((2,), (1,)), ((0,), (0,)))  # (B, M, K) x (B, K, N)
BTK_KN = (((2,), (0,)), ((), ()))      # 3-D activations (B, T, K) x (K, N)

LAYOUTS = {  # "ragged_k200" is the plain x @ W layout
    "mk_nk": ((192, 256), (96, 256), MK_NK),
    "batched": ((2, 136, 256), (2, 256, 48), BATCHED),
    "btk_kn": ((2, 96, 256), (256, 64), BTK_KN),
    "ragged_k200": ((150, 200), (200, 72), MK_KN),
}


# Jitted entry points: eager tests would spend their time compiling one op at a time.
_STATIC = ("recipe", "preferred_element_type", "rhs_kind", "impl")
jit_dot = jax.jit(mdot.dot_general, static_argnums=(2,), static_argnames=_STATIC)
jit_einsum = jax.jit(mdot.einsum, static_argnums=(0,), static_argnames=_STATIC)
jit_operands = jax.jit(mdot.quantized_operands, static_argnums=(2,), static_argnames=("recipe", "rhs_kind"))


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _rms_rel(*fmts, fold=False):
    """Expected relative error of a dot whose operands were rounded to `fmts`."""
    us = [f.half_ulp + (BF16.half_ulp if fold else 0.0) for f in fmts]
    return math.sqrt(sum(u * u for u in us) / 3.0)


def _recipe_and_state(name):
    if name == "delayed":
        r = recipes.DelayedScaling(history=4)
        return r, mdot.init_state(r)
    if name == "static":
        r = recipes.StaticScaling()
        return r, mdot.init_state(r)
    return {"current": recipes.CurrentScaling(), "deepseek": recipes.DeepSeekV3(),
            "deepseek_pow2": recipes.DeepSeekV3(scale_format="ue8m0")}[name], None


def _value_and_grads(fn, lhs, rhs, ct):
    """(out, d_lhs, d_rhs) of sum(fn(lhs, rhs) * ct), in one jitted call."""

    @jax.jit
    def run(lhs, rhs, ct):
        out, vjp = jax.vjp(fn, lhs, rhs)
        return (out, *vjp(ct.astype(out.dtype)))

    return run(lhs, rhs, ct)


def _reference(lhs, rhs, dn):
    return lambda a, b: jax.lax.dot_general(a, b, dn, precision=jax.lax.Precision.HIGHEST)


def _quantized(dn, recipe, state=None, **kw):
    def fn(a, b):
        out = mdot.dot_general(a, b, dn, recipe=recipe, state=state, **kw)
        return out if state is None else out[0]

    return fn


# --------------------------------------------------------------------------- plan


def test_plan_per_tensor_recipes_use_e4m3_forward_and_e5m2_gradients():
    for r in (recipes.CurrentScaling(), recipes.DelayedScaling(), recipes.StaticScaling()):
        p = mdot.plan(r)
        for spec in (p.fprop_lhs, p.fprop_rhs, p.dgrad_rhs, p.wgrad_lhs):
            assert (spec.fmt, spec.granularity) == ("e4m3", mpx.PerTensor())
        for spec in (p.dgrad_dy, p.wgrad_dy):
            assert (spec.fmt, spec.granularity) == ("e5m2", mpx.PerTensor())


def test_plan_deepseek_groups_along_each_contraction_and_never_128x128_on_activations():
    weight, act = mdot.plan(recipes.DeepSeekV3(), "weight"), mdot.plan(recipes.DeepSeekV3(), "activation")
    assert weight.fprop_lhs.granularity == mpx.Blocks((1, 128))       # (M, K): per token
    assert weight.fprop_rhs.granularity == mpx.Blocks((128, 128))     # (K, N) weight blocks
    assert weight.dgrad_rhs == weight.fprop_rhs                       # reused in dgrad
    assert weight.dgrad_dy.granularity == mpx.Blocks((1, 128))        # (M, N): per token
    assert weight.wgrad_lhs.granularity == mpx.Blocks((128, 1))       # 128 tokens x 1
    assert weight.wgrad_dy.granularity == mpx.Blocks((128, 1))
    assert act.fprop_rhs.granularity == mpx.Blocks((128, 1))          # along K of (K, N)
    assert act.dgrad_rhs.granularity == mpx.Blocks((1, 128))          # along N of (K, N)
    for p in (weight, act):
        for spec in (p.fprop_lhs, p.dgrad_dy, p.wgrad_lhs, p.wgrad_dy):
            assert spec.granularity != mpx.Blocks((128, 128))
            assert spec.fmt == "e4m3"


# --------------------------------------------------------------------------- accuracy


# Per-tensor scaling does not depend on the layout (test_other_recipes covers "mk_nk").
@pytest.mark.parametrize("recipe_name,layout", [("deepseek", name) for name in sorted(LAYOUTS)]
                         + [("current", "batched")])
def test_forward_and_gradients_match_float32_within_format_bounds(recipe_name, layout):
    lhs_shape, rhs_shape, dn = LAYOUTS[layout]
    recipe, state = _recipe_and_state(recipe_name)
    lhs, rhs = _normal(1, lhs_shape), _normal(2, rhs_shape, 0.05)
    ct = _normal(3, jax.eval_shape(_reference(lhs, rhs, dn), lhs, rhs).shape, 1e-3)
    ref = _value_and_grads(_reference(lhs, rhs, dn), lhs, rhs, ct)
    got = _value_and_grads(_quantized(dn, recipe, state), lhs, rhs, ct)
    bwd = recipe.bwd_format  # block scales apply exactly (per K group): no extra rounding
    expect = (_rms_rel(E4M3, E4M3), _rms_rel(formats.get(bwd), E4M3), _rms_rel(E4M3, formats.get(bwd)))
    for what, g, r, e in zip(("out", "d_lhs", "d_rhs"), got, ref, expect):
        assert g.shape == r.shape and g.dtype == r.dtype, what
        err = float(metrics.relative_error(g, r))
        assert 0.25 * e <= err <= 2.0 * e, (what, err, e)


@pytest.mark.parametrize("recipe_name", ["delayed", "static"])
def test_other_recipes_match_float32(recipe_name):
    lhs_shape, rhs_shape, dn = LAYOUTS["mk_nk"]
    recipe, state = _recipe_and_state(recipe_name)
    lhs, rhs = _normal(4, lhs_shape), _normal(5, rhs_shape)
    ct = _normal(6, (lhs_shape[0], rhs_shape[0]))
    ref = _value_and_grads(_reference(lhs, rhs, dn), lhs, rhs, ct)
    got = _value_and_grads(_quantized(dn, recipe, state), lhs, rhs, ct)
    bwd = formats.get(recipe.bwd_format)
    # Fresh delayed/static state falls back to current scaling: same bounds.
    for g, r, e in zip(got, ref, (_rms_rel(E4M3, E4M3), _rms_rel(bwd, E4M3), _rms_rel(E4M3, bwd))):
        assert 0.25 * e <= float(metrics.relative_error(g, r)) <= 2.0 * e


@pytest.mark.parametrize("recipe", [recipes.CurrentScaling(), recipes.DeepSeekV3()], ids=["current", "deepseek"])
def test_implementations_agree_with_the_dequantized_reference(recipe):
    lhs_shape, rhs_shape, dn = LAYOUTS["ragged_k200"]
    lhs, rhs = _normal(7, lhs_shape), _normal(8, rhs_shape)
    ct = _normal(9, (lhs_shape[0], rhs_shape[1]))
    ref = _value_and_grads(_quantized(dn, recipe, impl="dequant_f32"), lhs, rhs, ct)
    k = lhs_shape[1]
    # The same exact products, summed in another order (<= K eps relative); block scales
    # multiply f32 partial sums. "fold_bf16" folds block scales into bf16 operands: one
    # extra bf16 rounding each, which it must show.
    bound = k * F32_EPS
    assert mdot.resolve_impl("auto") == ("fp8" if jax.default_backend() == "gpu" else "upcast_bf16")
    assert mdot.resolve_impl("auto", mpx.target.Target("gpu", "NVIDIA H100 80GB HBM3")) == "fp8"
    assert mdot.resolve_impl("auto", mpx.target.Target("cpu")) == "upcast_bf16"
    for impl in ("upcast_bf16", "fp8"):
        got = _value_and_grads(_quantized(dn, recipe, impl=impl), lhs, rhs, ct)
        for g, r in zip(got, ref):
            assert float(metrics.relative_error(g, r)) <= bound, impl
    if isinstance(recipe, recipes.DeepSeekV3):
        folded = _value_and_grads(_quantized(dn, recipe, impl="fold_bf16"), lhs, rhs, ct)
        e = _rms_rel(BF16, BF16)
        for g, r in zip(folded, ref):
            assert 0.1 * e <= float(metrics.relative_error(g, r)) <= 2.0 * e


# Under DeepSeekV3, "fp8" runs the "upcast_bf16" computation (no block-scaled XLA GEMM);
# "dequant_f32" is compared with both in test_implementations_agree_....
@pytest.mark.parametrize("recipe,impl", [
    (recipes.CurrentScaling(scale_format="ue8m0"), "upcast_bf16"), (recipes.CurrentScaling(scale_format="ue8m0"), "fp8"),
    (recipes.DeepSeekV3(scale_format="ue8m0"), "upcast_bf16")], ids=lambda v: getattr(v, "name", v))
def test_representable_inputs_with_pow2_scales_are_exact(recipe, impl):
    # Integers |v| <= 16 are E4M3 values, |v| <= 8 are E5M2 values; with power-of-two
    # scales quantization loses nothing and all partial sums are exact in float32.
    lhs = jax.random.randint(jax.random.key(10), (136, 200), -16, 17).astype(jnp.float32)
    rhs = jax.random.randint(jax.random.key(11), (200, 40), -16, 17).astype(jnp.float32)
    ct = jax.random.randint(jax.random.key(12), (136, 40), -8, 9).astype(jnp.float32)
    got = _value_and_grads(_quantized(MK_KN, recipe, impl=impl), lhs, rhs, ct)
    ref = _value_and_grads(_reference(lhs, rhs, MK_KN), lhs, rhs, ct)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_dgrad_output_gradient_is_tiled_per_token():
    """One token with a huge gradient must not wreck the other tokens' input gradients."""
    m, k, n, outlier = 128, 64, 256, 5
    x, w = _normal(13, (m, k)), _normal(14, (k, n))
    dy = _normal(15, (m, n)).at[outlier].multiply(2.0**20)
    ref = dy @ w.T
    _, d_x, _ = _value_and_grads(_quantized(MK_KN, recipes.DeepSeekV3()), x, w, dy)
    others = jnp.arange(m) != outlier
    bound = 2.0 * _rms_rel(E4M3, E4M3, fold=True)
    assert float(metrics.relative_error(d_x[others], ref[others])) <= bound
    # The same dY in one 128x128 block: the other tokens fall below E4M3's smallest
    # subnormal relative to the outlier's scale, and more than half their signal is lost.
    blocked = jax.jit(lambda v: mpx.dequantize(mpx.quantize(v, "e4m3", mpx.Blocks((128, 128)))))
    assert float(metrics.relative_error((blocked(dy) @ blocked(w.T))[others], ref[others])) > 0.5


def test_jit_matches_eager():
    lhs, rhs = _normal(16, (2, 40, 200)), _normal(17, (200, 24))
    # Eager runs compile every op on their own (~50 compiles per quantized forward,
    # ~100 with the backward), so the eager check is one forward; the layout and
    # quantization code is shared by all recipes and gradients run under jit above.
    fn = _quantized(BTK_KN, recipes.CurrentScaling())
    # Eager and jitted runs may sum in another order: <= K eps relative.
    assert float(metrics.relative_error(fn(lhs, rhs), jax.jit(fn)(lhs, rhs))) <= 200 * F32_EPS


def test_dtypes_follow_inputs_and_preferred_element_type():
    x, w = _normal(18, (32, 64)).astype(jnp.bfloat16), _normal(19, (64, 16)).astype(jnp.bfloat16)
    r = recipes.DeepSeekV3()
    shape = lambda a, b, **kw: jax.eval_shape(  # noqa: E731
        lambda a, b: mdot.dot_general(a, b, MK_KN, recipe=r, **kw), a, b)
    assert shape(x, w).dtype == jnp.bfloat16
    assert shape(x, w, preferred_element_type=jnp.float32).dtype == jnp.float32
    assert shape(x, w.astype(jnp.float32)).dtype == jnp.float32
    g = jax.eval_shape(jax.grad(lambda a, b: jnp.sum(mdot.dot_general(a, b, MK_KN, recipe=r)),
                                argnums=(0, 1)), x, w)
    assert [v.dtype for v in g] == [jnp.bfloat16, jnp.bfloat16]


def test_no_recipe_is_a_plain_dot_general():
    x, w = _normal(20, (8, 16)), _normal(21, (16, 4))
    want = jax.jit(jax.lax.dot_general, static_argnums=2)(x, w, MK_KN)
    np.testing.assert_array_equal(np.asarray(jit_dot(x, w, MK_KN)), np.asarray(want))
    y = jit_dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), MK_KN, preferred_element_type=jnp.float32)
    assert y.dtype == jnp.float32


# --------------------------------------------------------------------------- fast path = core


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e4m3fnuz", "e5m2fnuz"])
def test_fast_rounding_equals_core_cast(name):
    fmt = formats.get(name)
    grid = jnp.asarray(formats.representable_values(fmt), jnp.float32)
    mids = (grid[1:] + grid[:-1]) / 2  # ties: round-to-nearest-even decides
    special = jnp.array([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30, 1e-30], jnp.float32)
    v = jnp.concatenate([grid, mids, -mids, _normal(22, (2000,), fmt.max / 4), special])
    want = formats.cast(v, fmt).astype(jnp.float32)
    got = jax.jit(lambda v: formats.round_to_grid(v, fmt))(v)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("spec_name", ["fprop_lhs", "fprop_rhs", "wgrad_lhs"])
def test_fused_fold_equals_core_quantize_then_dequantize(spec_name):
    x = _normal(23, (150, 200), 3.0)
    for recipe in (recipes.DeepSeekV3(), recipes.CurrentScaling()):
        spec = getattr(mdot.plan(recipe), spec_name)
        values, scalar, _ = jax.jit(lambda x: backends.prepare(x, spec, "fold_bf16"))(x)
        q = backends.quantize_operand(x, spec)
        if scalar is None:
            want = mpx.dequantize(q).astype(jnp.bfloat16)
        else:
            want = q.data.astype(jnp.bfloat16)
            assert float(scalar) == float(q.scale.reshape(()))
        np.testing.assert_array_equal(np.asarray(values), np.asarray(want))


# --------------------------------------------------------------------------- state


def test_delayed_scaling_quantizes_with_the_old_history_and_records_the_new_amax():
    r = recipes.DelayedScaling(history=4)
    x, w = _normal(24, (32, 64)), _normal(25, (64, 16))
    old = mdot.DotState(lhs=recipes.update_history(r.init_state(), 10.0),
                        rhs=recipes.update_history(r.init_state(), 20.0))
    q_lhs, q_rhs = jit_operands(x, w, MK_KN, recipe=r, state=old)
    assert float(q_lhs.scale.reshape(())) == float(mpx.compute_scale(jnp.float32(10.0), "e4m3"))
    assert float(q_rhs.scale.reshape(())) == float(mpx.compute_scale(jnp.float32(20.0), "e4m3"))
    _, new = jit_dot(x, w, MK_KN, recipe=r, state=old)
    assert float(new.lhs.history[0]) == float(jnp.max(jnp.abs(x)))
    assert float(new.rhs.history[1]) == 20.0


def test_delayed_scaling_first_call_falls_back_to_the_current_amax():
    r = recipes.DelayedScaling(history=4)
    x, w = _normal(26, (32, 64)), _normal(27, (64, 16))
    q_lhs, _ = jit_operands(x, w, MK_KN, recipe=r, state=mdot.init_state(r))
    want = mpx.compute_scale(jnp.max(jnp.abs(x)), "e4m3")
    assert float(q_lhs.scale.reshape(())) == float(want)


def test_microbatch_states_merge_to_the_max_observation():
    r = recipes.DelayedScaling(history=4)
    state = mdot.init_state(r)
    step = jax.jit(lambda x, w, s: jit_dot(x, w, MK_KN, recipe=r, state=s)[1])
    w = _normal(28, (64, 16))
    small, large = _normal(29, (32, 64)), _normal(30, (32, 64), 7.0)
    merged = recipes.merge_amax_trees(step(small, w, state), step(large, w, state))
    assert float(merged.lhs.history[0]) == float(jnp.max(jnp.abs(large)))
    assert float(merged.rhs.history[0]) == float(jnp.max(jnp.abs(w)))


def test_static_scaling_returns_the_state_unchanged():
    r = recipes.StaticScaling()
    calibrated = mdot.DotState(lhs=recipes.update_history(r.init_state(), 3.0),
                               rhs=recipes.update_history(r.init_state(), 0.5))
    x, w = _normal(31, (16, 32)), _normal(32, (32, 8))
    _, new = jit_dot(x, w, MK_KN, recipe=r, state=calibrated)
    assert float(new.lhs.history[0]) == 3.0 and float(new.rhs.history[0]) == 0.5
    q_lhs, _ = jit_operands(x, w, MK_KN, recipe=r, state=calibrated)
    assert float(q_lhs.scale.reshape(())) == float(mpx.compute_scale(jnp.float32(3.0), "e4m3"))


def test_state_gets_no_gradient():
    r = recipes.DelayedScaling(history=4)
    x, w = _normal(33, (16, 32)), _normal(34, (32, 8))
    state = mdot.DotState(lhs=recipes.update_history(r.init_state(), 2.0),
                          rhs=recipes.update_history(r.init_state(), 2.0))

    def loss(s):
        out, new = jit_dot(x, w, MK_KN, recipe=r, state=s)
        return jnp.sum(out) + jnp.sum(new.lhs.history)

    g = jax.grad(loss)(state)
    assert all(float(jnp.max(jnp.abs(leaf))) == 0.0 for leaf in jax.tree_util.tree_leaves(g))


def test_state_errors():
    x, w = _normal(35, (8, 16)), _normal(36, (16, 4))
    with pytest.raises(ValueError, match="init_state"):
        mdot.dot_general(x, w, MK_KN, recipe=recipes.DelayedScaling())
    with pytest.raises(ValueError, match="keeps no scale state"):
        mdot.dot_general(x, w, MK_KN, recipe=recipes.CurrentScaling(),
                         state=mdot.init_state(recipes.DelayedScaling()))
    with pytest.raises(ValueError, match="keeps no scale state"):
        mdot.init_state(recipes.DeepSeekV3())
    with pytest.raises(ValueError, match="history has shape"):
        mdot.dot_general(x, w, MK_KN, recipe=recipes.DelayedScaling(history=8),
                         state=mdot.init_state(recipes.DelayedScaling(history=4)))


def test_argument_errors_name_the_bad_value():
    x, w = _normal(37, (8, 16)), _normal(38, (16, 4))
    with pytest.raises(ValueError, match="impl"):
        mdot.dot_general(x, w, MK_KN, recipe="current", impl="tensorcore")
    with pytest.raises(ValueError, match="rhs_kind"):
        mdot.dot_general(x, w, MK_KN, recipe="current", rhs_kind="bias")
    with pytest.raises(ValueError, match="do not pair up"):
        mdot.dot_general(x, w, (((0,), (0,)), ((), ())), recipe="current")
    with pytest.raises(ValueError, match="unknown recipe"):
        mdot.dot_general(x, w, MK_KN, recipe="fp7")


# --------------------------------------------------------------------------- einsum


@pytest.mark.parametrize("subscripts,lhs_shape,rhs_shape", [
    ("mk,nk->nm", (24, 64), (16, 64)),
    ("bhtd,bhsd->bhts", (2, 2, 16, 32), (2, 2, 24, 32)),
    ("mkj,kn->mn", (24, 64, 3), (64, 16)),
])
def test_einsum_matches_jnp_einsum(subscripts, lhs_shape, rhs_shape):
    lhs, rhs = _normal(39, lhs_shape), _normal(40, rhs_shape)

    @jax.jit
    def run(lhs, rhs):
        want = jnp.einsum(subscripts, lhs, rhs, precision=jax.lax.Precision.HIGHEST)
        plain = mdot.einsum(subscripts, lhs, rhs)
        got = mdot.einsum(subscripts, lhs, rhs, recipe=recipes.DeepSeekV3(), rhs_kind="activation")
        return want, plain, got

    want, plain, got = run(lhs, rhs)
    assert plain.shape == want.shape == got.shape
    assert float(metrics.relative_error(plain, want)) <= 100 * F32_EPS
    assert float(metrics.relative_error(got, want)) <= 2.0 * _rms_rel(E4M3, E4M3, fold=True)


def test_einsum_implicit_output_is_sorted_single_letters():
    assert subscripts._parse_einsum("mk,kn") == ("mk", "kn", "mn")
    assert subscripts._parse_einsum("bk, nk") == ("bk", "nk", "bn")


def test_einsum_returns_state_for_stateful_recipes():
    r = recipes.DelayedScaling(history=2)
    out, new = jit_einsum("mk,kn->mn", _normal(41, (8, 32)), _normal(42, (32, 4)), recipe=r,
                           state=mdot.init_state(r))
    assert out.shape == (8, 4) and isinstance(new, mdot.DotState)


def test_einsum_rejects_what_it_cannot_map():
    x = _normal(43, (4, 4))
    for bad in ("ij,jk,kl->il", "...j,jk->...k", "ii,ij->j", "ij,jk->iz"):
        with pytest.raises(ValueError):
            mdot.einsum(bad, x, x)
    with pytest.raises(ValueError, match="letters"):
        mdot.einsum("ijk,kl->il", x, x)


def test_plan_is_hashable_and_frozen():
    p = mdot.plan(recipes.DeepSeekV3())
    assert hash(p) == hash(mdot.plan(recipes.DeepSeekV3()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.fprop_lhs = p.fprop_rhs



# --------------------------------------------------------------------------- pre-quantized weights


def test_prequantized_matmul_agrees_with_dot_general_forward():
    x, w = _normal(44, (2, 40, 200)), _normal(45, (200, 72))
    e_x, e_w = _normal(46, (3, 24, 160)), _normal(47, (3, 160, 40))
    ds, static = recipes.DeepSeekV3(), recipes.StaticScaling()
    calibrated = mdot.DotState(lhs=recipes.update_history(static.init_state(), 2.5), rhs=static.init_state())

    @jax.jit
    def run(x, w, e_x, e_w):
        stored = mpx.quantize(w, "e4m3", mpx.Blocks((128, 128)))
        experts = mpx.quantize(e_w, "e4m3", mpx.Blocks((1, 128, 128)))
        per_tensor = mpx.quantize(w, "e4m3")  # what an uncalibrated rhs history falls back to
        return [
            (mdot.prequantized_matmul(x, stored, recipe=ds), mdot.dot_general(x, w, BTK_KN, recipe=ds)),
            (mdot.prequantized_matmul(e_x, experts, recipe=ds), mdot.dot_general(e_x, e_w, BATCHED, recipe=ds)),
            (mdot.prequantized_matmul(x, per_tensor, recipe=static, state=calibrated),
             mdot.dot_general(x, w, BTK_KN, recipe=static, state=calibrated)[0]),
            (mdot.prequantized_matmul(x, stored, compute_dtype=jnp.float32),  # weight-only
             jnp.einsum("btk,kn->btn", x, mpx.dequantize(stored), precision="highest")),
        ]

    # The same quantized values; dot_general folds block scales into bf16 operands (one
    # bf16 rounding each) where prequantized_matmul scales f32 partial sums per block.
    for got, want in run(x, w, e_x, e_w):
        assert got.shape == want.shape
        assert float(metrics.relative_error(got, want)) <= 2.0 * _rms_rel(BF16, BF16)


_FOLD_RECIPES = {"deepseek": recipes.DeepSeekV3(), "current": recipes.CurrentScaling(),
                 "static": recipes.StaticScaling(), "weight-only": None}


@pytest.mark.parametrize("recipe", list(_FOLD_RECIPES), ids=str)
@pytest.mark.parametrize("weights", ["block", "channel"])
def test_folded_prequantized_matmul_equals_the_f32_reference(recipe, weights):
    """"fold_f32" and "cpu_kernel" compute the reference's product (the same quantized
    values, dequantized in f32) up to f32 summation order, on a ragged K (200 = 128 + 72),
    for decode-sized rows and prefill-sized rows and for experts; "auto" on CPU is the
    kernel (where built) or "fold_f32" for decode-sized rows of a 2-D weight,
    "fold_f32" for experts, and the grouped bf16 GEMM above that."""
    recipe = _FOLD_RECIPES[recipe]
    state = None
    if recipes.is_stateful(recipe):
        state = mdot.DotState(lhs=recipes.update_history(recipe.init_state(), 2.5), rhs=recipe.init_state())
    block = (128, 128) if weights == "block" else (200, 1)
    w = mpx.quantize(_normal(50, (200, 48)), "e4m3", mpx.Blocks(block))
    experts = mpx.quantize(_normal(51, (3, 200, 40)), "e4m3", mpx.Blocks((1,) + block))

    @functools.partial(jax.jit, static_argnames="impl")
    def run(x, rhs, impl):
        return mdot.prequantized_matmul(x, rhs, recipe=recipe, state=state, impl=impl)

    cases = [(_normal(52, (1, 1, 200)), w), (_normal(53, (2, 8, 200)), w), (_normal(54, (4, 40, 200)), w),
             (_normal(55, (3, 5, 200)), experts)]
    for x, rhs in cases:
        folded, ref = run(x, rhs, "fold_f32"), run(x, rhs, "dequant_f32")
        assert folded.shape == ref.shape and folded.dtype == jnp.float32
        assert float(metrics.relative_error(folded, ref)) <= 1e-6
        if rhs.ndim == 2 and kernels.available():
            assert float(metrics.relative_error(run(x, rhs, "cpu_kernel"), ref)) <= 1e-6
        rows = x.shape[-2] if rhs.ndim == 3 else math.prod(x.shape[:-1])
        if jax.default_backend() == "cpu":
            decode = "cpu_kernel" if rhs.ndim == 2 and kernels.available() else "fold_f32"
            expect = decode if mpx.target.current().decode_sized(rows) else "upcast_bf16"
            assert np.array_equal(run(x, rhs, "auto"), run(x, rhs, expect))


@pytest.mark.parametrize("rows", [1, 2 * 3, 64])
def test_rounded_dot_keeps_the_products_of_its_compute_dtype(rows):
    """rounded_dot = a bf16 x bf16 -> f32 dot: the same value at any size; on CPU a few
    rows run as an f32 dot of the bf16-rounded operands, more rows stay bf16."""
    lhs, rhs = _normal(56, (2, rows, 96)), _normal(57, (2, 96, 24))
    want = jax.lax.dot_general(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), BATCHED,
                               preferred_element_type=jnp.float32)
    got = jax.jit(mdot.rounded_dot, static_argnums=(2, 3))(lhs, rhs, BATCHED, jnp.bfloat16)
    assert got.dtype == jnp.float32
    assert float(metrics.relative_error(got, want)) <= 1e-6
    jaxpr = jax.make_jaxpr(mdot.rounded_dot, static_argnums=(2, 3))(lhs, rhs, BATCHED, jnp.bfloat16)
    dot = next(e for e in jaxpr.eqns if e.primitive.name == "dot_general")
    small = mpx.target.current().decode_sized(rows)
    assert dot.invars[0].aval.dtype == (jnp.float32 if small else jnp.bfloat16)


ROUNDED_DOT_LAYOUTS = [
    ((3, 4, 5), (3, 5, 6), (((2,), (1,)), ((0,), (0,)))),  # batched matmul
    ((4, 5), (6, 5), (((1,), (1,)), ((), ()))),  # x W^T
    ((2, 3, 4, 5, 6), (2, 3, 7, 6), (((4,), (3,)), ((0, 1), (0, 1)))),  # attention QK^T
    ((5, 2, 7), (7, 3, 5), (((0, 2), (2, 0)), ((), ()))),  # two contracting axes, out of order
    ((4, 7, 2, 5), (5, 3, 4, 2), (((3, 2), (0, 3)), ((0,), (2,)))),  # batch axis not leading
]


@pytest.mark.parametrize("lhs_shape,rhs_shape,dimension_numbers", ROUNDED_DOT_LAYOUTS)
def test_rounded_dot_transposes_equal_autodiffs_for_any_layout(lhs_shape, rhs_shape, dimension_numbers):
    lhs, rhs = _normal(58, lhs_shape), _normal(59, rhs_shape)

    def loss(dot):
        return lambda a, b: jnp.sum(jnp.sin(dot(a, b)))

    ours = loss(lambda a, b: mdot.rounded_dot(a, b, dimension_numbers, jnp.float32, cotangent_dtype=jnp.float32))
    plain = loss(lambda a, b: jax.lax.dot_general(a, b, dimension_numbers, precision="highest"))
    for got, want in zip(jax.grad(ours, (0, 1))(lhs, rhs), jax.grad(plain, (0, 1))(lhs, rhs)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _backward_dot_dtypes(cotangent_dtype) -> set:
    """Element types of every dot_general operand in the lowered gradient (StableHLO)."""
    lhs, rhs = _normal(60, (2, 64, 96)), _normal(61, (2, 96, 24))

    def loss(a, b):
        out = mdot.rounded_dot(a, b, BATCHED, jnp.bfloat16, cotangent_dtype=cotangent_dtype)
        return jnp.sum(out.astype(jnp.bfloat16).astype(jnp.float32) ** 2)

    text = jax.jit(jax.grad(loss, (0, 1))).lower(lhs, rhs).as_text()
    signatures = re.findall(r"stablehlo\.dot_general.*: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
    assert len(signatures) == 3, text
    return {re.search(r"x([a-z]+[0-9]*)>$", t).group(1) for pair in signatures for t in pair}


def test_rounded_dot_backward_runs_in_the_compute_dtype_when_told_the_gradient_is_in_it():
    """The result is rounded to bf16, so its gradient holds bf16 values: rounding it back
    is exact and the backward GEMMs run bf16 x bf16 -> f32, same values; autodiff alone
    runs them in f32."""
    assert _backward_dot_dtypes(jnp.bfloat16) == {"bf16"}
    assert "f32" in _backward_dot_dtypes(None)
    lhs, rhs = _normal(60, (2, 64, 96)), _normal(61, (2, 96, 24))
    grads = {}
    for cotangent in (jnp.bfloat16, None):
        def loss(a, b, cotangent=cotangent):
            out = mdot.rounded_dot(a, b, BATCHED, jnp.bfloat16, cotangent_dtype=cotangent)
            return jnp.sum(out.astype(jnp.bfloat16).astype(jnp.float32) ** 2)
        grads[cotangent] = jax.grad(loss, (0, 1))(lhs, rhs)
    for got, want in zip(grads[jnp.bfloat16], grads[None]):  # same products and f32 sums; bf16 results
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -8)


def test_prequantized_matmul_rejects_bad_inputs():
    q = mpx.quantize(_normal(48, (32, 8)), "e4m3")
    with pytest.raises(TypeError, match="ScaledArray"):
        mdot.prequantized_matmul(_normal(49, (4, 32)), _normal(48, (32, 8)))
    with pytest.raises(ValueError, match="do not contract"):
        mdot.prequantized_matmul(_normal(49, (4, 16)), q)


# --------------------------------------------------------------------------- residuals, scale formats


def _residual_dtypes(recipe, x, w):
    """(shape, dtype) of what the backward pass keeps: the leaves of the vjp function."""
    _, vjp = jax.vjp(lambda a, b: mdot.dot_general(a, b, MK_KN, recipe=recipe), x, w)
    return [(tuple(v.shape), jnp.dtype(v.dtype)) for v in jax.tree_util.tree_leaves(vjp)]


@pytest.mark.parametrize("recipe_cls", [recipes.DeepSeekV3, recipes.CurrentScaling])
def test_backward_keeps_fp8_operands_not_the_input(recipe_cls):
    x, w = _normal(40, (256, 256)), _normal(41, (256, 128))
    fp8 = _residual_dtypes(recipe_cls(), x, w)
    assert (x.shape, jnp.dtype(jnp.float8_e4m3fn)) in fp8 and (x.shape, jnp.dtype(jnp.float32)) not in fp8
    assert (w.shape, jnp.dtype(jnp.float8_e4m3fn)) in fp8
    old = _residual_dtypes(recipe_cls(fp8_residuals=False), x, w)
    assert (x.shape, jnp.dtype(jnp.float32)) in old


@pytest.mark.parametrize("recipe_cls", [recipes.DeepSeekV3, recipes.CurrentScaling, recipes.DelayedScaling,
                                        recipes.StaticScaling])
def test_every_recipe_spells_power_of_two_scales_as_ue8m0_and_unknown_scale_formats_fail(recipe_cls):
    assert mdot.plan(recipe_cls(scale_format="ue8m0")).fprop_lhs.pow2
    assert not mdot.plan(recipe_cls()).fprop_lhs.pow2
    with pytest.raises(ValueError, match=r"scale_format must be one of \('f32', 'ue8m0', 'ue8m3'\); got 'e8m3'"):
        recipe_cls(scale_format="e8m3")


def test_ue8m3_scales_fold_exactly_into_bf16():
    ue8m3 = mdot.plan(recipes.DeepSeekV3(scale_format="ue8m3")).fprop_lhs
    assert ue8m3.scale_format == "ue8m3" and not ue8m3.pow2 and ue8m3.folds_exactly
    grid, scale = backends.quantize_parts(_normal(45, (8, 256)), ue8m3)
    values, _, block_scales = backends.from_grid(grid, scale, ue8m3, "upcast_bf16")
    assert block_scales is None and values.dtype == jnp.bfloat16  # folded: one bf16 GEMM


@pytest.mark.parametrize("scale_format", ["f32", "ue8m3"])
def test_exact_block_scales_match_the_float64_product_of_the_dequantized_operands(scale_format):
    """DeepSeekV3 with float scales (K-group partial sums) or ue8m3 scales (folded into
    bf16): f32 rounding only (<= 1e-5 of max|y|), forward and gradients."""
    m, k, n = 256, 512, 384
    x, w, g = _normal(42, (m, k), 3.0), _normal(43, (k, n), 0.05), _normal(44, (m, n))
    recipe = recipes.DeepSeekV3(scale_format=scale_format)
    y, d_x, d_w = _value_and_grads(_quantized(MK_KN, recipe), x, w, g)
    dq = lambda v, block: np.asarray(mpx.dequantize(mpx.quantize(v, "e4m3", mpx.Blocks(block),  # noqa: E731
                                                                 scale_format=scale_format)), np.float64)
    xq, wq = dq(x, (1, 128)), dq(w, (128, 128))
    x_w = dq(jnp.asarray(xq, jnp.float32), (128, 1))  # wgrad requantizes the stored operand
    for got, want in ((y, xq @ wq), (d_x, dq(g, (1, 128)) @ wq.T), (d_w, x_w.T @ dq(g, (128, 1)))):
        err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
        assert err <= 1e-5, err


def _cpu(**sizes) -> mpx.target.Target:
    """The CPU target with other chunk sizes."""
    return mpx.target.Target("cpu", **sizes)


def _deepseek_dot(out_dtype=jnp.float32, target=None):
    """A jitted DeepSeekV3 product for `target`."""
    return jax.jit(lambda a, b: mdot.dot_general(a, b, MK_KN, recipe=recipes.DeepSeekV3(),
                                                 preferred_element_type=out_dtype, target=target))


def test_many_rows_run_in_chunks_with_the_same_bits():
    """Float block scales over several K groups: rows in chunks (forward, dgrad and
    wgrad's lhs^T rows) give the bits of one pass."""
    x, w, g = _normal(46, (512, 256), 2.0), _normal(47, (256, 384), 0.05), _normal(48, (512, 384))
    whole = _value_and_grads(_quantized(MK_KN, recipes.DeepSeekV3(), target=_cpu(row_chunk=4096)), x, w, g)
    assert backends._row_chunks(512, 1, (1, 1, 128), 2, 128) == 4
    chunked = _value_and_grads(_quantized(MK_KN, recipes.DeepSeekV3(), target=_cpu(row_chunk=128)), x, w, g)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_chunked_rows_hold_less_than_one_f32_result():
    """Without chunks the running sum and a group's partial sums are two f32 results;
    in chunks of 256 rows the whole product needs less than one."""
    m, n = 2048, 512
    x, w = jnp.ones((m, 256), jnp.bfloat16), jnp.ones((256, n), jnp.float32)

    def temp(rows):
        fn = _deepseek_dot(jnp.bfloat16, _cpu(row_chunk=rows))
        return fn.lower(x, w).compile().memory_analysis().temp_size_in_bytes

    assert temp(4096) >= 2 * m * n * 4
    assert temp(256) < m * n * 4


def _wgrad_fn(x, g, target=None):
    """d_w of a DeepSeekV3 product with bf16 output, as a function of w."""

    def wgrad(w):
        _, vjp = jax.vjp(lambda w: mdot.dot_general(x, w, MK_KN, recipe=recipes.DeepSeekV3(),
                                                     preferred_element_type=jnp.bfloat16, target=target), w)
        return vjp(g)[0]

    return jax.jit(wgrad)


def test_wgrad_over_many_token_groups_runs_in_column_chunks_with_the_same_bits():
    """Past MAX_SCANNED_GROUPS token groups wgrad is one f32 GEMM of dequantized operands;
    dY's columns in chunks give its bits, exact to f32 rounding."""
    t, k, n = 128 * (backends.MAX_SCANNED_GROUPS + 1), 256, 512
    x, w, g = _normal(49, (t, k), 2.0), _normal(50, (k, n), 0.05), _normal(51, (t, n)).astype(jnp.bfloat16)
    whole = _wgrad_fn(x, g, _cpu(col_chunk=1 << 20))(w)
    chunked = _wgrad_fn(x, g, _cpu(col_chunk=128))(w)
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(chunked))
    def dq(v, block):
        return np.asarray(mpx.dequantize(mpx.quantize(v, "e4m3", mpx.Blocks(block))), np.float64)

    x_w = dq(jnp.asarray(dq(x, (1, 128)), jnp.float32), (128, 1))  # wgrad requantizes the stored operand
    want = x_w.T @ dq(g.astype(jnp.float32), (128, 1))
    assert np.max(np.abs(np.asarray(chunked, np.float64) - want)) / np.max(np.abs(want)) <= 1e-5


def test_wgrad_column_chunks_hold_less_than_the_whole_f32_gradient():
    """Whole, wgrad dequantizes all of dY into f32; in chunks of 256 columns the whole
    backward pass needs less than that one buffer."""
    t, k, n = 128 * (backends.MAX_SCANNED_GROUPS + 1), 256, 2048
    x, w, g = jnp.ones((t, k), jnp.bfloat16), jnp.ones((k, n), jnp.float32), jnp.ones((t, n), jnp.bfloat16)
    temp = lambda cols: _wgrad_fn(x, g, _cpu(col_chunk=cols)).lower(w).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
    assert temp(1 << 20) >= t * n * 4
    assert temp(256) < t * n * 4
