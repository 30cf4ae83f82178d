"""Tests for benchmarks.lm_eval_server without lm-eval installed: the generated tasks,
the harness's encoding of a context and a choice, the model's own scores, and how the
harness is called and read (through a stand-in `lm_eval` executable)."""

import json
import stat
import sys

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from benchmarks import lm_eval_server as bench
from models import transformer
from models.config import ModelConfig
from serve import evaluate
from store import tokenizer as tokenizer_lib


def test_cloze_documents_hide_a_sentences_last_word_among_other_words():
    docs = bench.cloze_docs(30)
    assert docs == bench.cloze_docs(30)  # the same documents every run
    corpus = " ".join(t.replace("\n", " ") for t in bench._corpus())
    for doc in docs:
        answer = doc["choices"][doc["label"]]
        assert len(set(doc["choices"])) == bench.CHOICES and f"{doc['context']} {answer}." in corpus
    assert len({d["label"] for d in docs}) > 1  # the answer is not always in one place


def test_tasks_are_written_as_lm_eval_reads_them(tmp_path):
    data = bench.write_tasks(tmp_path, 5)
    cloze = yaml.safe_load((tmp_path / "mpx_cloze.yaml").read_text())
    assert cloze["output_type"] == "multiple_choice" and cloze["doc_to_text"] == "{{context}}"
    rows = [json.loads(line) for line in open(cloze["dataset_kwargs"]["data_files"]["test"])]
    assert rows == data["mpx_cloze"]
    copy = yaml.safe_load((tmp_path / "mpx_copy.yaml").read_text())
    assert copy["output_type"] == "generate_until" and copy["generation_kwargs"]["until"] == ["\n"]
    assert data["mpx_copy"][0]["prompt"].endswith("again:") and data["mpx_copy"][0]["prompt"].count("word:") == 4


def test_a_pair_is_encoded_as_the_harness_encodes_it():
    tok = tokenizer_lib.ByteTokenizer()
    assert bench._pair(tok, "It is ", "red") == (list(b"It is"), list(b" red"))  # the space moves on
    assert bench._pair(tok, "It is", " red") == (list(b"It is"), list(b" red"))


def test_own_scores_are_the_choices_log_likelihoods_whatever_the_padding():
    config = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128)
    model = transformer.Transformer(config)
    variables = jax.tree.map(lambda x: 3 * x, model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    tok = tokenizer_lib.ByteTokenizer()
    docs = bench.cloze_docs(3)
    scores = bench.own_scores(model, variables, tok, docs, batch=4)  # 12 sequences of several lengths
    for doc, row in zip(docs, scores):
        for choice, score in zip(doc["choices"], row):
            ids = list(doc["context"].encode()) + list(f" {choice}".encode())
            alone = evaluate.token_logprobs(model, variables, np.asarray([ids]))[0][len(doc["context"]) - 1:].sum()
            assert abs(score - alone) < 1e-4 * max(1.0, abs(alone))


FAKE_LM_EVAL = """import json, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--output_path") + 1]) / "model"
out.mkdir(parents=True)
(out / "argv.json").write_text(json.dumps(args))
(out / "results_1.json").write_text(json.dumps({"results": {"mpx_cloze": {"acc,none": 0.5},
                                                            "mpx_copy": {"exact_match,none": 0.25}}}))
samples = [{"doc_id": 1, "filtered_resps": [["-2.5", "False"], ["-0.5", "True"]]},
           {"doc_id": 0, "filtered_resps": [["-1.0", "True"], ["-3.0", "False"]]}]
(out / "samples_mpx_cloze_1.jsonl").write_text("".join(json.dumps(s) + "\\n" for s in samples))
"""


def test_the_harness_is_called_with_the_servers_tokenizer_and_read_back(tmp_path):
    script = tmp_path / "lm_eval"
    script.write_text(f"#!{sys.executable}\n{FAKE_LM_EVAL}")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    got = bench.run_harness(str(script), "http://127.0.0.1:9", tmp_path, tmp_path / "out", 256)
    assert got["results"]["mpx_cloze"]["acc,none"] == 0.5
    assert got["scores"] == [[-1.0, -3.0], [-2.5, -0.5]]  # by document, as floats
    argv = json.loads((tmp_path / "out" / "model" / "argv.json").read_text())
    model_args = argv[argv.index("--model_args") + 1]
    assert argv[argv.index("--model") + 1] == "local-completions"
    assert "base_url=http://127.0.0.1:9/v1/completions" in model_args and "tokenizer_backend=remote" in model_args
