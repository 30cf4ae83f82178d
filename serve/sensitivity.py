"""Sensitivity analysis of a checkpoint and an automatic layer-wise policy under a budget.

    python -m serve.sensitivity --checkpoint runs/tiny --data notes.txt --budget 1 --out runs/tiny/sens

1. Cuts the text of --data (tokenized with the checkpoint's tokenizer) into windows of
   --seq tokens: the first --calibration-windows windows calibrate, the last
   --heldout-windows windows (disjoint) measure.
2. `mpx.sensitivity.analyze`: per linear layer and candidate format, the predicted loss
   increase of lowering that layer alone (Fisher estimate, one forward and backward
   pass per batch), exact one-layer measurements on a subset (--exact pairs spread
   over the estimated ranking) with their rank correlation, weight and activation statistics, and SmoothQuant smoothing.
3. `mpx.policy.search`: the cheapest policy (--objective bytes: weight bytes;
   fp8-flops: the FP8 share of matmul work) within --budget percent perplexity, among
   --search candidates (default native: bf16, E4M3, E5M2, which hardware multiplies as
   is; "all" adds the simulated FP9/FP6/FP4 formats),
   decided by measured loss: each measurement runs the model under a policy (through
   mpx.nn) on the held-out windows, and the search bisects the efficiency order of
   lowering moves on it (at most --max-measurements policies; default
   ceil(log2(moves + 1)) + 4). A measurement is the mean of the held-out windows'
   paired loss increases with its standard error; a policy counts as within the budget
   when its mean plus --confidence standard errors is (default 1). The chosen policy is
   the cheapest one measured within the budget.

Writes sensitivity.md, sensitivity.png (layers x formats heatmap) and policy.yaml (use it
with `train.run` as `precision: {policy_file: FILE}`). With --json the last line is one
JSON object: policy, budget_pct, predicted_ppl_change_pct, measured_ppl_change_pct,
fp8_weight_fraction, weight_bytes, seconds, measure_seconds, peak_rss_bytes, moves,
measurements, max_measurements and rounds (every measured policy: step, moves,
predicted and measured change with its standard error, FP8 share, weight bytes,
seconds). Changes are against the fp32 model.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

import mpx
from models import transformer
from mpx import config as config_lib
from mpx import sensitivity as sens_lib
from mpx.policy import auto as auto_lib
from serve import flags
from serve import quantize as q
from serve import sources
from store import cli
from store import data as data_lib


DEFAULT_SEQ = 256  # --seq when not given (capped at the model's context)


class Progress:
    """A one-line progress bar per phase on stderr."""

    def __init__(self, enabled: bool = True, width: int = 30):
        self.enabled, self.width, self.start = enabled, width, {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        self.start.setdefault(phase, time.perf_counter())
        filled = self.width * done // max(total, 1)
        seconds = time.perf_counter() - self.start[phase]
        end = "\n" if done >= total else ""
        print(f"\r{phase:<9}[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {seconds:5.0f} s",
              end=end, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def windows(ckpt: q.Checkpoint, data: str, seq: int, calibration: int, heldout: int, rows: int):
    """(calibration batches, held-out batches) of (rows, seq) token windows from `data`.

    Raises:
      ServeError: a missing data file, or too little text for the windows asked for.
    """
    tokenizer = q.load_tokenizer(ckpt.tokenizer_spec)
    try:
        tokens = data_lib.encode_documents(data_lib.load_documents(data), tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise q.ServeError(f"--data {data}: {err}") from None
    need = (calibration + heldout) * seq
    if len(tokens) < need:
        raise q.ServeError(f"--data {data} has {len(tokens)} tokens; {calibration} calibration and {heldout} "
                           f"held-out windows of {seq} need {need}")
    cut = np.asarray(tokens[: (len(tokens) // seq) * seq], np.int32).reshape(-1, seq)
    return _batches(cut[:calibration], rows), _batches(cut[len(cut) - heldout:], rows)


def _batches(w: np.ndarray, rows: int) -> list[jax.Array]:
    return [jnp.asarray(w[i:i + rows]) for i in range(0, len(w), rows)]


def paired_change(losses: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of the per-window loss increase over the base: windows are
    paired (the same tokens under both), so their spread is the measurement's error."""
    diff = np.asarray(losses, np.float64) - np.asarray(base, np.float64)
    se = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(np.mean(diff)), se


def policy_loss(config, variables, batches) -> callable:
    """`policy -> each window's mean next-token NLL` (an array over the batches' windows)
    of the model under that policy."""

    def loss(policy: mpx.Policy) -> np.ndarray:
        model = transformer.Transformer(config, policy)
        f = jax.jit(lambda v, b: sens_lib.next_token_nll(model.apply(v, b)[0], b, per_row=True))
        return np.concatenate([np.asarray(f(variables, b), np.float64) for b in batches])

    return loss


# --------------------------------------------------------------------------- report


def _pct(nats: float) -> str:
    return f"{auto_lib.ppl_change_pct(nats):+.3f}"


def _stat_cells(s: dict) -> list[str]:
    return [f"{s['amax']:.3g}", f"{s['kurtosis']:.1f}", f"{s['outlier_fraction']:.1e}",
            f"{s['saturated_fraction']:.1e}", f"{s['flushed_fraction']:.1e}"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def to_markdown(s: sens_lib.Sensitivity, result, args, ckpt: q.Checkpoint) -> str:
    """The sensitivity.md report."""
    lines = [f"# Sensitivity of {ckpt.name} (step {ckpt.step})", "",
             f"{len(s.layers)} linear layers x {len(s.candidates)} formats, base loss {s.base_loss:.4f} nats "
             f"(fp32) over {args.calibration_windows} calibration windows of {args.seq} tokens. Cells: predicted "
             "perplexity change in % of lowering that layer alone (exact one-layer measurement in brackets).", ""]
    lines += _search_section(s, result, args)
    header = ["layer", "params", "chosen"] + s.names
    rows = []
    for i, layer in enumerate(s.layers):
        cells = [_pct(s.estimate[i, c]) + (f" [{_pct(s.exact[(layer.path, n)])}]"
                 if (layer.path, n) in s.exact else "") for c, n in enumerate(s.names)]
        rows.append([layer.path, f"{layer.weight_elements:,}", result.assignment[layer.path]] + cells)
    lines += ["## Per layer and format", ""] + _table(header, rows) + [""]
    lines += _stats_section(s) + _smoothing_section(s, args)
    return "\n".join(lines) + "\n"


def _search_section(s, result, args) -> list[str]:
    rho = s.spearman()
    per = ", ".join(f"{n} {r:.2f}" for n in s.names if (r := s.spearman(n)) is not None)
    check = (f"Estimate vs exact one-layer measurement: Spearman {rho:.3f} over {len(s.exact)} pairs"
             + (f" (per format: {per})." if per else ".")) if rho is not None else "No exact check (--exact 0)."
    lines = ["## Policy", "",
             f"Objective {args.objective}, candidates {args.search}, budget {args.budget}% perplexity. {check}",
             "", f"Weight bytes of the linear layers: {result.weight_bytes:,.0f} of {result.base_weight_bytes:,.0f} "
             f"in fp32; FP8 share of weight elements {result.fp8_weight_fraction:.1%}.", ""]
    lines += [f"Policies measured on the held-out windows: {result.measurements} (at most "
              f"{result.max_measurements}) over an order of {result.moves} moves; the chosen one is the cheapest "
              f"measured within the budget by {args.confidence:g} standard errors (± one standard error of the "
              "paired per-window increases).", ""]
    rounds = [[str(i + 1), r.step, str(r.moves), _pct(r.predicted_nats), _measured_cell(r),
               f"{r.fp8_weight_fraction:.1%}", f"{r.seconds:.1f}"] for i, r in enumerate(result.rounds)]
    lines += _table(["round", "step", "moves", "predicted %", "measured % (held-out)", "FP8 share", "seconds"],
                    rounds) + [""]
    lines += ["Rules:", "", "```yaml", yaml.safe_dump(mpx.policy.to_dict(result.policy), sort_keys=False).strip(),
              "```", ""]
    return lines


def _measured_cell(r) -> str:
    if r.measured_nats is None:
        return "-"
    return _pct(r.measured_nats) + ("" if r.measured_se_nats is None else f" ± {r.measured_se_pct:.3f}")


def _stats_section(s) -> list[str]:
    names = ["amax", "kurtosis", "outliers >6σ", "saturated (unscaled e4m3)", "flushed (per-tensor e4m3)"]
    header = ["layer"] + [f"W {n}" for n in names] + [f"X {n}" for n in names]
    rows = [[p] + _stat_cells(s.weight_stats[p]) + _stat_cells(s.activation_stats[p]) for p in s.paths]
    return ["## Weights (W) and input activations (X)", ""] + _table(header, rows) + [""]


def _smoothing_section(s, args) -> list[str]:
    if s.smoothed is None:
        return []
    cols = [c for c, cand in enumerate(s.candidates) if sens_lib.smoothable(cand)]
    header = ["layer"] + [f"{s.names[c]} plain -> smoothed" for c in cols] + ["helped"]
    rows = []
    for i, p in enumerate(s.paths):
        helped = [s.smoothed[i, c] < s.estimate[i, c] for c in cols]
        cells = [f"{_pct(s.estimate[i, c])} -> {_pct(s.smoothed[i, c])}" for c in cols]
        rows.append([p] + cells + [f"{sum(helped)}/{len(cols)} formats"])
    return [f"## SmoothQuant smoothing (alpha {args.smooth_alpha}) of FP8 activations", "",
            "Predicted change with the per-channel smoothing folded into the weights; 'helped' counts the formats "
            "whose prediction it lowered.", ""] + _table(header, rows) + [""]


def plot(s: sens_lib.Sensitivity, result, path: Path) -> None:
    """sensitivity.png: log10 of the predicted % perplexity change, layers x formats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pct = 100 * np.expm1(np.maximum(s.estimate, s.second_order))
    values = np.log10(np.maximum(pct, 1e-6))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 0.9 * len(s.names)), max(4.0, 0.16 * len(s.layers) + 1.5)))
    image = ax.imshow(values, aspect="auto", cmap="magma_r", vmin=max(values.min(), -6))
    ax.set_xticks(range(len(s.names)), s.names, rotation=45, ha="right")
    ax.set_yticks(range(len(s.layers)), s.paths, fontsize=max(3, min(8, 600 // max(len(s.layers), 1))))
    for i, p in enumerate(s.paths):
        if result.assignment[p] in s.names:
            ax.plot(s.column(result.assignment[p]), i, "o", color="cyan", markersize=4)
    ax.set_title("predicted perplexity change per layer\n(log10 %); o = chosen")
    fig.colorbar(image, ax=ax, label="log10(% perplexity change)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def _budget(text: str) -> float:
    """A perplexity budget in percent (an argparse `type`): a finite number >= 0."""
    value = cli.non_negative_float(text)
    auto_lib.budget_nats(value)
    return value


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (a bad flag: one line naming it, exit status 2)."""
    p = cli.ArgumentParser(prog="python -m serve.sensitivity", description=__doc__.splitlines()[0])
    flags.checkpoint(p, required=True, skip_incomplete=False)
    p.add_argument("--data", required=True, type=cli.non_empty,
                   help="text (.txt/.jsonl file, glob or directory) to calibrate on")
    p.add_argument("--budget", type=_budget, required=True, help="perplexity change budget in percent (>= 0)")
    p.add_argument("--out", required=True, type=cli.non_empty, help="output directory")
    p.add_argument("--objective", default="bytes",
                   type=cli.accepted_by(lambda v: config_lib.check_choice("objective", v, mpx.policy.OBJECTIVES)),
                   help="bytes (weight bytes) or fp8-flops (FP8 matmul share)")
    p.add_argument("--candidates", type=cli.accepted_by(sens_lib.get_candidates),
                   help=f"comma-separated formats (default all: {','.join(sens_lib.CANDIDATES)})")
    p.add_argument("--search", default="native",
                   help="candidates the policy may use: native (bf16, E4M3, E5M2: what hardware runs as is), "
                        "all (simulated formats too) or a comma-separated list")
    p.add_argument("--calibration-windows", type=cli.positive_int, default=8,
                   help="windows the analysis observes (default 8)")
    p.add_argument("--heldout-windows", type=cli.positive_int, default=8,
                   help="held-out windows each measured policy is scored on (default 8)")
    p.add_argument("--seq", type=cli.positive_int,
                   help=f"tokens per window (at most the model's max_seq_len; default {DEFAULT_SEQ}, or "
                        "max_seq_len where that is shorter)")
    p.add_argument("--rows", type=cli.positive_int, default=4, help="windows per batch")
    p.add_argument("--exact", type=cli.non_negative_int, default=12,
                   help="(layer, format) pairs measured exactly to check the estimate (0: none)")
    p.add_argument("--smooth-alpha", type=_smooth_alpha, default=0.5, help="SmoothQuant alpha in [0, 1] (0: none)")
    p.add_argument("--confidence", type=cli.non_negative_float, default=1.0,
                   help="standard errors of the held-out measurement a policy's loss increase must stay under "
                        "the budget by (default 1; 0 trusts the mean)")
    p.add_argument("--max-measurements", type=cli.positive_int,
                   help="most policies measured on the held-out windows (default ceil(log2(moves + 1)) + 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    try:  # before the analysis runs: the names it will be searched for must be analysed
        mpx.policy.search_candidates(sens_lib.get_candidates(args.candidates), args.search)
    except ValueError as err:
        p.error(f"argument --search: {err}")
    return args


def _smooth_alpha(text: str) -> float:
    """A SmoothQuant alpha (an argparse `type`): a number in [0, 1]."""
    value = cli.non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1]; got {text!r}")
    return value


def inputs(args) -> tuple[q.Checkpoint, list, list]:
    """(checkpoint, calibration batches, held-out batches) of parsed `args`; `args.seq`
    resolved (default DEFAULT_SEQ, or the model's max_seq_len where that is shorter).

    Raises:
      ServeError, ValueError: a bad checkpoint, data file or window size.
    """
    ckpt = sources.load_checkpoint(args.checkpoint)
    args.seq = args.seq or min(DEFAULT_SEQ, ckpt.config.max_seq_len)
    if args.seq > ckpt.config.max_seq_len:
        raise ValueError(f"--seq {args.seq} exceeds the model's max_seq_len {ckpt.config.max_seq_len}")
    return (ckpt, *windows(ckpt, args.data, args.seq, args.calibration_windows, args.heldout_windows, args.rows))


def run(args) -> tuple[sens_lib.Sensitivity, mpx.policy.SearchResult, q.Checkpoint, float]:
    """Loads, analyses and searches (see the module doc); returns the results and seconds."""
    t0 = time.perf_counter()
    ckpt, calib, heldout = inputs(args)
    model = transformer.Transformer(ckpt.config, mpx.policy.preset("fp32"))
    # float32 masters of the model's shape (a block-FP8 checkpoint's kernels dequantized)
    variables = {"params": q.quantize_params(ckpt.params, ckpt.config, q.ServeSpec("fp32"))}
    progress = Progress(not args.json or sys.stderr.isatty())
    s = sens_lib.analyze(lambda v, b: model.apply(v, b)[0], variables, calib, candidates=args.candidates,
                         exact_pairs=args.exact, smooth_alpha=args.smooth_alpha or None, progress=progress)
    loss = policy_loss(ckpt.config, variables, heldout)
    base = loss(mpx.policy.preset("fp32"))
    rounds = [0]

    def measure(policy):
        rounds[0] += 1
        progress("measure", rounds[0], rounds[0])
        return paired_change(loss(policy), base)

    result = mpx.policy.search(s, args.budget, args.objective, measure=measure, candidates=args.search,
                               max_measurements=args.max_measurements, confidence=args.confidence,
                               name="sensitivity")
    return s, result, ckpt, time.perf_counter() - t0


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes (getrusage; Linux counts KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        s, result, ckpt, seconds = run(args)
    except (q.ServeError, ValueError) as err:
        return cli.fail(err)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy.yaml").write_text(yaml.safe_dump(mpx.policy.to_dict(result.policy), sort_keys=False))
    (out / "sensitivity.md").write_text(to_markdown(s, result, args, ckpt))
    plot(s, result, out / "sensitivity.png")
    print(f"wrote {out / 'sensitivity.md'}, {out / 'sensitivity.png'} and {out / 'policy.yaml'}")
    peak = peak_rss_bytes()
    print(f"predicted {result.predicted_ppl_change_pct:+.3f}%, measured {result.measured_ppl_change_pct:+.3f}% "
          f"(budget {args.budget}%), FP8 weight share {result.fp8_weight_fraction:.1%}, {result.measurements} "
          f"policies measured, {seconds:.0f} s, peak RSS {peak / 2**20:,.0f} MiB")
    if args.json:
        print(json.dumps({"policy": str(out / "policy.yaml"), "budget_pct": args.budget,
                          "predicted_ppl_change_pct": result.predicted_ppl_change_pct,
                          "measured_ppl_change_pct": result.measured_ppl_change_pct,
                          "fp8_weight_fraction": result.fp8_weight_fraction, "weight_bytes": result.weight_bytes,
                          "seconds": seconds, "measure_seconds": sum(r.seconds for r in result.rounds),
                          "peak_rss_bytes": peak, "moves": result.moves, "measurements": result.measurements,
                          "max_measurements": result.max_measurements,
                          "rounds": [r.to_dict() for r in result.rounds]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
