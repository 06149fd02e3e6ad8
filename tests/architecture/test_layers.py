"""The house's layering (docs/design.md), checked on the code as it is: import-linter's contracts in
pyproject.toml (each package imports only those below it; no circle among the modules of any package),
proven live on a copy with one deliberate upward import; few modules directly in disttrain/; the model
families' libraries imported in disttrain/models/ only."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "disttrain"
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.is_file(), reason="import-linter is not installed (pip install -e '.[dev]')")


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the disttrain package found under `root`, with `root`'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_contracts_hold():
    done = lint(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("importer, line, named", [
    # an upward import at the top of a module
    ("config/stages.py", "from disttrain.train import run  # noqa", "disttrain.config is not allowed to import disttrain.train"),
    # one inside a function, the way circles used to be dodged
    ("data/folder.py", "def _later():\n    from disttrain.models import build  # noqa\n", "disttrain.data is not allowed to import disttrain.models"),
    # a circle inside one package
    ("use/inputs.py", "from disttrain.use import predict  # noqa", "No cycles are allowed in disttrain.use"),
])
def test_an_import_against_the_direction_breaks_them(tmp_path, importer, line, named):
    shutil.copytree(PACKAGE, tmp_path / "disttrain", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "disttrain" / importer, "a") as module:
        module.write("\n" + line + "\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    assert named in done.stdout


def test_few_modules_sit_directly_in_the_package():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["cli", "config", "data", "dist", "models", "train", "use"]


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torchvision":
            names.add(f"torchvision.{node.attr}")  # `import torchvision` then torchvision.models.<...>
    return names


def test_only_models_knows_the_model_families():
    """torchvision's and timm's model zoos, and the family modules that wrap them, are imported in
    disttrain/models/ only (torchvision's image functions elsewhere are fine): the rest of the code
    reaches a family through disttrain/models/families.py's lookup."""
    outside = {}
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "models":
            continue
        zoo = {name for name in _imported(path) if name == "timm" or name.startswith(("timm.", "torchvision.models"))
               or name in ("disttrain.models.timm", "disttrain.models.torchvision")}  # a family's own module, too
        if zoo:
            outside[str(path.relative_to(REPO))] = sorted(zoo)
    assert outside == {}


def test_pytest_collects_every_test_folder(pytestconfig):
    """pytest skips folders named like build outputs (`dist`, `build`) unless told otherwise: a test
    folder that mirrors such a package would silently never run."""
    from fnmatch import fnmatch

    patterns = pytestconfig.getini("norecursedirs")
    folders = [d for d in (REPO / "tests").rglob("*") if d.is_dir() and d.name != "__pycache__"]
    assert (REPO / "tests" / "unit" / "dist") in folders
    hidden = [str(d.relative_to(REPO)) for d in folders if any(fnmatch(d.name, pattern) for pattern in patterns)]
    assert not hidden
