"""DeepSeekMoE: routing against a transcription of DeepSeek-V3's router, sorted dispatch
against running each token through its own experts, the FP8 grouped matmul, balancing."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpx
from models import config as config_lib
from models import moe, transformer
from mpx.dot.ragged import prequantized_ragged_dot, ragged_dot

DS = config_lib.preset("deepseek_v3_tiny")


def _reference_route(logits, bias, c):
    """DeepSeek-V3's router (transformers' DeepseekV3TopkRouter), in numpy, token by token."""
    scores = 1 / (1 + np.exp(-logits))
    out_w, out_i = [], []
    for s in scores:
        choice = s + bias
        groups = choice.reshape(c.n_group, -1)
        group_score = np.sort(groups, axis=-1)[:, -2:].sum(-1)
        keep = np.argsort(-group_score, kind="stable")[:c.topk_group]
        masked = np.full_like(choice, -np.inf)
        for g in keep:
            masked[g * groups.shape[1]:(g + 1) * groups.shape[1]] = choice[g * groups.shape[1]:(g + 1) * groups.shape[1]]
        idx = np.argsort(-masked, kind="stable")[:c.top_k]
        w = s[idx] / (s[idx].sum() + 1e-20)
        out_w.append(w * c.routed_scaling_factor)
        out_i.append(idx)
    return np.array(out_w), np.array(out_i)


def test_route_is_deepseek_v3s_group_limited_sigmoid_router():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, DS.n_experts)).astype(np.float32)
    bias = rng.normal(scale=0.5, size=DS.n_experts).astype(np.float32)
    weights, experts, _ = moe.route(jnp.asarray(logits), DS, jnp.asarray(bias))
    ref_w, ref_i = _reference_route(logits, bias, DS)
    np.testing.assert_array_equal(np.sort(np.asarray(experts), -1), np.sort(ref_i, -1))
    order = np.argsort(np.asarray(experts), -1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order, -1),
                               np.take_along_axis(ref_w, np.argsort(ref_i, -1), -1), rtol=1e-6)
    # The bias picks experts but never weights them; it changes the choice here.
    unbiased = np.asarray(moe.route(jnp.asarray(logits), DS)[1])
    assert (np.sort(unbiased, -1) != np.sort(np.asarray(experts), -1)).any()


def test_group_limit_keeps_every_choice_inside_the_best_groups():
    logits = jax.random.normal(jax.random.key(1), (128, DS.n_experts))
    _, experts, _ = moe.route(logits, DS)
    per_group = DS.n_experts // DS.n_group
    groups = np.asarray(experts) // per_group
    assert max(len(set(row)) for row in groups) <= DS.topk_group
    greedy = dataclasses.replace(DS, topk_method="greedy")
    _, free, _ = moe.route(logits, greedy)  # ungrouped top-k sometimes spans more groups
    assert len({len(set(r)) for r in np.asarray(free) // per_group}) >= 1


def _model(cfg, policy="fp32"):
    model = transformer.Transformer(cfg, mpx.policy.preset(policy))
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, cfg.vocab_size)
    return model, model.init(jax.random.key(0), tokens), tokens


def _per_token_moe(params, h, cfg):
    """The MoE block's output computed token by token: its own experts only (f32)."""
    p = params["moe"]
    logits = h @ p["router"]["kernel"]
    weights, experts, _ = moe.route(logits, cfg, p["router"]["score_bias"])
    ex = p["experts"]
    out = []
    for t in range(h.shape[0]):
        acc = 0
        for w, e in zip(weights[t], experts[t]):
            hidden = jax.nn.silu(h[t] @ ex["gate"]["kernel"][e]) * (h[t] @ ex["up"]["kernel"][e])
            acc = acc + w * (hidden @ ex["down"]["kernel"][e])
        s = p["shared"]
        acc = acc + (jax.nn.silu(h[t] @ s["gate"]["kernel"]) * (h[t] @ s["up"]["kernel"])) @ s["down"]["kernel"]
        out.append(acc)
    return jnp.stack(out)


def test_sorted_dispatch_equals_running_each_token_through_its_own_experts():
    cfg = DS
    model, variables, _ = _model(cfg)
    block = variables["params"]["layers_1"]
    h = jax.random.normal(jax.random.key(3), (1, 40, cfg.d_model))
    out, aux = moe.MoE(cfg).apply({"params": block["moe"]}, h)
    np.testing.assert_allclose(out[0], _per_token_moe(block, h[0], cfg), rtol=2e-5, atol=2e-5)
    assert aux["expert_load"].shape == (cfg.n_experts,)
    assert float(jnp.sum(aux["expert_load"])) == pytest.approx(1.0)


def test_moe_model_trains_through_fp8_experts_and_its_selection_bias_has_no_gradient():
    model, variables, tokens = _model(DS, "fp8")
    grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens)[0] ** 2))(variables["params"])
    g = grads["layers_1"]["moe"]
    assert float(jnp.abs(g["router"]["score_bias"]).max()) == 0.0
    assert float(jnp.abs(g["experts"]["gate"]["kernel"]).max()) > 0
    assert float(jnp.abs(g["router"]["kernel"]).max()) > 0


def _grouped_inputs():
    k1, k2 = jax.random.split(jax.random.key(4))
    x = jax.random.normal(k1, (300, 256))
    w = jax.random.normal(k2, (4, 256, 192)) * 0.05
    return x, w, jnp.array([100, 0, 150, 40], jnp.int32)  # 290 of 300 rows in groups


@pytest.mark.parametrize("recipe", ["deepseek_v3", "current"])
def test_fp8_ragged_dot_is_fp8_forward_and_backward(recipe):
    x, w, gs = _grouped_inputs()
    ref = jax.lax.ragged_dot(x, w, gs, precision=jax.lax.Precision.HIGHEST)
    y = ragged_dot(x, w, gs, recipe=recipe, preferred_element_type=jnp.float32)
    err = float(mpx.metrics.relative_error(y, ref))
    # E4M3 has 3 mantissa bits: a few percent relative error, and clearly not f32's 1e-7.
    assert 5e-3 < err < 6e-2
    assert float(jnp.abs(y[290:]).max()) == 0.0  # rows past the groups stay zero
    # The forward is the product of the operands quantized as dot_general quantizes them.
    qx, qw = mpx.dot.quantized_operands(x, w[2], (((1,), (0,)), ((), ())), recipe=recipe)
    if recipe == "deepseek_v3":
        exact = mpx.dequantize(qx) @ mpx.dequantize(qw)
        np.testing.assert_allclose(y[100:250], exact[100:250], rtol=1e-4, atol=1e-4)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    gx, gw = jax.grad(loss(lambda a, b: ragged_dot(a, b, gs, recipe=recipe, preferred_element_type=jnp.float32)),
                      (0, 1))(x, w)
    rx, rw = jax.grad(loss(lambda a, b: jax.lax.ragged_dot(a, b, gs)), (0, 1))(x, w)
    for got, want in ((gx, rx), (gw, rw)):
        assert 5e-3 < float(mpx.metrics.relative_error(got, want)) < 8e-2
    assert float(jnp.abs(gw[1]).max()) == 0.0  # the empty group gets no weight gradient


def test_ragged_dot_without_a_recipe_is_jaxs_and_stateful_recipes_are_refused():
    x, w, gs = _grouped_inputs()
    np.testing.assert_array_equal(ragged_dot(x, w, gs), jax.lax.ragged_dot(x, w, gs))
    with pytest.raises(ValueError, match="stateless recipes.*'delayed'"):
        ragged_dot(x, w, gs, recipe="delayed")
    with pytest.raises(ValueError, match=re.escape("group_sizes must be (4,) integers")):
        ragged_dot(x, w, gs[:3])


def test_prequantized_ragged_dot_uses_the_stored_fp8_weights():
    x, w, gs = _grouped_inputs()
    q = mpx.quantize(w, "e4m3", mpx.Blocks((1, 128, 128)))
    y = prequantized_ragged_dot(x, q, gs, recipe="deepseek_v3")
    train = ragged_dot(x, w, gs, recipe="deepseek_v3", preferred_element_type=jnp.float32)
    np.testing.assert_allclose(y, train, rtol=1e-5, atol=1e-5)


def test_bias_update_moves_overloaded_experts_down_and_idle_ones_up():
    bias = jnp.zeros(4)
    load = jnp.array([0.5, 0.25, 0.25, 0.0])
    np.testing.assert_allclose(moe.bias_update(bias, load, 0.01), [-0.01, 0.0, 0.0, 0.01])
    metrics = moe.balance_metrics(load[None])
    assert float(metrics["moe_max_load"]) == 2.0 and float(metrics["moe_idle_experts"]) == 1.0


def test_train_step_balances_the_experts():
    from mpx import optim
    from train import step as step_lib
    model, variables, tokens = _model(DS)
    tx = optim.build("adamw", 1e-3, moment_dtype="f32")
    state = step_lib.init_state(model, tx, optim.NoOpLossScale(), 0, tokens)
    train_step = jax.jit(step_lib.make_train_step(model, tx, moe_bias_rate=0.01))
    new, metrics = train_step(state, {"inputs": tokens, "targets": tokens})
    assert {"moe_max_load", "moe_idle_experts"} <= set(metrics) and "expert_load" not in metrics
    moved = new.params["layers_1"]["moe"]["router"]["score_bias"]
    assert set(np.unique(np.abs(np.asarray(moved)))) <= {0.0, np.float32(0.01)}
    assert float(jnp.abs(moved).max()) == pytest.approx(0.01)


@pytest.mark.parametrize("fields, message", [
    ({"topk_method": "aux_free"}, "topk_method must be one of 'greedy', 'group_limited_greedy', 'noaux_tc'"),
    ({"n_group": 3}, "n_group=3 must divide n_experts=8"),
    ({"topk_group": 5}, "topk_group=5 must be in [1, n_group=4]"),
    ({"router_score": "relu"}, "router_score must be one of 'softmax', 'sigmoid'"),
    ({"first_k_dense": 3}, "first_k_dense=3 leaves none of n_layers=3 blocks"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim must be an even integer"),
])
def test_bad_deepseek_fields_name_themselves(fields, message):
    with pytest.raises(config_lib.FieldError, match=re.escape(message)):
        dataclasses.replace(DS, **fields)


def test_expert_parallelism_over_four_devices_equals_one_device(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    worker = Path(__file__).with_name("expert_parallel_worker.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "ep.json"
    subprocess.run([sys.executable, str(worker), str(out)], check=True, env=env, timeout=600)
    result = json.loads(out.read_text())
    losses = result.pop("train_losses")  # whole-model fp8 train steps, experts split or not
    np.testing.assert_allclose(losses["split"], losses["single"], rtol=5e-3)  # 2.3e-3 measured
    for name, r in result.items():
        assert r["same_params"] and r["all_gather"] and r["reduce_scatter"] and r["expert_grad_nonzero"], (name, r)
        assert r["forward"] < 1e-5, (name, r)
    assert result["fp32"]["grads"] < 1e-5
    # FP8 (the experts run it: the preset's rules match their role, whatever the MoE's
    # path): wgrad's 128-row tiles run over the device's gathered pairs, not the single
    # device's: the same values rounded in other tiles, each rounding within half an
    # E4M3 ulp of its tile's scale (0.057 measured).
    half_ulp = mpx.formats.get("e4m3").half_ulp
    assert 1e-4 < result["fp8"]["grads"] < 2 * half_ulp


def test_grouped_gemm_pads_each_group_to_a_tile_not_every_row_to_every_group():
    from mpx.dot import ragged as ragged_lib
    sizes = jnp.array([5, 0, 130, 1], jnp.int32)
    lay = ragged_lib._layout(sizes, 140, 128)  # 136 rows in groups, 4 past them
    tiles = np.asarray(lay.tile_group)
    # Groups 0, 2, 3 take 1, 2 and 1 tiles of 128 rows; no tile holds two groups' rows. The
    # buffer is sized for the worst case, 140 rows + 127 padding per group: 6 tiles.
    assert lay.padded_rows == 768 and list(tiles[:4]) == [0, 2, 2, 3]
    dest = np.asarray(lay.dest)
    assert list(dest[:5]) == [0, 1, 2, 3, 4] and (dest[5], dest[134], dest[135]) == (128, 257, 384)
    assert (dest[136:] == 768).all()  # rows past the groups are dropped
    # Decode-sized calls get small tiles: 8 pairs over 256 experts pad to at most 8 x 8 rows.
    assert ragged_lib.tile_rows(8, 256) == 8 and ragged_lib.tile_rows(4096, 8) == 128
