"""Rotation control under load: full reloads with drain off and on, and broken deploys with drain.

    python -m uwsgi_reload_loadtests.bench_drain [--sizes 4,8] [--minimums 1,2] [--start-delay 1]
                                    [--request-delay 0.01] [--users 8] [--rate 0] [--repeat 1]
                                    [--broken-runs 20] [--results-dir DIR]

A separate mode of the benchmark (``python -m uwsgi_reload_loadtests.bench`` and its table are
unchanged).

Part 1, for every size N, on one stack of N vassals whose app takes ``--start-delay`` s to load:
for every m, ``uwsgi_reload.py --minimum-active-vassals m`` under locust load through nginx,
``--repeat`` times without rotation control ("drain off") and as often with
``--subscription-server --probe /`` ("drain on": unsubscribe and wait for no request in flight
before the touch, subscribe again as soon as the probe passed). Each row: makespan (first trigger
to last back), the max and p99.9 latency of requests during the reload, the p99 before it less
the load's first second (steady state), failed requests, and the makespan against
``ceil(N / (N-m))`` times the median per-vassal trigger-to-accepting and trigger-to-back times of
that same run, read from the tool's ``--json`` per-vassal timeline. ``--rate`` paces the load
below what the vassals left serving can answer.

Part 2, on one stack of 4 vassals: ``--broken-runs`` times, deploy a broken version, run the tool
with ``--subscription-server ... --probe / --minimum-active-vassals 2 --timeout 5`` under load and
count the failed requests; then deploy a good version again and wait until every vassal is live
in the router before the next run.

Output, in the results dir (default ``reports/bench-drain-<date>-<time>``): ``drain.md`` (the
command, the machine, the versions, the tables) and ``drain.json`` (every run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from uwsgi_reload import non_negative_float, non_negative_int, positive_int, rounds_needed
from uwsgi_reload_harness.stack import Stack, StackConfig, StackTimeout, running_stack

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
from .report import WARMUP_S
from .tables import markdown_table, seconds

DRAIN_OFF, DRAIN_ON = "off", "on (+ fast return, probe /)"
BROKEN_N, BROKEN_M, BROKEN_TIMEOUT = 4, 2, 5


@dataclasses.dataclass
class Run:
    n: int
    minimum: int
    drain: str
    measured: ReloadRun

    @property
    def ok(self) -> bool:
        return self.measured.all_reloaded

    def vassal_time(self, until: str = "back", *, last_round: bool = False) -> float | None:
        """Median seconds from trigger to ``until`` ("accepting" or "back") over the vassals of
        this run, from the tool's ``--json`` timeline. ``last_round``: only the vassals triggered
        after the first one was back (fewer apps loading at once, closer to a reload alone)."""
        result = self.measured.tool_json
        if result is None:
            return None
        vassals = result["vassals"]
        backs = [v["back"] for v in vassals if v["back"] is not None]
        times = [
            float(v[until]) - float(v["triggered"])
            for v in vassals
            if v[until] is not None
            and v["triggered"] is not None
            and (not last_round or (backs and v["triggered"] >= min(backs)))
        ]
        return statistics.median(times) if times else None

    def slowest_at(self) -> float | None:
        """Seconds after the reload command started of the 100 ms bucket with the slowest
        request."""
        load = self.measured.load
        if load.reload is None or not load.series:
            return None
        worst = max(load.series, key=lambda b: b.max_ms)
        return load.started + worst.t - load.reload.started

    def as_json(self) -> dict[str, Any]:
        return {
            "slowest_request_bucket_s_after_command_start": self.slowest_at(),
            "n": self.n,
            "minimum": self.minimum,
            "drain": self.drain,
            **self.measured.as_json(),
        }


@dataclasses.dataclass
class BrokenRun:
    index: int
    measured: ReloadRun
    recovered_s: float | None

    @property
    def failures(self) -> int:
        return self.measured.load.total.failures

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "recovered_s": self.recovered_s,
            **self.measured.as_json(),
        }


def measure(
    stack: Stack,
    command: list[str],
    args: argparse.Namespace,
    *,
    broken: bool = False,
) -> ReloadRun:
    reload_at = args.broken_reload_at if broken else args.reload_at
    after_reload = args.broken_after_reload if broken else args.after_reload
    return reload_under_load(
        stack,
        command,
        users=args.users,
        reload_at=reload_at,
        after_reload=after_reload,
        rate=args.rate,
        observer_interval=0.02,
        observer_readers=2,
        measure_cpu=True,
        max_run_time=reload_at + after_reload + 300,
    )


def bench_size(n: int, minimums: Sequence[int], args: argparse.Namespace, runs: list[Run]) -> None:
    print(f"N={n}: starting stack (app start {args.start_delay:g} s)...", flush=True)
    config = StackConfig(vassals=n, start_delay=args.start_delay, request_delay=args.request_delay)
    with running_stack(config) as stack:
        for m in minimums:
            for drain in (DRAIN_OFF, DRAIN_ON) * args.repeat:
                stack.wait_all_live(60)
                command = tool_command(stack, m, "--timeout", "120", drain=drain == DRAIN_ON)
                run = Run(n, m, drain, measure(stack, command, args))
                runs.append(run)
                print(f"N={n} m={m} drain {drain}: {run_line(run)}", flush=True)
        stop_and_check(stack)


def run_line(run: Run) -> str:
    m = run.measured
    failed = f" ({m.failures_text()})" if m.load.total.failures else ""
    return (
        f"exit {m.returncode}, makespan {seconds(m.makespan)} s, "
        f"failed {m.load.total.failures}{failed}, "
        f"max {m.load.during.max_ms:.0f} ms, p99.9 {m.load.during.p999:.0f} ms, "
        f"p99 steady {m.load.steady.p99:.1f} ms"
    )


def recover(stack: Stack, version: str) -> float:
    """Deploy a good version; wait until every vassal is live again (touch every vassal
    if the emperor's respawns alone do not bring them back within 30 s)."""
    started = time.monotonic()
    stack.deploy(version=version, broken=False)
    try:
        stack.wait_all_live(30)
    except StackTimeout:
        for vassal_id in stack.vassal_ids:
            stack.touch(vassal_id)
        stack.wait_all_live(60)
    return time.monotonic() - started


def bench_broken(args: argparse.Namespace, runs: list[BrokenRun]) -> None:
    print(f"broken deploys: starting stack ({BROKEN_N} vassals)...", flush=True)
    config = StackConfig(
        vassals=BROKEN_N, start_delay=args.start_delay, request_delay=args.request_delay
    )
    with running_stack(config) as stack:
        for index in range(1, args.broken_runs + 1):
            stack.wait_all_live(60)
            stack.deploy(version=f"broken-{index}", broken=True)
            command = tool_command(stack, BROKEN_M, "--timeout", str(BROKEN_TIMEOUT))
            measured = measure(stack, command, args, broken=True)
            recovered = recover(stack, f"good-{index}")
            run = BrokenRun(index, measured, recovered)
            runs.append(run)
            print(
                f"broken #{index}: exit {measured.returncode}, failed {run.failures} of "
                f"{measured.load.total.requests} ({measured.failures_text()}), "
                f"max {measured.load.during.max_ms:.0f} ms, "
                f"fewest live {measured.min_live_seen}, recovered in {recovered:.1f} s",
                flush=True,
            )
        stop_and_check(stack)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

DRAIN_HEADERS = (
    "N",
    "m",
    "drain",
    "exit",
    "makespan s",
    "rounds",
    "t_a s",
    "vs rounds x t_a",
    "last-round t_a s",
    "vs rounds x last-round t_a",
    "t_v s",
    "vs rounds x t_v",
    "command s",
    "p99 steady ms",
    "p99.9 during ms",
    "max during ms",
    "max / p99 steady",
    "slowest at s",
    "requests during",
    "failed",
    "failed when (s after the reload started)",
)


def _ratio(value: float | None, times: int, unit: float | None) -> str:
    """``value`` against ``times`` x ``unit``, e.g. "1.07x"; "-" when either is unknown."""
    if value is None or not unit:
        return "-"
    return f"{value / (times * unit):.2f}x"


def drain_rows(runs: Sequence[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        m = run.measured
        rounds = rounds_needed(run.n, run.minimum)
        ta = run.vassal_time("accepting")
        ta_last = run.vassal_time("accepting", last_round=True)
        tv = run.vassal_time("back")
        rows.append(
            [
                str(run.n),
                str(run.minimum),
                run.drain,
                str(m.returncode),
                seconds(m.makespan),
                str(rounds),
                seconds(ta),
                _ratio(m.makespan, rounds, ta),
                seconds(ta_last),
                _ratio(m.makespan, rounds, ta_last),
                seconds(tv),
                _ratio(m.makespan, rounds, tv),
                seconds(m.command_seconds),
                f"{m.load.steady.p99:.1f}",
                f"{m.load.during.p999:.0f}",
                f"{m.load.during.max_ms:.0f}",
                _ratio(m.load.during.max_ms, 1, m.load.steady.p99),
                seconds(run.slowest_at(), 1),
                str(m.load.during.requests),
                str(m.load.total.failures),
                m.failures_text(),
            ]
        )
    return rows


BROKEN_HEADERS = (
    "run",
    "exit",
    "command s",
    "requests",
    "failed",
    "max during ms",
    "fewest live",
    "recovery s",
    "failed when (s after the reload started)",
)


def broken_rows(runs: Sequence[BrokenRun]) -> list[list[str]]:
    return [
        [
            str(r.index),
            str(r.measured.returncode),
            seconds(r.measured.command_seconds),
            str(r.measured.load.total.requests),
            str(r.failures),
            f"{r.measured.load.during.max_ms:.0f}",
            str(r.measured.min_live_seen),
            seconds(r.recovered_s, 1),
            r.measured.failures_text(),
        ]
        for r in runs
    ]


def markdown(
    runs: Sequence[Run],
    broken: Sequence[BrokenRun],
    env_lines: Sequence[str],
    args: argparse.Namespace,
) -> str:
    lines = ["# Rotation control under load: drain off vs on, broken deploys", ""]
    lines += [f"- {line}" for line in env_lines]
    pace = (
        f"paced to {args.rate:g} requests/s in all (`--rate`)"
        if args.rate
        else "each as fast as the stack answers (closed loop)"
    )
    lines += [
        f"- load: {args.users} locust users through nginx, {pace}; reload {args.reload_at:g} s "
        f"into the load, {args.after_reload:g} s of load after it; app start (demo app sleep while "
        f"loading) {args.start_delay:g} s; the view takes {args.request_delay * 1000:g} ms per "
        "request",
        "",
        "## Full reload, drain off vs on",
        "",
        "Drain on: `--subscription-server <stack's> --probe /` (unsubscribe, wait until the "
        "router has no request in flight to the vassal, touch; subscribe again as soon as the "
        "probe passed). Both with `--timeout 120`.",
        "",
        "- makespan: first trigger to last back, from the tool's `--json` per-vassal timeline "
        "(a vassal's drain before its trigger is not in its own time; the drain of vassals "
        "started after the first trigger is in the makespan).",
        "- t_a: median trigger-to-accepting of the vassals in that same run, from the tool's "
        "`--json` per-vassal timeline (`accepting` - `triggered`: the emperor registered the "
        "reload and reports the new instance accepting); `vs rounds x t_a` is the makespan "
        "against ceil(N / (N-m)) x t_a, the issue's target (1.2x).",
        "- last-round t_a: the same, for the vassals triggered after the first one was back "
        "(fewer apps loading at once on 2 cores, so closer to a reload alone).",
        "- t_v: median trigger-to-back (`duration`): accepting, then live in the fastrouter "
        "(drain on: its probe passed and it was subscribed again; drain off: its master's next "
        "announce).",
        "- slowest at: when the 100 ms bucket holding the slowest request started, seconds "
        "after the reload command started.",
        "- rounds = ceil(N / (N-m)); command s: the tool's wall time (includes the drains).",
        "- p99 steady: the load report's `steady.p99`, the requests before the reload less the "
        f"first {WARMUP_S:g} s of the load (the users connecting); p99.9 and max during: "
        "`during.p999`, `during.max_ms`; max / p99 steady: the issue's target is 3x at most "
        "(and under 100 ms); failed: failed requests over the whole load run; failed when: "
        "each burst of them, its kind, when it failed (seconds since the reload command "
        "started) and the nearest vassal trigger or back.",
        "",
    ]
    if runs:
        lines += [markdown_table(DRAIN_HEADERS, drain_rows(runs)), ""]
    else:
        lines += ["(no run)", ""]
    lines += [
        "## Broken deploy with drain on",
        "",
        f"One stack of {BROKEN_N} vassals. Each run: `stack.deploy(broken=True)`, then "
        f"`uwsgi_reload.py --subscription-server <stack's> --probe / --minimum-active-vassals "
        f"{BROKEN_M} --timeout {BROKEN_TIMEOUT}` under load (reload {args.broken_reload_at:g} s "
        f"into the load, {args.broken_after_reload:g} s after); then a good deploy and "
        "`stack.wait_all_live` before the next run (recovery s: deploy to all live again).",
        "",
    ]
    if broken:
        clean = sum(1 for r in broken if r.failures == 0)
        expected = sum(1 for r in broken if r.measured.returncode == 1)
        lines += [
            f"**0 failed in {clean} of {len(broken)} runs** (asked for {args.broken_runs}); "
            f"the tool exited 1 (timed out on the broken vassals) in {expected} of "
            f"{len(broken)}.",
            "",
            markdown_table(BROKEN_HEADERS, broken_rows(broken)),
            "",
        ]
    else:
        lines += ["(no run)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_minimums(text: str) -> list[int]:
    try:
        values = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"minimums are whole numbers: {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"every minimum must be 1 or more: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uwsgi_reload_loadtests.bench_drain",
        description="Full reloads under load with drain off and on, and broken deploys with "
        "drain on.",
    )
    parser.add_argument(
        "--minimums", type=parse_minimums, default=[1, 2], help="values of m (default 1,2)"
    )
    add_run_options(
        parser,
        results="bench-drain",
        writes="drain.md and drain.json",
        sizes=[4, 8],
        start_delay=1.0,
        reload_at=2.0,
        after_reload=1.5,
    )
    parser.add_argument(
        "--broken-runs", type=non_negative_int, default=20, help="broken-deploy runs (default 20)"
    )
    parser.add_argument(
        "--request-delay",
        type=non_negative_float,
        default=0.0,
        help="seconds the demo view sleeps per request: with 0.01 the vassals, not locust, set "
        "the pace, and every vassal has requests queued when its reload begins (what drain is "
        "for) (default 0)",
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=1,
        help="runs of each N and m, drain off and on taking turns (default 1)",
    )
    parser.add_argument(
        "--rate",
        type=non_negative_float,
        default=0.0,
        help="requests per second over all users (0: each user as fast as the stack answers). "
        "Below what the m vassals left serving can answer, latency during a reload shows what "
        "the reload does rather than the lost capacity (default 0)",
    )
    parser.add_argument(
        "--broken-reload-at",
        type=non_negative_float,
        default=1.0,
        help="broken runs: seconds of load before (default 1)",
    )
    parser.add_argument(
        "--broken-after-reload",
        type=non_negative_float,
        default=1.0,
        help="broken runs: seconds of load after (default 1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    results = results_dir(args.results_dir, "bench-drain")
    env_lines = print_environment("uwsgi_reload_loadtests.bench_drain", argv)
    runs: list[Run] = []
    broken: list[BrokenRun] = []
    started = time.monotonic()

    def every_run() -> None:
        for n in args.sizes:
            minimums = [m for m in args.minimums if m < n]
            bench_size(n, minimums, args, runs)
        if args.broken_runs:
            bench_broken(args, broken)

    code = guarded("bench", every_run, "stacks stopped; partial results follow")
    if code is None:
        code = EXIT_OK if all(r.ok for r in runs) else EXIT_SOME_RUN_FAILED
    text = markdown(runs, broken, env_lines, args)
    (results / "drain.md").write_text(text)
    (results / "drain.json").write_text(
        json.dumps(
            {
                "environment": env_lines,
                "runs": [r.as_json() for r in runs],
                "broken_runs": [r.as_json() for r in broken],
            },
            indent=1,
        )
        + "\n"
    )
    print()
    print(text)
    print(f"benchmark took {time.monotonic() - started:.0f} s")
    print(f"table: {results / 'drain.md'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
