"""What a DeepSeekV3 scale format costs in accuracy: f32, ue8m0 and ue8m3 scales.

Three measurements per scale format (`mpx.recipes.DeepSeekV3(scale_format=...)`):

* quantization SQNR (dB, higher is better; the median over tiles) of E4M3 in 1x128
  tiles on four kinds of data: Gaussian, Student-t with 3 degrees of freedom, Cauchy (heavy tails: a few
  outliers per tile, like LLM activations) and log-normal magnitudes;
* accuracy of `dot_general` forward, dgrad and wgrad: relative (Frobenius) error against
  the float32 product of the unquantized operands;
* exactness: max error / max|y| against the float64 product of the operands it
  quantized (scale application error only; f32 rounding is about 1e-7).

Float scales map each tile's largest value exactly onto the format's max, so that value
has no rounding error; power-of-two (ue8m0) and 4-significant-bit (ue8m3) scales round
the scale up, and the largest value then rounds like any other. Where one outlier
dominates a tile's energy (Cauchy, log-normal), that is most of the tile's error.

    python -m benchmarks.scale_formats [--quick] [--json]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import mpx
import mpx.dot as mdot
import benchmarks

SCALE_FORMATS = ("f32", "ue8m0", "ue8m3")
DN = (((1,), (0,)), ((), ()))
DATA = {
    "gaussian": lambda rng, shape: rng.standard_normal(shape),
    "student_t3": lambda rng, shape: rng.standard_t(3, shape),
    "cauchy": lambda rng, shape: rng.standard_t(1, shape),
    "lognormal": lambda rng, shape: rng.lognormal(0.0, 3.0, shape) * rng.choice([-1.0, 1.0], shape),
}


def sqnr_db(kind: str, scale_format: str, rows: int, seeds: int) -> float:
    """Median over 1x128 tiles of each tile's 10 log10(signal / error energy), E4M3 (per
    tile: pooled energies would follow the one largest outlier of heavy-tailed data)."""
    per_tile = []
    for seed in range(seeds):
        x = jnp.asarray(DATA[kind](np.random.default_rng(seed), (rows, 1024)), jnp.float32)
        q = mpx.quantize(x, "e4m3", mpx.Blocks((1, 128)), scale_format=scale_format)
        tiles = lambda v: np.asarray(v, np.float64).reshape(rows, -1, 128)  # noqa: E731
        error = np.sum((tiles(mpx.dequantize(q)) - tiles(x)) ** 2, axis=-1)
        per_tile.append(10.0 * np.log10(np.sum(tiles(x) ** 2, axis=-1) / np.maximum(error, 1e-300)))
    return float(np.median(np.concatenate(per_tile)))


def _dequantized(v, block, scale_format) -> np.ndarray:
    q = mpx.quantize(v, "e4m3", mpx.Blocks(block), scale_format=scale_format)
    return np.asarray(mpx.dequantize(q), np.float64)


def dot_errors(scale_format: str, m: int, k: int, n: int, seed: int) -> dict:
    """Forward / dgrad / wgrad: error vs the f32 product and vs the exact product of the
    quantized operands."""
    keys = jax.random.split(jax.random.key(seed), 3)
    x, w = jax.random.normal(keys[0], (m, k)), 0.05 * jax.random.normal(keys[1], (k, n))
    g = jax.random.normal(keys[2], (m, n))
    recipe = mpx.recipes.DeepSeekV3(scale_format=scale_format)
    y, vjp = jax.vjp(lambda a, b: mdot.dot_general(a, b, DN, recipe=recipe), x, w)
    d_x, d_w = vjp(g)
    x64, w64, g64 = (np.asarray(v, np.float64) for v in (x, w, g))
    xq, wq = _dequantized(x, (1, 128), scale_format), _dequantized(w, (128, 128), scale_format)
    x_w = _dequantized(jnp.asarray(xq, jnp.float32), (128, 1), scale_format)  # wgrad requantizes the stored tiles
    exact = {"forward": xq @ wq, "dgrad": _dequantized(g, (1, 128), scale_format) @ wq.T,
             "wgrad": x_w.T @ _dequantized(g, (128, 1), scale_format)}
    reference = {"forward": x64 @ w64, "dgrad": g64 @ w64.T, "wgrad": x64.T @ g64}
    out = {}
    for name, got in (("forward", y), ("dgrad", d_x), ("wgrad", d_w)):
        got = np.asarray(got, np.float64)
        out[name] = {"rel_error": float(np.linalg.norm(got - reference[name]) / np.linalg.norm(reference[name])),
                     "exactness": float(np.max(np.abs(got - exact[name])) / np.max(np.abs(exact[name])))}
    return out


def run(quick: bool) -> dict:
    rows, seeds = (64, 2) if quick else (256, 4)
    m, k, n = (256, 512, 384) if quick else (1024, 1024, 512)
    result = {"sqnr_db": {}, "dot": {}, "shape": [m, k, n]}
    for sf in SCALE_FORMATS:
        result["sqnr_db"][sf] = {kind: sqnr_db(kind, sf, rows, seeds) for kind in DATA}
        per_seed = [dot_errors(sf, m, k, n, seed) for seed in range(3)]
        result["dot"][sf] = {op: {stat: float(np.mean([s[op][stat] for s in per_seed])) for stat in per_seed[0][op]}
                             for op in per_seed[0]}
    return result


def format_table(result: dict) -> str:
    lines = ["E4M3 1x128 tiles, median SQNR per tile, dB (higher is better)",
             f"{'scale':<7}" + "".join(f"{kind:>12}" for kind in DATA)]
    for sf, row in result["sqnr_db"].items():
        lines.append(f"{sf:<7}" + "".join(f"{row[kind]:>12.2f}" for kind in DATA))
    m, k, n = result["shape"]
    lines += ["", f"DeepSeekV3 dot_general {m}x{k}x{n}, mean of 3 seeds: relative error vs the f32 product "
              "| max error / max|y| vs the exact product of the quantized operands",
              f"{'scale':<7}{'forward':>22}{'dgrad':>22}{'wgrad':>22}"]
    for sf, ops in result["dot"].items():
        cells = "".join(f"{ops[op]['rel_error']:>11.4e} | {ops[op]['exactness']:.1e}"
                        for op in ("forward", "dgrad", "wgrad"))
        lines.append(f"{sf:<7}{cells}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = benchmarks.parser("scale_formats", __doc__)
    parser.add_argument("--quick", action="store_true", help="smaller arrays and products")
    args = parser.parse_args(argv)
    result = run(args.quick)
    return benchmarks.report(args, format_table(result), result)


if __name__ == "__main__":
    main()
