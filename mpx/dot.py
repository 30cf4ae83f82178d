"""Differentiable FP8 `dot_general` and `einsum`: quantized forward, dgrad and wgrad.

    out = dequantize(q(lhs)) . dequantize(q(rhs))        accumulated in float32

`dot_general(lhs, rhs, dimension_numbers, recipe=...)` quantizes both operands as the
recipe says, multiplies them with float32 accumulation and returns
`preferred_element_type`. Its gradient (a `jax.custom_vjp`) runs the two backward
matmuls in FP8 too:

    dgrad   d_lhs = dY . rhs^T      (contracts over rhs's free dims)
    wgrad   d_rhs = lhs^T . dY      (contracts over lhs's free dims, e.g. tokens)

Canonical layout. Any `dimension_numbers` are mapped by transposes and reshapes onto
`lhs (B, M, K) x rhs (B, K, N) -> (B, M, N)` (no B axis without batch dims). Several
contracting dims are flattened into K in the order given, and scale blocks run along
that flattened K. All granularities below are in these canonical coordinates.

Which scale groups each operand gets (`plan(recipe)` returns them):

| recipe | fprop lhs | fprop rhs | dY (dgrad) | rhs (dgrad) | lhs (wgrad) | dY (wgrad) |
|---|---|---|---|---|---|---|
| Current/Delayed/Static | tensor E4M3 | tensor E4M3 | tensor E5M2 | reused | reused | reused |
| DeepSeekV3, weight rhs | 1x128 | 128x128 | 1x128 | reused 128x128 | 128x1 | 128x1 |
| DeepSeekV3, activation rhs | 1x128 | 128x1 | 1x128 | 1x128 | 128x1 | 128x1 |

i.e. every block-scaled operand is grouped `block` wide along the contraction dim of the
matmul it feeds (DeepSeek-V3 report, section 3.3), and output gradients are tiled per
token (1x128), never in 128x128 blocks. A backward operand whose spec equals the forward
spec of the same tensor reuses the forward quantization.

Scale state. Gradients are always scaled just in time (current scaling), even under
`DelayedScaling`: delayed-scaling state is only used for forward operands, so no amax
travels through the gradient channel and microbatch accumulation of scale state is a
plain `mpx.recipes.merge_amax_trees` of the returned states. With a stateful recipe
(`DelayedScaling`, `StaticScaling`) pass `state=init_state(recipe)`; the call returns
`(out, new_state)`. Delayed scaling quantizes with scales from the *old* history (the
operand's own amax when the history is still empty) and records this call's amax in
`new_state`. Two microbatches that start from the same state therefore produce states
whose merge holds, at history[0], the max of both observations. The state never gets a
gradient (it passes through `lax.stop_gradient`).

Implementations of the quantized matmul (`impl`):

* "fp8": per-tensor scales use the Hopper pattern `dot(convert(f8) * s_a, convert(f8) *
  s_b)`, which XLA rewrites into a cuBLASLt FP8 GEMM on H100/H200. Block scales have no
  native XLA path on Hopper: they fall back to the "upcast_bf16" computation.
* "upcast_bf16": fold each block scale into its operand while upcasting to bf16 (per-
  tensor scales instead multiply the f32 result), then one bf16 x bf16 dot with f32
  accumulation. Exact for power-of-two scales; otherwise the fold adds at most 2^-9
  relative error per element (E4M3 itself has 2^-4). The fastest path on CPU.
* "dequant_f32": the exact reference: dequantize to float32, float32 dot (HIGHEST).
* "auto": "fp8" on GPU backends, "upcast_bf16" elsewhere.

Serving's `prequantized_matmul` adds "fold_f32" (both operands dequantized into f32,
one f32 dot), which "auto" picks on CPU for decode-sized products (at most
`FOLD_MAX_ROWS` rows): there XLA runs a bf16 dot as an f32 dot anyway, and it computes
the loop-invariant weight dequantization once per compiled decode call. `rounded_dot`
does the same for the unquantized bf16 matmuls of a decode step (attention, LM head).

On CPU the bf16 GEMMs keep the two layouts XLA's fast kernel takes, (M, K) x (K, N) and
(M, K) x (N, K): wgrad's lhs^T is materialized while it is quantized, and optimization
barriers stop XLA from folding a neighbouring transpose into the dot after it picked its
kernel (its fallback kernel rejects bf16 x bf16 -> f32 on jax 0.10).

Example:
    >>> import jax, jax.numpy as jnp, mpx, mpx.dot
    >>> x = jax.random.normal(jax.random.key(0), (64, 256))
    >>> w = jax.random.normal(jax.random.key(1), (256, 32))
    >>> y = mpx.dot.dot_general(x, w, (((1,), (0,)), ((), ())), recipe=mpx.recipes.DeepSeekV3())
    >>> bool(mpx.metrics.relative_error(y, x @ w) < 0.06)
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from mpx import formats as formats_lib
from mpx import recipes as recipes_lib
from mpx.formats import Format, upcast
from mpx.recipes import AmaxHistory
from mpx.scaled import (
    Blocks,
    PerTensor,
    ScaledArray,
    compute_scale,
    dequantize,
    quantize,
    quantize_with_scale,
    resolve_block,
    scale_shape,
)

IMPLS = ("auto", "upcast_bf16", "fp8", "dequant_f32")
RHS_KINDS = ("weight", "activation")

# --------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class OperandSpec:
    """How one matmul operand is quantized (in canonical coordinates).

    Attributes:
      fmt: element format name ("e4m3", "e5m2", ...).
      granularity: PerTensor() or Blocks over the trailing two canonical axes.
      pow2: power-of-two scales.
      margin: headroom in powers of two below the format's max.
    """

    fmt: str
    granularity: PerTensor | Blocks
    pow2: bool = False
    margin: float = 0.0


@dataclasses.dataclass(frozen=True)
class DotPlan:
    """The quantization of all six operands of a forward and backward matmul.

    Canonical shapes: lhs (M, K), rhs (K, N), dY (M, N), each with a leading batch
    axis when the dot has batch dims.

    Attributes:
      fprop_lhs, fprop_rhs: forward operands (contract over K).
      dgrad_dy, dgrad_rhs: d_lhs = dY . rhs^T (contract over N).
      wgrad_lhs, wgrad_dy: d_rhs = lhs^T . dY (contract over M).
    """

    fprop_lhs: OperandSpec
    fprop_rhs: OperandSpec
    dgrad_dy: OperandSpec
    dgrad_rhs: OperandSpec
    wgrad_lhs: OperandSpec
    wgrad_dy: OperandSpec


def plan(recipe, rhs_kind: str = "weight") -> DotPlan:
    """The operand quantization a recipe gives (see the table in the module docstring).

    Args:
      recipe: a recipe object or name (not None).
      rhs_kind: "weight" (128x128 blocks under DeepSeekV3) or "activation" (1x128-style
        tiles along the contraction dim).

    Returns:
      A `DotPlan`.

    Raises:
      ValueError: for an unknown recipe or rhs_kind.
    """
    recipe = recipes_lib.get(recipe)
    _check_choice("rhs_kind", rhs_kind, RHS_KINDS)
    if recipe is None:
        raise ValueError("plan needs a recipe; recipe=None means an unquantized dot")
    if isinstance(recipe, recipes_lib.DeepSeekV3):
        return _deepseek_plan(recipe, rhs_kind)
    fwd = OperandSpec(recipe.fwd_format, PerTensor(), recipe.pow2_scale, recipe.margin)
    bwd = OperandSpec(recipe.bwd_format, PerTensor(), recipe.pow2_scale, recipe.margin)
    return DotPlan(fwd, fwd, bwd, fwd, fwd, bwd)


def _deepseek_plan(recipe: recipes_lib.DeepSeekV3, rhs_kind: str) -> DotPlan:
    b, pow2 = recipe.block, recipe.pow2_scale
    along_k_of_lhs = Blocks((1, b))  # rows (tokens) x 128 contraction channels
    along_k_of_rhs = Blocks((b, 1))  # 128 contraction channels x columns
    act = functools.partial(OperandSpec, pow2=pow2)
    if rhs_kind == "weight":
        fprop_rhs = dgrad_rhs = act(recipe.fmt, Blocks((b, b)))
    else:
        fprop_rhs, dgrad_rhs = act(recipe.fmt, along_k_of_rhs), act(recipe.fmt, along_k_of_lhs)
    return DotPlan(
        fprop_lhs=act(recipe.fmt, along_k_of_lhs),
        fprop_rhs=fprop_rhs,
        dgrad_dy=act(recipe.grad_format, along_k_of_lhs),  # per token, 128 out-features
        dgrad_rhs=dgrad_rhs,
        wgrad_lhs=act(recipe.fmt, along_k_of_rhs),  # 128 tokens x 1 channel
        wgrad_dy=act(recipe.grad_format, along_k_of_rhs),
    )


# --------------------------------------------------------------------------- state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DotState:
    """Forward scale state of one quantized dot (delayed or static scaling).

    Attributes:
      lhs: amax history of the lhs operand.
      rhs: amax history of the rhs operand.
    """

    lhs: AmaxHistory
    rhs: AmaxHistory


def init_state(recipe) -> DotState:
    """A fresh `DotState` for a stateful recipe (DelayedScaling, StaticScaling).

    Raises:
      ValueError: if the recipe keeps no state.
    """
    recipe = recipes_lib.get(recipe)
    if not recipes_lib.is_stateful(recipe):
        raise ValueError(f"recipe {recipe!r} keeps no scale state; only DelayedScaling and StaticScaling do")
    return DotState(lhs=recipe.init_state(), rhs=recipe.init_state())


def _check_state(recipe, state) -> None:
    if recipes_lib.is_stateful(recipe) and state is None:
        raise ValueError(
            f"recipe {recipe.name!r} needs scale state: pass state=mpx.dot.init_state(recipe) "
            "and keep the new_state that dot_general returns"
        )
    if state is None:
        return
    if not recipes_lib.is_stateful(recipe):
        raise ValueError(f"state was given but recipe {recipe!r} keeps no scale state; pass state=None")
    if not isinstance(state, DotState):
        raise TypeError(f"state must be a DotState (from mpx.dot.init_state); got {type(state).__name__}")
    if isinstance(recipe, recipes_lib.DelayedScaling):
        for name, h in (("lhs", state.lhs), ("rhs", state.rhs)):
            if h.history.shape != (recipe.history,):
                raise ValueError(
                    f"state.{name} history has shape {h.history.shape}; recipe wants ({recipe.history},)"
                )


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How lhs and rhs map onto canonical (B, M, K) x (B, K, N) and back."""

    lhs_perm: tuple[int, ...]
    rhs_perm: tuple[int, ...]
    lhs_shape: tuple[int, ...]  # canonical
    rhs_shape: tuple[int, ...]
    out_shape: tuple[int, ...]  # lax.dot_general's output layout

    @property
    def batched(self) -> bool:
        return len(self.lhs_shape) == 3


def _axes(dims, ndim: int, what: str) -> tuple[int, ...]:
    out = tuple(int(d) % ndim if -ndim <= int(d) < ndim else -1 for d in dims)
    if -1 in out or len(set(out)) != len(out):
        raise ValueError(f"{what} {tuple(dims)} are not distinct axes of a rank-{ndim} operand")
    return out


def _layout(lhs_shape, rhs_shape, dimension_numbers) -> _Layout:
    try:
        (lc, rc), (lb, rb) = dimension_numbers
    except (TypeError, ValueError):
        raise ValueError(
            f"dimension_numbers must be ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)); "
            f"got {dimension_numbers!r}"
        ) from None
    lc, lb = _axes(lc, len(lhs_shape), "lhs dims"), _axes(lb, len(lhs_shape), "lhs batch dims")
    rc, rb = _axes(rc, len(rhs_shape), "rhs dims"), _axes(rb, len(rhs_shape), "rhs batch dims")
    _check_paired(lhs_shape, rhs_shape, lc, rc, "contracting")
    _check_paired(lhs_shape, rhs_shape, lb, rb, "batch")
    if set(lc) & set(lb) or set(rc) & set(rb):
        raise ValueError(f"an axis is both contracting and batch in {dimension_numbers!r}")
    lf = tuple(i for i in range(len(lhs_shape)) if i not in lc + lb)
    rf = tuple(i for i in range(len(rhs_shape)) if i not in rc + rb)
    size = lambda shape, axes: math.prod(shape[i] for i in axes)  # noqa: E731
    batch = (size(lhs_shape, lb),) if lb else ()
    m, k, n = size(lhs_shape, lf), size(lhs_shape, lc), size(rhs_shape, rf)
    out_shape = tuple(lhs_shape[i] for i in lb + lf) + tuple(rhs_shape[i] for i in rf)
    return _Layout(lb + lf + lc, rb + rc + rf, batch + (m, k), batch + (k, n), out_shape)


def _check_paired(lhs_shape, rhs_shape, la, ra, what: str) -> None:
    if len(la) != len(ra) or any(lhs_shape[i] != rhs_shape[j] for i, j in zip(la, ra)):
        raise ValueError(
            f"{what} dims do not pair up: lhs{tuple(lhs_shape)} axes {la} vs rhs{tuple(rhs_shape)} axes {ra}"
        )


def _to_canonical(x: jax.Array, perm, shape) -> jax.Array:
    return jnp.transpose(x, perm).reshape(shape)


def _dims(batched: bool, lhs_contract: int, rhs_contract: int):
    """dimension_numbers on canonical rank-2/3 arrays, contracting the given trailing axis."""
    if batched:
        return (((lhs_contract + 1,), (rhs_contract + 1,)), ((0,), (0,)))
    return (((lhs_contract,), (rhs_contract,)), ((), ()))


# --------------------------------------------------------------------------- operands

# A prepared operand is what a dot consumes: (values, scalar or None). The result of
# the dot is multiplied by the scalars; block scales are already folded into values.
Prepared = tuple[jax.Array, jax.Array | None]


def _quantize(x: jax.Array, spec: OperandSpec, scale: jax.Array | None = None) -> ScaledArray:
    if scale is not None:
        return quantize_with_scale(x, scale, spec.fmt, resolve_block(spec.granularity, x.shape))
    return quantize(x, spec.fmt, spec.granularity, pow2_scale=spec.pow2, margin=spec.margin)


def _block_amax(x: jax.Array, block) -> jax.Array:
    """max |x| per block, equal to `mpx.compute_amax` (NaN included).

    max(max x, -min x) instead of max |x|, and no split for size-1 block axes: XLA on
    CPU reduces that 3-5x faster. Zero padding of ragged blocks cannot raise it (>= 0).
    """
    pads = [(0, -d % b) for d, b in zip(x.shape, block)]
    if any(p for _, p in pads):
        x = jnp.pad(x, pads)
    split, axes = [], []
    for d, b in zip(x.shape, block):
        split += [d] if b == 1 else [d // b, b]
        if b != 1:
            axes.append(len(split) - 1)
    xb = x.reshape(split)
    amax = jnp.maximum(jnp.max(xb, axis=tuple(axes)), -jnp.min(xb, axis=tuple(axes)))
    return amax.astype(jnp.float32).reshape(scale_shape(x.shape, block))


def _broadcast(scale: jax.Array, shape, block) -> jax.Array:
    """Each per-block value repeated over its block, trimmed to `shape`."""
    inter = [v for n in scale.shape for v in (n, 1)]
    full = [v for n, b in zip(scale.shape, block) for v in (n, b)]
    out = jnp.broadcast_to(scale.reshape(inter), full).reshape([n * b for n, b in zip(scale.shape, block)])
    return out[tuple(slice(0, d) for d in shape)]


def _round_to_format(v: jax.Array, fmt: Format) -> jax.Array:
    """cast(v, fmt) as float32 values, for float32 v, with vectorizable integer ops.

    Equals `formats.cast(v, fmt).astype(float32)` (saturation, round-to-nearest-even,
    subnormals, NaN and inf) but avoids XLA CPU's slow scalar f8 <-> f32 converts.
    """
    if fmt.simulated or fmt.bits != 8 or not fmt.has_nan:  # FP8 formats only
        return formats_lib.cast(v, fmt).astype(jnp.float32)
    v = formats_lib.saturate(v, fmt)
    drop = 23 - fmt.mantissa_bits
    bits = lax.bitcast_convert_type(v, jnp.uint32)
    half = jnp.uint32((1 << (drop - 1)) - 1) + ((bits >> drop) & jnp.uint32(1))
    normal = lax.bitcast_convert_type((bits + half) & jnp.uint32((0xFFFFFFFF >> drop) << drop), jnp.float32)
    # Below min_normal the grid is uniform: multiples of min_subnormal (a power of two).
    subnormal = jnp.round(v * (1.0 / fmt.min_subnormal)) * fmt.min_subnormal
    return jnp.where(jnp.abs(v) < fmt.min_normal, subnormal, normal)


def _fold(x: jax.Array, spec: OperandSpec, scale: jax.Array | None) -> Prepared:
    """Quantize x and fold block scales in while upcasting (bf16 holds f8 exactly).

    Bit-identical to upcasting `dequantize(quantize(...))` (per block) or the f8 data
    (per tensor, scale returned as the scalar), computed in one fused pass.
    """
    fmt = formats_lib.get(spec.fmt)
    dtype = jnp.bfloat16 if fmt.mantissa_bits <= 7 else jnp.float32
    block = resolve_block(spec.granularity, x.shape)
    per_tensor = tuple(block) == tuple(x.shape)
    if scale is None:
        amax = _block_amax(x, block)
        scale = compute_scale(amax.reshape(()) if per_tensor else amax, fmt, margin=spec.margin, pow2=spec.pow2)
    x = x.astype(jnp.float32)
    if per_tensor:
        scale = jnp.asarray(scale, jnp.float32).reshape(())
        return _round_to_format(x * (1.0 / scale), fmt).astype(dtype), scale
    grid = _round_to_format(x * _broadcast(1.0 / scale, x.shape, block), fmt)
    return (grid * _broadcast(scale, x.shape, block)).astype(dtype), None


def _prepare(x: jax.Array, spec: OperandSpec, impl: str, scale: jax.Array | None = None) -> Prepared:
    """Quantizes x per `spec` into the operand form `impl` multiplies."""
    if impl == "dequant_f32":  # the reference goes through the core's quantize
        return dequantize(_quantize(x, spec, scale)), None
    if impl == "fp8" and isinstance(spec.granularity, PerTensor):
        q = _quantize(x, spec, scale)
        return q.data, q.scale.reshape(())
    return _fold(x, spec, scale)


def _is_f8(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 1


def _dot(a: Prepared, b: Prepared, dims, guard: bool) -> jax.Array:
    """float32 (a_values . b_values) * a_scalar * b_scalar.

    With `guard` (XLA on CPU), bf16 operands and the result pass through optimization
    barriers: XLA CPU otherwise folds neighbouring transposes into the dot after it has
    chosen its kernel, and its fallback kernel rejects bf16 x bf16 -> f32 (jax 0.10).
    """
    (xa, sa), (xb, sb) = a, b
    precision = lax.Precision.DEFAULT
    if _is_f8(xa) and _is_f8(xb):
        # convert(f8) * scalar -> dot: XLA's GEMM rewriter makes it a cuBLASLt FP8 GEMM.
        xa, xb, sa, sb = xa.astype(jnp.float32) * sa, xb.astype(jnp.float32) * sb, None, None
        guard = False
    else:
        xa, xb = (v.astype(jnp.bfloat16) if _is_f8(v) else v for v in (xa, xb))
        dtype = jnp.promote_types(xa.dtype, xb.dtype)
        xa, xb = xa.astype(dtype), xb.astype(dtype)
        guard = guard and dtype == jnp.bfloat16
        if dtype == jnp.float32:
            precision = lax.Precision.HIGHEST
    if guard:
        xa, xb = lax.optimization_barrier((xa, xb))
    out = lax.dot_general(xa, xb, dims, precision=precision, preferred_element_type=jnp.float32)
    if guard:
        out = lax.optimization_barrier(out)
    scalars = [s for s in (sa, sb) if s is not None]
    return out * math.prod(scalars) if scalars else out


def _transposed(spec: OperandSpec) -> OperandSpec:
    """The spec for the operand with its last two axes swapped."""
    if isinstance(spec.granularity, Blocks):
        *lead, r, c = spec.granularity.block
        return dataclasses.replace(spec, granularity=Blocks((*lead, c, r)))
    return spec


# --------------------------------------------------------------------------- quantized matmul


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of one quantized matmul (a nondiff argument)."""

    plan: DotPlan
    impl: str
    batched: bool
    lhs_dtype: Any
    rhs_dtype: Any
    guard: bool  # optimization barriers around bf16 dots (XLA on CPU)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qmatmul(cfg: _Config, lhs, rhs, lhs_scale, rhs_scale):
    return _qmatmul_fwd(cfg, lhs, rhs, lhs_scale, rhs_scale)[0]


def _qmatmul_fwd(cfg: _Config, lhs, rhs, lhs_scale, rhs_scale):
    p = cfg.plan
    a = _prepare(lhs, p.fprop_lhs, cfg.impl, lhs_scale)
    b = _prepare(rhs, p.fprop_rhs, cfg.impl, rhs_scale)
    out = _dot(a, b, _dims(cfg.batched, 1, 0), cfg.guard)
    # dgrad reuses the prepared rhs when its spec is unchanged; wgrad re-prepares lhs
    # transposed (with the forward scale when its spec is unchanged): same values.
    keep_rhs = b if p.dgrad_rhs == p.fprop_rhs else rhs
    keep_lhs_scale = lhs_scale if p.wgrad_lhs == p.fprop_lhs else None
    return out, (lhs, keep_lhs_scale, keep_rhs)


def _qmatmul_bwd(cfg: _Config, residuals, g):
    p, impl = cfg.plan, cfg.impl
    lhs, lhs_scale, keep_rhs = residuals
    dy = _prepare(g, p.dgrad_dy, impl)
    rhs = keep_rhs if isinstance(keep_rhs, tuple) else _prepare(keep_rhs, p.dgrad_rhs, impl)
    d_lhs = _dot(dy, rhs, _dims(cfg.batched, 1, 1), cfg.guard)  # (M, N) x (K, N) -> (M, K)
    dy_w = dy if p.wgrad_dy == p.dgrad_dy else _prepare(g, p.wgrad_dy, impl)
    # lhs^T materialized while quantizing, so the wgrad GEMM is (K, M) x (M, N): XLA on
    # CPU runs bf16 GEMMs with a transposed lhs at f32 speed.
    lhs_t = _prepare(jnp.swapaxes(lhs, -1, -2), _transposed(p.wgrad_lhs), impl, lhs_scale)
    d_rhs = _dot(lhs_t, dy_w, _dims(cfg.batched, 1, 0), cfg.guard)
    return d_lhs.astype(cfg.lhs_dtype), d_rhs.astype(cfg.rhs_dtype), None, None


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


# --------------------------------------------------------------------------- forward scales


def _tensor_amax(x: jax.Array) -> jax.Array:
    return _block_amax(lax.stop_gradient(x), x.shape).reshape(())


def _forward_scale(recipe, history: AmaxHistory | None, x: jax.Array, amax: jax.Array) -> jax.Array | None:
    """Per-tensor forward scale of x: just in time, or from `history` (None for blocks)."""
    if isinstance(recipe, recipes_lib.DeepSeekV3):
        return None
    kw = dict(margin=recipe.margin, pow2=recipe.pow2_scale)
    if history is None:
        return compute_scale(amax, recipe.fwd_format, **kw)
    return recipes_lib.delayed_scale(history, recipe.fwd_format, algo=recipe.amax_algo, current_amax=amax, **kw)


def _forward_scales(recipe, state: DotState | None, lhs, rhs):
    """(lhs_scale, rhs_scale, new_state): per-tensor scales computed outside the vjp."""
    if isinstance(recipe, recipes_lib.DeepSeekV3):
        return None, None, state
    amax = (_tensor_amax(lhs), _tensor_amax(rhs))
    state = None if state is None else lax.stop_gradient(state)
    hists = (None, None) if state is None else (state.lhs, state.rhs)
    scales = tuple(_forward_scale(recipe, h, x, a) for h, x, a in zip(hists, (lhs, rhs), amax))
    if isinstance(recipe, recipes_lib.DelayedScaling):
        state = DotState(*(recipes_lib.update_history(h, a) for h, a in zip(hists, amax)))
    return (*scales, state)


# --------------------------------------------------------------------------- public API


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def resolve_impl(impl: str = "auto") -> str:
    """The implementation "auto" stands for on the default backend ("fp8" on GPU)."""
    _check_choice("impl", impl, IMPLS)
    if impl != "auto":
        return impl
    return "fp8" if jax.default_backend() == "gpu" else "upcast_bf16"


def _setup(lhs, rhs, dimension_numbers, recipe, state, rhs_kind):
    recipe = recipes_lib.get(recipe)
    _check_choice("rhs_kind", rhs_kind, RHS_KINDS)
    _check_state(recipe, state)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    layout = _layout(lhs.shape, rhs.shape, dimension_numbers)
    return recipe, lhs, rhs, layout


def quantized_operands(lhs, rhs, dimension_numbers, *, recipe, state: DotState | None = None,
                       rhs_kind: str = "weight") -> tuple[ScaledArray, ScaledArray]:
    """The forward operands exactly as `dot_general` quantizes them.

    Args:
      lhs, rhs, dimension_numbers, recipe, state, rhs_kind: as in `dot_general`.

    Returns:
      (q_lhs, q_rhs) in canonical layout: q_lhs (B, M, K), q_rhs (B, K, N), without the
      B axis when there are no batch dims. `dequantize(q_lhs) . dequantize(q_rhs)` in
      float32 is what the quantized forward computes.

    Raises:
      ValueError: as `dot_general`.
    """
    recipe, lhs, rhs, layout = _setup(lhs, rhs, dimension_numbers, recipe, state, rhs_kind)
    if recipe is None:
        raise ValueError("quantized_operands needs a recipe; recipe=None quantizes nothing")
    lhs_c = _to_canonical(lhs, layout.lhs_perm, layout.lhs_shape)
    rhs_c = _to_canonical(rhs, layout.rhs_perm, layout.rhs_shape)
    lhs_scale, rhs_scale, _ = _forward_scales(recipe, state, lhs_c, rhs_c)
    p = plan(recipe, rhs_kind)
    return _quantize(lhs_c, p.fprop_lhs, lhs_scale), _quantize(rhs_c, p.fprop_rhs, rhs_scale)


def dot_general(lhs, rhs, dimension_numbers, *, recipe=None, state: DotState | None = None,
                preferred_element_type=None, rhs_kind: str = "weight", impl: str = "auto"):
    """A differentiable quantized `lax.dot_general` with float32 accumulation.

    Args:
      lhs, rhs: floating arrays (f32, bf16, f16).
      dimension_numbers: ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)) as in
        `jax.lax.dot_general`.
      recipe: None (plain dot), a recipe object (`mpx.recipes.CurrentScaling`,
        `DelayedScaling`, `StaticScaling`, `DeepSeekV3`) or its name.
      state: a `DotState` for stateful recipes (from `init_state`), else None.
      preferred_element_type: output dtype; default `jnp.result_type(lhs, rhs)`.
      rhs_kind: "weight" (128x128 blocks under DeepSeekV3) or "activation" (rhs tiled
        128-wide along its contraction dims, e.g. both operands are activations).
      impl: "auto", "fp8", "upcast_bf16" or "dequant_f32" (see the module docstring).

    Returns:
      The product in lax.dot_general's layout (batch, lhs free, rhs free) and
      `preferred_element_type`; `(out, new_state)` when `state` is given.

    Raises:
      ValueError: for mismatched dimension numbers, an unknown recipe, impl or rhs_kind,
        a stateful recipe without state, or state with a stateless recipe.
      TypeError: for a state that is not a `DotState`.
    """
    _check_choice("impl", impl, IMPLS)
    recipe, lhs, rhs, layout = _setup(lhs, rhs, dimension_numbers, recipe, state, rhs_kind)
    if recipe is None:
        return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=preferred_element_type)
    out_dtype = jnp.result_type(lhs, rhs) if preferred_element_type is None else preferred_element_type
    lhs_c = _to_canonical(lhs, layout.lhs_perm, layout.lhs_shape)
    rhs_c = _to_canonical(rhs, layout.rhs_perm, layout.rhs_shape)
    lhs_scale, rhs_scale, new_state = _forward_scales(recipe, state, lhs_c, rhs_c)
    guard = jax.default_backend() == "cpu"
    cfg = _Config(plan(recipe, rhs_kind), resolve_impl(impl), layout.batched, lhs.dtype, rhs.dtype, guard)
    out = _qmatmul(cfg, lhs_c, rhs_c, lhs_scale, rhs_scale).reshape(layout.out_shape).astype(out_dtype)
    return out if state is None else (out, new_state)


# --------------------------------------------------------------------------- einsum


def _parse_einsum(subscripts: str) -> tuple[str, str, str]:
    spec = subscripts.replace(" ", "")
    if "..." in spec:
        raise ValueError(f"einsum subscripts with '...' are not supported; got {subscripts!r}")
    inputs, arrow, out = spec.partition("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        raise ValueError(f"einsum takes exactly two operands; got subscripts {subscripts!r}")
    a, b = terms
    if not arrow:
        out = "".join(sorted(c for c in set(a + b) if (a + b).count(c) == 1))
    for term in (a, b, out):
        if not all(c.isalpha() for c in term) or len(set(term)) != len(term):
            raise ValueError(f"einsum terms must be distinct letters per operand; got {subscripts!r}")
    if set(out) - set(a + b):
        raise ValueError(f"einsum output letters {sorted(set(out) - set(a + b))} are in no input")
    return a, b, out


def _sum_unused(x: jax.Array, term: str, other: str, out: str) -> tuple[jax.Array, str]:
    """Sums out letters that appear in neither the other operand nor the output."""
    drop = tuple(i for i, c in enumerate(term) if c not in other and c not in out)
    if drop:
        x = jnp.sum(x, axis=drop)
        term = "".join(c for i, c in enumerate(term) if i not in drop)
    return x, term


def einsum(subscripts: str, lhs, rhs, *, recipe=None, state: DotState | None = None,
           preferred_element_type=None, rhs_kind: str = "weight", impl: str = "auto"):
    """Two-operand einsum computed by `dot_general` (e.g. "btk,kn->btn").

    Letters in both operands and the output are batch dims, letters in both operands
    only are contracted; a letter in one operand only and not in the output is summed
    out first (in high precision).

    Args:
      subscripts: "ab,bc->ac" style, no ellipsis; implicit output (no "->") as numpy.
      lhs, rhs, recipe, state, preferred_element_type, rhs_kind, impl: as `dot_general`.

    Returns:
      The einsum result; `(out, new_state)` when `state` is given.

    Raises:
      ValueError: for malformed subscripts or operand ranks that do not match them.
    """
    a, b, out = _parse_einsum(subscripts)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    for term, x, name in ((a, lhs, "lhs"), (b, rhs, "rhs")):
        if len(term) != x.ndim:
            raise ValueError(f"einsum term {term!r} has {len(term)} letters but {name} has shape {x.shape}")
    lhs, a = _sum_unused(lhs, a, b, out)
    rhs, b = _sum_unused(rhs, b, a, out)
    batch = [c for c in a if c in b and c in out]
    contract = [c for c in a if c in b and c not in out]
    dims = ((tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
            (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
    result = dot_general(lhs, rhs, dims, recipe=recipe, state=state, rhs_kind=rhs_kind,
                         preferred_element_type=preferred_element_type, impl=impl)
    y, new_state = result if state is not None else (result, None)
    produced = "".join(batch) + "".join(c for c in a if c not in b) + "".join(c for c in b if c not in a)
    y = jnp.transpose(y, tuple(produced.index(c) for c in out))
    return y if state is None else (y, new_state)


__all__ = [
    "DotPlan", "DotState", "IMPLS", "OperandSpec", "RHS_KINDS", "dot_general", "einsum",
    "init_state", "plan", "quantized_operands", "resolve_impl",
]



# --------------------------------------------------------------------------- pre-quantized weights (serving)
#
# Serving stores each weight once as a ScaledArray (FP8 data + f32 scales) and multiplies
# it without dequantizing it: the contraction K is split into groups over which both
# operands' scales are constant; each group is one bf16 x bf16 -> f32 GEMM of exact FP8
# values (bf16 holds every E4M3/E5M2 value), and the f32 partial sums are scaled and
# added, as a block-scaled FP8 GEMM promotes its partial sums every 128 elements
# (DeepSeek-V3 report, 3.3). Per-output-channel and per-tensor weight scales with a
# per-tensor (or no) activation scale need one group: one GEMM whose f32 result is
# scaled per column, exactly.


def _scale_groups(k: int, lhs_group: int, rhs_group: int) -> tuple[int, int] | None:
    """(group width, K padded to whole groups), or None when the scale groups do not nest."""
    up = lambda n, m: -(-n // m) * m  # noqa: E731
    if lhs_group >= k and rhs_group >= k:
        return k, k
    if rhs_group >= k or lhs_group >= k:
        group = min(lhs_group, rhs_group)
        return group, up(k, group)
    lo, hi = sorted((lhs_group, rhs_group))
    return None if hi % lo else (lo, up(k, hi))


def _prequantized_lhs_scale(recipe, state: DotState | None, lhs: jax.Array) -> jax.Array | None:
    """The per-tensor lhs scale of a per-tensor recipe (None for DeepSeekV3 and no recipe)."""
    if recipe is None or isinstance(recipe, recipes_lib.DeepSeekV3):
        return None
    amax, kw = _tensor_amax(lhs), dict(margin=recipe.margin, pow2=recipe.pow2_scale)
    if isinstance(recipe, recipes_lib.CurrentScaling):
        return compute_scale(amax, recipe.fwd_format, **kw)
    # Static / delayed: the recorded amax (calibration), never updated while serving; an
    # empty state falls back to this call's amax.
    return recipes_lib.delayed_scale(lax.stop_gradient(state).lhs, recipe.fwd_format, algo=recipe.amax_algo,
                                     current_amax=amax, **kw)


def _lhs_operand(x: jax.Array, recipe, scale, tile: int, compute_dtype, grid_dtype=jnp.bfloat16):
    """x (B, M, K) as (values, scales): FP8 grid values in `grid_dtype` (x in compute_dtype
    without a recipe) and the scales: (B, M, K / tile) per DeepSeek tile, a scalar, or None."""
    if recipe is None:
        return x.astype(compute_dtype), None
    fmt = formats_lib.get(recipe.fwd_format)
    x = x.astype(jnp.float32)
    if scale is not None:
        return _round_to_format(x * (1.0 / scale), fmt).astype(grid_dtype), scale
    b, m, k = x.shape
    tiles = x.reshape(b, m, k // tile, tile)
    amax = jnp.max(jnp.abs(tiles), axis=-1)  # one reduction; NaN propagates
    scale = compute_scale(amax, fmt, pow2=recipe.pow2_scale)  # (B, M, K / tile)
    grid = _round_to_format(tiles * (1.0 / scale)[..., None], fmt).reshape(x.shape)
    return grid.astype(grid_dtype), scale


def _rhs_group_scales(rhs: ScaledArray, group: int, n_groups: int) -> jax.Array:
    """One rhs scale per (B, K group, column): (B, nG, N)."""
    _, rows, cols = rhs.block
    scale = rhs.scale
    if scale.shape[1] == 1:  # one scale along K (per channel or per tensor)
        scale = jnp.broadcast_to(scale, (scale.shape[0], n_groups, scale.shape[2]))
    else:  # groups nest in the row blocks: each row block covers rows // group groups
        scale = jnp.repeat(scale, rows // group, axis=1)[:, :n_groups]
    return jnp.repeat(scale, cols, axis=2)[:, :, :rhs.shape[-1]] if cols > 1 else scale


def _pad_axis_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths) if size > x.shape[axis] else x


def _grouped_dot(xv, sx, wv, sw, group: int, guard: bool) -> jax.Array:
    """sum_g (xv_g . wv_g) * sx_g * sw_g in f32.

    xv (B, M, nG * group), wv (B, nG * group, N); sx (B, M, nG), a scalar or None;
    sw (B, nG, N). Returns (B, M, N).
    """
    b, m, k = xv.shape
    n, ng = wv.shape[-1], k // group
    if ng == 1:  # sx is (B, M, 1), a scalar or None: scale the rows and columns of one GEMM
        out = _dot((xv, None), (wv, None), _dims(True, 1, 0), guard) * sw  # (B, M, N)
        return out if sx is None else out * sx
    xg = jnp.swapaxes(xv.reshape(b, m, ng, group), 1, 2).reshape(b * ng, m, group)
    partial = _dot((xg, None), (wv.reshape(b * ng, group, n), None), _dims(True, 1, 0), guard)
    partial = partial.reshape(b, ng, m, n) * sw[:, :, None, :]
    if sx is not None and jnp.ndim(sx) == 3:
        partial = partial * jnp.swapaxes(sx, 1, 2)[..., None]
    out = jnp.sum(partial, axis=1)
    return out * sx if sx is not None and jnp.ndim(sx) == 0 else out


def _check_prequantized(lhs: jax.Array, rhs: ScaledArray) -> None:
    if not isinstance(rhs, ScaledArray):
        raise TypeError(f"rhs must be a ScaledArray (from mpx.quantize); got {type(rhs).__name__}")
    if rhs.ndim not in (2, 3):
        raise ValueError(f"rhs must be (K, N) or (E, K, N); got shape {rhs.shape}")
    if lhs.shape[-1] != rhs.shape[-2]:
        raise ValueError(f"lhs {lhs.shape} and rhs {rhs.shape} do not contract: K {lhs.shape[-1]} != {rhs.shape[-2]}")
    if rhs.ndim == 3 and (lhs.ndim != 3 or lhs.shape[0] != rhs.shape[0]):
        raise ValueError(f"a batched rhs {rhs.shape} needs lhs (E, M, K) with E={rhs.shape[0]}; got {lhs.shape}")
    if rhs.ndim == 3 and rhs.block[0] != 1:
        raise ValueError(f"a batched rhs needs block size 1 along its batch axis; got block {rhs.block}")


def prequantized_matmul(lhs, rhs: ScaledArray, *, recipe=None, state: DotState | None = None,
                        compute_dtype=jnp.bfloat16, preferred_element_type=jnp.float32,
                        impl: str = "auto") -> jax.Array:
    """Forward-only product of activations with a weight quantized ahead of time (serving).

        out[..., n] = sum_k q(lhs)[..., k] * dequantize(rhs)[k, n]      (f32 accumulation)

    The rhs is never dequantized: its FP8 values enter the GEMM as they are and its
    scales multiply f32 partial sums (see the comment above). lhs is quantized as the
    recipe says: DeepSeekV3 in 1 x `block` tiles along K with online scales (per token);
    CurrentScaling per tensor, online; StaticScaling / DelayedScaling per tensor from the
    recorded amax in `state.lhs` (calibration), online when that is still empty; None
    keeps lhs in `compute_dtype` (weight-only quantization).

    Args:
      lhs: (..., K) activations, or (E, M, K) when rhs is batched (one matmul per expert).
      rhs: ScaledArray (K, N) or (E, K, N) with blocks over its last two axes: whole (per
        tensor), (K, 1) (per output channel) or (b, b) (e.g. 128x128).
      recipe: None, a recipe or its name.
      state: the `DotState` of a stateful recipe; read, never updated.
      compute_dtype: dtype of lhs in the GEMM when recipe is None (bf16 or f32).
      preferred_element_type: output dtype.
      impl: "auto", "upcast_bf16" (the grouped GEMM above), "fp8" (a per-tensor lhs scale
        and one K group: the Hopper `convert(f8) * scalar -> dot` pattern on the raw FP8
        data, column scales after; otherwise as "upcast_bf16"), "fold_f32" (both
        operands dequantized into f32, scales folded in, one f32 GEMM: the decode path,
        see `_folded_prequantized`) or "dequant_f32" (the reference: the same product
        through `quantize` / `dequantize`, f32 GEMM at HIGHEST precision). "auto" is
        "fp8" on GPU; on CPU "fold_f32" for at most `FOLD_MAX_ROWS` rows (decode) and
        "upcast_bf16" for more (prefill).

    Returns:
      (..., N), or (E, M, N) for a batched rhs, in `preferred_element_type`.

    Raises:
      TypeError: rhs is not a ScaledArray.
      ValueError: shapes that do not contract, a batched rhs blocked across experts, an
        unknown recipe or impl, a stateful recipe without state.
    """
    _check_choice("impl", impl, PREQUANTIZED_IMPLS)
    recipe = recipes_lib.get(recipe)
    lhs = jnp.asarray(lhs)
    _check_prequantized(lhs, rhs)
    _check_state(recipe, state)
    batched = rhs.ndim == 3
    x3 = lhs if batched else lhs.reshape(1, -1, lhs.shape[-1])
    rhs3 = rhs if batched else ScaledArray(rhs.data[None], rhs.scale[None], rhs.fmt, (1,) + tuple(rhs.block))
    scale = _prequantized_lhs_scale(recipe, state, x3)
    k = x3.shape[-1]
    tile = recipe.block if isinstance(recipe, recipes_lib.DeepSeekV3) else k
    groups = _scale_groups(k, tile, rhs3.block[1])
    impl = _prequantized_impl(impl, x3.shape[1])
    if impl == "fold_f32":
        out = _folded_prequantized(x3, rhs3, recipe, scale, min(tile, k), compute_dtype)
    elif groups is None or impl == "dequant_f32":
        out = _reference_prequantized(x3, rhs3, recipe, scale, compute_dtype)
    elif impl == "fp8" and groups[0] == k and scale is not None:
        out = _fp8_prequantized(x3, rhs3, recipe, scale)
    else:
        out = _upcast_prequantized(x3, rhs3, recipe, scale, groups, tile, compute_dtype)
    shape = out.shape if batched else lhs.shape[:-1] + (rhs.shape[-1],)
    return out.reshape(shape).astype(preferred_element_type)


# The most rows (tokens, per batch entry) for which the CPU "auto" path folds the scales
# into f32 operands ("fold_f32"); more rows keep the grouped bf16 GEMM. For so few rows
# XLA's CPU backend runs a bf16 dot as an f32 dot of upcast operands anyway; on the tiny
# model's decode step the fold leaves ~10% fewer fused ops per token (109 vs 121).
FOLD_MAX_ROWS = 16
PREQUANTIZED_IMPLS = IMPLS + ("fold_f32",)


def _cpu_decode_sized(rows: int) -> bool:
    """Whether a product of `rows` rows runs faster as an f32 dot here (CPU, decode)."""
    return rows <= FOLD_MAX_ROWS and jax.default_backend() == "cpu"


def _prequantized_impl(impl: str, rows: int) -> str:
    if impl != "auto":
        return impl
    return "fold_f32" if _cpu_decode_sized(rows) else resolve_impl(impl)


def rounded_dot(lhs, rhs, dimension_numbers, compute_dtype, accum_dtype=jnp.float32) -> jax.Array:
    """`lax.dot_general` of lhs and rhs rounded to `compute_dtype`, accumulated in `accum_dtype`.

    On CPU a bf16 (or fp16) dot with f32 accumulation and at most `FOLD_MAX_ROWS` rows
    (lhs elements outside the contracting and batch axes: a decode step) runs as an f32
    dot of the rounded operands. The products are the same (a product of two bf16
    values is exact in f32) and both accumulate in f32, but XLA's CPU backend runs such
    small bf16 dots slower than f32 ones. Larger dots keep `compute_dtype`, where bf16
    GEMMs are about twice as fast as f32 on CPU.
    """
    lhs, rhs = jnp.asarray(lhs).astype(compute_dtype), jnp.asarray(rhs).astype(compute_dtype)
    (contracting, _), (batch, _) = dimension_numbers
    rows = math.prod(n for i, n in enumerate(lhs.shape) if i not in (*contracting, *batch))
    narrow = jnp.dtype(compute_dtype).itemsize < 4 and jnp.dtype(accum_dtype) == jnp.dtype(jnp.float32)
    if narrow and _cpu_decode_sized(rows):
        lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=accum_dtype)


def _folded_prequantized(x3, rhs3: ScaledArray, recipe, scale, tile: int, compute_dtype):
    """Both operands dequantized into f32 with their scales folded in, one f32 GEMM.

    The same quantized values as the grouped GEMM; only where the scales multiply differs
    (each product value x scale rounds once in f32, 2**-24 relative, exact for
    power-of-two scales). Inside a decode loop the weight's dequantization is loop
    invariant, so XLA computes it once per compiled call and every token pays for one
    f32 matmul, the cost of an fp32 weight.
    """
    k = x3.shape[-1]
    k_pad = -(-k // tile) * tile
    xv, sx = _lhs_operand(_pad_axis_to(x3, 2, k_pad), recipe, scale, tile, compute_dtype, jnp.float32)
    xv = xv.astype(jnp.float32)
    if sx is not None and jnp.ndim(sx) == 3:  # per-tile scales (B, M, K / tile)
        b, m, _ = xv.shape
        xv = (xv.reshape(b, m, k_pad // tile, tile) * sx[..., None]).reshape(b, m, k_pad)
    elif sx is not None:
        xv = xv * sx
    return lax.dot_general(xv[:, :, :k], dequantize(rhs3), _dims(True, 1, 0), preferred_element_type=jnp.float32)


def _upcast_prequantized(x3, rhs3: ScaledArray, recipe, scale, groups, tile: int, compute_dtype):
    group, k_pad = groups
    tile = min(tile, k_pad) if tile < x3.shape[-1] else k_pad
    xv, sx = _lhs_operand(_pad_axis_to(x3, 2, k_pad), recipe, scale, tile, compute_dtype)
    if sx is not None and jnp.ndim(sx) == 3 and tile > group:
        sx = jnp.repeat(sx, tile // group, axis=2)  # lhs tiles span several rhs blocks
    wdtype = jnp.float32 if jnp.dtype(xv.dtype) == jnp.float32 else jnp.bfloat16
    wv = _pad_axis_to(upcast(rhs3.data, wdtype), 1, k_pad)  # exact: bf16 holds every FP8 value
    sw = _rhs_group_scales(rhs3, group, k_pad // group)
    return _grouped_dot(xv, sx, wv, sw, group, False)


def _reference_prequantized(x3, rhs3: ScaledArray, recipe, scale, compute_dtype) -> jax.Array:
    """dequantize(q(lhs)) . dequantize(rhs) in f32 with HIGHEST precision."""
    if recipe is None:
        xd = x3.astype(compute_dtype).astype(jnp.float32)
    elif scale is not None:
        xd = dequantize(quantize_with_scale(x3, scale, recipe.fwd_format, x3.shape))
    else:
        xd = dequantize(quantize(x3, recipe.fwd_format, Blocks((1, recipe.block)), pow2_scale=recipe.pow2_scale))
    return lax.dot_general(xd, dequantize(rhs3), _dims(True, 1, 0), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _fp8_prequantized(x3, rhs3: ScaledArray, recipe, scale):
    """Per-tensor lhs x one-K-group rhs: raw FP8 data into the Hopper GEMM pattern."""
    q = quantize_with_scale(x3, scale, recipe.fwd_format, x3.shape)
    out = _dot((q.data, jnp.reshape(scale, ())), (rhs3.data, jnp.ones((), jnp.float32)), _dims(True, 1, 0), False)
    return out * _rhs_group_scales(rhs3, rhs3.shape[1], 1)


__all__ += ["FOLD_MAX_ROWS", "PREQUANTIZED_IMPLS", "prequantized_matmul", "rounded_dot", "upcast"]
