"""CPU kernels built at install time: decode products that read weights in their stored width.

`decode_matmul(x, w, scale, block)` multiplies a few rows of activations (one per
sequence being decoded) by a weight stored as E4M3FN, E5M2 or bf16, with one float32
scale per block, reading 1 or 2 bytes per weight from memory (`decode_matmul.cc` says
how). XLA's CPU backend instead dequantizes such a weight into a float32 copy before
its dot, so every decoded token reads 4 bytes per weight whatever the format.

The kernel is a shared library that `pip install` compiles from `decode_matmul.cc`
(a C++17 compiler and an x86-64 CPU with AVX2, FMA and F16C). Where it is missing,
`available()` is False, `status()` says why, and the products take XLA's path; the
serving programs print that once (`mpx.kernels.status`). `MPX_CPU_KERNELS=off` turns
it off, for A/B measurements.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mpx.scales import broadcast_scale

__all__ = ["TARGET", "DTYPES", "available", "status", "supports", "decode_matmul"]

TARGET = "mpx_decode_matmul"
# Storage dtypes the kernel decodes (1 or 2 bytes; float32 weights gain nothing).
DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2), jnp.dtype(jnp.bfloat16))
_CPU_FLAGS = ("avx2", "fma", "f16c")
_LIBRARY = "_decode_matmul"


def _library_path() -> Path | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"{_LIBRARY}{suffix}").exists():
            return here / f"{_LIBRARY}{suffix}"
    return None


def _cpu_lacks() -> list[str]:
    """The CPU features the kernel needs that this machine lacks ([] where unknown)."""
    from mpx.hardware import cpu_flags  # late: mpx.hardware imports the policies, which import mpx.dot

    have = cpu_flags()
    return [f for f in _CPU_FLAGS if have and f not in have]


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Registers the kernel with XLA; returns why it cannot be used, or None."""
    if os.environ.get("MPX_CPU_KERNELS", "").lower() in ("0", "off", "false", "no"):
        return "turned off by MPX_CPU_KERNELS"
    path = _library_path()
    if path is None:
        return ("not built: reinstall with a C++17 compiler on PATH (`pip install -e .` compiles "
                "mpx/kernels/decode_matmul.cc)")
    lacks = _cpu_lacks()
    if lacks:
        return f"this CPU lacks {', '.join(lacks)}"
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.MpxDecodeMatmul), platform="cpu")
    except (OSError, AttributeError, RuntimeError) as e:
        return f"{path.name} does not load ({e}); reinstall"
    return None


def available() -> bool:
    """Whether the kernel is built, loads and is not turned off."""
    return _load() is None


def status() -> str:
    """One line: whether decode reads FP8 and bf16 weights in their stored width, and if not why."""
    why = _load()
    if why is None:
        return "CPU decode kernel: on (FP8 weights read as 1 byte, bf16 as 2)"
    return f"CPU decode kernel: off ({why}); FP8 and bf16 weights decode through float32 copies"


def supports(w: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether `w` is a weight the kernel reads: 2-D, stored as E4M3FN, E5M2 or bf16."""
    return len(w.shape) == 2 and jnp.dtype(w.dtype) in DTYPES


def decode_matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None = None,
                  block: tuple[int, int] | None = None, *, transposed: bool = False) -> jax.Array:
    """x (M, K) float32 times a stored weight, float32 sums, reading the weight as stored.

        out[m, n] = sum_k x[m, k] * w[k, n] * scale[k // block[0], n // block[1]]

    With `transposed` the weight is stored (N, K) (a tied LM head) and `block` and
    `scale` are over its own axes. Differentiable (the backward products are XLA's
    float32 dots), so a small training step that lands here still has gradients.

    Args:
      x: (M, K), cast to float32.
      w: (K, N), or (N, K) with `transposed`, in one of `DTYPES`.
      scale: float32 of shape ceil(w.shape / block); None: no scale.
      block: the scale block of w; None: the whole array.
      transposed: whether w is stored (N, K).

    Returns:
      (M, N) float32.

    Raises:
      RuntimeError: the kernel is not available (`status()` says why).
      ValueError: shapes that do not contract, a scale that does not fit the block, a
        dtype outside `DTYPES`.
    """
    why = _load()
    if why is not None:
        raise RuntimeError(f"mpx.kernels.decode_matmul: {why}")
    block = tuple(w.shape) if block is None else tuple(int(b) for b in block)
    if scale is None:
        scale = jnp.ones((1, 1), jnp.float32)
    _check(x, w, scale, block, transposed)
    return _product(block, bool(transposed), jnp.asarray(x, jnp.float32), w, jnp.asarray(scale, jnp.float32))


def _check(x, w, scale, block, transposed: bool) -> None:
    if not supports(w):
        raise ValueError(f"w must be 2-D in {', '.join(d.name for d in DTYPES)}; got {w.dtype}{tuple(w.shape)}")
    k = w.shape[1] if transposed else w.shape[0]
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)} (transposed={transposed}) do not contract")
    want = tuple(-(-n // b) for n, b in zip(w.shape, block)) if min(block) >= 1 else None
    if want is None or tuple(scale.shape) != want:
        raise ValueError(f"scale {tuple(scale.shape)} does not fit w {tuple(w.shape)} in blocks {block}; "
                         f"expected {want}")


def _call(block, transposed, x, w, scale):
    n = w.shape[0] if transposed else w.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32), vmap_method="sequential")
    return call(x, w, scale, block_rows=np.int64(block[0]), block_cols=np.int64(block[1]),
                transposed=np.int64(transposed))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _product(block, transposed, x, w, scale):
    return _call(block, transposed, x, w, scale)


def _fwd(block, transposed, x, w, scale):
    return _call(block, transposed, x, w, scale), (x, w, scale)


def _bwd(block, transposed, residuals, g):
    """The backward products in float32 (the scale is a constant: its cotangent is 0)."""
    x, w, scale = residuals
    s = broadcast_scale(scale, w.shape, block)
    wd = w.astype(jnp.float32) * s
    dx = g @ wd if transposed else g @ wd.T
    dwd = (x.T @ g).T if transposed else x.T @ g
    return dx, (dwd * s).astype(w.dtype), jnp.zeros_like(scale)


_product.defvjp(_fwd, _bwd)
