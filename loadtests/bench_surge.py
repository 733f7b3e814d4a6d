"""Surge under load: capacity lost, latency and makespan without twins and with K twins per key.

    python -m uwsgi_reload_loadtests.bench_surge [--sizes 1,2,4,8] [--surges 0,1,2]
                                    [--start-delay 1] [--users 8] [--rate 100] [--repeat 1]
                                    [--results-dir DIR]

For every size N, on one stack of N vassals (the demo app, ``--start-delay`` s to load), under
locust load through nginx paced to ``--rate`` requests/s, with drain
(``--subscription-server <stack's> --probe /``):

- every K >= 1 of ``--surges``: ``uwsgi_reload.py --max-surge K --minimum-active-vassals N``;
- for surge 0, the tool without twins at the same pace of reloads: ``--minimum-active-vassals
  N - K`` for every K >= 1 asked (K vassals reloading at once, as with K twins), and
  ``N - 1`` when only 0 is asked. With N - K < 0 there is no such run.

Each row: the minimum used, the capacity lost (the integral of N - live nodes over the reload
command's run, in vassal-seconds, from the router observer's timeline), the fewest live nodes the
observer saw, the max latency during the reload against the steady p99, the makespan (first
trigger to last back, from the tool's ``--json``), the command's whole time (twins added and
removed included) and the failed requests.

Output, in the results dir (default ``reports/bench-surge-<date>-<time>``): ``surge.md`` (the
command, the machine, the versions, the table) and ``surge.json`` (every run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from uwsgi_reload import non_negative_float, positive_int
from uwsgi_reload_harness.stack import StackConfig, running_stack

from .capacity import lost_capacity
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
from .tables import markdown_table, seconds


@dataclasses.dataclass
class Run:
    n: int
    surge: int
    minimum: int
    measured: ReloadRun

    @property
    def ok(self) -> bool:
        return self.measured.all_reloaded

    @property
    def lost(self) -> float | None:
        m = self.measured
        if m.load.reload is None:
            return None
        return lost_capacity(m.live, self.n, *m.window())

    @property
    def latency_ratio(self) -> float | None:
        steady = self.measured.load.steady.p99
        return self.measured.load.during.max_ms / steady if steady else None

    def as_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "surge": self.surge,
            "minimum": self.minimum,
            "lost_vassal_seconds": self.lost,
            **self.measured.as_json(),
        }


def plans(n: int, surges: Sequence[int]) -> list[tuple[int, int]]:
    """(K, m) of every run on a stack of ``n``: the surge runs at m = N, and for surge 0 the
    minimums that reload as many at once as K twins would."""
    twins = [k for k in surges if k > 0]
    runs: list[tuple[int, int]] = []
    if 0 in surges:
        for m in sorted({n - k for k in twins or [1]}, reverse=True):
            if m >= 0:
                runs.append((0, m))
    return runs + [(k, n) for k in twins]


def surge_args(surge: int) -> list[str]:
    return ["--timeout", "120", *(["--max-surge", str(surge)] if surge else [])]


def bench_size(n: int, args: argparse.Namespace, runs: list[Run]) -> None:
    print(f"N={n}: starting stack (app start {args.start_delay:g} s)...", flush=True)
    config = StackConfig(vassals=n, start_delay=args.start_delay)
    with running_stack(config) as stack:
        for surge, m in plans(n, args.surges) * args.repeat:
            stack.wait_all_live(60)
            command = tool_command(stack, m, *surge_args(surge))
            measured = reload_under_load(
                stack,
                command,
                users=args.users,
                reload_at=args.reload_at,
                after_reload=args.after_reload,
                rate=args.rate,
                observer_interval=0.02,
                observer_readers=2,
                max_run_time=args.reload_at + args.after_reload + 300,
            )
            run = Run(n, surge, m, measured)
            runs.append(run)
            print(f"N={n} K={surge} m={m}: {run_line(run)}", flush=True)
        stop_and_check(stack)


def run_line(run: Run) -> str:
    m = run.measured
    return (
        f"exit {m.returncode}, lost {seconds(run.lost, 3)} vassal-s, "
        f"min live {m.min_live_seen}, max {m.load.during.max_ms:.0f} ms "
        f"(p99 steady {m.load.steady.p99:.1f} ms), makespan {seconds(m.makespan)} s, "
        f"failed {m.load.total.failures}"
    )


HEADERS = (
    "N",
    "K",
    "m",
    "exit",
    "lost vassal-s",
    "observer min live",
    "max during ms",
    "p99 steady ms",
    "max steady ms",
    "max / p99 steady",
    "makespan s",
    "command s",
    "requests during",
    "failed",
)


def rows(runs: Sequence[Run]) -> list[list[str]]:
    out = []
    for run in runs:
        m = run.measured
        ratio = run.latency_ratio
        out.append(
            [
                str(run.n),
                str(run.surge),
                str(run.minimum),
                str(m.returncode),
                seconds(run.lost, 3),
                str(m.min_live_seen),
                f"{m.load.during.max_ms:.0f}",
                f"{m.load.steady.p99:.1f}",
                f"{m.load.steady.max_ms:.0f}",
                "-" if ratio is None else f"{ratio:.1f}x",
                seconds(m.makespan),
                seconds(m.command_seconds),
                str(m.load.during.requests),
                str(m.load.total.failures),
            ]
        )
    return out


def markdown(runs: Sequence[Run], env_lines: Sequence[str], args: argparse.Namespace) -> str:
    lines = ["# Surge under load: capacity lost without and with twins", ""]
    lines += [f"- {line}" for line in env_lines]
    pace = (
        f"paced to {args.rate:g} requests/s in all (`--rate`)"
        if args.rate
        else "each as fast as the stack answers (closed loop)"
    )
    lines += [
        f"- load: {args.users} locust users through nginx, {pace}; reload {args.reload_at:g} s "
        f"into the load, {args.after_reload:g} s of load after it; app start (demo app sleep "
        f"while loading) {args.start_delay:g} s",
        "- every run with drain: `--subscription-server <stack's> --probe / --timeout 120`; "
        "K >= 1: `--max-surge K --minimum-active-vassals N`; K = 0: "
        "`--minimum-active-vassals m` with m = N - K for each K >= 1 asked (as many reloading "
        "at once as with K twins)",
        "- lost vassal-s: the integral of (N - live nodes) over the reload command's run, from "
        "the router observer (one read every 20 ms over two threads), the key's fewest; "
        "observer min live: the fewest live nodes it saw during the command; makespan: first "
        "trigger to last back (`--json`); command s: the tool's whole run, twins added and "
        "removed included; max / p99 steady: the max latency during the reload against the "
        "p99 of the load before it (less its first second); max steady: the slowest request of "
        "that steady load, no reload running (how far one request strays from the p99 anyway)",
        "",
    ]
    lines += [markdown_table(HEADERS, rows(runs)) if runs else "(no run)", ""]
    return "\n".join(lines)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are whole numbers: {text!r}") from None
    if not sizes or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"every size must be 1 or more: {text!r}")
    return sizes


def parse_surges(text: str) -> list[int]:
    try:
        values = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"surges are whole numbers: {text!r}") from None
    if not values or values[0] < 0:
        raise argparse.ArgumentTypeError(f"every surge must be 0 or more: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uwsgi_reload_loadtests.bench_surge",
        description="Full reloads under load without twins and with --max-surge K: capacity "
        "lost, latency, makespan.",
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=[1, 2, 4, 8],
        help="numbers of vassals, one stack each: 1 or more, a key served by one vassal "
        "included (default 1,2,4,8)",
    )
    parser.add_argument(
        "--surges", type=parse_surges, default=[0, 1, 2], help="values of K (default 0,1,2)"
    )
    add_run_options(
        parser,
        results="bench-surge",
        writes="surge.md and surge.json",
        start_delay=1.0,
        reload_at=6.0,
        after_reload=1.5,
    )
    parser.add_argument(
        "--rate",
        type=non_negative_float,
        default=100.0,
        help="requests per second over all users (0: each user as fast as the stack answers) "
        "(default 100)",
    )
    parser.add_argument(
        "--repeat", type=positive_int, default=1, help="runs of each N, K and m (default 1)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    results = results_dir(args.results_dir, "bench-surge")
    env_lines = print_environment("uwsgi_reload_loadtests.bench_surge", argv)
    runs: list[Run] = []
    started = time.monotonic()

    def every_run() -> None:
        for n in args.sizes:
            bench_size(n, args, runs)

    code = guarded("bench", every_run, "stacks stopped; partial results follow")
    if code is None:
        code = EXIT_OK if all(r.ok for r in runs) else EXIT_SOME_RUN_FAILED
    text = markdown(runs, env_lines, args)
    (results / "surge.md").write_text(text)
    (results / "surge.json").write_text(
        json.dumps({"environment": env_lines, "runs": [r.as_json() for r in runs]}, indent=1) + "\n"
    )
    print()
    print(text)
    print(f"benchmark took {time.monotonic() - started:.0f} s")
    print(f"table: {results / 'surge.md'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
