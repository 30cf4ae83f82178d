"""Decode speed against the memory bound: fp32, bf16 and FP8 weights, the CPU decode kernel on and off.

Decode is memory-bound: every token reads every weight once (and its sequence's keys
and values), so a format's bound is the machine's memory bandwidth over the bytes one
token reads. This prints that bound beside the measured decode tokens/s.

The model has SmolLM-135M's shape (`benchmarks.kv_capacity`), randomly initialized
(speed does not depend on what the weights learned). Per variant (`serve.quantize`:
fp32, bf16, fp8 = the default FP8 policy with bf16 embeddings and LM head), `serve.engine`
decodes 128 new tokens after a 22-token prompt, 1 and 8 rows, bf16 KV cache, warm,
round-robin median of `--repeats` (3). "kernel on" is the default (`mpx.kernels`: FP8 weights
read as 1 byte, bf16 as 2); "kernel off" is the same run with `MPX_CPU_KERNELS=off`
(XLA's path: the weights dequantized to a float32 copy once per compiled call, 4 bytes a
token). The two run in alternating child processes (the switch is read once per process).

Bytes per token: every weight as stored (the tied embedding once, as the LM head), plus
the keys and values of a 150-token sequence (its attention reads a 256-slot span).
Bandwidth: the best of 5 XLA float32 matrix-vector products with a 1 GiB matrix.

    python -m benchmarks.decode_bandwidth --save benchmarks/results/decode_bandwidth.txt
    python -m benchmarks.decode_bandwidth --quick     # 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import benchmarks
from benchmarks.kv_capacity import NEW_TOKENS, PROMPT_TOKENS, SMOLLM_135M, prompts, random_checkpoint
from mpx import kernels
from serve import engine as engine_lib
from serve import quantize as q

VARIANTS = ("fp32", "bf16", "fp8")
ROWS = (1, 8)
SPAN = 256  # the attention span of a 150-token sequence


def bandwidth_gb_s() -> float:
    """Read bandwidth as a decoder sees it: the best of 5 float32 matrix-vector products
    with a 1 GiB matrix (XLA's dot streams it on every core; a plain reduction does not
    reach the bandwidth on XLA:CPU)."""
    w = jnp.ones((8192, 1 << 15), jnp.float32)
    x = jnp.ones((1, 8192), jnp.float32)
    product = jax.jit(jnp.dot)
    product(x, w).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        product(x, w).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return w.nbytes / best / 1e9


def kv_bytes_per_row(config) -> int:
    """Keys and values one decode step of one row reads (bf16, SPAN slots, every layer)."""
    return SPAN * config.n_layers * 2 * config.n_kv_heads * config.head_dim * 2


def measure(repeats: int) -> dict:
    """This process's decode tokens/s per (variant, rows), and the bytes per token."""
    ckpt = random_checkpoint(SMOLLM_135M)
    engines, sizes = {}, {}
    for name in VARIANTS:
        model, variables = q.prepare(ckpt, q.ServeSpec(name))
        engines[name] = engine_lib.Engine(model, variables, kv_cache="bf16")
        sizes[name] = q.weight_bytes(variables["params"])
        for rows in ROWS:
            engines[name].warm_up(prompts(rows, PROMPT_TOKENS), NEW_TOKENS)
    samples = {f"{name} {rows}": [] for name in VARIANTS for rows in ROWS}
    for _ in range(repeats):
        for name in VARIANTS:
            for rows in ROWS:
                _, stats = engines[name].generate(prompts(rows, PROMPT_TOKENS), max_new_tokens=NEW_TOKENS)
                samples[f"{name} {rows}"].append(stats.decode_tokens_per_s)
    return {"kernel": kernels.status(), "weight_bytes": sizes, "kv_bytes_per_row": kv_bytes_per_row(ckpt.config),
            "rates": {case: statistics.median(v) for case, v in samples.items()}}


def _child(kernel: bool, repeats: int) -> dict:
    env = dict(os.environ, MPX_CPU_KERNELS="on" if kernel else "off")
    out = subprocess.run([sys.executable, "-m", "benchmarks.decode_bandwidth", "--child", "--repeats", str(repeats)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(repeats: int, rounds: int) -> dict:
    """Alternating child processes, kernel on and off; medians over the rounds."""
    runs = {True: [], False: []}
    for _ in range(rounds):
        for kernel in (True, False):
            runs[kernel].append(_child(kernel, repeats))
    first = runs[True][0]
    rates = {("on" if k else "off"): {case: statistics.median(r["rates"][case] for r in rs) for case in first["rates"]}
             for k, rs in runs.items()}
    return {"bandwidth_gb_s": bandwidth_gb_s(), "weight_bytes": first["weight_bytes"],
            "kv_bytes_per_row": first["kv_bytes_per_row"], "kernel_status": first["kernel"], "rates": rates,
            "repeats": repeats, "rounds": rounds}


def table(result: dict) -> str:
    bw = result["bandwidth_gb_s"]
    lines = [f"Decode on {jax.default_backend()}: SmolLM-135M shape (random init), {PROMPT_TOKENS}-token prompt + "
             f"{NEW_TOKENS} new tokens, bf16 KV cache; memory read bandwidth {bw:.1f} GB/s; medians of "
             f"{result['repeats']} round-robin repeats x {result['rounds']} alternating processes",
             f"({result['kernel_status']})",
             f"{'variant':<8}{'rows':>5}{'MB/token':>10}{'bound tok/s':>13}{'kernel off':>12}{'kernel on':>11}"
             f"{'on/off':>8}{'on/bound':>10}"]
    for name in VARIANTS:
        for rows in ROWS:
            read = result["weight_bytes"][name] + rows * result["kv_bytes_per_row"]
            bound = rows * bw * 1e9 / read
            off, on = result["rates"]["off"][f"{name} {rows}"], result["rates"]["on"][f"{name} {rows}"]
            lines.append(f"{name:<8}{rows:>5}{read / 1e6 / rows:>10.1f}{bound:>13.1f}{off:>12.1f}{on:>11.1f}"
                         f"{on / off:>8.2f}{on / bound:>10.2f}")
    lines.append("(tokens/s, all rows; MB/token: weights once per step shared by its rows, plus each row's keys "
                 "and values; fp32 weights never take the kernel, so their two columns differ by noise only)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = benchmarks.parser("decode_bandwidth", __doc__)
    parser.add_argument("--quick", action="store_true", help="1 repeat")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin repeats per child process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one measuring process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.repeats)))
        return 0
    result = run(1 if args.quick else args.repeats, 1)
    benchmarks.report(args, table(result), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
