"""The installed packages import downwards only: tool < processes < fixtures < load, observer
and measure < the shipped checks and the commands.

Modules are found by import name (``importlib.util.find_spec``), as installed, not by the
repository's folder names (``harness/`` installs as ``uwsgi_reload_harness``): a cycle between
the installed packages is invisible to a check that reads folders. Every import counts, those
inside functions and under ``TYPE_CHECKING`` too: each is an edge of the graph a reader follows.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

TOOL, PROCESSES, FIXTURES, LOAD, CHECKS = range(5)
PACKAGES = ("uwsgi_reload", "uwsgi_reload_harness", "uwsgi_reload_loadtests")
#: The layer of every module of the installed packages; ``NAME.*``: every module under NAME.
LAYERS = {
    "uwsgi_reload": TOOL,
    # processes: render the examples, start and stop stacks and fleets
    "uwsgi_reload_harness": PROCESSES,
    "uwsgi_reload_harness.render": PROCESSES,
    "uwsgi_reload_harness.stack": PROCESSES,
    "uwsgi_reload_harness.fleet": PROCESSES,
    "uwsgi_reload_harness.traps": PROCESSES,
    "uwsgi_reload_harness.busy": PROCESSES,
    "uwsgi_reload_harness.examples.*": PROCESSES,  # the example app the stacks serve
    # fixtures: the pytest plugin
    "uwsgi_reload_harness.plugin": FIXTURES,
    # load, observe, measure
    "uwsgi_reload_loadtests": LOAD,
    "uwsgi_reload_loadtests.report": LOAD,
    "uwsgi_reload_loadtests.runner": LOAD,
    "uwsgi_reload_loadtests.locustfile": LOAD,
    "uwsgi_reload_loadtests.observer": LOAD,
    "uwsgi_reload_loadtests.endstate": LOAD,
    "uwsgi_reload_loadtests.capacity": LOAD,
    "uwsgi_reload_loadtests.measure": LOAD,
    "uwsgi_reload_loadtests.schedules": LOAD,
    "uwsgi_reload_loadtests.tables": LOAD,
    "uwsgi_reload_loadtests.picture": LOAD,
    "uwsgi_reload_loadtests.fleetsim": LOAD,
    # the shipped zero-downtime checks, and the commands with what only they share
    "uwsgi_reload_loadtests.zero_downtime": CHECKS,
    "uwsgi_reload_loadtests.cli": CHECKS,
    "uwsgi_reload_loadtests.demo": CHECKS,
    "uwsgi_reload_loadtests.bench": CHECKS,
    "uwsgi_reload_loadtests.bench_busy": CHECKS,
    "uwsgi_reload_loadtests.bench_drain": CHECKS,
    "uwsgi_reload_loadtests.bench_fleet": CHECKS,
    "uwsgi_reload_loadtests.bench_surge": CHECKS,
    "uwsgi_reload_loadtests.bench_warmup": CHECKS,
    "uwsgi_reload_loadtests.original_plan": CHECKS,
    "uwsgi_reload_loadtests.simulate_fleet": CHECKS,
}


def installed_modules(packages: Iterable[str]) -> dict[str, Path]:
    """Module name -> source file, for every module of ``packages`` where Python finds them."""
    modules = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin is not None, f"{package} is not installed"
        if not spec.submodule_search_locations:
            modules[package] = Path(spec.origin)
            continue
        for location in spec.submodule_search_locations:
            for path in sorted(Path(location).rglob("*.py")):
                parts = path.relative_to(location).with_suffix("").parts
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join((package, *parts))] = path
    return modules


def imported(module: str, path: Path, known: Iterable[str]) -> list[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names += [f"{base}.{alias.name}" for alias in node.names] or [base]
    known = set(known)
    found = []
    for name in names:
        # ``from pkg import mod`` names a module, ``from pkg.mod import func`` a module's name
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return sorted(set(found) - {module})


def layer_of(module: str, layers: Mapping[str, int]) -> int | None:
    if module in layers:
        return layers[module]
    for name, layer in layers.items():
        if name.endswith(".*") and module.startswith(name[:-1]):
            return layer
    return None


def violations(modules: Mapping[str, Path], layers: Mapping[str, int]) -> list[str]:
    """Every module missing from ``layers``, and every import of a module of a higher layer."""
    found = []
    for module, path in sorted(modules.items()):
        layer = layer_of(module, layers)
        if layer is None:
            found.append(f"{module} is in no layer")
            continue
        for target in imported(module, path, modules):
            above = layer_of(target, layers)
            if above is not None and above > layer:
                found.append(f"{module} (layer {layer}) imports {target} (layer {above})")
    return found


def test_no_installed_module_imports_a_higher_layer() -> None:
    assert violations(installed_modules(PACKAGES), LAYERS) == []


def test_every_module_of_the_table_is_installed() -> None:
    modules = installed_modules(PACKAGES)
    assert [name for name in LAYERS if "*" not in name and name not in modules] == []


# ---------------------------------------------------------------------------------------------
# Control: the same check on a small package with an upward import
# ---------------------------------------------------------------------------------------------

CONTROL = {
    "__init__.py": "",
    "low.py": "def late() -> None:\n    from urlayerdemo.high import VALUE  # noqa: F401\n",
    "typed.py": ("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from . import high\n"),
    "high.py": "from .low import late\n\nVALUE = 1\n",
    "stray.py": "",
}


def test_control_an_upward_import_and_a_module_in_no_layer_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "urlayerdemo"
    package.mkdir()
    for name, text in CONTROL.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    layers = {"urlayerdemo": 0, "urlayerdemo.low": 0, "urlayerdemo.typed": 0, "urlayerdemo.high": 1}

    assert violations(installed_modules(["urlayerdemo"]), layers) == [
        "urlayerdemo.low (layer 0) imports urlayerdemo.high (layer 1)",
        "urlayerdemo.stray is in no layer",
        "urlayerdemo.typed (layer 0) imports urlayerdemo.high (layer 1)",
    ]
