"""Preset policies: fp32, bf16, fp16 and the FP8 ones, after DeepSeek-V3's precision map.

Presets name layer roles (`mpx.policy.ROLES`, declared by every `mpx.nn` layer), never a
model's module paths, so they apply to any model built from `mpx.nn`:

| role | fp8 presets |
|---|---|
| linear: projections (Q/K/V/O, latent), FFN, MoE routed and shared experts | the FP8 recipe (bf16 outputs, f32 accumulation) |
| attention: QK^T | bf16 |
| attention: PV (`*/pv`) | FP8 in the fused attention (the recipe's formats, scales per row and head; bf16 outputs) |
| embed, head: token embedding, LM head | bf16 weights and inputs, f32 logits |
| norm, router | f32 |
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from mpx import recipes as recipes_lib
from mpx.policy.precision import Precision
from mpx.policy.rules import Policy, Rule

__all__ = ["F32", "BF16", "F16", "fp32", "bf16", "fp16", "fp8", "fp8_current", "fp8_delayed", "PRESETS", "PRESET_NAMES",
           "preset"]

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def _half_rules() -> tuple[Rule, ...]:
    """What stays in f32 in every low-precision preset (and never gets an FP8 recipe)."""
    return (
        Rule("*", role="norm", compute_dtype=F32, output_dtype=F32, recipe=None),
        Rule("*", role="router", param_dtype=F32, compute_dtype=F32, output_dtype=F32, accum_dtype=F32, recipe=None),
        # The embedding output feeds the f32 residual stream; attend() gives f32 logits.
        Rule("*", role="embed", output_dtype=F32, recipe=None),
        Rule("*", role="head", output_dtype=F32, recipe=None),
    )


def _fp8_rules(recipe: recipes_lib.Recipe) -> tuple[Rule, ...]:
    """The map above: FP8 for every linear layer (projections, FFN, experts) and for PV;
    QK^T in bf16 (the seed: QK^T in BF16 against softmax overflow, Value products in FP8)."""
    return (
        Rule("*/pv", role="attention", compute_dtype=BF16, recipe=recipe),
        Rule("*", role="attention", compute_dtype=BF16, recipe=None),
        Rule("*", role="linear", recipe=recipe),
    )


def fp32() -> Policy:
    """Everything in f32, no FP8 (the reference)."""
    return Policy((), Precision(), "fp32")


def _half(dtype, name: str) -> Policy:
    default = Precision(param_dtype=F32, compute_dtype=dtype, output_dtype=dtype, accum_dtype=F32)
    return Policy(_half_rules(), default, name)


def bf16() -> Policy:
    """f32 master weights, bf16 compute and outputs, f32 accumulation, norms/router/logits f32."""
    return _half(BF16, "bf16")


def fp16() -> Policy:
    """Like bf16 with float16 compute (needs loss scaling)."""
    return _half(F16, "fp16")


def _fp8(recipe: recipes_lib.Recipe, name: str) -> Policy:
    base = bf16()
    return Policy(_fp8_rules(recipe) + base.rules, base.default, name)


def fp8(recipe: recipes_lib.Recipe | None = None) -> Policy:
    """The DeepSeek-V3 layout: bf16 policy plus FP8 (DeepSeekV3 recipe) matmuls."""
    return _fp8(recipe or recipes_lib.DeepSeekV3(), "fp8")


def fp8_current() -> Policy:
    """As fp8 with per-tensor current scaling (E4M3 forward, E5M2 gradients)."""
    return _fp8(recipes_lib.CurrentScaling(), "fp8_current")


def fp8_delayed() -> Policy:
    """As fp8 with per-tensor delayed scaling from an amax history."""
    return _fp8(recipes_lib.DelayedScaling(), "fp8_delayed")


PRESETS: dict[str, Callable[[], Policy]] = {
    "fp32": fp32, "bf16": bf16, "fp16": fp16, "fp8": fp8, "fp8_current": fp8_current, "fp8_delayed": fp8_delayed,
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def preset(name: str) -> Policy:
    """A preset policy by name (one of `PRESET_NAMES`: fp32, bf16, fp16, fp8, fp8_current, fp8_delayed).

    Raises:
      ValueError: naming the unknown preset and the known ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown policy preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()

