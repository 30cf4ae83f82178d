"""`python -m serve.evaluate --data FILE`: what precision costs on any text.

The text (.txt, or .jsonl with a "text" field per line) is read with the checkpoint's own
tokenizer and cut into `--windows` non-overlapping windows of `--seq-len` + 1 tokens.
Every variant (`--variants`, default all) runs over the same windows; against the fp32
reference it reports perplexity and its change, weight bytes, the cosine of the logits,
KL(fp32 || variant) per token and top-1 agreement. Static-activation variants calibrate
on the same windows. Each batch runs through every variant in turn and its metrics are
summed in one compiled program, so one batch's fp32 logits are all that is kept, whatever
--windows is.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

import mpx
from mpx import calibrate as calibrate_lib
from serve import calibration
from serve import evaluate as ev
from serve import sources
from serve import quantize as q
from store import data as data_lib

VARIANT_NAMES = ("fp32", "bf16", "fp8", "fp8-channel", "fp8-tensor", "fp8-weight-only", "fp8-kv",
                 *(f"fp8-static-{m}" for m in calibrate_lib.METHODS), "policy")


DEFAULT_SEQ_LEN = 256  # --seq-len when not given (capped at the model's context)

def variant_named(name: str, policy: str | None = None) -> ev.Variant:
    """The variant of a --variants name (see VARIANT_NAMES); "policy" is the --policy file's.

    Raises:
      ServeError: an unknown name, naming the known ones; "policy" without a policy file.
    """
    if name == "policy":
        if policy is None:
            raise q.ServeError("variant 'policy' needs --policy FILE")
        return ev.Variant(q.policy_spec(policy))
    fp8 = q.ServeSpec("fp8")
    fixed = {"fp32": ev.Variant(q.ServeSpec("fp32")), "bf16": ev.Variant(q.ServeSpec("bf16")), "fp8": ev.Variant(fp8),
             "fp8-channel": ev.Variant(dataclasses.replace(fp8, weights="channel")),
             "fp8-tensor": ev.Variant(dataclasses.replace(fp8, activations="tensor")),
             "fp8-weight-only": ev.Variant(dataclasses.replace(fp8, activations="none")),
             "fp8-kv": ev.Variant(fp8, kv_cache="fp8")}
    if name in fixed:
        return fixed[name]
    method = name.removeprefix("fp8-static-")
    if name.startswith("fp8-static-") and method in calibrate_lib.METHODS:
        return ev.Variant(dataclasses.replace(fp8, activations="static", calibration=method))
    raise q.ServeError(f"unknown variant {name!r}; allowed: {', '.join(VARIANT_NAMES)}")


def parse_variants(text: str | None, policy: str | None = None) -> list[tuple[str, ev.Variant]]:
    """(name, Variant) pairs of a comma-separated --variants list, fp32 first.

    The default is every variant ("policy" only with a `policy` file).
    """
    default = [n for n in VARIANT_NAMES if n != "policy" or policy is not None]
    names = [n.strip() for n in (text or ",".join(default)).split(",") if n.strip()]
    names = ["fp32"] + [n for n in dict.fromkeys(names) if n != "fp32"]  # the reference leads
    return [(n, variant_named(n, policy)) for n in names]


def text_windows(path: str, tokenizer, seq_len: int, count: int) -> np.ndarray:
    """`count` (or as many as fit) non-overlapping windows of seq_len + 1 tokens of a file.

    Raises:
      ServeError: a missing or unreadable file, or text shorter than one window.
    """
    try:
        tokens = data_lib.encode_documents(data_lib.load_documents(path), tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise q.ServeError(f"--data: {err}") from None
    n = min(count, (len(tokens) - 1) // seq_len)
    if n < 1:
        raise q.ServeError(f"--data {path} holds {len(tokens)} tokens: fewer than one window of "
                           f"--seq-len {seq_len} + 1")
    return np.stack([tokens[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])


# The most windows per batch, and the most bytes of f32 logits one batch may produce.
BATCH_WINDOWS, BATCH_LOGIT_BYTES = 8, 1 << 30


def _batches(windows: np.ndarray, vocab_size: int) -> list[np.ndarray]:
    """Batches of up to 8 windows, fewer where their f32 logits would pass 1 GiB (a
    262,144-token vocabulary at 256 tokens: 4 windows)."""
    per_window = (windows.shape[1] - 1) * vocab_size * 4
    size = max(1, min(BATCH_WINDOWS, BATCH_LOGIT_BYTES // per_window))
    return [windows[i:i + size] for i in range(0, len(windows), size)]


def _text_metrics(logits: jax.Array, ref: jax.Array, targets: np.ndarray) -> np.ndarray:
    """Per-batch sums: nll, dot, |a|^2, |b|^2, KL, top-1 matches, tokens."""
    count = math.prod(logits.shape[:-1])
    sums = _metric_sums(logits, ref, jnp.asarray(targets))
    return np.array([*np.asarray(sums, np.float64), count], np.float64)


@jax.jit
def _metric_sums(logits: jax.Array, ref: jax.Array, targets: jax.Array) -> jax.Array:
    """One compiled program, so XLA fuses each row's softmax statistics into reductions:
    evaluated op by op, every step (two log-softmaxes, their difference, ...) would be a
    (tokens x vocabulary) f32 array of its own, 2 GB each for a batch of 8 x 256 tokens of
    a 262,144-token vocabulary."""
    a, b = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32), ref.reshape(-1, ref.shape[-1]).astype(jnp.float32)
    count = a.shape[0]
    nll = -jnp.sum(ev._target_logprobs(logits.astype(jnp.float32), targets))
    return jnp.stack([nll, jnp.vdot(a, b), jnp.vdot(a, a), jnp.vdot(b, b), mpx.metrics.kl_divergence(a, b) * count,
                      mpx.metrics.top1_agreement(a, b) * count])


def _row(name: str, variables, sums: np.ndarray) -> dict:
    nll, dot, aa, bb, kl, top1, count = sums
    return {"name": name, "ppl": math.exp(nll / count), "weight_bytes": q.weight_bytes(variables["params"]),
            "logits_cos": dot / max(math.sqrt(aa * bb), 1e-30), "top1_agreement": top1 / count, "kl": kl / count}


def evaluate_text(ckpt: q.Checkpoint, variants: list[tuple[str, ev.Variant]], windows: np.ndarray,
                  log=print) -> list[dict]:
    """Rows of every variant over `windows` (N, T + 1), against the first (the fp32
    reference); static variants calibrate on them.

    Every variant is prepared first; then each batch runs through all of them, so only one
    batch's reference logits are alive at a time (keeping every window's for a later
    variant costs windows x tokens x vocabulary x 4 bytes: 4.3 GB for Gemma 3 over 16
    windows, and it grows with --windows)."""
    batches, hists = _batches(windows, ckpt.config.vocab_size), None
    if any(v.spec.precision == "fp8" and v.spec.activations == "static" for _, v in variants):
        hists = calibration.calibrate(ckpt.config, ckpt.params, [b[:, :-1] for b in batches])
    prepared = []
    for name, variant in variants:
        log(f"preparing {name} ({variant.label}) ...")
        model, variables = q.prepare(ckpt, variant.spec, hists=hists)
        prepared.append((name, ev._forward(model, variant.kv_cache), variables))
    sums = np.zeros((len(prepared), 7))
    for i, batch in enumerate(batches):
        log(f"measuring batch {i + 1} of {len(batches)} ...")
        ref = None
        for j, (_, forward, variables) in enumerate(prepared):
            logits = forward(variables, jnp.asarray(batch[:, :-1]))
            ref = logits if ref is None else ref
            sums[j] += _text_metrics(logits, ref, batch[:, 1:])
            del logits
    rows = [_row(name, variables, s) for (name, _, variables), s in zip(prepared, sums)]
    for row in rows:
        row["ppl_change_pct"] = 100.0 * (row["ppl"] / rows[0]["ppl"] - 1.0)
    return rows


def text_markdown(rows: list[dict], ckpt: q.Checkpoint, windows: np.ndarray, data: str) -> str:
    """The --data report as a Markdown table."""
    lines = [f"# Precision report: {ckpt.name} on {data}", "",
             f"{windows.shape[0]} windows of {windows.shape[1] - 1} tokens; every number measured by "
             "`python -m serve.evaluate --data`.", "",
             "| variant | weight memory | perplexity | ppl change | logits cosine | KL (nats/token) | top-1 agree |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['weight_bytes'] / 2**20:,.2f} MiB | {r['ppl']:.4f} | {r['ppl_change_pct']:+.3f}% | "
              f"{r['logits_cos']:.6f} | {r['kl']:.2e} | {r['top1_agreement']:.2%} |" for r in rows]
    return "\n".join(lines) + "\n"


def json_rows(rows: list[dict]) -> dict:
    """The --json object: {"variants": [{"name", "ppl", "ppl_change_pct", "weight_bytes",
    "logits_cos", "top1_agreement", "kl"}, ...]}."""
    keys = ("name", "ppl", "ppl_change_pct", "weight_bytes", "logits_cos", "top1_agreement", "kl")
    return {"variants": [{k: row[k] for k in keys} for row in rows]}


def inputs(checkpoint: str, data: str, *, seq_len: int | None = None, windows: int = 16,
           variants: str | None = None, tokenizer: str | None = None, skip_incomplete: bool = False,
           policy: str | None = None) -> tuple[q.Checkpoint, list, np.ndarray]:
    """(checkpoint, [(name, Variant)], token windows) of `run`'s arguments, checked.

    `seq_len`: the window length (default DEFAULT_SEQ_LEN, or the model's context where
    that is shorter).

    Raises:
      ServeError: a bad checkpoint, data file, variant name or window size.
    """
    named = parse_variants(variants, policy)
    ckpt = sources.load_checkpoint(checkpoint, skip_incomplete=skip_incomplete)
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, ckpt.config.max_seq_len)
    if seq_len > ckpt.config.max_seq_len:
        raise q.ServeError(f"--seq-len {seq_len} exceeds the model's context {ckpt.config.max_seq_len}")
    tok = q.load_tokenizer(tokenizer or ckpt.tokenizer_spec)
    cut = text_windows(data, tok, seq_len, windows)
    if int(cut.max()) >= ckpt.config.vocab_size:
        raise q.ServeError(f"the tokenizer yields id {int(cut.max())} beyond the model's vocabulary "
                           f"({ckpt.config.vocab_size}); pass the checkpoint's own --tokenizer")
    return ckpt, named, cut


def run(checkpoint: str, data: str, *, seq_len: int | None = None, windows: int = 16, variants: str | None = None,
        tokenizer: str | None = None, skip_incomplete: bool = False, policy: str | None = None,
        log=print) -> tuple[list[dict], str]:
    """Evaluates a checkpoint (mpx run or Hugging Face directory) on a text file.

    `policy`: a precision policy YAML, the variant named "policy"; the rest as `inputs`.

    Returns:
      (rows, Markdown report).

    Raises:
      ServeError: a bad checkpoint, data file, variant name or window size.
    """
    ckpt, named, cut = inputs(checkpoint, data, seq_len=seq_len, windows=windows, variants=variants,
                              tokenizer=tokenizer, skip_incomplete=skip_incomplete, policy=policy)
    rows = evaluate_text(ckpt, named, cut, log=log)
    return rows, text_markdown(rows, ckpt, cut, data)
