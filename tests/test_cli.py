"""Every entry point, fed bad input: exit status 2, one line on stderr, no traceback, nothing written.

The table `CASES` holds one line per case: the program (a module run as
`python -m <module>`), its arguments and a fragment the one-line message must contain.
Arguments may name files the `workspace` fixture makes (`{empty}`, `{binary}`, ...).
Programs run in-process (fast: no interpreter or JAX start-up per case) with the
working directory in a fresh temporary folder, which must be unchanged afterwards; a
few cases that depend on the interpreter's start-up run as real subprocesses.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
PLAN = "models.plan"


def _train(*sets: str) -> list[str]:
    return ["--config", TINY, "--quiet", *sum((["--set", s] for s in sets), [])]


def _gen(*extra: str) -> list[str]:
    return ["--checkpoint", "{complete}", "--prompt", "hi", *extra]


CASES = [
    # module, argv, fragment of the message
    ("train.run", ["--config", "nope.yaml"], "nope.yaml"),
    ("train.run", ["--set", "steps=1"], "--config"),
    ("train.run", _train("optimizer.learning_rate=.inf"), "learning_rate must be a finite number > 0"),
    ("train.run", _train("optimizer.learning_rate=nan"), "learning_rate must be a finite number > 0; got nan"),
    ("train.run", _train("optimizer.learning_rate=0"), "learning_rate must be"),
    ("train.run", _train("optimizer.eps=-inf"), "eps must be"),
    ("train.run", _train("optimizer.clip_norm=.inf"), "clip_norm must be"),
    ("train.run", _train("steps=-4"), "steps must be >= 1"),
    ("train.run", _train("optimizer.learning_rat=1"), "did you mean 'learning_rate'"),
    ("train.run", _train("data.source={empty}"), "holds no text"),
    ("train.run", _train("data.source={blank}"), "holds no text"),
    ("train.run", _train("data.source={binary}"), "not UTF-8 text"),
    ("train.run", _train("data.source={no_text}"), 'string "text" field'),
    ("train.run", _train("data.source={bad_json}"), "invalid JSON"),
    ("train.run", _train("data.source={tiny_text}"), "corpus too small"),
    ("train.run", _train("data.source=missing.txt"), "not found"),
    ("train.run", _train("data.source=nothing/*.txt"), "matches no files"),
    ("train.run", _train("run_dir={holds_run}"), "already holds a run (checkpoints up to step 300"),
    ("train.run", _train() + ["--skip-incomplete"], "--skip-incomplete applies only with --resume"),
    ("train.run", _train() + ["--num-processes", "0"], "argument --num-processes"),
    ("train.run", _train("precision.policy_file=nosuch.yaml"), "precision.policy_file 'nosuch.yaml': no such file"),
    ("train.run", _train("precision.policy_file={broken_policy}"), "broken_policy.yaml: invalid YAML"),
    ("train.run", _train("precision.policy_file={unknown_key_policy}"), "unknown key 'rulez'"),
    ("serve.generate", ["--checkpoint", "{corrupt}", "--prompt", "hi"], "--skip-incomplete to use step 1"),
    ("train.run", _train("model.d_model=-128"), "d_model must be an integer >= 1; got -128"),
    ("train.run", ["--config", "{bad_model_train}", "--quiet"], "d_model must be an integer >= 1; got -128"),
    ("train.run", _train("model.n_kv_heads=3"), "n_heads=4 must be divisible by n_kv_heads=3"),
    ("train.run", _train("model.d_model=100"), "head_dim = d_model // n_heads = 25 must be even"),
    ("train.run", _train("model.n_layers=0"), "n_layers must be an integer >= 1; got 0"),
    ("train.run", _train("model.d_ff=true"), "model.d_ff: expected int, got True"),
    ("train.run", _train("model.rope_theta=-1"), "rope_theta must be a finite number > 0; got -1.0"),
    ("train.run", _train("model.norm_eps=nan"), "norm_eps must be a finite number > 0; got nan"),
    ("train.run", _train("model.sliding_window=0"), "sliding_window must be an integer >= 1, or null; got 0"),
    ("train.run", _train("model.head_dim_override=7"), "head_dim_override must be an even integer >= 2"),
    ("train.run", _train("model.n_experts=2", "model.top_k=3"), "top_k=3 must be in [1, n_experts=2]"),
    ("train.run", _train("model.rope_scaling.kind=dynamic"), "kind must be one of 'none', 'linear', 'llama3', 'yarn'"),
    ("train.run", _train("model.rope_scaling.factor=0"), "factor must be a finite number > 0; got 0.0"),
    ("train.run", _train("model.rope_scaling.original_max_len=0"), "original_max_len must be an integer >= 1"),
    ("train.run", _train("model.vocab_size=100"), "bytes tokenizer needs model.vocab_size >= 256; got 100"),
    ("train.run", _train("model.init_from={bad_hf}"), "bad_hf/config.json: hidden_size: d_model must be"),
    ("serve.generate", ["--checkpoint", "nowhere", "--prompt", "hi"], "no checkpoint at 'nowhere'"),
    ("serve.generate", ["--checkpoint", "{incomplete}", "--prompt", "hi"], "300 is incomplete"),
    ("serve.generate", ["--checkpoint", "{incomplete}/300", "--prompt", "hi"], "300 is incomplete"),
    ("serve.generate", _gen("--logit-scale", "0"), "argument --logit-scale: must be a finite number > 0"),
    ("serve.generate", _gen("--logit-scale", "-1"), "argument --logit-scale"),
    ("serve.generate", _gen("--logit-scale", "nan"), "argument --logit-scale"),
    ("serve.generate", _gen("--stop", ""), "argument --stop: must not be empty"),
    ("serve.generate", _gen("--max-tokens", "0"), "argument --max-tokens: must be an integer >= 1"),
    ("serve.generate", _gen("--temperature", "-1"), "argument --temperature"),
    ("serve.generate", _gen("--temperature", "0.8", "--top-p", "1.5"), "argument --top-p"),
    ("serve.generate", _gen("--top-k", "5"), "--top-k / --top-p sample, so they need --temperature > 0"),
    ("serve.generate", _gen("--temperature", "1", "--top-k", "5", "--top-p", "0.5"), "--top-k or --top-p"),
    ("serve.generate", _gen("--precision", "bf16", "--weights", "channel"),
     "--weights applies only to --precision fp8"),
    ("serve.generate", _gen("--calibration", "kl"), "--calibration applies only to --activations static"),
    ("serve.generate", _gen("--precision", "fp4"), "argument --precision: invalid choice: 'fp4'"),
    ("serve.generate", _gen("--config", "nope.yaml"), "nope.yaml"),
    ("serve.generate", ["--checkpoint", "{complete}"], "--prompt"),
    ("serve.generate", _gen("--config", "{bad_model_train}"), "model: d_model must be an integer >= 1; got -128"),
    ("serve.generate", ["--checkpoint", "{bad_hf}", "--prompt", "hi"],
     "bad_hf/config.json: hidden_size: d_model must be an integer >= 1; got -32"),
    ("serve.generate", ["--checkpoint", str(ROOT / "tests/fixtures/hf/llama3"), "--prompt", "hi", "--precision", "fp32",
                        "--tokenizer", "bytes"], "tokenizer 'bytes' has 256 ids but the model's vocab_size is 128"),
    ("serve.evaluate", ["--checkpoint", "nowhere"], "no checkpoint at 'nowhere'"),
    ("serve.evaluate", ["--eval-batches", "0"], "argument --eval-batches"),
    ("serve.evaluate", ["--methods", "max,entropy"], "--methods: unknown calibration method 'entropy'"),
    ("benchmarks.generate", ["--checkpoint", "nowhere"], "no checkpoint at 'nowhere'"),
    ("benchmarks.generate", ["--repeats", "3"], "unrecognized arguments: --repeats"),
    ("benchmarks.optimizer", ["--size", "3"], "unrecognized arguments: --size"),
    ("serve.server", ["--checkpoint", "nowhere"], "no checkpoint at 'nowhere'"),
    ("serve.server", ["--checkpoint", "{bad_hf}"], "bad_hf/config.json: hidden_size: d_model must be"),
    ("serve.export", ["--checkpoint", "nowhere", "--out", "exported"], "nowhere"),
    ("serve.generate", ["--checkpoint", "{truncated_gguf}", "--prompt", "hi"],
     "truncated.gguf: unreadable GGUF file (truncated or corrupt"),
    ("serve.evaluate", ["--checkpoint", "{mamba_gguf}"], "mamba.gguf: unsupported architecture 'mamba'; supported: llama"),
    ("serve.export", ["--checkpoint", "{int_gguf}", "--out", "exported"],
     "int.gguf: tensor token_embd.weight has type I32, which mpx cannot read; supported: F32"),
    ("serve.server", ["--checkpoint", "{untokenized_gguf}"],
     "untokenized.gguf: no tokenizer in the metadata (tokenizer.ggml.model missing)"),
    ("train.run", _train("model.init_from={mamba_gguf}"), "mamba.gguf: unsupported architecture 'mamba'"),
    ("serve.sensitivity", ["--checkpoint", "nowhere", "--data", "{empty}", "--budget", "1", "--out", "s"], "nowhere"),
    ("serve.sensitivity", ["--checkpoint", "{incomplete}", "--data", "{empty}", "--budget", "-1", "--out", "s"],
     "--budget"),
    ("serve.sensitivity", ["--checkpoint", "{incomplete}", "--data", "{empty}", "--budget", "1", "--out", "s",
                           "--candidates", "e9m9"], "e9m9"),
    ("serve.sensitivity", ["--checkpoint", "{incomplete}", "--data", "{empty}", "--budget", "1", "--out", "s",
                           "--seq", "0"], "--seq"),
    ("benchmarks.serve_load", ["--requests", "0"], "argument --requests"),
    ("benchmarks.gguf_reference", ["--checkpoint", "x.gguf"], "the following arguments are required: --transformers"),
    ("benchmarks.matmul", ["--rounds", "0"], "argument --rounds"),
    ("benchmarks.quantize", ["--format", "e9m9"], "argument --format: unknown format 'e9m9'"),
    ("benchmarks.scaling", ["--policy", "fp7"], "argument --policy: unknown policy preset 'fp7'"),
    ("benchmarks.scale_formats", ["--rows", "3"], "unrecognized arguments: --rows"),
    ("benchmarks.train_step", ["--batch", "0"], "argument --batch"),
    ("benchmarks.train_step", ["--presets", "fp8,fp7"], "unknown preset(s) ['fp7']"),
    ("benchmarks.train_accuracy", ["--steps", "0"], "argument --steps"),
    ("benchmarks.train_accuracy", ["--precisions", "fp8,nope.yaml"], "no policy file 'nope.yaml'"),
    ("benchmarks.hardware", ["--policy", "nosuch"], "nosuch"),
    (PLAN, ["--model", "tiny", "--batch", "-4"], "--batch"),
    (PLAN, ["--model", "tiny", "--mesh", "data=3,fsdp=2", "--devices", "6", "--batch", "7"], "--batch"),
    (PLAN, ["--model", "tiny", "--seq", "0"], "--seq"),
    (PLAN, ["--model", "nosuch"], "nosuch"),
    (PLAN, ["--model", "{bad_model}"], "ModelConfig: d_model must be an integer >= 1; got -128"),
    (PLAN, ["--model", "tiny", "--remat", "some"], "argument --remat: invalid choice: 'some'"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Bad data files and checkpoint directories the cases name, outside the workspace."""
    root = tmp_path_factory.mktemp("inputs")
    contents = {"empty": ("empty.txt", b""), "blank": ("blank.txt", b" \n\n \n"),
                "binary": ("binary.txt", bytes(range(256)) * 4),
                "no_text": ("no_text.jsonl", b'{"body": "hello"}\n'),
                "bad_json": ("bad.jsonl", b'{"text": "a"}\n{"text": \n'),
                "tiny_text": ("tiny.txt", b"too short for one batch")}
    paths = {}
    for key, (name, data) in contents.items():
        (root / name).write_bytes(data)
        paths[key] = str(root / name)
    # A checkpoint root whose newest step has no manifest (a save that died, or a
    # deleted manifest), and a run directory holding an earlier run's checkpoints.
    (root / "incomplete" / "300" / "state").mkdir(parents=True)
    (root / "holds_run" / "checkpoints" / "300" / "state").mkdir(parents=True)
    paths.update(incomplete=str(root / "incomplete"), holds_run=str(root / "holds_run"),
                 complete=str(root / "incomplete"))
    # Policy files that do not parse or name an unknown key; checkpoints whose newest step is corrupt.
    (root / "broken_policy.yaml").write_text("name: x\nrules: [\n")
    (root / "unknown_key_policy.yaml").write_text("name: x\nbase: bf16\nrulez: []\n")
    paths.update(broken_policy=str(root / "broken_policy.yaml"),
                 unknown_key_policy=str(root / "unknown_key_policy.yaml"), corrupt=_corrupt_checkpoints(root / "corrupt"))
    # Model settings out of range: a training config, a model file, a Hugging Face config.json.
    (root / "bad_model_train.yaml").write_text(f"extends: {TINY}\nmodel: {{preset: tiny, d_model: -128}}\n")
    (root / "bad_model.yaml").write_text("preset: tiny\nd_model: -128\n")
    hf_config = json.loads((ROOT / "tests/fixtures/hf/llama3/config.json").read_text())
    (root / "bad_hf").mkdir()
    (root / "bad_hf" / "config.json").write_text(json.dumps({**hf_config, "hidden_size": -32}))
    paths.update(bad_model_train=str(root / "bad_model_train.yaml"), bad_model=str(root / "bad_model.yaml"),
                 bad_hf=str(root / "bad_hf"), **_bad_ggufs(root))
    return paths


def _bad_ggufs(root: Path) -> dict[str, str]:
    """GGUF files cut short, of an unknown architecture, with an I32 weight, without tokenizer metadata."""
    import gguf
    import numpy as np
    good = (ROOT / "tests/fixtures/gguf/llama.gguf").read_bytes()
    (root / "truncated.gguf").write_bytes(good[:len(good) // 2])
    paths = {"truncated_gguf": str(root / "truncated.gguf")}
    for name, arch, dtype, tokenizer in (("mamba", "mamba", np.float32, True), ("int", "llama", np.int32, True),
                                         ("untokenized", "llama", np.float32, False)):
        writer = gguf.GGUFWriter(str(root / f"{name}.gguf"), arch)
        for add, value in ((writer.add_embedding_length, 8), (writer.add_block_count, 1), (writer.add_head_count, 2),
                           (writer.add_feed_forward_length, 16)):
            add(value)
        if tokenizer:
            writer.add_tokenizer_model("gpt2")
            writer.add_token_list([chr(65 + i) for i in range(16)])
        writer.add_tensor("token_embd.weight", np.ones((16, 8), dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths[f"{name}_gguf"] = str(root / f"{name}.gguf")
    return paths


def _corrupt_checkpoints(directory: Path) -> str:
    """Steps 1 and 2 of a one-array state, step 2's data changed after its manifest was written."""
    import numpy as np
    from store import checkpoint as ckpt
    for step in (1, 2):
        ckpt.save(directory, step, {"w": np.arange(4, dtype=np.float32)})
    data = max((p for p in (directory / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:-1] + b"\x00")
    return str(directory)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _call(module: str, argv: list[str]) -> int:
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as exit_:  # argparse rejects a command line by exiting
        code = exit_.code
    return 0 if code is None else code


@pytest.mark.parametrize("module, argv, fragment", CASES)
def test_bad_input_is_one_line_and_exit_status_2(module, argv, fragment, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(**files) for a in argv]
    code = _call(module, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert fragment in lines[0], err
    assert _listing(tmp_path) == [], "a rejected command wrote files"


def _program(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m argv` as a real process in `cwd` (never the repository: runs/ there may hold anything)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_a_real_program_run_reports_bad_data_in_one_line(files, tmp_path):
    result = _program("train.run", *_train(f"data.source={files['binary']}"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "not UTF-8 text" in result.stderr
    assert _listing(tmp_path) == []


def test_hardware_report_runs_without_warnings(tmp_path):
    result = _program("benchmarks.hardware", cwd=tmp_path)
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr


@pytest.mark.parametrize("module", ["train.run", "serve.generate", "serve.evaluate", "serve.server",
                                    "serve.export", "serve.sensitivity", "benchmarks.generate",
                                    "benchmarks.optimizer", "benchmarks.serve_load", "benchmarks.decode_bandwidth",
                                    "benchmarks.gguf_reference", "benchmarks.h100_compile", "benchmarks.gpu", "benchmarks.hardware"])
def test_help_names_the_real_invocation(module, capsys):
    assert _call(module, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module} ")
    description = out.split("\n\n")[1]
    assert description.count("`") % 2 == 0, description  # no unclosed backtick
