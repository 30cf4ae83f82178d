"""MoE expert work three ways, side by side: mpx's tiled grouped GEMM, jax.lax.ragged_dot, dense dispatch.

For N tokens routed to top_k of E experts (SwiGLU experts of width F over D), one jitted
forward + backward of the routed experts' output, timed in one run (median of
`--repeats`, interleaved), as ratios to mpx's:

* `mpx.dot.ragged.ragged_dot`: pairs sorted by expert, each expert's rows padded to a row
  tile, a scan of per-tile GEMMs (what `models.moe` runs);
* `jax.lax.ragged_dot` on the same sorted rows (XLA computes it here as every row times
  every expert's weight, masked);
* dense dispatch: every token through every expert (E x N rows), weighted by its gates.

All three compute the same values (the table gives each one's largest difference from
dense dispatch); only the work differs.

    python -m benchmarks.moe_dispatch
    python -m benchmarks.moe_dispatch --tokens 4096 --experts 64 --top-k 6 --json
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

import benchmarks
from mpx.dot import ragged
from store import cli


def _sorted_rows(x, experts, n_experts):
    k = experts.shape[1]
    order = jnp.argsort(experts.reshape(-1), stable=True)
    sizes = jnp.bincount(experts.reshape(-1), length=n_experts).astype(jnp.int32)
    return jnp.take(x, order // k, axis=0), sizes, order


def _combine(y, order, weights, n):
    k = weights.shape[1]
    w = jnp.take(weights.reshape(-1), order)[:, None]
    return jnp.zeros((n, y.shape[1]), jnp.float32).at[order // k].add(y * w)


def grouped(product):
    """The routed experts' output with `product(rows, w, sizes)` as the grouped matmul."""
    def f(x, experts, weights, wg, wu, wd):
        rows, sizes, order = _sorted_rows(x, experts, wg.shape[0])
        h = jax.nn.silu(product(rows, wg, sizes)) * product(rows, wu, sizes)
        return _combine(product(h, wd, sizes), order, weights, x.shape[0])
    return f


def dense(x, experts, weights, wg, wu, wd):
    gates = jnp.sum(jax.nn.one_hot(experts, wg.shape[0]) * weights[..., None], axis=1)  # (N, E)
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, wg)) * jnp.einsum("nd,edf->enf", x, wu)
    return jnp.einsum("ne,end->nd", gates, jnp.einsum("enf,efd->end", h, wd))


VARIANTS = {
    "mpx tiled grouped GEMM": grouped(lambda a, w, s: ragged.ragged_dot(a, w, s, preferred_element_type=jnp.float32)),
    "jax.lax.ragged_dot": grouped(lambda a, w, s: jax.lax.ragged_dot(a, w, s)),
    "dense dispatch (every expert)": dense,
}


def _inputs(tokens: int, experts: int, top_k: int, d: int, f: int):
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (tokens, d))
    logits = jax.random.normal(keys[1], (tokens, experts))
    weights, chosen = jax.lax.top_k(jax.nn.softmax(logits), top_k)
    w = [jax.random.normal(k, s) * s[1] ** -0.5 for k, s in zip(keys[2:], ((experts, d, f),) * 2 + ((experts, f, d),))]
    return x, chosen.astype(jnp.int32), weights, *w


def _step(fn):
    loss = lambda x, e, g, *w: jnp.sum(fn(x, e, g, *w) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 3, 4, 5)))


def run(tokens: int, experts: int, top_k: int, d: int, f: int, repeats: int) -> dict:
    args = _inputs(tokens, experts, top_k, d, f)
    steps = {name: _step(fn) for name, fn in VARIANTS.items()}
    reference = steps["dense dispatch (every expert)"](*args)
    times = {name: [] for name in steps}
    errors = {}
    for name, step in steps.items():
        out = jax.block_until_ready(step(*args))  # compile
        errors[name] = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(out, reference))
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(*args))
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["mpx tiled grouped GEMM"]
    rows = [{"variant": name, "ms": 1e3 * median[name], "vs_mpx": median[name] / base,
             "max_rel_diff_vs_dense": errors[name]} for name in steps]
    return {"tokens": tokens, "experts": experts, "top_k": top_k, "d": d, "f": f, "repeats": repeats, "rows": rows,
            "backend": jax.default_backend()}


def table(result: dict) -> str:
    r = result
    lines = [f"routed experts, forward + backward: {r['tokens']} tokens, top-{r['top_k']} of {r['experts']} experts, "
             f"SwiGLU {r['d']} -> {r['f']}; median of {r['repeats']} ({r['backend']})",
             f"{'variant':<30} {'ms':>9} {'x mpx':>7} {'max rel diff vs dense':>22}"]
    for row in r["rows"]:
        lines.append(f"{row['variant']:<30} {row['ms']:>9.1f} {row['vs_mpx']:>7.2f} {row['max_rel_diff_vs_dense']:>22.1e}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = benchmarks.parser("moe_dispatch", __doc__)
    parser.add_argument("--tokens", type=cli.positive_int, default=2048)
    parser.add_argument("--experts", type=cli.positive_int, default=16)
    parser.add_argument("--top-k", type=cli.positive_int, default=2)
    parser.add_argument("--d", type=cli.positive_int, default=256)
    parser.add_argument("--f", type=cli.positive_int, default=256)
    parser.add_argument("--repeats", type=cli.positive_int, default=5)
    args = parser.parse_args(argv)
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    result = run(args.tokens, args.experts, args.top_k, args.d, args.f, args.repeats)
    return benchmarks.report(args, table(result), result)


if __name__ == "__main__":
    main()
