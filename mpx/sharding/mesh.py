"""Device meshes: the (data, fsdp, tensor) mesh from axis sizes, real or abstract."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh

__all__ = ["MESH_AXES", "resolve_sizes", "make_mesh", "abstract_mesh", "parse_mesh"]

MESH_AXES = ("data", "fsdp", "tensor")

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


