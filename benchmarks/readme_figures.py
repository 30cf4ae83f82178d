"""`python -m benchmarks.readme_figures`: every figure the README quotes, regenerated.

1. The quickstart's run: `python -m train.run --config configs/tiny.yaml` into `--run`
   (default runs/tiny), trained here when it holds no checkpoint yet.
2. `python -m serve.evaluate --checkpoint RUN/checkpoints` with its defaults (every
   variant, 4 held-out batches): the README's precision table (weight memory and
   perplexity change vs fp32 of bf16, fp8, fp8 weight-only, fp8 + fp8 KV cache), the fp32
   perplexity and the static calibration methods ranked by perplexity change. `--report
   FILE` also writes serve.evaluate's full Markdown report there
   (benchmarks/results/precision_report.md).
3. The README's `python -m models.plan` command (DeepSeek-V3 on 2048 devices), with and
   without `--remat full`.

Prints them as the README writes them, so the README can be updated by copying; `--json`
adds one JSON object as the last line. Takes minutes on CPU (the training and the
evaluation of 11 variants).
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import benchmarks
from models import plan as plan_lib
from serve import evaluate
from serve import sources
from store import checkpoint as ckpt_lib
from train import run as train_run

PLAN_ARGS = ["--model", "deepseek_v3_671b", "--mesh", "data=8,fsdp=32,tensor=8", "--policy", "fp8",
             "--batch", "256", "--seq", "4096"]
# README table rows: (README's name, serve.evaluate's label).
TABLE = (("bf16", "bf16"), ("fp8 (128x128 weight blocks, 1x128 activation tiles)", "fp8 (block w, token act)"),
         ("fp8 weight-only (bf16 activations)", "fp8 (block w, none act)"),
         ("fp8 + fp8 KV cache", "fp8 (block w, token act) + fp8 KV"))


def quickstart(run_dir: Path) -> Path:
    """The checkpoints of the quickstart's run in `run_dir`, trained first if there are none."""
    checkpoints = run_dir / "checkpoints"
    if not ckpt_lib.all_steps(checkpoints):
        code = train_run.main(["--config", "configs/tiny.yaml", "--quiet", "--set", f"run_dir={run_dir}"])
        if code != 0:
            raise SystemExit(code)
    return checkpoints


def precision(checkpoints: Path, report: str | None) -> dict:
    """serve.evaluate's default measurement of `checkpoints`: {label: row}, fp32 ppl, calibration."""
    args = evaluate.parse_args(["--checkpoint", str(checkpoints)])
    ckpt = sources.load_checkpoint(checkpoints)
    data = evaluate.held_out(ckpt, args.eval_batches, args.prompts, args.prompt_len, args.new_tokens)
    rows, extra = evaluate.evaluate(ckpt, evaluate.default_variants(evaluate._methods(args.methods)), data,
                                    args.calibration_batches, log=lambda s: print(s, file=sys.stderr))
    if report:
        Path(report).write_text(evaluate.to_markdown(rows, extra, ckpt, data))
    static = sorted((r for r in rows if r["calibration"]), key=lambda r: r["ppl_change"])
    return {"step": ckpt.step, "tokens": sum(t.size for t in data.targets), "fp32_ppl": rows[0]["ppl"],
            "rows": {r["label"]: {"memory": r["memory"], "ppl_change": r["ppl_change"]} for r in rows},
            "calibration": [(r["calibration"], r["ppl_change"]) for r in static]}


def plan_text(*extra: str) -> str:
    """What `python -m models.plan` prints for the README's command (plus `extra`)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = plan_lib.main(PLAN_ARGS + list(extra))
    if code:
        raise SystemExit(code)
    return out.getvalue()


def format_figures(result: dict) -> str:
    p = result["precision"]
    lines = [f"serve.evaluate, step {p['step']}, {p['tokens']:,} held-out tokens", "",
             "| | weight memory | perplexity change vs fp32 |", "|---|---|---|"]
    for name, label in TABLE:
        row = p["rows"][label]
        lines.append(f"| {name} | {row['memory']:.2%} | {row['ppl_change']:+.3%} |")
    ranking = ", ".join(f"{m} {c:+.3%}" for m, c in p["calibration"])
    lines += ["", f"fp32 perplexity {p['fp32_ppl']:.4f}; static calibration, best first: {ranking}", "",
              "python -m models.plan " + " ".join(PLAN_ARGS) + " --remat full", result["plan_remat"],
              "without --remat full: " + next(line for line in result["plan"].splitlines() if "activations" in line)]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = benchmarks.parser("readme_figures", __doc__)
    parser.add_argument("--run", default="runs/tiny", help="the quickstart's run directory (trained if empty)")
    parser.add_argument("--report", help="also write serve.evaluate's Markdown report to this file")
    args = parser.parse_args(argv)
    result = {"precision": precision(quickstart(Path(args.run)), args.report),
              "plan_remat": plan_text("--remat", "full"), "plan": plan_text()}
    return benchmarks.report(args, format_figures(result), result)


if __name__ == "__main__":
    main()
