"""The main job in one command: a stack, load through nginx, ``uwsgi_reload.py`` in the middle.

    python -m uwsgi_reload_loadtests.demo [--vassals 4] [--minimum 1] [--start-delay 0] [--results-dir DIR]

Brings up the example stack (Django app, N vassals, emperor + fastrouter, nginx) outside pytest
with :func:`uwsgi_reload_harness.stack.running_stack`, runs locust through nginx, runs the reload tool with
``--json`` ``--reload-at`` seconds into the load while a ``RouterObserver`` samples the live nodes,
and prints what happened: each vassal's reload (triggered, back), and requests, failures, rps and
latency before, during and after the reload. It writes ``timeline.png``, ``report.md`` and the raw
data (``load.json``, ``reload.json``, ``live.csv``, ``demo.json``) to the results dir.

Every process it starts is stopped and every temp dir removed however it ends (Ctrl-C, SIGTERM,
an error): exit 0 when the reload succeeded with no failed request, 1 when not, 2 when the demo
could not run, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from uwsgi_reload_harness.stack import Proc, Stack, StackConfig, running_stack
from .cli import (
    EXIT_OK,
    EXIT_SOME_RUN_FAILED,
    guarded,
    print_environment,
    results_dir,
)
from .observer import RouterObserver, Sample
from .plot import (
    VassalSpan,
    markdown_table,
    seconds,
    text_table,
    timeline_png,
)
from .report import PHASES, LoadReport
from .runner import run_load
from uwsgi_reload import non_negative_float, non_negative_int

#: Runs a command and writes the CPU seconds its whole tree used (RUSAGE_CHILDREN of this small
#: wrapper: the command only, not locust, which starts it, nor the wrapper's own start-up).
MEASURE_CPU = (
    "import json, resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "with open(sys.argv[1], 'w') as out:\n"
    "    json.dump({'user': usage.ru_utime, 'system': usage.ru_stime}, out)\n"
    "sys.exit(code)\n"
)


def measured(command: Sequence[str], cpu_file: Path) -> list[str]:
    """``command`` run by a wrapper that writes its CPU seconds to ``cpu_file``."""
    return [sys.executable, "-c", MEASURE_CPU, str(cpu_file), *command]


def read_cpu_seconds(cpu_file: Path) -> float | None:
    try:
        data = json.loads(cpu_file.read_text())
    except (OSError, ValueError):
        return None
    return float(data["user"]) + float(data["system"])


def tool_command(stack: Stack, minimum: int, *extra: str) -> list[str]:
    """This repository's ``uwsgi_reload.py --json`` for ``stack``."""
    return stack.reload_command("--json", "--minimum-active-vassals", str(minimum), *extra)


def last_json_line(stdout: str) -> dict[str, Any] | None:
    """The JSON report a reload command printed last on stdout (``--json``), if any."""
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict):
                return data
    return None


@dataclasses.dataclass
class ReloadUnderLoad:
    """One reload command run under load, with everything measured around it."""

    command: list[str]
    load: LoadReport
    live: list[Sample]
    observer_gap: float
    observer_errors: int
    result: dict[str, Any] | None
    """The command's ``--json`` report (``vassals``: name, triggered, back, duration...)."""
    cpu_seconds: float | None

    @property
    def returncode(self) -> int | None:
        return None if self.load.reload is None else self.load.reload.returncode

    @property
    def command_seconds(self) -> float | None:
        return None if self.load.reload is None else self.load.reload.duration

    def spans(self) -> list[VassalSpan]:
        """Each vassal's reload in seconds since the load started."""
        if self.result is None:
            return []
        offset = float(self.result["started"]) - self.load.started

        def at(value: Any) -> float | None:
            return None if value is None else offset + float(value)

        return [
            VassalSpan(str(v["name"]), at(v["triggered"]), at(v["back"]), str(v["outcome"]))
            for v in self.result["vassals"]
        ]

    def durations(self) -> list[float]:
        """Trigger-to-back seconds of every vassal that came back."""
        if self.result is None:
            return []
        return [float(v["duration"]) for v in self.result["vassals"] if v["duration"] is not None]

    @property
    def makespan(self) -> float | None:
        """First trigger to last back; None unless every vassal came back."""
        spans = self.spans()
        if not spans or any(s.back is None or s.triggered is None for s in spans):
            return None
        return max(s.back for s in spans if s.back is not None) - min(
            s.triggered for s in spans if s.triggered is not None
        )

    def min_live_during(self) -> int | None:
        reload = self.load.reload
        if reload is None or not self.live:
            return None
        end = reload.ended if reload.ended is not None else self.load.ended
        before = [s for s in self.live if s.t <= reload.started]
        window = [s for s in self.live if reload.started <= s.t <= end]
        if before:
            window.append(before[-1])
        return min(s.live for s in window) if window else None

    @property
    def all_reloaded(self) -> bool:
        return self.returncode == 0 and self.makespan is not None


@contextlib.contextmanager
def progress(observer: RouterObserver, total: int, every: float = 1.0) -> Iterator[None]:
    """Print a line with the live node count every ``every`` seconds while the block runs."""
    stop = threading.Event()
    started = time.monotonic()

    def loop() -> None:
        while not stop.wait(every):
            live = observer.live
            shown = "?" if live is None else str(live)
            print(f"  {time.monotonic() - started:5.1f} s  live nodes {shown}/{total}", flush=True)

    thread = threading.Thread(target=loop, name="demo-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def reload_under_load(
    stack: Stack,
    command: Sequence[str],
    *,
    work_dir: Path,
    users: int = 8,
    reload_at: float = 3.0,
    after_reload: float = 3.0,
    observer_interval: float = 0.01,
    show_progress: bool = False,
    rate: float = 0.0,
) -> ReloadUnderLoad:
    """Locust through nginx; ``command`` (wrapped to measure its CPU) ``reload_at`` s in."""
    cpu_file = work_dir / "cpu.json"
    cpu_file.unlink(missing_ok=True)
    obs = RouterObserver(stack.fastrouter_stats, key=stack.host, interval=observer_interval)
    shown = progress(obs, len(stack.vassal_ids)) if show_progress else contextlib.nullcontext()
    with obs, shown:
        try:
            load = run_load(
                stack.url,
                host_header=stack.host,
                users=users,
                reload_command=shlex.join(measured(command, cpu_file)),
                reload_at=reload_at,
                after_reload=after_reload,
                max_run_time=reload_at + after_reload + 300,
                report_path=work_dir / "load.json",
                rate=rate,
                nice=5,
            )
        except BaseException:
            stop_reload_commands(stack)
            raise
    result = None if load.reload is None else last_json_line(load.reload.stdout)
    return ReloadUnderLoad(
        command=list(command),
        load=load,
        live=obs.timeline,
        observer_gap=obs.max_gap,
        observer_errors=obs.errors,
        result=result,
        cpu_seconds=read_cpu_seconds(cpu_file),
    )


def stop_reload_commands(stack: Stack, timeout: float = 10.0) -> None:
    """SIGTERM what still runs with ``--emperor-path <this stack's dir>`` in its argv: a reload
    command locust started in a session of its own, left behind when locust was killed
    (Ctrl-C). The dir is a fresh temp dir, so only commands started for this stack match (the
    emperor itself has ``--emperor <dir>/``: SIGTERM would make it reload, not stop)."""
    needle = b"\0--emperor-path\0" + str(stack.emperor_path).encode() + b"\0"
    strays = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                strays.append(int(entry.name))
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while strays and time.monotonic() < deadline:
        strays = [pid for pid in strays if Path(f"/proc/{pid}").exists()]
        time.sleep(0.1)


def stop_and_check(stack: Stack) -> tuple[set[Proc], set[Proc]]:
    """Stop the stack now; (every process seen, those still alive after stopping)."""
    seen = stack.processes() | stack.stop()
    return seen, {p for p in seen if p.alive()}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

PHASE_HEADERS = ("phase", "requests", "failed", "rps", "p50 ms", "p99 ms", "max ms", "failures")
VASSAL_HEADERS = ("vassal", "triggered s", "back s", "took s", "outcome")


def phase_rows(load: LoadReport) -> list[list[str]]:
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


def vassal_rows(run: ReloadUnderLoad) -> list[list[str]]:
    return [
        [
            s.name,
            seconds(s.triggered),
            seconds(s.back),
            seconds(None if s.back is None or s.triggered is None else s.back - s.triggered),
            s.outcome,
        ]
        for s in run.spans()
    ]


def summary_lines(run: ReloadUnderLoad, vassals: int, minimum: int) -> list[str]:
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
    lowest = run.min_live_during()
    lines.append(
        f"fewest live nodes the observer saw during the reload: {lowest} of {vassals} "
        f"(minimum {minimum}); {len(run.live)} samples, largest gap "
        f"{run.observer_gap * 1000:.0f} ms, {run.observer_errors} failed reads"
    )
    if run.cpu_seconds is not None:
        lines.append(f"CPU used by the reload tool: {run.cpu_seconds:.2f} s")
    return lines


def markdown_report(
    run: ReloadUnderLoad,
    *,
    env_lines: Sequence[str],
    args: argparse.Namespace,
    picture: str,
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
        "\n".join(f"- {line}" for line in summary_lines(run, args.vassals, args.minimum)),
        f"![timeline]({picture})",
    ]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uwsgi_reload_loadtests.demo",
        description="Start the example stack, put load on it through nginx, reload every "
        "vassal with uwsgi_reload.py in the middle, and report what the clients saw.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--vassals", type=non_negative_int, default=4, help="number of vassals")
    parser.add_argument(
        "--minimum", type=non_negative_int, default=1, help="--minimum-active-vassals for the tool"
    )
    parser.add_argument(
        "--start-delay",
        type=non_negative_float,
        default=0.0,
        help="seconds the app sleeps while loading",
    )
    parser.add_argument(
        "--users", type=non_negative_int, default=8, help="locust users (connections)"
    )
    parser.add_argument(
        "--reload-at",
        type=non_negative_float,
        default=3.0,
        help="seconds of load before the reload",
    )
    parser.add_argument(
        "--after-reload",
        type=non_negative_float,
        default=3.0,
        help="seconds of load after the reload",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where the picture and reports go (default: reports/demo-<date>-<time>)",
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.vassals < 1:
        parser.error("--vassals must be 1 or more")
    if args.minimum >= args.vassals:
        parser.error(f"--minimum {args.minimum} leaves none of {args.vassals} vassals to reload")
    if args.users < 1:
        parser.error("--users must be 1 or more")


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
    with running_stack(config) as stack, tempfile.TemporaryDirectory(prefix="ur-demo-") as tmp:
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
            work_dir=Path(tmp),
            users=args.users,
            reload_at=args.reload_at,
            after_reload=args.after_reload,
            show_progress=True,
        )
        (results / "load.json").write_bytes(Path(tmp, "load.json").read_bytes())
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
    run: ReloadUnderLoad,
    args: argparse.Namespace,
    results: Path,
    env_lines: Sequence[str],
    stack_processes: Sequence[Proc],
    left: set[Proc],
    base_dir: Path,
) -> int:
    (results / "reload.json").write_text(json.dumps(run.result, indent=1) + "\n")
    with open(results / "live.csv", "w") as out:
        out.write("t_since_load_start,live\n")
        out.writelines(f"{s.t - run.load.started:.3f},{s.live}\n" for s in run.live)
    picture = timeline_png(
        results / "timeline.png",
        report=run.load,
        live=run.live,
        vassals=run.spans(),
        total_vassals=args.vassals,
        minimum=args.minimum,
        title=f"uwsgi_reload.py under load: {args.vassals} vassals, minimum {args.minimum}, "
        f"app start delay {args.start_delay:g} s",
    )
    markdown = results / "report.md"
    markdown.write_text(markdown_report(run, env_lines=env_lines, args=args, picture=picture.name))
    (results / "demo.json").write_text(
        json.dumps(
            {
                "vassals": args.vassals,
                "minimum": args.minimum,
                "returncode": run.returncode,
                "makespan": run.makespan,
                "failures": run.load.total.failures,
                "min_live_during": run.min_live_during(),
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
    for line in summary_lines(run, args.vassals, args.minimum):
        print(line)
    print()
    print(f"timeline picture: {picture}")
    print(f"markdown report:  {markdown}")
    ok = run.all_reloaded and run.load.total.failures == 0 and not left
    return EXIT_OK if ok else EXIT_SOME_RUN_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
