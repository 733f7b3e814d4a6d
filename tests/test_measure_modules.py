"""The shape of ``uwsgi_reload_loadtests``, as installed: commands are leaves, and only the
picture module imports matplotlib, late enough that everything else runs without it."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "uwsgi_reload_loadtests"
SPEC = importlib.util.find_spec(PACKAGE)
assert SPEC is not None and SPEC.origin is not None, f"{PACKAGE} is not installed"
#: The installed package's files (the repository's folder is ``loadtests/``).
LOADTESTS = Path(SPEC.origin).parent
#: Modules run with ``python -m``: nothing imports them.
COMMANDS = {
    "demo",
    "bench",
    "bench_drain",
    "bench_fleet",
    "bench_surge",
    "bench_warmup",
    "original_plan",
    "simulate_fleet",
}
PICTURE = "picture"


def imports(module: str) -> list[tuple[str, bool]]:
    """(module imported, at the top level of the file) for every import in ``module``; this
    package's modules by their short name."""
    tree = ast.parse((LOADTESTS / f"{module}.py").read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                names = [base] if base else [alias.name for alias in node.names]
            elif base == PACKAGE:
                names = [alias.name for alias in node.names]
            else:
                names = [base.removeprefix(f"{PACKAGE}.")]
        found += [(name, id(node) in top) for name in names]
    return found


MODULES = sorted(path.stem for path in LOADTESTS.glob("*.py") if path.stem != "__init__")


def test_the_commands_are_there() -> None:
    assert set(MODULES) >= COMMANDS
    assert PICTURE in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_no_module_imports_a_command(module: str) -> None:
    imported = {name for name, _ in imports(module)}
    assert imported & COMMANDS == set(), f"{module} imports a command module"


@pytest.mark.parametrize("module", MODULES)
def test_only_the_picture_module_imports_matplotlib_and_only_when_drawing(module: str) -> None:
    matplotlib = [top for name, top in imports(module) if name.split(".")[0] == "matplotlib"]
    if module == PICTURE:
        assert matplotlib, "the picture module draws with matplotlib"
        assert not any(matplotlib), "matplotlib imported at the top of the picture module"
    else:
        assert matplotlib == [], f"{module} imports matplotlib"


# Blocks matplotlib, imports every command and library module, and tries to draw.
WITHOUT_MATPLOTLIB = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"{name} blocked")
        return None

sys.meta_path.insert(0, Block())
import uwsgi_reload_loadtests.bench
import uwsgi_reload_loadtests.bench_drain
import uwsgi_reload_loadtests.demo
import uwsgi_reload_loadtests.measure
from uwsgi_reload_loadtests.picture import PictureUnavailable, bench_png

assert "matplotlib" not in sys.modules
try:
    bench_png(None, [], {}, {}, "title")
except PictureUnavailable:
    print("unavailable")
"""


def test_everything_but_the_picture_runs_without_matplotlib() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["unavailable"]
