"""The wheel, installed as a user would: it disturbs no other project, and tests a team's own app.

The wheel is built from this checkout and installed into fresh venvs, once without extras and
once with ``[harness]`` (plus Flask, the second app's dependency). In each, a small unrelated
pytest project must stay green. Then the shipped checks (``--pyargs
uwsgi_reload_loadtests.zero_downtime``) run against ``tests/flask_app`` with its own vassal config,
from a dir that is not the app's: with this tool, with a correct foreign procedure, and with a
wrong one (the control, which must fail). The app dir must be exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
FLASK_APP = REPO / "tests" / "flask_app"
PROCEDURES = REPO / "tests" / "reload_procedures.py"
#: What the wheel is built from: the files a clean checkout has, no build or cache dirs.
SOURCES = (
    "uwsgi_reload.py",
    "harness",
    "loadtests",
    "examples",
    "pyproject.toml",
    "README.md",
    "LICENSE",
)
IGNORED = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
UNRELATED_TEST = "def test_arithmetic():\n    assert sum([1, 2]) == 3\n"
# Strict, as many projects are: an unknown marker or any warning fails the run.
UNRELATED_INI = "[pytest]\naddopts = --strict-markers -p no:randomly\nfilterwarnings = error\n"
FLASK_ARGS = [
    f"--uwsgi-app-dir={FLASK_APP}",
    "--uwsgi-wsgi-file=app.py",
    f"--uwsgi-vassal-config={FLASK_APP / 'vassal.ini'}",
    "--uwsgi-health-path=/health",
    "--uwsgi-vassals=3",
]
#: The zero-downtime checks the package ships, run from the installed package.
SHIPPED_CHECKS = "uwsgi_reload_loadtests.zero_downtime"
ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and dir under ``root`` (hidden ones too): path -> (size, mtime in ns)."""
    state = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        state[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return state


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ur-i-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(work: Path) -> Path:
    src = work / "checkout"
    src.mkdir()
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=IGNORED)
        else:
            shutil.copy2(source, src / name)
    done = run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", "dist", "./checkout"], work
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = (work / "dist").glob("uwsgi_reload-*.whl")
    return built


@pytest.fixture(scope="module")
def unrelated_project(work: Path) -> Path:
    project = work / "unrelated"
    project.mkdir()
    (project / "pytest.ini").write_text(UNRELATED_INI)
    (project / "test_unrelated.py").write_text(UNRELATED_TEST)
    return project


def venv(work: Path, name: str, *requirements: str) -> Path:
    """A fresh venv with ``requirements`` installed; its python."""
    path = work / name
    done = run([sys.executable, "-m", "venv", str(path)], work)
    assert done.returncode == 0, done.stderr
    python = path / "bin" / "python"
    done = run([str(python), "-m", "pip", "install", "-q", *requirements], work)
    assert done.returncode == 0, done.stdout + done.stderr
    return python


def test_the_wheel_installs_only_namespaced_names(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    top = {name.split("/")[0] for name in names if not name.startswith("uwsgi_reload-")}
    assert top == {"uwsgi_reload.py", "uwsgi_reload_harness", "uwsgi_reload_loadtests"}, top
    # the example configs ship as package data of the harness
    assert "uwsgi_reload_harness/examples/uwsgi_vassal.ini" in names
    assert "uwsgi_reload_harness/examples/nginx.conf.fragment" in names
    assert "uwsgi_reload_harness/examples/fleet/fleet_vassal.ini" in names


def test_without_extras_other_projects_stay_green(
    work: Path, wheel: Path, unrelated_project: Path
) -> None:
    python = venv(work, "venv-plain", str(wheel), "pytest")
    done = run([str(python), "-m", "pytest", "-q"], unrelated_project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    version = run([str(python.parent / "uwsgi-reload"), "--version"], work)
    assert version.returncode == 0, version.stderr


@pytest.fixture(scope="module")
def harness_python(work: Path, wheel: Path) -> Path:
    return venv(work, "venv-harness", f"{wheel}[harness]", "flask")


def test_with_the_harness_other_projects_stay_green(
    harness_python: Path, unrelated_project: Path
) -> None:
    done = run([str(harness_python), "-m", "pytest", "-q"], unrelated_project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    # the plugin is there, inert: its options are listed, nothing was checked or started
    options = run([str(harness_python), "-m", "pytest", "--help"], unrelated_project)
    assert "--uwsgi-app-dir" in options.stdout


def procedure_template(mode: str) -> str:
    """``--reload-command`` for one of the foreign procedures of ``reload_procedures.py``."""
    fields = "{emperor_path} {emperor_stats} {fastrouter_stats} --minimum {minimum}"
    return f"--reload-command={{python}} {PROCEDURES} {mode} {fields}"


def shipped_checks(python: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["-m", "pytest", "-q", "-p", "no:randomly", "--pyargs", SHIPPED_CHECKS]
    return run([str(python), *args, *FLASK_ARGS, *extra], cwd)


@pytest.mark.parametrize(
    "procedure",
    [
        pytest.param([], id="this tool"),
        pytest.param([procedure_template("one-by-one")], id="a foreign procedure"),
    ],
)
def test_a_flask_app_with_its_own_config_reloads_with_zero_downtime(
    harness_python: Path, unrelated_project: Path, procedure: list[str]
) -> None:
    before = tree_state(FLASK_APP)
    done = shipped_checks(harness_python, unrelated_project, *procedure)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    # minimum 1 and 2 of 3 vassals, the two traps; minimum 3 is skipped
    assert "4 passed, 1 skipped" in done.stdout
    assert tree_state(FLASK_APP) == before, "the harness wrote into the app dir"


def test_the_shipped_checks_catch_a_wrong_foreign_procedure(
    harness_python: Path, unrelated_project: Path
) -> None:
    wrong = procedure_template("together")
    done = shipped_checks(harness_python, unrelated_project, wrong, "-k", "request[1]")
    print(done.stdout[-3000:])
    assert done.returncode == 1, done.stdout[-5000:]
    assert "1 failed" in done.stdout
    (row,) = table_rows(done.stdout)
    assert row["observer min"] == "0", row  # the router had no live node: caught by the observer


def table_rows(stdout: str) -> list[dict[str, str]]:
    """The rows of the "reloads under load" table the plugin prints at the end of a run."""
    lines = stdout.split("reloads under load", 1)[1].splitlines()[1:]
    header = [cell.strip() for cell in lines[0].split("|")]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells)))
    return rows
