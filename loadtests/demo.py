"""The main job in one command: a stack, load through nginx, ``uwsgi_reload.py`` in the middle.

    python -m uwsgi_reload_loadtests.demo [--vassals 4] [--minimum 1] [--start-delay 0]
                                          [--results-dir DIR]

Brings up the example stack (Django app, N vassals, emperor + fastrouter, nginx) outside pytest
with :func:`uwsgi_reload_harness.stack.running_stack`, runs locust through nginx, runs the reload
tool with ``--json`` ``--reload-at`` seconds into the load while a ``RouterObserver`` samples the
live nodes, and prints what happened: each vassal's reload (triggered, back), and requests,
failures, rps and latency before, during and after the reload. It writes ``timeline.png``,
``report.md`` and the raw data (``load.json``, ``reload.json``, ``live.csv``, ``demo.json``) to
the results dir.

Every process it starts is stopped and every temp dir removed however it ends (Ctrl-C, SIGTERM,
an error): exit 0 when the reload succeeded with no failed request, 1 when not, 2 when the demo
could not run, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from uwsgi_reload import non_negative_int
from uwsgi_reload_harness.stack import Proc, StackConfig, running_stack

from .cli import (
    EXIT_OK,
    EXIT_SOME_RUN_FAILED,
    add_run_options,
    guarded,
    print_environment,
    results_dir,
    stop_and_check,
)
from .measure import ReloadRun, reload_under_load, tool_command
from .picture import PictureUnavailable, timeline_png
from .tables import (
    FAILURE_HEADERS,
    PHASE_HEADERS,
    failure_rows,
    markdown_table,
    phase_rows,
    seconds,
    text_table,
)

# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

VASSAL_HEADERS = ("vassal", "triggered s", "back s", "took s", "outcome")


def vassal_rows(run: ReloadRun) -> list[list[str]]:
    t0 = run.load.started

    def since_load(t: float | None) -> str:
        return seconds(None if t is None else t - t0)

    return [
        [s.name, since_load(s.triggered), since_load(s.back), seconds(s.took), s.outcome]
        for s in run.timeline
    ]


def summary_lines(run: ReloadRun, vassals: int, minimum: int) -> list[str]:
    reload = run.load.reload
    lines = []
    if reload is None or reload.ended is None:
        lines.append("the reload command did not finish while the load ran")
    else:
        lines.append(
            f"reload command exited {reload.returncode} after {reload.duration:.2f} s "
            f"(from {reload.started - run.load.started:.2f} s to "
            f"{reload.ended - run.load.started:.2f} s of load)"
        )
    if run.makespan is not None:
        durations = run.durations()
        lines.append(
            f"makespan (first trigger to last back): {run.makespan:.2f} s; one vassal took "
            f"{min(durations):.2f}-{max(durations):.2f} s (median "
            f"{statistics.median(durations):.2f} s)"
        )
    lines.append(
        f"fewest live nodes the observer saw during the reload: {run.min_live_seen} of "
        f"{vassals} (minimum {minimum}); {run.observer.samples} samples, largest gap "
        f"{run.observer.max_gap * 1000:.0f} ms, {run.observer.errors} failed reads"
    )
    if run.cpu_seconds is not None:
        lines.append(f"CPU used by the reload tool: {run.cpu_seconds:.2f} s")
    return lines


def failures_table(
    run: ReloadRun, table: Callable[[Sequence[str], Sequence[Sequence[str]]], str]
) -> str:
    """Each burst of failed requests: its kind and when, against the reload's events."""
    if not run.load.total.failures:
        return "no failed request"
    return table(FAILURE_HEADERS, failure_rows(run.failure_groups()))


def markdown_report(
    run: ReloadRun,
    *,
    env_lines: Sequence[str],
    args: argparse.Namespace,
    picture: str | None,
) -> str:
    title = (
        f"# Reload under load: {args.vassals} vassals, minimum {args.minimum}, "
        f"app start delay {args.start_delay:g} s"
    )
    parts = [
        title,
        "\n".join(f"- {line}" for line in env_lines),
        f"Reload command (run {args.reload_at:g} s into the load, {args.users} users "
        f"through nginx):\n\n```\n{shlex.join(run.command)}\n```",
        "## Requests before, during and after the reload\n\n"
        + markdown_table(PHASE_HEADERS, phase_rows(run.load)),
        "## Each vassal (seconds since the load started)\n\n"
        + markdown_table(VASSAL_HEADERS, vassal_rows(run)),
        "## Failed requests (kind, when, the nearest vassal trigger or back)\n\n"
        + failures_table(run, markdown_table),
        "\n".join(f"- {line}" for line in summary_lines(run, args.vassals, args.minimum)),
    ]
    if picture is not None:
        parts.append(f"![timeline]({picture})")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uwsgi_reload_loadtests.demo",
        description="Start the example stack, put load on it through nginx, reload every "
        "vassal with uwsgi_reload.py in the middle, and report what the clients saw.",
    )
    parser.add_argument(
        "--vassals", type=non_negative_int, default=4, help="number of vassals (default 4)"
    )
    parser.add_argument(
        "--minimum",
        type=non_negative_int,
        default=1,
        help="--minimum-active-vassals for the tool (default 1)",
    )
    add_run_options(
        parser,
        results="demo",
        writes="the picture and the reports",
        reload_at=3.0,
        after_reload=3.0,
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.vassals < 1:
        parser.error("--vassals must be 1 or more")
    if args.minimum >= args.vassals:
        parser.error(f"--minimum {args.minimum} leaves none of {args.vassals} vassals to reload")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    results = results_dir(args.results_dir, "demo")
    argv = list(sys.argv[1:] if argv is None else argv)
    code = guarded(
        "demo",
        lambda: _demo(args, results, argv),
        "the stack was stopped and its temp dirs removed",
    )
    assert code is not None
    return code


def _demo(args: argparse.Namespace, results: Path, argv: Sequence[str]) -> int:
    env_lines = print_environment("uwsgi_reload_loadtests.demo", argv)
    config = StackConfig(vassals=args.vassals, start_delay=args.start_delay)
    print(
        f"starting stack ({args.vassals} vassals, app start delay {args.start_delay:g} s)...",
        flush=True,
    )
    started = time.monotonic()
    with running_stack(config) as stack:
        print(
            f"stack up in {time.monotonic() - started:.1f} s: {stack.url} (Host: {stack.host}), "
            f"stack dir {stack.base_dir}, emperor pid {stack.pids['emperor']}, "
            f"nginx pid {stack.pids['nginx']}",
            flush=True,
        )
        print(
            f"load running ({args.users} users through nginx), reload at {args.reload_at:g} s, "
            f"then {args.after_reload:g} s more...",
            flush=True,
        )
        run = reload_under_load(
            stack,
            tool_command(stack, args.minimum),
            users=args.users,
            reload_at=args.reload_at,
            after_reload=args.after_reload,
            observer_interval=0.01,
            observer_readers=2,
            measure_cpu=True,
            load_json=results / "load.json",
            show_progress=True,
            max_run_time=args.reload_at + args.after_reload + 300,
        )
        stack_processes = sorted(stack.processes(), key=lambda p: p.pid)
        print("load done; stopping stack...", flush=True)
        seen, left = stop_and_check(stack)
        base_dir = stack.base_dir
    print(
        f"stopped {len(seen)} processes of the stack, {len(left)} left"
        + ("" if base_dir.exists() else "; stack dir removed"),
        flush=True,
    )
    return _write_and_print(run, args, results, env_lines, stack_processes, left, base_dir)


def _write_and_print(
    run: ReloadRun,
    args: argparse.Namespace,
    results: Path,
    env_lines: Sequence[str],
    stack_processes: Sequence[Proc],
    left: set[Proc],
    base_dir: Path,
) -> int:
    (results / "reload.json").write_text(json.dumps(run.tool_json, indent=1) + "\n")
    with open(results / "live.csv", "w") as out:
        out.write("t_since_load_start,live\n")
        out.writelines(f"{s.t - run.load.started:.3f},{s.live}\n" for s in run.live)
    try:
        picture: Path | None = timeline_png(
            results / "timeline.png",
            run,
            total_vassals=args.vassals,
            minimum=args.minimum,
            title=f"uwsgi_reload.py under load: {args.vassals} vassals, minimum {args.minimum}, "
            f"app start delay {args.start_delay:g} s",
        )
    except PictureUnavailable as exc:
        print(exc, file=sys.stderr)
        picture = None
    markdown = results / "report.md"
    shown = None if picture is None else picture.name
    markdown.write_text(markdown_report(run, env_lines=env_lines, args=args, picture=shown))
    (results / "demo.json").write_text(
        json.dumps(
            {
                "vassals": args.vassals,
                "minimum": args.minimum,
                "returncode": run.returncode,
                "makespan": run.makespan,
                "failures": run.load.total.failures,
                "failure_groups": [g.as_json() for g in run.failure_groups()],
                "failed_requests": [f.as_json() for f in run.failures()],
                "min_live_during": run.min_live_seen,
                "cpu_seconds": run.cpu_seconds,
                "stack_dir": str(base_dir),
                "stack_processes": [[p.pid, p.start] for p in stack_processes],
                "left_running": [[p.pid, p.start] for p in sorted(left, key=lambda p: p.pid)],
            },
            indent=1,
        )
        + "\n"
    )
    print()
    print(f"== report: {args.vassals} vassals, minimum {args.minimum} ==")
    print(text_table(PHASE_HEADERS, phase_rows(run.load)))
    print()
    print("each vassal, seconds since the load started:")
    print(text_table(VASSAL_HEADERS, vassal_rows(run)))
    print()
    print("failed requests:")
    print(failures_table(run, text_table))
    print()
    for line in summary_lines(run, args.vassals, args.minimum):
        print(line)
    print()
    if picture is not None:
        print(f"timeline picture: {picture}")
    print(f"markdown report:  {markdown}")
    ok = run.all_reloaded and run.load.total.failures == 0 and not left
    return EXIT_OK if ok else EXIT_SOME_RUN_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
