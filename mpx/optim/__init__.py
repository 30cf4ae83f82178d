"""mpx.optim: optax transformations for mixed-precision training.

FP32 master weights with low-precision compute copies: the train state holds f32
params and optimizer state; the step casts the masters for the forward pass
(`cast_params`), so gradients arrive in f32 and f32 updates are added to f32 masters.

    tx = mpx.optim.build("adamw", learning_rate=3e-4, schedule="cosine", warmup_steps=100,
                         total_steps=10_000, clip_norm=1.0, moment_dtype="bf16")
    opt_state = tx.init(masters)                          # bf16 mu and nu

    def train_step(masters, opt_state, loss_scale, microbatches):
        def loss_fn(p, mb):
            return loss_scale.scale(model_loss(cast_params(p, jnp.bfloat16), mb))
        loss, grads = accumulate_gradients(jax.value_and_grad(loss_fn), masters, microbatches)
        grads = loss_scale.unscale(grads)                 # f32
        loss_scale = loss_scale.adjust(all_finite(grads))
        updates, opt_state = tx.update(grads, opt_state, masters)   # skipped if NaN/inf
        return optax.apply_updates(masters, updates), opt_state, loss_scale

Modules: `optimizers` (Adam with moments in any dtype), `loss_scale` (dynamic / static / no-op loss
scales), `guard` (`skip_nonfinite`), `clipping` (f32 global norm, adaptive),
`accumulate` (microbatch scan), `master` (`cast_params`), `memory` (bytes per
parameter), `factory` (`build`: config -> chain).
"""

from mpx.optim.accumulate import accumulate_gradients, split_microbatches
from mpx.optim.clipping import AdaptiveClipState, clip_adaptive, clip_by_global_norm, global_norm
from mpx.optim.factory import OPTIMIZERS, SCHEDULES, build, make_schedule, resolve_dtype, warmup_cosine
from mpx.optim.guard import SkipNonFiniteState, skip_nonfinite
from mpx.optim.loss_scale import (
    DynamicLossScale,
    NoOpLossScale,
    StaticLossScale,
    all_finite,
    dynamic_loss_scale,
    static_loss_scale,
)
from mpx.optim.master import cast_params, matrices_only
from mpx.sharding import path_str
from mpx.optim.memory import MemoryReport, compute_copy_bytes, memory_report, num_params, tree_bytes
from mpx.optim.optimizers import ScaleByAdamState, adam, adamw, scale_by_adam

__all__ = [
    "AdaptiveClipState", "DynamicLossScale", "MemoryReport", "NoOpLossScale", "OPTIMIZERS", "SCHEDULES",
    "ScaleByAdamState", "SkipNonFiniteState", "StaticLossScale", "accumulate_gradients", "adam", "adamw",
    "all_finite", "build", "cast_params", "clip_adaptive", "clip_by_global_norm", "compute_copy_bytes", "dynamic_loss_scale",
    "global_norm", "make_schedule", "matrices_only", "memory_report", "num_params", "path_str",
    "resolve_dtype", "scale_by_adam", "skip_nonfinite", "split_microbatches", "static_loss_scale",
    "tree_bytes", "warmup_cosine",
]
