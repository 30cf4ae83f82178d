"""Matmul benchmark: mpx.dot.dot_general per recipe and impl vs bf16, f32 and flax FP8.

For square n x n x n products it times, side by side in one run (every case of every
size once per round, median of several rounds), the forward and the forward+backward of

* a float32 dot and a bf16 x bf16 dot with float32 accumulation (the baselines),
* `mpx.dot.dot_general` under CurrentScaling, DelayedScaling and DeepSeekV3 with each
  implementation ("upcast_bf16", "fp8", "dequant_f32"),
* flax's FP8 dot (`flax.linen.fp8_ops.fp8_scaled_dot_general`, the function behind
  `Fp8DirectDotGeneralOp`), with amax histories warmed on the same data,

and reports each one's relative error against a float32 (HIGHEST) reference for the
output and for d_lhs, plus the GEMM precision classes from `mpx.inspect.fp8_report`
(fp8 / upcast / high precision) of the compiled forward+backward. On GPU it adds
TFLOP/s.

    python -m benchmarks.matmul [--quick] [--json] [--rounds 5] [--input-dtype bf16]
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

import mpx.dot as mdot
import mpx.inspect as minspect
from mpx import metrics, recipes
import benchmarks
from store import cli

DN = (((1,), (0,)), ((), ()))
RECIPES = {"current": recipes.CurrentScaling(), "delayed": recipes.DelayedScaling(history=16),
           "deepseek_v3": recipes.DeepSeekV3()}
IMPLS = ("upcast_bf16", "fp8", "dequant_f32")


@dataclasses.dataclass
class Case:
    """One timed computation: forward and forward+backward on the same inputs."""

    name: str
    fwd: Callable
    fwd_bwd: Callable
    args: tuple
    fwd_ms: list = dataclasses.field(default_factory=list)
    fwd_bwd_ms: list = dataclasses.field(default_factory=list)
    out_err: float = float("nan")
    dx_err: float = float("nan")
    gemms: str = ""


def _with_grads(fwd: Callable) -> Callable:
    """jit(x, w, ct, *rest) -> (out, d_x, d_w) through jax.vjp."""

    def run(x, w, ct, *rest):
        out, vjp = jax.vjp(lambda a, b: fwd(a, b, *rest), x, w)
        return (out, *vjp(ct.astype(out.dtype)))

    return jax.jit(run)


def _baselines(x, w, ct):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    f32 = lambda a, b: lax.dot_general(a, b, DN)  # noqa: E731
    bf16 = lambda a, b: lax.dot_general(a, b, DN, preferred_element_type=jnp.float32)  # noqa: E731
    return [Case("f32 dot", jax.jit(f32), _with_grads(f32), (x, w, ct)),
            Case("bf16 dot", jax.jit(bf16), _with_grads(bf16), (xb, wb, ct))]


def _mpx_cases(x, w, ct):
    cases = []
    for rname, recipe in RECIPES.items():
        for impl in IMPLS:
            if recipes.is_stateful(recipe):
                state = mdot.init_state(recipe)
                _, state = jax.jit(lambda a, b, s, r=recipe: mdot.dot_general(a, b, DN, recipe=r, state=s))(x, w, state)

                def fn(a, b, s, r=recipe, i=impl):
                    return mdot.dot_general(a, b, DN, recipe=r, state=s, impl=i,
                                            preferred_element_type=jnp.float32)[0]

                args = (x, w, ct, state)
            else:
                def fn(a, b, r=recipe, i=impl):
                    return mdot.dot_general(a, b, DN, recipe=r, impl=i, preferred_element_type=jnp.float32)

                args = (x, w, ct)
            cases.append(Case(f"mpx {rname} {impl}", jax.jit(fn), _with_grads(fn), args))
    return cases


def _flax_case(x, w, ct):
    from flax.linen import fp8_ops

    def history(v):
        return jnp.zeros((16,), jnp.float32).at[0].set(jnp.max(jnp.abs(v)).astype(jnp.float32))

    one = jnp.ones((1,), jnp.float32)
    state = (history(x), history(w), history(ct))

    def fn(a, b, hx, hw, hg):
        return fp8_ops.fp8_scaled_dot_general(
            a, b, DN, preferred_element_type=a.dtype, lhs_scale=one, rhs_scale=one, grad_scale=one,
            lhs_amax_history=hx, rhs_amax_history=hw, grad_amax_history=hg, quantize_compute_type=a.dtype)

    return Case("flax fp8_scaled_dot_general", jax.jit(fn), _with_grads(fn), (x, w, ct, *state))


def _time_ms(fn: Callable, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) * 1e3


def _check(cases: list[Case], x32, w32, ct) -> None:
    """Errors against a float32 (HIGHEST) reference and GEMM classes, once per case."""
    ref = _with_grads(lambda a, b: lax.dot_general(a, b, DN, precision=lax.Precision.HIGHEST))
    ref_out, ref_dx, _ = ref(x32, w32, ct)
    for c in cases:
        x, w, _, *rest = c.args
        out = c.fwd(x, w, *rest)
        _, dx, _ = c.fwd_bwd(*c.args)
        c.out_err = float(metrics.relative_error(out, ref_out))
        c.dx_err = float(metrics.relative_error(dx, ref_dx))
        counts = minspect.fp8_report(c.fwd_bwd.lower(*c.args).compile()).counts
        c.gemms = f"{counts['fp8']}/{counts['upcast']}/{counts['high_precision']}"


def build_size(n: int, input_dtype) -> list[Case]:
    """All cases for n x n x n, compiled and checked."""
    kx, kw, kc = jax.random.split(jax.random.key(n), 3)
    x32 = jax.random.normal(kx, (n, n), jnp.float32)
    w32 = jax.random.normal(kw, (n, n), jnp.float32) / jnp.sqrt(n)
    ct = jax.random.normal(kc, (n, n), jnp.float32)
    x, w = x32.astype(input_dtype), w32.astype(input_dtype)
    cases = _baselines(x32, w32, ct) + _mpx_cases(x, w, ct) + [_flax_case(x, w, ct)]
    _check(cases, x32, w32, ct)
    return cases


def time_rounds(cases_by_n: dict[int, list[Case]], rounds: int) -> None:
    """Each round times every case of every size once: load changes hit all alike."""
    for _ in range(rounds):
        for cases in cases_by_n.values():
            for c in cases:
                x, w, _, *rest = c.args
                c.fwd_ms.append(_time_ms(c.fwd, (x, w, *rest)))
                c.fwd_bwd_ms.append(_time_ms(c.fwd_bwd, c.args))


def rows_for(n: int, cases: list[Case]) -> list[dict]:
    """Medians and ratios to the bf16 and f32 dots of the same size."""
    med = {c.name: (statistics.median(c.fwd_ms), statistics.median(c.fwd_bwd_ms)) for c in cases}
    bf16, f32 = med["bf16 dot"], med["f32 dot"]
    gpu = jax.default_backend() == "gpu"
    rows = []
    for c in cases:
        fwd, fb = med[c.name]
        row = dict(n=n, case=c.name, fwd_ms=round(fwd, 3), fwd_bwd_ms=round(fb, 3),
                   fwd_vs_bf16=round(fwd / bf16[0], 3), fwd_vs_f32=round(fwd / f32[0], 3),
                   fwd_bwd_vs_bf16=round(fb / bf16[1], 3), out_rel_err=c.out_err, dx_rel_err=c.dx_err,
                   gemms_fp8_upcast_hp=c.gemms)
        if gpu:
            row["fwd_tflops"] = round(2 * n**3 / (fwd * 1e-3) / 1e12, 1)
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    cols = ["n", "case", "fwd_ms", "fwd_vs_bf16", "fwd_vs_f32", "fwd_bwd_ms", "fwd_bwd_vs_bf16",
            "out_rel_err", "dx_rel_err", "gemms_fp8_upcast_hp"]
    if rows and "fwd_tflops" in rows[0]:
        cols.insert(3, "fwd_tflops")
    fmt = lambda v: f"{v:.2e}" if isinstance(v, float) and v < 0.01 else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    cells = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) if i != 1 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                     for row in cells)


def _best_fp8(rows: list[dict], n: int) -> dict:
    mpx_rows = [r for r in rows if r["n"] == n and r["case"].startswith("mpx") and "dequant" not in r["case"]]
    return min(mpx_rows, key=lambda r: r["fwd_vs_bf16"])


def main(argv=None) -> dict:
    parser = benchmarks.parser("matmul", __doc__)
    parser.add_argument("--quick", action="store_true", help="sizes 256, 512, 1024")
    parser.add_argument("--rounds", type=cli.positive_int, default=5, help="timed rounds per case (median)")
    parser.add_argument("--input-dtype", default="bf16", choices=("bf16", "f32"),
                        help="dtype of the inputs given to mpx and flax (the bf16 dot always gets bf16)")
    args = parser.parse_args(argv)
    sizes = (256, 512, 1024) if args.quick else (1024, 2048, 4096)
    input_dtype = jnp.bfloat16 if args.input_dtype == "bf16" else jnp.float32
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
          f"mpx inputs {args.input_dtype}, impl 'auto' = {mdot.resolve_impl('auto')!r}, "
          f"median of {args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    cases_by_n = {n: build_size(n, input_dtype) for n in sizes}
    time_rounds(cases_by_n, args.rounds)
    rows = [r for n, cases in cases_by_n.items() for r in rows_for(n, cases)]
    best = _best_fp8(rows, sizes[-1])
    tables = [_table([r for r in rows if r["n"] == n]) for n in sizes]
    summary = (f"best mpx FP8 forward at n={sizes[-1]}: {best['case']} = {best['fwd_vs_bf16']:.2f}x bf16 dot, "
               f"{best['fwd_vs_f32']:.2f}x f32 dot (target on CPU: <= 1.3x bf16); "
               f"load average at the end {os.getloadavg()[0]:.1f}")
    result = dict(backend=jax.default_backend(), jax=jax.__version__, input_dtype=args.input_dtype,
                  rounds=args.rounds, sizes=list(sizes), rows=rows, best_fp8_forward=best)
    return benchmarks.report(args, "\n\n".join(tables + [summary]), result)


if __name__ == "__main__":
    main(sys.argv[1:])
