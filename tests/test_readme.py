"""The README's examples run as written, in the order written (they are what users copy).

The Python snippets of the tour run as they are. The shell examples run in a fresh
folder, in order, against a miniature of `configs/tiny.yaml` (same file names, so the
same run directories; a smaller model and batch so that each run takes seconds): a
later example finds exactly what the earlier ones left, as a reader's would.
`serve.evaluate` is only parsed and pointed at its checkpoint here (its full report
takes minutes; tests/test_serve.py runs it on two variants). Examples
that need several processes or hosts are checked without running (their run
directories must not collide with the others'); tests/test_distributed.py runs them.
"""

from __future__ import annotations

import codecs
import re
import shlex
import shutil
from pathlib import Path

import pytest

from serve import evaluate as serve_evaluate
from serve import generate as serve_generate
from serve import quantize
from train import config as config_lib
from train import run as train_run

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROGRAMS = {"train.run": train_run.main, "serve.generate": serve_generate.main,
            "serve.evaluate": serve_evaluate.main}
PLACEHOLDERS = {"N": "2", "i": "0"}
MULTI_PROCESS = {"--coordinator", "--distributed"}  # checked, not run: they need other processes
# A miniature of configs/tiny.yaml: the README's commands unchanged, seconds per run.
MINIATURE = """extends: {tiny}
model: {{preset: tiny, d_model: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, d_ff: 64}}
data: {{seq_len: 32, batch_size: 4}}
steps: 4
eval_every: 2
eval_batches: 1
checkpoint: {{every: 0}}
"""


def test_readme_tour_snippets_run():
    # The tour needs nothing but the package; later sections need a trained checkpoint.
    tour = README.read_text().split("## A short tour", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", tour, flags=re.S)
    assert blocks, "README has no python snippets"
    namespace: dict = {}
    for block in blocks:  # later snippets build on earlier ones, as a reader's session would
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102


def test_readme_names_the_ci_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r'^(pip install -e "\.\[test\]" && python -m pytest.*)$', ci, flags=re.M).group(1)
    assert command in README.read_text()


def shell_commands() -> list[str]:
    """Every command line of the README's bash blocks, continuations joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _words(command: str) -> list[str]:
    """shlex words of a command, with bash's $'...' strings decoded."""
    decoded = re.sub(r"\$'((?:[^'\\]|\\.)*)'",
                     lambda m: shlex.quote(codecs.decode(m.group(1), "unicode_escape")), command)
    return shlex.split(decoded)


def program(command: str) -> tuple[str, list[str]] | None:
    """(module, argv) of a `python -m` command this test runs in-process, else None."""
    words = _words(command.split("&&")[-1])
    if words[:2] != ["python", "-m"] or words[2] not in PROGRAMS or MULTI_PROCESS & set(words):
        return None
    return words[2], words[3:]


def _run_dir(argv: list[str]) -> tuple[str, bool]:
    args = train_run.parse_args(argv)
    return config_lib.load(ROOT / args.config, args.overrides).run_dir, args.resume


def test_readme_training_examples_never_share_a_run_dir():
    fresh, resumed = [], []
    for command in shell_commands():
        if "python -m train.run" not in command:
            continue
        argv = _words(command.split("python -m train.run", 1)[1].split(" & ")[0].replace(";", " "))
        argv = [PLACEHOLDERS.get(word, word) for word in argv]  # host i of N
        run_dir, resume = _run_dir(argv)
        (resumed if resume else fresh).append(run_dir)
        assert not resume or run_dir in fresh, f"{command!r} resumes a run no earlier example made"
    assert len(fresh) == len(set(fresh)), f"two README training examples write one run_dir: {fresh}"


@pytest.fixture
def miniature(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    for path in (ROOT / "configs").glob("*.yaml"):
        shutil.copy(path, tmp_path / "configs" / path.name)
    (tmp_path / "configs" / "tiny.yaml").write_text(MINIATURE.format(tiny=ROOT / "configs" / "tiny.yaml"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_shell_examples_run_in_order(miniature, capfd):
    ran = []
    for command in shell_commands():
        found = program(command)
        if found is None:
            continue
        module, argv = found
        if module == "serve.evaluate":  # minutes of variants; tests/test_serve.py runs evaluate
            args = serve_evaluate.parse_args(argv)
            assert quantize.load_checkpoint(args.checkpoint).step > 0
            ran.append(module)
            continue
        code = PROGRAMS[module](argv)
        out, err = capfd.readouterr()
        assert code == 0, f"README example failed: {command}\n{err[-2000:]}"
        ran.append(module)
    assert ran.count("train.run") >= 3 and "serve.generate" in ran and "serve.evaluate" in ran, ran
    # Then the Python snippets past the tour (serving from the quickstart's checkpoint).
    later = README.read_text().split("## A short tour", 1)[1].split("\n## ", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", later, flags=re.S)
    assert blocks, "README has no serving snippet"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})  # noqa: S102
    err = capfd.readouterr().err
    assert "read only" not in err and "WARNING" not in err, err  # orbax's restore warnings stay quiet
