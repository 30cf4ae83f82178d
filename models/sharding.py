"""The reference transformer's sharding rules: the logical axes of each of its parameters.

`mpx.sharding` is the machinery (meshes, logical-axis rules, specs, layouts) and knows no
model; this module holds the table for models/transformer.py's module paths and binds
the machinery to it, so a program that trains or serves the reference model imports
this module as its `sharding`:

    from models import sharding
    layout = sharding.Layout(sharding.make_mesh({"fsdp": 4, "tensor": 2}))
    params = sharding.shard_tree(params, layout.mesh)

`PARAM_AXES`: (path pattern, logical axes) pairs. A leaf of any state tree whose path
matches a pattern (fnmatch, first match of the same rank wins) gets those logical axes;
optimizer moments match through their embedded param path. Serving stores
DenseGeneral kernels as 2-D (K, N) ScaledArrays (serve/quantize.py), hence the rank-2
attention patterns. MoE experts' (E, K, F) kernels split experts over fsdp (expert
parallelism) and F over tensor; the shared experts are dense kernels and the router's
(D, E) kernel keeps E whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jax.sharding import Mesh, PartitionSpec

from mpx import sharding as _sharding
from mpx.sharding import (  # noqa: F401  (re-exported: the machinery, for this model's programs)
    RULES,
    abstract_mesh,
    batch_sharding,
    batch_shards,
    cache_shardings,
    cache_specs,
    collectives,
    global_batch,
    make_mesh,
    parse_mesh,
    path_str,
    process_rows,
    replicated,
    shard_cache,
)

PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    ("*embed/embedding", ("vocab", "embed")),
    ("*lm_head/kernel", ("embed", "vocab")),
    ("*attn/q_proj/kernel", ("embed", "heads", "head_dim")),
    ("*attn/k_proj/kernel", ("embed", "kv_heads", "head_dim")),
    ("*attn/v_proj/kernel", ("embed", "kv_heads", "head_dim")),
    ("*attn/o_proj/kernel", ("heads", "head_dim", "embed")),
    # Multi-head latent attention (models/mla.py), as DeepSeek-V3's own tensor parallelism
    # splits it: the down projections to the latents whole on every tensor rank (their
    # inputs on fsdp), the up projections by head.
    ("*attn/q_b_proj/kernel", ("embed", "heads", "head_dim")),
    ("*attn/kv_b_proj/kernel", ("embed", "heads", "head_dim")),
    ("*attn/q_a_proj/kernel", ("embed", None)),
    ("*attn/kv_a_proj/kernel", ("embed", None)),
    ("*attn/[qkv]_proj/kernel", ("embed", "heads")),
    ("*attn/q_b_proj/kernel", ("embed", "heads")),
    ("*attn/kv_b_proj/kernel", ("embed", "heads")),
    ("*attn/o_proj/kernel", ("heads", "embed")),
    # Replicated: the latent norms (each tensor rank holds its whole latent) and the MoE
    # router's selection bias, like every other norm and vector.
    ("*attn/q_a_norm/scale", (None,)),
    ("*attn/kv_a_norm/scale", (None,)),
    ("*router/score_bias", (None,)),
    ("*router/kernel", ("embed", None)),
    ("*experts/down/kernel", ("experts", "mlp", "embed")),
    ("*experts/*/kernel", ("experts", "embed", "mlp")),
    ("*/down/kernel", ("mlp", "embed")),
    ("*kernel", ("embed", "mlp")),  # any other dense kernel: in on fsdp, out on tensor
)


@dataclasses.dataclass(frozen=True)
class Layout(_sharding.Layout):
    """`mpx.sharding.Layout` with this model's `PARAM_AXES` as its parameter table."""

    param_axes: tuple = dataclasses.field(default=PARAM_AXES, kw_only=True)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules=RULES) -> PartitionSpec:
    """The PartitionSpec of one state leaf of the reference model (see `mpx.sharding.spec_for`)."""
    return _sharding.spec_for(path, shape, mesh, PARAM_AXES, rules)


def tree_specs(tree: Any, mesh: Mesh, rules=RULES) -> Any:
    """PartitionSpecs of a state tree of the reference model (see `mpx.sharding.tree_specs`)."""
    return _sharding.tree_specs(tree, mesh, PARAM_AXES, rules)


def tree_shardings(tree: Any, mesh: Mesh, rules=RULES) -> Any:
    """NamedShardings of a state tree of the reference model."""
    return _sharding.tree_shardings(tree, mesh, PARAM_AXES, rules)


def shard_tree(tree: Any, mesh: Mesh, rules=RULES) -> Any:
    """A state tree of the reference model placed on `mesh`."""
    return _sharding.shard_tree(tree, mesh, PARAM_AXES, rules)


def mean_over_replicas(stacked: Any, mesh: Mesh, comm_dtype="bf16", rules=RULES) -> Any:
    """The f32 mean of per-replica gradients of the reference model (see `mpx.sharding`)."""
    return _sharding.mean_over_replicas(stacked, mesh, PARAM_AXES, comm_dtype, rules)
