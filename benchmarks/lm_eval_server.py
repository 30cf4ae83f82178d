"""lm-evaluation-harness against `serve.server`: accuracy per precision, and proof that
the harness scores what the model computes.

    python -m benchmarks.lm_eval_server --checkpoint MODEL.gguf --lm-eval /path/to/venv/bin/lm_eval \\
        --variants fp32,bf16,fp8 --policy searched.yaml --save benchmarks/results/lm_eval_server.txt
    python -m benchmarks.lm_eval_server --checkpoint runs/tiny --docs 20        # a quick look

lm-eval is a benchmark tool, never a dependency of mpx: install it wherever you like
(`pip install lm-eval` brings PyTorch) and pass its `lm_eval` executable. Nothing is
downloaded: the two tasks are generated from mpx's built-in corpus into `--work`:

* `mpx_cloze` (multiple choice, a loglikelihood task): a sentence from the corpus, its
  last word hidden; the choices are that word and three other words of the corpus
  (metric `acc`);
* `mpx_copy` (generate_until): three examples of "word: X / again: X", then a new
  word; the answer must repeat it (metric `exact_match`).

Per variant (fp32, bf16, fp8 weights, and `--policy FILE` if given) the script starts
`python -m serve.server --port 0 --kv-cache fp32` and runs `lm_eval --model
local-completions` against it with the server's own tokenizer (`tokenizer_backend=remote`:
/tokenize, /tokenizer_info), batches of 8 prompts per request, `echo` + `logprobs` +
`max_tokens` scoring as the harness sends them. Beside the harness's accuracy it
computes the cloze accuracy from the same variant's log-probabilities in this process
(`serve.evaluate.token_logprobs` over the same token ids: the context and each choice
encoded as the harness encodes them), and counts the documents where the two pick
different choices ("ties aside": the KV cache is fp32 so that only float32 rounding
separates the server's chunked prefill from one forward pass). The change column is
each variant's accuracy minus fp32's: the seed's accuracy decay.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import time
from pathlib import Path

import numpy as np

import benchmarks
from benchmarks import serve_load
from serve import evaluate
from serve import flags
from serve import quantize as q
from serve import sources

CORPUS = Path(__file__).resolve().parents[1] / "store" / "builtin_corpus.jsonl.gz"
CHOICES = 4
COPY_SHOTS = 3
SENTENCE = re.compile(r"[A-Z][^.!?\n]{30,160}\b([a-z]{4,12})\.")


def _corpus() -> list[str]:
    with gzip.open(CORPUS, "rt") as f:
        return [json.loads(line)["text"] for line in f]


def cloze_docs(count: int, seed: int = 0) -> list[dict]:
    """`count` cloze documents {"context", "choices", "label"} from the built-in corpus
    (sentences ending in a lower-case word; distractors: other such words)."""
    found = [(m.group(0)[:m.start(1) - m.start(0)].rstrip(), m.group(1))
             for text in _corpus() for m in SENTENCE.finditer(text.replace("\n", " "))]
    rng = random.Random(seed)
    rng.shuffle(found)
    words = sorted({w for _, w in found})
    docs = []
    for context, answer in found[:count]:
        choices = [answer] + rng.sample([w for w in words if w != answer], CHOICES - 1)
        rng.shuffle(choices)
        docs.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return docs


def copy_docs(count: int, seed: int = 1) -> list[dict]:
    """`count` copy documents {"prompt", "answer"}: few-shot "word: X / again: X"."""
    rng = random.Random(seed)
    words = sorted({w for text in _corpus() for w in re.findall(r"\b[a-z]{5,10}\b", text)})
    docs = []
    for _ in range(count):
        shots = rng.sample(words, COPY_SHOTS + 1)
        lines = [f"word: {w}\nagain: {w}" for w in shots[:-1]]
        docs.append({"prompt": "\n".join(lines + [f"word: {shots[-1]}\nagain:"]), "answer": shots[-1]})
    return docs


TASKS = {
    "mpx_cloze": """task: mpx_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
""",
    "mpx_copy": """task: mpx_copy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: [" "]
""",
}


def write_tasks(work: Path, docs: int) -> dict[str, list[dict]]:
    """Writes both tasks' data and YAML under `work`; returns {task: docs}."""
    work.mkdir(parents=True, exist_ok=True)
    data = {"mpx_cloze": cloze_docs(docs), "mpx_copy": copy_docs(docs)}
    for task, rows in data.items():
        path = work / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (work / f"{task}.yaml").write_text(TASKS[task].format(data=path.resolve()))
    return data


# --------------------------------------------------------------------------- the model's own answer


def _pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's `_encode_pair`: trailing spaces move to the continuation; the whole
    text is encoded and split at the context's length."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return whole[:len(head)], whole[len(head):]


def own_scores(model, variables, tokenizer, docs: list[dict], batch: int = 8) -> list[list[float]]:
    """Per cloze document and choice, the choice's summed log-probability after the
    context under the model (fp32 KV cache). Sequences are right-padded to one length
    (a causal model's scores do not see what follows) and scored `batch` at a time."""
    pairs = [_pair(tokenizer, d["context"], " " + c) for d in docs for c in d["choices"]]
    length = max(len(a) + len(b) for a, b in pairs)
    rows = np.zeros((-(-len(pairs) // batch) * batch, length), np.int32)
    for row, (context, continuation) in zip(rows, pairs):
        row[:len(context) + len(continuation)] = context + continuation
    logprobs = np.concatenate([evaluate.token_logprobs(model, variables, rows[i:i + batch])
                               for i in range(0, len(rows), batch)])
    sums = [float(lp[len(a) - 1:len(a) + len(b) - 1].sum()) for lp, (a, b) in zip(logprobs, pairs)]
    return [sums[i:i + CHOICES] for i in range(0, len(sums), CHOICES)]


# --------------------------------------------------------------------------- the harness


def run_harness(lm_eval: str, url: str, work: Path, out: Path, max_length: int) -> dict:
    """Runs lm_eval's local-completions on both tasks; returns its results JSON."""
    args = ",".join([f"base_url={url}/v1/completions", "tokenizer_backend=remote",
                     "num_concurrent=2", f"max_length={max_length}", "max_retries=1", "timeout=600"])
    cmd = [lm_eval, "--model", "local-completions", "--model_args", args, "--tasks", "mpx_cloze,mpx_copy",
           "--include_path", str(work), "--output_path", str(out), "--log_samples", "--batch_size", "8"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"lm_eval failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    (result,) = sorted(out.rglob("results_*.json"))[-1:]
    samples = sorted(out.rglob("samples_mpx_cloze_*.jsonl"))[-1]
    scores = {}
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        scores[sample["doc_id"]] = [float(r[0]) for r in sample["filtered_resps"]]  # (loglikelihood, greedy)
    return {"results": json.loads(result.read_text())["results"], "scores": [scores[i] for i in sorted(scores)]}


def measure(name: str, checkpoint: str, server_args: list[str], spec: q.ServeSpec, args, work: Path,
            docs: list[dict]) -> dict:
    """One variant: the harness through the server, and the model's own cloze choices."""
    started = time.perf_counter()
    proc, url = serve_load.start_server(checkpoint, None, 8, server_args + ["--kv-cache", "fp32",
                                                                              "--max-seq-len", str(args.max_length)])
    try:
        harness = run_harness(args.lm_eval, url, work, work / f"out-{name}", args.max_length)
    finally:
        serve_load.stop_server(proc)
    model, variables, tokenizer, _ = sources.load_for_serving(checkpoint, spec)
    own, served = np.asarray(own_scores(model, variables, tokenizer, docs)), np.asarray(harness["scores"])
    labels = np.asarray([d["label"] for d in docs])
    res = harness["results"]
    return {"name": name, "acc": res["mpx_cloze"]["acc,none"], "own_acc": float(np.mean(own.argmax(1) == labels)),
            "differ": int(np.sum(own.argmax(1) != served.argmax(1))), "max_diff": float(np.abs(own - served).max()),
            "copy": res["mpx_copy"]["exact_match,none"], "seconds": time.perf_counter() - started}


def table(rows: list[dict], args, docs: int) -> str:
    base = rows[0]
    lines = [f"lm-evaluation-harness (local-completions) against serve.server: {args.checkpoint}, "
             f"{docs} documents per task, fp32 KV cache",
             f"{'variant':<22}{'cloze acc':>10}{'own acc':>9}{'differ':>8}{'max |dll|':>11}{'change':>9}"
             f"{'copy EM':>9}{'change':>9}{'s':>7}"]
    for r in rows:
        lines.append(f"{r['name']:<22}{r['acc']:>10.3f}{r['own_acc']:>9.3f}{r['differ']:>8d}{r['max_diff']:>11.2e}"
                     f"{r['acc'] - base['acc']:>+9.3f}{r['copy']:>9.3f}{r['copy'] - base['copy']:>+9.3f}"
                     f"{r['seconds']:>7.0f}")
    lines.append("(acc: the harness's, through the server; own acc: from the variant's log-probabilities in "
                 "this process; differ: documents where they pick different choices; max |dll|: the largest "
                 "difference between a choice's log-likelihood there and here; change: vs fp32)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = benchmarks.parser("lm_eval_server", __doc__)
    flags.checkpoint(parser, required=True, skip_incomplete=False)
    parser.add_argument("--lm-eval", default="lm_eval", help="the lm_eval executable (from lm-eval's venv)")
    parser.add_argument("--variants", default="fp32,bf16,fp8", help="weight precisions, comma-separated")
    flags.policy(parser, "also this policy (serve.sensitivity's output), as the variant 'policy'")
    parser.add_argument("--docs", type=int, default=100, help="documents per task")
    parser.add_argument("--max-length", type=int, default=256, help="context the harness may fill")
    parser.add_argument("--work", default="/tmp/mpx-lm-eval", help="where the tasks and lm_eval's outputs go")
    args = parser.parse_args(argv)
    work = Path(args.work)
    data = write_tasks(work, args.docs)
    variants = [(p, ["--precision", p], q.ServeSpec(p)) for p in args.variants.split(",")]
    if args.policy:
        variants.append((f"policy {Path(args.policy).stem}", ["--policy", args.policy], q.policy_spec(args.policy)))
    rows = []
    for name, server_args, spec in variants:
        rows.append(measure(name, args.checkpoint, server_args, spec, args, work, data["mpx_cloze"]))
        print(rows[-1], flush=True)
    return benchmarks.report(args, table(rows, args, args.docs), {"rows": rows})


if __name__ == "__main__":
    main()
