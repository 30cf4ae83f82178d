"""The README's examples run as written, in the order written (they are what users copy).

The Python snippets of the tour run as they are. The shell examples run in a fresh
folder, in order, against a miniature of `configs/tiny.yaml` (same file names, so the
same run directories; a smaller model and batch so that each run takes seconds): a
later example finds exactly what the earlier ones left, as a reader's would.
The quickstart's first command runs first, as a reader's would, and the test suite's
own programs run in temporary folders (tests/test_cli.py), so a runs/tiny the quickstart
left never changes what a test sees. `serve.evaluate` and `serve.sensitivity` run up to
their measurement here: arguments parsed, checkpoint loaded, text read and cut into the
windows they would measure (their full reports take minutes; tests/test_serve.py and
tests/test_sensitivity.py run them). Examples
that need several processes or hosts are checked without running (their run
directories must not collide with the others'); tests/test_distributed.py runs them.
The HTTP server's examples need a server running beside them: tests of serve.server
cover them.
"""

from __future__ import annotations

import ast
import codecs
import re
import shlex
import shutil
from pathlib import Path

import pytest

from serve import evaluate as serve_evaluate
from serve import evaluate_text
from serve import generate as serve_generate
from serve import quantize
from serve import sensitivity as serve_sensitivity
from train import config as config_lib
from train import run as train_run

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROGRAMS = {"train.run": train_run.main, "serve.generate": serve_generate.main,
            "serve.evaluate": serve_evaluate.main, "serve.sensitivity": serve_sensitivity.main}
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


def test_readme_python_names_exist_after_import_mpx():
    """Every `mpx.a.b` the README names resolves after a plain `import mpx`: `a` is bound
    by mpx/__init__.py itself or loads through its module `__getattr__` (asked directly:
    other tests have imported mpx's submodules into this interpreter already)."""
    import functools

    import mpx
    init = ast.parse(Path(mpx.__file__).read_text())
    bound = {a.asname or a.name for node in ast.walk(init) if isinstance(node, (ast.Import, ast.ImportFrom))
             for a in node.names} | {t.id for node in init.body if isinstance(node, ast.Assign)
                                     for t in node.targets if isinstance(t, ast.Name)}
    names = sorted(set(re.findall(r"\bmpx(?:\.[A-Za-z_]\w*)+", README.read_text())))
    for name in names:
        first, *rest = name.split(".")[1:]
        module = getattr(mpx, first) if first in bound else mpx.__getattr__(first)
        functools.reduce(getattr, rest, module)
    assert "mpx.sensitivity.analyze" in names and "mpx.policy.search" in names


def test_readme_names_the_ci_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r'^(pip install -e "\.\[test[\w,-]*\]" && python -m pytest.*)$', ci, flags=re.M).group(1)
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
    shutil.copy(README, tmp_path / "README.md")  # a fresh clone's text, which examples read as --data
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_shell_examples_run_in_order(miniature, capfd):
    ran = []
    for command in shell_commands():
        found = program(command)
        if found is None:
            continue
        module, argv = found
        if module in ("serve.evaluate", "serve.sensitivity"):  # up to the minutes of measurement
            _check_measurement_inputs(module, argv)
            ran.append(module)
            continue
        code = PROGRAMS[module](argv)
        out, err = capfd.readouterr()
        assert code == 0, f"README example failed: {command}\n{err[-2000:]}"
        ran.append(module)
    assert ran.count("train.run") >= 3 and "serve.generate" in ran and ran.count("serve.evaluate") >= 2, ran
    assert ran[0] == "train.run" and "serve.sensitivity" in ran, ran  # the quickstart first
    # Then the serving section's Python snippet, on the quickstart's checkpoint (the HTTP
    # section's client needs a running server: tests/test_server.py covers it).
    serving = README.read_text().split("\n## Serving:", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", serving, flags=re.S)
    assert blocks, "README has no serving snippet"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})  # noqa: S102
    err = capfd.readouterr().err
    assert "read only" not in err and "WARNING" not in err, err  # orbax's restore warnings stay quiet


def _check_measurement_inputs(module: str, argv: list[str]) -> None:
    """What `serve.evaluate` / `serve.sensitivity` read before measuring: parsed options,
    the checkpoint, and (with --data) the text cut into the windows they would measure."""
    if module == "serve.sensitivity":
        args = serve_sensitivity.parse_args(argv)
        ckpt, calib, heldout = serve_sensitivity.inputs(args)
        assert calib and heldout and args.seq <= ckpt.config.max_seq_len
        return
    args = serve_evaluate.parse_args(argv)
    if args.data is None:
        assert quantize.load_run(args.checkpoint).step > 0
        return
    ckpt, _, cut = evaluate_text.inputs(args.checkpoint, args.data, seq_len=args.seq_len, windows=args.windows,
                                        variants=args.variants, tokenizer=args.tokenizer, policy=args.policy)
    assert len(cut) == args.windows and cut.shape[1] == ckpt.config.max_seq_len + 1


def test_readme_config_names_work_outside_a_clone(tmp_path, monkeypatch):
    """`configs/...` names the files shipped with mpx where the working directory has none
    (a non-editable install run anywhere); a file of the user's own wins."""
    import mpx
    monkeypatch.chdir(tmp_path)
    assert config_lib.load("configs/tiny.yaml").run_dir == "runs/tiny"
    assert mpx.policy.load("configs/policies/fp8_ffn_only.yaml").name
    (tmp_path / "mine.yaml").write_text("extends: configs/tiny.yaml\nsteps: 2\n")  # README's fine-tuning config
    assert config_lib.load("mine.yaml").steps == 2
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text(f"extends: {ROOT / 'configs' / 'tiny.yaml'}\nsteps: 7\n")
    assert config_lib.load("configs/tiny.yaml").steps == 7


def test_a_non_editable_install_ships_configs_and_benchmarks():
    import tomllib
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = setuptools["packages"]["find"]["include"]
    assert {"configs", "benchmarks"} <= set(packages)
    shipped = {p for pattern in setuptools["package-data"]["configs"] for p in (ROOT / "configs").glob(pattern)}
    assert set((ROOT / "configs").rglob("*.yaml")) <= shipped
    assert (ROOT / "configs" / "__init__.py").is_file() and (ROOT / "benchmarks" / "__init__.py").is_file()
