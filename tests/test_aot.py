"""Compiled for an H100 on a machine without one (`mpx.aot`): which GEMMs run in FP8.

Skipped with a reason where jax's CUDA plugin is missing (the gpu-compile extra). Each
compile takes 1-3 s. Two-sided: a forced fallback (impl="upcast_bf16") or no recipe must
leave non-FP8 GEMMs, or the checks could not tell FP8 from bf16.
"""

import dataclasses
import glob
import re

import jax
import jax.numpy as jnp
import pytest

import mpx
import mpx.aot
import mpx.inspect
from benchmarks.h100_compile import layer_path

pytestmark = pytest.mark.skipif(mpx.aot.status() is not None, reason=str(mpx.aot.status()))

MK_KN = (((1,), (0,)), ((), ()))


@pytest.fixture(scope="module")
def h100():
    return mpx.aot.mesh("h100")


def _train_product(recipe, impl="auto"):
    def step(x, w, g):
        y, vjp = jax.vjp(lambda x, w: mpx.dot_general(x, w, MK_KN, recipe=recipe, impl=impl,
                                                      preferred_element_type=jnp.bfloat16), x, w)
        return (y, *vjp(g))

    return step


def _args(m=512, k=1024, n=768):
    return (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((k, n), jnp.float32),
            jax.ShapeDtypeStruct((m, n), jnp.bfloat16))


def test_the_mesh_is_an_h100_and_the_dot_code_sees_it(h100):
    assert h100.devices.flat[0].device_kind == "NVIDIA H100 80GB HBM3"
    seen = []
    mpx.aot.compile(lambda x: seen.append(mpx.target.current()) or x * 2, jnp.zeros(4), mesh=h100)
    assert seen[0].platform == "gpu" and seen[0].fp8_gemms


@pytest.mark.parametrize("recipe", [mpx.recipes.DeepSeekV3(), mpx.recipes.DeepSeekV3(scale_format="ue8m0")], ids=str)
def test_deepseek_v3_forward_dgrad_wgrad_are_three_block_fp8_gemms(h100, recipe):
    report = mpx.inspect.fp8_report(mpx.aot.compile(_train_product(recipe), *_args(m=512, k=896), mesh=h100))
    assert report.counts == {"fp8": 3, "upcast": 0, "high_precision": 0}, str(report)
    assert all(g.kind == "custom-call mpx_block_fp8_gemm" for g in report.gemms)


def test_an_h200_is_a_hopper_with_its_own_memory_and_runs_the_same_block_fp8_gemms():
    """The H200 target: its own device kind and memory size, and (the same sm_90 die) the
    block-FP8 kernel for all three GEMMs of a DeepSeekV3 product."""
    h200 = mpx.aot.mesh("h200")
    device = h200.devices.flat[0]
    assert device.device_kind == "NVIDIA H200" and "h200" in mpx.aot.TARGETS
    compiled = mpx.aot.compile(_train_product(mpx.recipes.DeepSeekV3()), *_args(m=512, k=896), mesh=h200)
    report = mpx.inspect.fp8_report(compiled)
    assert report.counts == {"fp8": 3, "upcast": 0, "high_precision": 0}, str(report)
    assert all(g.kind == "custom-call mpx_block_fp8_gemm" for g in report.gemms)


def test_per_tensor_current_scaling_is_three_cublaslt_fp8_gemms(h100):
    report = mpx.inspect.fp8_report(mpx.aot.compile(_train_product(mpx.recipes.CurrentScaling()), *_args(), mesh=h100))
    assert report.counts["fp8"] == 3 and not report.fallbacks(), str(report)
    assert all("__cublas$lt$matmul$f8" in g.kind for g in report.gemms)


@pytest.mark.parametrize("recipe, impl", [(mpx.recipes.DeepSeekV3(), "upcast_bf16"), (None, "auto")],
                         ids=["forced-fallback", "no-recipe"])
def test_a_fallback_or_no_recipe_leaves_non_fp8_gemms(h100, recipe, impl):
    compiled = mpx.aot.compile(_train_product(recipe, impl), *_args(), mesh=h100)
    report = mpx.inspect.fp8_report(compiled)
    assert report.gemms and report.counts["fp8"] == 0, str(report)
    with pytest.raises(mpx.inspect.Fp8FallbackError):
        mpx.inspect.assert_fp8(compiled)


def test_the_kernel_is_fp8_wgmma_in_its_ptx(h100, tmp_path):
    """The PTX XLA builds for the kernel multiplies E4M3 x E4M3 in Hopper's WGMMA."""
    fn = _train_product(mpx.recipes.DeepSeekV3())
    with jax.sharding.set_mesh(h100):
        structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(h100, jax.sharding.PartitionSpec()))
                   for a in _args(m=256, k=512, n=256)]
        jax.jit(fn).lower(*structs).compile(compiler_options={**mpx.aot.COMPILER_OPTIONS,
                                                              "xla_dump_to": str(tmp_path)})
    ptx = "\n".join(open(p).read() for p in glob.glob(str(tmp_path / "*.ptx")))
    assert ".target sm_90a" in ptx
    assert re.search(r"wgmma\.mma_async\S*\.e4m3\.e4m3", ptx)
    assert not re.search(r"mma\S*\.f16\.f16", ptx)  # no FP8 -> f16 upcast


def test_bad_targets_and_device_counts_are_named():
    with pytest.raises(ValueError, match="target must be one of"):
        mpx.aot.mesh("h900")
    with pytest.raises(ValueError, match="devices must be a positive integer; got 0"):
        mpx.aot.mesh("h100", devices=0)


def _non_fp8_paths(compiled) -> set[str]:
    return {layer_path(g.op_name) for g in mpx.inspect.fp8_report(compiled).fallbacks()}


def test_a_train_step_under_the_fp8_preset_leaves_only_qk_and_the_head_out_of_fp8(h100):
    """A one-layer tiny model's train step for an H100: every projection and FFN GEMM,
    forward and backward, is FP8, and so are attention's three PV products (P V, P^T dO,
    dO V^T); what is not is what the precision map keeps wide (QK^T, dQ and dK in bf16,
    the tied LM head)."""
    from benchmarks import train_step
    from models import config as model_config

    cfg, tokens = dataclasses.replace(model_config.preset("tiny"), n_layers=1), jnp.zeros((2, 65), jnp.int32)
    step, state, _, _ = train_step.build("fp8", cfg, 2, 64, abstract=True)
    compiled = mpx.aot.compile(step, state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh=h100)
    assert _non_fp8_paths(compiled) == {"Transformer/layers_*/attn", "Transformer/embed.attend"}
    assert mpx.inspect.fp8_report(compiled).fp8_flop_fraction > 0.5
    attention = [g for g in mpx.inspect.fp8_report(compiled).gemms if layer_path(g.op_name).endswith("/attn")]
    fp8 = [g for g in attention if g.classification == "fp8"]
    assert (len(fp8), len(attention)) == (3, 7)  # QK^T, its recomputation, dQ and dK stay bf16


def test_fp8_serving_decode_runs_its_linear_layers_in_fp8(h100):
    """A decode call of the tiny model with FP8 serving weights and an FP8 KV cache,
    compiled for an H100: only attention and the LM head are not FP8 GEMMs."""
    from benchmarks import kv_capacity
    from models import config as model_config
    from serve import engine as engine_lib
    from serve import kv_cache as kv_cache_lib
    from serve import quantize as serve_quantize
    from serve import sampling

    ckpt = kv_capacity.random_checkpoint(model_config.preset("tiny"))
    model, variables = serve_quantize.prepare(ckpt, serve_quantize.ServeSpec("fp8"))
    engine = engine_lib.Engine(model, variables, kv_cache="fp8")
    cache, lengths = kv_cache_lib.init(model.config, 2, "fp8"), jnp.full((2,), 8, jnp.int32)
    decode = mpx.aot.compile(engine._decode_fn, variables, cache, lengths, lengths, jax.random.key(0), 1,
                             sampling.make(0.0), 2, 64, mesh=h100, static_argnums=(6, 7, 8))
    assert mpx.inspect.fp8_report(decode).counts["fp8"] > 0
    assert _non_fp8_paths(decode) <= {"Transformer/layers_*/attn", "Transformer/embed.attend"}
