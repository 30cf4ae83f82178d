"""`python -m serve.evaluate --checkpoint PATH`: what precision costs, measured.

Serves one checkpoint in fp32, bf16 and several FP8 variants (weight scales per 128x128
block or per output channel; activations per token, per tensor, static from each
calibration method, or weight-only; an FP8 KV cache) and measures, against fp32, on
held-out text (the checkpoint's own eval split):

* weight memory (bytes of the serving params, and % of fp32),
* decode tokens/s (greedy, KV cache, warm),
* perplexity and its relative change,
* logits cosine similarity, KL(fp32 || variant) per token, top-1 agreement,
* greedy-generation agreement: the fraction of generated tokens equal to fp32's at the
  same position, from held-out prompts.

Writes `precision_report.md` and `precision_report.png` into `--out` (default
`runs/<run name>/eval/`). User mistakes exit with status 2 and one line.

`--checkpoint` may be a Hugging Face model directory. `--data FILE` (.txt, or .jsonl with
"text") measures on any text instead, read with the checkpoint's own tokenizer:
`--windows` windows of `--seq-len` tokens, the `--variants` named (default all; see
serve/evaluate_text.py), no generation; the report goes to stdout (and `--out` if
given). `--json` ends the output with one JSON object: {"variants": [{"name", "ppl",
"ppl_change_pct", "weight_bytes", "logits_cos", "top1_agreement", "kl"}, ...]}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import mpx
from mpx import calibrate as calibrate_lib
from serve import calibration
from serve import flags
from serve import engine as engine_lib
from serve import kv_cache as kv_cache_lib
from serve import quantize as q
from serve import sources
from store import cli

# The targets of the design brief: weight memory relative to fp32, most perplexity loss accepted.
TARGETS = {"fp32": ("100%", "<0.1%"), "bf16": ("50%", "<0.5%"), "fp8": ("25%", "<2%")}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the report: a serving spec and the KV cache kind it generates with."""

    spec: q.ServeSpec
    kv_cache: str = "bf16"

    @property
    def label(self) -> str:
        return self.spec.label + (f" + {self.kv_cache} KV" if self.kv_cache == "fp8" else "")


def default_variants(methods=calibrate_lib.METHODS) -> list[Variant]:
    """fp32, bf16, FP8 weight/activation variants, each calibration method, FP8 KV cache."""
    fp8 = q.ServeSpec("fp8")
    rows = [Variant(q.ServeSpec("fp32")), Variant(q.ServeSpec("bf16")), Variant(fp8),
            Variant(dataclasses.replace(fp8, weights="channel")),
            Variant(dataclasses.replace(fp8, activations="tensor")),
            Variant(dataclasses.replace(fp8, activations="none"))]
    rows += [Variant(dataclasses.replace(fp8, activations="static", calibration=m)) for m in methods]
    return rows + [Variant(fp8, kv_cache="fp8")]


# --------------------------------------------------------------------------- measurements


@dataclasses.dataclass
class Data:
    """Held-out batches, greedy prompts and the fp32 reference over them."""

    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    prompts: list[list[int]]
    new_tokens: int
    ref_logits: list[jax.Array] | None = None
    ref_generation: list[list[int]] | None = None


def held_out(ckpt: q.Checkpoint, batches: int, prompts: int, prompt_len: int, new_tokens: int) -> Data:
    """The checkpoint's held-out batches and `prompts` greedy prompts cut from them."""
    stream, _ = calibration.token_stream(ckpt, 8)
    count = min(batches, stream.num_eval_batches)
    if count == 0:
        raise q.ServeError(f"checkpoint {ckpt.path} has no held-out data (data.eval_fraction is 0)")
    eval_batches = stream.eval_batches(count)
    windows = np.concatenate([b.inputs for b in eval_batches])
    starts = [w[:prompt_len].tolist() for w in windows[:prompts]]
    return Data([b.inputs for b in eval_batches], [b.targets for b in eval_batches], starts, new_tokens)


@functools.lru_cache(maxsize=4)
def _forward(model, kv_cache: str):
    """A jitted (variables, tokens) -> f32 logits, through a KV cache of that kind."""

    @jax.jit
    def forward(variables, tokens):
        # A cache of the window's length: attention reads what the window fills, not the context.
        rows, length = tokens.shape
        cache = kv_cache_lib.init(model.config, rows, kv_cache, length) if kv_cache == "fp8" else None
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model.apply(variables, tokens, positions, cache)[0]

    return forward


def _target_logprobs(logits: jax.Array, targets) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]


def _nll(logits: jax.Array, targets: np.ndarray) -> float:
    return float(-jnp.sum(_target_logprobs(logits, targets)))


def token_logprobs(model, variables, tokens: np.ndarray, kv_cache: str = "fp32") -> np.ndarray:
    """Each token's log-probability given the ones before it, as evaluation scores text:
    (B, T - 1) float32 for tokens (B, T), the negated per-token losses."""
    tokens = np.asarray(tokens)
    logits = _forward(model, kv_cache)(variables, jnp.asarray(tokens[:, :-1]))
    return np.asarray(_target_logprobs(logits, tokens[:, 1:]))


def _generate(engine: engine_lib.Engine, data: Data, repeats: int = 3) -> tuple[list[list[int]], float]:
    """Greedy generations from the prompts, and warm decode tokens/s (median of `repeats`)."""
    engine.warm_up(data.prompts, data.new_tokens)
    rates = []
    for _ in range(repeats):
        outputs, stats = engine.generate(data.prompts, max_new_tokens=data.new_tokens)
        rates.append(stats.decode_tokens_per_s)
    return [o.tokens for o in outputs], float(np.median(rates))


def _agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    same = sum(sum(a == b for a, b in zip(x, r)) for x, r in zip(tokens, reference))
    return same / max(sum(len(r) for r in reference), 1)


def measure(variant: Variant, ckpt: q.Checkpoint, data: Data, hists, fp32_bytes: int) -> dict:
    """One report row (fills the fp32 reference into `data` when given the fp32 variant)."""
    model, variables = q.prepare(ckpt, variant.spec, hists=hists)
    forward = _forward(model, variant.kv_cache)
    logits = [forward(variables, jnp.asarray(x)) for x in data.inputs]
    tokens, tps = _generate(engine_lib.Engine(model, variables, kv_cache=variant.kv_cache), data)
    if data.ref_logits is None:
        data.ref_logits, data.ref_generation = logits, tokens
    count = sum(t.size for t in data.targets)
    nll = sum(_nll(lg, t) for lg, t in zip(logits, data.targets)) / count
    flat, ref = jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in logits]), \
        jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in data.ref_logits])
    nbytes = q.weight_bytes(variables["params"])
    static = variant.spec.precision == "fp8" and variant.spec.activations == "static"
    return {"label": variant.label, "precision": variant.spec.precision, "bytes": nbytes,
            "calibration": variant.spec.calibration if static and variant.kv_cache != "fp8" else None,
            "memory": nbytes / fp32_bytes, "tokens_per_s": tps, "ppl": math.exp(nll),
            "cosine": float(mpx.metrics.cosine_similarity(flat, ref)),
            "kl": float(mpx.metrics.kl_divergence(flat, ref)), "top1": float(mpx.metrics.top1_agreement(flat, ref)),
            "greedy": _agreement(tokens, data.ref_generation), "logits": flat}


def evaluate(ckpt: q.Checkpoint, variants: list[Variant], data: Data, calibration_batches: int = 8,
             log=print) -> tuple[list[dict], dict]:
    """Measures every variant (the first must be fp32: it is the reference).

    Returns:
      (rows, extra): rows as `measure` returns them plus "ppl_change"; extra holds the
      calibrated amax per method and layer and the fitted FP8 logit scale.
    """
    if variants[0].spec.precision != "fp32" or variants[0].kv_cache == "fp8":
        raise ValueError("the first variant must be fp32 with a bf16/fp32 KV cache: it is the reference")
    hists = None
    if any(v.spec.activations == "static" and v.spec.precision == "fp8" for v in variants):
        batches = calibration.calibration_batches(ckpt, calibration_batches)
        hists = calibration.calibrate(ckpt.config, ckpt.params, batches)
    fp32_bytes = sources.fp32_bytes(ckpt)
    rows = []
    for variant in variants:
        log(f"measuring {variant.label} ...")
        rows.append(measure(variant, ckpt, data, hists, fp32_bytes))
    for row in rows:
        row["ppl_change"] = row["ppl"] / rows[0]["ppl"] - 1.0
    return rows, _extra(rows, hists)


def _extra(rows: list[dict], hists) -> dict:
    extra: dict = {}
    fp8 = next((r for r in rows if r["precision"] == "fp8"), None)
    if fp8 is not None:
        scale = calibration.fit_logit_scale(fp8["logits"], rows[0]["logits"])
        kl = float(mpx.metrics.kl_divergence(fp8["logits"] * scale, rows[0]["logits"]))
        extra["logit_scale"] = {"label": fp8["label"], "scale": scale, "kl_before": fp8["kl"], "kl_after": kl}
    if hists is not None:
        extra["amax"] = {path: {m: float(calibrate_lib.calibrated_amax(h, m)) for m in calibrate_lib.METHODS}
                         for path, h in hists.items()}
    return extra


# --------------------------------------------------------------------------- report


def _winner(rows: list[dict]) -> str:
    static = sorted((r for r in rows if r["calibration"]), key=lambda r: r["ppl"])
    if not static:
        return ""
    by_ppl = ", ".join(f"{r['calibration']} {r['ppl_change']:+.3%}" for r in static)
    by_kl = ", ".join(f"{r['calibration']} {r['kl']:.2e}" for r in sorted(static, key=lambda r: r["kl"]))
    return (f"Calibration methods (static per-tensor activations), best first. By perplexity change: {by_ppl}. "
            f"By KL to fp32: {by_kl}.")


def to_markdown(rows: list[dict], extra: dict, ckpt: q.Checkpoint, data: Data) -> str:
    """The report as Markdown: the table, the design targets beside it, calibration notes."""
    tokens = sum(t.size for t in data.targets)
    lines = [f"# Precision report: {ckpt.name} (step {ckpt.step})", "",
             f"Model {ckpt.config.d_model}d x {ckpt.config.n_layers} layers, "
             f"{sources.param_count(ckpt):,} parameters. Held-out text: "
             f"{tokens:,} tokens; greedy agreement over {len(data.prompts)} prompts x {data.new_tokens} new "
             f"tokens; decode tokens/s on {jax.default_backend()} ({len(data.prompts)} rows, warm, median of 3; "
             "benchmarks/generate.py measures speed round-robin). "
             "Every number below is measured by `python -m serve.evaluate`; targets: weight memory "
             "and the most perplexity loss accepted, from the project's design brief.", "",
             "| variant | weight memory | vs fp32 | target | decode tok/s | perplexity | ppl change | target "
             "| logits cosine | KL (nats/token) | top-1 agree | greedy agree |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    claimed = set()
    for r in rows:
        # The design targets sit beside the first (default) row of each precision.
        first = r["precision"] not in claimed and "KV" not in r["label"]
        claimed.add(r["precision"])
        claim = TARGETS[r["precision"]] if first else ("", "")
        lines.append(f"| {r['label']} | {r['bytes'] / 1024:,.0f} KiB | {r['memory']:.2%} | {claim[0]} | "
                     f"{r['tokens_per_s']:,.0f} | {r['ppl']:.4f} | {r['ppl_change']:+.3%} | {claim[1]} | "
                     f"{r['cosine']:.6f} | {r['kl']:.2e} | {r['top1']:.2%} | {r['greedy']:.2%} |")
    lines += ["", _winner(rows)]
    if "logit_scale" in extra:
        e = extra["logit_scale"]
        lines += ["", f"FP8 logit temperature (`--logit-scale`): the scale minimizing KL to fp32 for {e['label']} is "
                      f"{e['scale']:.3f} (KL {e['kl_before']:.2e} -> {e['kl_after']:.2e})."]
    if "amax" in extra:
        lines += ["", "Calibrated activation amax per layer:", "",
                  "| layer | " + " | ".join(calibrate_lib.METHODS) + " |", "|---" * (len(calibrate_lib.METHODS) + 1) + "|"]
        lines += [f"| {p} | " + " | ".join(f"{a[m]:.4g}" for m in calibrate_lib.METHODS) + " |"
                  for p, a in extra["amax"].items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Four bar charts: weight memory, perplexity change, KL, decode tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    panels = [("weight memory (% of fp32)", [100 * r["memory"] for r in rows]),
              ("perplexity change vs fp32 (%)", [100 * r["ppl_change"] for r in rows]),
              ("KL(fp32 || variant), nats/token", [r["kl"] for r in rows]),
              ("decode tokens/s", [r["tokens_per_s"] for r in rows])]
    fig, axes = plt.subplots(1, 4, figsize=(20, 0.45 * len(rows) + 1.5), sharey=True)
    for ax, (title, values) in zip(axes, panels):
        ax.barh(range(len(rows)), values, color=["#777" if r["precision"] != "fp8" else "#c44" for r in rows])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m serve.evaluate", description=__doc__.splitlines()[0])
    flags.checkpoint(p)
    p.add_argument("--out", help="output directory (default runs/<run name>/eval)")
    p.add_argument("--eval-batches", type=cli.positive_int, default=4, help="held-out batches of 8 sequences")
    p.add_argument("--calibration-batches", type=cli.positive_int, default=8,
                   help="training batches for static calibration")
    p.add_argument("--prompts", type=cli.positive_int, default=8, help="greedy-generation prompts")
    p.add_argument("--prompt-len", type=cli.positive_int, default=32)
    p.add_argument("--new-tokens", type=cli.positive_int, default=64)
    p.add_argument("--methods", default=",".join(calibrate_lib.METHODS),
                   help="calibration methods to compare (comma-separated; empty for none)")
    p.add_argument("--data", help="evaluate on this .txt/.jsonl file with the checkpoint's tokenizer")
    p.add_argument("--seq-len", type=cli.positive_int,
                   help="--data window length (default 256, or the model's context where that is shorter)")
    p.add_argument("--windows", type=cli.positive_int, default=16, help="--data windows (default 16)")
    p.add_argument("--variants", help="comma-separated variant names (fp32, bf16, fp8, fp8-weight-only, fp8-kv, "
                   "policy, ...)")
    flags.policy(p, "evaluated as the variant 'policy'")
    flags.tokenizer(p)
    p.add_argument("--json", action="store_true", help="end with one JSON object of the measured variants")
    return p.parse_args(argv)


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    for m in methods:
        if m not in calibrate_lib.METHODS:
            raise q.ServeError(f"--methods: unknown calibration method {m!r}; allowed: "
                               f"{', '.join(calibrate_lib.METHODS)}")
    return methods


def _json_rows(rows: list[dict]) -> dict:
    """Report rows in the --json shape (evaluate_text.json_rows)."""
    return {"variants": [{"name": r["label"], "ppl": r["ppl"], "ppl_change_pct": 100.0 * r["ppl_change"],
                          "weight_bytes": r["bytes"], "logits_cos": r["cosine"], "top1_agreement": r["top1"],
                          "kl": r["kl"], "tokens_per_s": r["tokens_per_s"], "greedy_agreement": r["greedy"]}
                         for r in rows]}


def _main_text(args: argparse.Namespace) -> int:
    from serve import evaluate_text  # it builds on this module's variants and forward pass

    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    try:
        rows, report = evaluate_text.run(args.checkpoint, args.data, seq_len=args.seq_len, windows=args.windows,
                                         variants=args.variants, tokenizer=args.tokenizer,
                                         skip_incomplete=args.skip_incomplete, policy=args.policy, log=log)
    except (q.ServeError, ValueError) as err:
        return cli.fail(err)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "precision_report.md").write_text(report)
    print(report)
    if args.json:
        print(json.dumps(evaluate_text.json_rows(rows)))
    return 0


def _variants(args: argparse.Namespace) -> list[Variant]:
    from serve import evaluate_text

    if args.variants is None:
        extra = [evaluate_text.variant_named("policy", args.policy)] if args.policy else []
        return default_variants(_methods(args.methods)) + extra
    return [v for _, v in evaluate_text.parse_variants(args.variants, args.policy)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data is not None:
        return _main_text(args)
    try:
        variants = _variants(args)
        ckpt = sources.load_checkpoint(args.checkpoint, skip_incomplete=args.skip_incomplete)
        data = held_out(ckpt, args.eval_batches, args.prompts, args.prompt_len, args.new_tokens)
        rows, extra = evaluate(ckpt, variants, data, args.calibration_batches,
                               log=lambda s: print(s, file=sys.stderr))
    except (q.ServeError, ValueError) as err:
        return cli.fail(err)
    print(f"evaluated step {ckpt.step} of {ckpt.path}", file=sys.stderr)
    out = Path(args.out or Path("runs") / ckpt.name / "eval")
    out.mkdir(parents=True, exist_ok=True)
    report = to_markdown(rows, extra, ckpt, data)
    (out / "precision_report.md").write_text(report)
    plot(rows, out / "precision_report.png")
    print(report)
    print(f"wrote {out / 'precision_report.md'} and {out / 'precision_report.png'}")
    if args.json:
        print(json.dumps(_json_rows(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
