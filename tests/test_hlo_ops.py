"""Tests for benchmarks.hlo_ops: the per-category table of a compiled program's work."""

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import hlo_ops


def _table(fn, *args):
    return hlo_ops.op_table(jax.jit(fn).lower(*args).compile().as_text())


def test_a_dot_in_nested_loops_counts_once_per_trip_of_every_loop():
    x, w = jnp.ones((64, 128)), jnp.ones((128, 64))

    def nested(x, w):
        inner = lambda j, a: a + jnp.dot(x + a[0, 0], w)  # noqa: E731 (depends on the carry: not hoisted)
        return lax.fori_loop(0, 4, lambda i, acc: lax.fori_loop(0, 3, inner, acc), jnp.zeros((64, 64)))

    matmul = _table(nested, x, w)["matmul"]
    assert matmul["ops"] == 12
    assert abs(matmul["gflop"] - 12 * 2 * 64 * 128 * 64 / 1e9) < 1e-9

