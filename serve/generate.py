"""Generate text from a trained checkpoint: quantize it, then decode with a KV cache.

    python -m serve.generate --checkpoint runs/tiny/checkpoints --prompt "Return the " \\
        [--precision fp8|bf16|fp32] [--kv-cache bf16|fp8|fp32] [--max-tokens 128]
    python -m serve.generate --checkpoint path/to/hf-model --system "Be brief." --chat "Hi" --chat "Why?"

Streams the text of a single prompt as it is generated; with several `--prompt`s, runs
them as one batch and prints each after a `--- prompt i (why it ended)` line. Ends with
the step it loaded, tokens/s and weight memory on stderr. User mistakes (no checkpoint, an
incomplete one, an empty or too long prompt, a bad option value, an FP8-only option
without `--precision fp8`, a checkpoint of another model, a missing tokenizer) print one
line naming the flag and exit with status 2.

`--checkpoint` is an mpx training run or a Hugging Face model directory (config.json,
safetensors weights, tokenizer.json; detected from its contents), loaded tensor by
tensor in the serving precision. Its stop ids (generation_config.json's eos_token_id,
e.g. Llama 3's <|eot_id|>) end generation, and plain prompts get the tokenizer's own
special tokens (Llama's BOS). `--chat "message"` (repeatable: one user turn each, every
reply generated before the next turn; `--system` first) renders the checkpoint's chat
template (tokenizer_config.json) as transformers does and stops at the end of the turn.

`--policy FILE` (a precision policy YAML) decides per layer which weights are FP8 and
how, instead of `--precision` (see `serve.quantize.fp8_forms`).

`--config` checks the checkpoint against a training config's `model` section (a preset
plus overrides, resolved by `models.config.from_section`); the checkpoint itself carries
its model config, so the flag only guards against serving the wrong run.
"""

from __future__ import annotations

import argparse
import sys


from models import config as model_config
from mpx import calibrate as calibrate_lib
from mpx import config as config_io
from mpx import kernels
from mpx import target as target_lib
from serve import flags
from serve import engine as engine_lib
from serve import quantize as q
from serve import sampling
from serve import sources
from store import chat as chat_lib
from store import checkpoint as ckpt_lib
from store import cli

FP8_ONLY = ("weights", "activations", "calibration")  # options that only --precision fp8 reads
DEFAULTS = {"weights": "block", "activations": "token", "calibration": "max"}
FINISH = {"length": "--max-tokens reached", "stop": "a --stop string", "context": "the model's context is full"}


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m serve.generate", description=__doc__.splitlines()[0])
    flags.checkpoint(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="append", default=[], type=cli.non_empty,
                   help="a user turn through the checkpoint's chat template (repeat for turns)")
    p.add_argument("--system", type=cli.non_empty, help="system message of a --chat conversation")
    flags.precision(p)
    p.add_argument("--weights", choices=q.WEIGHT_SCALES, help="FP8 weight scales: block (128x128, default) or channel")
    p.add_argument("--activations", choices=q.ACTIVATIONS, help="FP8 activation scaling (default token)")
    p.add_argument("--calibration", choices=calibrate_lib.METHODS,
                   help="calibration of --activations static (default max)")
    flags.policy(p, "which layers are FP8 and how (instead of --precision)")
    flags.kv_cache(p)
    p.add_argument("--max-tokens", type=cli.positive_int, default=128, help="new tokens per prompt")
    p.add_argument("--temperature", type=cli.non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=cli.positive_int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=cli.probability, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--logit-scale", type=cli.positive_float, default=1.0,
                   help="multiply logits by this (> 0) before sampling: FP8 temperature correction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], type=cli.non_empty, help="stop string (repeatable)")
    p.add_argument("--config", help="training config YAML whose model section the checkpoint must match")
    flags.tokenizer(p)
    return p.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    """Fills FP8 defaults; rejects options the chosen precision or sampler would ignore.

    Raises:
      ValueError: naming the flags as typed.
    """
    given = [name for name in FP8_ONLY if getattr(args, name) is not None]
    if args.policy and given:
        raise ValueError(f"--{given[0]} does not apply with --policy (the policy decides per layer)")
    if args.precision != "fp8" and given:
        raise ValueError(f"--{given[0]} applies only to --precision fp8 (got --precision {args.precision})")
    if args.calibration is not None and args.activations != "static":
        raise ValueError("--calibration applies only to --activations static")
    for name in FP8_ONLY:
        setattr(args, name, getattr(args, name) or DEFAULTS[name])
    if bool(args.prompt) == bool(args.chat):
        raise ValueError("give --prompt (plain text) or --chat (a conversation), one of the two")
    if args.system is not None and not args.chat:
        raise ValueError("--system applies only to --chat")
    if args.top_k is not None and args.top_p is not None:
        raise ValueError("give --top-k or --top-p, not both")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise ValueError("--top-k / --top-p sample, so they need --temperature > 0 (0 is greedy)")


def expected_model(path: str | None) -> model_config.ModelConfig | None:
    """The model section of training config `path` (its `extends` followed), or None."""
    if path is None:
        return None
    raw, _ = config_io.read_tree(path, lambda key, value: key == "model" and isinstance(value, dict)
                                 and "preset" in value)
    return model_config.from_section(raw.get("model", {}))


def build(args: argparse.Namespace):
    """(engine, tokenizer, sampler, spec, checkpoint) from checked options.

    Raises:
      ServeError, ConfigError, ValueError, FileNotFoundError: user mistakes.
    """
    spec = q.policy_spec(args.policy) if args.policy else q.ServeSpec(args.precision, args.weights, args.activations,
                                                                       args.calibration)
    sampler = sampling.make(args.temperature, args.top_k, args.top_p)
    model, variables, tokenizer, ckpt = sources.load_for_serving(
        args.checkpoint, spec, expect_model=expected_model(args.config), skip_incomplete=args.skip_incomplete,
        tokenizer=args.tokenizer)
    engine = engine_lib.Engine(model, variables, kv_cache=args.kv_cache, logit_scale=args.logit_scale)
    return engine, tokenizer, sampler, spec, ckpt


def loaded(ckpt: q.Checkpoint, skip_incomplete: bool = False) -> str:
    """`step N of DIR`, naming newer steps that were skipped: incomplete ones, and with
    `skip_incomplete` (the newest intact step loaded) corrupt ones too."""
    skipped = ([s for s in ckpt_lib.all_steps(ckpt.path) if s > ckpt.step] if skip_incomplete
               else ckpt_lib.incomplete_steps(ckpt.path))
    note = f" (skipped incomplete or corrupt step {', '.join(map(str, skipped))})" if skipped else ""
    return f"step {ckpt.step} of {ckpt.path}{note}"


def reply_tokens(tokenizer, output: engine_lib.Generation, stop) -> int:
    """The tokens of a generation up to and including the one that completes its first stop
    string (the end of the reply: a --stop string or the end-of-sequence token's text); all
    of them for a row that ran to its length or the context.

    The engine decodes in chunks, so a row that stopped holds the rest of its chunk too.
    """
    stop = [s for s in stop if s]
    if output.finish != "stop" or not stop:
        return len(output.tokens)
    for n in range(1, len(output.tokens) + 1):
        text = tokenizer.decode(output.tokens[:n])
        if any(s in text for s in stop):
            return n
    return len(output.tokens)


def _summary(new_tokens: int, stats: engine_lib.Stats, engine: engine_lib.Engine, spec: q.ServeSpec,
             ckpt: q.Checkpoint, skip_incomplete: bool = False) -> str:
    weights, fp32_bytes = q.weight_bytes(engine.variables["params"]), sources.fp32_bytes(ckpt)
    return (f"[{loaded(ckpt, skip_incomplete)}; {spec.label}, {engine.kv_cache} KV cache] {new_tokens} new tokens; prefill "
            f"{stats.prefill_tokens_per_s:,.0f} tok/s, decode {stats.decode_tokens_per_s:,.0f} tok/s "
            f"(compiled beforehand); weight memory {weights / 2**20:.2f} MiB ({weights / fp32_bytes:.1%} of fp32)"
            + _kernel_note(spec))


def _kernel_note(spec: q.ServeSpec) -> str:
    """"; CPU decode kernel: on/off (why)" where it matters: FP8 or bf16 weights on CPU."""
    if not target_lib.current().is_cpu or (spec.precision == "fp32" and spec.layer_policy is None):
        return ""
    return f"; {kernels.status()}"


class _PromptTokenizer:
    """A model tokenizer whose `encode` adds its special tokens (Llama's BOS) to prompts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode_prompt(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


def _stops(args: argparse.Namespace, tokenizer) -> list[str]:
    """--stop strings plus the checkpoint's stop tokens (as text)."""
    return args.stop + (tokenizer.stop_strings() if hasattr(tokenizer, "stop_strings") else [])


def _generate(args: argparse.Namespace):
    check_options(args)
    engine, tokenizer, sampler, spec, ckpt = build(args)
    if args.chat:
        return _chat(args, engine, tokenizer, sampler, spec, ckpt)
    stop = _stops(args, tokenizer)
    if hasattr(tokenizer, "encode_prompt"):
        tokenizer = _PromptTokenizer(tokenizer)
    # Compile prefill and decode for these prompts' buckets first, so the speed
    # reported at the end is that of warm steps.
    engine.warm_up([tokenizer.encode(p) for p in args.prompt], args.max_tokens, sampler=sampler)
    stream = (lambda text: print(text, end="", flush=True)) if len(args.prompt) == 1 else None
    if stream is not None:
        print(args.prompt[0], end="", flush=True)
    texts, outputs, stats = engine_lib.generate_text(
        engine, tokenizer, args.prompt, max_new_tokens=args.max_tokens, sampler=sampler, seed=args.seed,
        stop=stop, stream=stream)
    new_tokens = sum(reply_tokens(tokenizer, out, stop) for out in outputs)
    return engine, spec, ckpt, stream, texts, outputs, stats, new_tokens


def _chat(args, engine, tokenizer, sampler, spec, ckpt):
    """Each --chat turn rendered with the replies so far, generated and streamed in turn."""
    template = getattr(tokenizer, "chat_template", None)
    specials = getattr(tokenizer, "special_tokens", {})
    replies, stream, new_tokens = [], (lambda text: print(text, end="", flush=True)), 0
    for i, turn in enumerate(args.chat):
        prompt = chat_lib.render_chat(template, chat_lib.conversation(args.chat[:i + 1], replies, args.system),
                                      specials)
        engine.warm_up([tokenizer.encode(prompt)], args.max_tokens, sampler=sampler)
        print(f"user: {turn}\nassistant: ", end="", flush=True)
        texts, outputs, stats = engine_lib.generate_text(
            engine, tokenizer, [prompt], max_new_tokens=args.max_tokens, sampler=sampler, seed=args.seed,
            stop=_stops(args, tokenizer), stream=stream)
        print()
        replies.append(texts[0])
        new_tokens += reply_tokens(tokenizer, outputs[0], _stops(args, tokenizer))
    return engine, spec, ckpt, None, [], [], stats, new_tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        engine, spec, ckpt, stream, texts, outputs, stats, new_tokens = _generate(args)
    except (q.ServeError, config_io.ConfigError, ValueError, FileNotFoundError) as err:
        return cli.fail(err)
    if stream is None and not args.chat:
        for i, (prompt, text, out) in enumerate(zip(args.prompt, texts, outputs)):
            print(f"--- prompt {i + 1} (ended by {FINISH[out.finish]})\n{prompt}{text}")
    elif not args.chat:
        print()
    print(_summary(new_tokens, stats, engine, spec, ckpt, args.skip_incomplete), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
