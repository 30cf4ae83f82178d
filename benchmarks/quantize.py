"""Quantize / dequantize throughput of mpx per granularity, against a plain bf16 cast.

For each granularity (PerTensor, PerAxis(0), Blocks((1, 128)), Blocks((128, 128)),
MX(32)) it times a jitted `mpx.quantize(x, "e4m3", g)` and a jitted `mpx.dequantize(q)`
on an (n, n) float32 array, and reports throughput in GB/s of float32 input (n*n*4 bytes
per call, for dequantize too, so the columns compare) and the time relative to a jitted
`x.astype(jnp.bfloat16)` measured in the same run.

    python -m benchmarks.quantize            # 4096 x 4096
    python -m benchmarks.quantize --quick    # 1024 x 1024
    python -m benchmarks.quantize --json     # ... and one JSON object as the last line
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp

import mpx
import benchmarks
from store import cli

GRANULARITIES = {
    "PerTensor": mpx.PerTensor(),
    "PerAxis(0)": mpx.PerAxis(0),
    "Blocks(1,128)": mpx.Blocks((1, 128)),
    "Blocks(128,128)": mpx.Blocks((128, 128)),
    "MX(32)": mpx.MX(32),
}


def time_calls(fns: dict, *, repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each `fn()` in `fns`.

    The functions are timed round-robin (one batch of `inner` calls each per repeat), so
    load from other processes on a shared machine affects all of them alike and their
    ratios stay meaningful.
    """
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile and warm up
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(times) for name, times in samples.items()}


def run(n: int, fmt: str, repeats: int, inner: int) -> dict:
    """Times the bf16 cast and quantize/dequantize per granularity on an (n, n) array."""
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    gigabytes = x.size * 4 / 1e9
    cast_bf16 = jax.jit(lambda a: a.astype(jnp.bfloat16))
    dequant = jax.jit(mpx.dequantize)
    fns = {"bf16": lambda: cast_bf16(x)}
    for name, granularity in GRANULARITIES.items():
        quant = jax.jit(lambda a, g=granularity: mpx.quantize(a, fmt, g))
        q = quant(x)
        fns[("quantize", name)] = lambda quant=quant: quant(x)
        fns[("dequantize", name)] = lambda q=q: dequant(q)
    times = time_calls(fns, repeats=repeats, inner=inner)
    t_bf16 = times["bf16"]
    rows = []
    for name in GRANULARITIES:
        t_q, t_d = times[("quantize", name)], times[("dequantize", name)]
        rows.append({
            "granularity": name, "quantize_s": t_q, "dequantize_s": t_d,
            "quantize_gbps": gigabytes / t_q, "dequantize_gbps": gigabytes / t_d,
            "quantize_vs_bf16": t_q / t_bf16, "dequantize_vs_bf16": t_d / t_bf16,
        })
    return {
        "shape": [n, n], "format": fmt, "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "repeats": repeats, "inner": inner,
        "bf16_cast_s": t_bf16, "bf16_cast_gbps": gigabytes / t_bf16, "rows": rows,
        "load_average_1min": os.getloadavg()[0],  # other processes on a shared machine
    }


def format_table(result: dict) -> str:
    """A readable table of `run`'s result."""
    n = result["shape"][0]
    lines = [
        f"mpx quantize/dequantize, {n}x{n} float32 -> {result['format']}, "
        f"backend {result['backend']} ({result['device']}), median of {result['repeats']} repeats of {result['inner']} calls",
        f"baseline jit(x.astype(bfloat16)): {result['bf16_cast_s'] * 1e3:.3f} ms, "
        f"{result['bf16_cast_gbps']:.2f} GB/s; machine load average {result['load_average_1min']:.1f} "
        f"on {os.cpu_count()} CPUs (absolute GB/s drop under load; the ratios are measured side by side)",
        "",
        f"{'granularity':<16} {'quantize ms':>11} {'GB/s':>7} {'x bf16':>7}   "
        f"{'dequant ms':>10} {'GB/s':>7} {'x bf16':>7}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['granularity']:<16} {r['quantize_s'] * 1e3:>11.3f} {r['quantize_gbps']:>7.2f} "
            f"{r['quantize_vs_bf16']:>7.2f}   {r['dequantize_s'] * 1e3:>10.3f} "
            f"{r['dequantize_gbps']:>7.2f} {r['dequantize_vs_bf16']:>7.2f}"
        )
    lines.append("GB/s counts float32 input bytes (n*n*4) per call; 'x bf16' = time / bf16 cast time.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = benchmarks.parser("quantize", __doc__)
    parser.add_argument("--quick", action="store_true", help="1024x1024 instead of 4096x4096")
    parser.add_argument("--size", type=cli.positive_int, default=None, help="override the array edge n")
    parser.add_argument("--format", default="e4m3", type=cli.accepted_by(mpx.formats.get),
                        help="element format (default e4m3)")
    parser.add_argument("--repeats", type=cli.positive_int, default=7, help="timed repeats (median reported)")
    args = parser.parse_args(argv)
    n = args.size or (1024 if args.quick else 4096)
    inner = 10 if n <= 1024 else 3
    result = run(n, args.format, args.repeats, inner)
    return benchmarks.report(args, format_table(result), result)


if __name__ == "__main__":
    main()
