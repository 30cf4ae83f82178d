"""FP32 master weights and their low-precision compute copies.

The pattern (the train state holds only float32 masters):

    def loss_fn(masters, batch):
        params = cast_params(masters, jnp.bfloat16)      # compute copy, inside the step
        return model.apply(params, batch)
    grads = jax.grad(loss_fn)(state.params, batch)        # float32: the cast's VJP
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)   # float32 masters

Because the cast is inside the differentiated function, gradients are taken with
respect to the f32 masters and arrive in f32 (the transpose of a cast is a cast
back), and the optimizer adds its f32 updates to f32 weights: small updates that a
bf16 weight would round away (|update| < 2**-9 |w|) still accumulate. The compute copy
lives only inside the jitted step; see `mpx.optim.memory` for how it is counted.

Per-layer precision: pass a function `(path, leaf) -> dtype | None` instead of one
dtype, with `path` the "/"-joined key path ("layers_3/attn/v_proj/kernel"), the same
strings `mpx.policy` rules match; None keeps the master's dtype (e.g. norms in f32).
FP8 weights are not produced here: they need per-block scales, which the FP8 layers
compute from the bf16/f32 copy (`mpx.quantize`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mpx.sharding import path_str

__all__ = ["cast_params", "matrices_only"]


def _cast_leaf(x, dtype):
    x = jnp.asarray(x)
    if dtype is None or not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"cast_params target must be a float dtype; got {dtype}")
    if dtype.itemsize == 1:
        raise ValueError(
            f"cast_params does not cast to {dtype}: unscaled FP8 weights saturate or become NaN; "
            "quantize them with scales (mpx.quantize) inside the layer instead")
    return x.astype(dtype)


def cast_params(params, dtype_or_fn):
    """Casts the floating leaves of `params`; integer and bool leaves are left alone.

    Args:
      params: a pytree (usually f32 master weights).
      dtype_or_fn: a float dtype (16 or 32 bits), or `fn(path: str, leaf) -> dtype or
        None` choosing per leaf (None keeps the leaf as it is).

    Returns:
      A pytree of params' structure. Differentiable: gradients flow back to the
      masters in their own dtype.

    Raises:
      ValueError: for a non-float or 8-bit target dtype.
    """
    if callable(dtype_or_fn) and not isinstance(dtype_or_fn, type):
        fn: Callable = dtype_or_fn
        return jax.tree_util.tree_map_with_path(lambda p, x: _cast_leaf(x, fn(path_str(p), x)), params)
    return jax.tree.map(lambda x: _cast_leaf(x, dtype_or_fn), params)


def matrices_only(params):
    """Weight-decay mask: True for leaves with ndim >= 2 (kernels, embeddings).

    Biases, norm scales and other vectors are not decayed, as in most LLM recipes.
    Pass as `mask=matrices_only` to `adamw` or `build`.
    """
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)
