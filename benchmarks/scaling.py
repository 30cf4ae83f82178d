"""Train-step time against (simulated) device count: 1, 2, 4, 8 CPU devices.

SIMULATION. Each row runs in its own process with
`--xla_force_host_platform_device_count=N`: N XLA devices that share this machine's CPU
cores. The mesh, the GSPMD partitioning and every collective are real, but the devices
are not independent hardware, so the table measures partitioning and communication
overhead on one host, not the speed-up of N accelerators. Read "vs 1" as "cost of
sharding this step N ways on one CPU", and run the same command on a real multi-device
machine for real scaling.

The global batch is fixed (strong scaling): B x T tokens per step on every mesh, split
over the batch axes. Layouts: `data` (data=N: replicas, gradient all-reduce) and
`fsdp` (fsdp=N: sharded params and optimizer state, all-gathers and reduce-scatters).

    python -m benchmarks.scaling            # tiny model, fp8 policy, batch 16 x 128
    python -m benchmarks.scaling --quick    # 1-layer d=64 model, data layout only
    python -m benchmarks.scaling --json     # ... and one JSON object as the last line
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchmarks
import mpx
from store import cli

ROOT = Path(__file__).resolve().parents[1]
DEVICE_COUNTS = (1, 2, 4, 8)


def _child(devices: int, layout_name: str, quick: bool, policy: str, repeats: int) -> dict:
    """Runs in the subprocess: median step time of one layout on `devices` devices."""
    import jax
    import jax.numpy as jnp

    from models import config as model_config
    from models import transformer
    from models import sharding
    from train import step as step_lib

    cfg = (model_config.ModelConfig(d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
           if quick else model_config.preset("tiny"))
    batch_size, seq = (16, 64) if quick else (16, 128)
    layout = sharding.Layout(sharding.make_mesh({layout_name: devices}))
    model = transformer.Transformer(cfg, mpx.policy.preset(policy), constrain=layout.constrain)
    tx = mpx.optim.build("adamw", 1e-3, moment_dtype="bf16")
    example = jnp.zeros((1, 8), jnp.int32)
    init = lambda: step_lib.init_state(model, tx, mpx.optim.NoOpLossScale(), 0, example)  # noqa: E731
    shardings = layout.shardings(jax.eval_shape(init))
    state = jax.jit(init, out_shardings=shardings)()
    keys = jax.random.split(jax.random.key(0), 2)
    batch = {k: jax.device_put(jax.random.randint(key, (batch_size, seq), 0, cfg.vocab_size), layout.batch_sharding())
             for k, key in zip(("inputs", "targets"), keys)}
    step = jax.jit(step_lib.make_train_step(model, tx, 1, layout), in_shardings=(shardings, {k: layout.batch_sharding()
                   for k in batch}), out_shardings=(shardings, sharding.replicated(layout.mesh)), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):  # warm up
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    counts = sharding.collectives(compiled.as_text())
    return {"devices": devices, "layout": layout_name, "mesh": dict(layout.mesh.shape),
            "step_ms": 1e3 * statistics.median(times), "compile_s": compile_s,
            "tokens_per_s": batch_size * seq / statistics.median(times),
            "collectives": sum(counts.values()), "loss": float(metrics["loss"])}


def _run_child(devices: int, layout_name: str, args) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--child", str(devices), "--layout", layout_name,
           "--policy", args.policy, "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], header: str) -> str:
    base = {r["layout"]: r["step_ms"] for r in rows if r["devices"] == 1}
    lines = [header, f"{'layout':<7}{'devices':>8}{'step ms':>10}{'vs 1':>7}{'tokens/s':>11}{'collectives':>13}"
             f"{'compile s':>11}"]
    for r in rows:
        ratio = r["step_ms"] / base.get(r["layout"], base.get("data", r["step_ms"]))
        lines.append(f"{r['layout']:<7}{r['devices']:>8}{r['step_ms']:>10.1f}{ratio:>7.2f}{r['tokens_per_s']:>11,.0f}"
                     f"{r['collectives']:>13}{r['compile_s']:>11.1f}")
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    parser = benchmarks.parser("scaling", __doc__)
    parser.add_argument("--quick", action="store_true", help="1-layer d=64 model, data layout only")
    parser.add_argument("--policy", default="fp8", type=cli.accepted_by(mpx.policy.preset),
                        help="precision preset (default fp8)")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed steps per row (median)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.layout, args.quick, args.policy, args.repeats)))
        return None
    layouts = ("data",) if args.quick else ("data", "fsdp")
    rows = [_run_child(1, "data", args)]
    rows += [_run_child(n, name, args) for name in layouts for n in DEVICE_COUNTS[1:]]
    for r in rows[1:]:
        r["step_ratio_vs_1"] = r["step_ms"] / rows[0]["step_ms"]
    model = "1-layer d=64, batch 16 x 64" if args.quick else "tiny (2 layers, d=128), batch 16 x 128"
    load = os.getloadavg()[0]
    header = (f"SIMULATED devices (--xla_force_host_platform_device_count) sharing {os.cpu_count()} CPU cores "
              f"(load average {load:.1f} at the end):\n"
              f"train step of the {model} model, policy {args.policy}, fixed global batch, median of "
              f"{args.repeats}.\nOn one host the devices compete for the same cores: 'vs 1' measures sharding "
              "overhead, not accelerator scaling.")
    result = {"simulated": True, "cpu_cores": os.cpu_count(), "load_average": load, "policy": args.policy,
              "quick": args.quick, "rows": rows}
    return benchmarks.report(args, _table(rows, header), result)


if __name__ == "__main__":
    main()
