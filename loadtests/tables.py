"""Text for the demo and the benchmarks: terminal and Markdown tables, and where the numbers
were measured.

``environment()`` reads the machine and the versions from the machine itself, so a table never
travels without them. No matplotlib here (the pictures are ``picture.py``'s).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .report import PHASES, FailureGroup, LoadReport

# ---------------------------------------------------------------------------------------------
# Where the numbers come from
# ---------------------------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({type(exc).__name__})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _package_version(name: str) -> str:
    # metadata, not an import: importing locust would monkey-patch this process with gevent
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else platform.processor() or "unknown"


def _ram() -> str:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return "unknown"
    found = re.search(r"^MemTotal:\s*(\d+) kB", text, re.MULTILINE)
    return f"{int(found.group(1)) / 1024**2:.1f} GiB" if found else "unknown"


def environment(uwsgi: str, nginx: str) -> dict[str, str]:
    """Machine and versions, read now from this machine and the binaries the stack runs."""
    nginx_version = _first_line([nginx, "-v"]).replace("nginx version: ", "")
    return {
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"),
        "cpu": _cpu_model(),
        "ram": _ram(),
        "kernel": platform.release(),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "uwsgi": _first_line([uwsgi, "--version"]),
        "nginx": nginx_version,
        "locust": _package_version("locust"),
        "django": _package_version("Django"),
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The exact command this process runs as, for the top of a report."""
    args = list(sys.argv if argv is None else argv)
    return shlex.join([Path(sys.executable).name, *args])


def environment_lines(command: str, env: Mapping[str, str]) -> list[str]:
    machine = f"machine: {env['nproc']} CPUs ({env['cpu']}), {env['ram']} RAM"
    machine += f", Linux {env['kernel']}, load average at start {env['load average']}"
    versions = ", ".join(
        f"{name} {env[name]}" for name in ("python", "uwsgi", "nginx", "locust", "django")
    )
    return [f"command: {command}", machine, f"versions: {versions}"]


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(x| s| ms)?$|^-$")


def _numeric_columns(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[bool]:
    """Columns whose every cell is a number (or "-"): those are right-aligned."""
    return [
        bool(rows) and all(_NUMBER.match(str(row[i])) for row in rows) for i in range(len(headers))
    ]


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded for a terminal, numbers right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    numeric = _numeric_columns(headers, rows)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if right else str(c).ljust(w)
            for c, w, right in zip(cells, widths, numeric)
        ).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table, numbers right-aligned."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join("---:" if n else ":---" for n in _numeric_columns(headers, rows)) + "|"
    return "\n".join([line(headers), rule, *map(line, rows)])


def seconds(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


PHASE_HEADERS = ("phase", "requests", "failed", "rps", "p50 ms", "p99 ms", "max ms", "failures")


def phase_rows(load: LoadReport) -> list[list[str]]:
    """Requests, failures and latency before, during and after the reload, and in all."""
    rows = []
    for name in (*PHASES, "total"):
        p = load.phase(name)
        kinds = ", ".join(f"{k}: {n}" for k, n in p.failures_by_kind.items()) or "-"
        rows.append(
            [
                name,
                str(p.requests),
                str(p.failures),
                f"{p.rps:.0f}",
                f"{p.p50:.1f}",
                f"{p.p99:.1f}",
                f"{p.max_ms:.1f}",
                kinds,
            ]
        )
    return rows


FAILURE_HEADERS = (
    "kind",
    "failed",
    "first s after the reload started",
    "last s",
    "first: nearest vassal event",
    "last: nearest vassal event",
)


def failure_rows(groups: Sequence[FailureGroup]) -> list[list[str]]:
    """One row per burst of failed requests: kind, count, when it started and ended, and the
    vassal trigger or back nearest to its first and to its last failure."""
    return [
        [
            g.kind,
            str(g.count),
            f"{g.first.at:+.2f}",
            f"{g.last.at:+.2f}",
            g.first.near() or "-",
            g.last.near() or "-",
        ]
        for g in groups
    ]
