"""Tests for mpx.hardware: classification of fake devices, policy adaptation, the report."""

import dataclasses
import subprocess
import sys

import jax
import pytest

from mpx import formats, hardware as H, policy as P, recipes
from models.precision import role_of

OCP, FNUZ = ("e4m3", "e5m2"), ("e4m3fnuz", "e5m2fnuz")
X86_BF16 = {"fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
X86_PLAIN = {"fpu", "avx2", "avx512f"}

# (backend, device_kind, compute_capability, cpu flags) ->
#   (vendor, compute_capability, arch, fp8_native, fp8_formats, bf16_native)
DEVICES = [
    (("gpu", "NVIDIA H100 80GB HBM3", None, ()), ("nvidia", "9.0", "sm_90", True, OCP, True)),
    (("gpu", "NVIDIA H200", None, ()), ("nvidia", "9.0", "sm_90", True, OCP, True)),
    (("gpu", "NVIDIA GH200 480GB", None, ()), ("nvidia", "9.0", "sm_90", True, OCP, True)),
    (("gpu", "NVIDIA H800", None, ()), ("nvidia", "9.0", "sm_90", True, OCP, True)),
    (("gpu", "NVIDIA L40S", None, ()), ("nvidia", "8.9", "sm_89", True, OCP, True)),
    (("gpu", "NVIDIA L4", None, ()), ("nvidia", "8.9", "sm_89", True, OCP, True)),
    (("gpu", "NVIDIA GeForce RTX 4090", None, ()), ("nvidia", "8.9", "sm_89", True, OCP, True)),
    (("gpu", "NVIDIA A100-SXM4-80GB", None, ()), ("nvidia", "8.0", "sm_80", False, (), True)),
    (("gpu", "NVIDIA A10G", None, ()), ("nvidia", "8.6", "sm_86", False, (), True)),
    (("gpu", "NVIDIA B200", None, ()), ("nvidia", "10.0", "sm_100", True, OCP, True)),
    (("gpu", "Tesla V100-SXM2-16GB", None, ()), ("nvidia", "7.0", "sm_70", False, (), False)),
    (("gpu", "Tesla T4", None, ()), ("nvidia", "7.5", "sm_75", False, (), False)),
    # The device's own compute_capability wins over the name table.
    (("gpu", "NVIDIA Future GPU", "8.9", ()), ("nvidia", "8.9", "sm_89", True, OCP, True)),
    (("cuda", "NVIDIA H100 PCIe", "9.0", ()), ("nvidia", "9.0", "sm_90", True, OCP, True)),
    (("gpu", "AMD Instinct MI300X", None, ()), ("amd", None, "gfx942", True, FNUZ, True)),
    (("rocm", "AMD Instinct MI325X", None, ()), ("amd", None, "gfx942", True, FNUZ, True)),
    (("gpu", "gfx942", None, ()), ("amd", None, "gfx942", True, FNUZ, True)),
    (("rocm", "AMD Instinct", "gfx942:sramecc+:xnack-", ()), ("amd", None, "gfx942", True, FNUZ, True)),
    (("gpu", "AMD Instinct MI355X", None, ()), ("amd", None, "gfx950", True, OCP, True)),
    (("gpu", "AMD Instinct MI250X", None, ()), ("amd", None, "gfx90a", False, (), True)),
    (("gpu", "AMD Instinct MI100", None, ()), ("amd", None, "gfx908", False, (), False)),
    (("tpu", "TPU v5 lite", None, ()), ("google", None, "TPU v5 lite", False, (), True)),
    (("tpu", "TPU v4", None, ()), ("google", None, "TPU v4", False, (), True)),
    (("cpu", "cpu", None, X86_BF16), ("unknown", None, None, False, (), True)),
    (("cpu", "cpu", None, X86_PLAIN), ("unknown", None, None, False, (), False)),
    (("cpu", "cpu", None, {"fp", "asimd", "bf16", "sve"}), ("unknown", None, None, False, (), True)),
    (("gpu", "Mystery Accelerator", None, ()), ("unknown", None, None, False, (), False)),
    (("metal", "Apple M3", None, ()), ("unknown", None, None, False, (), False)),
]


@pytest.mark.parametrize("inputs, expected", DEVICES, ids=[d[0][1] + "/" + str(d[0][2]) for d in DEVICES])
def test_classify_table(inputs, expected):
    backend, kind, cc, flags = inputs
    info = H.classify(backend, kind, cpu_flags=flags, compute_capability=cc)
    got = (info.vendor, info.compute_capability, info.arch, info.fp8_native, info.fp8_formats, info.bf16_native)
    assert got == expected
    assert info.backend == {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
    assert info.device_kind == kind and info.notes and hash(info) == hash(dataclasses.replace(info))
    assert all(f in formats.names() for f in info.fp8_formats)


@pytest.mark.parametrize("kind, fragment", [
    ("cpu", "FP8 will be emulated"), ("NVIDIA A100-SXM4-80GB", "FP8 will be emulated"),
    ("NVIDIA H100 80GB HBM3", "block-scaled"), ("AMD Instinct MI300X", "fnuz"), ("TPU v5 lite", "emulated"),
])
def test_classify_notes(kind, fragment):
    backend = "cpu" if kind == "cpu" else "tpu" if kind.startswith("TPU") else "gpu"
    assert any(fragment in n for n in H.classify(backend, kind).notes)


def test_cpu_notes_follow_bf16_flags():
    assert any("fastest CPU matmul" in n for n in H.classify("cpu", "cpu", cpu_flags=X86_BF16).notes)
    assert any("little or no speedup" in n for n in H.classify("cpu", "cpu", cpu_flags=X86_PLAIN).notes)


def test_cpu_flags_and_vendor_from_cpuinfo():
    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\nCPU implementer\t: 0x41\n"
    assert H.cpu_flags(x86) == {"fpu", "avx512f", "avx512_bf16", "amx_bf16"}
    assert H.cpu_flags(arm) == {"fp", "asimd", "bf16", "sve"}
    assert H.cpu_flags("") == frozenset()
    assert H.classify("cpu", "cpu", cpuinfo=x86).vendor == "intel"
    assert H.classify("cpu", "cpu", cpuinfo=arm).vendor == "arm"
    assert H.classify("cpu", "cpu", cpuinfo="vendor_id : AuthenticAMD").vendor == "amd"


@pytest.mark.parametrize("kind, cc", [("NVIDIA A100 80GB PCIe", "8.0"), ("NVIDIA A10", "8.6"), ("NVIDIA L40", "8.9"),
                                      ("NVIDIA H20", "9.0"), ("NVIDIA RTX 6000 Ada Generation", "8.9"),
                                      ("NVIDIA GeForce RTX 5090", "12.0"), ("Unknown", None)])
def test_nvidia_compute_capability_no_prefix_confusion(kind, cc):
    assert H.nvidia_compute_capability(kind) == cc


def test_preferred_fp8_formats():
    assert H.preferred_fp8_formats(H.classify("gpu", "AMD Instinct MI300X")) == FNUZ
    assert H.preferred_fp8_formats(H.classify("gpu", "NVIDIA H100 80GB HBM3")) == OCP
    assert H.preferred_fp8_formats(H.classify("cpu", "cpu")) == OCP


# --------------------------------------------------------------------------- adapt_policy

PATHS = ["layers_0/attn/q_proj", "layers_0/attn/v_proj", "layers_0/mlp/up", "layers_1/moe/experts/down"]


def _fp8_formats(recipe):
    return {getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name in H._FORMAT_FIELDS}


@pytest.mark.parametrize("name", ["fp8", "fp8_current", "fp8_delayed"])
def test_adapt_policy_mi300_switches_to_fnuz(name):
    policy = P.preset(name)
    adapted, notes = H.adapt_policy(policy, H.classify("gpu", "AMD Instinct MI300X"))
    for path in PATHS:
        assert _fp8_formats(adapted.resolve(path, role_of(path)).recipe) <= set(FNUZ), path
        assert type(adapted.resolve(path, role_of(path)).recipe) is type(policy.resolve(path, role_of(path)).recipe)
    assert adapted.resolve("embed", role_of("embed")) == policy.resolve("embed", role_of("embed")) and adapted.name == policy.name
    max_fnuz = formats.get("e4m3fnuz").max
    assert any(f"e4m3 -> e4m3fnuz (max {max_fnuz:g})" in n for n in notes)
    again, again_notes = H.adapt_policy(adapted, H.classify("gpu", "AMD Instinct MI300X"))
    assert again == adapted and not any("switched" in n for n in again_notes)


def test_adapt_policy_keeps_other_recipe_fields():
    policy = P.fp8(recipes.DeepSeekV3(block=64, scale_format="ue8m0"))
    adapted, _ = H.adapt_policy(policy, H.classify("rocm", "AMD Instinct MI300X"))
    assert adapted.resolve("layers_0/mlp/up", role_of("layers_0/mlp/up")).recipe == recipes.DeepSeekV3(
        block=64, scale_format="ue8m0", fwd_format="e4m3fnuz", bwd_format="e4m3fnuz")


def test_adapt_policy_nvidia():
    h100 = H.classify("gpu", "NVIDIA H100 80GB HBM3")
    adapted, notes = H.adapt_policy(P.preset("fp8"), h100)
    assert adapted == P.preset("fp8")
    assert any("block-scaled" in n for n in notes) and not any("emulated" in n for n in notes)
    _, notes = H.adapt_policy(P.preset("fp8_current"), h100)
    assert any("compiled HLO" in n for n in notes)
    fnuz = P.preset("fp8_current").map_recipes(lambda r: dataclasses.replace(r, fwd_format="e4m3fnuz"))
    back, notes = H.adapt_policy(fnuz, h100)  # fnuz -> OCP on OCP hardware
    assert back == P.preset("fp8_current") and any("e4m3fnuz -> e4m3" in n for n in notes)


@pytest.mark.parametrize("kind, backend", [("cpu", "cpu"), ("NVIDIA A100-SXM4-80GB", "gpu"), ("TPU v5 lite", "tpu")])
def test_adapt_policy_emulated_keeps_formats(kind, backend):
    adapted, notes = H.adapt_policy(P.preset("fp8"), H.classify(backend, kind, cpu_flags=X86_BF16))
    assert adapted == P.preset("fp8")
    assert len(notes) == 1 and "FP8 will be emulated on" in notes[0] and "deepseek_v3" in notes[0]


def test_adapt_policy_without_fp8_and_bf16_note():
    v100 = H.classify("gpu", "Tesla V100-SXM2-16GB")
    adapted, notes = H.adapt_policy(P.preset("bf16"), v100)
    assert adapted == P.preset("bf16") and len(notes) == 1 and "bf16 compute is not native" in notes[0]
    assert H.adapt_policy(P.preset("fp32"), v100) == (P.preset("fp32"), [])
    assert H.adapt_policy(P.preset("bf16"), H.classify("cpu", "cpu", cpu_flags=X86_BF16)) == (P.preset("bf16"), [])
    _, notes = H.adapt_policy(P.preset("fp8"), H.classify("cpu", "cpu", cpu_flags=X86_PLAIN))
    assert [n.split(" ")[0] for n in notes] == ["FP8", "bf16"]


def test_policy_recipes_lists_distinct_recipes():
    assert H.policy_recipes(P.preset("fp8")) == [recipes.DeepSeekV3()]
    assert H.policy_recipes(P.preset("bf16")) == []


# --------------------------------------------------------------------------- this machine


def test_detect_this_machine():
    info = H.detect()
    assert info.backend == jax.default_backend()
    assert info.device_kind == jax.devices()[0].device_kind
    assert info.device_count == len(jax.devices())
    if info.backend == "cpu":
        assert not info.fp8_native and any("emulated" in n for n in info.notes)


def test_describe_and_cli():
    info = H.classify("gpu", "AMD Instinct MI300X")
    text = H.describe(info)
    for fragment in ["AMD Instinct MI300X", "gfx942", "fp8 native          yes (e4m3fnuz, e5m2fnuz)",
                     "forward e4m3fnuz, backward e5m2fnuz", "notes:"]:
        assert fragment in text
    out = subprocess.run([sys.executable, "-m", "benchmarks.hardware", "--policy", "fp8"], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    assert H.detect().device_kind in out and "policy 'fp8' on this hardware" in out


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_detect_gpu_matches_table():
    info = H.detect()
    device = jax.devices()[0]
    if info.vendor == "nvidia":
        assert info.compute_capability == str(device.compute_capability)
        assert info.fp8_native == (H._sm(info.compute_capability) >= 89)
        name_cc = H.nvidia_compute_capability(device.device_kind)
        assert name_cc in (None, info.compute_capability)
