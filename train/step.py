"""Pure train and eval steps: `state, metrics = train_step(state, batch)`.

All training state is explicit data in `TrainState`: f32 master weights, optimizer
state (bf16 moments under the bf16/fp8 presets), FP8 scale state (the `fp8_state`
collection: amax histories of delayed/static recipes), the loss scale, the RNG key and
the step. The layers cast the f32 masters to their compute dtype per the policy, so
gradients arrive in f32 with respect to the masters.

Microbatches (optimizer.microbatches > 1) run through `mpx.optim.accumulate_gradients`:
gradients are summed in f32, metrics averaged, and the FP8 amax histories merged with
the max (every microbatch rolls the same old history, so the max keeps the largest
observation of this step at history[0], never the last microbatch's).

A step whose gradients are not finite changes neither the params, the moments (the
`skip_nonfinite` guard in the optimizer chain) nor the FP8 scale state, and shrinks a
dynamic loss scale. The metric `skipped` is true whenever the update was dropped,
whatever the reason: non-finite gradients, or a non-finite update from finite ones.

Sharding (`layout`, a `mpx.sharding.Layout`): the step is jitted with the layout's
shardings and GSPMD partitions it; gradients are then reduced in float32 (the weight
gradient dots accumulate in f32 before XLA's all-reduce). Microbatch i takes rows i of
every batch shard, so each microbatch spans all devices. With `grad_comm="bf16"`, each
data replica computes its own gradients (a vmap over the data axis) and
`Layout.mean_over_replicas` reduces them with bf16 communication and f32 accumulation;
FP8 amax observations are then per replica (merged with the max) instead of global.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from models import moe as moe_lib
from mpx import optim

MOE_LOSS_WEIGHT = 0.01


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training run carries from one step to the next.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: f32 master weights.
      opt_state: the optax chain's state.
      fp8_state: the model's `fp8_state` collection ({} without stateful recipes).
      loss_scale: `mpx.optim` NoOp / Static / DynamicLossScale.
      rng: uint32 raw key data (jax.random.key_data), split once per step.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    fp8_state: Any
    loss_scale: Any
    rng: jax.Array


def init_state(model: nn.Module, tx: optax.GradientTransformation, loss_scale, seed: int,
               example_tokens: jax.Array) -> TrainState:
    """Initializes params (f32), optimizer and FP8 scale state from `seed`."""
    init_key, run_key = jax.random.split(jax.random.key(seed))
    variables = model.init(init_key, example_tokens)
    params = variables["params"]
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        fp8_state=variables.get("fp8_state", {}),
        loss_scale=loss_scale,
        rng=jax.random.key_data(run_key),
    )
    # Optimizer states may share one array between leaves (e.g. zero counters); the
    # jitted step donates its input, which needs every leaf to own its buffer.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (f32) and the token count for (B, T, V) logits."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)


def _forward(model: nn.Module, params, fp8_state, inputs):
    """Logits, aux and the updated fp8_state of one forward pass."""
    variables = {"params": params, **({"fp8_state": fp8_state} if fp8_state else {})}
    if not fp8_state:
        (logits, aux) = model.apply(variables, inputs)
        return logits, aux, fp8_state
    (logits, aux), updated = model.apply(variables, inputs, mutable=["fp8_state"])
    return logits, aux, updated["fp8_state"]


def make_loss_fn(model: nn.Module, loss_scale) -> Callable:
    """(params, microbatch-with-fp8_state) -> (scaled loss, aux) for value_and_grad."""

    def loss_fn(params, micro):
        logits, aux, fp8_state = _forward(model, params, micro["fp8_state"], micro["inputs"])
        nll_sum, count = cross_entropy(logits, micro["targets"])
        loss = nll_sum / count + MOE_LOSS_WEIGHT * aux["moe_loss"]
        metrics = {"loss": nll_sum / count, "moe_loss": aux["moe_loss"]}
        if aux.get("expert_load") is not None:
            metrics["expert_load"] = aux["expert_load"]
        return loss_scale.scale(loss), {"metrics": metrics, "fp8_state": fp8_state}

    return loss_fn


def _split_rows(x: jax.Array, n: int, shards: int) -> jax.Array:
    """(B, ...) -> (n, B/n, ...): microbatch i holds rows i of each of `shards` row blocks."""
    if shards == 1:
        return optim.split_microbatches(x, n)  # contiguous rows
    if x.shape[0] % (n * shards):
        raise ValueError(f"batch of {x.shape[0]} rows cannot be split into {n} microbatches "
                         f"over {shards} batch shards")
    blocks = x.reshape((shards, n, x.shape[0] // (n * shards)) + x.shape[1:])
    return jnp.swapaxes(blocks, 0, 1).reshape((n, x.shape[0] // n) + x.shape[1:])


def _microbatches(batch, fp8_state, n: int, layout=None):
    shards = 1 if layout is None else layout.batch_shards
    micro = {k: _split_rows(batch[k], n, shards) for k in ("inputs", "targets")}
    if layout is not None:
        micro = {k: layout.constrain(v, (None, "batch", None)) for k, v in micro.items()}
    # Each microbatch reads the same scale state (broadcast along the microbatch axis).
    micro["fp8_state"] = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), fp8_state)
    return micro


def _per_replica(grad_fn: Callable, layout) -> Callable:
    """grad_fn over each data replica's rows: stacked (R, ...) f32 gradients, merged aux."""
    r = layout.replicas

    def fn(params, micro):
        split = {k: micro[k].reshape((r, -1) + micro[k].shape[1:]) for k in ("inputs", "targets")}
        split = {k: layout.constrain(v, ("replica", "replica_batch", None)) for k, v in split.items()}
        axes = {"inputs": 0, "targets": 0, "fp8_state": None}
        split["fp8_state"] = micro["fp8_state"]
        (loss, aux), grads = jax.vmap(grad_fn, in_axes=(None, axes), spmd_axis_name="data")(params, split)
        aux = {"metrics": jax.tree.map(lambda m: jnp.mean(m, axis=0), aux["metrics"]),
               "fp8_state": jax.tree.map(lambda a: jnp.max(a, axis=0), aux["fp8_state"])}
        grads = layout.replica_grads_constraint(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
        return (jnp.mean(loss), aux), grads

    return fn


def make_grad_fn(model: nn.Module, microbatches: int = 1, layout=None) -> Callable:
    """`(state, batch) -> (aux, grads)`: the step's f32 gradients, loss scale removed.

    aux = {"metrics": {"loss", "moe_loss"} averaged over microbatches, "fp8_state": the
    updated scale state (amax observations merged with the max)}. `layout` as in
    `make_train_step`.
    """
    per_replica = layout is not None and layout.replicas > 1
    if per_replica and getattr(model, "constrain", None) is not None:
        model = model.clone(constrain=layout.replica_constrain)  # the data axis is the vmap's

    def grad_step(state: TrainState, batch) -> tuple[dict, Any]:
        grad_fn = jax.value_and_grad(make_loss_fn(model, state.loss_scale), has_aux=True)
        if per_replica:
            grad_fn = _per_replica(grad_fn, layout)
        micro = _microbatches(batch, state.fp8_state, microbatches, layout)
        merge = {"metrics": "mean", "fp8_state": "max"}
        (_, aux), grads = optim.accumulate_gradients(grad_fn, state.params, micro, has_aux=True, aux_merge=merge)
        if per_replica:
            grads = layout.mean_over_replicas(grads)
        return aux, state.loss_scale.unscale(grads)

    return grad_step


def _update_applied(opt_state) -> jax.Array:
    """Whether the optimizer applied this step's update: False when its `skip_nonfinite`
    guard dropped it (non-finite gradients, or finite gradients whose update is not,
    e.g. from an overflowing learning rate); True for a chain without the guard."""
    return jnp.asarray(getattr(opt_state, "last_finite", True))


def _balance(model: nn.Module, params, metrics: dict, applied, rate: float):
    """(params, metrics) after the MoE selection-bias update and with scalar balance
    metrics in place of the (MoE blocks, E) expert loads."""
    metrics = dict(metrics)
    load = metrics.pop("expert_load", None)
    if load is None:
        return params, metrics
    moved = moe_lib.update_selection_bias(params, load, model.config, rate)
    params = jax.tree.map(lambda new, old: jnp.where(applied, new, old), moved, params)
    return params, {**metrics, **moe_lib.balance_metrics(load)}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, microbatches: int = 1,
                    layout=None, moe_bias_rate: float = 0.0) -> Callable:
    """The pure train step `(state, batch) -> (state, metrics)`; jit it with donation.

    `batch` is {"inputs": (B, T) int32, "targets": (B, T) int32}. `layout` (a
    `mpx.sharding.Layout`, optional) adds batch sharding constraints and, with
    `grad_comm="bf16"`, the per-replica gradient reduction (see the module doc).
    `moe_bias_rate`: the auxiliary-loss-free balancing speed of MoE routers with a
    selection bias (`models.moe.update_selection_bias`), applied after the optimizer
    (the bias gets no gradient); the metrics then hold `moe_max_load` and
    `moe_idle_experts` (`models.moe.balance_metrics`).
    """
    grad_step = make_grad_fn(model, microbatches, layout)

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        aux, grads = grad_step(state, batch)
        finite = optim.all_finite(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        applied = finite & _update_applied(opt_state)
        params, step_metrics = _balance(model, params, aux["metrics"], applied, moe_bias_rate)
        # A skipped step must not record its (possibly inf) amax observations.
        fp8_state = jax.tree.map(lambda new, old: jnp.where(applied, new, old), aux["fp8_state"], state.fp8_state)
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, fp8_state=fp8_state,
            loss_scale=state.loss_scale.adjust(finite),
            rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]),
        )
        metrics = {**step_metrics, "grad_norm": optim.global_norm(grads), "skipped": ~applied,
                   "loss_scale": jnp.asarray(state.loss_scale.loss_scale, jnp.float32)}
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable:
    """`(state, batch) -> {"nll_sum", "tokens"}` on held-out data (no state change)."""

    def eval_step(state: TrainState, batch) -> dict:
        logits, _, _ = _forward(model, state.params, state.fp8_state, batch["inputs"])
        nll_sum, count = cross_entropy(logits, batch["targets"])
        return {"nll_sum": nll_sum, "tokens": count}

    return eval_step
