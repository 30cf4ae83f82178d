"""Structure rules that keep knowledge in one place (checked over the source with `ast`).

* A recipe answers for itself (`mpx.recipes.Scaling`): no `isinstance` on a recipe class
  outside `mpx/recipes.py`.
* The machine compiled for is one value (`mpx.target`): `jax.default_backend()` is read
  in `mpx/target.py` only, within the library.
* No module imports another module's private (underscore) names.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mpx", "models", "serve", "train", "store", "benchmarks")
RECIPE_CLASSES = {"CurrentScaling", "DelayedScaling", "StaticScaling", "DeepSeekV3", "Recipe", "Scaling"}


def _sources(*packages):
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def test_no_isinstance_on_recipe_classes_outside_recipes():
    found = [f"{path}:{node.lineno}" for path, tree in _sources(*PACKAGES) if path != "mpx/recipes.py"
             for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2
             and _names(node.args[1]) & RECIPE_CLASSES]
    assert not found, f"ask the recipe (mpx.recipes.Scaling) instead: {found}"


def test_the_default_backend_is_read_in_mpx_target_only():
    found = [f"{path}:{node.lineno}" for path, tree in _sources("mpx") for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr == "default_backend"]
    assert found and all(f.startswith("mpx/target.py:") for f in found), found


def test_no_module_imports_private_names_of_another():
    found = [f"{path}:{node.lineno} {node.module}.{alias.name}" for path, tree in _sources(*PACKAGES)
             for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not found, found
