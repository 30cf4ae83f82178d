"""Tests for mpx.recipes: recipe validation, the amax history and microbatch merging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpx import formats, recipes, scaled


# --------------------------------------------------------------------------- recipes


def test_defaults_follow_the_design():
    current = recipes.CurrentScaling()
    assert (current.fwd_format, current.bwd_format, current.name) == ("e4m3", "e5m2", "current")
    delayed = recipes.DelayedScaling()
    assert (delayed.history, delayed.amax_algo, delayed.name) == (16, "max", "delayed")
    deepseek = recipes.DeepSeekV3()
    assert (deepseek.block, deepseek.fwd_format, deepseek.bwd_format) == (128, "e4m3", "e4m3")
    static = recipes.StaticScaling()
    assert static.amax_algo == "most_recent" and static.init_state().history.shape == (1,)


@pytest.mark.parametrize("make, match", [
    (lambda: recipes.DelayedScaling(history=0), "history.*0"),
    (lambda: recipes.DelayedScaling(history=2.5), "history.*2.5"),
    (lambda: recipes.DelayedScaling(history=True), "history.*True"),
    (lambda: recipes.DelayedScaling(amax_algo="mean"), "most_recent.*'mean'"),
    (lambda: recipes.DelayedScaling(fwd_format="e9m9"), "fwd_format='e9m9'.*known formats"),
    (lambda: recipes.CurrentScaling(bwd_format="int8"), "bwd_format='int8'"),
    (lambda: recipes.StaticScaling(fwd_format="fp7"), "fwd_format='fp7'"),
    (lambda: recipes.DeepSeekV3(block=0), "block.*0"),
    (lambda: recipes.DeepSeekV3(bwd_format="nope"), "bwd_format='nope'"),
    (lambda: recipes.get("deepseek_v3", grad_format="e5m2"), r"no field 'grad_format' \(renamed: use bwd_format\)"),
    (lambda: recipes.get("fancy"), "'fancy'.*current.*delayed.*static.*deepseek_v3"),
    (lambda: recipes.init_history(0), "length.*0"),
])
def test_bad_arguments_raise_valueerror_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_get_by_name_and_passthrough():
    assert recipes.get("delayed", history=4) == recipes.DelayedScaling(history=4)
    assert recipes.get("deepseek_v3") == recipes.DeepSeekV3()
    r = recipes.CurrentScaling(margin=1.0)
    assert recipes.get(r) is r
    assert recipes.get(None) is None and recipes.get("none") is None
    assert recipes.is_stateful(recipes.DelayedScaling()) and recipes.is_stateful(recipes.StaticScaling())
    assert not recipes.is_stateful(recipes.CurrentScaling()) and not recipes.is_stateful(None)


def test_recipes_are_hashable_jit_static_arguments():
    f = jax.jit(lambda x, r: scaled.compute_scale(jnp.max(jnp.abs(x)), r.fwd_format, margin=r.margin),
                static_argnums=1)
    x = jnp.array([448.0, -896.0])
    assert float(f(x, recipes.DelayedScaling(history=3, margin=1.0))) == 4.0
    assert hash(recipes.DeepSeekV3()) == hash(recipes.DeepSeekV3())


# --------------------------------------------------------------------------- amax history


def test_init_history_is_zeros_of_the_length():
    h = recipes.init_history(3)
    assert h.history.shape == (3,) and h.history.dtype == jnp.float32 and not np.asarray(h.history).any()
    assert recipes.DelayedScaling(history=5).init_state().history.shape == (5,)


def test_update_history_is_pure_most_recent_first_and_bounded():
    h0 = recipes.init_history(3)
    h1 = recipes.update_history(h0, jnp.float32(1.0))
    h2 = recipes.update_history(h1, 2.0)
    h3 = recipes.update_history(h2, jnp.array([3.0]))
    h4 = recipes.update_history(h3, jnp.float32(4.0))
    np.testing.assert_array_equal(np.asarray(h0.history), [0, 0, 0])  # inputs untouched
    np.testing.assert_array_equal(np.asarray(h2.history), [2, 1, 0])
    np.testing.assert_array_equal(np.asarray(h4.history), [4, 3, 2])  # the oldest (1) dropped out
    jitted = jax.jit(recipes.update_history)(h3, jnp.float32(4.0))
    np.testing.assert_array_equal(np.asarray(jitted.history), np.asarray(h4.history))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        recipes.update_history(h0, jnp.array([1.0, 2.0]))


def test_history_is_a_pytree():
    h = recipes.update_history(recipes.init_history(2), 5.0)
    leaves = jax.tree_util.tree_leaves(h)
    assert len(leaves) == 1
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, h)
    assert isinstance(doubled, recipes.AmaxHistory)
    np.testing.assert_array_equal(np.asarray(doubled.history), [10.0, 0.0])


def test_history_amax_algorithms():
    h = recipes.init_history(4)
    for amax in (1.0, 7.0, 3.0):
        h = recipes.update_history(h, amax)
    assert float(recipes.history_amax(h, "max")) == 7.0
    assert float(recipes.history_amax(h, "most_recent")) == 3.0
    with pytest.raises(ValueError, match="'median'"):
        recipes.history_amax(h, "median")


@pytest.mark.parametrize("algo, margin, pow2", [("max", 0.0, False), ("most_recent", 1.0, False), ("max", 0.0, True)])
def test_delayed_scale_uses_the_history(algo, margin, pow2):
    h = recipes.init_history(4)
    for amax in (100.0, 300.0, 50.0):
        h = recipes.update_history(h, amax)
    got = recipes.delayed_scale(h, "e4m3", algo=algo, margin=margin, pow2=pow2, current_amax=1e6)
    want = scaled.compute_scale(recipes.history_amax(h, algo), "e4m3", margin=margin, pow2=pow2)
    assert float(got) == float(want)  # the current amax is ignored once the history has data
    amax = {"max": 300.0, "most_recent": 50.0}[algo]
    if pow2:
        assert float(got) == 1.0  # 300 / 448 rounds up to 2**0
    else:
        np.testing.assert_allclose(float(got), amax * 2.0**margin / 448.0, rtol=np.finfo(np.float32).eps)


def test_empty_history_falls_back_to_current_amax():
    h = recipes.init_history(4)
    got = recipes.delayed_scale(h, "e5m2", current_amax=jnp.float32(57344.0 * 4))
    assert float(got) == 4.0
    # Without a current amax an empty history gives the zero-amax scale: 1.
    assert float(recipes.delayed_scale(h, "e5m2")) == 1.0


def test_delayed_scale_under_jit():
    fmt = formats.get("e4m3")
    step = jax.jit(lambda h, amax: (recipes.delayed_scale(h, fmt, current_amax=amax),
                                    recipes.update_history(h, amax)))
    h = recipes.init_history(2)
    scale1, h = step(h, jnp.float32(896.0))  # empty: just-in-time
    scale2, h = step(h, jnp.float32(44.8))  # history max 896 wins
    assert float(scale1) == 2.0 and float(scale2) == 2.0


# --------------------------------------------------------------------------- microbatches


def test_merge_amax_is_the_max_not_the_sum_nor_the_last():
    observations = [jnp.float32(2.0), jnp.float32(5.0), jnp.float32(1.0)]
    merged = float(recipes.merge_amax(*observations))
    assert merged == 5.0
    assert merged != sum(float(o) for o in observations) and merged != float(observations[-1])
    assert float(recipes.merge_amax(jnp.float32(3.0))) == 3.0
    assert np.isnan(float(recipes.merge_amax(jnp.float32(1.0), jnp.float32(np.nan))))  # never hidden
    with pytest.raises(ValueError, match="at least one"):
        recipes.merge_amax()


def test_merge_amax_trees_leafwise():
    a = {"q": jnp.float32(1.0), "mlp": {"up": jnp.float32(9.0)}}
    b = {"q": jnp.float32(4.0), "mlp": {"up": jnp.float32(2.0)}}
    merged = recipes.merge_amax_trees(a, b)
    assert float(merged["q"]) == 4.0 and float(merged["mlp"]["up"]) == 9.0


def test_microbatch_accumulation_under_scan():
    # Four microbatches with peaks 1, 8, 2, 3: the history records 8 once per step.
    peaks = jnp.array([1.0, 8.0, 2.0, 3.0])
    micro = jnp.ones((4, 16)) * peaks[:, None]
    body = lambda acc, x: (recipes.merge_amax(acc, jnp.max(jnp.abs(x))), None)
    step_amax, _ = jax.lax.scan(body, jnp.float32(0.0), micro)
    h = recipes.update_history(recipes.init_history(3), step_amax)
    np.testing.assert_array_equal(np.asarray(h.history), [8.0, 0.0, 0.0])
