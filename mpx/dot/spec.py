"""The plan of a quantized dot: operand specs, scale state, and the canonical layout.

`plan(recipe)` says how each of the six operands of a forward and backward matmul is
quantized (table in `mpx.dot`); `_layout` maps any `dimension_numbers` onto canonical
`lhs (B, M, K) x rhs (B, K, N) -> (B, M, N)` (no B axis without batch dims).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from mpx import recipes as recipes_lib
from mpx.recipes import AmaxHistory
from mpx.config import check_choice
from mpx.scaled import Blocks, PerTensor
from mpx.scales import folds_exactly
from mpx.target import Target
from mpx.target import current as current_target

__all__ = [
    "IMPLS", "RHS_KINDS", "resolve_impl", "OperandSpec", "DotPlan", "plan", "transposed", "DotState",
    "init_state", "check_state", "Layout", "layout", "to_canonical", "dims"
]

IMPLS = ("auto", "upcast_bf16", "fold_bf16", "fp8", "dequant_f32")
RHS_KINDS = ("weight", "activation")


def resolve_impl(impl: str = "auto", target: Target | None = None) -> str:
    """The implementation "auto" stands for on `target` (default `mpx.target.current()`):
    "fp8" on a GPU, "upcast_bf16" elsewhere (`Target.default_impl`).

    Raises:
      ValueError: for an impl not in `IMPLS`.
    """
    check_choice("impl", impl, IMPLS)
    return current_target(target).default_impl if impl == "auto" else impl


# --------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class OperandSpec:
    """How one matmul operand is quantized (in canonical coordinates).

    Attributes:
      fmt: element format name ("e4m3", "e5m2", ...).
      granularity: PerTensor() or Blocks over the trailing two canonical axes.
      scale_format: "f32", "ue8m0" (powers of two) or "ue8m3" (`mpx.scales`).
      margin: headroom in powers of two below the format's max.
    """

    fmt: str
    granularity: PerTensor | Blocks
    scale_format: str = "f32"
    margin: float = 0.0

    @property
    def pow2(self) -> bool:
        return self.scale_format == "ue8m0"

    @property
    def folds_exactly(self) -> bool:
        """Whether block scales fold into bf16 values exactly (`mpx.scales.folds_exactly`)."""
        return folds_exactly(self.fmt, self.scale_format)


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
    """The operand quantization a recipe gives (see the table in `mpx.dot`).

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
    check_choice("rhs_kind", rhs_kind, RHS_KINDS)
    if recipe is None:
        raise ValueError("plan needs a recipe; recipe=None means an unquantized dot")
    if recipe.tiled:
        return _deepseek_plan(recipe, rhs_kind)
    fwd = OperandSpec(recipe.fwd_format, PerTensor(), recipe.scale_format, recipe.margin)
    bwd = OperandSpec(recipe.bwd_format, PerTensor(), recipe.scale_format, recipe.margin)
    return DotPlan(fwd, fwd, bwd, fwd, fwd, bwd)


def _deepseek_plan(recipe: recipes_lib.DeepSeekV3, rhs_kind: str) -> DotPlan:
    b = recipe.block
    along_k_of_lhs = Blocks((1, b))  # rows (tokens) x 128 contraction channels
    along_k_of_rhs = Blocks((b, 1))  # 128 contraction channels x columns
    act = functools.partial(OperandSpec, scale_format=recipe.scale_format)
    if rhs_kind == "weight":
        fprop_rhs = dgrad_rhs = act(recipe.fwd_format, Blocks((b, b)))
    else:
        fprop_rhs, dgrad_rhs = act(recipe.fwd_format, along_k_of_rhs), act(recipe.fwd_format, along_k_of_lhs)
    return DotPlan(
        fprop_lhs=act(recipe.fwd_format, along_k_of_lhs),
        fprop_rhs=fprop_rhs,
        dgrad_dy=act(recipe.bwd_format, along_k_of_lhs),  # per token, 128 out-features
        dgrad_rhs=dgrad_rhs,
        wgrad_lhs=act(recipe.fwd_format, along_k_of_rhs),  # 128 tokens x 1 channel
        wgrad_dy=act(recipe.bwd_format, along_k_of_rhs),
    )


def transposed(spec: OperandSpec) -> OperandSpec:
    """The spec for the operand with its last two axes swapped."""
    if isinstance(spec.granularity, Blocks):
        *lead, r, c = spec.granularity.block
        return dataclasses.replace(spec, granularity=Blocks((*lead, c, r)))
    return spec


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


def check_state(recipe, state) -> None:
    """Raises ValueError/TypeError unless `state` fits the recipe (None when stateless)."""
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
    if recipe.updates_history:
        for name, h in (("lhs", state.lhs), ("rhs", state.rhs)):
            if h.history.shape != (recipe.history,):
                raise ValueError(
                    f"state.{name} history has shape {h.history.shape}; recipe wants ({recipe.history},)"
                )


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Layout:
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


def layout(lhs_shape, rhs_shape, dimension_numbers) -> Layout:
    """The canonical layout of a dot; ValueError for dimension numbers that do not fit."""
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
    return Layout(lb + lf + lc, rb + rc + rf, batch + (m, k), batch + (k, n), out_shape)


def _check_paired(lhs_shape, rhs_shape, la, ra, what: str) -> None:
    if len(la) != len(ra) or any(lhs_shape[i] != rhs_shape[j] for i, j in zip(la, ra)):
        raise ValueError(
            f"{what} dims do not pair up: lhs{tuple(lhs_shape)} axes {la} vs rhs{tuple(rhs_shape)} axes {ra}"
        )


def to_canonical(x: jax.Array, perm, shape) -> jax.Array:
    """x transposed by `perm` and reshaped to its canonical `shape`."""
    return jnp.transpose(x, perm).reshape(shape)


def dims(batched: bool, lhs_contract: int, rhs_contract: int):
    """dimension_numbers on canonical rank-2/3 arrays, contracting the given trailing axis."""
    if batched:
        return (((lhs_contract + 1,), (rhs_contract + 1,)), ((0,), (0,)))
    return (((lhs_contract,), (rhs_contract,)), ((), ()))
