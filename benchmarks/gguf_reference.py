"""fp32 perplexity of a GGUF file in mpx against transformers' own GGUF load, on the same token windows.

mpx reads the file with `serve.sources` (the `gguf` package dequantizes each tensor);
transformers reads it with `from_pretrained(dir, gguf_file=name)` in a Python of its own
(`--transformers`, a venv with torch, transformers, accelerate and gguf: a benchmark
extra, never a dependency). Both score the same token ids: mpx's windows of the text
(`serve.evaluate --data`'s `text_windows`), handed over as a .npy file, so only the
models differ.

    python -m benchmarks.gguf_reference --checkpoint gemma-3-270m-q4_k_m.gguf \\
        --transformers /path/to/venv/bin/python          # text: the built-in corpus
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import benchmarks
from serve import evaluate_text
from store import corpus

# Run by --transformers: argv = gguf path, windows .npy; prints one JSON line.
REFERENCE = """
import json, math, os, sys, numpy as np, torch
from transformers import AutoModelForCausalLM
path, windows = sys.argv[1], np.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path),
                                             dtype=torch.float32).eval()
nll, count = 0.0, 0
with torch.no_grad():
    for row in windows:
        ids, targets = torch.tensor(row[None, :-1]), torch.tensor(row[None, 1:])
        logp = torch.log_softmax(model(ids).logits.float(), -1).gather(-1, targets[..., None])[..., 0]
        nll, count = nll - logp.sum().item(), count + targets.numel()
print(json.dumps({"ppl": math.exp(nll / count), "tokens": count}))
"""


def builtin_text(path: Path, chars: int = 120_000) -> str:
    """The first `chars` characters of the built-in corpus's documents, joined, written to `path`."""
    path.write_text("\n\n".join(corpus.builtin_corpus())[:chars])
    return str(path)


def run(checkpoint: str, data: str | None, python: str, seq_len: int, windows: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = data or builtin_text(Path(tmp) / "builtin.txt")
        ckpt, named, cut = evaluate_text.inputs(checkpoint, data, seq_len=seq_len, windows=windows, variants="fp32")
        ours = evaluate_text.evaluate_text(ckpt, named, cut, log=lambda _: None)[0]["ppl"]
        np.save(Path(tmp) / "windows.npy", cut)
        out = subprocess.run([python, "-c", REFERENCE, checkpoint, str(Path(tmp) / "windows.npy")],
                             capture_output=True, text=True, check=True).stdout
    theirs = json.loads(out.strip().splitlines()[-1])["ppl"]
    return {"checkpoint": checkpoint, "windows": int(cut.shape[0]), "seq_len": int(cut.shape[1] - 1),
            "mpx_ppl": ours, "transformers_ppl": theirs, "change_pct": 100.0 * (ours / theirs - 1.0),
            "mean_nll_gap": math.log(ours) - math.log(theirs)}


def table(r: dict) -> str:
    return "\n".join([
        f"fp32 perplexity of {Path(r['checkpoint']).name}: {r['windows']} windows of {r['seq_len']} tokens, "
        "the same token ids in both",
        f"{'mpx':>12}{'transformers':>14}{'mpx vs transformers':>21}",
        f"{r['mpx_ppl']:>12.4f}{r['transformers_ppl']:>14.4f}{r['change_pct']:>+20.3f}%"])


def main(argv=None) -> int:
    parser = benchmarks.parser("gguf_reference", __doc__)
    parser.add_argument("--checkpoint", required=True, help="a GGUF file")
    parser.add_argument("--transformers", required=True, metavar="PYTHON",
                        help="a Python with torch, transformers, accelerate and gguf")
    parser.add_argument("--data", help="a text file (default: the built-in corpus's first 120,000 characters)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args(argv)
    result = run(args.checkpoint, args.data, args.transformers, args.seq_len, args.windows)
    benchmarks.report(args, table(result), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
