"""mpx.target: one value for every machine-dependent choice, from the mesh or the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpx
from mpx import metrics
from mpx.kernels import block_fp8
from mpx.target import Target

H100 = "NVIDIA H100 80GB HBM3"
MK_KN = (((1,), (0,)), ((), ()))


def test_a_target_derives_its_choices_from_platform_and_device_kind():
    cpu, h100, a100 = Target("cpu"), Target("cuda", H100), Target("gpu", "NVIDIA A100-SXM4-80GB")
    assert h100.platform == "gpu" and h100.compute_capability == "9.0" and h100.fp8_gemms
    assert not a100.fp8_gemms and a100.default_impl == "fp8"
    assert cpu.barriers and not h100.barriers and not cpu.fp8_gemms
    assert cpu.default_impl == "upcast_bf16" and h100.default_impl == "fp8"
    assert cpu.decode_sized(16) and not cpu.decode_sized(17) and not h100.decode_sized(1)
    assert Target("cpu", fold_max_rows=4).decode_sized(4) and not Target("cpu", fold_max_rows=4).decode_sized(5)


@pytest.mark.parametrize("bad, message", [
    (dict(platform="metal"), "platform must be one of"),
    (dict(platform="cpu", row_chunk=0), "row_chunk must be a positive integer; got 0"),
])
def test_bad_targets_name_the_value(bad, message):
    with pytest.raises(ValueError, match=message):
        Target(**bad)


def test_current_is_the_host_without_a_mesh_and_the_mesh_device_with_one():
    assert mpx.target.current() == mpx.target.host()
    assert mpx.target.host().platform == jax.default_backend()
    given = Target("cpu", row_chunk=8)
    assert mpx.target.current(given) is given
    with pytest.raises(TypeError, match="mpx.target.Target"):
        mpx.target.current("cpu")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with jax.sharding.set_mesh(mesh):
        assert mpx.target.current().platform == jax.devices()[0].platform


def _exact_deepseek(x, w, g):
    """y, dx, dw of DeepSeekV3 with the reference impl (dequantize, f32 HIGHEST)."""
    return _deepseek(x, w, g, "dequant_f32", None)


def _deepseek(x, w, g, impl, target):
    def step(x, w):
        y, vjp = jax.vjp(lambda x, w: mpx.dot_general(x, w, MK_KN, recipe=mpx.recipes.DeepSeekV3(), impl=impl,
                                                      target=target), x, w)
        return (y, *vjp(g))

    return jax.jit(step)(x, w)


@pytest.mark.parametrize("shape", [(200, 300, 136), (8, 576, 200)], ids=str)
def test_a_gpu_target_runs_fwd_dgrad_wgrad_in_the_block_fp8_kernel_within_the_exact_bound(shape):
    """On an H100 target DeepSeekV3's three GEMMs are `mpx.kernels.block_fp8` (here in
    Pallas interpret mode) and match the exact product of the dequantized operands to
    1e-5 of max|y|, ragged shapes included (300 = 2 x 128 + 44, 136 columns)."""
    m, k, n = shape
    x, w = jax.random.normal(jax.random.key(0), (m, k)) * 2, jax.random.normal(jax.random.key(1), (k, n)) * 0.05
    g = jax.random.normal(jax.random.key(2), (m, n))
    target = Target("gpu", H100, interpret=True)
    jaxpr = str(jax.make_jaxpr(lambda x, w: _deepseek(x, w, g, "fp8", target))(x, w))
    assert jaxpr.count("pallas_call") == 3  # forward, dgrad, wgrad
    for got, want in zip(_deepseek(x, w, g, "fp8", target), _exact_deepseek(x, w, g)):
        assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) <= 1e-5
    # Two-sided: the same path is FP8 (E4M3 grid), measurably away from the unquantized product.
    assert float(metrics.relative_error(_deepseek(x, w, g, "fp8", target)[0], x @ w)) > 1e-3


def test_the_kernel_takes_per_row_and_per_column_scales_of_each_group():
    """block_fp8.matmul against float64, with scales that differ per row, column and group."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(130, 300)), jnp.float8_e4m3fn)
    b = jnp.asarray(rng.normal(size=(70, 300)), jnp.float8_e5m2)
    sa, sb = (jnp.asarray(rng.uniform(0.25, 4, s), jnp.float32) for s in ((130, 3), (3, 70)))
    a, b = a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn)
    af, bf = (np.asarray(v, np.float64) for v in (a, b))
    want = sum((af[:, i:i + 128] @ bf[:, i:i + 128].T) * np.asarray(sa)[:, g:g + 1] * np.asarray(sb)[g:g + 1]
               for g, i in enumerate(range(0, 300, 128)))
    for operand, layout in ((b, "nk"), (b.T, "kn")):
        got = block_fp8.matmul(a, sa, operand, sb, b_layout=layout, out_dtype=jnp.float32, interpret=True)
        assert got.shape == (130, 70)
        assert np.max(np.abs(np.asarray(got) - want)) <= 1e-5 * np.max(np.abs(want))


@pytest.mark.parametrize("args, error, message", [
    (((4, 256), (128, 8)), ValueError, "must share K"),
    (((4, 256), (256, 8), "bf16"), TypeError, "must hold FP8 values"),
    (((4, 256), (256, 8), "e4m3", 96), ValueError, "group must be one of"),
])
def test_the_kernel_names_bad_operands(args, error, message):
    a_shape, b_shape, *rest = args
    dtype = jnp.bfloat16 if rest and rest[0] == "bf16" else jnp.float8_e4m3fn
    group = rest[1] if len(rest) > 1 else 128
    a, b = jnp.zeros(a_shape, dtype), jnp.zeros(b_shape, dtype)
    groups = -(-a_shape[1] // group)
    with pytest.raises(error, match=message):
        block_fp8.matmul(a, jnp.ones((a_shape[0], groups)), b, jnp.ones((groups, b_shape[1])), group=group,
                         interpret=True)


@pytest.mark.parametrize("block", [(128, 128), (576, 1)], ids=["128x128", "per-channel"])
@pytest.mark.parametrize("rows", [3, 40])
def test_serving_products_on_a_gpu_target_run_in_the_kernel_within_the_exact_bound(block, rows):
    """prequantized_matmul "fp8" on an H100 target: DeepSeek tiles times a stored FP8
    weight (K = 576, not a multiple of 128) in `block_fp8`, equal to the reference."""
    w = mpx.quantize(jax.random.normal(jax.random.key(0), (576, 200)) * 0.05, "e4m3", mpx.Blocks(block))
    x = jax.random.normal(jax.random.key(1), (rows, 576))
    target, recipe = Target("gpu", H100, interpret=True), mpx.recipes.DeepSeekV3()
    run = lambda impl, t: mpx.dot.prequantized_matmul(x, w, recipe=recipe, impl=impl, target=t)  # noqa: E731
    assert "pallas_call" in str(jax.make_jaxpr(lambda: run("fp8", target))())
    got, want = run("fp8", target), run("dequant_f32", None)
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) <= 1e-5
