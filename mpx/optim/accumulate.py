"""Gradient accumulation over microbatches with `lax.scan`, summing in float32.

    (loss, aux), grads = accumulate_gradients(
        jax.value_and_grad(loss_fn, has_aux=True), params, microbatches,
        has_aux=True, aux_merge={"metrics": "mean", "amax": "max"})

`microbatches` is any pytree whose leaves share a leading microbatch axis of length n
(`split_microbatches` makes one from a batch). The result has the shape of a single
`value_and_grad` call: the mean loss, the mean gradients (summed in f32, then
multiplied by 1/n) and the merged auxiliary outputs.

Merging aux outputs. `aux_merge` is one of

* a mode string applied to every leaf: "mean" (metrics), "sum" (counts), "max" (FP8
  amax observations: the scale for the next step must cover every microbatch, so
  amaxes are maxed, never averaged or overwritten by the last microbatch), "min", or
  "last" (e.g. an updated delayed-scaling history);
* a pytree whose structure is a prefix of aux's, with a mode string or a callable at
  each leaf, e.g. `{"metrics": "mean", "amax": "max"}`;
* a callable, or a callable at a leaf of that pytree: it receives that part of aux
  stacked along a new leading microbatch axis (shape (n, ...)) and returns the merged
  value.

Mode strings are reduced in the scan carry (memory of one microbatch); callables see
the stacked values (memory of n microbatches of that part of aux). Means are summed in
at least f32; the mean of an integer leaf is f32. The mean loss and gradients equal the
full-batch ones when the loss is a per-example mean and microbatches are equal in size.
`optax.MultiSteps` is the alternative when microbatches arrive one jitted step at a
time instead of in one array.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["MODES", "split_microbatches", "accumulate_gradients"]

F32 = jnp.float32
MODES = ("mean", "sum", "max", "min", "last")


def split_microbatches(batch, num_microbatches: int):
    """Reshapes every leaf (B, ...) of `batch` to (num_microbatches, B // num_microbatches, ...).

    Raises:
      ValueError: if a leaf's leading size is not divisible by num_microbatches.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1; got {num_microbatches}")

    def split(x):
        if x.ndim == 0 or x.shape[0] % num_microbatches:
            raise ValueError(
                f"batch leaf of shape {x.shape} cannot be split into {num_microbatches} microbatches")
        return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])

    return jax.tree.map(split, batch)


def _num_microbatches(microbatches) -> int:
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(microbatches)}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            "every microbatch leaf needs the same non-empty leading microbatch axis; "
            f"got leading sizes {sorted(sizes, key=str)}")
    return sizes.pop()


def _check_mode(mode) -> None:
    if not callable(mode) and mode not in MODES:
        raise ValueError(f"unknown aux_merge mode {mode!r}; allowed: {', '.join(MODES)} or a callable")


def _extreme(dtype, lowest: bool):
    if jnp.issubdtype(dtype, jnp.floating):
        return -jnp.inf if lowest else jnp.inf
    if dtype == jnp.bool_:
        return not lowest
    info = jnp.iinfo(dtype)
    return info.min if lowest else info.max


def _reduce_init(mode: str, shape: jax.ShapeDtypeStruct) -> jax.Array:
    """The identity of each reduction: -inf for max, +inf for min, 0 for the rest."""
    if mode in ("max", "min"):
        return jnp.full(shape.shape, _extreme(shape.dtype, lowest=mode == "max"), shape.dtype)
    acc_dtype = jnp.promote_types(shape.dtype, F32) if mode == "mean" else shape.dtype
    return jnp.zeros(shape.shape, acc_dtype)


def _reduce_step(mode: str, acc: jax.Array, x: jax.Array) -> jax.Array:
    if mode in ("mean", "sum"):
        return acc + x.astype(acc.dtype)
    if mode == "max":
        return jnp.maximum(acc, x)
    if mode == "min":
        return jnp.minimum(acc, x)
    return x  # "last"


def _reduce_final(mode: str, acc: jax.Array, n: int, dtype) -> jax.Array:
    """Means are summed in >= f32, divided, and returned in the leaf's float dtype."""
    if mode != "mean":
        return acc
    mean = acc * (1.0 / n)
    return mean.astype(dtype) if jnp.issubdtype(dtype, jnp.inexact) else mean


def accumulate_gradients(loss_and_grad_fn: Callable, params, microbatches, *, has_aux: bool = False,
                         aux_merge: Any = "mean", grad_dtype=F32):
    """Mean loss, mean gradients and merged aux over a leading microbatch axis.

    Args:
      loss_and_grad_fn: `(params, microbatch) -> (loss, grads)`, or
        `((loss, aux), grads)` when has_aux; e.g. `jax.value_and_grad(loss_fn)`.
      params: passed unchanged to every call.
      microbatches: pytree whose leaves have a leading axis of n microbatches.
      has_aux: whether loss_and_grad_fn returns aux outputs.
      aux_merge: how aux outputs combine across microbatches (see the module doc).
      grad_dtype: accumulation and output dtype of the gradients (float32).

    Returns:
      `(loss, grads)`, or `((loss, aux), grads)` when has_aux: loss is the f32 mean,
      grads the mean in `grad_dtype` with params' structure, aux merged.

    Raises:
      ValueError: for leaves without a common leading axis or an unknown merge mode.
    """
    n = _num_microbatches(microbatches)
    first = jax.tree.map(lambda x: x[0], microbatches)
    out_shape = jax.eval_shape(loss_and_grad_fn, params, first)
    (_, aux_shape), grads_shape = out_shape if has_aux else ((None, None), out_shape[1])
    spec_def, modes, aux_shapes = _aux_plan(aux_merge, aux_shape) if has_aux else (None, [], [])

    def body(carry, microbatch):
        loss_sum, grad_sum, reduced = carry
        out = loss_and_grad_fn(params, microbatch)
        (loss, aux), grads = out if has_aux else ((out[0], None), out[1])
        grad_sum = jax.tree.map(lambda s, g: s + g.astype(grad_dtype), grad_sum, grads)
        parts = spec_def.flatten_up_to(aux) if has_aux else []
        reduced = [_reduce_tree(m, r, p) for m, r, p in zip(modes, reduced, parts)]
        stacked = [p if callable(m) else None for m, p in zip(modes, parts)]
        return (loss_sum + jnp.asarray(loss, F32), grad_sum, reduced), stacked

    init = (jnp.zeros([], F32), jax.tree.map(lambda g: jnp.zeros(g.shape, grad_dtype), grads_shape),
            [None if callable(m) else jax.tree.map(lambda s, m=m: _reduce_init(m, s), a)
             for m, a in zip(modes, aux_shapes)])
    (loss_sum, grad_sum, reduced), stacked = jax.lax.scan(body, init, microbatches)
    inv_n = 1.0 / n
    loss = loss_sum * inv_n
    grads = jax.tree.map(lambda g: g * jnp.asarray(inv_n, grad_dtype), grad_sum)
    if not has_aux:
        return loss, grads
    merged = [m(s) if callable(m) else jax.tree.map(lambda r, a, m=m: _reduce_final(m, r, n, a.dtype), r, a)
              for m, r, s, a in zip(modes, reduced, stacked, aux_shapes)]
    return (loss, jax.tree.unflatten(spec_def, merged)), grads


def _reduce_tree(mode, acc, part):
    if callable(mode):
        return None
    return jax.tree.map(lambda a, x: _reduce_step(mode, a, x), acc, part)


def _aux_plan(aux_merge, aux_shape):
    """(treedef of the merge spec, its modes, the aux subtree under each mode)."""
    is_mode = lambda x: isinstance(x, str) or callable(x)
    modes, spec_def = jax.tree.flatten(aux_merge, is_leaf=is_mode)
    for mode in modes:
        _check_mode(mode)
    try:
        parts = spec_def.flatten_up_to(aux_shape)
    except (ValueError, TypeError) as err:
        raise ValueError(f"aux_merge {aux_merge!r} is not a prefix of the aux structure "
                         f"{jax.tree.structure(aux_shape)}: {err}") from None
    return spec_def, modes, parts
