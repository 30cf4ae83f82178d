"""Sharding: a device mesh from axis sizes, logical axis names, PartitionSpecs by rules.

One global mesh with three named axes (all Auto, so XLA's GSPMD propagates shardings
through the maths; the model code never names a mesh axis):

    data     replicas: the batch is split, params and optimizer state are replicated
    fsdp     the batch is split and params / optimizer state are sharded (ZeRO-3)
    tensor   Megatron-style: heads, FFN width and vocabulary split within a layer

Two tables turn shapes into shardings:

* a model's `param_axes`: (path pattern, logical axes) pairs, passed in (mpx knows no
  model; the reference transformer's table is `models.sharding.PARAM_AXES`). A leaf of
  any state tree (params, Adam moments, gradients, pre-quantized FP8 data and block
  scales) whose "/"-joined path matches a pattern (fnmatch, first match of the same
  rank wins) gets those logical axes; optimizer moments match through their embedded param path, so they
  shard like their params. Everything else (norm scales, counters, FP8 amax
  histories, loss scale, RNG) is replicated: it is tiny.
* `RULES`: logical axis -> mesh axes. A dimension drops a mesh axis that an earlier
  dimension already uses, or whose size does not divide it (then it is replicated
  along that axis), so any model shape gets a valid spec on any mesh.

Activations use `batch` (on data and fsdp) and unsharded `seq` / `act_embed` (the
model names its activations' axes and pins them through `constrain`); the KV
cache (B, S, G, K) uses `batch`, `cache_seq`, `kv_heads`, `head_dim`. A block scale
of a pre-quantized weight takes its weight's axes, so each shard holds the scales of
its own blocks whenever the shards hold whole blocks.

Gradients: under GSPMD the weight-gradient dots accumulate in f32 and XLA reduces them
over data/fsdp in f32. `Layout(mesh, grad_comm="bf16")` instead computes per-replica
gradients and reduces them over the data axis with bf16 on the wire and f32
accumulation (`mean_over_replicas`).

Serving (prefill / decode, written elsewhere) needs only these helpers:

    layout = Layout(make_mesh({"data": 1, "tensor": -1}), param_axes=PARAM_AXES)
    model = Transformer(cfg, policy, constrain=layout.constrain)
    params = shard_tree(params, layout.mesh, PARAM_AXES)   # or checkpoint.restore(target=...)
    cache = shard_cache(init_cache(cfg, batch), layout.mesh)
    cache_sh = cache_shardings(cache, layout.mesh)
    decode = jax.jit(decode_fn, in_shardings=(layout.shardings(params), layout.batch_sharding(), cache_sh),
                     out_shardings=(layout.batch_sharding(3), cache_sh), donate_argnums=2)

Modules: `mesh` (make_mesh, abstract_mesh), `specs` (logical axes -> PartitionSpecs for
state trees, batches and the KV cache), `layout` (Layout, gradient reduction, HLO
collective counts), `explicit` (the core's entry points on meshes with Explicit axes,
such as `jax.make_mesh`'s by default).

Example:
    >>> axes = (("*/kernel", ("embed", "mlp")),)            # a model's table
    >>> mesh = make_mesh({"data": -1})                       # all devices on data
    >>> spec_for("layers_0/mlp/up/kernel", (128, 384), mesh, axes) == PartitionSpec(None, None)  # 1 device
    True
    >>> tuple(spec_for("layers_0/mlp/up/kernel", (128, 384), abstract_mesh({"fsdp": 4, "tensor": 2}), axes))
    ('fsdp', 'tensor')
"""

from jax.sharding import PartitionSpec  # noqa: F401  (used by the docstring example)

from mpx.sharding.layout import (
    GRAD_COMM_DTYPES,
    Layout,
    collectives,
    global_amax,
    mean_over_replicas,
)
from mpx.sharding.mesh import MESH_AXES, abstract_mesh, make_mesh, parse_mesh, resolve_sizes
from mpx.sharding.specs import (
    CACHE_AXES,
    RULES,
    activation_constraint,
    batch_sharding,
    batch_shards,
    batch_spec,
    cache_shardings,
    cache_specs,
    constrain,
    global_batch,
    logical_to_spec,
    param_logical_axes,
    path_str,
    per_device_bytes,
    process_rows,
    replicated,
    shard_cache,
    shard_elements,
    shard_tree,
    spec_for,
    tree_shardings,
    tree_specs,
)

__all__ = [
    "CACHE_AXES", "GRAD_COMM_DTYPES", "Layout", "MESH_AXES", "RULES", "abstract_mesh",
    "activation_constraint", "batch_sharding", "batch_shards", "batch_spec", "cache_shardings", "cache_specs",
    "collectives", "constrain", "global_amax", "global_batch", "logical_to_spec", "make_mesh",
    "mean_over_replicas", "param_logical_axes", "parse_mesh", "path_str", "per_device_bytes", "process_rows",
    "replicated", "resolve_sizes", "shard_cache", "shard_elements", "shard_tree", "spec_for",
    "tree_shardings", "tree_specs",
]
