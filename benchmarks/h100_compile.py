"""What an H100 would run: each recipe's GEMMs and memory, compiled for an H100 on this machine.

`mpx.aot` compiles a quantized linear layer's forward, dgrad and wgrad (`jax.vjp` of
`mpx.dot_general`, bf16 activations, f32 master weight, bf16 gradient) for one H100
without one (deviceless AOT; needs the gpu-compile extra). For DeepSeek-V3's shapes
(M = 4096 tokens, K x N from 7168 / 2048 / 18432) and each recipe it prints the GEMMs
`mpx.inspect.fp8_report` finds in the optimized H100 HLO (FP8 / not FP8, and what
kind), the share of GEMM FLOPs in FP8, and the temporary memory XLA plans
(`memory_analysis`).

Then whole programs under each precision preset: the small preset's train step
(`train.step`, AdamW, batch 8 x 256) and serving (`serve.engine`: prefill of 8 x 64
tokens and a 4-token decode call at batch 8, weights prequantized by `serve.quantize`,
bf16 or FP8 KV cache), with the GEMMs that are not FP8 named by the op they came from.

    JAX_PLATFORMS=cpu python -m benchmarks.h100_compile --save benchmarks/results/h100_compile.txt
    JAX_PLATFORMS=cpu python -m benchmarks.h100_compile --quick   # one shape
"""

from __future__ import annotations

import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax starts: no GPU here to initialize

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import benchmarks  # noqa: E402
import mpx  # noqa: E402
import mpx.aot  # noqa: E402
import mpx.inspect  # noqa: E402
from benchmarks import kv_capacity, train_step  # noqa: E402
from models import config as model_config  # noqa: E402
from serve import engine as engine_lib  # noqa: E402
from serve import kv_cache as kv_cache_lib  # noqa: E402
from serve import quantize as serve_quantize  # noqa: E402
from serve import sampling  # noqa: E402

PRESETS = ("fp32", "bf16", "fp8", "fp8_ue8m0", "fp8_current")

TOKENS = 4096
SHAPES = ((7168, 2048), (2048, 7168), (7168, 18432), (18432, 7168))  # (K, N)
RECIPES = {
    "bf16 (no recipe)": None,
    "CurrentScaling": mpx.recipes.CurrentScaling(),
    "DeepSeekV3": mpx.recipes.DeepSeekV3(),
    "DeepSeekV3 ue8m0": mpx.recipes.DeepSeekV3(scale_format="ue8m0"),
}


def layer(recipe):
    """y, dx, dw of one linear layer under `recipe`."""
    def step(x, w, g):
        y, vjp = jax.vjp(lambda x, w: mpx.dot_general(x, w, (((1,), (0,)), ((), ())), recipe=recipe,
                                                      preferred_element_type=jnp.bfloat16), x, w)
        return (y, *vjp(g))

    return step


def measure(name: str, k: int, n: int, mesh) -> dict:
    args = (jax.ShapeDtypeStruct((TOKENS, k), jnp.bfloat16), jax.ShapeDtypeStruct((k, n), jnp.float32),
            jax.ShapeDtypeStruct((TOKENS, n), jnp.bfloat16))
    start = time.perf_counter()
    compiled = mpx.aot.compile(layer(RECIPES[name]), *args, mesh=mesh)
    seconds = time.perf_counter() - start
    report = mpx.inspect.fp8_report(compiled)
    kinds = sorted({f"{g.classification}: {g.kind.removeprefix('custom-call ')} ({g.lhs_dtype} x {g.rhs_dtype})"
                    for g in report.gemms})
    return {"recipe": name, "k": k, "n": n, "gemms": len(report.gemms), "fp8_gemms": report.counts["fp8"],
            "fp8_flop_share": report.fp8_flop_fraction, "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "compile_s": round(seconds, 2), "kinds": kinds}


def layer_path(op_name: str) -> str:
    """The module path a GEMM came from, layers merged: "Transformer/layers_*/attn"."""
    name = re.sub(r"\bjit\([^)]*\)/", "", op_name)
    name = re.sub(r"(while/body/)?closed_call/", "", name)
    name = re.sub(r"transpose\(jvp\(([\w.]+)\)\)", r"\1", name)
    name = re.sub(r"jvp\(([\w.]+)\)", r"\1", name)
    name = re.sub(r"/(dot_general|pallas_call)\b.*$", "", name)
    return re.sub(r"layers_\d+", "layers_*", name)


def _program_row(program: str, preset: str, compiled) -> dict:
    report = mpx.inspect.fp8_report(compiled)
    wide = {}
    for g in report.fallbacks():
        wide[layer_path(g.op_name)] = wide.get(layer_path(g.op_name), 0) + g.flops
    total = sum(g.flops for g in report.gemms)
    return {"program": program, "preset": preset, "gemms": len(report.gemms), "fp8_gemms": report.counts["fp8"],
            "fp8_flop_share": report.fp8_flop_fraction, "gemm_gflops": total / 1e9,
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "not_fp8": {k: round(v / total, 4) for k, v in sorted(wide.items(), key=lambda kv: -kv[1])[:3]}}


def train_rows(mesh) -> list[dict]:
    """The small preset's train step compiled for `mesh`, per precision preset."""
    cfg = model_config.preset("small")
    tokens = jnp.zeros((8, 257), jnp.int32)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    rows = []
    for preset in PRESETS:
        step, state, _, _ = train_step.build(preset, cfg, 8, 256, abstract=True)
        rows.append(_program_row("train step", preset, mpx.aot.compile(step, state, data, mesh=mesh)))
    return rows


def serve_rows(mesh) -> list[dict]:
    """Prefill and decode of the small preset's model compiled for `mesh`, per precision."""
    ckpt = kv_capacity.random_checkpoint(model_config.preset("small"))
    rows = []
    for precision, kv in (("bf16", "bf16"), ("fp8", "fp8")):
        model, variables = serve_quantize.prepare(ckpt, serve_quantize.ServeSpec(precision))
        engine = engine_lib.Engine(model, variables, kv_cache=kv)
        greedy, key = sampling.make(0.0), jax.random.key(0)
        tokens, lengths = jnp.zeros((8, 64), jnp.int32), jnp.full((8,), 64, jnp.int32)
        prefill = mpx.aot.compile(engine._prefill_fn, variables, tokens, lengths, key, greedy, mesh=mesh,
                                  static_argnums=(4,))
        rows.append(_program_row("prefill", f"{precision} (kv {kv})", prefill))
        cache = kv_cache_lib.init(model.config, 8, kv)
        decode = mpx.aot.compile(engine._decode_fn, variables, cache, lengths, lengths, key, 1, greedy, 4, 128,
                                 mesh=mesh, static_argnums=(6, 7, 8))
        rows.append(_program_row("decode", f"{precision} (kv {kv})", decode))
    return rows


def program_table(rows: list[dict]) -> str:
    lines = ["", "Whole programs (small preset, d_model 256, 4 layers) compiled for the H100:",
             f"{'program':<11} {'preset':<16} {'GEMMs':>5} {'FP8':>4} {'FP8 FLOPs':>9} {'temp MB':>8}  "
             "largest non-FP8 GEMM FLOP shares"]
    for r in rows:
        wide = ", ".join(f"{k} {v:.0%}" for k, v in r["not_fp8"].items())
        lines.append(f"{r['program']:<11} {r['preset']:<16} {r['gemms']:>5} {r['fp8_gemms']:>4} "
                     f"{r['fp8_flop_share']:>9.1%} {r['temp_bytes'] / 1e6:>8.1f}  {wide}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [f"Compiled for an NVIDIA H100 (deviceless, {mpx.aot.TARGETS}); one linear layer's forward + dgrad + "
             f"wgrad, M = {TOKENS} tokens, bf16 in/out, jax {jax.__version__}",
             f"{'recipe':<18} {'K x N':>12} {'GEMMs':>5} {'FP8':>4} {'FP8 FLOPs':>9} {'temp MB':>8}  GEMM kinds"]
    for r in rows:
        lines.append(f"{r['recipe']:<18} {str(r['k']) + 'x' + str(r['n']):>12} {r['gemms']:>5} {r['fp8_gemms']:>4} "
                     f"{r['fp8_flop_share']:>9.0%} {r['temp_bytes'] / 1e6:>8.1f}  {'; '.join(r['kinds'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = benchmarks.parser("h100_compile", __doc__)
    parser.add_argument("--quick", action="store_true", help="only the first shape")
    args = parser.parse_args(argv)
    why = mpx.aot.status()
    if why is not None:
        parser.error(why)
    mesh = mpx.aot.mesh("h100")
    rows = [measure(name, k, n, mesh) for k, n in SHAPES[:1 if args.quick else None] for name in RECIPES]
    programs = [] if args.quick else train_rows(mesh) + serve_rows(mesh)
    text = table(rows) + (program_table(programs) if programs else "")
    benchmarks.report(args, text, {"rows": rows, "programs": programs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
