"""Training accuracy per precision: eval loss of fp32, bf16 and fp8 over several seeds.

Trains the same model preset under each precision preset on generated English prose
(not the built-in corpus: a seeded grammar of subjects, verbs, objects and clauses,
written below, so the text is public domain and needs no download), byte-level tokens,
and reports each run's final eval loss and the fp8-vs-bf16 gap per seed with its mean
and spread. The learning rate warms up, then decays to 0 (cosine), so final losses are
comparable. At few steps the gap is mostly seed noise: compare its mean to its spread.

    python -m benchmarks.train_accuracy                      # small preset, 3 seeds
    python -m benchmarks.train_accuracy --model tiny --steps 50 --json
    python -m benchmarks.train_accuracy --precisions fp8,my_policy.yaml   # per-layer policies too
    python -m benchmarks.train_accuracy --model deepseek_v3_tiny     # MLA + DeepSeekMoE

MoE models train with DeepSeek-V3's auxiliary-loss-free balancing (selection-bias rate
`--moe-bias-rate`), and each run also reports its experts' balance over the last tenth of
its steps: the busiest expert's share of the routed pairs times the number of experts
(1.0 = perfectly even), averaged over MoE blocks and steps.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

import benchmarks
import mpx
from models import config as model_config
from models import transformer
from store import cli
from train import step as step_lib

PRECISIONS = ("fp32", "bf16", "fp8")

_WORDS = {
    "subject": ["the miller", "a traveller", "the old sailor", "my sister", "the village doctor", "a young clerk",
                "the harbour master", "our neighbour", "the schoolteacher", "a weary soldier"],
    "verb": ["carried", "remembered", "painted", "mended", "borrowed", "described", "followed", "praised",
             "forgot", "watched"],
    "object": ["a lantern", "the broken gate", "an unfinished letter", "the northern road", "a basket of pears",
               "the river at dusk", "a silver watch", "the winter garden", "an old map", "the church bells"],
    "adverb": ["slowly", "without a word", "at first light", "with great care", "before supper",
               "in the rain", "all afternoon", "once again"],
    "clause": ["because the wind had changed", "although nobody had asked", "while the kettle boiled",
               "as the town fell quiet", "until the lamps were lit", "since the market had closed"],
    "link": ["Then", "Later", "Meanwhile", "Afterwards", "Even so", "By evening"],
}


def prose(n_chars: int, seed: int) -> str:
    """About `n_chars` characters of English sentences from a seeded grammar.

    Args:
      n_chars: length to reach (the last sentence is kept whole).
      seed: the generator's seed.

    Returns:
      Paragraphs of sentences separated by blank lines.
    """
    rng = np.random.default_rng(seed)
    pick = lambda kind: _WORDS[kind][rng.integers(len(_WORDS[kind]))]  # noqa: E731
    parts, size = [], 0
    while size < n_chars:
        sentence = f"{pick('subject')} {pick('verb')} {pick('object')} {pick('adverb')}"
        if rng.random() < 0.5:
            sentence += f", {pick('clause')}"
        if rng.random() < 0.3:
            sentence = f"{pick('link')}, {sentence}"
        sentence = sentence[0].upper() + sentence[1:] + "."
        sentence += "\n\n" if rng.random() < 0.15 else " "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)


def _batches(tokens: np.ndarray, batch: int, seq: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(tokens) - seq - 1, batch)
        rows = np.stack([tokens[s:s + seq + 1] for s in starts])
        yield {"inputs": jnp.asarray(rows[:, :-1]), "targets": jnp.asarray(rows[:, 1:])}


def train_one(cfg, precision: str, seed: int, train_tokens, eval_batches, steps: int, batch: int, seq: int,
              lr: float, moe_bias_rate: float = 0.001) -> tuple[float, float | None]:
    """(final mean eval loss in nats per token, expert balance or None) of one run."""
    model = transformer.Transformer(cfg, mpx.policy.get(precision))
    moments = jnp.float32 if precision == "fp32" else jnp.bfloat16
    # Warmup, then cosine decay to 0: the final loss is not one noisy step of a constant
    # learning rate, so the precisions' gap is not buried in end-of-run fluctuation.
    tx = mpx.optim.build("adamw", lr, schedule="cosine", warmup_steps=max(steps // 10, 1), total_steps=steps,
                         final_ratio=0.0, moment_dtype=moments, clip_norm=1.0)
    state = step_lib.init_state(model, tx, mpx.optim.NoOpLossScale(), seed, jnp.zeros((1, seq), jnp.int32))
    step = jax.jit(step_lib.make_train_step(model, tx, moe_bias_rate=moe_bias_rate))
    balance = []
    for i, data in enumerate(_batches(train_tokens, batch, seq, steps, seed)):
        state, metrics = step(state, data)
        if "moe_max_load" in metrics and i >= steps - max(steps // 10, 1):
            balance.append(float(metrics["moe_max_load"]))
    evaluate = jax.jit(step_lib.make_eval_step(model))
    nll = tokens = 0.0
    for data in eval_batches:
        out = evaluate(state, data)
        nll, tokens = nll + float(out["nll_sum"]), tokens + float(out["tokens"])
    return nll / tokens, (statistics.fmean(balance) if balance else None)


def _gap(losses: list[float], reference: list[float]) -> dict:
    gaps = [100.0 * (x - r) / r for x, r in zip(losses, reference)]
    return {"per_seed": gaps, "mean": statistics.fmean(gaps), "stdev": statistics.stdev(gaps) if len(gaps) > 1 else 0.0}


def run(model: str, seeds: int, steps: int, batch: int, seq: int, lr: float, eval_batches: int,
        precisions=PRECISIONS, moe_bias_rate: float = 0.001) -> dict:
    """Every precision x seed; each one's gap to bf16 (percent of bf16's loss) per seed."""
    cfg = model_config.preset(model)
    text = np.frombuffer(prose(400_000, seed=1234).encode(), np.uint8).astype(np.int32)
    split = int(0.9 * len(text))
    held_out = list(_batches(text[split:], batch, seq, eval_batches, seed=99))
    runs = {p: [train_one(cfg, p, s, text[:split], held_out, steps, batch, seq, lr, moe_bias_rate)
                for s in range(seeds)] for p in precisions}
    losses = {p: [loss for loss, _ in r] for p, r in runs.items()}
    gaps = {p: _gap(losses[p], losses["bf16"]) for p in precisions if p != "bf16"}
    result = {"model": model, "steps": steps, "batch": batch, "seq": seq, "seeds": seeds, "eval_loss": losses,
              "gap_vs_bf16_pct": gaps}
    if cfg.n_experts:
        result["moe_max_load"] = {p: [b for _, b in r] for p, r in runs.items()}
        result["moe_bias_rate"] = moe_bias_rate
    if "fp8" in gaps:
        result["fp8_vs_bf16_gap_pct"] = gaps["fp8"]
    return result


def _precisions(text: str) -> tuple[str, ...]:
    """--precisions: bf16 first (the reference), then each named preset or policy file."""
    names = tuple(dict.fromkeys(["bf16", *(p for p in text.split(",") if p)]))
    for name in names:
        mpx.policy.get(name)
    return names


def table(result: dict) -> str:
    lines = [f"{p:<6} eval loss " + "  ".join(f"{v:.4f}" for v in values) for p, values in result["eval_loss"].items()]
    lines += [f"{p} vs bf16: {gap['mean']:+.2f}% +- {gap['stdev']:.2f}% over {result['seeds']} seeds"
              for p, gap in result["gap_vs_bf16_pct"].items()]
    lines += [f"{p:<6} expert balance (max load x E, 1 = even) " + "  ".join(f"{v:.3f}" for v in values)
              for p, values in result.get("moe_max_load", {}).items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = benchmarks.parser("train_accuracy", __doc__)
    parser.add_argument("--model", default="small", type=cli.accepted_by(model_config.preset),
                        help="model preset (tiny, small)")
    parser.add_argument("--seeds", type=cli.positive_int, default=3)
    parser.add_argument("--steps", type=cli.positive_int, default=300)
    parser.add_argument("--batch", type=cli.positive_int, default=16)
    parser.add_argument("--seq", type=cli.positive_int, default=128)
    parser.add_argument("--lr", type=cli.positive_float, default=1e-3, help="peak learning rate")
    parser.add_argument("--eval-batches", type=cli.positive_int, default=16)
    parser.add_argument("--precisions", default=",".join(PRECISIONS), type=cli.accepted_by(_precisions),
                        help="comma-separated presets or policy YAML files; bf16 (the reference) always runs")
    parser.add_argument("--moe-bias-rate", type=float, default=0.001,
                        help="MoE selection-bias update rate (auxiliary-loss-free balancing)")
    args = parser.parse_args(argv)
    result = run(args.model, args.seeds, args.steps, args.batch, args.seq, args.lr, args.eval_batches,
                 _precisions(args.precisions), args.moe_bias_rate)
    return benchmarks.report(args, table(result), result)


if __name__ == "__main__":
    main()
