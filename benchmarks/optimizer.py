"""Optimizer memory per parameter and update-step time: mpx.optim against optax.

Part 1 (no allocation, `jax.eval_shape`): `mpx.optim.memory_report` for a GPT-2-small
shaped model (12 layers, d=768, vocab 32000) under the three precision settings:
  f32  - f32 masters, f32 grads, f32 Adam moments, no compute copy;
  bf16 - f32 masters, f32 grads, bf16 moments, bf16 compute copy (2 B, transient);
  fp8  - as bf16, with an FP8 compute copy (1 B + one f32 scale per 128x128 block)
         and a delayed-scaling amax history (16 x f32 per FP8 operand) as scale state.
Part 2: median time of one jitted update + apply_updates on n float32 params for
optax.adamw (f32 moments), mpx adamw with f32 and bf16 moments, and the full
`mpx.optim.build` chain (clip + adaptive clip + bf16 adamw + skip_nonfinite), timed
round-robin in one run so the ratios survive a loaded machine.

    python -m benchmarks.optimizer            # n = 16M params
    python -m benchmarks.optimizer --quick    # n = 1M params
    python -m benchmarks.optimizer --json     # ... and one JSON object as the last line
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import benchmarks
import mpx.optim as mo
from benchmarks.quantize import time_calls

F32 = jnp.float32
LAYERS, D_MODEL, VOCAB = 12, 768, 32000
FP8_MATMULS_PER_LAYER = 6  # q, k, v, o projections; FFN in and out
BLOCK = 128


def gpt2_small_shapes() -> dict:
    """ShapeDtypeStructs of f32 master weights for a GPT-2-small shaped model."""
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, F32)
    layer = {"q": sds(D_MODEL, D_MODEL), "k": sds(D_MODEL, D_MODEL), "v": sds(D_MODEL, D_MODEL),
             "o": sds(D_MODEL, D_MODEL), "ffn_in": sds(D_MODEL, 4 * D_MODEL),
             "ffn_out": sds(4 * D_MODEL, D_MODEL), "norm1": sds(D_MODEL), "norm2": sds(D_MODEL)}
    return {"embed": sds(VOCAB, D_MODEL), "final_norm": sds(D_MODEL),
            "layers": [dict(layer) for _ in range(LAYERS)]}


def memory_rows() -> dict[str, mo.MemoryReport]:
    """Memory reports of the three precision settings (shapes only)."""
    params = gpt2_small_shapes()
    f32_state = jax.eval_shape(mo.build("adamw", moment_dtype="fp32").init, params)
    bf16_state = jax.eval_shape(mo.build("adamw", moment_dtype="bf16").init, params)
    operands = LAYERS * FP8_MATMULS_PER_LAYER * 2  # activation and weight of each matmul
    amax_history = jax.ShapeDtypeStruct((operands, 16), F32)
    fp8_copy = 1.0 + 4.0 / BLOCK**2
    return {
        "f32": mo.memory_report(params, f32_state),
        "bf16": mo.memory_report(params, bf16_state, compute_dtype_bytes=2.0),
        "fp8": mo.memory_report(params, bf16_state, compute_dtype_bytes=fp8_copy, scale_state=amax_history),
    }


def step_fn(tx, params, grads):
    """A zero-argument callable running one jitted update + apply on fixed inputs."""
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return lambda: step(params, state, grads)


def step_times(n: int, repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per optimizer step on n f32 params in four (n/4096, 1024) leaves."""
    rows = n // 1024
    params = {f"w{i}": jax.random.normal(jax.random.key(i), (rows // 4, 1024), F32) for i in range(4)}
    grads = jax.tree.map(lambda p: 1e-3 * p, params)
    txs = {
        "optax.adamw f32": optax.adamw(1e-3, b2=0.95, weight_decay=0.1),
        "mpx adamw f32": mo.adamw(1e-3, weight_decay=0.1, mu_dtype=F32, nu_dtype=F32),
        "mpx adamw bf16": mo.adamw(1e-3, weight_decay=0.1),
        "mpx build (clip+skip) bf16": mo.build("adamw", 1e-3, weight_decay=0.1, clip_norm=1.0,
                                               adaptive_clip=2.0),
    }
    return time_calls({k: step_fn(tx, params, grads) for k, tx in txs.items()}, repeats=repeats, inner=inner)


def memory_table(reports: dict) -> str:
    """Bytes per parameter of each optimizer setting, one row each."""
    lines = [f"Memory per parameter, GPT-2-small shapes ({reports['f32'].num_params:,} params)",
             f"{'setting':<8}{'master':>8}{'grads':>8}{'moments':>9}{'scales':>9}{'total':>8}{'+copy':>8}"]
    lines += [f"{name:<8}{r.per_param('master'):>8.3f}{r.per_param('gradients'):>8.3f}"
              f"{r.per_param('optimizer'):>9.3f}{r.per_param('scale_state'):>9.5f}"
              f"{r.per_param('total'):>8.3f}{r.per_param('total_with_compute_copy'):>8.3f}"
              for name, r in reports.items()]
    lines.append("(total: persistent state; +copy: also the transient compute copy of every layer)")
    return "\n".join(lines)


def time_table(times: dict, n: int) -> str:
    """Step time of each transformation and its ratio to optax's f32 AdamW."""
    base = times["optax.adamw f32"]
    lines = [f"Optimizer step on {n:,} f32 params (median of 5, round-robin)",
             f"{'transformation':<30}{'ms':>10}{'vs optax':>10}"]
    lines += [f"{name:<30}{t * 1e3:>10.3f}{t / base:>10.2f}" for name, t in times.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = benchmarks.parser("optimizer", __doc__)
    parser.add_argument("--quick", action="store_true", help="1M params instead of 16M")
    args = parser.parse_args(argv)
    n = 2**20 if args.quick else 2**24
    reports = memory_rows()
    times = step_times(n, repeats=5, inner=3 if args.quick else 2)
    base = times["optax.adamw f32"]
    result = {"num_params_model": reports["f32"].num_params, "step_params": n,
              "bytes_per_param": {k: r.per_param("total") for k, r in reports.items()},
              "bytes_per_param_with_copy": {k: r.per_param("total_with_compute_copy") for k, r in reports.items()},
              "step_ms": {k: t * 1e3 for k, t in times.items()},
              "step_ratio_vs_optax": {k: t / base for k, t in times.items()}}
    return benchmarks.report(args, memory_table(reports) + "\n\n" + time_table(times, n), result)


if __name__ == "__main__":
    main()
