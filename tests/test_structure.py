"""Structure rules that keep knowledge in one place (checked over the source with `ast`).

* A recipe answers for itself (`mpx.recipes.Scaling`): no `isinstance` on a recipe class
  outside `mpx/recipes.py`.
* The machine compiled for is one value (`mpx.target`): `jax.default_backend()` is read
  in `mpx/target.py` only, within the library.
* No module imports another module's private (underscore) names.
* Every mpx module declares `__all__`; other modules import only declared names from it;
  every `mpx.*` name the docs use is declared.
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


def _module_file(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def _declared_all(path: Path) -> list[str] | None:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


def _library_modules():
    for path in sorted((ROOT / "mpx").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def test_every_library_module_declares_its_public_names():
    missing = [module for module, path in _library_modules() if _declared_all(path) is None]
    assert not missing, f"add __all__ to: {missing}"


def test_what_other_modules_import_from_the_library_is_in_its_all():
    found = []
    for path, tree in _sources(*PACKAGES):
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mpx"):
                continue
            source = _module_file(node.module)
            public = _declared_all(source) or []
            for alias in node.names:
                if alias.name not in public and _module_file(f"{node.module}.{alias.name}") is None:
                    found.append(f"{path}:{node.lineno} {node.module}.{alias.name}")
    assert not found, f"import only what a module declares in __all__: {found}"


def test_the_api_the_docs_name_is_declared_public():
    """Every `mpx.a.b...` that README.md, ARCHITECTURE.md or CONTRIBUTING.md names exists,
    and each module on the way lists the next name in its `__all__` (`mpx.__all__` is the
    contract) or has it as a submodule: documented names cannot silently become private."""
    import importlib
    import re
    import types

    import mpx

    text = "".join((ROOT / name).read_text() for name in ("README.md", "ARCHITECTURE.md", "CONTRIBUTING.md"))
    undeclared = []
    for name in sorted(set(re.findall(r"\bmpx(?:\.[A-Za-z_]\w*)+", text)) - {"mpx.__all__"}):
        obj, parts = mpx, name.split(".")[1:]
        for i, part in enumerate(parts):
            if not isinstance(obj, types.ModuleType):
                break  # an attribute of a class or function: its owner was checked
            submodule = hasattr(obj, "__path__") and _module_file(f"{obj.__name__}.{part}") is not None
            if part not in getattr(obj, "__all__", ()) and not submodule:
                undeclared.append(f"{name}: {part!r} not in {obj.__name__}.__all__")
                break
            obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(f"{obj.__name__}.{part}")
    assert not undeclared, undeclared
