"""Sharding: a device mesh from axis sizes, logical axis names, PartitionSpecs by rules.

One global mesh with three named axes (all Auto, so XLA's GSPMD propagates shardings
through the maths; the model code never names a mesh axis):

    data     replicas: the batch is split, params and optimizer state are replicated
    fsdp     the batch is split and params / optimizer state are sharded (ZeRO-3)
    tensor   Megatron-style: heads, FFN width and vocabulary split within a layer

Two tables turn shapes into shardings:

* `PARAM_AXES`: (path pattern, logical axes) pairs. A leaf of any state tree (params,
  Adam moments, gradients, pre-quantized FP8 data and block scales) whose "/"-joined
  path matches a pattern (fnmatch, first match of the same rank wins) gets those
  logical axes; optimizer moments match through their embedded param path, so they
  shard like their params. Everything else (norm scales, counters, FP8 amax
  histories, loss scale, RNG) is replicated: it is tiny.
* `RULES`: logical axis -> mesh axes. A dimension drops a mesh axis that an earlier
  dimension already uses, or whose size does not divide it (then it is replicated
  along that axis), so any model shape gets a valid spec on any mesh.

Activations use `batch` (on data and fsdp) and unsharded `seq` / `act_embed`; the KV
cache (B, S, G, K) uses `batch`, `cache_seq`, `kv_heads`, `head_dim`. A block scale
of a pre-quantized weight takes its weight's axes, so each shard holds the scales of
its own blocks whenever the shards hold whole blocks.

Gradients: under GSPMD the weight-gradient dots accumulate in f32 and XLA reduces them
over data/fsdp in f32. `Layout(mesh, grad_comm="bf16")` instead computes per-replica
gradients and reduces them over the data axis with bf16 on the wire and f32
accumulation (`mean_over_replicas`).

Serving (prefill / decode, written elsewhere) needs only these helpers:

    layout = Layout(make_mesh({"data": 1, "tensor": -1}))
    model = Transformer(cfg, policy, constrain=layout.constrain)
    params = shard_tree(params, layout.mesh)        # or checkpoint.restore(target=...)
    cache = shard_cache(init_cache(cfg, batch), layout.mesh)
    cache_sh = cache_shardings(cache, layout.mesh)
    decode = jax.jit(decode_fn, in_shardings=(layout.shardings(params), layout.batch_sharding(), cache_sh),
                     out_shardings=(layout.batch_sharding(3), cache_sh), donate_argnums=2)

Example:
    >>> mesh = make_mesh({"data": -1})                       # all devices on data
    >>> spec_for("layers_0/mlp/up/kernel", (128, 384), mesh) == PartitionSpec(None, None)  # 1 device
    True
    >>> tuple(spec_for("layers_0/mlp/up/kernel", (128, 384), abstract_mesh({"fsdp": 4, "tensor": 2})))
    ('fsdp', 'tensor')
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

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

# Param path pattern -> logical axes, for the reference transformer's module paths.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    ("*embed/embedding", ("vocab", "embed")),
    ("*lm_head/kernel", ("embed", "vocab")),
    ("*attn/q_proj/kernel", ("embed", "heads", "head_dim")),
    ("*attn/k_proj/kernel", ("embed", "kv_heads", "head_dim")),
    ("*attn/v_proj/kernel", ("embed", "kv_heads", "head_dim")),
    ("*attn/o_proj/kernel", ("heads", "head_dim", "embed")),
    # Serving stores DenseGeneral kernels as 2-D (K, N) ScaledArrays (serve/quantize.py).
    ("*attn/[qkv]_proj/kernel", ("embed", "heads")),
    ("*attn/o_proj/kernel", ("heads", "embed")),
    ("*router/kernel", ("embed", None)),
    ("*experts/down/kernel", ("experts", "mlp", "embed")),
    ("*experts/*/kernel", ("experts", "embed", "mlp")),
    ("*/down/kernel", ("mlp", "embed")),
    ("*kernel", ("embed", "mlp")),  # any other dense kernel: in on fsdp, out on tensor
)

# Suffixes of pre-quantized weights: data and block scales shard with their kernel.
_QUANTIZED_SUFFIXES = ("/data", "/scale", "/scale_inv", "_scale", "_scale_inv")

ACTIVATION_AXES = ("batch", "seq", "act_embed")
LOGITS_AXES = ("batch", "seq", "vocab")
CACHE_AXES = {4: ("batch", "cache_seq", "kv_heads", "head_dim"), 3: ("batch", "cache_seq", "kv_heads"),
              1: ("batch",)}


# --------------------------------------------------------------------------- mesh


def _as_sizes(sizes: Any) -> dict[str, int]:
    if sizes is None:
        return {"data": -1}
    if dataclasses.is_dataclass(sizes):  # e.g. train.config.MeshConfig: its axis fields
        sizes = {axis: getattr(sizes, axis) for axis in MESH_AXES if hasattr(sizes, axis)}
    sizes = dict(sizes)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; allowed: {', '.join(MESH_AXES)}")
    return sizes


def resolve_sizes(sizes: Any, device_count: int) -> dict[str, int]:
    """Axis sizes with -1 ("the rest") resolved; missing axes are 1.

    Args:
      sizes: mapping (or dataclass such as `train.config.MeshConfig`) of axis -> size.
      device_count: devices the mesh spans.

    Returns:
      {"data": d, "fsdp": f, "tensor": t} with d * f * t == device_count.

    Raises:
      ValueError: an unknown axis, more than one -1, a size < 1, or sizes whose product
        does not match the device count.
    """
    sizes = {axis: 1 for axis in MESH_AXES} | _as_sizes(sizes)
    free = [a for a, s in sizes.items() if s == -1]
    bad = {a: s for a, s in sizes.items() if s != -1 and (not isinstance(s, int) or s < 1)}
    if bad or len(free) > 1:
        raise ValueError(f"mesh sizes must be ints >= 1 with at most one -1; got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if device_count % fixed:
            raise ValueError(f"mesh {sizes}: {device_count} devices are not divisible by {fixed}")
        sizes[free[0]] = device_count // fixed
    if math.prod(sizes.values()) != device_count:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices; "
                         f"there are {device_count}")
    return sizes


def make_mesh(sizes: Any = None, devices: Sequence[Any] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all devices, all processes).

    Devices are laid out in `jax.devices()` order (process by process), data outermost:
    a process's devices form a contiguous block of the data (then fsdp) axis, so each
    process feeds a contiguous slice of the global batch. Axes are Auto (GSPMD).

    Args:
      sizes: axis sizes, e.g. {"data": 2, "tensor": 4}, -1 for the rest; None: all data.
      devices: the devices; default `jax.devices()`.

    Returns:
      A `jax.sharding.Mesh` with axis names ("data", "fsdp", "tensor").

    Raises:
      ValueError: see `resolve_sizes`.
    """
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_sizes(sizes, len(devices))
    grid = np.array(devices, dtype=object).reshape(tuple(resolved[a] for a in MESH_AXES))
    auto = getattr(jax.sharding, "AxisType", None)
    if auto is None:  # older jax: every axis is Auto
        return Mesh(grid, MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=(auto.Auto,) * len(MESH_AXES))


def abstract_mesh(sizes: Any, devices: int | None = None) -> AbstractMesh:
    """A (data, fsdp, tensor) mesh of shapes only, for planning without devices.

    Args:
      sizes: axis sizes (mapping or MeshConfig); a -1 axis needs `devices`.
      devices: the device count (default: the product of the sizes).

    Raises:
      ValueError: a -1 axis without `devices`, or sizes that do not fit `devices`.
    """
    raw = _as_sizes(sizes)
    if devices is None:
        if -1 in raw.values():
            raise ValueError(f"mesh {raw} has a -1 axis: give the device count")
        devices = math.prod(raw.values())
    resolved = resolve_sizes(raw, devices)
    return AbstractMesh(tuple(resolved[a] for a in MESH_AXES), MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=4,tensor=1" -> {"data": 2, "fsdp": 4, "tensor": 1}.

    Raises:
      ValueError: an item that is not axis=int, or an unknown axis.
    """
    sizes = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        axis, sep, value = item.partition("=")
        try:
            sizes[axis.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"mesh item {item!r}: expected axis=size, e.g. data=2,fsdp=4,tensor=1")
    return _as_sizes(sizes)


# --------------------------------------------------------------------------- specs


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


def param_logical_axes(path: str, ndim: int, param_axes=PARAM_AXES) -> tuple[str | None, ...] | None:
    """Logical axes of the leaf at `path` (first pattern of rank `ndim`), or None.

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


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules=RULES, param_axes=PARAM_AXES) -> PartitionSpec:
    """The PartitionSpec of a state leaf by its path and shape (replicated if unmatched)."""
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


def tree_specs(tree: Any, mesh: Mesh, rules=RULES, param_axes=PARAM_AXES) -> Any:
    """PartitionSpecs for every array leaf of `tree` (params, optimizer or train state).

    Leaves may be arrays or `jax.ShapeDtypeStruct` (from `jax.eval_shape`: nothing is
    allocated). Non-array leaves get None.
    """

    def spec(path, leaf):
        if not hasattr(leaf, "shape"):
            return None
        return spec_for(path_str(path), tuple(leaf.shape), mesh, rules, param_axes)

    return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules=RULES, param_axes=PARAM_AXES) -> Any:
    """`NamedSharding`s for every array leaf of `tree` (see `tree_specs`)."""
    specs = tree_specs(tree, mesh, rules, param_axes)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_tree(tree: Any, mesh: Mesh, rules=RULES, param_axes=PARAM_AXES) -> Any:
    """`tree` (params, optimizer state, ...) placed on `mesh` by the rules."""
    return jax.device_put(tree, tree_shardings(tree, mesh, rules, param_axes))


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


# --------------------------------------------------------------------------- gradient reduction

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


def mean_over_replicas(stacked: Any, mesh: Mesh, comm_dtype="bf16", rules=RULES, param_axes=PARAM_AXES) -> Any:
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
      comm_dtype: "bf16" or "f32" (or a dtype) for the two collectives.

    Returns:
      The mean gradients in float32, sharded like their params.
    """
    comm = jnp.dtype(_COMM_DTYPES.get(comm_dtype, comm_dtype))

    def reduce(path, g):
        shape = g.shape[1:]
        spec = spec_for(path_str(path), shape, mesh, rules, param_axes)
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
      rules, param_axes: the tables (default `RULES`, `PARAM_AXES`).
    """

    mesh: Mesh
    grad_comm: str = "f32"
    rules: tuple = RULES
    param_axes: tuple = PARAM_AXES

    def __post_init__(self):
        if self.grad_comm not in GRAD_COMM_DTYPES:
            raise ValueError(f"grad_comm must be one of {', '.join(GRAD_COMM_DTYPES)}; got {self.grad_comm!r}")

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
        return tree_shardings(tree, self.mesh, self.rules, self.param_axes)

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
        return mean_over_replicas(stacked, self.mesh, self.grad_comm, self.rules, self.param_axes)

    def replica_grads_constraint(self, stacked: Any) -> Any:
        """(R, ...) per-replica gradients: R on data, the rest as their params."""

        def one(path, g):
            spec = spec_for(path_str(path), g.shape[1:], self.mesh, self.rules, self.param_axes)
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
