"""Typed PRNG keys and abstract leaves in checkpoints: what orbax cannot store as is.

A typed key (`jax.random.key`) is saved as its `key_data` with its implementation's name
recorded by pytree path (`unwrap_keys`) and re-wrapped on restore (`wrap_keys`). Leaves
are named by their pytree path (`leaves_by_path`), as in `mpx.sharding.path_str`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from mpx.sharding import path_str


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible."""


def leaves_by_path(tree: Any) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(path): leaf for path, leaf in flat}


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def unwrap_keys(state: Any) -> tuple[Any, dict[str, str]]:
    impls = {}

    def unwrap(path, x):
        if not _is_key(x):
            return x
        impls[path_str(path)] = str(jax.random.key_impl(x))
        return jax.random.key_data(x)

    return jax.tree_util.tree_map_with_path(unwrap, state), impls


def wrap_keys(state: Any, impls: dict[str, str]) -> Any:
    found = set()

    def wrap(path, x):
        name = path_str(path)
        if name not in impls:
            return x
        found.add(name)
        return jax.random.wrap_key_data(x, impl=impls[name])

    state = jax.tree_util.tree_map_with_path(wrap, state)
    if found != set(impls):
        raise CheckpointError(f"PRNG keys saved at {sorted(set(impls) - found)} are missing "
                              "from the restored tree; pass a target with the saved structure")
    return state


def keys_to_wrap(step_dir: Path, impls: dict[str, str], target: Any) -> dict[str, str]:
    """The saved keys to re-wrap: all of them, or those the target wants as typed keys."""
    if target is None:
        return impls
    wanted = {name for name, leaf in leaves_by_path(target).items() if _is_key(leaf)}
    if wanted - set(impls):
        raise CheckpointError(f"checkpoint {step_dir}: the target asks for PRNG keys at "
                              f"{sorted(wanted - set(impls))}, saved as raw arrays")
    return {name: impls[name] for name in wanted}


def _key_data_struct(leaf: Any) -> jax.ShapeDtypeStruct:
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(leaf, "sharding", None))


def abstract_leaf(leaf: Any) -> Any:
    if _is_key(leaf):
        return _key_data_struct(leaf)
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf  # ShapeDtypeStruct, numpy array or Python scalar: orbax takes them as is
