"""The mixture-of-experts FFN: a float32 router, dispatch by sorting, shared experts.

    out = routed_scaling_factor * sum_{e in top_k(x)} w_e(x) * expert_e(x) + shared(x)

Routing (`route`) follows the config: softmax or sigmoid scores (DeepSeek-V3), an optional
per-expert selection bias (`topk_method="noaux_tc"`: added to the scores to choose the
experts, never to weight them), group-limited top-k (experts in `n_group` groups, a
token's experts from its `topk_group` best groups), normalized or raw top-k weights.

Dispatch (`dispatch`): the N x top_k (token, expert) pairs are sorted by expert, each
token's row gathered once per pair, and every expert multiplies only its own run of rows
(`mpx.nn.ExpertDense` in its grouped form, `mpx.dot.ragged.ragged_dot`): N * top_k rows
of expert work, not N * E. There is no capacity: no token is ever dropped, whatever the
load, and the result is exactly that of running each token through its own experts.

Expert parallelism (`ExpertParallel`): the experts' kernels are split over a mesh axis
(E / P per device) and, in `jax.shard_map` over that axis, every device gathers the
routed tokens of all its peers (all-gather dispatch), runs its own experts on the pairs
that chose them, and the partial outputs are summed back to the tokens' owners
(reduce-scatter): each pair's expert work is done once, on the device that holds the
expert. The result is the single-device one up to the order of float sums.

Returns, besides the output, the Switch-Transformer balance loss (on the scores
normalized over the experts) and each expert's share of the routed pairs (for balance
metrics and DeepSeek-V3's auxiliary-loss-free bias update, `bias_update`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from models.config import ModelConfig
from models.ffn import SwiGLU, swiglu_residuals
from mpx import activations
from mpx import nn as mnn
from mpx.policy import Policy

Array = jax.Array


class Router(mnn.Dense):
    """The router's linear map (kernel (D, E); float32 under every preset), with
    DeepSeek-V3's selection bias `score_bias` (E,) as a param when `selection_bias`.

    The bias never gets a gradient: training moves it by `bias_update`."""

    selection_bias: bool = False
    role: str = "router"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.selection_bias:
            self.param("score_bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return self._dense(x)


def _group_mask(choice: Array, config: ModelConfig) -> Array:
    """(N, E) bool: the experts of each token's `topk_group` best groups."""
    n, e = choice.shape
    grouped = choice.reshape(n, config.n_group, e // config.n_group)
    if config.topk_method == "noaux_tc":
        group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # (N, G): the two best of a group
    else:
        group_score = jnp.max(grouped, axis=-1)
    best = jax.lax.top_k(group_score, config.topk_group)[1]  # (N, topk_group)
    keep = jnp.any(jax.nn.one_hot(best, config.n_group, dtype=jnp.bool_), axis=1)  # (N, G)
    return jnp.repeat(keep, e // config.n_group, axis=1)


def route(logits: Array, config: ModelConfig, bias: Array | None = None) -> tuple[Array, Array, Array]:
    """A token's experts and their weights from the router's f32 logits (N, E).

    Returns:
      (weights (N, top_k) f32, experts (N, top_k) int32, scores (N, E) f32).
    """
    scores = jax.nn.sigmoid(logits) if config.router_score == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores if bias is None else scores + jax.lax.stop_gradient(bias)
    if config.n_group > 1 and config.topk_method != "greedy":
        choice = jnp.where(_group_mask(choice, config), choice, -jnp.inf)
    experts = jax.lax.top_k(choice, config.top_k)[1]
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if config.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * config.routed_scaling_factor, experts.astype(jnp.int32), scores


def dispatch(experts: Array, n_experts: int) -> tuple[Array, Array]:
    """(order, group_sizes): the flattened (token, slot) pairs sorted by expert (stable),
    and how many pairs each expert got."""
    flat = experts.reshape(-1)
    return jnp.argsort(flat, stable=True), jnp.bincount(flat, length=n_experts).astype(jnp.int32)


def bias_update(bias: Array, load: Array, rate: float) -> Array:
    """DeepSeek-V3's auxiliary-loss-free balancing (report 2.1.2): each expert's selection
    bias moves by `rate` down when it got more than its share of the routed pairs, up when
    it got less. `load` (E,) is its share (summing to 1)."""
    return bias - rate * jnp.sign(load - 1.0 / load.shape[-1])


def update_selection_bias(params: dict, load: Array, config: ModelConfig, rate: float) -> dict:
    """`params` with every MoE block's `moe/router/score_bias` moved by `bias_update`.

    Args:
      params: the model's params (nested dicts).
      load: (MoE blocks, E) each expert's share of its block's routed pairs, in block
        order (the Transformer's aux "expert_load").
      config: the model's config; a router without a selection bias (topk_method other
        than "noaux_tc") leaves params as they are.
      rate: the bias update speed (DeepSeek-V3: 0.001 for most of its training).
    """
    if config.topk_method != "noaux_tc" or not rate:
        return params
    new = dict(params)
    moe_blocks = [i for i in range(config.n_layers) if config.is_moe_layer(i)]
    for row, i in enumerate(moe_blocks):
        block = new[f"layers_{i}"]
        router = block["moe"]["router"]
        router = {**router, "score_bias": bias_update(router["score_bias"], load[row], rate)}
        new[f"layers_{i}"] = {**block, "moe": {**block["moe"], "router": router}}
    return new


def balance_metrics(load: Array) -> dict[str, Array]:
    """Scalars of (MoE blocks, E) expert loads: `moe_max_load`, the busiest expert's
    share times E averaged over blocks (1 when balanced), and `moe_idle_experts`, the
    mean number of experts per block that got no pair."""
    e = load.shape[-1]
    return {"moe_max_load": jnp.mean(jnp.max(load, axis=-1)) * e,
            "moe_idle_experts": jnp.mean(jnp.sum(load == 0, axis=-1).astype(jnp.float32))}


class Experts(nn.Module):
    """E SwiGLU (or GeGLU) experts over rows sorted by expert: (M, D) -> (M, D)."""

    n_experts: int
    d_ff: int
    policy: Policy | None = None
    activation: str = "silu"

    @nn.compact
    def __call__(self, rows: Array, group_sizes: Array) -> Array:
        expert = lambda feats, name: mnn.ExpertDense(self.n_experts, feats, policy=self.policy, name=name)  # noqa: E731
        down = mnn.ExpertSwiGLUDense(self.n_experts, rows.shape[-1], policy=self.policy, name="down",
                                     residual_format=swiglu_residuals(self, self.policy), activation=self.activation)
        return down(expert(self.d_ff, "gate")(rows, group_sizes), expert(self.d_ff, "up")(rows, group_sizes),
                    group_sizes)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Experts split over mesh axis `axis` of `mesh` (see the module docstring); the
    tokens of a call are split over the same axis."""

    mesh: Mesh
    axis: str

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]


def _local_pairs(experts: Array, first: Array, n_local: int) -> tuple[Array, Array, Array]:
    """(order, group_sizes, mine) of the (token, slot) pairs for the experts [first,
    first + n_local): pairs of other experts sort after them and get no group."""
    local = experts - first
    mine = (local >= 0) & (local < n_local)
    key = jnp.where(mine, local, n_local).reshape(-1)
    return jnp.argsort(key, stable=True), jnp.bincount(key, length=n_local + 1)[:n_local].astype(jnp.int32), mine


def _expert_ffn(rows: Array, group_sizes: Array, kernels: tuple, precisions: tuple, activation: str) -> Array:
    gate, up, down = kernels
    g = mnn.grouped_matmul(rows, gate, group_sizes, precisions[0])
    u = mnn.grouped_matmul(rows, up, group_sizes, precisions[1])
    return mnn.grouped_matmul(activations.glu(g, u, activation=activation), down, group_sizes, precisions[2])


def _parallel_experts(ep: ExpertParallel, tokens, weights, experts, kernels, precisions, activation: str, top_k: int):
    """The routed experts' combined output (N, D) f32, experts split over `ep.axis`."""
    if tokens.shape[0] % ep.size:
        raise ValueError(f"expert parallelism over mesh axis {ep.axis!r} (size {ep.size}) needs a token count "
                         f"divisible by it; got {tokens.shape[0]} tokens")

    def local(tokens, weights, experts, *kernels):
        n_local = kernels[0].shape[0]
        tokens, weights, experts = (lax.all_gather(a, ep.axis, tiled=True) for a in (tokens, weights, experts))
        order, group_sizes, mine = _local_pairs(experts, lax.axis_index(ep.axis) * n_local, n_local)
        rows = jnp.take(tokens, order // top_k, axis=0)
        y = _expert_ffn(rows, group_sizes, kernels, precisions, activation).astype(jnp.float32)
        pair_weights = jnp.take(jnp.where(mine, weights, 0.0).reshape(-1), order)[:, None]
        out = jnp.zeros(tokens.shape, jnp.float32).at[order // top_k].add(y * pair_weights)
        return lax.psum_scatter(out, ep.axis, scatter_dimension=0, tiled=True)

    split = P(ep.axis)
    return jax.shard_map(local, mesh=ep.mesh, in_specs=(split,) * 6, out_specs=split)(
        tokens, weights, experts, *kernels)


class ShardedExperts(nn.Module):
    """The routed experts with their kernels split over a mesh axis (`ExpertParallel`):
    the params of `Experts` (gate, up, down kernels), multiplied inside shard_map."""

    n_experts: int
    d_ff: int
    ep: ExpertParallel
    policy: Policy | None = None
    activation: str = "silu"

    @nn.compact
    def __call__(self, tokens: Array, weights: Array, experts: Array) -> Array:
        if self.n_experts % self.ep.size:
            raise ValueError(f"n_experts={self.n_experts} cannot be split over mesh axis {self.ep.axis!r} of size "
                             f"{self.ep.size}")
        d = tokens.shape[-1]
        layers = [mnn.ExpertKernel(self.n_experts, f, policy=self.policy, name=n)(k)
                  for n, k, f in (("gate", d, self.d_ff), ("up", d, self.d_ff), ("down", self.d_ff, d))]
        kernels, precisions = tuple(k for k, _ in layers), tuple(p for _, p in layers)
        return _parallel_experts(self.ep, tokens, weights, experts, kernels, precisions, self.activation,
                                 experts.shape[-1])


class MoE(nn.Module):
    """The MoE FFN of a block: (B, T, D) -> ((B, T, D), {"moe_loss", "expert_load"}).

    Submodules: `router`, `experts/{gate,up,down}` (kernels (E, D, F), (E, F, D)) and,
    with `n_shared_experts` > 0, `shared/{gate,up,down}`: one SwiGLU of width
    n_shared_experts * expert_d_ff that every token goes through.
    """

    config: ModelConfig
    policy: Policy | None = None
    expert_parallel: ExpertParallel | None = None

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, dict]:
        c, (b, t, d) = self.config, x.shape
        tokens = x.reshape(b * t, d)
        router = Router(c.n_experts, policy=self.policy, selection_bias=c.topk_method == "noaux_tc", name="router")
        logits = router(tokens).astype(jnp.float32)
        bias = router.variables["params"]["score_bias"] if c.topk_method == "noaux_tc" else None
        weights, experts, scores = route(logits, c, bias)
        order, group_sizes = dispatch(experts, c.n_experts)
        if self.expert_parallel is None:
            out = self._routed(tokens, weights, order, group_sizes)
        else:
            out = ShardedExperts(c.n_experts, c.expert_d_ff, self.expert_parallel, policy=self.policy,
                                 activation=c.activation, name="experts")(tokens, weights, experts)
        if c.n_shared_experts:
            shared = SwiGLU(c.n_shared_experts * c.expert_d_ff, c.n_layers, policy=self.policy,
                            activation=c.activation, name="shared")
            out = out + shared(tokens).astype(jnp.float32)
        load = group_sizes.astype(jnp.float32) / (b * t * c.top_k)  # each expert's share of the pairs
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        first = jnp.mean(jax.nn.one_hot(experts[:, 0], c.n_experts), axis=0)
        aux = {"moe_loss": c.n_experts * jnp.sum(first * jnp.mean(probs, axis=0)), "expert_load": load}
        return out.reshape(b, t, d), aux

    def _routed(self, tokens: Array, weights: Array, order: Array, group_sizes: Array) -> Array:
        """The routed experts' combined output (N, D) f32, on one device, from `dispatch`'s
        sort order and group sizes."""
        c = self.config
        rows = jnp.take(tokens, order // c.top_k, axis=0)  # (N * top_k, D), sorted by expert
        y = Experts(c.n_experts, c.expert_d_ff, policy=self.policy, activation=c.activation,
                    name="experts")(rows, group_sizes)
        pair_weights = jnp.take(weights.reshape(-1), order)[:, None]  # (N * top_k, 1)
        return jnp.zeros(tokens.shape, jnp.float32).at[order // c.top_k].add(y.astype(jnp.float32) * pair_weights)
