"""Generation speed in fp32, bf16 and FP8: decode and prefill tokens/s, KV cache vs none.

The model is the tiny preset (d 128, 2 layers, vocab 256), randomly initialized or
from `--checkpoint`, with its context raised to fit the prompt plus the new tokens:
RoPE has no learned positions, so the same weights serve any context, and speed does
not depend on what they learned.

Part 1, per serving variant (bf16 KV cache unless named): warm decode tokens/s with 1
and 8 rows, and prefill tokens/s (8 rows x `prompt` tokens), measured round-robin
(every variant once per repeat) and reported as the median, so the ratios survive a
loaded machine. Ratios are against fp32.

Part 2: `new` tokens for one row with the KV cache and without it (the whole sequence
recomputed per token, one compiled step), fp32 and fp8.

    python -m benchmarks.generate            # 256 new tokens, 5 repeats
    python -m benchmarks.generate --quick    # 64 new tokens, 3 repeats
    python -m benchmarks.generate --json     # ... and one JSON object as the last line
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import benchmarks
from models import transformer
from models.config import preset
from serve import engine as engine_lib
from serve import flags
from serve import quantize as q
from serve import sources
from store import cli

VARIANTS = {
    "fp32": (q.ServeSpec("fp32"), "bf16"),
    "bf16": (q.ServeSpec("bf16"), "bf16"),
    "fp8": (q.ServeSpec("fp8"), "bf16"),
    "fp8 channel w": (q.ServeSpec("fp8", weights="channel"), "bf16"),
    "fp8 weight-only": (q.ServeSpec("fp8", activations="none"), "bf16"),
    "fp8 + fp8 KV": (q.ServeSpec("fp8"), "fp8"),
}


def checkpoint(path: str | None, context: int) -> q.Checkpoint:
    """The checkpoint to serve (random tiny init without a path), context raised."""
    if path:
        ckpt = sources.load_checkpoint(path)
    else:
        config = preset("tiny")
        model = transformer.Transformer(config)
        params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        ckpt = q.Checkpoint(config, params, {}, 0, Path("random-init"))
    config = dataclasses.replace(ckpt.config, max_seq_len=max(ckpt.config.max_seq_len, context))
    return dataclasses.replace(ckpt, config=config)


def engines(ckpt: q.Checkpoint) -> dict[str, engine_lib.Engine]:
    """One engine per variant, with the engine's default decode chunk."""
    out = {}
    for name, (spec, kv) in VARIANTS.items():
        model, variables = q.prepare(ckpt, spec)
        out[name] = engine_lib.Engine(model, variables, kv_cache=kv)
    return out


def _prompts(rows: int, length: int) -> list[list[int]]:
    return [[(7 * r + 3 * i) % 256 for i in range(length)] for r in range(rows)]


def decode_rates(engs: dict, rows: int, prompt: int, new: int, repeats: int) -> dict[str, dict]:
    """Median decode and prefill tokens/s per variant, round-robin over repeats."""
    prompts = _prompts(rows, prompt)
    for eng in engs.values():
        eng.warm_up(prompts, new)
    samples = {name: {"decode": [], "prefill": []} for name in engs}
    for _ in range(repeats):
        for name, eng in engs.items():
            _, stats = eng.generate(prompts, max_new_tokens=new)
            samples[name]["decode"].append(stats.decode_tokens_per_s)
            samples[name]["prefill"].append(stats.prefill_tokens_per_s)
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}


def cache_vs_recompute(engs: dict, prompt: int, new: int, repeats: int) -> dict[str, dict]:
    """Seconds per new token for one row, with the KV cache and recomputing everything."""
    prompts = _prompts(1, prompt)
    out = {}
    for name in ("fp32", "fp8"):
        eng = engs[name]
        for use_cache in (True, False):
            eng.warm_up(prompts, new, use_cache=use_cache)
        times = {True: [], False: []}
        for _ in range(repeats):
            for use_cache in (True, False):
                _, stats = eng.generate(prompts, max_new_tokens=new, use_cache=use_cache)
                times[use_cache].append((stats.prefill_s + stats.decode_s) / stats.new_tokens)
        cached, recompute = statistics.median(times[True]), statistics.median(times[False])
        out[name] = {"cache_ms_per_token": 1e3 * cached, "recompute_ms_per_token": 1e3 * recompute,
                     "speedup": recompute / cached}
    return out


def report(args, ckpt, engs, rates, cache) -> tuple[str, dict]:
    memory = {name: q.weight_bytes(e.variables["params"]) for name, e in engs.items()}
    source = f"step {ckpt.step} of {ckpt.path}" if args.checkpoint else "random init"
    lines = [f"Generation on {jax.default_backend()}: tiny model ({source}), prompt {args.prompt} tokens, "
             f"{args.new} new tokens, median of {args.repeats} round-robin repeats",
             f"{'variant':<18}{'weights KiB':>12}{'decode 1 row':>14}{'ratio':>7}{'decode 8 rows':>15}{'ratio':>7}"
             f"{'prefill 8 rows':>16}{'ratio':>7}"]
    base = {r: rates[r]["fp32"] for r in rates}
    for name in engs:
        one, eight = rates[1][name], rates[8][name]
        lines.append(f"{name:<18}{memory[name] / 1024:>12,.0f}{one['decode']:>14,.0f}"
                     f"{one['decode'] / base[1]['decode']:>7.2f}{eight['decode']:>15,.0f}"
                     f"{eight['decode'] / base[8]['decode']:>7.2f}{eight['prefill']:>16,.0f}"
                     f"{eight['prefill'] / base[8]['prefill']:>7.2f}")
    lines += ["(tokens/s; ratio = vs fp32 in this run)", "",
              f"{args.new} new tokens, 1 row: KV cache vs recomputing the whole sequence per token",
              f"{'variant':<10}{'cache ms/token':>16}{'recompute ms/token':>20}{'speedup':>9}"]
    lines += [f"{n:<10}{c['cache_ms_per_token']:>16.3f}{c['recompute_ms_per_token']:>20.3f}{c['speedup']:>9.1f}"
              for n, c in cache.items()]
    ratios = {n: {r: rates[r][n]["decode"] / base[r]["decode"] for r in rates} for n in engs}
    payload = {"backend": jax.default_backend(), "prompt": args.prompt, "new_tokens": args.new,
               "weight_bytes": memory, "rates": {str(r): v for r, v in rates.items()},
               "decode_ratio_vs_fp32": ratios, "cache_vs_recompute": cache}
    return "\n".join(lines), payload


def main(argv=None) -> int:
    parser = benchmarks.parser("generate", __doc__)
    parser.add_argument("--checkpoint", help=f"serve this checkpoint instead of a random tiny model: {flags.CHECKPOINT_HELP}")
    parser.add_argument("--quick", action="store_true", help="64 new tokens, 3 repeats")
    args = parser.parse_args(argv)
    args.new, args.repeats, args.prompt = (64, 3, 64) if args.quick else (256, 5, 64)
    try:
        ckpt = checkpoint(args.checkpoint, args.prompt + args.new)
    except q.ServeError as err:
        return cli.fail(err)
    engs = engines(ckpt)
    rates = {rows: decode_rates(engs, rows, args.prompt, args.new, args.repeats) for rows in (1, 8)}
    cache = cache_vs_recompute(engs, args.prompt, args.new, args.repeats)
    benchmarks.report(args, *report(args, ckpt, engs, rates, cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
