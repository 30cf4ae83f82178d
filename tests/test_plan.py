"""Tests of models.plan: exact state and serving bytes for tiny, small and a tiny MLA + MoE
model; DeepSeek-V3's exact parameter counts and its plan on 2048 devices."""

import dataclasses
import functools
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import mpx
from models import config as model_config
from models import plan as plan_lib
from models import sharding, transformer
from mpx import optim
from serve import quantize
from train import config as config_lib
from train import loop
from train import step as step_lib

ROOT = Path(__file__).resolve().parents[1]


def _measured(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def _train_state(name: str, precision: str):
    """(train config, policy, initialized train state) of model preset `name`."""
    cfg = config_lib.load(ROOT / "configs" / "tiny.yaml", [f"model.preset={name}", f"precision={precision}"])
    run_policy = loop.load_policy(cfg.precision)
    model = transformer.Transformer(cfg.model, run_policy)
    tx = loop.make_optimizer(cfg)
    init = lambda: step_lib.init_state(model, tx, optim.NoOpLossScale(), 0, jnp.zeros((1, 8), jnp.int32))  # noqa: E731
    # Backend optimization level 0: the same state, a third of the LLVM compile time.
    return cfg, run_policy, jax.jit(init).lower().compile({"xla_backend_optimization_level": 0})()


@pytest.mark.parametrize("name, precision", [("tiny", "fp8_delayed"), ("small", "bf16"), ("deepseek_v3_tiny", "fp8")])
def test_plan_bytes_equal_the_initialized_train_state(name, precision):
    cfg, run_policy, state = _train_state(name, precision)
    # The CLI's default optimizer is the training chain: no tx passed.
    p = plan_lib.plan(cfg.model, run_policy, sharding.abstract_mesh({"data": 1}))
    assert p.num_params == transformer.count_params(state.params) == transformer.param_count_estimate(cfg.model)
    assert p.activated_params == transformer.param_count_estimate(cfg.model, activated=True)
    assert p.params == _measured(state.params) == 4 * p.num_params
    assert p.optimizer == _measured(state.opt_state)
    assert p.gradients == 4 * p.num_params
    assert p.scale_state == _measured(state.fp8_state)
    assert (p.scale_state > 0) == (precision == "fp8_delayed")  # amax histories


@pytest.mark.parametrize("precision", ["fp8", "fp8_current", "bf16"])
def test_serving_bytes_equal_the_quantized_params(precision):
    cfg, policy = model_config.preset("deepseek_v3_tiny"), mpx.policy.preset(precision)
    params = _train_state("deepseek_v3_tiny", "fp8")[2].params  # f32 masters under every policy
    served = quantize.quantize_params(params, cfg, quantize.ServeSpec(layer_policy=policy))
    report = quantize.memory_report(served)
    for sizes in ({"data": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = sharding.abstract_mesh(sizes)
        p = plan_lib.plan(cfg, policy, mesh, batch=8, seq=64)
        assert p.serving_weights == plan_lib.per_device_bytes(served, mesh)
    p = plan_lib.plan(cfg, policy, sharding.abstract_mesh({"data": 1}))
    assert {k: p.serving.get(k, 0) for k in ("fp8", "scales")} == {k: report[k] for k in ("fp8", "scales")}
    assert (report["fp8"] > 0) == (precision != "bf16")
    # Every FP8 weight keeps an E4M3 copy for dgrad; the bf16 LM head its bf16 cast (the
    # untied embedding is a lookup; f32 weights, router and norms, are used as they are).
    if precision != "bf16":
        assert p.weight_copies == report["fp8"] + 2 * cfg.vocab_size * cfg.d_model


def test_plan_shards_by_the_same_rules_as_training():
    cfg = config_lib.load(ROOT / "configs" / "tiny.yaml", ["model.preset=small"]).model
    policy = mpx.policy.preset("fp8")
    one = plan_lib.plan(cfg, policy, sharding.abstract_mesh({"data": 1}), batch=8, seq=64)
    for sizes in ({"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}):
        p = plan_lib.plan(cfg, policy, sharding.abstract_mesh(sizes), batch=8, seq=64)
        params = jax.eval_shape(transformer.Transformer(cfg, policy).init, jax.random.key(0),
                                jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]
        mesh = sharding.abstract_mesh(sizes)
        assert p.params == plan_lib.per_device_bytes(params, mesh)
        # Every small-model matrix divides by fsdp * tensor; norms (replicated) are the rest.
        norms = 4 * cfg.d_model * (2 * cfg.n_layers + 1)
        assert p.params == (one.params - norms) // (sizes.get("fsdp", 1) * sizes["tensor"]) + norms
        # Data parallelism splits activations and the cache, never the state.
        assert p.kv_cache < one.kv_cache and p.activations < one.activations


def test_kv_cache_and_activation_estimates_follow_their_formulas():
    cfg = config_lib.load(ROOT / "configs" / "tiny.yaml").model
    policy = mpx.policy.preset("fp8")
    mesh = sharding.abstract_mesh({"data": 2, "tensor": 2})
    p = plan_lib.plan(cfg, policy, mesh, batch=8, seq=128)
    per_layer = 2 * (8 // 2) * 128 * (cfg.n_kv_heads // 2) * cfg.head_dim * 2  # k and v, bf16
    assert p.kv_cache == cfg.n_layers * per_layer
    remat = plan_lib.activation_bytes(config_lib.ModelConfig(**{**cfg.__dict__, "remat": "full"}), policy, 8, 128,
                                      mesh)
    assert remat < p.activations  # remat keeps only each block's f32 input
    bf16 = plan_lib.activation_bytes(cfg, mpx.policy.preset("bf16"), 8, 128, mesh)
    f32 = plan_lib.activation_bytes(cfg, mpx.policy.preset("fp32"), 8, 128, mesh)
    assert bf16 < f32


# DeepSeek-V3's released config.json (deepseek-ai/DeepSeek-V3), in ModelConfig's names.
DEEPSEEK_V3 = dict(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, n_kv_heads=128, d_ff=18432,
                   q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                   moe_d_ff=2048, n_experts=256, n_shared_experts=1, top_k=8, n_group=8, topk_group=4,
                   first_k_dense=3, moe_every=1, topk_method="noaux_tc", router_score="sigmoid",
                   norm_topk_prob=True, routed_scaling_factor=2.5, rope_theta=10000.0, rope_interleave=True,
                   tie_embeddings=False, embed_scale=False, norm_eps=1e-6, max_seq_len=163840)
MESH = {"data": 8, "fsdp": 32, "tensor": 8}
PLAN_ARGS = ["--model", "deepseek_v3_671b", "--mesh", "data=8,fsdp=32,tensor=8", "--policy", "fp8", "--batch", "256",
             "--seq", "4096"]
# Config arithmetic of DeepSeek-V3 (per layer: MLA 187,107,328 with its two latent norms;
# dense FFN 3 x 7168 x 18432; MoE FFN 256 + 1 experts of 3 x 7168 x 2048 and the router
# with its bias; two block norms), what eval_shape of the initializers must give exactly.
MLA, DENSE, EXPERT, ROUTER = 187_107_328, 396_361_728, 44_040_192, 7168 * 256 + 256
EMBED = 129280 * 7168
TOTAL = 2 * EMBED + 7168 + 61 * (MLA + 2 * 7168) + 3 * DENSE + 58 * (257 * EXPERT + ROUTER)
ACTIVATED = TOTAL - 58 * 248 * EXPERT  # 8 of the 256 routed experts per token


@pytest.fixture(scope="module")
def deepseek():
    """(config, plan) of DeepSeek-V3 on 2048 devices (the README's command)."""
    cfg = plan_lib.load_model_config("deepseek_v3_671b")
    return cfg, plan_lib.plan(cfg, mpx.policy.preset("fp8"), sharding.abstract_mesh(MESH), batch=256, seq=4096)


def test_deepseek_v3_yaml_is_the_released_architecture():
    cfg = plan_lib.load_model_config("deepseek_v3_671b")
    assert {k: getattr(cfg, k) for k in DEEPSEEK_V3} == DEEPSEEK_V3
    assert cfg.rope_scaling == model_config.RopeScaling("yarn", factor=40.0, original_max_len=4096, beta_fast=32.0,
                                                        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    assert cfg.cache_slots == {"latent": (512,), "k_rope": (64,)}


def test_deepseek_v3_parameters_are_671b_and_37b_activated(deepseek):
    cfg, p = deepseek
    # Exact: eval_shape of the real initializers = config arithmetic = param_count_estimate.
    assert p.num_params == TOTAL == 671_026_419_200 == transformer.param_count_estimate(cfg)
    assert p.activated_params == ACTIVATED == 37_552_297_472 == transformer.param_count_estimate(cfg, activated=True)
    assert p.input_embedding_params == EMBED
    # The report's "671B" and "37B" are rounded to the billion: 671.03 B total; 37.55 B
    # activated with the input embedding (a lookup, no matmul), 36.63 B without it, the
    # count that rounds to 37.
    assert abs(p.num_params - 671e9) < 0.5e9
    assert abs(p.activated_params - p.input_embedding_params - 37e9) < 0.5e9


def test_deepseek_v3_training_state_shards_by_the_mla_and_moe_rules(deepseek):
    cfg, p = deepseek
    mesh = sharding.abstract_mesh(MESH)
    specs = {"layers_3/attn/q_a_proj/kernel": ((7168, 1536), P("fsdp", None)),
             "layers_3/attn/kv_a_proj/kernel": ((7168, 576), P("fsdp", None)),
             "layers_3/attn/q_b_proj/kernel": ((1536, 128, 192), P("fsdp", "tensor", None)),
             "layers_3/attn/kv_b_proj/kernel": ((512, 128, 256), P("fsdp", "tensor", None)),
             "layers_3/attn/q_b_proj/kernel/data": ((1536, 128 * 192), P("fsdp", "tensor")),  # serving's 2-D view
             "layers_3/attn/kv_a_norm/scale": ((512,), P(None)),
             "layers_3/moe/router/score_bias": ((256,), P(None)),
             "layers_3/moe/experts/up/kernel": ((256, 7168, 2048), P("fsdp", None, "tensor")),
             "layers_3/moe/shared/down/kernel": ((2048, 7168), P("tensor", "fsdp"))}
    for path, (shape, spec) in specs.items():
        assert sharding.spec_for(path, shape, mesh) == spec, path
    # Every matrix splits over fsdp x tensor = 256 but the latent down projections and the
    # router (fsdp only); vectors (norms, selection biases) are replicated.
    fsdp_only = 61 * 7168 * (1536 + 576) + 58 * 7168 * 256
    vectors = 7168 + 61 * (2 * 7168 + 1536 + 512) + 58 * 256
    assert p.params == 4 * ((TOTAL - fsdp_only - vectors) // 256 + fsdp_only // 32 + vectors)
    # bf16 mu + nu = 4 B per parameter, plus 17 B of replicated counters (Adam, schedule,
    # skip_nonfinite).
    assert p.gradients == p.params and p.optimizer == p.params + 17 and p.scale_state == 0


def test_deepseek_v3_serving_weights_and_latent_cache(deepseek):
    cfg, p = deepseek
    # The fp8 preset: every matmul but the router and the LM head in 128x128-block E4M3
    # (the released checkpoint's layout), 256 ways (the data axis replicates).
    fp8, fsdp_only = TOTAL - 2 * EMBED - 7168 - 61 * (2 * 7168 + 1536 + 512) - 58 * ROUTER, 61 * 7168 * (1536 + 576)
    assert p.serving["fp8"] == (fp8 - fsdp_only) // 256 + fsdp_only // 32  # q_a_proj, kv_a_proj whole on tensor
    assert p.serving["bfloat16"] == 2 * 2 * EMBED // 256  # embedding and head
    # Latent cache: 512 + 64 values per token and layer, against 128 x (192 + 128) for
    # multi-head attention over the same heads; FP8 adds one f32 scale per slot vector.
    assert p.cache_per_token("bf16") == 61 * 576 * 2 == 70_272
    assert p.cache_per_token("fp8") == 61 * (512 + 4 + 64 + 4) == 35_624
    assert p.cache_per_token("bf16", expanded=True) == 61 * 128 * 320 * 2 == 4_997_120
    assert p.cache_per_token("fp8", expanded=True) == 61 * 128 * (192 + 4 + 128 + 4)
    # One sequence per batch shard; `cache_specs` splits the slots' last axis over tensor.
    assert p.kv_cache == 61 * 4096 * (512 + 64) // 8 * 2
    assert p.serving_total == p.serving_weights + p.kv_cache


def test_activation_estimate_counts_mla_latents_and_sorted_dispatch_rows():
    cfg = plan_lib.load_model_config("deepseek_v3_671b")
    policy = mpx.policy.preset("fp8")

    def block(**fields):
        return plan_lib.block_bytes_per_token(dataclasses.replace(cfg, **fields), policy, 3, 4096, 8, moe=True)

    # Per routed pair (N * top_k rows, no capacity): its gathered row as ragged_dot keeps
    # it (E4M3 under fp8_residuals), the expert's bf16 output, gate, up and the SwiGLU
    # product as E4M3 rows (tensor-split), and 12 B of routing (id, position, weight).
    assert block() - block(top_k=4) == 4 * (7168 * (1 + 2) + (1 + 1 + 1) * 2048 / 8 + 12)
    # MLA's latent: kv_a_proj's bf16 output (kv_a_norm's input) and kv_b_proj's E4M3 copy.
    assert block() - block(kv_lora_rank=256) == 256 * (2 + 1)
    # Expanded form, per head: q and k (192 wide) and v (128) in bf16, the softmax's two f32
    # statistics and o_proj's E4M3 input (128), split over tensor = 8.
    assert block() - block(n_heads=64, n_kv_heads=64) == 64 * (2 * 192 * 2 + 128 * 2 + 8 + 128) / 8


def test_mtp_module_adds_its_block_and_projection():
    cfg = dataclasses.replace(plan_lib.load_model_config("deepseek_v3_671b"), n_layers=2, first_k_dense=1)
    policy, mesh = mpx.policy.preset("fp8"), sharding.abstract_mesh({"data": 1})
    base, p = (plan_lib.plan(cfg, policy, mesh, seq=64, mtp=n) for n in (0, 1))
    mtp = MLA + 2 * 7168 + 257 * EXPERT + ROUTER + 2 * 7168 * 7168 + 3 * 7168  # block, eh_proj, 3 norms
    assert p.num_params - base.num_params == mtp == 11_610_068_224
    # The released checkpoint's ~14 B: with its own copy of the embedding and head, 685 B in all.
    assert TOTAL + mtp + 2 * EMBED == 684_489_845_504
    assert p.activated_params - base.activated_params == mtp - 248 * EXPERT
    assert p.cache_layers == 3 and p.activations > base.activations and p.serving_weights > base.serving_weights
    shapes = plan_lib.model_shapes(cfg, policy, 1).params
    assert shapes["mtp_0"]["eh_proj"]["kernel"].shape == (2 * 7168, 7168) and "experts" in shapes["layers_2"]["moe"]


def test_cli_plans_deepseek_v3_and_prints_json_last(deepseek, capsys):
    assert plan_lib.main(PLAN_ARGS + ["--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "671,026,419,200 parameters (671.03 B), 37,552,297,472 activated per token" in lines[1]
    assert any(line.startswith("params (f32 masters)") for line in lines)
    assert any(line.startswith("  attention of the same 128 heads") and "(71.1x the latent)" in line for line in lines)
    record = json.loads(lines[-1])
    assert record["mesh"] == MESH and record["batch"] == 256 and record["num_params"] == TOTAL
    assert record["training_total"] == sum(record[k] for k in ("params", "optimizer", "gradients", "scale_state",
                                                                 "weight_copies", "activations"))
    assert record["serving_total"] == sum(record["serving"].values()) + record["kv_cache"]
    assert record["cache_per_token"]["fp8"] == 35_624 and record["activations"] == deepseek[1].activations


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "tiny", "--mesh", "data=-1"], "give the device count"),
    (["--model", "tiny", "--mesh", "pipe=2"], "unknown mesh axes"),
    (["--model", "tiny", "--mtp", "-1"], "--mtp must be an integer >= 0; got -1"),
])
def test_cli_errors_name_the_bad_value(argv, message, capsys):
    assert plan_lib.main(argv) == 2
    assert message in capsys.readouterr().err


def test_model_yaml_rejects_unknown_fields(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("preset: tiny\nd_modl: 64\n")
    with pytest.raises(ValueError, match="m.yaml: unknown key 'd_modl' \\(did you mean 'd_model'\\?\\)"):
        plan_lib.load_model_config(str(path))
    path.write_text("preset: tiny\nn_layers: three\n")
    with pytest.raises(ValueError, match="n_layers: expected int, got 'three'"):
        plan_lib.load_model_config(str(path))
    (tmp_path / "child.yaml").write_text("extends: m.yaml\nd_ff: 512\n")
    path.write_text("preset: tiny\nn_layers: 3\n")
    assert plan_lib.load_model_config(str(tmp_path / "child.yaml")).d_ff == 512
    path.write_text("preset: tiny\nn_layers: 3\n")
    assert plan_lib.load_model_config(str(path)).n_layers == 3
    assert math.isclose(plan_lib.load_model_config("tiny").d_model, 128)


@pytest.mark.parametrize("text, message", [
    ("preset: tiny\nd_model: -128\n", "m.yaml: ModelConfig: d_model must be an integer >= 1; got -128"),
    ("preset: tiny\nn_kv_heads: 3\n", "n_heads=4 must be divisible by n_kv_heads=3"),
    ("n_experts: 4\ntop_k: 5\n", "top_k=5 must be in [1, n_experts=4]"),
    ("rope_scaling: {kind: dynamic}\n", "rope_scaling: kind must be one of 'none', 'linear', 'llama3', 'yarn'; got 'dynamic'"),
    ("preset: [tiny]\n", "m.yaml: preset: unknown model preset ['tiny']"),
])
def test_model_yaml_values_are_checked_before_planning(tmp_path, text, message, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_lib.load_model_config(str(path))
    assert plan_lib.main(["--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_every_model_file_is_a_valid_config():
    for path in plan_lib.MODELS_DIR.glob("*.yaml"):
        assert plan_lib.load_model_config(str(path)).n_layers >= 1
