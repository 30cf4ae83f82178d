"""Compile for a machine that is not here: an H100 from a CPU-only laptop (deviceless AOT).

XLA compiles for a GPU it does not have from a description of it (a `GpuTargetConfig`,
`mpx/gpu_targets/*.txtpb`). `mesh("h100")` is a mesh over such a topology; a function
traced and compiled under it (`compile`) is optimized GPU HLO with the PTX of its
kernels, so `mpx.inspect.fp8_report` says which GEMMs would run in FP8 and
`memory_analysis()` how much memory they would take. `mpx.target.current()` reads the
mesh's device, so every `mpx.dot` choice is made for the H100, not for the host.

Example (needs jax's CUDA plugin, `pip install -e ".[gpu-compile]"`; on a machine
without a GPU set JAX_PLATFORMS=cpu before jax starts, or the plugin fails at cuInit):

    mesh = mpx.aot.mesh("h100")
    compiled = mpx.aot.compile(step, x, w, mesh=mesh)     # arrays or ShapeDtypeStructs
    print(mpx.inspect.fp8_report(compiled))

Two facts that decide the result: the target config's `runtime_version` must be set, or
XLA compiles FP8 patterns into f32 GEMMs; and without a device the autotuner cannot
measure, so `compile` turns Triton GEMM fusions off (they would all be untuned).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["COMPILER_OPTIONS", "TARGETS", "compile", "mesh", "status"]

_CONFIGS = Path(__file__).parent / "gpu_targets"
TARGETS = tuple(sorted(p.stem for p in _CONFIGS.glob("*.txtpb")))
COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def status() -> str | None:
    """Why this machine cannot compile for a GPU, or None when it can."""
    if not any(_installed(p) for p in _PLUGINS):
        return "jax's CUDA plugin is not installed: pip install -e \".[gpu-compile]\""
    return None


def mesh(target: str = "h100", devices: int = 1, axis_names: tuple[str, ...] = ("data",)) -> jax.sharding.Mesh:
    """A mesh of `devices` GPUs of kind `target` (one of `TARGETS`) that need not exist.

    Raises:
      ValueError: an unknown target or a device count that is not positive.
      RuntimeError: without jax's CUDA plugin, or when it cannot start (say how).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}; got {target!r}")
    if devices < 1:
        raise ValueError(f"devices must be a positive integer; got {devices!r}")
    why = status()
    if why is not None:
        raise RuntimeError(f"cannot compile for {target}: {why}")
    config = (_CONFIGS / f"{target}.txtpb").read_text()
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"1x1x{devices}")
    except Exception as e:  # the plugin raises XlaRuntimeError / RuntimeError with its own text
        raise RuntimeError(f"cannot compile for {target}: the CUDA plugin did not start ({e}); on a machine "
                           "without a GPU set JAX_PLATFORMS=cpu before jax starts") from e
    shape = (devices,) + (1,) * (len(axis_names) - 1)
    return topologies.make_mesh(topology, shape, axis_names)


def _placed(x, mesh: jax.sharding.Mesh):
    """x as an abstract value on `mesh`: its own sharding when it has one there, else
    replicated (a Python number: a scalar of its jax dtype)."""
    if not hasattr(x, "shape"):
        x = jax.numpy.asarray(x)
    sharding = getattr(x, "sharding", None)
    if not (isinstance(sharding, NamedSharding) and sharding.mesh == mesh):
        sharding = NamedSharding(mesh, PartitionSpec())
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def compile(fn, *args, mesh: jax.sharding.Mesh, static_argnums=()):  # noqa: A001 (jax's word)
    """`jax.jit(fn)` lowered and compiled for `mesh`'s devices (see `mesh`).

    Args:
      fn: the function to compile.
      *args: pytrees of arrays or `jax.ShapeDtypeStruct`s (only shapes, dtypes and
        shardings are read; leaves without a sharding on `mesh` are replicated), or the
        static values at `static_argnums`.
      mesh: a mesh from `mesh(...)` (or of real devices).
      static_argnums: as in `jax.jit`.

    Returns:
      The `jax.stages.Compiled`: `.as_text()` is the optimized HLO of the target,
      `.memory_analysis()` its memory.
    """
    structs = [a if i in static_argnums else jax.tree.map(lambda x: _placed(x, mesh), a) for i, a in enumerate(args)]
    with jax.sharding.set_mesh(mesh):
        lowered = jax.jit(fn, static_argnums=static_argnums).lower(*structs)
        return lowered.compile(compiler_options=COMPILER_OPTIONS)
