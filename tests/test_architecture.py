"""House rules that keep the architecture visible: import direction, no Lightning outside engine/."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "udaseg"
# package -> udaseg packages it may import (leaf modules errors, fileio, configparse, data.classes: allowed to all)
ALLOWED = {
    "data": {"data"},
    "models": {"models"},
    "adapt": {"adapt", "models", "data"},
    "eval": {"eval", "models", "data"},
    "engine": {"engine", "adapt", "models", "data", "eval", "catalog"},
}
LEAVES = {"errors", "fileio", "configparse", "data.classes"}


def udaseg_imports(path: Path) -> set[str]:
    pkg = path.relative_to(SRC).parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(pkg[: len(pkg) - node.level + 1])
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("udaseg"):
                mod = node.module[len("udaseg."):]
            else:
                continue
            out.add(mod)
        elif isinstance(node, ast.Import):
            out |= {a.name[len("udaseg."):] for a in node.names if a.name.startswith("udaseg.")}
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package):
    bad = []
    for path in (SRC / package).rglob("*.py"):
        for mod in udaseg_imports(path):
            if mod in LEAVES or any(mod.startswith(leaf + ".") for leaf in LEAVES):
                continue
            top = mod.split(".")[0]
            if top and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(SRC)} imports udaseg.{mod}")
    assert not bad, "\n".join(bad)


def test_lightning_only_in_engine():
    users = [
        p.relative_to(SRC) for p in SRC.rglob("*.py")
        if "lightning" in {n.split(".")[0] for n in _top_imports(p)} and p.relative_to(SRC).parts[0] != "engine"
    ]
    assert not users


def _top_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_importing_the_library_is_light():
    code = (
        "import sys, udaseg, udaseg.models, udaseg.data.datasets, udaseg.adapt.self_training, "
        "udaseg.eval.metrics, udaseg.catalog; print('lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
