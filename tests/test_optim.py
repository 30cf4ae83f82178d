"""Tests for mpx.optim: low-precision Adam, loss scaling, skipping, clipping,
microbatch accumulation, master-weight casts, memory report and `build`."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpx.optim as mo
from mpx import formats
from models.precision import role_of

F32_EPS = float(jnp.finfo(jnp.float32).eps)
BF16_HALF_ULP = formats.get("bf16").half_ulp


def _normal(rng, shape, scale=1.0):
    # numpy draws: eager jax.random would compile a kernel per shape (seconds of test time)
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32))


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": _normal(rng, (8, 16)), "b": _normal(rng, (16,)),
            "step": jnp.zeros([], jnp.int32)}


def _float_params(seed=0):
    p = _params(seed)
    del p["step"]
    return p


def _grads(params, i, scale=1.0):
    rng = np.random.default_rng(1000 + i)
    return jax.tree.map(lambda p: _normal(rng, p.shape, scale), params)


def _bytes(x) -> np.ndarray:
    return np.asarray(x).reshape(-1).view(np.uint8)


def _bits_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(_bytes(x), _bytes(y)) for x, y in zip(la, lb))


def _run(tx, params, steps, jit=True, grad_scale=1.0):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for i in range(steps):
        updates, state = update(_grads(params, i, grad_scale), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


# ------------------------------------------------------------------------------ adam


def test_adamw_f32_moments_match_optax_bit_for_bit_under_jit():
    params = _float_params()
    schedule = optax.linear_schedule(1e-2, 1e-3, 5)
    mask = mo.matrices_only
    ours = mo.adamw(schedule, weight_decay=0.1, mu_dtype=jnp.float32, nu_dtype=jnp.float32, mask=mask)
    ref = optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask)
    p1, s1 = _run(ours, params, 6)
    p2, s2 = _run(ref, params, 6)
    assert _bits_equal(p1, p2)
    assert _bits_equal(s1[0].mu, s2[0].mu) and _bits_equal(s1[0].nu, s2[0].nu)


def test_adam_f32_eager_within_a_few_roundings_of_optax():
    params = _float_params()
    p1, _ = _run(mo.adam(1e-2, mu_dtype=jnp.float32, nu_dtype=jnp.float32), params, 2, jit=False)
    p2, _ = _run(optax.adam(1e-2, b1=0.9, b2=0.95), params, 2, jit=False)
    # Eagerly optax jits its bias correction, which may round differently (last bits).
    # Per step: an update of size <= ~lr off by a few roundings, and the parameter's
    # own rounding when the update is added (one ulp of |p|).
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        atol = 2 * (1e-2 * 8 * F32_EPS + F32_EPS * float(jnp.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_moment_dtypes_are_as_requested():
    params = _params()
    for mu_dtype, nu_dtype in [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16),
                               (jnp.float16, jnp.bfloat16)]:
        tx = mo.adamw(1e-3, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
        state = tx.update(_grads(params, 0), tx.init(params), params)[1][0]
        assert state.count.dtype == jnp.int32 and int(state.count) == 1
        assert {x.dtype for x in jax.tree.leaves(state.mu)} == {jnp.dtype(mu_dtype)}
        assert {x.dtype for x in jax.tree.leaves(state.nu)} == {jnp.dtype(nu_dtype)}


def test_bf16_moments_stay_within_bf16_rounding_of_f32_moments():
    params = _float_params()
    steps = 8
    _, low = _run(mo.scale_by_adam(), params, steps)
    _, high = _run(mo.scale_by_adam(mu_dtype=jnp.float32, nu_dtype=jnp.float32), params, steps)
    # nu is a convex combination of non-negative terms: each step keeps the previous
    # relative error and adds one bf16 rounding, so after N steps it is <= N half-ulps.
    for lo, hi in zip(jax.tree.leaves(low.nu), jax.tree.leaves(high.nu)):
        rel = jnp.abs(lo.astype(jnp.float32) - hi) / hi
        assert float(rel.max()) <= steps * BF16_HALF_ULP * (1 + 1e-3)
    # mu's absolute error: err_t <= b1 err_{t-1} + half_ulp |mu_t| <= N half_ulp max|mu|.
    for lo, hi in zip(jax.tree.leaves(low.mu), jax.tree.leaves(high.mu)):
        bound = steps * BF16_HALF_ULP * float(jnp.abs(hi).max()) * 2
        assert float(jnp.abs(lo.astype(jnp.float32) - hi).max()) <= bound


def test_update_math_is_f32_given_a_bf16_state():
    params = _float_params()
    tx = mo.scale_by_adam()
    _, state = _run(tx, params, 3)
    grads = _grads(params, 7)
    ours, _ = jax.jit(tx.update)(grads, state)
    ref_state = optax.ScaleByAdamState(count=state.count, mu=jax.tree.map(lambda x: x.astype(jnp.float32), state.mu),
                                       nu=jax.tree.map(lambda x: x.astype(jnp.float32), state.nu))
    ref, _ = jax.jit(optax.scale_by_adam(0.9, 0.95, 1e-8).update)(grads, ref_state)
    assert {x.dtype for x in jax.tree.leaves(ours)} == {jnp.dtype(jnp.float32)}
    assert _bits_equal(ours, ref)


def test_bf16_nu_keeps_updates_finite_for_extreme_grads():
    params = _float_params()
    tx = mo.scale_by_adam()
    update = jax.jit(tx.update)
    for scale in [0.0, 1e-30, 1e-12, 1e18]:
        state = tx.init(params)
        for i in range(3):
            updates, state = update(_grads(params, i, scale), state)
            assert bool(mo.all_finite(updates)) and bool(mo.all_finite(state)), scale


def test_store_saturates_instead_of_rounding_to_inf():
    from mpx.optim.optimizers import store
    big = jnp.array([3.3999e38, -3.3999e38, jnp.inf, jnp.nan], jnp.float32)
    out = store(big, jnp.bfloat16).astype(jnp.float32)
    bf16_max = float(jnp.finfo(jnp.bfloat16).max)
    assert out[:2].tolist() == [bf16_max, -bf16_max]
    assert jnp.isinf(out[2]) and jnp.isnan(out[3])
    assert big.astype(jnp.bfloat16)[0] == jnp.inf  # what a plain cast would have done


def test_warns_when_decay_is_below_bf16_resolution():
    with pytest.warns(UserWarning, match="b2"):
        mo.adam(1e-3, b2=0.999)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mo.adam(1e-3, b2=0.999, nu_dtype=jnp.float32)
        mo.adam(1e-3, b2=0.95)


@pytest.mark.parametrize("kwargs", [dict(b1=1.0), dict(b2=-0.1), dict(eps=0.0),
                                    dict(mu_dtype=jnp.float8_e4m3fn), dict(nu_dtype=jnp.int32)])
def test_adam_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        mo.adam(1e-3, **kwargs)


# ------------------------------------------------------------------------ loss scale


def test_all_finite():
    assert bool(mo.all_finite({"a": jnp.ones(3), "i": jnp.arange(3), "flag": jnp.array(True)}))
    assert bool(mo.all_finite({}))
    assert not bool(mo.all_finite([jnp.ones(3), jnp.array([1.0, jnp.nan])]))
    assert not bool(mo.all_finite([jnp.array([jnp.inf], jnp.bfloat16)]))
    assert mo.all_finite([jnp.ones(2)]).dtype == jnp.bool_


def test_dynamic_loss_scale_grows_after_period_and_shrinks_on_overflow():
    ls = mo.dynamic_loss_scale(8.0, period=3, factor=2.0)
    adjust = jax.jit(lambda s, f: s.adjust(f))
    scales = []
    for finite in [True, True, True, True, False, True]:
        ls = adjust(ls, jnp.array(finite))
        scales.append((float(ls.loss_scale), int(ls.counter)))
    assert scales == [(8.0, 1), (8.0, 2), (16.0, 0), (16.0, 1), (8.0, 0), (8.0, 1)]


def test_dynamic_loss_scale_respects_bounds():
    ls = mo.dynamic_loss_scale(4.0, period=1, min_loss_scale=2.0, max_loss_scale=8.0)
    for _ in range(5):
        ls = ls.adjust(jnp.array(True))
    assert float(ls.loss_scale) == 8.0
    for _ in range(5):
        ls = ls.adjust(jnp.array(False))
    assert float(ls.loss_scale) == 2.0


def test_dynamic_loss_scale_never_reaches_inf_or_zero_under_adversarial_steps():
    f32_max = float(jnp.finfo(jnp.float32).max)
    ls = mo.dynamic_loss_scale(1.0, period=1, factor=4.0, min_loss_scale=2.0**-100,
                               max_loss_scale=f32_max)
    pattern = jnp.asarray(np.random.default_rng(0).random(1000) < 0.5)
    # 1000 steps: runs of finite steps (grow every step) and random overflow steps.
    finites = jnp.concatenate([jnp.ones(400, bool), jnp.zeros(300, bool), pattern[:300]])

    def body(state, finite):
        state = state.adjust(finite)
        return state, state.loss_scale

    final, history = jax.lax.scan(body, ls, finites)
    assert history.dtype == jnp.float32 and final.loss_scale.dtype == jnp.float32
    assert final.counter.dtype == jnp.int32
    assert bool(jnp.all(jnp.isfinite(history))) and bool(jnp.all(history > 0))
    assert float(history.max()) == f32_max and float(history.min()) == 2.0**-100


def test_loss_scale_scale_and_unscale_keep_dtypes():
    ls = mo.dynamic_loss_scale(2.0**10)
    loss16 = jnp.array(3.0, jnp.float16)
    assert ls.scale(loss16).dtype == jnp.float16 and float(ls.scale(loss16)) == 3072.0
    grads = {"a": jnp.full((3,), 2048.0, jnp.float16), "b": jnp.full((2,), 1024.0, jnp.float32)}
    un = ls.unscale(grads)
    assert un["a"].dtype == jnp.float16 and un["b"].dtype == jnp.float32
    assert un["a"].tolist() == [2.0] * 3 and un["b"].tolist() == [1.0] * 2
    assert ls.adjust(mo.all_finite(un)).loss_scale.dtype == jnp.float32


def test_static_and_noop_loss_scales_share_the_interface():
    st = mo.static_loss_scale(4.0)
    assert float(st.scale(jnp.float32(2.0))) == 8.0 and float(st.unscale(jnp.float32(8.0))) == 2.0
    assert st.adjust(jnp.array(False)) is st
    noop = mo.NoOpLossScale()
    x = {"g": jnp.ones(2)}
    assert noop.scale(x) is x and noop.unscale(x) is x and noop.adjust(jnp.array(False)) is noop
    assert float(noop.loss_scale) == 1.0 and jax.tree.leaves(noop) == []


def test_loss_scales_are_pytrees_with_static_hyperparameters():
    ls = mo.dynamic_loss_scale(16.0, period=7, factor=3.0)
    leaves, treedef = jax.tree.flatten(ls)
    assert len(leaves) == 2
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt.period == 7 and rebuilt.factor == 3.0
    assert jax.tree.leaves(mo.static_loss_scale(2.0))[0].dtype == jnp.float32


@pytest.mark.parametrize("kwargs", [dict(initial=0.5), dict(factor=1.0), dict(period=0),
                                    dict(min_loss_scale=0.0), dict(max_loss_scale=float("inf")),
                                    dict(min_loss_scale=4.0, max_loss_scale=2.0, initial=3.0)])
def test_dynamic_loss_scale_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        mo.dynamic_loss_scale(**kwargs)


def test_static_loss_scale_rejects_zero():
    with pytest.raises(ValueError, match="finite and > 0"):
        mo.static_loss_scale(0.0)


# -------------------------------------------------------------------- skip_nonfinite


def test_skipped_step_leaves_params_and_moments_bit_identical():
    params = _float_params()
    tx = mo.skip_nonfinite(mo.adamw(optax.linear_schedule(1e-2, 0.0, 10), weight_decay=0.1))
    params, state = _run(tx, params, 3)
    bad = _grads(params, 5)
    bad["w"] = bad["w"].at[2, 3].set(jnp.nan)
    updates, new_state = jax.jit(tx.update)(bad, state, params)
    new_params = optax.apply_updates(params, updates)
    assert _bits_equal(new_params, params)
    assert _bits_equal(new_state.inner_state, state.inner_state)
    assert (int(new_state.skipped), int(new_state.total), bool(new_state.last_finite)) == (1, 4, False)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


def test_finite_step_passes_inner_through_unchanged():
    params = _float_params()
    inner = mo.adamw(1e-2)
    p1, s1 = _run(mo.skip_nonfinite(inner), params, 3)
    p2, s2 = _run(inner, params, 3)
    assert _bits_equal(p1, p2) and _bits_equal(s1.inner_state, s2)
    assert (int(s1.skipped), int(s1.total)) == (0, 3)


def test_skip_catches_nonfinite_updates_from_finite_grads():
    # The inner transformation overflows: finite grads, infinite updates.
    inner = optax.scale(3.0e38)
    tx = mo.skip_nonfinite(inner)
    grads = {"x": jnp.array([1.0, 2.0])}
    updates, state = tx.update(grads, tx.init(grads))
    assert updates["x"].tolist() == [0.0, 0.0] and int(state.skipped) == 1


# ------------------------------------------------------------------------- clipping


def test_global_norm_accumulates_bf16_in_f32():
    tree = [jnp.full((1000,), 0.01, jnp.bfloat16), jnp.array([3.0, 4.0], jnp.bfloat16)]
    expected = math.sqrt(1000 * float(jnp.bfloat16(0.01)) ** 2 + 25.0)
    norm = mo.global_norm(tree)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(float(norm), expected, rtol=4 * F32_EPS)


def test_clip_by_global_norm_matches_optax_and_keeps_small_grads():
    grads = _grads(_float_params(), 0)
    norm = float(mo.global_norm(grads))
    clip = jax.jit(lambda g, max_norm: mo.clip_by_global_norm(max_norm).update(g, optax.EmptyState())[0],
                   static_argnums=1)
    clipped = clip(grads, norm / 4)
    ref, _ = optax.clip_by_global_norm(norm / 4).update(grads, optax.EmptyState())
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=4 * F32_EPS, atol=0)
    np.testing.assert_allclose(float(mo.global_norm(clipped)), norm / 4, rtol=8 * F32_EPS)
    assert _bits_equal(clip(grads, 2 * norm), grads)
    low = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
    assert {x.dtype for x in jax.tree.leaves(clip(low, norm / 4))} == {jnp.dtype(jnp.bfloat16)}


def test_clip_adaptive_warmup_then_clips_spikes_to_factor_times_ema():
    tx = mo.clip_adaptive(factor=2.0, decay=0.9, warmup_steps=3)
    state = tx.init(None)
    update = jax.jit(tx.update)
    unit = {"g": jnp.array([3.0, 4.0])}  # norm 5
    for _ in range(3):
        out, state = update(unit, state)
        assert _bits_equal(out, unit)
    assert int(state.count) == 3
    np.testing.assert_allclose(float(state.ema / (1 - 0.9**3)), 5.0, rtol=8 * F32_EPS)
    spike = {"g": jnp.array([300.0, 400.0])}  # norm 500, threshold 2 * 5 = 10
    out, state = update(spike, state)
    np.testing.assert_allclose(float(mo.global_norm(out)), 10.0, rtol=8 * F32_EPS)
    # The EMA was fed the clipped norm (10), not the spike (500).
    corrected = float(state.ema / (1 - 0.9**4))
    expected = (0.9 * 5.0 * (1 - 0.9**3) + 0.1 * 10.0) / (1 - 0.9**4)
    np.testing.assert_allclose(corrected, expected, rtol=16 * F32_EPS)


def test_clip_adaptive_ignores_nonfinite_norms_in_its_state():
    tx = mo.clip_adaptive(warmup_steps=1)
    _, state = tx.update({"g": jnp.ones(2)}, tx.init(None))
    out, new_state = tx.update({"g": jnp.array([jnp.nan, 1.0])}, state)
    assert _bits_equal(new_state, state) and bool(jnp.isnan(out["g"][0]))


@pytest.mark.parametrize("kwargs", [dict(factor=1.0), dict(decay=1.0), dict(warmup_steps=0)])
def test_clip_adaptive_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        mo.clip_adaptive(**kwargs)


# ----------------------------------------------------------------------- accumulate


def _regression():
    rng = np.random.default_rng(3)
    params = {"w": _normal(rng, (4, 3)), "b": jnp.zeros(3)}
    batch = {"x": _normal(rng, (12, 4)), "y": _normal(rng, (12, 3))}

    def loss_fn(p, b):
        pred = b["x"] @ p["w"] + p["b"]
        err = pred - b["y"]
        aux = {"metrics": {"mse": jnp.mean(err**2), "n": jnp.array(b["x"].shape[0], jnp.int32)},
               "amax": {"x": jnp.max(jnp.abs(b["x"])), "y": jnp.max(jnp.abs(b["y"]))}}
        return jnp.mean(err**2), aux

    return params, batch, loss_fn


def test_accumulated_grads_equal_full_batch_grads():
    params, batch, loss_fn = _regression()
    (full_loss, _), full_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    micro = mo.split_microbatches(batch, 4)
    vg = jax.value_and_grad(lambda p, b: loss_fn(p, b)[0])
    loss, grads = jax.jit(lambda p, m: mo.accumulate_gradients(vg, p, m))(params, micro)
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=16 * F32_EPS)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(a, b, rtol=32 * F32_EPS, atol=32 * F32_EPS * float(jnp.abs(b).max()))


def test_accumulate_merges_metrics_by_mean_and_amax_by_max():
    params, batch, loss_fn = _regression()
    micro = mo.split_microbatches(batch, 3)
    vg = jax.value_and_grad(loss_fn, has_aux=True)
    merge = {"metrics": {"mse": "mean", "n": "sum"}, "amax": "max"}
    (loss, aux), _ = mo.accumulate_gradients(vg, params, micro, has_aux=True, aux_merge=merge)
    per_mb = [loss_fn(params, jax.tree.map(lambda x, i=i: x[i], micro))[1] for i in range(3)]
    np.testing.assert_allclose(float(aux["metrics"]["mse"]), float(loss), rtol=16 * F32_EPS)
    assert int(aux["metrics"]["n"]) == 12 and aux["metrics"]["n"].dtype == jnp.int32
    assert float(aux["amax"]["x"]) == float(jnp.max(jnp.abs(batch["x"])))
    assert float(aux["amax"]["y"]) == max(float(a["amax"]["y"]) for a in per_mb)


def test_accumulate_callable_merge_sees_stacked_aux():
    params, batch, loss_fn = _regression()
    micro = mo.split_microbatches(batch, 3)
    vg = jax.value_and_grad(loss_fn, has_aux=True)
    seen = {}

    def merge_amax(stacked):
        seen["shape"] = stacked["x"].shape
        return jax.tree.map(lambda a: a[-1], stacked)

    merge = {"metrics": "last", "amax": merge_amax}
    (_, aux), _ = mo.accumulate_gradients(vg, params, micro, has_aux=True, aux_merge=merge)
    last = loss_fn(params, jax.tree.map(lambda x: x[-1], micro))[1]
    assert seen["shape"] == (3,)
    assert float(aux["amax"]["x"]) == float(last["amax"]["x"])
    assert float(aux["metrics"]["mse"]) == float(last["metrics"]["mse"])


def test_accumulate_sums_low_precision_grads_in_f32():
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    micro = {"x": jnp.stack([jnp.full((3,), 1.0), jnp.full((3,), 2.0 ** -9)])}

    def loss_and_grad(p, mb):  # bf16 grads whose sum needs more than 8 bits
        return jnp.float32(0), {"w": mb["x"].astype(jnp.bfloat16)}

    _, grads = mo.accumulate_gradients(loss_and_grad, params, micro)
    assert grads["w"].dtype == jnp.float32
    assert grads["w"].tolist() == [(1.0 + 2.0 ** -9) / 2] * 3


def test_accumulate_and_split_reject_bad_inputs():
    vg = lambda p, b: (jnp.float32(0), p)
    with pytest.raises(ValueError, match="leading"):
        mo.accumulate_gradients(vg, {"w": jnp.ones(2)}, {"a": jnp.ones((2, 1)), "b": jnp.ones((3, 1))})
    with pytest.raises(ValueError, match="unknown aux_merge mode 'median'"):
        mo.accumulate_gradients(lambda p, b: ((jnp.float32(0), b), p), {"w": jnp.ones(2)},
                                jnp.ones((2, 1)), has_aux=True, aux_merge="median")
    with pytest.raises(ValueError, match="not a prefix"):
        mo.accumulate_gradients(lambda p, b: ((jnp.float32(0), {"a": b}), p), {"w": jnp.ones(2)},
                                jnp.ones((2, 1)), has_aux=True, aux_merge={"b": "max"})
    with pytest.raises(ValueError, match="cannot be split"):
        mo.split_microbatches({"x": jnp.ones((10, 2))}, 3)


# -------------------------------------------------------------------- master weights


def test_cast_params_casts_floats_only_and_grads_arrive_in_f32():
    params = _params()
    low = mo.cast_params(params, jnp.bfloat16)
    assert low["w"].dtype == jnp.bfloat16 and low["step"].dtype == jnp.int32

    def loss(masters):
        p = mo.cast_params(masters, jnp.bfloat16)
        return jnp.sum((p["w"] @ p["b"]).astype(jnp.float32) ** 2)

    grads = jax.grad(loss)(_float_params())
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_cast_params_per_path_function():
    params = {"layers_0": {"attn": {"kernel": jnp.ones((2, 2))}, "norm": {"scale": jnp.ones(2)}}}
    seen = []

    def choose(path, leaf):
        seen.append(path)
        return None if "norm" in path else jnp.bfloat16

    out = mo.cast_params(params, choose)
    assert sorted(seen) == ["layers_0/attn/kernel", "layers_0/norm/scale"]
    assert out["layers_0"]["attn"]["kernel"].dtype == jnp.bfloat16
    assert out["layers_0"]["norm"]["scale"].dtype == jnp.float32


def test_cast_params_refuses_unscaled_fp8_and_non_floats():
    with pytest.raises(ValueError, match="mpx.quantize"):
        mo.cast_params(_params(), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="float dtype"):
        mo.cast_params(_params(), jnp.int8)


# ------------------------------------------------------------------------ memory


def test_memory_report_arithmetic_on_known_tree():
    params = {"w": jnp.zeros((100, 40)), "b": jnp.zeros((40,)), "step": jnp.zeros([], jnp.int32)}
    n = 100 * 40 + 40
    opt_state = mo.adamw(1e-3).init(params)  # bf16 mu and nu (+ int32 count)
    scales = {"amax_history": jnp.zeros((16,)), "scale": jnp.zeros([])}
    report = mo.memory_report(params, opt_state, compute_dtype_bytes=1.0, scale_state=scales)
    # the int32 `step` leaf gets bf16 moments too (zeros of its shape): 2 B each
    assert report.num_params == n
    assert report.master == 4 * n + 4
    assert report.gradients == 4 * n
    assert report.optimizer == 2 * 2 * (n + 1) + 4
    assert report.scale_state == 17 * 4
    assert report.compute_copy == n
    assert report.total == report.master + report.gradients + report.optimizer + report.scale_state
    assert report.total_with_compute_copy == report.total + n
    assert abs(report.per_param() - 12.0) < 0.05
    table = str(report)
    assert "master weights" in table and "compute copy (transient)" in table
    with pytest.raises(ValueError, match="unknown category"):
        report.per_param("activations")


def test_memory_report_from_shapes_equals_from_arrays():
    params = _float_params()
    tx = mo.build("adamw", 1e-3)
    shapes = jax.eval_shape(lambda: (params, tx.init(params)))
    assert mo.memory_report(*shapes) == mo.memory_report(params, tx.init(params))


def test_memory_per_param_for_f32_and_bf16_moments():
    params = {"w": jnp.zeros((256, 256))}
    f32 = mo.memory_report(params, mo.adamw(1e-3, mu_dtype=jnp.float32, nu_dtype=jnp.float32).init(params))
    bf16 = mo.memory_report(params, mo.adamw(1e-3).init(params))
    assert round(f32.per_param(), 3) == 16.0 and round(bf16.per_param(), 3) == 12.0


# ------------------------------------------------------------------------- build


def test_build_rejects_unknown_names_listing_allowed():
    with pytest.raises(ValueError, match="adamw, adam, sgd"):
        mo.build("lamb")
    with pytest.raises(ValueError, match="constant, cosine, linear"):
        mo.build("adamw", schedule="step")
    with pytest.raises(ValueError, match="total_steps"):
        mo.build("adamw", schedule="cosine", warmup_steps=10)
    with pytest.raises(ValueError, match="weight_decay"):
        mo.build("adam", weight_decay=0.1)


def test_warmup_cosine_schedule_endpoints():
    sched = mo.warmup_cosine(1.0, 10, 110, final_ratio=0.1)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose([float(sched(10)), float(sched(60)), float(sched(110))],
                               [1.0, 0.55, 0.1], rtol=8 * F32_EPS)
    linear = mo.make_schedule(2.0, "constant", warmup_steps=4)
    np.testing.assert_allclose([float(linear(2)), float(linear(100))], [1.0, 2.0])


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_build_trains_a_quadratic_and_skips_nan_steps(name):
    target = jnp.linspace(-1.0, 1.0, 8)
    params = {"x": jnp.zeros(8)}
    tx = mo.build(name, 0.1, schedule="cosine", warmup_steps=2, total_steps=60, clip_norm=1.0,
                  adaptive_clip={"factor": 3.0, "warmup_steps": 5}, moment_dtype="bf16",
                  weight_decay=0.0 if name == "adam" else 1e-4, mask=mo.matrices_only)
    loss = lambda p: jnp.sum((p["x"] - target) ** 2)

    @jax.jit
    def step(p, s, poison):
        g = jax.grad(loss)(p)
        g = jax.tree.map(lambda x: jnp.where(poison, jnp.nan, x), g)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    start = float(loss(params))
    for i in range(40):
        before = params
        params, state = step(params, state, jnp.array(i == 20))
        if i == 20:
            assert _bits_equal(before, params)
    assert float(loss(params)) < 0.05 * start
    assert int(state.skipped) == 1 and int(state.total) == 40
    moments = [x for x in jax.tree.leaves(state) if x.ndim == 1]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.bfloat16)}


def test_resolve_dtype_names():
    assert mo.resolve_dtype("bf16") == jnp.bfloat16
    assert mo.resolve_dtype("float32") == jnp.float32
    assert mo.resolve_dtype(jnp.float16) == jnp.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        mo.resolve_dtype("bfloat17")


def test_compute_copy_bytes_per_preset():
    import mpx
    up = lambda name: mpx.policy.preset(name).resolve("layers_0/mlp/up", role_of("layers_0/mlp/up"))  # noqa: E731
    assert mpx.optim.compute_copy_bytes(up("fp32")) == 0.0  # the forward reads the f32 masters
    assert mpx.optim.compute_copy_bytes(up("bf16")) == 2.0
    assert mpx.optim.compute_copy_bytes(up("fp8")) == 1.0
