"""`pip install -e .` alone must give a working tljax: every third-party module tljax imports is a dependency in
pyproject.toml, and pinned in requirements.txt."""

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Imported only on an opt-in path, with an error that says what to install.
OPTIONAL = {"torch"}  # tljax.models.hub: pickled `.bin` checkpoints (allow_pickle=True)


def _imported_modules() -> set[str]:
    names = set()
    for path in (ROOT / "tljax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "tljax" and n != "__future__"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(lines) -> set[str]:
    return {_normal(re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0]) for line in lines if line.strip()}


def test_every_import_is_a_declared_and_pinned_dependency():
    dists = importlib.metadata.packages_distributions()
    declared = _requirement_names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    pinned = _requirement_names(
        line for line in (ROOT / "requirements.txt").read_text().splitlines() if not line.startswith(("#", "-"))
    )
    missing, unpinned = [], []
    for module in sorted(_imported_modules() - OPTIONAL):
        names = {_normal(d) for d in dists.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} (distribution {sorted(names)})")
        if not names & pinned:
            unpinned.append(module)
    assert not missing, f"imported by tljax but not in pyproject dependencies: {missing}"
    assert not unpinned, f"imported by tljax but not pinned in requirements.txt: {unpinned}"
