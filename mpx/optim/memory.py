"""Training-state memory per parameter: master weights, grads, moments, scale state.

`memory_report(params, opt_state, ...)` counts bytes from the arrays' shapes and dtypes
(arrays or `jax.ShapeDtypeStruct`s, so `jax.eval_shape` states of large models work
without allocating). Activations are not counted.

How each category is counted:

* master weights: the params pytree as stored in the train state (f32 masters: 4 B).
* gradients: one gradient per parameter in `grad_dtype` (f32: 4 B). Under jit the
  gradient pytree is live between backward and update, so it is persistent peak.
* optimizer: every leaf of opt_state (Adam moments, counters, clip EMAs...).
* scale state: FP8 amax histories and scales (`scale_state`), usually tiny.
* compute copy (transient): the bf16 or FP8 copy of the weights the forward pass reads,
  `compute_dtype_bytes` per parameter (bf16: 2, FP8: 1 + scales, e.g. 4/128**2 for
  f32 scales of 128x128 blocks). It is made inside the step, layer by layer; XLA frees
  each layer's copy after use unless the backward pass keeps it as a residual, in which
  case it behaves like an activation. It is reported apart and excluded from `total`;
  `total_with_compute_copy` is the pessimistic figure (every layer's copy live at once).

Per-parameter figures (f32 masters and grads): f32 moments 4 + 4 + 8 = 16 B; bf16
moments 4 + 4 + 4 = 12 B (bf16 and FP8 presets alike; FP8 adds a compute copy of
~1 B and a few bytes of scale state per tensor). DeepSeek-V3 reports a comparable
layout (f32 masters and grads, bf16 moments) at about 13-14 B including its extras.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

__all__ = ["CATEGORIES", "tree_bytes", "num_params", "MemoryReport", "memory_report", "compute_copy_bytes"]

CATEGORIES = ("master", "gradients", "optimizer", "scale_state")


def _leaf_bytes(x) -> int:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return 0
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of `tree` (from shape and dtype; non-arrays count 0)."""
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))


def num_params(params) -> int:
    """Number of floating-point elements in `params`."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params)
               if hasattr(x, "dtype") and np.issubdtype(np.dtype(x.dtype), np.floating))


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of the training state by category.

    Attributes:
      num_params: floating-point parameters counted.
      master, gradients, optimizer, scale_state: persistent bytes per category.
      compute_copy: transient bytes of the low-precision weight copy (not in total).
    """

    num_params: int
    master: int
    gradients: int
    optimizer: int
    scale_state: int
    compute_copy: int

    @property
    def total(self) -> int:
        """Persistent bytes: master + gradients + optimizer + scale_state."""
        return self.master + self.gradients + self.optimizer + self.scale_state

    @property
    def total_with_compute_copy(self) -> int:
        """Total plus the compute copy, as if every layer's copy were live at once."""
        return self.total + self.compute_copy

    def per_param(self, category: str = "total") -> float:
        """Bytes per parameter of a category, "total" or "total_with_compute_copy".

        Raises:
          ValueError: for an unknown category.
        """
        allowed = CATEGORIES + ("compute_copy", "total", "total_with_compute_copy")
        if category not in allowed:
            raise ValueError(f"unknown category {category!r}; allowed: {', '.join(allowed)}")
        return getattr(self, category) / max(self.num_params, 1)

    def __str__(self) -> str:
        rows = [("master weights", "master"), ("gradients", "gradients"),
                ("optimizer state", "optimizer"), ("scale state", "scale_state"),
                ("total (persistent)", "total"), ("compute copy (transient)", "compute_copy"),
                ("total + compute copy", "total_with_compute_copy")]
        lines = [f"{self.num_params:,} parameters", f"{'category':<26}{'MiB':>12}{'B/param':>10}"]
        for label, key in rows:
            lines.append(f"{label:<26}{getattr(self, key) / 2**20:>12.3f}{self.per_param(key):>10.3f}")
        return "\n".join(lines)


def memory_report(params, opt_state, *, compute_dtype_bytes: float = 0.0, grad_dtype=np.float32,
                  scale_state=None) -> MemoryReport:
    """Counts the training state's bytes by category (see the module doc).

    Args:
      params: master weights (arrays or ShapeDtypeStructs).
      opt_state: the optimizer state (arrays or ShapeDtypeStructs).
      compute_dtype_bytes: bytes per parameter of the transient compute copy (bf16: 2,
        FP8: 1 plus scale overhead; 0 when the forward pass reads the masters).
      grad_dtype: dtype of the gradients, one per floating parameter.
      scale_state: FP8 scale state (amax histories, scales) or None.

    Returns:
      A MemoryReport; `str(report)` is a table in MiB and bytes per parameter.

    Raises:
      ValueError: if compute_dtype_bytes is negative.
    """
    if compute_dtype_bytes < 0:
        raise ValueError(f"compute_dtype_bytes must be >= 0; got {compute_dtype_bytes}")
    n = num_params(params)
    return MemoryReport(
        num_params=n,
        master=tree_bytes(params),
        gradients=n * np.dtype(grad_dtype).itemsize,
        optimizer=tree_bytes(opt_state),
        scale_state=tree_bytes(scale_state),
        compute_copy=int(round(n * compute_dtype_bytes)),
    )


def compute_copy_bytes(precision) -> float:
    """Bytes per parameter of the transient weight copy a layer of `precision` makes.

    FP8 recipe: 1 (scales are a few bytes per 128x128 block, not counted); compute dtype
    equal to the param dtype: 0 (the forward reads the masters); else the compute dtype's
    itemsize (2 for bf16 / fp16).

    Args:
      precision: an `mpx.policy.Precision` (e.g. `policy.resolve("layers_0/mlp/up")`).
    """
    if precision.recipe is not None:
        return 1.0
    if np.dtype(precision.compute_dtype) == np.dtype(precision.param_dtype):
        return 0.0
    return float(np.dtype(precision.compute_dtype).itemsize)

