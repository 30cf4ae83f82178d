"""Layouts: a mesh plus its tables, and gradient reduction with bf16 communication."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mpx.config import check_choice
from mpx.sharding.specs import RULES, batch_sharding, batch_shards, constrain, spec_for, tree_shardings
from mpx.sharding.specs import path_str

__all__ = ["GRAD_COMM_DTYPES", "mean_over_replicas", "Layout", "collectives", "global_amax"]

GRAD_COMM_DTYPES = ("f32", "bf16")
_COMM_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _with_data(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with the data axis added to the first dimension it still divides (or as is)."""
    n = mesh.shape.get("data", 1)
    entries = list(spec) + [None] * (len(shape) - len(spec))
    for i, (entry, size) in enumerate(zip(entries, shape)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        if size % (math.prod(mesh.shape[a] for a in axes) * n) == 0:
            entries[i] = ("data",) + axes if axes else "data"
            return PartitionSpec(*entries)
    return PartitionSpec(*entries)


def _to_wire(x: jax.Array, dtype) -> jax.Array:
    # XLA may drop an f32 -> bf16 -> f32 round trip (excess precision is allowed) and
    # move f32 through the collective; a bitcast to same-width ints pins the wire dtype.
    x = x.astype(dtype)
    return x if dtype == jnp.float32 else jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * dtype.itemsize}"))


def _from_wire(x: jax.Array, dtype) -> jax.Array:
    return x if dtype == jnp.float32 else jax.lax.bitcast_convert_type(x, dtype)


def _reshard(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, sharding)


def mean_over_replicas(stacked: Any, mesh: Mesh, param_axes, comm_dtype="bf16", rules=RULES) -> Any:
    """The f32 mean over the leading replica axis of per-replica gradients.

    Each (R, ...) leaf (R = the data axis size, sharded on data) is cast to
    `comm_dtype`, resharded so every device holds all R replicas of a 1/R slice (an
    all-to-all in `comm_dtype`), summed there in float32, and the f32 mean is gathered
    back onto the gradient's own sharding in `comm_dtype`. With bf16 this halves the
    bytes on the wire of an f32 all-reduce while the sum itself stays f32; the result
    carries bf16 rounding (relative error <= 2**-9).

    Args:
      stacked: pytree of (R, ...) f32 gradients, params' paths.
      mesh: the mesh (R == mesh.shape["data"]).
      param_axes: the model's (path pattern, logical axes) table (see `spec_for`).
      comm_dtype: "bf16" or "f32" (or a dtype) for the two collectives.

    Returns:
      The mean gradients in float32, sharded like their params.
    """
    comm = jnp.dtype(_COMM_DTYPES.get(comm_dtype, comm_dtype))

    def reduce(path, g):
        shape = g.shape[1:]
        spec = spec_for(path_str(path), shape, mesh, param_axes, rules)
        scattered = PartitionSpec(None, *_with_data(spec, shape, mesh))
        parts = _from_wire(_reshard(_to_wire(g, comm), NamedSharding(mesh, scattered)), comm)
        mean = jnp.sum(parts.astype(jnp.float32), axis=0) * (1.0 / g.shape[0])  # f32 accumulation
        return _from_wire(_reshard(_to_wire(mean, comm), NamedSharding(mesh, spec)), comm).astype(jnp.float32)

    return jax.tree_util.tree_map_with_path(reduce, stacked)


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a training (or serving) program is laid out on a mesh: one object to pass.

    Attributes:
      mesh: the (data, fsdp, tensor) mesh.
      grad_comm: "f32" (GSPMD reduces gradients in float32) or "bf16" (per-replica
        gradients, reduced over the data axis with bf16 communication and float32
        accumulation: `mean_over_replicas`).
      rules: logical axis -> mesh axes (default `RULES`).
      param_axes: the model's (path pattern, logical axes) table, keyword-only and
        required: mpx knows no model (the reference transformer's is
        `models.sharding.PARAM_AXES`; `models.sharding.Layout` fills it in).
    """

    mesh: Mesh
    grad_comm: str = "f32"
    rules: tuple = RULES
    param_axes: tuple = dataclasses.field(kw_only=True)

    def __post_init__(self):
        check_choice("grad_comm", self.grad_comm, GRAD_COMM_DTYPES)

    @property
    def replicas(self) -> int:
        """Per-replica gradient groups: the data axis size under bf16 communication, else 1."""
        return self.mesh.shape.get("data", 1) if self.grad_comm != "f32" else 1

    @property
    def batch_shards(self) -> int:
        """How many ways the batch is split."""
        return batch_shards(self.mesh, self.rules)

    def shardings(self, tree: Any) -> Any:
        """NamedShardings for a state tree (params, optimizer, train state)."""
        return tree_shardings(tree, self.mesh, self.param_axes, self.rules)

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """NamedSharding of (batch, ...) inputs."""
        return batch_sharding(self.mesh, ndim, self.rules)

    def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        """Sharding constraint by logical axes (the model's `constrain=` hook)."""
        return constrain(x, logical_axes, self.mesh, self.rules)

    def replica_constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        """`constrain` inside a per-replica vmap (spmd_axis_name="data"): batch on fsdp only."""
        rules = tuple((name, ("fsdp",) if name == "batch" else axes) for name, axes in self.rules)
        return constrain(x, logical_axes, self.mesh, rules)

    def mean_over_replicas(self, stacked: Any) -> Any:
        """See `mean_over_replicas`."""
        return mean_over_replicas(stacked, self.mesh, self.param_axes, self.grad_comm, self.rules)

    def replica_grads_constraint(self, stacked: Any) -> Any:
        """(R, ...) per-replica gradients: R on data, the rest as their params."""

        def one(path, g):
            spec = spec_for(path_str(path), g.shape[1:], self.mesh, self.param_axes, self.rules)
            return jax.lax.with_sharding_constraint(g, NamedSharding(self.mesh, PartitionSpec("data", *spec)))

        return jax.tree_util.tree_map_with_path(one, stacked)


# --------------------------------------------------------------------------- inspection

_COLLECTIVE = re.compile(r"= (.*?) (all-reduce|reduce-scatter|all-gather|all-to-all|collective-permute)(?:-start)?\(")


def collectives(hlo_text: str) -> dict[tuple[str, str], int]:
    """Counts of (collective op, element type) in compiled HLO text.

    `jax.jit(f).lower(*args).compile().as_text()` gives the text; e.g.
    {("all-reduce", "f32"): 3} for a data-parallel gradient reduction in float32.
    """
    counts: dict[tuple[str, str], int] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            for dtype in sorted(set(re.findall(r"\b([a-z]+[0-9]*)\[", match.group(1)))):
                key = (match.group(2), dtype)
                counts[key] = counts.get(key, 0) + 1
    return counts


def global_amax(x: jax.Array, axis_names: str | Sequence[str]) -> jax.Array:
    """max |x| over every shard of x: for code inside `shard_map` (GSPMD does it by itself).

    Per-tensor FP8 scales must be computed from this, so that every shard quantizes
    with the same scale; block scales need no communication when shards hold whole
    blocks.
    """
    return jax.lax.pmax(jnp.max(jnp.abs(x)).astype(jnp.float32), axis_names)
