"""Train-step time per precision preset (fp32 : bf16 : fp8), and bytes per parameter.

Builds the same model and batch under each preset, jits the real train step
(`train.step.make_train_step`, AdamW with the preset's moment dtype), and times the
steps round-robin in one run so machine load affects every preset alike. Reports each
preset's median step time relative to fp32, tokens/s, and `mpx.optim.memory_report`'s
bytes per parameter (persistent: masters, grads, moments, scale state; and with the
transient compute copy), `ops` (per op category: matmuls, elementwise, layout copies,
collectives; counts, GFLOP and MB moved from the optimized HLO), `temp_bytes`: the
compiled step's temporary memory (XLA's memory analysis: saved activations and
intermediates), and `saved_bytes`: what autodiff keeps from the forward pass for the
backward pass.

    python -m benchmarks.train_step                 # tiny model, batch 16 x 128
    python -m benchmarks.train_step --model small
    python -m benchmarks.train_step --quick --json  # fewer repeats; JSON last line
    python -m benchmarks.train_step --ops           # + the per-category op table
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import mpx
from benchmarks import hlo_ops
from benchmarks.quantize import time_calls
from models import config as model_config
from models import transformer
from train import step as step_lib
import benchmarks
from store import cli

PRESETS = ("fp32", "bf16", "fp8", "fp8_ue8m0", "fp8_current")
# Variants of the fp8 preset's DeepSeekV3 recipe, by name.
VARIANTS = {
    "fp8_ue8m0": lambda: mpx.policy.fp8(mpx.recipes.DeepSeekV3(scale_format="ue8m0")),
    "fp8_ue8m3": lambda: mpx.policy.fp8(mpx.recipes.DeepSeekV3(scale_format="ue8m3")),
    "fp8_input_residuals": lambda: mpx.policy.fp8(mpx.recipes.DeepSeekV3(fp8_residuals=False,
                                                                       swiglu_residuals=False)),
    "fp8_bf16_swiglu": lambda: mpx.policy.fp8(mpx.recipes.DeepSeekV3(swiglu_residuals=False)),
    "fp8_stored_swiglu": lambda: mpx.policy.fp8(mpx.recipes.DeepSeekV3(recompute_swiglu=False)),
}


def _moment_dtype(preset: str):
    return jnp.float32 if preset == "fp32" else jnp.bfloat16


def build(preset: str, cfg: model_config.ModelConfig, batch: int, seq: int, abstract: bool = False):
    """(jitted step, state, memory report, model) for one preset; with `abstract` the
    state is shapes and dtypes only (`jax.ShapeDtypeStruct`s, nothing initialized: what
    compiling for another machine needs)."""
    policy = VARIANTS[preset]() if preset in VARIANTS else mpx.policy.preset(preset)
    model = transformer.Transformer(cfg, policy)
    tx = mpx.optim.build("adamw", 1e-3, moment_dtype=_moment_dtype(preset), clip_norm=1.0)
    init = functools.partial(step_lib.init_state, model, tx, mpx.optim.NoOpLossScale(), 0,
                             jnp.zeros((1, seq), jnp.int32))
    state = jax.eval_shape(init) if abstract else init()
    step = jax.jit(step_lib.make_train_step(model, tx))
    copy_bytes = mpx.optim.compute_copy_bytes(policy.resolve("layers_0/mlp/up", "linear"))
    report = mpx.optim.memory_report(state.params, state.opt_state, scale_state=state.fp8_state,
                                     compute_dtype_bytes=copy_bytes)
    return step, state, report, model


def saved_bytes(model, state, data) -> int:
    """Bytes the backward pass keeps from the forward pass (`mpx.inspect.residual_bytes`
    of the loss): FP8 residuals show here directly; `temp_bytes` adds every other
    intermediate of the compiled step."""
    loss_fn = step_lib.make_loss_fn(model, mpx.optim.NoOpLossScale())
    micro = {**data, "fp8_state": state.fp8_state}
    return mpx.inspect.residual_bytes(lambda p: loss_fn(p, micro)[0], state.params)["total"]


def compiled_analysis(step, state, data) -> tuple[int, dict]:
    """(temp_bytes, the per-category op table of `benchmarks.hlo_ops`) of the compiled step."""
    compiled = step.lower(state, data).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes), hlo_ops.op_table(compiled.as_text())


def run(model: str, batch: int, seq: int, repeats: int, presets=PRESETS) -> dict:
    cfg = model_config.preset(model)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    fns, reports, temp, ops, saved = {}, {}, {}, {}, {}
    for preset in presets:
        step, state, reports[preset], net = build(preset, cfg, batch, seq)
        temp[preset], ops[preset] = compiled_analysis(step, state, data)
        saved[preset] = saved_bytes(net, state, data)
        fns[preset] = lambda step=step, state=state: step(state, data)[1]["loss"]
    times = time_calls(fns, repeats=repeats, inner=1)
    rows = [{
        "preset": p, "step_s": times[p], "vs_fp32": times[p] / times["fp32"],
        "tokens_per_s": batch * seq / times[p], "temp_bytes": temp[p], "temp_vs_bf16": temp[p] / temp["bf16"],
        "saved_bytes": saved[p], "saved_vs_bf16": saved[p] / saved["bf16"], "ops": ops[p],
        "bytes_per_param": reports[p].per_param("total"),
        "bytes_per_param_with_compute_copy": reports[p].per_param("total_with_compute_copy"),
    } for p in presets]
    return {"model": model, "params": reports["fp32"].num_params, "batch": batch, "seq": seq,
            "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "rows": rows}


def table(result: dict) -> str:
    lines = [f"train step, model {result['model']} ({result['params']:,} params), batch {result['batch']}x"
             f"{result['seq']}, {result['backend']} ({result['device']})",
             f"{'preset':<12}{'step ms':>10}{'vs fp32':>9}{'tok/s':>10}{'B/param':>9}{'+copy':>8}"
             f"{'temp MB':>9}{'vs bf16':>8}{'saved MB':>10}{'vs bf16':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['preset']:<12}{r['step_s'] * 1e3:>10.1f}{r['vs_fp32']:>9.2f}{r['tokens_per_s']:>10,.0f}"
                     f"{r['bytes_per_param']:>9.2f}{r['bytes_per_param_with_compute_copy']:>8.2f}"
                     f"{r['temp_bytes'] / 1e6:>9.1f}{r['temp_vs_bf16']:>8.2f}"
                     f"{r['saved_bytes'] / 1e6:>10.1f}{r['saved_vs_bf16']:>8.2f}")
    return "\n".join(lines)


def _presets(parser, text: str) -> tuple[str, ...]:
    names = [n for n in text.split(",") if n]
    known = set(mpx.policy.PRESETS) | set(VARIANTS)
    bad = [n for n in names if n not in known]
    if bad:
        parser.error(f"unknown preset(s) {bad}; known: {', '.join(sorted(known))}")
    return tuple(dict.fromkeys(["fp32", "bf16", *names]))


def main(argv=None) -> dict:
    parser = benchmarks.parser("train_step", __doc__)
    parser.add_argument("--model", default="tiny", help="model preset (tiny, small, 1b)")
    parser.add_argument("--batch", type=cli.positive_int, default=16)
    parser.add_argument("--seq", type=cli.positive_int, default=128)
    parser.add_argument("--repeats", type=cli.positive_int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help=f"comma-separated; fp32 and bf16 always run; also {', '.join(VARIANTS)}")
    parser.add_argument("--ops", action="store_true",
                        help="also print ops, GFLOP and MB moved per op category (from the compiled HLO)")
    args = parser.parse_args(argv)
    presets = _presets(parser, args.presets)
    result = run(args.model, args.batch, args.seq, 3 if args.quick else args.repeats, presets)
    text = table(result)
    if args.ops:
        text += "\n" + hlo_ops.format_table({r["preset"]: r["ops"] for r in result["rows"]})
    return benchmarks.report(args, text, result)


if __name__ == "__main__":
    main()
