"""PartitionSpecs from logical axes: parameters by path tables, batches, the KV cache."""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "RULES", "CACHE_AXES", "logical_to_spec", "param_logical_axes", "spec_for", "path_str", "tree_specs",
    "tree_shardings", "shard_tree", "replicated", "batch_spec", "batch_sharding", "batch_shards", "constrain",
    "activation_constraint", "process_rows", "global_batch", "cache_specs", "cache_shardings", "shard_cache",
    "shard_elements", "per_device_bytes"
]

# Logical axis -> mesh axes (a tuple shards one dimension over several mesh axes).
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("replica", ("data",)),  # per-replica gradients (bf16 gradient communication)
    ("replica_batch", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("experts", ("fsdp",)),  # expert parallelism over fsdp; falls back to embed on fsdp
    ("embed", ("fsdp",)),
)

# Suffixes of pre-quantized weights: data and block scales shard with their kernel.
_QUANTIZED_SUFFIXES = ("/data", "/scale", "/scale_inv", "_scale", "_scale_inv")

CACHE_AXES = {4: ("batch", "cache_seq", "kv_heads", "head_dim"), 3: ("batch", "cache_seq", "kv_heads"),
              1: ("batch",)}


def _mesh_axes_for(name: str | None, rules) -> tuple[str, ...]:
    for logical, axes in rules:
        if logical == name:
            return (axes,) if isinstance(axes, str) else tuple(axes or ())
    return ()


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dimensions have `logical_axes`.

    Per dimension, the rule's mesh axes are kept in order while their product divides
    the dimension; axes of size 1 and axes an earlier dimension uses are skipped.

    Args:
      logical_axes: one logical name (or None) per dimension.
      shape: the array's shape.
      mesh: the device mesh.
      rules: (logical, mesh axes) pairs; unlisted names are replicated.

    Returns:
      A PartitionSpec with one entry per dimension.

    Raises:
      ValueError: if logical_axes and shape differ in length.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    entries = []
    for name, size in zip(logical_axes, shape):
        kept, product = [], 1
        for axis in _mesh_axes_for(name, rules):
            n = mesh.shape.get(axis, 1)
            if n == 1 or axis in used:
                continue
            if size % (product * n):
                break
            kept.append(axis)
            product *= n
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*entries)


def param_logical_axes(path: str, ndim: int, param_axes) -> tuple[str | None, ...] | None:
    """Logical axes of the leaf at `path` (first pattern of rank `ndim` in `param_axes`), or None.

    `param_axes` is a model's table of (fnmatch path pattern, logical axes) pairs (the
    reference transformer's is `models.sharding.PARAM_AXES`).

    A pre-quantized weight's data and block scales (`.../kernel/data`,
    `.../kernel/scale`, `.../kernel_scale`, or `.../scale` beside `.../kernel`) take the
    axes of their kernel when they have its rank (block scales of a 2-D view of a 3-D
    kernel are replicated: they are 1/16384 of it).
    """
    bases = [path[: -len(s)] for s in _QUANTIZED_SUFFIXES if path.endswith(s)]
    # ".../q_proj/kernel/scale", ".../q_proj/kernel_scale" or a scale beside it, ".../q_proj/scale".
    candidates = [path] + bases + [b + "/kernel" for b in bases if not b.endswith("kernel")]
    for candidate in candidates:
        for pattern, axes in param_axes:
            if len(axes) == ndim and fnmatch.fnmatchcase(candidate, pattern):
                return axes
    return None


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, param_axes, rules=RULES) -> PartitionSpec:
    """The PartitionSpec of a state leaf by its path and shape (replicated if no pattern of
    `param_axes` matches it)."""
    axes = param_logical_axes(path, len(shape), param_axes)
    if axes is None:
        return PartitionSpec(*([None] * len(shape)))
    return logical_to_spec(axes, shape, mesh, rules)


def path_str(path) -> str:
    """A pytree key path as "a/b/0/kernel" (dict keys, attribute names, indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def tree_specs(tree: Any, mesh: Mesh, param_axes, rules=RULES) -> Any:
    """PartitionSpecs for every array leaf of `tree` (params, optimizer or train state).

    Leaves may be arrays or `jax.ShapeDtypeStruct` (from `jax.eval_shape`: nothing is
    allocated). Non-array leaves get None.
    """

    def spec(path, leaf):
        if not hasattr(leaf, "shape"):
            return None
        return spec_for(path_str(path), tuple(leaf.shape), mesh, param_axes, rules)

    return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree: Any, mesh: Mesh, param_axes, rules=RULES) -> Any:
    """`NamedSharding`s for every array leaf of `tree` (see `tree_specs`)."""
    specs = tree_specs(tree, mesh, param_axes, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_tree(tree: Any, mesh: Mesh, param_axes, rules=RULES) -> Any:
    """`tree` (params, optimizer state, ...) placed on `mesh` by the rules."""
    return jax.device_put(tree, tree_shardings(tree, mesh, param_axes, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


# --------------------------------------------------------------------------- activations and data


def batch_spec(mesh: Mesh, ndim: int = 2, rules=RULES) -> PartitionSpec:
    """(batch, ...) arrays: the batch over the rule's mesh axes, the rest replicated."""
    axes = tuple(a for a in _mesh_axes_for("batch", rules) if mesh.shape.get(a, 1) > 1)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return PartitionSpec(lead, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=RULES) -> NamedSharding:
    """NamedSharding of a (batch, ...) input such as token ids (see `batch_spec`)."""
    return NamedSharding(mesh, batch_spec(mesh, ndim, rules))


def batch_shards(mesh: Mesh, rules=RULES) -> int:
    """How many ways the batch is split (the product of its mesh axes' sizes)."""
    return math.prod(mesh.shape.get(a, 1) for a in _mesh_axes_for("batch", rules))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh, rules=RULES) -> jax.Array:
    """`with_sharding_constraint` of `x` to the spec its logical axes give on `mesh`."""
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def activation_constraint(mesh: Mesh, rules=RULES) -> Callable[[jax.Array, Sequence[str | None]], jax.Array]:
    """A `constrain(x, logical_axes)` hook bound to `mesh` (for the model's `constrain=`)."""

    def hook(x, logical_axes):
        return constrain(x, logical_axes, mesh, rules)

    return hook


def process_rows(sharding: NamedSharding, global_shape: Sequence[int]) -> slice:
    """The contiguous rows of a (batch, ...) array that this process's devices hold.

    Feed `data[rows]` from this process to `jax.make_array_from_process_local_data`.

    Raises:
      ValueError: if the local devices hold rows that are not one contiguous range.
    """
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    spans = sorted({(idx[0].start or 0, global_shape[0] if idx[0].stop is None else idx[0].stop)
                    for idx in index_map.values()})
    lo, hi = spans[0][0], spans[0][1]
    for start, stop in spans[1:]:
        if start > hi:
            raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {spans}; "
                             "lay the mesh out with data outermost")
        hi = max(hi, stop)
    return slice(lo, hi)


def global_batch(local: Any, mesh: Mesh, global_rows: int, rules=RULES) -> Any:
    """Global (batch, ...) arrays from each process's rows (`process_rows`) of them.

    Args:
      local: pytree of numpy arrays, this process's rows.
      mesh: the mesh.
      global_rows: the global batch size.

    Returns:
      The pytree of global `jax.Array`s sharded by `batch_sharding`.
    """

    def make(x):
        x = np.asarray(x)
        shape = (global_rows,) + x.shape[1:]
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x, shape)

    return jax.tree.map(make, local)


# --------------------------------------------------------------------------- KV cache


def cache_specs(cache: Any, mesh: Mesh, rules=RULES) -> Any:
    """PartitionSpecs of a KV cache: (B, S, G, K) keys/values on batch and kv_heads.

    Rank-3 leaves (B, S, G) (e.g. per-token cache scales) and rank-1 (B,) leaves (lengths)
    follow the same batch axes; scalars are replicated.
    """

    def spec(leaf):
        axes = CACHE_AXES.get(len(leaf.shape))
        if axes is None:
            return PartitionSpec(*([None] * len(leaf.shape)))
        return logical_to_spec(axes, leaf.shape, mesh, rules)

    return jax.tree.map(spec, cache)


def cache_shardings(cache: Any, mesh: Mesh, rules=RULES) -> Any:
    """NamedShardings of a KV cache (see `cache_specs`), e.g. for jit in/out shardings."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(cache, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_cache(cache: Any, mesh: Mesh, rules=RULES) -> Any:
    """The KV cache placed on `mesh` by `cache_specs` (batch on data/fsdp, heads on tensor)."""
    return jax.device_put(cache, cache_shardings(cache, mesh, rules))




# --------------------------------------------------------------------------- bytes per device


def shard_elements(shape: Sequence[int], spec: PartitionSpec, mesh) -> int:
    """Elements one device holds of an array of `shape` laid out by `spec` on `mesh`."""
    parts = 1
    for entry in spec:
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        parts *= math.prod(mesh.shape[a] for a in axes)
    return math.prod(shape) // parts


def per_device_bytes(tree: Any, mesh, param_axes, rules=RULES, dtype=None) -> int:
    """Bytes one device holds of `tree` sharded by the tables (every device holds the same).

    Args:
      tree: arrays or ShapeDtypeStructs (`jax.eval_shape`: nothing is allocated).
      mesh: a Mesh or AbstractMesh.
      param_axes: the model's (path pattern, logical axes) table.
      rules: logical axis -> mesh axes.
      dtype: count every leaf in this dtype instead of its own (e.g. f32 gradients).

    Returns:
      The byte count.
    """
    specs = tree_specs(tree, mesh, param_axes, rules)
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sum(shard_elements(leaf.shape, spec, mesh) * np.dtype(dtype or leaf.dtype).itemsize
               for leaf, spec in zip(leaves, spec_leaves))
