"""`python -m serve.generate --checkpoint PATH --prompt "..." [--precision fp8|bf16|fp32]
[--kv-cache fp8|bf16]`: load a checkpoint, quantize it, generate with a KV cache.

Streams the text of a single prompt as it is generated; with several `--prompt`s, runs
them as one batch and prints each at the end. Ends with tokens/s and weight memory.
User mistakes (no checkpoint, empty or too long prompt, unknown precision, a checkpoint
of another model, a missing tokenizer) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from absl import logging as absl_logging

from serve import engine as engine_lib
from serve import kv_cache as kv_cache_lib
from serve import quantize as q
from serve import sampling
from train import config as config_lib


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line with exit status 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m serve.generate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=q.TRAIN_CHECKPOINTS,
                   help=f"run dir, checkpoints dir or step dir (default {q.TRAIN_CHECKPOINTS})")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--precision", default="fp8", help="fp8 (default), bf16 or fp32")
    p.add_argument("--weights", default="block", help="FP8 weight scales: block (128x128) or channel")
    p.add_argument("--activations", default="token", help="FP8 activations: token, tensor, static or none")
    p.add_argument("--calibration", default="max", help="static calibration: max, percentile, mse or kl")
    p.add_argument("--kv-cache", default="bf16", help="KV cache: bf16 (default), fp8 or fp32")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass")
    p.add_argument("--logit-scale", type=float, default=1.0, help="multiply logits (FP8 temperature correction)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--config", help="training config YAML the checkpoint must match")
    p.add_argument("--tokenizer", help="tokenizer (bytes or tokenizer.json) instead of the checkpoint's")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """(engine, tokenizer, sampler, spec, fp32 weight bytes) from the command line.

    Raises:
      ServeError, ConfigError, ValueError: user mistakes (see the module docstring).
    """
    spec = q.ServeSpec(args.precision, args.weights, args.activations, args.calibration)
    kv_cache_lib.check_kind(args.kv_cache)
    sampler = sampling.make(args.temperature, args.top_k, args.top_p)
    expect = config_lib.load(args.config).model if args.config else None
    ckpt = q.load_checkpoint(args.checkpoint, expect_model=expect)
    tokenizer = q.load_tokenizer(args.tokenizer or ckpt.tokenizer_spec)
    model, variables = q.prepare(ckpt, spec)
    engine = engine_lib.Engine(model, variables, kv_cache=args.kv_cache, logit_scale=args.logit_scale)
    return engine, tokenizer, sampler, spec, q.weight_bytes(ckpt.params)


def _summary(stats: engine_lib.Stats, engine: engine_lib.Engine, spec: q.ServeSpec, fp32_bytes: int) -> str:
    params = engine.variables["params"]
    return (f"[{spec.label}, {engine.kv_cache} KV cache] {stats.new_tokens} new tokens; prefill "
            f"{stats.prefill_tokens_per_s:,.0f} tok/s, decode {stats.decode_tokens_per_s:,.0f} tok/s "
            f"(compiled beforehand); weight memory {q.weight_bytes(params) / 2**20:.2f} MiB "
            f"({q.weight_bytes(params) / fp32_bytes:.1%} of fp32)")


def main(argv=None) -> int:
    args = parse_args(argv)
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs read-only restores as warnings
    try:
        engine, tokenizer, sampler, spec, fp32_bytes = build(args)
        # Compile prefill and decode for these prompts' buckets first, so the speed
        # reported at the end is that of warm steps.
        engine.warm_up([tokenizer.encode(p) for p in args.prompt], args.max_tokens, sampler=sampler)
        stream = (lambda text: print(text, end="", flush=True)) if len(args.prompt) == 1 else None
        if stream is not None:
            print(args.prompt[0], end="", flush=True)
        texts, outputs, stats = engine_lib.generate_text(
            engine, tokenizer, args.prompt, max_new_tokens=args.max_tokens, sampler=sampler, seed=args.seed,
            stop=args.stop, stream=stream)
    except (q.ServeError, config_lib.ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if stream is None:
        for prompt, text, out in zip(args.prompt, texts, outputs):
            print(f"--- [{out.finish}]\n{prompt}{text}")
    else:
        print()
    print(_summary(stats, engine, spec, fp32_bytes), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
