"""Block-scaled FP8 GEMM for GPUs with FP8 tensor cores (Hopper: FP8 WGMMA), in Pallas.

`matmul(a, sa, b, sb)` computes `y[i, j] = sum_g (a_g . b_g)[i, j] * sa[i, g] * sb[g, j]`:
a (M, K) and b (K, N) (or (N, K), `b_layout="nk"`) hold FP8 values, sa (M, G) and sb (G, N)
are float32 scales per row and per column of each K group of `group` elements. Every operand of DeepSeek-V3's recipe fits that form: a 1x128 tile
scales one row of one group, a 128x128 weight block scales 128 columns of one group
(`mpx.dot.backends` broadcasts them to rows and columns).

One program computes one (128 x 128) tile of y. For each K group it multiplies the two
FP8 tiles on the tensor cores, promotes the partial sums to the float32 accumulator in
registers with their two scales (DeepSeek-V3 section 3.3.2: promotion every 128 of K),
and writes the tile once in the output dtype. The MMA accumulates at most one group
imprecisely (`max_num_imprecise_acc = group`), which lets Triton use Hopper's FP8 WGMMA;
Pallas' own dot asks for full-precision accumulation, which Triton only has for FP8 by
upcasting to f16 (`mma.sync ... f16`).

The FP8 MMA is a primitive of mpx (`fp8_mma_p`) lowered to Triton's `tt.dot` through
Pallas' Triton lowering table: jax has no public way to set an MMA's accumulation
precision. On other platforms (and in Pallas interpret mode, the CPU correctness check)
it is an f32 `dot_general` of the FP8 values: exact products, f32 sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.extend import core as jex_core
from jax.interpreters import mlir

__all__ = ["GROUPS", "LAYOUTS", "TILE", "available", "fp8_mma_p", "lowering_status", "matmul"]

TILE = 128  # rows and columns of y per program (M is padded to a multiple of 64 below 128 rows)
GROUPS = (32, 64, 128, 256)  # K group widths the kernel takes (FP8 WGMMA steps K by 32)


LAYOUTS = ("kn", "nk")


def _mma_reference(a, b, *, b_layout: str):
    """a (m, k) . b, b (k, n) ("kn") or (n, k) ("nk"): f32 sums of exact products."""
    contract = 0 if b_layout == "kn" else 1
    return lax.dot_general(a, b, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32)


def _mma_shape(a, b, *, b_layout: str):
    return jax.core.ShapedArray((a.shape[0], b.shape[1 if b_layout == "kn" else 0]), jnp.float32)


fp8_mma_p = jex_core.Primitive("mpx_fp8_mma")
fp8_mma_p.def_impl(_mma_reference)
fp8_mma_p.def_abstract_eval(_mma_shape)
mlir.register_lowering(fp8_mma_p, mlir.lower_fun(_mma_reference, multiple_results=False))


def _register_triton_lowering() -> str | None:
    """Adds `fp8_mma_p` to Pallas' Triton lowering table; returns why it cannot, or None."""
    try:
        from jax._src.pallas.triton import lowering as triton_lowering
        from jaxlib.triton import dialect as tt
    except ImportError as e:  # a jax without Pallas' Triton backend
        return f"jax has no Pallas Triton lowering ({e})"
    ir = triton_lowering.ir

    def rule(ctx, a, b, *, b_layout: str):
        (m, k), (n,) = ctx.avals_in[0].shape, ctx.avals_out[0].shape[1:]
        acc = triton_lowering._zeros(ir.RankedTensorType.get([m, n], ir.F32Type.get()))
        return tt.dot(a, b if b_layout == "kn" else tt.trans(b, (1, 0)), acc, max_num_imprecise_acc=k)

    triton_lowering.triton_lowering_rules[fp8_mma_p] = rule
    return None


_LOWERING = _register_triton_lowering()


def available() -> bool:
    """Whether the kernel can be compiled for a GPU with this jax (Pallas' Triton lowering)."""
    return _LOWERING is None


def lowering_status() -> str:
    """One line: whether the kernel can be compiled for a GPU with this jax."""
    return "FP8 WGMMA via Pallas Triton" if _LOWERING is None else f"unavailable: {_LOWERING}"


def _kernel(a_ref, b_ref, sa_ref, sb_ref, o_ref, *, groups: int, group: int, b_layout: str):
    def add_group(g, acc):
        a = a_ref[:, pl.ds(g * group, group)]
        b = b_ref[pl.ds(g * group, group), :] if b_layout == "kn" else b_ref[:, pl.ds(g * group, group)]
        partial = fp8_mma_p.bind(a, b, b_layout=b_layout)  # (rows, cols) f32 partial sums of one K group
        return acc + partial * sa_ref[:, pl.ds(g, 1)] * sb_ref[pl.ds(g, 1), :]

    acc = lax.fori_loop(0, groups, add_group, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _check(a, sa, b, sb, group: int, b_layout: str) -> None:
    if b_layout not in LAYOUTS:
        raise ValueError(f"b_layout must be one of {LAYOUTS}; got {b_layout!r}")
    k_axis = 0 if b_layout == "kn" else 1
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[k_axis]:
        raise ValueError(f"a (M, K) and b ({b_layout.upper()[0]}, {b_layout.upper()[1]}) must share K; got {a.shape} "
                         f"and {b.shape}")
    for name, x in (("a", a), ("b", b)):
        if jnp.dtype(x.dtype).itemsize != 1 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must hold FP8 values (float8_e4m3fn, float8_e5m2); got {x.dtype}")
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}; got {group}")
    groups = -(-a.shape[1] // group)
    n = b.shape[1 - k_axis]
    if sa.shape != (a.shape[0], groups) or sb.shape != (groups, n):
        raise ValueError(f"scales must be sa (M, G) = {(a.shape[0], groups)} and sb (G, N) = "
                         f"{(groups, n)} for K = {a.shape[1]} in groups of {group}; "
                         f"got {sa.shape} and {sb.shape}")


def _pad(x, axis: int, size: int):
    extra = size - x.shape[axis]
    return x if extra == 0 else jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])


@functools.partial(jax.jit, static_argnames=("group", "b_layout", "out_dtype", "interpret"))
def matmul(a, sa, b, sb, *, group: int = 128, b_layout: str = "kn", out_dtype=jnp.bfloat16,
           interpret: bool = False):
    """y = sum_g (a_g . b_g) * sa[:, g] * sb[g, :], f32 partial sums, in `out_dtype`.

    Args:
      a: (M, K) FP8 values.
      sa: (M, G) float32 scales, G = ceil(K / group).
      b: (K, N) FP8 values, or (N, K) with `b_layout="nk"` (read in place either way).
      sb: (G, N) float32 scales.
      group: K elements per scale group (one of `GROUPS`).
      b_layout: "kn" or "nk" (`LAYOUTS`).
      out_dtype: the dtype y is written in, once.
      interpret: run the kernel in Pallas interpret mode (any platform; for checks).

    Returns:
      (M, N) `out_dtype`. Ragged shapes are padded with zeros to whole tiles and groups
      (which add nothing to the sums) and the padding is cut off.

    Raises:
      ValueError, TypeError: for shapes or dtypes that do not fit the description above.
    """
    _check(a, sa, b, sb, group, b_layout)
    kn = b_layout == "kn"
    m, n = a.shape[0], b.shape[1 if kn else 0]
    groups = sa.shape[1]
    rows = TILE if m > 64 else 64  # FP8 WGMMA takes 64 rows at a time
    mp, np_, kp = -(-m // rows) * rows, -(-n // TILE) * TILE, groups * group
    a, b = _pad(_pad(a, 0, mp), 1, kp), _pad(_pad(b, 1 if kn else 0, np_), 0 if kn else 1, kp)
    sa, sb = _pad(sa.astype(jnp.float32), 0, mp), _pad(sb.astype(jnp.float32), 1, np_)
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        params = pl_triton.CompilerParams(num_warps=4, num_stages=3)
    y = pl.pallas_call(
        functools.partial(_kernel, groups=groups, group=group, b_layout=b_layout),
        grid=(mp // rows, np_ // TILE),
        in_specs=[pl.BlockSpec((rows, kp), lambda i, j: (i, 0)),
                  pl.BlockSpec((kp, TILE), lambda i, j: (0, j)) if kn else pl.BlockSpec((TILE, kp), lambda i, j: (j, 0)),
                  pl.BlockSpec((rows, groups), lambda i, j: (i, 0)),
                  pl.BlockSpec((groups, TILE), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((rows, TILE), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        interpret=interpret,
        compiler_params=params,
        name="mpx_block_fp8_gemm",
    )(a, b, sa, sb)
    return y[:m, :n]
