"""The machine a computation is compiled for: one value that every machine-dependent
choice of `mpx.dot` reads.

Which GEMM implementation "auto" means, whether bf16 dots need XLA-on-CPU optimization
barriers, when a product is decode-sized, the chunk sizes of block-scaled products:
all of it follows from a `Target`. `current()` gives the target of the computation
being traced:

1. the device kind of the mesh set with `jax.sharding.set_mesh` (a mesh of real
   devices, or of a topology compiled for ahead of time, `mpx.aot`), else
2. the host's default device: the one place where mpx asks jax for its default backend.

The mesh is part of what `jax.jit` caches a trace under, so a function traced for an
H100 topology and for the host gets one trace each. The dot functions also take an
explicit `target=` (tests use it to shrink chunk sizes).

Example:
    >>> import mpx
    >>> mpx.target.current().platform in ("cpu", "gpu", "tpu")
    True
    >>> mpx.target.Target("gpu", "NVIDIA H100 80GB HBM3").fp8_gemms
    True
"""

from __future__ import annotations

import dataclasses
import functools

import jax

__all__ = ["PLATFORMS", "Target", "current", "of_device", "host"]

PLATFORMS = ("cpu", "gpu", "tpu")
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: the platform, the device kind, and the CPU tuning sizes.

    Attributes:
      platform: "cpu", "gpu" or "tpu" ("cuda" and "rocm" are read as "gpu").
      device_kind: as jax reports it ("NVIDIA H100 80GB HBM3", "cpu"); "" if unknown.
      fold_max_rows: on CPU, the most rows (tokens per batch entry) of a product that
        runs as a decode product (an f32 dot, or the CPU decode kernel): for so few rows
        XLA's CPU backend runs a bf16 dot as an f32 dot of upcast operands anyway.
        Training products have batch x sequence rows and never reach it.
      row_chunk: rows per chunk of a block-scaled product with several K groups on
        CPU (`mpx.dot.backends.grouped_product`).
      col_chunk: columns per f32 GEMM when many K groups are dequantized on CPU.
      interpret: run the target's Pallas kernels (`mpx.kernels.block_fp8`) in Pallas
        interpret mode, on whatever runs the program: how a GPU target's program is
        checked on CPU.

    Raises:
      ValueError: for an unknown platform or a non-positive size.
    """

    platform: str
    device_kind: str = ""
    fold_max_rows: int = 16
    row_chunk: int = 1024
    col_chunk: int = 256
    interpret: bool = False

    def __post_init__(self):
        platform = _PLATFORM_ALIASES.get(self.platform, self.platform)
        if platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {PLATFORMS} (or 'cuda', 'rocm'); got {self.platform!r}")
        object.__setattr__(self, "platform", platform)
        for name in ("fold_max_rows", "row_chunk", "col_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")

    @property
    def is_cpu(self) -> bool:
        return self.platform == "cpu"

    @property
    def barriers(self) -> bool:
        """Whether bf16 dots go behind optimization barriers: XLA on CPU folds the
        transposes around a bf16 dot into it after choosing its kernel, and its fallback
        kernel rejects bf16 x bf16 -> f32."""
        return self.is_cpu

    @property
    def compute_capability(self) -> str | None:
        """An NVIDIA GPU's compute capability from its device kind ("9.0"), else None."""
        if self.platform != "gpu":
            return None
        from mpx.hardware import nvidia_compute_capability  # late: mpx.hardware imports mpx.policy

        return nvidia_compute_capability(self.device_kind)

    @property
    def fp8_gemms(self) -> bool:
        """Whether the target multiplies FP8 operands in its tensor cores (NVIDIA sm_89+)."""
        cc = self.compute_capability
        return cc is not None and tuple(int(p) for p in cc.split(".")) >= (8, 9)

    @property
    def default_impl(self) -> str:
        """The `mpx.dot` implementation "auto" stands for: FP8 GEMMs on a GPU, else bf16
        GEMMs of the upcast grid values ("upcast_bf16")."""
        return "fp8" if self.platform == "gpu" else "upcast_bf16"

    def decode_sized(self, rows: int) -> bool:
        """Whether a product of `rows` rows runs as a decode product here (CPU only)."""
        return self.is_cpu and rows <= self.fold_max_rows


def of_device(device) -> Target:
    """The target of a jax device or `jax.sharding.AbstractDevice` (its platform and kind)."""
    return Target(device.platform, device.device_kind)


@functools.lru_cache(maxsize=None)
def host() -> Target:
    """The target of the host's default device."""
    platform = jax.default_backend()
    return Target(platform, jax.devices(platform)[0].device_kind)


def current(target: Target | None = None) -> Target:
    """`target` when given; else the device of the mesh set for the computation being
    traced (`jax.sharding.set_mesh`), else the host's (`host`)."""
    if target is not None:
        if not isinstance(target, Target):
            raise TypeError(f"target must be an mpx.target.Target; got {type(target).__name__}")
        return target
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return host() if device is None else of_device(device)
