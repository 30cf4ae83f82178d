"""mpx's core functions on meshes with Explicit axes ("sharding in types").

`jax.make_mesh` gives a mesh Explicit axes by default. Each array's sharding is then
part of its type, and jax rejects any reshape or slice whose result sharding it cannot
infer: a quantizer's (M, K) -> (M, K/128, 128) tiles of a sharded K, or the one-element
slice `mpx.ordering.after` takes. The core's entry points (`mpx.quantize`,
`mpx.dot_general`, `mpx.einsum`, ...) therefore run their bodies with those axes Auto,
where sharding propagates as it does on the meshes `mpx.sharding.make_mesh` builds. Their
results are typed as the plain jax operation would type them: `mpx.dot_general` is
sharded like `lax.dot_general`, a quantized array like its input.

Without Explicit axes, in the context mesh or in the arguments' types, nothing changes:
the function runs as it is.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import jax
from jax.sharding import AxisType, PartitionSpec

from mpx.sharding.specs import logical_to_spec

__all__ = ["explicit_mesh", "spec_of", "fitted", "plain_spec", "like_first", "dot_specs", "auto_inside"]


def explicit_mesh(tree: Any):
    """The abstract mesh with Explicit axes that types the arrays in `tree` (or the
    context's mesh, `jax.set_mesh`), or None when no axis is Explicit."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh if AxisType.Explicit in mesh.axis_types else None
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            sharding = getattr(jax.typeof(leaf), "sharding", None)
            leaf_mesh = getattr(sharding, "mesh", None)
            if leaf_mesh is not None and not leaf_mesh.empty and AxisType.Explicit in leaf_mesh.axis_types:
                return leaf_mesh.abstract_mesh if hasattr(leaf_mesh, "abstract_mesh") else leaf_mesh
    return None


def _full_spec(typed: Any) -> PartitionSpec:
    """The PartitionSpec in `typed`'s sharding (an array's type or a ShapeDtypeStruct),
    one entry per axis (None: not sharded)."""
    spec = tuple(getattr(getattr(typed, "sharding", None), "spec", None) or ())
    return PartitionSpec(*(spec + (None,) * (len(typed.shape) - len(spec))))


def spec_of(x: Any) -> PartitionSpec:
    """x's sharding as a PartitionSpec with one entry per axis (None: not sharded)."""
    return _full_spec(jax.typeof(x)) if isinstance(x, jax.Array) else PartitionSpec(*(None,) * jax.numpy.ndim(x))


def fitted(spec: PartitionSpec, shape: tuple[int, ...], mesh=None) -> PartitionSpec:
    """`spec` for an array of `shape` (an array of block scales, sharded like its data):
    each dimension keeps its mesh axes in order while their product divides it, as
    `mpx.sharding.logical_to_spec` does for named axes. `mesh`: the context's by default."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    names = [f"dim{i}" for i in range(len(shape))]
    return logical_to_spec(names, shape, mesh, rules=tuple(zip(names, tuple(spec) + (None,) * len(shape))))


def plain_spec(fn: Callable[[], jax.Array]) -> PartitionSpec:
    """The sharding jax gives the result of `fn()` (traced only, never run)."""
    return _full_spec(jax.eval_shape(fn))


def like_first(x, *_, **__) -> PartitionSpec:
    """The first argument's sharding (the `out_specs` of elementwise-shaped functions)."""
    return spec_of(x)


def dot_specs(lhs, rhs, dimension_numbers, *_, state=None, **__):
    """lax.dot_general's result sharding, with `state`'s as it is when given (the
    `out_specs` of functions shaped like `mpx.dot_general`)."""
    spec = plain_spec(lambda: jax.lax.dot_general(lhs, rhs, dimension_numbers))
    return spec if state is None else (spec, jax.tree.map(spec_of, state))


def auto_inside(out_specs: Callable[..., Any]):
    """Decorates a core function: on a mesh with Explicit axes its body runs with them
    Auto, and its result is resharded to `out_specs(*args, **kwargs)` (a pytree of
    PartitionSpecs matching the result's). Only jax arrays cross into the body; every
    other argument (shapes, dimension numbers, recipes, dtypes) stays as it is."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            mesh = explicit_mesh((args, kwargs))
            if mesh is None:
                return fn(*args, **kwargs)
            leaves, treedef = jax.tree.flatten((args, kwargs))
            is_array = [isinstance(leaf, jax.Array) for leaf in leaves]

            def body(*arrays):
                it = iter(arrays)
                inner_args, inner_kwargs = jax.tree.unflatten(
                    treedef, [next(it) if a else leaf for leaf, a in zip(leaves, is_array)])
                return fn(*inner_args, **inner_kwargs)

            with contextlib.ExitStack() as stack:
                if jax.sharding.get_abstract_mesh().empty:  # typed arguments, no context mesh
                    stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
                specs = out_specs(*args, **kwargs)
                arrays = [leaf for leaf, a in zip(leaves, is_array) if a]
                return jax.sharding.auto_axes(body, out_sharding=specs)(*arrays)

        return run

    return wrap
