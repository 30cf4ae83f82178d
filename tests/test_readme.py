"""The README's Python snippets run as written (they are the first thing users copy)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


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
