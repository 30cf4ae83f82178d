"""A model's linear layers seen from outside: find them, tap their operands, lower one.

Works on any Flax model whose matmuls go through `mpx.nn.DenseGeneral` / `Dense` /
`ExpertDense` (and their SwiGLU-fused down projections, whose input is the SwiGLU
product: `mpx.nn.linear_input`), through Flax method interception
(`flax.linen.intercept_methods`): the model's code is not changed. Layers are named by their module path
("layers_3/attn/v_proj"), the path a `Policy` rule matches.

Each layer's operands are viewed in a canonical batched-matmul form: input (G, M, K),
weight (G, K, N), output (G, M, N); G = 1 for a dense layer (M rows = tokens, K the
flattened contracted input axes, N the flattened features), G = experts for an expert
layer called in the batched form. Routed experts called in the grouped form (rows sorted
by expert, `mpx.nn.is_grouped_call`) have no such view and are left out: they stay in the
precision the policy gives them. A layer called more than once per forward pass (weight
sharing) is tapped at its last call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpx import nn as mnn
from mpx.scaled import ScaledArray

__all__ = [
    "LINEAR_TYPES", "ApplyFn", "Layer", "canonical", "find_layers", "to_canonical_out", "tapped_loss",
    "lowered_loss", "assigned_loss", "next_token_nll"
]

LINEAR_TYPES = mnn.LINEAR_TYPES
ApplyFn = Callable[[Any, Any], jax.Array]  # (variables, batch) -> model output


@dataclasses.dataclass(frozen=True)
class Layer:
    """One linear layer: its path and canonical shapes.

    Attributes:
      path: module path ("layers_0/mlp/up").
      weight_shape: canonical (G, K, N).
      out_shape, out_dtype: the shape and dtype of the layer's output (as the model sees it).
      role: the role the layer declares (`mpx.policy.ROLES`: "linear", "router", "head").
    """

    path: str
    weight_shape: tuple[int, int, int]
    out_shape: tuple[int, ...]
    out_dtype: Any
    role: str = "linear"

    @property
    def weight_elements(self) -> int:
        return math.prod(self.weight_shape)


def _is_linear_call(context, args: tuple) -> bool:
    """A linear layer's call with a (G, M, K) view: not the grouped form of routed
    experts (rows sorted by expert), which the analysis does not cover yet."""
    return context.method_name == "__call__" and isinstance(context.module, LINEAR_TYPES) and \
        not mnn.is_grouped_call(context.module, args)


def canonical(module: nn.Module, x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (G, M, K) input and (G, K, N) weight of a linear layer's call.

    Raises:
      TypeError: a pre-quantized (ScaledArray) kernel: analyse the f32 masters instead.
    """
    if isinstance(kernel, ScaledArray):
        raise TypeError(f"{mnn.module_path(module)}: the kernel is pre-quantized; analyse f32 master weights")
    if isinstance(module, mnn.ExpertDense):
        return x, kernel
    axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    axes = tuple(a % x.ndim for a in axes)
    batch_axes = tuple(a for a in range(x.ndim) if a not in axes)
    k = math.prod(x.shape[a] for a in axes)
    x2 = jnp.transpose(x, batch_axes + axes).reshape(-1, k)
    return x2[None], kernel.reshape(k, -1)[None]


def _operands(context, args) -> tuple[jax.Array, jax.Array]:
    module = context.module
    return canonical(module, mnn.linear_input(module, args), module.get_variable("params", "kernel"))


def find_layers(apply_fn: ApplyFn, variables: Any, batch: Any) -> tuple[Layer, ...]:
    """The model's linear layers in call order (shapes only: nothing is computed).

    Args:
      apply_fn: `(variables, batch) -> output`, calling the Flax model's `apply`.
      variables: the model's variables (f32 master weights).
      batch: one example batch.
    """
    found: dict[str, Layer] = {}

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if _is_linear_call(context, args):
            _, w3 = _operands(context, args)
            path = mnn.module_path(context.module)
            found[path] = Layer(path, tuple(w3.shape), tuple(y.shape), y.dtype, context.module.role)
        return y

    def run(v, b):
        with nn.intercept_methods(record):
            return apply_fn(v, b)

    jax.eval_shape(run, variables, batch)
    return tuple(found.values())


def to_canonical_out(y: jax.Array, layer: Layer) -> jax.Array:
    """A layer's output (or its gradient) as (G, M, N)."""
    g, _, n = layer.weight_shape
    return y.reshape(g, -1, n)


def tapped_loss(apply_fn: ApplyFn, loss_fn: Callable, layers: tuple[Layer, ...]) -> Callable:
    """`f(perturbations, variables, batch) -> (loss, inputs)` with every layer tapped.

    Each layer's output gets `perturbations[path]` (zeros: the value is unchanged) added,
    so `jax.grad` of f with respect to the perturbations is dLoss/d(layer output); the
    aux output holds each layer's canonical (G, M, K) input.
    """
    paths = {layer.path for layer in layers}

    def f(perturbations, variables, batch):
        inputs: dict[str, jax.Array] = {}

        def tap(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if not _is_linear_call(context, args):
                return y
            path = mnn.module_path(context.module)
            if path not in paths:
                return y
            inputs[path] = _operands(context, args)[0]
            return y + perturbations[path].astype(y.dtype)

        with nn.intercept_methods(tap):
            out = apply_fn(variables, batch)
        return loss_fn(out, batch), inputs

    return f


def lowered_loss(apply_fn: ApplyFn, loss_fn: Callable, layers: tuple[Layer, ...], lower: Callable) -> Callable:
    """`f(variables, batch, selected) -> loss` with layer number `selected` lowered.

    `lower(x3, w3) -> (G, M, N)` computes the lowered layer's output; `selected` is a
    traced int (-1: no layer), so one compilation serves every layer.
    """
    index = {layer.path: i for i, layer in enumerate(layers)}

    def f(variables, batch, selected):
        def swap(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if not _is_linear_call(context, args) or mnn.module_path(context.module) not in index:
                return y
            x3, w3 = _operands(context, args)
            i = index[mnn.module_path(context.module)]
            return jax.lax.cond(selected == i, lambda: lower(x3, w3).reshape(y.shape).astype(y.dtype), lambda: y)

        with nn.intercept_methods(swap):
            return loss_fn(apply_fn(variables, batch), batch)

    return f


def assigned_loss(apply_fn: ApplyFn, loss_fn: Callable, lowerings: dict[str, Callable]) -> Callable:
    """`f(variables, batch) -> loss` with each layer in `lowerings` computed by its function."""

    def f(variables, batch):
        def swap(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            path = mnn.module_path(context.module) if _is_linear_call(context, args) else None
            if path not in lowerings:
                return y
            return lowerings[path](*_operands(context, args)).reshape(y.shape).astype(y.dtype)

        with nn.intercept_methods(swap):
            return loss_fn(apply_fn(variables, batch), batch)

    return f


def next_token_nll(output: Any, tokens: jax.Array, per_row: bool = False) -> jax.Array:
    """Mean next-token negative log-likelihood (nats) of logits (B, T, V) for tokens (B, T):
    a scalar, or (B,) with `per_row` (each window's own mean).

    `output` may be a tuple whose first element is the logits (the reference model's).
    """
    logits = output[0] if isinstance(output, (tuple, list)) else output
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)
    return -jnp.mean(picked, axis=(1, 2)) if per_row else -jnp.mean(picked)
