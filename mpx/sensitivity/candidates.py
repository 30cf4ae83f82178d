"""Candidate precisions of one linear layer: how its operands are rounded, what it costs.

A `Candidate` says how a layer's forward operands are quantized (format and block shape
of the weight and, unless weight-only, of the input activation), the recipe that runs
it through `mpx.nn` (None for weight-only candidates: a `Policy` cannot express them,
so they are analysed but never chosen by `mpx.policy.search`), and its storage cost.

Operands are seen in a canonical batched-matmul form: inputs (G, M, K), weights
(G, K, N), G = 1 for a dense layer, the experts for an expert layer. Block shapes below
are for that form:

| name        | weight                   | activation          | recipe                          |
|-------------|--------------------------|---------------------|---------------------------------|
| bf16        | bf16                     | bf16                | none, compute bf16              |
| e4m3_block  | e4m3 128x128 blocks      | e4m3 1x128 tiles    | DeepSeekV3()                    |
| e4m3_tensor | e4m3 per tensor          | e4m3 per tensor     | CurrentScaling("e4m3")          |
| e5m2        | e5m2 per tensor          | e5m2 per tensor     | CurrentScaling("e5m2")          |
| e4m3_weight | e4m3 128x128 blocks      | (unchanged)         | none: weight-only, serving      |
| e5m4, e4m4  | FP10 / FP9 128x128       | 1x128 tiles         | DeepSeekV3(fwd_format=...)      |
| e3m2        | FP6 128x128              | 1x128 tiles         | DeepSeekV3(fwd_format="e3m2")   |
| e2m1_mx     | FP4, MX(32): pow2 scale per 32 in-features | (unchanged) | none: weight-only   |
| e2m1_b32    | FP4 32x32, pow2 scales   | FP4 1x32, pow2      | DeepSeekV3(32, "e2m1", ue8m0)   |
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mpx import formats as formats_lib
from mpx import recipes as recipes_lib
from mpx.scaled import Blocks, PerTensor, fake_quant

__all__ = ["NATIVE_FORMATS", "Operand", "Candidate", "CANDIDATES", "DEFAULT", "get"]


NATIVE_FORMATS = ("bf16", "e4m3", "e5m2")


@dataclasses.dataclass(frozen=True)
class Operand:
    """How one operand is rounded: a format and a block shape in the canonical form.

    Attributes:
      fmt: format name ("e4m3", "e2m1", "bf16", ...).
      block: block shape of the (G, M, K) input or (G, K, N) weight; None: per tensor.
      pow2: power-of-two scales (MX, ue8m0).
    """

    fmt: str
    block: tuple[int, int, int] | None = None
    pow2: bool = False

    def apply(self, x: jax.Array) -> jax.Array:
        """x rounded to this operand's format with its scales (float32 out)."""
        x = x.astype(jnp.float32)
        fmt = formats_lib.get(self.fmt)
        if fmt.bits >= 16:  # bf16/f16: a plain round to the dtype, no scale
            return x.astype(fmt.dtype).astype(jnp.float32)
        granularity = PerTensor() if self.block is None else Blocks(self.block)
        return fake_quant(x, fmt, granularity, pow2_scale=self.pow2)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A precision one linear layer may get.

    Attributes:
      name: the candidate's name (a key of `CANDIDATES`).
      weight: how the weight is rounded.
      activation: how the input is rounded; None for weight-only candidates.
      recipe: the `mpx.recipes` recipe of its matmul, or None.
      compute: the layer's compute dtype name in a policy ("bf16"), or None to inherit.
      searchable: whether a `Policy` can express it (recipe or compute dtype).
    """

    name: str
    weight: Operand
    activation: Operand | None
    recipe: Any = None
    compute: str | None = None
    searchable: bool = True

    @property
    def bits(self) -> int:
        """Bits per stored weight element."""
        return formats_lib.get(self.weight.fmt).bits

    @property
    def native(self) -> bool:
        """Whether hardware multiplies it as is: bf16, or E4M3/E5M2 operands on FP8
        tensor cores, not a simulated or sub-8-bit format."""
        ops = [self.weight] + ([] if self.activation is None else [self.activation])
        return all(op.fmt in NATIVE_FORMATS for op in ops)

    @property
    def fp8_matmul(self) -> bool:
        """Whether both matmul operands are 8-bit (or narrower) floats: FP8 tensor-core work."""
        return self.activation is not None and max(self.bits, formats_lib.get(self.activation.fmt).bits) <= 8

    def weight_bytes(self, shape: tuple[int, ...]) -> float:
        """Bytes to store a canonical (G, K, N) weight: elements plus f32 (or e8m0) scales."""
        g, k, n = shape
        elements = g * k * n
        if self.bits >= 16:
            return elements * self.bits / 8
        if self.weight.block is None:
            return elements * self.bits / 8 + 4
        bg, bk, bn = self.weight.block
        scales = g * -(-k // bk) * -(-n // bn)
        return elements * self.bits / 8 + scales * (1 if self.weight.pow2 else 4)

    def lower(self, x3: jax.Array, w3: jax.Array) -> jax.Array:
        """The (G, M, N) float32 product of the rounded input and weight."""
        xq = x3.astype(jnp.float32) if self.activation is None else self.activation.apply(x3)
        return jnp.einsum("gmk,gkn->gmn", xq, self.weight.apply(w3), preferred_element_type=jnp.float32)


def _block(fmt: str, b: int = 128, pow2: bool = False) -> tuple[Operand, Operand]:
    return Operand(fmt, (1, b, b), pow2), Operand(fmt, (1, 1, b), pow2)


def _deepseek(name: str, fmt: str, block: int = 128, pow2: bool = False) -> Candidate:
    weight, act = _block(fmt, block, pow2)
    recipe = recipes_lib.DeepSeekV3(block, fmt, fmt, scale_format="ue8m0" if pow2 else "f32")
    return Candidate(name, weight, act, recipe)


def _current(name: str, fmt: str) -> Candidate:
    return Candidate(name, Operand(fmt), Operand(fmt), recipes_lib.CurrentScaling(fwd_format=fmt, bwd_format="e5m2"))


CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("bf16", Operand("bf16"), Operand("bf16"), None, compute="bf16"),
    _deepseek("e4m3_block", "e4m3"),
    _current("e4m3_tensor", "e4m3"),
    _current("e5m2", "e5m2"),
    Candidate("e4m3_weight", Operand("e4m3", (1, 128, 128)), None, searchable=False),
    _deepseek("e5m4", "e5m4"),
    _deepseek("e4m4", "e4m4"),
    _deepseek("e3m2", "e3m2"),
    Candidate("e2m1_mx", Operand("e2m1", (1, 32, 1), pow2=True), None, searchable=False),
    _deepseek("e2m1_b32", "e2m1", 32, pow2=True),
)}
DEFAULT = tuple(CANDIDATES)


def get(names: str | tuple[str, ...] | list[str] | None = None) -> tuple[Candidate, ...]:
    """Candidates by name: a comma-separated string, a sequence, or None for all.

    Raises:
      ValueError: naming an unknown candidate (and the known ones), or an empty list.
    """
    if names is None:
        names = DEFAULT
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown candidate format(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(CANDIDATES)}")
    if not names:
        raise ValueError(f"no candidate formats given; known: {', '.join(CANDIDATES)}")
    return tuple(CANDIDATES[n] for n in dict.fromkeys(names))
