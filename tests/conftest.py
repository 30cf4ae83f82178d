"""Shared pytest setup: float64 off, and tests marked `gpu` skip (with a reason) without one.

On a machine without an NVIDIA driver, JAX_PLATFORMS defaults to "cpu" (for this process
and the programs the tests start): with jax's CUDA plugin installed (the gpu-compile
extra, for `mpx.aot`) jax would otherwise try the GPU first and print its cuInit failure.

Compiled programs go to jax's persistent compilation cache in the system's temporary
folder (JAX_COMPILATION_CACHE_DIR, for this process, the other xdist worker and the
programs the tests start): many tests compile the same small train and serving steps,
and a cache hit takes a fraction of a compile. Entries are keyed by the program, the
compile options, the jax version and the device, so a stale one is never used.

XLA_FLAGS (e.g. a host device count) is deliberately not set here: tests that need
several devices start their own subprocess.
"""

import os
import tempfile
from pathlib import Path

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mpx-tests-jax-cache"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


def _gpu_skip_reason() -> str | None:
    """None when an NVIDIA GPU with FP8 (compute capability >= 8.9) is present, else why not."""
    backend = jax.default_backend()
    if backend != "gpu":
        return f"needs an NVIDIA GPU with FP8 support; jax backend is {backend!r}"
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if capability is not None and tuple(int(p) for p in str(capability).split(".")) < (8, 9):
        return f"needs FP8 support (compute capability >= 8.9); this GPU has {capability}"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return  # do not initialize a backend when nothing asks for one
    reason = _gpu_skip_reason()
    if reason is not None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
