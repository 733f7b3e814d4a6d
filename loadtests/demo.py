"""The main job in one command: a stack, load through nginx, ``uwsgi_reload.py`` in the middle,
with the recommended command and, beside it, the same command without drain and probe.

    python -m uwsgi_reload_loadtests.demo [--vassals 4] [--minimum 1] [--start-delay 0]
                                          [--request-delay 0.01] [--recommended-only]
                                          [--results-dir DIR]

Brings up the example stack (Django app, N vassals, emperor + fastrouter, nginx) outside pytest
with :func:`uwsgi_reload_harness.stack.running_stack` and, on that one stack, reloads every
vassal twice under locust load through nginx, ``--reload-at`` seconds into each load, while a
``RouterObserver`` samples the live nodes:

1. **drain + probe**, the recommended command (the README's first example):
   ``uwsgi-reload ... --subscription-server <router's> --probe <health path>``;
2. **no drain**: the same command without ``--subscription-server`` and ``--probe``
   (left out with ``--recommended-only``).

Every vassal is live again before the second run starts. The app's view takes
``--request-delay`` seconds (default 10 ms), so that, as on a busy site, the vassals and not the
load client set the pace and each vassal has requests queued in its socket when its reload
begins: without drain those wait for the vassal's whole restart. It prints what happened: the
two runs side by side, then each run's requests, failures, rps and latency before, during and
after the reload, and each vassal's reload (triggered, back). It writes ``timeline.png`` (one
column per run), ``report.md`` (each run with its command) and the raw data (``demo.json``, and
per run ``load-<run>.json``, ``reload-<run>.json``, ``live-<run>.csv``) to the results dir.

Every process it starts is stopped and every temp dir removed however it ends (Ctrl-C, SIGTERM,
an error): exit 0 when every run reloaded every vassal and the recommended run lost no request
(a request the no-drain run loses is what that run can show: it is reported, and does not change
the exit code), 1 when not, 2 when the demo could not run, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import uwsgi_reload
from uwsgi_reload import non_negative_float, non_negative_int
from uwsgi_reload_harness.stack import Proc, Stack, StackConfig, running_stack

from .cli import (
    EXIT_OK,
    EXIT_SOME_RUN_FAILED,
    add_run_options,
    guarded,
    print_environment,
    results_dir,
    stop_and_check,
)
from .measure import ReloadRun, reload_under_load
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

Table = Callable[[Sequence[str], Sequence[Sequence[str]]], str]

# ---------------------------------------------------------------------------------------------
# The two commands
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    """One way of running the tool: the recommended one drains and probes."""

    name: str
    slug: str
    drain: bool


RECOMMENDED = Kind("drain + probe", "drain-probe", drain=True)
NO_DRAIN = Kind("no drain", "no-drain", drain=False)


def demo_command(stack: Stack, minimum: int, kind: Kind) -> list[str]:
    """The tool as the README's first example runs it, on this stack, with ``--json`` for the
    report; without ``--subscription-server`` and ``--probe`` for the no-drain run.

    Built here, flag by flag, so that what each run drains is the demo's own choice and does not
    move with a default of the harness's."""
    command = [
        sys.executable,
        str(Path(uwsgi_reload.__file__).resolve()),
        "--emperor-path",
        str(stack.emperor_path),
        "--emperor-stats-socket",
        stack.emperor_stats,
        "--fastrouter-stats-socket",
        stack.fastrouter_stats,
    ]
    if kind.drain:
        command += [
            "--subscription-server",
            stack.subscription_server,
            "--probe",
            stack.config.health_path,
        ]
    return [*command, "--minimum-active-vassals", str(minimum), "--json"]


@dataclasses.dataclass
class DemoRun:
    """One reload under load of the demo's stack, with the command it ran."""

    kind: Kind
    measured: ReloadRun

    @property
    def ok(self) -> bool:
        """Every vassal reloaded; for the recommended run, no request lost either."""
        lost = self.measured.load.total.failures
        return self.measured.all_reloaded and (lost == 0 or not self.kind.drain)

    def as_json(self) -> dict[str, Any]:
        run = self.measured
        during = run.load.during
        return {
            "run": self.kind.name,
            "drain": self.kind.drain,
            "command": run.command,
            "returncode": run.returncode,
            "makespan": run.makespan,
            "failures": run.load.total.failures,
            "failures_during": during.failures,
            "requests_during": during.requests,
            "p99_ms_during": during.p99,
            "max_ms_during": during.max_ms,
            "p99_ms_steady": run.load.steady.p99,
            "failure_groups": [g.as_json() for g in run.failure_groups()],
            "failed_requests": [f.as_json() for f in run.failures()],
            "min_live_during": run.min_live_seen,
            "observer_max_gap_ms": run.observer.max_gap * 1000,
            "cpu_seconds": run.cpu_seconds,
        }


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

COMPARISON_HEADERS = (
    "run",
    "exit",
    "makespan s",
    "requests during",
    "failed",
    "p50 ms during",
    "p99 ms during",
    "max ms during",
    "p99 ms steady",
    "fewest live",
)


def comparison_rows(runs: Sequence[DemoRun]) -> list[list[str]]:
    """One row per run: what its reload cost the clients, while the command ran."""
    rows = []
    for r in runs:
        m = r.measured
        during = m.load.during
        rows.append(
            [
                r.kind.name,
                "-" if m.returncode is None else str(m.returncode),
                seconds(m.makespan),
                str(during.requests),
                str(m.load.total.failures),
                f"{during.p50:.1f}",
                f"{during.p99:.1f}",
                f"{during.max_ms:.1f}",
                f"{m.load.steady.p99:.1f}",
                "-" if m.min_live_seen is None else str(m.min_live_seen),
            ]
        )
    return rows


VASSAL_HEADERS = ("vassal", "drain s", "triggered s", "back s", "took s", "outcome")


def vassal_rows(run: ReloadRun) -> list[list[str]]:
    """Each vassal's reload, seconds since the load started; ``drain s``: how long the tool
    waited for the router to have no request in flight to it before the touch."""
    t0 = run.load.started
    drained = {str(v["name"]): v.get("drain") for v in (run.tool_json or {}).get("vassals", [])}

    def since_load(t: float | None) -> str:
        return seconds(None if t is None else t - t0)

    return [
        [
            s.name,
            seconds(drained.get(s.name), 3),
            since_load(s.triggered),
            since_load(s.back),
            seconds(s.took),
            s.outcome,
        ]
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


def comparison_lines(runs: Sequence[DemoRun]) -> list[str]:
    """The slowest request during each reload, against the steady p99 of its own run."""
    return [
        f"{r.kind.name}: slowest request during the reload {r.measured.load.during.max_ms:.0f} ms "
        f"({r.measured.load.during.max_ms / max(r.measured.load.steady.p99, 1e-9):.1f}x the "
        f"steady p99 of {r.measured.load.steady.p99:.1f} ms), "
        f"{r.measured.load.total.failures} failed requests"
        for r in runs
    ]


def failures_table(run: ReloadRun, table: Table) -> str:
    """Each burst of failed requests: its kind and when, against the reload's events."""
    if not run.load.total.failures:
        return "no failed request"
    return table(FAILURE_HEADERS, failure_rows(run.failure_groups()))


def title(args: argparse.Namespace) -> str:
    return (
        f"{args.vassals} vassals, minimum {args.minimum}, app start delay {args.start_delay:g} s, "
        f"view {args.request_delay * 1000:g} ms, {args.users} users"
    )


def markdown_report(
    runs: Sequence[DemoRun],
    *,
    env_lines: Sequence[str],
    args: argparse.Namespace,
    picture: str | None,
) -> str:
    parts = [
        f"# Reload under load: {title(args)}",
        "\n".join(f"- {line}" for line in env_lines),
        f"{len(runs)} reloads of every vassal on one stack, one after the other, each "
        f"{args.reload_at:g} s into its own load ({args.users} users through nginx, closed "
        f"loop, the app's view taking {args.request_delay * 1000:g} ms), load kept "
        f"{args.after_reload:g} s after the command ended; every vassal live again before the "
        "next run.",
        "## The runs side by side (latency of the requests that overlapped the reload command)\n\n"
        + markdown_table(COMPARISON_HEADERS, comparison_rows(runs)),
        "\n".join(f"- {line}" for line in comparison_lines(runs)),
    ]
    for number, r in enumerate(runs, 1):
        run = r.measured
        parts += [
            f"## Run {number}: {r.kind.name}\n\nCommand:\n\n```\n{shlex.join(run.command)}\n```",
            "### Requests before, during and after the reload\n\n"
            + markdown_table(PHASE_HEADERS, phase_rows(run.load)),
            "### Each vassal (seconds since the load started)\n\n"
            + markdown_table(VASSAL_HEADERS, vassal_rows(run)),
            "### Failed requests (kind, when, the nearest vassal trigger or back)\n\n"
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
        "vassal with uwsgi_reload.py in the middle, with the recommended command (drain + "
        "probe) and then without drain, and report what the clients saw.",
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
    parser.add_argument(
        "--request-delay",
        type=non_negative_float,
        default=0.01,
        help="seconds the app's view takes per request: requests queue in the vassals' "
        "sockets, as on a busy site (default 0.01)",
    )
    parser.add_argument(
        "--recommended-only",
        action="store_true",
        help="run only the recommended command (drain + probe), not the no-drain one beside it",
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
    kinds = [RECOMMENDED] if args.recommended_only else [RECOMMENDED, NO_DRAIN]
    config = StackConfig(
        vassals=args.vassals, start_delay=args.start_delay, request_delay=args.request_delay
    )
    print(f"starting stack ({title(args)})...", flush=True)
    started = time.monotonic()
    runs: list[DemoRun] = []
    with running_stack(config) as stack:
        print(
            f"stack up in {time.monotonic() - started:.1f} s: {stack.url} (Host: {stack.host}), "
            f"stack dir {stack.base_dir}, emperor pid {stack.pids['emperor']}, "
            f"nginx pid {stack.pids['nginx']}",
            flush=True,
        )
        for number, kind in enumerate(kinds, 1):
            stack.wait_all_live(timeout=60)
            command = demo_command(stack, args.minimum, kind)
            print(
                f"\nrun {number} of {len(kinds)}, {kind.name}: load running ({args.users} users "
                f"through nginx), at {args.reload_at:g} s:\n  {shlex.join(command)}\n"
                f"then {args.after_reload:g} s more...",
                flush=True,
            )
            measured = reload_under_load(
                stack,
                command,
                users=args.users,
                reload_at=args.reload_at,
                after_reload=args.after_reload,
                observer_interval=0.01,
                observer_readers=2,
                measure_cpu=True,
                load_json=results / f"load-{kind.slug}.json",
                show_progress=True,
                max_run_time=args.reload_at + args.after_reload + 300,
            )
            runs.append(DemoRun(kind, measured))
        stack_processes = sorted(stack.processes(), key=lambda p: p.pid)
        print("load done; stopping stack...", flush=True)
        seen, left = stop_and_check(stack)
        base_dir = stack.base_dir
    print(
        f"stopped {len(seen)} processes of the stack, {len(left)} left"
        + ("" if base_dir.exists() else "; stack dir removed"),
        flush=True,
    )
    return _write_and_print(runs, args, results, env_lines, stack_processes, left, base_dir)


def _write_and_print(
    runs: Sequence[DemoRun],
    args: argparse.Namespace,
    results: Path,
    env_lines: Sequence[str],
    stack_processes: Sequence[Proc],
    left: set[Proc],
    base_dir: Path,
) -> int:
    for r in runs:
        run = r.measured
        (results / f"reload-{r.kind.slug}.json").write_text(
            json.dumps(run.tool_json, indent=1) + "\n"
        )
        with open(results / f"live-{r.kind.slug}.csv", "w") as out:
            out.write("t_since_load_start,live\n")
            out.writelines(f"{s.t - run.load.started:.3f},{s.live}\n" for s in run.live)
    try:
        picture: Path | None = timeline_png(
            results / "timeline.png",
            [(r.kind.name, r.measured) for r in runs],
            total_vassals=args.vassals,
            minimum=args.minimum,
            title=f"uwsgi_reload.py under load: {title(args)}",
        )
    except PictureUnavailable as exc:
        print(exc, file=sys.stderr)
        picture = None
    markdown = results / "report.md"
    shown = None if picture is None else picture.name
    markdown.write_text(markdown_report(runs, env_lines=env_lines, args=args, picture=shown))
    (results / "demo.json").write_text(
        json.dumps(
            {
                "vassals": args.vassals,
                "minimum": args.minimum,
                "start_delay": args.start_delay,
                "request_delay": args.request_delay,
                "users": args.users,
                "runs": [r.as_json() for r in runs],
                "stack_dir": str(base_dir),
                "stack_processes": [[p.pid, p.start] for p in stack_processes],
                "left_running": [[p.pid, p.start] for p in sorted(left, key=lambda p: p.pid)],
            },
            indent=1,
        )
        + "\n"
    )
    print()
    print(f"== report: {title(args)} ==")
    print(text_table(COMPARISON_HEADERS, comparison_rows(runs)))
    for line in comparison_lines(runs):
        print(line)
    for number, r in enumerate(runs, 1):
        run = r.measured
        print()
        print(f"-- run {number}: {r.kind.name} --")
        print(shlex.join(run.command))
        print()
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
    ok = all(r.ok for r in runs) and not left
    return EXIT_OK if ok else EXIT_SOME_RUN_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
