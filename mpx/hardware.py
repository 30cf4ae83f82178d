"""What the accelerator can do natively (FP8, BF16), and adapting a policy to it.

`detect()` reads the first JAX device; `classify(...)` does the same from explicit
inputs (backend, device kind, CPU flags) so every branch is testable without the
hardware. Knowledge encoded here (conservative: native only where known):

* NVIDIA: BF16 tensor cores from sm_80 (A100); FP8 (OCP E4M3/E5M2) from sm_89
  (Ada: L4, L40, RTX 40xx) and sm_90 (H100/H200). XLA turns per-tensor scaled f8
  dots into cuBLASLt FP8 GEMMs when it recognises the pattern and silently falls back
  otherwise; block-scaled (1x128/128x128) FP8 has no native XLA path on Hopper.
* AMD: BF16 from MI200 (gfx90a); FP8 on MI300 (gfx942) in the *fnuz* variants
  (e4m3fnuz max 240, e5m2fnuz), OCP formats from MI350 (gfx950).
* TPU: BF16 native; FP8 treated as emulated.
* CPU: BF16 native with avx512_bf16 / amx_bf16 (x86) or bf16 (aarch64); FP8 always
  emulated (XLA upcasts f8 dot operands to f32: exact, not faster).

`python -m benchmarks.hardware [--policy NAME_OR_YAML]` prints the report.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable

import jax.numpy as jnp

from mpx import formats as formats_lib
from mpx import policy as policy_lib
from mpx import recipes as recipes_lib

__all__ = [
    "OCP_FP8", "FNUZ_FP8", "EMULATED_FP8", "HardwareInfo", "nvidia_compute_capability", "amd_arch",
    "cpu_flags", "classify", "detect", "preferred_fp8_formats", "swap_formats", "policy_recipes",
    "adapt_policy", "describe"
]

OCP_FP8 = ("e4m3", "e5m2")
FNUZ_FP8 = ("e4m3fnuz", "e5m2fnuz")
_TO_FNUZ = dict(zip(OCP_FP8, FNUZ_FP8))
_TO_OCP = dict(zip(FNUZ_FP8, OCP_FP8))
_FORMAT_FIELDS = ("fwd_format", "bwd_format")

# (device_kind regex, compute capability); first match wins, so GH200 precedes H200.
_NVIDIA_KINDS = (
    (r"\bG?B[123]00\b|RTX PRO 6000 Blackwell", "10.0"),
    (r"RTX 50\d0", "12.0"),
    (r"\bGH200\b|\bH100\b|\bH200\b|\bH800\b|\bH20\b", "9.0"),
    (r"\bL4\b|\bL40S?\b|\bL20\b|RTX 40\d0|RTX \d000 Ada", "8.9"),
    (r"\bA100\b|\bA800\b|\bA30\b", "8.0"),
    (r"\bA10G?\b|\bA40\b|\bA16\b|\bA2\b|RTX 30\d0|RTX A\d000", "8.6"),
    (r"\bT4\b|RTX 20\d0|TITAN RTX", "7.5"),
    (r"\bV100\b|TITAN V", "7.0"),
    (r"\bP100\b", "6.0"),
)
_AMD_KINDS = (
    (r"gfx950|MI35\dX?", "gfx950"),
    (r"gfx942|MI300[AX]?|MI325X?", "gfx942"),
    (r"gfx90a|MI2[15]0X?", "gfx90a"),
    (r"gfx908|MI100", "gfx908"),
)
_AMD_FP8 = {"gfx942": FNUZ_FP8, "gfx950": OCP_FP8}
_AMD_BF16 = ("gfx90a", "gfx942", "gfx950")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

_UPCAST = "XLA upcasts f8 dot operands to a wider type, so FP8 matmuls are exact but not faster than bf16"
EMULATED_FP8 = f"FP8 will be emulated: {_UPCAST}"


@dataclasses.dataclass(frozen=True)
class HardwareInfo:
    """What one device supports natively.

    Attributes:
      backend: "cpu", "gpu" or "tpu" (or the platform name JAX reported).
      device_kind: JAX's `device.device_kind` ("NVIDIA H100 80GB HBM3", "cpu").
      vendor: "nvidia", "amd", "google", "intel", "arm", ... or "unknown".
      compute_capability: NVIDIA "major.minor" ("9.0"), else None.
      arch: "sm_90", "gfx942", or None when unknown.
      fp8_native: FP8 matmuls run on FP8 hardware units.
      fp8_formats: the FP8 formats the hardware computes natively (empty if none).
      bf16_native: BF16 matmuls run on BF16 hardware units.
      device_count: number of devices of this backend.
      notes: explanations (what is emulated, what to check).
    """

    backend: str
    device_kind: str
    vendor: str
    compute_capability: str | None = None
    arch: str | None = None
    fp8_native: bool = False
    fp8_formats: tuple[str, ...] = ()
    bf16_native: bool = False
    device_count: int = 1
    notes: tuple[str, ...] = ()


def nvidia_compute_capability(device_kind: str) -> str | None:
    """The compute capability ("9.0") of an NVIDIA device kind, or None if unknown."""
    return next((cc for pattern, cc in _NVIDIA_KINDS if re.search(pattern, device_kind, re.I)), None)


def amd_arch(device_kind: str) -> str | None:
    """The gfx architecture ("gfx942") of an AMD device kind or arch string, or None."""
    return next((arch for pattern, arch in _AMD_KINDS if re.search(pattern, device_kind, re.I)), None)


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo text (x86 "flags", aarch64 "Features").

    Args:
      cpuinfo: the text; None reads /proc/cpuinfo (empty set where it does not exist).
    """
    if cpuinfo is None:
        if not os.path.exists("/proc/cpuinfo"):
            return frozenset()
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def _cpu_vendor(cpuinfo: str | None) -> str:
    text = cpuinfo or ""
    if "GenuineIntel" in text:
        return "intel"
    if "AuthenticAMD" in text:
        return "amd"
    return "arm" if "CPU implementer" in text else "unknown"


def _gpu_vendor(backend: str, device_kind: str, compute_capability: str | None) -> str:
    kind = device_kind.lower()
    if backend == "rocm" or any(s in kind for s in ("amd", "instinct", "radeon", "gfx")):
        return "amd"
    if backend == "cuda" or compute_capability or any(s in kind for s in ("nvidia", "tesla", "geforce", "quadro")):
        return "nvidia"
    return "nvidia" if nvidia_compute_capability(device_kind) else "unknown"


def _classify_nvidia(device_kind: str, cc: str | None) -> dict:
    cc = cc or nvidia_compute_capability(device_kind)
    if cc is None:
        return dict(notes=(f"unknown NVIDIA device {device_kind!r}: assuming no native BF16/FP8",))
    sm = _sm(cc)
    fp8 = sm >= 89
    notes = [f"BF16 tensor cores: {'yes' if sm >= 80 else 'no (needs sm_80+)'}"]
    if fp8:
        notes.append("per-tensor scaled FP8 dots can become cuBLASLt FP8 GEMMs; XLA silently falls back to "
                     "a high-precision GEMM when the pattern breaks: check the compiled HLO")
        notes.append("block-scaled FP8 (1x128 / 128x128, the DeepSeek-V3 recipe) has no native XLA GEMM here: "
                     "it runs as dequantize + bf16 dot unless a Pallas kernel is used")
    else:
        notes.append(f"{EMULATED_FP8} (FP8 tensor cores need sm_89+)")
    return dict(compute_capability=cc, arch=f"sm_{sm}", fp8_native=fp8, fp8_formats=OCP_FP8 if fp8 else (),
                bf16_native=sm >= 80, notes=tuple(notes))


def _sm(cc: str) -> int:
    major, _, minor = str(cc).partition(".")
    return int(major) * 10 + int(minor or 0)


def _classify_amd(device_kind: str, cc: str | None) -> dict:
    arch = amd_arch(cc or "") or amd_arch(device_kind)
    if arch is None:
        return dict(notes=(f"unknown AMD device {device_kind!r}: assuming no native BF16/FP8",))
    fp8_formats = _AMD_FP8.get(arch, ())
    notes = []
    if fp8_formats == FNUZ_FP8:
        notes.append(f"FP8 is native in the fnuz formats only (e4m3fnuz max {formats_lib.get('e4m3fnuz').max:g}, "
                     "e5m2fnuz): adapt_policy switches OCP recipes to them; needs ROCm 5.5 or newer")
    elif fp8_formats:
        notes.append(f"FP8 is native in the OCP formats on {arch} (e4m3, e5m2)")
    else:
        notes.append(f"{EMULATED_FP8} (FP8 matrix cores need MI300 / gfx942+)")
    return dict(arch=arch, fp8_native=bool(fp8_formats), fp8_formats=fp8_formats,
                bf16_native=arch in _AMD_BF16, notes=tuple(notes))


def _classify_tpu(device_kind: str) -> dict:
    return dict(arch=device_kind, bf16_native=True,
                notes=("BF16 is native on the MXU", f"{EMULATED_FP8} (mpx assumes no native FP8 on TPU)"))


def _classify_cpu(flags: frozenset[str]) -> dict:
    bf16 = any(f in flags for f in _CPU_BF16_FLAGS)
    found = ", ".join(f for f in _CPU_BF16_FLAGS if f in flags)
    bf16_note = (f"BF16 is native ({found}): bf16 x bf16 dots with f32 accumulation are the fastest CPU matmul"
                 if bf16 else "no avx512_bf16 / amx_bf16 / bf16 flag: bf16 saves memory but expect little or "
                 "no speedup over f32")
    fp8_note = (f"{EMULATED_FP8}; for block-scaled FP8 the fast exact CPU path folds scales into bf16 "
                "operands and runs one bf16 dot with f32 accumulation")
    return dict(bf16_native=bf16, notes=(bf16_note, fp8_note))


def classify(backend: str, device_kind: str, *, cpu_flags: Iterable[str] = (), compute_capability: str | None = None,
             cpuinfo: str | None = None, device_count: int = 1) -> HardwareInfo:
    """What a device supports, from explicit facts (no JAX calls).

    Args:
      backend: "cpu", "gpu", "tpu" (also "cuda" / "rocm", mapped to "gpu").
      device_kind: JAX's device_kind string.
      cpu_flags: CPU feature flags (for backend "cpu").
      compute_capability: the device's reported capability ("9.0", or "gfx942" on ROCm);
        when None it is looked up from `device_kind`.
      cpuinfo: /proc/cpuinfo text, used for the CPU vendor only.
      device_count: number of devices.

    Returns:
      A `HardwareInfo`; unknown devices are reported as neither FP8- nor BF16-native.
    """
    backend = backend.lower()
    fields: dict = {}
    if backend in ("gpu", "cuda", "rocm"):
        vendor = _gpu_vendor(backend, device_kind, compute_capability)
        if vendor == "nvidia":
            fields = _classify_nvidia(device_kind, compute_capability)
        elif vendor == "amd":
            fields = _classify_amd(device_kind, compute_capability)
        backend = "gpu"
    elif backend == "tpu":
        vendor, fields = "google", _classify_tpu(device_kind)
    elif backend == "cpu":
        vendor, fields = _cpu_vendor(cpuinfo), _classify_cpu(frozenset(cpu_flags))
    else:
        vendor = "unknown"
    fields.setdefault("notes", (f"unknown device {backend}/{device_kind!r}: assuming no native BF16/FP8",))
    return HardwareInfo(backend=backend, device_kind=device_kind, vendor=vendor, device_count=device_count, **fields)


def detect(device=None) -> HardwareInfo:
    """Classifies `device` (default: the first JAX device).

    Returns:
      A `HardwareInfo` for the device's backend and kind.
    """
    import jax

    device = device if device is not None else jax.devices()[0]
    backend = device.platform
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    if backend == "gpu" and "rocm" in version:
        backend = "rocm"
    cpuinfo = None
    if backend == "cpu" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    cc = getattr(device, "compute_capability", None)
    return classify(backend, device.device_kind, cpu_flags=cpu_flags(cpuinfo or ""), compute_capability=cc,
                    cpuinfo=cpuinfo, device_count=len(jax.devices(device.platform)))


def preferred_fp8_formats(info: HardwareInfo) -> tuple[str, str]:
    """(forward, backward) FP8 formats for `info`: native ones, else OCP e4m3 / e5m2."""
    formats = info.fp8_formats or OCP_FP8
    return formats[0], formats[1]


def _format_map(info: HardwareInfo) -> dict[str, str]:
    """Which FP8 formats to swap so recipes use the hardware's native family."""
    if not info.fp8_native:
        return {}
    if set(info.fp8_formats) == set(FNUZ_FP8):
        return _TO_FNUZ
    return _TO_OCP if set(info.fp8_formats) == set(OCP_FP8) else {}


def swap_formats(recipe: recipes_lib.Recipe, mapping: dict[str, str]) -> recipes_lib.Recipe:
    """`recipe` with its format fields (fwd_format, bwd_format) renamed by `mapping`."""
    names = {f.name for f in dataclasses.fields(recipe)}
    changes = {k: mapping[getattr(recipe, k)] for k in _FORMAT_FIELDS
               if k in names and getattr(recipe, k) in mapping}
    return dataclasses.replace(recipe, **changes) if changes else recipe


def policy_recipes(policy: policy_lib.Policy) -> list[recipes_lib.Recipe]:
    """The distinct recipes a policy sets (default and rules), in order."""
    found = [policy.default.recipe] + [r.recipe for r in policy.rules]
    return list(dict.fromkeys(r for r in found if r not in (None, policy_lib.INHERIT)))


def adapt_policy(policy: policy_lib.Policy, info: HardwareInfo | None = None) -> tuple[policy_lib.Policy, list[str]]:
    """Fits a policy's FP8 formats to the hardware and says what will be emulated.

    On MI300 (gfx942) OCP e4m3/e5m2 recipe formats become e4m3fnuz/e5m2fnuz (max 240;
    scales come from amax, so they adapt); on OCP-native hardware fnuz formats become
    OCP. Elsewhere formats are kept: emulation is exact in any format.

    Args:
      policy: the policy to adapt.
      info: the hardware (default: `detect()`).

    Returns:
      (adapted policy, notes): notes say which formats changed and where FP8 or BF16
      will be emulated rather than fast.
    """
    info = info if info is not None else detect()
    used = policy_recipes(policy)
    if not used:
        return policy, _bf16_notes(policy, info)
    mapping = _format_map(info)
    swapped = [a for a in mapping if any(a in _formats_of(r) for r in used)]
    if not swapped:
        return policy, _fp8_notes(used, info) + _bf16_notes(policy, info)
    adapted = policy.map_recipes(lambda r: swap_formats(r, mapping))
    changes = ", ".join(f"{a} -> {mapping[a]} (max {formats_lib.get(mapping[a]).max:g})" for a in swapped)
    notes = [f"recipe formats switched to {info.device_kind}'s native FP8: {changes}"]
    return adapted, notes + _fp8_notes(used, info) + _bf16_notes(policy, info)


def _formats_of(recipe: recipes_lib.Recipe) -> set[str]:
    names = {f.name for f in dataclasses.fields(recipe)}
    return {getattr(recipe, k) for k in _FORMAT_FIELDS if k in names}


def _fp8_notes(used: list[recipes_lib.Recipe], info: HardwareInfo) -> list[str]:
    labels = ", ".join(policy_lib.recipe_label(r) for r in used)
    if not info.fp8_native:
        return [f"FP8 will be emulated on {info.device_kind} ({info.backend}) for recipes {labels}: {_UPCAST}"]
    notes = []
    if any(r.tiled for r in used):
        notes.append("deepseek_v3 is block-scaled: XLA has no native block-scaled FP8 GEMM; mpx runs it in its "
                     "Pallas kernel (mpx.kernels.block_fp8, FP8 tensor cores) with impl='fp8' (the GPU default)")
    if any(not r.tiled for r in used):
        notes.append("per-tensor recipes can use native FP8 GEMMs (cuBLASLt / hipBLASLt) when XLA matches the "
                     "scaled-dot pattern and silently fall back otherwise: check the compiled HLO for f8 GEMMs")
    return notes


def _bf16_notes(policy: policy_lib.Policy, info: HardwareInfo) -> list[str]:
    dtypes = [policy.default.compute_dtype] + [r.compute_dtype for r in policy.rules]
    bf16 = jnp.dtype(jnp.bfloat16)
    if info.bf16_native or not any(d is not policy_lib.INHERIT and d == bf16 for d in dtypes):
        return []
    return [f"bf16 compute is not native on {info.device_kind}: expect it to run no faster than f32"]


def describe(info: HardwareInfo | None = None) -> str:
    """A human-readable report of `info` (default: `detect()`)."""
    info = info if info is not None else detect()
    fwd, bwd = preferred_fp8_formats(info)
    yes = {True: "yes", False: "no"}
    rows = [
        ("backend", f"{info.backend} ({info.device_count} device{'s' if info.device_count != 1 else ''})"),
        ("device", info.device_kind),
        ("vendor", info.vendor),
        ("arch", info.arch or "-"),
        ("compute capability", info.compute_capability or "-"),
        ("bf16 native", yes[info.bf16_native]),
        ("fp8 native", yes[info.fp8_native] + (f" ({', '.join(info.fp8_formats)})" if info.fp8_formats else "")),
        ("preferred fp8", f"forward {fwd}, backward {bwd}"),
    ]
    lines = [f"{k:<20}{v}" for k, v in rows] + ["notes:"] + [f"  - {n}" for n in info.notes]
    return "\n".join(lines)
