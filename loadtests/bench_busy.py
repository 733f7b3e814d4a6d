"""The tool's start-up on a busy host: process start to first touch, against the sockets in the
host's TCP table.

    python -m uwsgi_reload_loadtests.bench_busy [--before PATH] [--sockets 1000,10000,100000,200000]
                                    [--vassals 16] [--repeat 3] [--results-dir DIR]

On one stack of ``--vassals`` N vassals (the example app; no load: the table is filled instead),
for every table size S of ``--sockets``, in that order, and every tool:

- **before** (``--before PATH``, e.g. ``git show aeddcb4:uwsgi_reload.py > PATH``): the tool
  before netlink, which read ``/proc/net/tcp``, ``tcp6`` and ``unix`` once per vassal, run as
  ``python PATH``;
- **current**: ``python uwsgi_reload.py`` (netlink socket diagnostics, LISTEN only), the file
  run as a script as the README's first install copies it: Python compiles it at every start;
- **current, installed**: the ``uwsgi-reload`` command (``pip install``), which imports the
  module from its cached bytecode;
- **current, netlink refused**: the installed module with ``sock_diag_listening`` raising
  ``PermissionError`` (a container without netlink), as ``python -c``: one read of each table
  for every vassal;

the host's TCP table is topped up to S sockets (``uwsgi_reload_harness.busy``: TIME_WAIT on
loopback, which lasts 60 s) right before each of that tool's ``--repeat`` runs, after waiting
(up to 75 s) for a table larger than S to shrink back. Each run is
``--minimum-active-vassals N-1 --json`` without drain (its first action is a touch), stopped with
SIGINT once it printed its first "triggered"; the vassal it touched reloads and every vassal is
live again before the next run. Measured: the wall clock just before the process is started, the
tool's ``started`` (its wall clock once its checks are done: the sockets located) and its first
``triggered`` (seconds after ``started``). Start-up = first touch - process start.

Output, in the results dir (default ``reports/bench-busy-<date>-<time>``): ``busy.md`` (the
command, the machine, the versions, the table) and ``busy.json`` (every run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uwsgi_reload import positive_int
from uwsgi_reload_harness import render
from uwsgi_reload_harness.busy import busy_tcp_table, tcp_table_size
from uwsgi_reload_harness.stack import Stack, StackConfig, running_stack

from .cli import EXIT_OK, EXIT_SOME_RUN_FAILED, guarded, print_environment, results_dir
from .tables import markdown_table, seconds

#: The start-up the tool aims at: first touch within this of its start (16 vassals, 200,000
#: sockets in the table).
TARGET_S = 0.3
#: The current tool with netlink refused, as ``python -c REFUSED ARGS...``.
REFUSED = (
    "import sys\n"
    "import uwsgi_reload as tool\n"
    "def refuse(timeout=2.0):\n"
    "    raise PermissionError(1, 'netlink refused (uwsgi_reload_loadtests.bench_busy)')\n"
    "tool.sock_diag_listening = refuse\n"
    "raise SystemExit(tool.main(sys.argv[1:]))\n"
)
RUN_TIMEOUT = 120.0
#: How long a run waits for the table to shrink to the size asked (TIME_WAIT lasts 60 s).
DRAIN_WAIT_S = 75.0
#: Fills before a run, at most, to bring the table to the size asked.
TOP_UPS = 3


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    argv: tuple[str, ...]


def tools(before: Path | None) -> list[Tool]:
    installed = Path(sys.executable).with_name("uwsgi-reload")
    found = [Tool("current", (sys.executable, str(render.RELOAD_TOOL)))]
    if installed.is_file():
        found.append(Tool("current, installed", (str(installed),)))
    found.append(Tool("current, netlink refused", (sys.executable, "-c", REFUSED)))
    if before is not None:
        found.insert(0, Tool(f"before ({before.name})", (sys.executable, str(before.resolve()))))
    return found


@dataclasses.dataclass
class Run:
    tool: str
    asked: int
    at_launch: int
    exit_code: int | None
    checks_s: float | None
    first_touch_s: float | None
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def first_touch(stack: Stack, tool: Tool, asked: int) -> Run:
    """One run of ``tool`` on ``stack``, stopped once it touched its first vassal."""
    n = len(stack.vassal_ids)
    args = stack.reload_command("--minimum-active-vassals", str(n - 1), "--json", drain=False)
    at_launch = tcp_table_size()
    launched = time.time()
    process = subprocess.Popen(
        [*tool.argv, *args[2:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:  # with --json the event lines go to stderr
        seen.append(line)
        if "triggered" in line:
            process.send_signal(signal.SIGINT)
            break
    try:
        out, err = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    report = None
    for text in reversed(out.strip().splitlines()):
        try:
            report = json.loads(text)
            break
        except ValueError:
            continue
    triggered = [
        float(v["triggered"])
        for v in (report or {}).get("vassals", [])
        if v["triggered"] is not None
    ]
    if report is None or not triggered:
        error = ("".join(seen) + err).strip()[-2000:]
        return Run(tool.name, asked, at_launch, process.returncode, None, None, error)
    started = float(report["started"])
    return Run(
        tool.name,
        asked,
        at_launch,
        process.returncode,
        checks_s=started - launched,
        first_touch_s=started + min(triggered) - launched,
    )


def drained_to(asked: int) -> None:
    """Wait until the table holds no more than ``asked`` (and a tenth): sockets left in TIME_WAIT
    by whatever ran before expire within 60 s."""
    deadline = time.monotonic() + DRAIN_WAIT_S
    while tcp_table_size() > asked * 1.1 + 100 and time.monotonic() < deadline:
        time.sleep(1.0)


def bench(stack: Stack, sizes: Sequence[int], every: list[Tool], repeat: int) -> list[Run]:
    runs: list[Run] = []
    for asked in sizes:
        for tool in every:
            for _ in range(repeat):
                stack.wait_all_live(timeout=60)
                drained_to(asked)
                # topped up before every run: the sockets of a fill expire together, 60 s on,
                # and an earlier fill's may expire while this one fills: again, up to 3 times
                with contextlib.ExitStack() as fills:
                    for _ in range(TOP_UPS):
                        if tcp_table_size() >= asked * 0.99:
                            break
                        fills.enter_context(busy_tcp_table(asked - tcp_table_size()))
                    run = first_touch(stack, tool, asked)
                    runs.append(run)
                    shown = seconds(run.first_touch_s, 3)
                    print(
                        f"  {asked:>7} asked, {run.at_launch:>7} in the table: {tool.name}: "
                        f"first touch {shown} s (exit {run.exit_code})",
                        flush=True,
                    )
    stack.wait_all_live(timeout=60)
    return runs


HEADERS = [
    "sockets asked",
    "in the table at launch (median)",
    "tool",
    "runs",
    "checks done s (median)",
    "first touch s (median)",
    "first touch s (min-max)",
    f"first touch within {TARGET_S:g} s",
]


def rows(runs: Sequence[Run]) -> list[list[str]]:
    table = []
    groups: dict[tuple[int, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.asked, run.tool), []).append(run)
    for (asked, tool), group in groups.items():
        touches = [r.first_touch_s for r in group if r.first_touch_s is not None]
        checks = [r.checks_s for r in group if r.checks_s is not None]
        median = statistics.median(touches) if touches else None
        table.append(
            [
                f"{asked:,}",
                f"{int(statistics.median(r.at_launch for r in group)):,}",
                tool,
                f"{len(touches)} of {len(group)}",
                seconds(statistics.median(checks) if checks else None, 3),
                seconds(median, 3),
                f"{min(touches):.3f}-{max(touches):.3f}" if touches else "-",
                "-" if median is None else ("yes" if median <= TARGET_S else "no"),
            ]
        )
    return table


def markdown(runs: Sequence[Run], vassals: int, env_lines: Sequence[str]) -> str:
    lines = ["# Start-up on a busy host", "", *(f"    {line}" for line in env_lines), ""]
    lines += [
        f"{vassals} vassals (the example app, unix sockets), no load. Start-up: from the wall "
        "clock just before the tool's process starts to its first touch (`started` + the "
        "first `triggered` of its `--json`); checks done: to `started` (the sockets located, "
        "the fleet checked). Sockets asked: the host's TCP table topped up to this many "
        "(TIME_WAIT on loopback) right before each run; in the table at launch: counted then "
        "(`/proc/net/tcp` and `tcp6` lines).",
        "",
        markdown_table(HEADERS, rows(runs)),
        "",
    ]
    failed = [r for r in runs if r.first_touch_s is None]
    if failed:
        lines += [f"{len(failed)} runs touched nothing; the first said:", ""]
        lines += [f"    {line}" for line in failed[0].error.splitlines()[-10:]] + [""]
    return "\n".join(lines)


def parse_sockets(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"socket counts are whole numbers: {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"socket counts are 0 or more: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uwsgi_reload_loadtests.bench_busy",
        description="The tool's start-up (process start to first touch) against the sockets "
        "in the host's TCP table.",
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="the tool before netlink, to compare (git show aeddcb4:uwsgi_reload.py > PATH)",
    )
    parser.add_argument(
        "--sockets",
        type=parse_sockets,
        default=[1000, 10_000, 100_000, 200_000],
        help="sockets in the TCP table, in this order (default 1000,10000,100000,200000)",
    )
    parser.add_argument(
        "--vassals", type=positive_int, default=16, help="vassals of the stack (default 16)"
    )
    parser.add_argument(
        "--repeat", type=positive_int, default=3, help="runs per tool and size (default 3)"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where busy.md and busy.json go (default reports/bench-busy-<date>-<time>)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.vassals < 2:
        build_parser().error("--vassals must be 2 or more (one is touched, the rest stay live)")
    if args.before is not None and not args.before.is_file():
        build_parser().error(f"--before {args.before}: no such file")
    results = results_dir(args.results_dir, "bench-busy")
    env_lines = print_environment("uwsgi_reload_loadtests.bench_busy", argv)
    runs: list[Run] = []
    started = time.monotonic()

    def every_run() -> None:
        print(f"starting a stack of {args.vassals} vassals...", flush=True)
        with running_stack(StackConfig(vassals=args.vassals)) as stack:
            runs.extend(bench(stack, args.sockets, tools(args.before), args.repeat))

    code = guarded("bench", every_run, "stack stopped; partial results follow")
    if code is None:
        code = EXIT_OK if all(r.first_touch_s is not None for r in runs) else EXIT_SOME_RUN_FAILED
    text = markdown(runs, args.vassals, env_lines)
    (results / "busy.md").write_text(text)
    (results / "busy.json").write_text(
        json.dumps({"environment": env_lines, "runs": [r.as_json() for r in runs]}, indent=1) + "\n"
    )
    print()
    print(text)
    print(f"benchmark took {time.monotonic() - started:.0f} s")
    print(f"table: {results / 'busy.md'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
