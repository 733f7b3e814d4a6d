"""Pictures and Markdown for the demo and the benchmark: matplotlib (Agg, files only) and text.

Nothing here runs a process of the stack; what it draws comes in as measured data: a load report
(``loadtests.report``), the samples of a ``RouterObserver``, the per-vassal times of a reload.
``environment()`` says where the numbers were measured (machine and versions), read from the
machine itself, so a table never travels without them.
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

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt

from .measure import VassalSpan
from .observer import Sample
from .report import LoadReport

#: Colours per schedule in the benchmark picture (the same schedule keeps its colour).
SCHEDULE_COLOURS = {
    "lower bound": "#9e9e9e",
    "uwsgi_reload": "#1f77b4",
    "one at a time": "#ff7f0e",
    "2014 plan": "#d62728",
}


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
# Text
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


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def timeline_png(
    path: Path,
    *,
    report: LoadReport,
    live: Sequence[Sample],
    vassals: Sequence[VassalSpan],
    total_vassals: int,
    minimum: int,
    title: str,
) -> Path:
    """Four panels over seconds since the load started: each vassal's reload (triggered to
    back), live vassals in the router, requests and failures per second, latency."""
    t0 = report.started
    fig, axes = plt.subplots(
        4,
        1,
        figsize=(9, 8.5),
        sharex=True,
        gridspec_kw={"height_ratios": [max(1.0, len(vassals) / 4), 1, 1.2, 1.2]},
    )
    gantt, live_ax, rate_ax, latency_ax = axes
    reload = report.reload
    window = None
    if reload is not None:
        end = reload.ended if reload.ended is not None else report.ended
        window = (reload.started - t0, end - t0)
    for ax in axes:
        if window is not None:
            ax.axvspan(*window, color="#fff3cd", zorder=0)
        ax.grid(True, axis="x", alpha=0.3)

    names = [v.name for v in vassals]
    for row, v in enumerate(vassals):
        if v.triggered is None:
            continue
        end = v.back if v.back is not None else report.ended
        colour = "#2ca02c" if v.back is not None else "#d62728"
        gantt.barh(row, end - v.triggered, left=v.triggered - t0, color=colour, height=0.6)
    gantt.set_yticks(range(len(names)), names, fontsize=7)
    gantt.invert_yaxis()
    gantt.set_title(title, fontsize=10)
    gantt.set_ylabel("reloading")

    if live:
        xs = [s.t - t0 for s in live]
        live_ax.step(xs, [s.live for s in live], where="post", color="#1f77b4", lw=1)
    live_ax.axhline(minimum, color="#d62728", ls="--", lw=0.8, label=f"minimum {minimum}")
    live_ax.set_ylim(-0.3, total_vassals + 0.5)
    live_ax.set_ylabel("live nodes")
    live_ax.legend(loc="lower left", fontsize=7)

    bucket = report.bucket_s
    # the last bucket is cut short by the end of the load: its rate would look like a drop
    series = [b for b in report.series if b.t + bucket <= report.ended - t0 + 1e-9]
    ts = [b.t for b in series]
    rate_ax.plot(ts, [b.requests / bucket for b in series], color="#1f77b4", lw=0.8)
    rate_ax.bar(
        ts,
        [b.failures / bucket for b in series],
        width=bucket,
        align="edge",
        color="#d62728",
        label="failed/s",
    )
    rate_ax.set_ylabel("requests/s")
    rate_ax.set_ylim(bottom=0)
    rate_ax.legend(loc="lower left", fontsize=7)

    # a bucket without requests has no latency: a gap in the line, not a zero
    nan = float("nan")
    latency_ax.plot(ts, [b.max_ms if b.requests else nan for b in series], lw=0.8, label="max")
    latency_ax.plot(ts, [b.p99_ms if b.requests else nan for b in series], lw=0.8, label="p99")
    latency_ax.set_yscale("log")
    latency_ax.set_ylabel("latency ms\n(per 100 ms)")
    latency_ax.set_xlabel("seconds since the load started (shaded: the reload command ran)")
    latency_ax.legend(loc="upper left", fontsize=7)

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def bench_png(
    path: Path,
    groups: Sequence[str],
    makespans: Mapping[str, Sequence[float | None]],
    max_latency_ms: Mapping[str, Sequence[float | None]],
    title: str,
) -> Path:
    """Grouped bars per (N, m): makespan of each schedule, and its max latency during reload."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.9 * len(groups) + 2), 7))
    for ax, data, label in (
        (top, makespans, "makespan s"),
        (bottom, max_latency_ms, "max latency ms\nduring reload"),
    ):
        series = [name for name in data if any(v is not None for v in data[name])]
        width = 0.8 / max(1, len(series))
        for i, name in enumerate(series):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            values = [v if v is not None else 0.0 for v in data[name]]
            ax.bar(
                xs,
                values,
                width=width,
                label=name,
                color=SCHEDULE_COLOURS.get(name),
                hatch="//" if name == "lower bound" else None,
            )
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    bottom.set_yscale("log")
    top.legend(fontsize=8)
    top.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
