"""Every GPU figure in one run: GEMM TFLOPS per recipe, train step, decode, and checks against the CPU.

Prepared for the day a GPU is lent (one H100: under 8 minutes). It writes `DIR/gpu.json`
and prints a table:

* GEMMs: TFLOPS of bf16 (`lax.dot_general`, f32 accumulation), per-tensor FP8
  (`CurrentScaling`: cuBLASLt FP8) and block FP8 (`DeepSeekV3`: `mpx.kernels.block_fp8`)
  at 4096^3, 8192^3 and DeepSeek-V3's shapes (M = 4096, K x N from 7168 / 2048 / 18432),
  forward (2MKN FLOPs) and forward + dgrad + wgrad (6MKN), round-robin medians. The FP8
  rows include quantizing their operands, as training does.
* The small preset's train step (batch 8 x 256): time and temporary memory per preset.
* Decode tokens/s of the small model served in bf16 and FP8 (prequantized weights, FP8
  KV cache), 1 and 8 rows.
* Checks: the device's block-FP8 and per-tensor products against the CPU's exact
  reference (`impl="dequant_f32"` on the host CPU) at 1e-5 of max|y|.

Published targets to compare with: DeepGEMM 1426-1550 TFLOPS on H800 (block FP8);
cuBLASLt per-tensor FP8 about 1.6-2x bf16; MaxText FP8 1.62-1.72x bf16 end to end on
Llama-70B.

    python -m benchmarks.gpu --out DIR            # on the GPU
    python -m benchmarks.gpu --dry-run --out DIR  # tiny shapes, any machine (CI runs it)
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import benchmarks
import mpx
from benchmarks import kv_capacity, train_step
from benchmarks.quantize import time_calls
from models import config as model_config
from serve import engine as engine_lib
from serve import quantize as serve_quantize

SHAPES = ((4096, 4096, 4096), (8192, 8192, 8192), (4096, 7168, 2048), (4096, 2048, 7168),
          (4096, 7168, 18432), (4096, 18432, 7168))
DRY_SHAPES = ((256, 384, 256),)
RECIPES = {"bf16": None, "fp8 per-tensor": mpx.recipes.CurrentScaling(), "fp8 block": mpx.recipes.DeepSeekV3()}
DIMS = (((1,), (0,)), ((), ()))
TRAIN_PRESETS = ("fp32", "bf16", "fp8")


def _product(recipe, target=None, impl="auto"):
    """x (bf16) . w (f32 master) in the recipe, bf16 out; bf16 casts w like a model does."""
    def product(x, w):
        if recipe is None:
            return jax.lax.dot_general(x, w.astype(jnp.bfloat16), DIMS, preferred_element_type=jnp.float32
                                       ).astype(jnp.bfloat16)
        return mpx.dot_general(x, w, DIMS, recipe=recipe, preferred_element_type=jnp.bfloat16, impl=impl,
                               target=target)

    return product


def _train(recipe):
    product = _product(recipe)

    def step(x, w, g):
        y, vjp = jax.vjp(product, x, w)
        return (y, *vjp(g))

    return step


def gemm_rows(shapes, repeats: int) -> list[dict]:
    rows = []
    for m, k, n in shapes:
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
        w = jax.random.normal(keys[1], (k, n), jnp.float32) * k ** -0.5
        g = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
        fns = {}
        for name, recipe in RECIPES.items():
            fwd, both = jax.jit(_product(recipe)), jax.jit(_train(recipe))
            fns[f"{name} fwd"] = lambda fwd=fwd: fwd(x, w)
            fns[f"{name} fwd+bwd"] = lambda both=both: both(x, w, g)
        times = time_calls(fns, repeats=repeats, inner=3)
        for name in RECIPES:
            fwd_s, both_s = times[f"{name} fwd"], times[f"{name} fwd+bwd"]
            rows.append({"shape": [m, k, n], "recipe": name, "fwd_s": fwd_s, "fwd_bwd_s": both_s,
                         "fwd_tflops": 2 * m * k * n / fwd_s / 1e12, "fwd_bwd_tflops": 6 * m * k * n / both_s / 1e12})
    return rows


def checks() -> list[dict]:
    """The device's FP8 products against the exact reference computed on the host CPU."""
    x = jax.random.normal(jax.random.key(1), (512, 1000)) * 2
    w = jax.random.normal(jax.random.key(2), (1000, 768)) * 0.05
    cpu = jax.devices("cpu")[0]
    out = []
    for name, recipe in (("fp8 per-tensor", RECIPES["fp8 per-tensor"]), ("fp8 block", RECIPES["fp8 block"])):
        fn = lambda x, w, recipe=recipe, **kw: mpx.dot_general(x, w, DIMS, recipe=recipe, **kw)  # noqa: E731
        got = jax.jit(fn)(x, w)
        want = jax.jit(lambda x, w: fn(x, w, impl="dequant_f32", target=mpx.target.Target("cpu")))(
            jax.device_put(x, cpu), jax.device_put(w, cpu))
        error = float(jnp.max(jnp.abs(jax.device_put(got, cpu) - want)) / jnp.max(jnp.abs(want)))
        out.append({"check": f"{name} vs CPU reference", "max_error_of_max_y": error, "passed": error <= 1e-5})
    return out


def decode_rows(cfg, new_tokens: int, repeats: int) -> list[dict]:
    ckpt = kv_capacity.random_checkpoint(cfg)
    rows = []
    for precision in ("bf16", "fp8"):
        served, variables = serve_quantize.prepare(ckpt, serve_quantize.ServeSpec(precision))
        engine = engine_lib.Engine(served, variables, kv_cache=precision)
        for batch in (1, 8):
            prompts = kv_capacity.prompts(batch, 16)
            engine.warm_up(prompts, new_tokens)
            rates = [engine.generate(prompts, max_new_tokens=new_tokens)[1].decode_tokens_per_s for _ in range(repeats)]
            rows.append({"precision": precision, "rows": batch, "decode_tokens_per_s": statistics.median(rates)})
    return rows


def train_rows(cfg, batch: int, seq: int, repeats: int) -> list[dict]:
    """The train step (`benchmarks.train_step.build`) of a model config per preset: one
    compile each, its temporary memory, and round-robin median step times."""
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    fns, temp = {}, {}
    for preset in TRAIN_PRESETS:
        step, state, _, _ = train_step.build(preset, cfg, batch, seq)
        compiled = step.lower(state, data).compile()
        temp[preset] = compiled.memory_analysis().temp_size_in_bytes
        fns[preset] = lambda compiled=compiled, state=state: compiled(state, data)[1]["loss"]
    times = time_calls(fns, repeats=repeats, inner=1)
    return [{"preset": p, "step_s": times[p], "vs_fp32": times[p] / times["fp32"], "temp_bytes": temp[p],
             "temp_vs_bf16": temp[p] / temp["bf16"]} for p in TRAIN_PRESETS]


def run(dry_run: bool) -> dict:
    device = jax.devices()[0]
    if dry_run:  # a one-layer tiny model: the same code paths, seconds to compile on CPU
        cfg, batch, seq = dataclasses.replace(model_config.preset("tiny"), n_layers=1), 2, 32
    else:
        cfg, batch, seq = model_config.preset("small"), 8, 256
    return {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__, "dry_run": dry_run,
            "gemms": gemm_rows(DRY_SHAPES if dry_run else SHAPES, 1 if dry_run else 5),
            "train_step": train_rows(cfg, batch, seq, 1 if dry_run else 10),
            "decode": decode_rows(cfg, 8 if dry_run else 128, 1 if dry_run else 3),
            "checks": checks()}


def table(result: dict) -> str:
    lines = [f"{result['device']} ({result['platform']}), jax {result['jax']}"
             + (" -- dry run: tiny shapes, figures mean nothing" if result["dry_run"] else ""),
             f"{'GEMM M x K x N':<22}{'recipe':<16}{'fwd TFLOPS':>11}{'fwd+bwd TFLOPS':>16}"]
    for r in result["gemms"]:
        lines.append(f"{'x'.join(map(str, r['shape'])):<22}{r['recipe']:<16}{r['fwd_tflops']:>11.1f}"
                     f"{r['fwd_bwd_tflops']:>16.1f}")
    lines.append(f"{'train step':<22}{'step ms':>10}{'vs fp32':>9}{'temp MB':>9}{'vs bf16':>9}")
    for r in result["train_step"]:
        lines.append(f"{r['preset']:<22}{r['step_s'] * 1e3:>10.1f}{r['vs_fp32']:>9.2f}{r['temp_bytes'] / 1e6:>9.1f}"
                     f"{r['temp_vs_bf16']:>9.2f}")
    lines += [f"decode {r['precision']:<6} {r['rows']} rows: {r['decode_tokens_per_s']:.1f} tokens/s"
              for r in result["decode"]]
    lines += [f"{c['check']}: {'pass' if c['passed'] else 'FAIL'} ({c['max_error_of_max_y']:.1e} of max|y|)"
              for c in result["checks"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = benchmarks.parser("gpu", __doc__)
    parser.add_argument("--out", required=True, metavar="DIR", help="write DIR/gpu.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, one repeat: checks the script runs")
    args = parser.parse_args(argv)
    result = run(args.dry_run)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    benchmarks.report(args, table(result), result)
    return 0 if all(c["passed"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
