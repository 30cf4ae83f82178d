"""Tests for the reference transformer: shapes, counts, precision fidelity, KV cache."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpx
from models import cache as cache_lib
from models import config as config_lib
from models import transformer
from models.precision import role_of

TINY = config_lib.preset("tiny")
SEQ = 32


def _tokens(cfg, batch=2, seq=SEQ, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size)


def _init(cfg, policy="fp32"):
    model = transformer.Transformer(cfg, mpx.policy.preset(policy))
    return model, model.init(jax.random.key(0), _tokens(cfg))


def _loss(model, variables, tokens):
    logits, _ = model.apply(variables, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@pytest.mark.parametrize("cfg", [TINY, config_lib.preset("tiny_moe"), dataclasses.replace(TINY, tie_embeddings=False)],
                         ids=["dense", "moe", "untied"])
def test_shapes_and_param_count(cfg):
    model, variables = _init(cfg)
    logits, aux = model.apply(variables, _tokens(cfg))
    assert logits.shape == (2, SEQ, cfg.vocab_size) and logits.dtype == jnp.float32
    assert transformer.count_params(variables["params"]) == transformer.param_count_estimate(cfg)
    assert aux["cache"] is None


@pytest.mark.parametrize("policy,min_logit_cos,min_grad_cos", [("fp8", 0.999, 0.99), ("bf16", 0.999, 0.99)])
def test_low_precision_logits_and_grads_match_fp32(policy, min_logit_cos, min_grad_cos):
    ref_model, variables = _init(TINY, "fp32")
    model = transformer.Transformer(TINY, mpx.policy.preset(policy))
    lp_vars = model.init(jax.random.key(0), _tokens(TINY))
    lp_vars = {**lp_vars, "params": variables["params"]}  # same f32 master weights
    tokens = _tokens(TINY, seq=SEQ + 1, seed=3)
    ref_logits, _ = ref_model.apply(variables, tokens)
    logits, _ = model.apply(lp_vars, tokens)
    logit_cos = float(mpx.metrics.cosine_similarity(logits, ref_logits))
    ref_grads = jax.grad(lambda p: _loss(ref_model, {"params": p}, tokens))(variables["params"])
    grads = jax.grad(lambda p: _loss(model, {**lp_vars, "params": p}, tokens))(variables["params"])
    flat = lambda t: jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(t)])  # noqa: E731
    grad_cos = float(mpx.metrics.cosine_similarity(flat(grads), flat(ref_grads)))
    print(f"{policy}: logits cosine {logit_cos:.6f}, gradient cosine {grad_cos:.6f}")
    assert logit_cos >= min_logit_cos
    assert grad_cos >= min_grad_cos


def test_moe_router_is_f32_and_experts_fp8_under_fp8_preset():
    policy = mpx.policy.preset("fp8")
    router = policy.resolve("layers_0/moe/router", role_of("layers_0/moe/router"))
    expert = policy.resolve("layers_0/moe/experts/up", role_of("layers_0/moe/experts/up"))
    assert router.recipe is None and router.compute_dtype == jnp.float32
    assert isinstance(expert.recipe, mpx.recipes.DeepSeekV3)
    cfg = config_lib.preset("tiny_moe")
    model = transformer.Transformer(cfg, policy)
    variables = model.init(jax.random.key(0), _tokens(cfg))
    logits, aux = model.apply(variables, _tokens(cfg))
    assert bool(jnp.all(jnp.isfinite(logits))) and float(aux["moe_loss"]) > 0


def test_kv_cache_decode_matches_full_forward():
    model, variables = _init(TINY)
    tokens = _tokens(TINY, batch=2, seq=12)
    full, _ = model.apply(variables, tokens)
    cache = transformer.init_cache(TINY, batch=2, dtype=jnp.float32, length=16)
    prefill_len = 8
    positions = jnp.broadcast_to(jnp.arange(prefill_len), (2, prefill_len))
    logits, aux = model.apply(variables, tokens[:, :prefill_len], positions, cache)
    steps = [logits]
    cache = aux["cache"]
    for t in range(prefill_len, 12):
        pos = jnp.full((2, 1), t)
        logits, aux = model.apply(variables, tokens[:, t:t + 1], pos, cache)
        cache = aux["cache"]
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=2e-4, atol=2e-4)


def _write_temp_bytes(slot, as_floats: bool = False) -> int:
    """Temporary bytes of one compiled token write into `slot` (B=2, capacity 4096)."""
    def write(slot, x, positions):
        if as_floats:  # the plain float scatter the cache avoids
            return slot.at[jnp.arange(2)[:, None], positions].set(x.astype(slot.dtype))
        return cache_lib.write_slots({"k": slot}, {"k": x}, positions, None)["k"]
    args = (slot, jnp.ones((2, 1, 2, 32)), jnp.ones((2, 1), jnp.int32))
    return jax.jit(write, donate_argnums=0).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_a_token_write_costs_the_token_not_the_cache(kind):
    # XLA on CPU rewrites a whole bf16/float8 array per scattered token; the cache's bit
    # patterns are written in place, so decode's cost does not grow with the capacity.
    from serve import kv_cache
    cfg = dataclasses.replace(TINY, n_kv_heads=2, n_heads=4, d_model=128, max_seq_len=4096)
    slot = kv_cache.init(cfg, 2, kind)[0]["k"]
    data = slot.data if kind == "fp8" else slot
    assert data.dtype == (jnp.uint8 if kind == "fp8" else jnp.uint16)
    assert _write_temp_bytes(slot) < data.nbytes / 100
    floats = jax.lax.bitcast_convert_type(data, slot.fmt.dtype if kind == "fp8" else jnp.bfloat16)
    assert _write_temp_bytes(floats, as_floats=True) >= floats.nbytes  # what the test tells apart


@pytest.mark.parametrize("remat", ["none", "full"])
def test_a_batch_writes_its_cache_rows_and_attends_over_the_first_cache_len_slots(remat):
    """cache_rows picks the rows of a larger cache; cache_len the slots attended: the
    prompt's logits are the plain forward's, other rows and later slots stay untouched."""
    model, variables = _init(TINY)
    model = model.clone(config=dataclasses.replace(TINY, remat=remat))
    tokens = _tokens(TINY, batch=2, seq=8)
    cache = transformer.init_cache(TINY, batch=4, dtype=jnp.float32, length=32)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    logits, aux = model.apply(variables, tokens, positions, cache, cache_len=8, cache_rows=jnp.array([3, 1]))
    np.testing.assert_allclose(logits, model.apply(variables, tokens)[0], rtol=2e-5, atol=2e-5)
    keys = aux["cache"][0]["k"]
    assert jnp.all(keys[jnp.array([0, 2])] == 0) and jnp.all(keys[:, 8:] == 0) and jnp.all(keys[1, :8] != 0)


def test_remat_does_not_change_results():
    tokens = _tokens(TINY, seq=SEQ + 1)
    model, variables = _init(TINY)
    remat_model = transformer.Transformer(dataclasses.replace(TINY, remat="full"), mpx.policy.preset("fp32"))
    g1 = jax.grad(lambda p: _loss(model, {"params": p}, tokens))(variables["params"])
    g2 = jax.grad(lambda p: _loss(remat_model, {"params": p}, tokens))(variables["params"])
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_token_shape_is_a_clear_error():
    model, variables = _init(TINY)
    with pytest.raises(ValueError, match="tokens must be"):
        model.apply(variables, jnp.zeros((8,), jnp.int32))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        config_lib.ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        config_lib.preset("huge")


@functools.lru_cache(maxsize=None)  # bf16's errors serve every FP8 preset's test
def _errors_vs_fp32(policy):
    """(logits, gradient) relative errors of `policy` against fp32, same master weights."""
    ref_model, variables = _init(TINY, "fp32")
    model = transformer.Transformer(TINY, mpx.policy.preset(policy))
    lp_vars = {**model.init(jax.random.key(0), _tokens(TINY)), "params": variables["params"]}
    if "fp8_state" in lp_vars:  # delayed scaling: scales from an amax history of another batch
        _, warm = model.apply(lp_vars, _tokens(TINY, seed=5), mutable=["fp8_state"])
        lp_vars = {**lp_vars, **warm}
    tokens = _tokens(TINY, seq=SEQ + 1, seed=3)
    flat = lambda t: jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(t)])  # noqa: E731

    @jax.jit
    def run(params):
        logits = (model.apply({**lp_vars, "params": params}, tokens)[0],
                  ref_model.apply({"params": params}, tokens)[0])
        grads = (jax.grad(lambda p: _loss(model, {**lp_vars, "params": p}, tokens))(params),
                 jax.grad(lambda p: _loss(ref_model, {"params": p}, tokens))(params))
        return [mpx.metrics.relative_error(a, b) for a, b in (logits, tuple(flat(g) for g in grads))]

    return [float(e) for e in run(variables["params"])]


@pytest.mark.parametrize("policy,grad_format", [("fp8", "e4m3"), ("fp8_current", "e5m2"), ("fp8_delayed", "e5m2")])
def test_fp8_presets_err_several_times_more_than_bf16(policy, grad_format):
    """Two-sided: an FP8 preset must be measurably less precise than bf16, as its formats say.

    A rounding to E4M3 has half-ulp 2**-4 against bf16's 2**-8: 16x (E5M2 gradients 32x).
    The FP8 presets quantize only the Dense matmuls (attention, embeddings and the LM
    head stay bf16), so their error lies between a quarter of that ratio (a preset that
    silently ran bf16 would sit at 1x) and twice it (every rounding in FP8).
    """
    bf16 = _errors_vs_fp32("bf16")
    fp8 = _errors_vs_fp32(policy)
    ratio = mpx.formats.get("e4m3").half_ulp / mpx.formats.get("bf16").half_ulp
    grad_ratio = mpx.formats.get(grad_format).half_ulp / mpx.formats.get("bf16").half_ulp
    for what, e8, e16, r in (("logits", fp8[0], bf16[0], ratio), ("grads", fp8[1], bf16[1], grad_ratio)):
        print(f"{policy} {what}: fp8 {e8:.2e}, bf16 {e16:.2e}, ratio {e8 / e16:.1f}")
        assert 0.25 * ratio * e16 <= e8 <= 2.0 * r * e16, (what, e8, e16)


def test_fp8_residuals_keep_each_fp8_operand_once_as_e4m3():
    """The backward pass of the fp8 preset keeps every FP8 layer's input and weight, and
    SwiGLU's two inputs, as E4M3 (one byte each) instead of the inputs themselves, and
    keeps less than bf16 does; `swiglu_residuals=False` keeps SwiGLU's inputs in bf16.
    The down projection keeps no input: it recomputes SwiGLU's product (`recompute_swiglu`)."""
    tokens = _tokens(TINY, batch=4, seq=65)
    rows, d, f = tokens.shape[0] * (tokens.shape[1] - 1), TINY.d_model, TINY.d_ff
    kv = TINY.n_kv_heads * TINY.head_dim
    inputs = rows * (3 * d + d + 2 * d)  # q, k, v | o | gate, up
    swiglu = rows * 2 * f  # SwiGLU's gate and up
    weights = d * (d + 2 * kv) + d * d + 3 * d * f
    recipe = mpx.recipes.DeepSeekV3
    policies = {"fp8": mpx.policy.preset("fp8"), "bf16": mpx.policy.preset("bf16"),
                "input": mpx.policy.fp8(recipe(fp8_residuals=False, swiglu_residuals=False)),
                "bf16_swiglu": mpx.policy.fp8(recipe(swiglu_residuals=False)),
                "stored": mpx.policy.fp8(recipe(recompute_swiglu=False))}
    saved = {}
    for name, policy in policies.items():
        model = transformer.Transformer(TINY, policy)
        params = model.init(jax.random.key(0), tokens[:, :-1])["params"]
        saved[name] = mpx.inspect.residual_bytes(lambda p: _loss(model, {"params": p}, tokens), params)
    assert saved["fp8"]["float8_e4m3fn"] == TINY.n_layers * (inputs + swiglu + weights)
    assert saved["bf16_swiglu"]["float8_e4m3fn"] == TINY.n_layers * (inputs + weights)
    assert saved["stored"]["float8_e4m3fn"] == saved["fp8"]["float8_e4m3fn"] + TINY.n_layers * rows * f  # down's input
    assert saved["bf16_swiglu"]["bfloat16"] - saved["fp8"].get("bfloat16", 0) == TINY.n_layers * swiglu * 2
    assert "float8_e4m3fn" not in saved["input"] and "float8_e4m3fn" not in saved["bf16"]
    assert saved["fp8"]["total"] < 0.85 * saved["input"]["total"] and saved["fp8"]["total"] < saved["bf16"]["total"]


# Gemma 3's features on the tiny model: sliding and full layers with their own RoPE bases,
# a window shorter than the sequence, post-norms, (1 + w) norms, GeGLU, q/k norms.
GEMMA = dataclasses.replace(TINY, layer_types=("sliding_attention", "full_attention"), sliding_window=3,
                            rope_local_theta=100.0, query_pre_attn_scalar=24.0, activation="gelu_tanh",
                            norm_unit_offset=True, post_norms=True, qk_norm=True, embed_scale_dtype="embedding")


def test_geglu_values_and_gradients_are_autodiffs_of_the_plain_expression():
    key = jax.random.split(jax.random.key(1), 3)
    gate, up, d = (2 * jax.random.normal(k, (4, 64)) for k in key)
    plain = lambda g, u: jax.nn.gelu(g, approximate=True) * u  # noqa: E731
    glu = lambda g, u: mpx.activations.glu(g, u, activation="gelu_tanh")  # noqa: E731
    run = jax.jit(lambda f, *a: (lambda out, vjp: (out, *vjp(d)))(*jax.vjp(f, *a)), static_argnums=0)
    for got, want in zip(run(glu, gate, up), run(plain, gate, up)):  # value, d_gate, d_up
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation must be one of 'silu', 'gelu_tanh'; got 'relu'"):
        mpx.activations.glu(gate, up, activation="relu")


def test_a_gemma_style_model_has_post_norms_zero_norm_scales_and_its_estimated_param_count():
    params = jax.eval_shape(transformer.Transformer(GEMMA).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    params = params["params"]
    assert transformer.count_params(params) == transformer.param_count_estimate(GEMMA)
    assert {"attn_post_norm", "mlp_post_norm"} <= set(params["layers_0"]) and "q_norm" in params["layers_1"]["attn"]
    norm = transformer.norm(GEMMA, None, "n")
    x = jnp.arange(8.0).reshape(2, 4)
    scale, = jax.tree.leaves(norm.init(jax.random.key(0), x))
    assert not scale.any()  # (1 + 0): the plain RMSNorm at initialization
    np.testing.assert_allclose(norm.apply({"params": {"scale": scale + 1.0}}, x),
                               2 * mpx.nn.RMSNorm(GEMMA.norm_eps).apply({"params": {"scale": jnp.ones(4)}}, x))


def test_embeddings_scale_in_their_compute_dtype_when_asked():
    """As transformers' Gemma: bf16 rows times bf16(sqrt(48)), rounded to bf16."""
    embed = mpx.nn.Embed(4, 3, policy=mpx.policy.preset("bf16"), name="embed")
    table = jnp.linspace(-1, 1, 12).reshape(4, 3)
    got = embed.apply({"params": {"embedding": table}}, jnp.array([1, 3]), 48**0.5)
    rows = table[jnp.array([1, 3])].astype(jnp.bfloat16)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, (rows * jnp.bfloat16(48**0.5)).astype(jnp.float32))
    assert not np.array_equal(got, rows.astype(jnp.float32) * jnp.float32(48**0.5))


def test_geglu_fp8_down_projection_recomputes_like_the_composition():
    """The fused FP8 down projection (recomputing GeGLU) gives the composition's value
    bit for bit and its gate/up gradients to bf16 rounding."""
    key = jax.random.split(jax.random.key(2), 4)
    gate, up = ((2 * jax.random.normal(k, (128, 128))).astype(jnp.bfloat16) for k in key[:2])
    w, g = 0.05 * jax.random.normal(key[2], (128, 128)), jax.random.normal(key[3], (128, 128)).astype(jnp.bfloat16)
    dims, recipe = (((1,), (0,)), ((), ())), mpx.recipes.DeepSeekV3()
    fused = lambda a, b, c: mpx.dot.swiglu_dot_general(a, b, c, dims, recipe=recipe, activation="gelu_tanh",  # noqa: E731
                                                       preferred_element_type=jnp.bfloat16)
    composed = lambda a, b, c: mpx.dot.dot_general(mpx.activations.glu(a, b, activation="gelu_tanh"), c, dims,  # noqa: E731
                                                   recipe=recipe, preferred_element_type=jnp.bfloat16)
    silu = lambda a, b, c: mpx.dot.swiglu_dot_general(a, b, c, dims, recipe=recipe)  # noqa: E731
    assert mpx.dot.recomputes_swiglu(recipe)

    @jax.jit
    def run(gate, up, w, g):
        (out, vjp), (want, want_vjp) = jax.vjp(fused, gate, up, w), jax.vjp(composed, gate, up, w)
        return out, want, vjp(g), want_vjp(g)[:2], silu(gate, up, w)

    out, want, grads, want_grads, silu_out = jax.tree.map(lambda a: np.asarray(a, np.float64), run(gate, up, w, g))
    np.testing.assert_array_equal(out, want)
    for got, ref in zip(grads[:2], want_grads):
        np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2)
    assert not np.allclose(silu_out, out, atol=1e-2)  # the activation is GeGLU's, not SwiGLU's
    # wgrad from the recomputed GeGLU product (E4M3 operands): within half an E4M3 eps of
    # the exact product in f64 (measured 0.035; recomputing SwiGLU instead gives 0.099).
    x = np.asarray(gate, np.float64)
    hidden = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))) * np.asarray(up, np.float64)
    exact = hidden.T @ np.asarray(g, np.float64)
    assert np.linalg.norm(grads[2] - exact) / np.linalg.norm(exact) <= 0.0625
