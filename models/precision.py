"""The reference transformer's precision table: the role of each of its module paths.

`mpx.nn` layers declare their role (`mpx.policy.ROLES`) when they resolve their own
precision. Code that walks the model's parameters or plans it by path (the memory
planner, serving's quantization, export, the train loop's memory report) has only the
path; this table gives the role the layer at that path declares, so both resolve alike.
`tests/test_precision.py` checks the table against what the layers declare, for every
architecture the transformer builds.

| path (suffix)                               | role      |
|---------------------------------------------|-----------|
| attn/qk, attn/pv                            | attention |
| any name containing "norm"                  | norm      |
| moe/router                                  | router    |
| embed                                       | embed     |
| lm_head                                     | head      |
| everything else (projections, FFN, experts) | linear    |

Also here, so that one module answers precision questions about the reference model:
`is_fp8_layer` and `is_remat` (is block i's FFN FP8, is block i recomputed),
`linear_layers` and `fp8_layers` (its linear layers, and those a policy lowers), and
`serving_dtype` (the float dtype a param serves in: the MoE router stays f32).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mpx import nn as mnn
from mpx.policy import Policy, Precision, match_path, preset

__all__ = ["ROLE_PATTERNS", "role_of", "resolve", "is_fp8_layer", "ffn_probe", "is_remat", "linear_recorder",
           "linear_layers", "fp8_layers", "F32_ROLES", "serving_dtype"]

ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("attn/qk", "attention"),
    ("attn/pv", "attention"),
    ("*norm*", "norm"),
    ("moe/router", "router"),
    ("embed", "embed"),
    ("lm_head", "head"),
)


def role_of(path: str) -> str:
    """The role of the reference transformer's layer at module `path` ("linear" if no
    pattern of `ROLE_PATTERNS` matches)."""
    return next((role for pattern, role in ROLE_PATTERNS if match_path(pattern, path)), "linear")


# Roles whose params stay float32 when the rest of a model serves in bf16: the MoE
# router (its top-k flips easily; every preset keeps it f32 in training too).
F32_ROLES = ("router",)


def serving_dtype(path: str, precision: str):
    """The dtype a non-FP8 param of the layer at `path` serves in under a serving
    precision ("fp32", "bf16" or "fp8"): f32 for fp32 and for `F32_ROLES`, else bf16."""
    return jnp.float32 if precision == "fp32" or role_of(path) in F32_ROLES else jnp.bfloat16


def resolve(policy: Policy, path: str) -> Precision:
    """The precision `policy` gives the reference transformer's layer at `path`."""
    return policy.resolve(path, role_of(path))


def ffn_probe(layer: int, moe: bool) -> str:
    """The path of block `layer`'s FFN up projection (routed experts' in a MoE block)."""
    return f"layers_{layer}/{'moe/experts/up' if moe else 'mlp/up'}"


def is_fp8_layer(policy: Policy, layer: int, moe: bool = False) -> bool:
    """Whether block `layer`'s FFN runs under an FP8 recipe (its activations are then
    kept in FP8: the planner's and `remat="non_fp8"`'s question)."""
    return resolve(policy, ffn_probe(layer, moe)).recipe is not None


def linear_recorder(found: dict) -> Callable:
    """A Flax method interceptor recording every linear layer a model calls into `found`:
    {module path: number of output-feature axes of its kernel (None: an (E, K, F) expert
    kernel)}."""

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, mnn.LINEAR_TYPES):
            found[mnn.module_path(module)] = None if isinstance(module, mnn.ExpertDense) else \
                len(np.atleast_1d(module.features))
        return next_fun(*args, **kwargs)

    return record


def linear_layers(config) -> dict[str, int | None]:
    """The reference transformer's linear layers under `config` (see `linear_recorder`)."""
    from models import transformer  # late: the transformer imports this module

    found: dict[str, int | None] = {}
    with nn.intercept_methods(linear_recorder(found)):
        jax.eval_shape(transformer.Transformer(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return found


def fp8_layers(config, policy: Policy | None = None) -> dict[str, int | None]:
    """The linear layers `policy` (default the fp8 preset) gives a recipe, as `linear_layers`."""
    policy = preset("fp8") if policy is None else policy
    return {p: n for p, n in linear_layers(config).items() if resolve(policy, p).recipe is not None}


def is_remat(config, policy: Policy, layer: int) -> bool:
    """Whether block `layer` is recomputed in the backward pass under `config.remat`:
    "full" every block, "non_fp8" the blocks whose FFN is not FP8 (FP8 blocks keep 4x
    smaller activations, so the seed skips their recomputation), "none" no block."""
    if config.remat == "non_fp8":
        return not is_fp8_layer(policy, layer, config.is_moe_layer(layer))
    return config.remat == "full"
