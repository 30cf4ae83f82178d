"""Tests for mpx.inspect: GEMM precision classes from HLO and StableHLO text.

GPU cases use hand-written HLO in the form XLA prints after its GEMM rewriter (a
cuBLASLt FP8 custom call, a bf16 cuBLAS GEMM fed by an FP8 convert, a Triton GEMM
fusion); CPU cases use text compiled here.
"""

import jax
import jax.numpy as jnp
import pytest

import mpx.dot as mdot
import mpx.inspect as minspect
from mpx import recipes

MK_KN = (((1,), (0,)), ((), ()))

CUBLAS_FP8 = """HloModule jit_f, entry_computation_layout={(f8e4m3fn[16,32]{1,0}, f8e4m3fn[16,32]{1,0}, f32[], f32[])->bf16[16,16]{1,0}}

ENTRY %main.10 (Arg_0.1: f8e4m3fn[16,32], Arg_1.2: f8e4m3fn[16,32], Arg_2.3: f32[], Arg_3.4: f32[]) -> bf16[16,16] {
  %Arg_0.1 = f8e4m3fn[16,32]{1,0} parameter(0)
  %Arg_1.2 = f8e4m3fn[16,32]{1,0} parameter(1)
  %Arg_2.3 = f32[] parameter(2)
  %Arg_3.4 = f32[] parameter(3)
  %constant_1 = f32[] constant(1)
  %cublas-gemm.1 = (bf16[16,16]{1,0}, s8[33554432]{0}) custom-call(f8e4m3fn[16,32]{1,0} %Arg_0.1, f8e4m3fn[16,32]{1,0} %Arg_1.2, f32[] %Arg_2.3, f32[] %Arg_3.4, f32[] %constant_1, f32[] %constant_1), custom_call_target="__cublas$lt$matmul$f8", metadata={op_name="jit(f)/dot_general"}, backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["1"]}}}
  ROOT %get-tuple-element = bf16[16,16]{1,0} get-tuple-element((bf16[16,16]{1,0}, s8[33554432]{0}) %cublas-gemm.1), index=0
}
"""

CUBLAS_UPCAST = """HloModule jit_g, entry_computation_layout={(f8e5m2[16,32]{1,0}, bf16[32,16]{1,0})->f32[16,16]{1,0}}

%fused_convert (param_0: f8e5m2[16,32]) -> bf16[16,32] {
  %param_0 = f8e5m2[16,32]{1,0} parameter(0)
  ROOT %convert.1 = bf16[16,32]{1,0} convert(%param_0)
}

ENTRY %main.5 (a: f8e5m2[16,32], b: bf16[32,16]) -> f32[16,16] {
  %a = f8e5m2[16,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %convert_fusion = bf16[16,32]{1,0} fusion(%a), kind=kLoop, calls=%fused_convert
  %cublas-gemm.2 = (f32[16,16]{1,0}, s8[4194304]{0}) custom-call(%convert_fusion, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(g)/dot_general"}
  ROOT %gte = f32[16,16]{1,0} get-tuple-element(%cublas-gemm.2), index=0
}
"""

TRITON_FP8 = """HloModule jit_h

%triton_gemm_computation (p0: f8e4m3fn[64,128], p1: f8e5m2[128,32]) -> f32[64,32] {
  %p0 = f8e4m3fn[64,128]{1,0} parameter(0)
  %p1 = f8e5m2[128,32]{1,0} parameter(1)
  ROOT %dot.7 = f32[64,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: f8e4m3fn[64,128], y: f8e5m2[128,32], z: f32[64,32]) -> f32[64,32] {
  %x = f8e4m3fn[64,128]{1,0} parameter(0)
  %y = f8e5m2[128,32]{1,0} parameter(1)
  %z = f32[64,32]{1,0} parameter(2)
  %triton_gemm = f32[64,32]{1,0} fusion(%x, %y), kind=kCustom, calls=%triton_gemm_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  ROOT %add = f32[64,32]{1,0} add(%triton_gemm, %z)
}
"""


def test_cublas_fp8_custom_call_is_fp8():
    report = minspect.fp8_report(CUBLAS_FP8)
    (gemm,) = report.gemms
    assert gemm.kind == "custom-call __cublas$lt$matmul$f8"
    assert (gemm.lhs_dtype, gemm.rhs_dtype, gemm.out_dtype) == ("f8e4m3fn", "f8e4m3fn", "bf16")
    assert gemm.classification == "fp8" and gemm.op_name == "jit(f)/dot_general"
    assert report.fp8_fraction == 1.0
    assert minspect.assert_fp8(CUBLAS_FP8) is not None


def test_bf16_gemm_fed_by_an_fp8_convert_is_an_upcast():
    (gemm,) = minspect.fp8_report(CUBLAS_UPCAST).gemms
    assert gemm.kind == "custom-call __cublas$gemm"
    assert (gemm.lhs_dtype, gemm.rhs_dtype, gemm.out_dtype) == ("bf16", "bf16", "f32")
    assert gemm.classification == "upcast"


def test_dot_inside_a_triton_fusion_with_fp8_parameters_is_fp8():
    report = minspect.fp8_report(TRITON_FP8)
    (gemm,) = report.gemms
    assert (gemm.name, gemm.computation) == ("dot.7", "triton_gemm_computation")
    assert (gemm.lhs_dtype, gemm.rhs_dtype, gemm.classification) == ("f8e4m3fn", "f8e5m2", "fp8")
    assert report.counts == {"fp8": 1, "upcast": 0, "high_precision": 0}


def test_assert_fp8_names_the_gemms_that_fell_back():
    text = CUBLAS_FP8 + "\n" + CUBLAS_UPCAST
    report = minspect.fp8_report(text)
    assert report.counts == {"fp8": 1, "upcast": 1, "high_precision": 0}
    with pytest.raises(minspect.Fp8FallbackError, match=r"cublas-gemm\.2 \(upcast: bf16 x bf16"):
        minspect.assert_fp8(text)
    assert minspect.assert_fp8(text, min_fraction=0.5).fp8_fraction == 0.5


def test_assert_fp8_rejects_text_without_gemms_and_bad_fractions():
    no_gemm = jax.jit(lambda x: x + 1).lower(jnp.ones(4)).compile()
    with pytest.raises(minspect.Fp8FallbackError, match="no dot"):
        minspect.assert_fp8(no_gemm)
    assert minspect.assert_fp8(no_gemm, min_fraction=0.0).gemms == ()
    with pytest.raises(ValueError, match="min_fraction"):
        minspect.assert_fp8(CUBLAS_FP8, min_fraction=1.5)
    with pytest.raises(TypeError, match="as_text"):
        minspect.fp8_report(42)


def test_cpu_compiled_fp8_dot_is_reported_as_an_upcast():
    f8 = jnp.ones((16, 32), jnp.float8_e4m3fn)
    dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
    lowered = dot.lower(f8, f8)
    assert minspect.fp8_report(lowered).gemms[0].classification == "fp8"  # what was asked for
    compiled = minspect.fp8_report(lowered.compile())
    if jax.default_backend() == "cpu":  # what runs: XLA on CPU converts the operands
        assert compiled.counts == {"fp8": 0, "upcast": 1, "high_precision": 0}


def test_plain_f32_dot_is_high_precision_in_hlo_and_stablehlo():
    x = jnp.ones((8, 16))
    lowered = jax.jit(lambda a, b: a @ b).lower(x, x.T)
    for source in (lowered, lowered.as_text(), lowered.compile(), lowered.compile().as_text()):
        report = minspect.fp8_report(source)
        assert report.counts == {"fp8": 0, "upcast": 0, "high_precision": 1}
        assert report.gemms[0].lhs_dtype == "f32"


@pytest.mark.parametrize("impl,residuals,expected", [
    ("fp8", False, {"upcast"}), ("dequant_f32", False, {"upcast"}), ("upcast_bf16", False, {"high_precision"}),
    ("dequant_f32", True, {"upcast"}),
    # The backward GEMMs read the FP8 operands the forward stored: FP8 data, upcast.
    ("upcast_bf16", True, {"high_precision", "upcast"})])
def test_mpx_dot_training_step_on_cpu(impl, residuals, expected):
    if jax.default_backend() != "cpu":
        pytest.skip("checks what XLA on CPU does with each impl")
    x, w = jnp.ones((32, 64)), jnp.ones((64, 16))
    ct = jnp.ones((32, 16)).at[0, 0].set(3.0)  # not constant, so XLA keeps the dY path

    def step(a, b, c):
        recipe = recipes.CurrentScaling(fp8_residuals=residuals)
        out, vjp = jax.vjp(lambda a, b: mdot.dot_general(a, b, MK_KN, recipe=recipe, impl=impl), a, b)
        return out, vjp(c)

    report = minspect.fp8_report(jax.jit(step).lower(x, w, ct).compile())
    assert len(report.gemms) == 3  # fprop, dgrad, wgrad
    assert {g.classification for g in report.gemms} == expected


def test_report_prints_a_table_with_counts():
    text = str(minspect.fp8_report(CUBLAS_FP8 + "\n" + TRITON_FP8))
    lines = text.splitlines()
    assert lines[0].split() == ["class", "kind", "lhs", "rhs", "out", "name", "op"]
    assert "custom-call __cublas$lt$matmul$f8" in lines[1]
    assert lines[-1].startswith("2 GEMMs: 2 fp8, 0 upcast, 0 high_precision")


@pytest.mark.gpu
def test_per_tensor_fp8_impl_becomes_an_fp8_gemm_on_hopper():
    x = jax.random.normal(jax.random.key(0), (256, 512), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (512, 256), jnp.bfloat16)
    fwd = jax.jit(lambda a, b: mdot.dot_general(a, b, MK_KN, recipe=recipes.CurrentScaling(), impl="fp8"))
    minspect.assert_fp8(fwd.lower(x, w).compile())


def test_compiled_gemms_carry_their_shapes_and_flops():
    """From compiled HLO: operand shapes, and 2 x output elements x contraction length
    (batched: 2 x (2*3*5) x 4); the FLOP share of FP8 follows them."""
    f = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))
    report = minspect.fp8_report(f.lower(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))).compile())
    (gemm,) = report.gemms
    assert (gemm.lhs_shape, gemm.rhs_shape, gemm.flops) == ((2, 3, 4), (2, 4, 5), 240)
    assert report.fp8_flop_fraction == 0.0 and "f32[2, 3, 4]" in str(report)
