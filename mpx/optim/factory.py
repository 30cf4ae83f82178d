"""`build`: one call from config values to the optax chain a train step uses.

    tx = mpx.optim.build("adamw", learning_rate=3e-4, schedule="cosine",
                         warmup_steps=100, total_steps=10_000, clip_norm=1.0,
                         moment_dtype="bf16", weight_decay=0.1, mask=matrices_only)

The chain is `skip_nonfinite(chain(clip..., optimizer))`: clipping (fixed global
norm, then adaptive, when given) runs on the gradients before the optimizer, and the
whole step is skipped on NaN/inf. All arguments are plain values, so a YAML config maps
onto them 1:1.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import optax

from mpx import formats as formats_lib
from mpx.optim.optimizers import adamw
from mpx.optim.clipping import clip_adaptive, clip_by_global_norm
from mpx.optim.guard import skip_nonfinite as skip_nonfinite_fn

__all__ = ["OPTIMIZERS", "SCHEDULES", "resolve_dtype", "warmup_cosine", "make_schedule", "build"]

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def resolve_dtype(dtype):
    """A dtype from a dtype or a name ("bf16", "bfloat16", "f32", "float32", "fp16").

    Raises:
      ValueError: for a name that is neither an mpx format nor a numpy dtype.
    """
    if isinstance(dtype, str):
        try:
            fmt = formats_lib.get(dtype)
        except ValueError:
            try:
                return jnp.dtype(dtype)
            except TypeError:
                raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bf16', 'fp16' or 'fp32'") from None
        if fmt.dtype is None:
            raise ValueError(f"format {dtype!r} is simulated and has no storage dtype")
        return jnp.dtype(fmt.dtype)
    return jnp.dtype(dtype)


def warmup_cosine(peak_value: float, warmup_steps: int, total_steps: int, final_ratio: float = 0.1):
    """Linear warmup from 0 to `peak_value`, then cosine decay to peak * final_ratio.

    Args:
      peak_value: learning rate at the end of warmup.
      warmup_steps: steps of linear warmup (0 for none).
      total_steps: steps of warmup + decay, > warmup_steps.
      final_ratio: final learning rate as a fraction of the peak.

    Returns:
      An optax schedule (step -> learning rate).

    Raises:
      ValueError: if total_steps <= warmup_steps or final_ratio is outside [0, 1].
    """
    _check_steps(warmup_steps, total_steps)
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio must be in [0, 1]; got {final_ratio}")
    return optax.warmup_cosine_decay_schedule(0.0, peak_value, warmup_steps, total_steps,
                                              end_value=peak_value * final_ratio)


def _check_steps(warmup_steps, total_steps) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(f"total_steps must be > warmup_steps={warmup_steps}; got {total_steps}")


def make_schedule(learning_rate, schedule: str = "constant", warmup_steps: int = 0,
                  total_steps: int | None = None, final_ratio: float = 0.1):
    """A learning rate or schedule from config values.

    Args:
      learning_rate: peak learning rate, or already an optax schedule (returned as is).
      schedule: "constant" (after an optional linear warmup), "cosine" (warmup then
        cosine decay) or "linear" (warmup then linear decay), both decaying to
        learning_rate * final_ratio at total_steps.
      warmup_steps, total_steps, final_ratio: as in `warmup_cosine`.

    Returns:
      A float or an optax schedule.

    Raises:
      ValueError: for an unknown schedule or inconsistent step counts.
    """
    if callable(learning_rate):
        return learning_rate
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if schedule == "cosine":
        return warmup_cosine(learning_rate, warmup_steps, total_steps, final_ratio)
    if schedule == "linear":
        _check_steps(warmup_steps, total_steps)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps),
             optax.linear_schedule(learning_rate, learning_rate * final_ratio, total_steps - warmup_steps)],
            [warmup_steps])
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
    if warmup_steps == 0:
        return learning_rate
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
        [warmup_steps])


def _clippers(clip_norm, adaptive_clip) -> list[optax.GradientTransformation]:
    out = []
    if clip_norm is not None:
        out.append(clip_by_global_norm(clip_norm))
    if isinstance(adaptive_clip, Mapping):
        out.append(clip_adaptive(**adaptive_clip))
    elif adaptive_clip is not None:
        out.append(clip_adaptive(factor=float(adaptive_clip)))
    return out


def build(name: str = "adamw", learning_rate: Any = 1e-3, *, schedule: str = "constant",
          warmup_steps: int = 0, total_steps: int | None = None, final_ratio: float = 0.1,
          clip_norm: float | None = None, adaptive_clip: float | Mapping | None = None,
          moment_dtype: Any = jnp.bfloat16, mu_dtype: Any = None, nu_dtype: Any = None,
          b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0,
          mask: Any = None, skip_nonfinite: bool = True) -> optax.GradientTransformation:
    """The optimizer chain for a training run.

    Args:
      name: "adamw", "adam" (adamw without decay) or "sgd" (momentum b1, stored as
        moment_dtype).
      learning_rate: peak learning rate or an optax schedule.
      schedule, warmup_steps, total_steps, final_ratio: see `make_schedule`.
      clip_norm: clip the global gradient norm to this value (None: no clipping).
      adaptive_clip: None, a factor for `clip_adaptive`, or a dict of its kwargs.
      moment_dtype: storage dtype of the moments (dtype or name such as "bf16");
        mu_dtype / nu_dtype override it per moment.
      b1, b2, eps: Adam hyperparameters.
      weight_decay: decoupled weight decay (adamw and sgd).
      mask: weight-decay mask (e.g. `matrices_only`); None decays every leaf.
      skip_nonfinite: wrap the chain in `skip_nonfinite`.

    Returns:
      An optax GradientTransformation.

    Raises:
      ValueError: for an unknown name or schedule (listing the allowed ones), or
        inconsistent hyperparameters.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if name == "adam" and weight_decay:
        raise ValueError(f"optimizer 'adam' has no weight decay; got weight_decay={weight_decay} (use 'adamw')")
    lr = make_schedule(learning_rate, schedule, warmup_steps, total_steps, final_ratio)
    mu = resolve_dtype(moment_dtype if mu_dtype is None else mu_dtype)
    nu = resolve_dtype(moment_dtype if nu_dtype is None else nu_dtype)
    if name == "sgd":
        opt = optax.chain(optax.add_decayed_weights(weight_decay, mask),
                          optax.sgd(lr, momentum=b1, accumulator_dtype=mu))
    else:
        decay = 0.0 if name == "adam" else weight_decay
        opt = adamw(lr, b1, b2, eps, decay, mu_dtype=mu, nu_dtype=nu, mask=mask)
    tx = optax.chain(*_clippers(clip_norm, adaptive_clip), opt)
    return skip_nonfinite_fn(tx) if skip_nonfinite else tx
