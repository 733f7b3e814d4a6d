"""How long a full reload takes, under load, against a lower bound and two other schedules.

    python -m uwsgi_reload_loadtests.bench [--sizes 2,4,8,16] [--minimums 1,half] [--quick]
                                           [--results-dir DIR]

For every size N one stack (N vassals) runs every schedule below, each under the same locust load
through nginx, one after the other:

* ``one at a time``: ``uwsgi_reload.py --minimum-active-vassals N-1``: never two vassals down.
  Each vassal's trigger-to-back time in this run is a reload *alone*; their median is the
  single-vassal reload time ``t1`` of this stack.
* ``uwsgi_reload``: the tool with ``--minimum-active-vassals m`` (as many in flight as m allows,
  the next one started as soon as one is back).
* ``2014 plan``: the original script's schedule, reproduced for the benchmark (not an option of
  the tool) by ``loadtests/original_plan.py`` from uwsgi_reload's public functions: touch the
  first N-m together, wait until they are all back, then the last m one by one.
* ``lower bound``: ``ceil(N / (N - m)) * t1``: at most N-m can be down at once and each needs t1.

The makespan is first trigger to last back (back: the emperor registered the reload, the vassal
is accepting and its node is live in the fastrouter again). Each run also records the failed
requests, the max and p99 latency of requests during the reload, the fewest live nodes a
``RouterObserver`` saw, and the CPU seconds the reload command used (its own, measured by a
wrapper with ``getrusage(RUSAGE_CHILDREN)``: not locust's, not the stack's).

Output, in the results dir (default ``reports/bench-<date>-<time>``): ``bench.md`` (the command,
the machine, the versions, the tables), ``bench.png``, ``bench.json`` (every run, every vassal).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from uwsgi_reload import rounds_needed
from uwsgi_reload_harness.stack import StackConfig, running_stack

from .cli import (
    EXIT_OK,
    EXIT_SOME_RUN_FAILED,
    Quick,
    add_run_options,
    guarded,
    print_environment,
    resolve_quick,
    results_dir,
    stop_and_check,
)
from .measure import ReloadRun, reload_under_load, tool_command
from .picture import PictureUnavailable, bench_png
from .schedules import LOWER_BOUND, ONE_AT_A_TIME, ORIGINAL, TOOL, original_plan_command
from .tables import markdown_table, seconds

DEFAULT_SIZES = (2, 4, 8, 16)
QUICK_SIZES = (2, 4)
#: m = N-1 gets its own row (and a 2014-plan run) up to this N; above it the one-at-a-time run
#: stands for it, and the 2014 plan with m = N-1 is the same schedule.
SMALL_N = 4


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One schedule run under load on one stack."""

    n: int
    minimum: int
    schedule: str
    measured: ReloadRun

    @property
    def ok(self) -> bool:
        return self.measured.all_reloaded

    def as_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "minimum": self.minimum,
            "schedule": self.schedule,
            **self.measured.as_json(),
        }


def parse_minimums(text: str) -> list[str]:
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    for token in tokens:
        if token not in ("half", "n-1") and not token.isdigit():
            raise argparse.ArgumentTypeError(
                f"{token!r}: a minimum is a whole number, 'half' (N/2) or 'n-1'"
            )
    if not tokens:
        raise argparse.ArgumentTypeError("no minimum given")
    return tokens


def minimums_for(n: int, tokens: Sequence[str]) -> list[int]:
    """The minimums to run for N vassals, each in 1..N-1."""
    values = set()
    for token in tokens:
        value = {"half": n // 2, "n-1": n - 1}.get(token)
        values.add(int(token) if value is None else value)
    return sorted(m for m in values if 1 <= m < n)


def plan_runs(n: int, minimums: Sequence[int]) -> list[tuple[str, int]]:
    """(schedule, m) in the order they run on one stack; the one-at-a-time run comes first."""
    runs = [(ONE_AT_A_TIME, n - 1)]
    for m in minimums:
        if m < n - 1:
            runs.append((TOOL, m))
        if m < n - 1 or n <= SMALL_N:
            runs.append((ORIGINAL, m))
    return runs


def bench_one_size(
    n: int,
    minimums: Sequence[int],
    args: argparse.Namespace,
    runs: list[Run],
    stacks: list[dict[str, Any]],
) -> None:
    """Every run for N vassals on one stack, appended to ``runs`` as it ends (an interrupt
    keeps what was measured); ``stacks`` gets the stack's dir and every process it had."""
    print(f"N={n}: starting stack ({n} vassals)...", flush=True)
    started = time.monotonic()
    with running_stack(StackConfig(vassals=n, start_delay=args.start_delay)) as stack:
        print(f"N={n}: stack up in {time.monotonic() - started:.1f} s", flush=True)
        record: dict[str, Any] = {"n": n, "dir": str(stack.base_dir), "processes": set()}
        stacks.append(record)
        for schedule, m in plan_runs(n, minimums):
            record["processes"] |= stack.processes()
            stack.wait_all_live(60)
            command = (
                original_plan_command(stack, m)
                if schedule == ORIGINAL
                else tool_command(stack, m, "--timeout", "120", drain=False)
            )
            print(
                f"N={n} m={m} {schedule}: load running, reload at {args.reload_at:g} s...",
                flush=True,
            )
            measured = reload_under_load(
                stack,
                command,
                users=args.users,
                reload_at=args.reload_at,
                after_reload=args.after_reload,
                observer_interval=0.02,
                observer_readers=2,
                measure_cpu=True,
                max_run_time=args.reload_at + args.after_reload + 300,
            )
            run = Run(n, m, schedule, measured)
            runs.append(run)
            print(f"N={n} m={m} {schedule}: {run_line(run)}", flush=True)
        seen, left = stop_and_check(stack)
        record["processes"] |= seen
        print(
            f"N={n}: stack stopped ({len(record['processes'])} processes seen, {len(left)} left)",
            flush=True,
        )


def run_line(run: Run) -> str:
    m = run.measured
    if not run.ok:
        stderr = "" if m.load.reload is None else m.load.reload.stderr.strip()[-500:]
        return f"FAILED (exit {m.returncode}): {stderr}"
    cpu = "-" if m.cpu_seconds is None else f"{m.cpu_seconds:.2f} s"
    failed = f" ({m.failures_text()})" if m.load.total.failures else ""
    return (
        f"makespan {seconds(m.makespan)} s, failed {m.load.total.failures}{failed}, "
        f"max {m.load.during.max_ms:.0f} ms, fewest live {m.min_live_seen}, CPU {cpu}"
    )


# ---------------------------------------------------------------------------------------------
# Tables and the picture
# ---------------------------------------------------------------------------------------------


def single_reload_time(runs: Sequence[Run], n: int) -> float | None:
    """Median trigger-to-back of the one-at-a-time run: each vassal reloaded alone."""
    for run in runs:
        if run.n == n and run.schedule == ONE_AT_A_TIME and run.measured.durations():
            return statistics.median(run.measured.durations())
    return None


def find_run(runs: Sequence[Run], n: int, m: int, schedule: str) -> Run | None:
    for run in runs:
        if (
            run.n == n
            and run.schedule == schedule
            and (schedule == ONE_AT_A_TIME or run.minimum == m)
        ):
            return run
    return None


def tool_run(runs: Sequence[Run], n: int, m: int) -> Run | None:
    """With m = N-1 the tool's run is the one-at-a-time run."""
    return find_run(runs, n, m, ONE_AT_A_TIME if m == n - 1 else TOOL)


SUMMARY_HEADERS = (
    "N",
    "m",
    "rounds",
    "t1 s",
    "lower bound s",
    "uwsgi_reload s",
    "vs bound",
    "one at a time s",
    "2014 plan s",
    "failed (tool/1x1/2014)",
    "max ms during (tool/1x1/2014)",
    "tool CPU s",
)


def _triple(values: Sequence[str | None]) -> str:
    return " / ".join("-" if v is None else v for v in values)


def summary_rows(
    runs: Sequence[Run], sizes: Sequence[int], minimums: dict[int, list[int]]
) -> list[list[str]]:
    rows = []
    for n in sizes:
        t1 = single_reload_time(runs, n)
        for m in minimums[n]:
            rounds = rounds_needed(n, m)
            bound = None if t1 is None else rounds * t1
            trio = [
                tool_run(runs, n, m),
                find_run(runs, n, m, ONE_AT_A_TIME),
                find_run(runs, n, m, ORIGINAL),
            ]
            spans = [None if r is None else r.measured.makespan for r in trio]
            tool = spans[0]
            ratio = "-" if tool is None or not bound else f"{tool / bound:.2f}x"
            tool_cpu = None if trio[0] is None else trio[0].measured.cpu_seconds
            rows.append(
                [
                    str(n),
                    str(m),
                    str(rounds),
                    seconds(t1),
                    seconds(bound),
                    seconds(tool),
                    ratio,
                    seconds(spans[1]),
                    seconds(spans[2]),
                    _triple(
                        [None if r is None else str(r.measured.load.total.failures) for r in trio]
                    ),
                    _triple(
                        [
                            None if r is None else f"{r.measured.load.during.max_ms:.0f}"
                            for r in trio
                        ]
                    ),
                    seconds(tool_cpu),
                ]
            )
    return rows


DETAIL_HEADERS = (
    "N",
    "m",
    "schedule",
    "exit",
    "makespan s",
    "command s",
    "one vassal s (median, min-max)",
    "requests during",
    "failed",
    "p99 ms during",
    "max ms during",
    "fewest live",
    "CPU s",
    "failed when (s after the reload started)",
)


def detail_rows(runs: Sequence[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        m = run.measured
        durations = m.durations()
        spread = (
            f"{statistics.median(durations):.2f} ({min(durations):.2f}-{max(durations):.2f})"
            if durations
            else "-"
        )
        rows.append(
            [
                str(run.n),
                str(run.minimum),
                run.schedule,
                str(m.returncode),
                seconds(m.makespan),
                seconds(m.command_seconds),
                spread,
                str(m.load.during.requests),
                str(m.load.total.failures),
                f"{m.load.during.p99:.0f}",
                f"{m.load.during.max_ms:.0f}",
                str(m.min_live_seen),
                seconds(m.cpu_seconds),
                m.failures_text(),
            ]
        )
    return rows


STAGE_HEADERS = (
    "N",
    "lone reloads seen",
    "touch -> emperor registered s",
    "registered -> accepting s",
    "accepting -> live in router s",
    "touch -> back s",
)


def _median(stages: Sequence[dict[str, float]], part: Callable[[dict[str, float]], float]) -> str:
    return f"{statistics.median(part(s) for s in stages):.2f}"


def stage_rows(runs: Sequence[Run]) -> list[list[str]]:
    """Where a lone reload's time goes, from the 2014 driver's one-by-one batches (it records
    when it first saw each stage, at its 0.1 s polling resolution)."""
    rows = []
    for n in sorted({r.n for r in runs}):
        lone: list[dict[str, float]] = []
        for run in runs:
            if run.n != n or run.schedule != ORIGINAL or run.measured.tool_json is None:
                continue
            vassals = run.measured.tool_json["vassals"]
            triggers = [v["triggered"] for v in vassals]
            lone += [
                v["stages"]
                for v in vassals
                if triggers.count(v["triggered"]) == 1 and "back" in v["stages"]
            ]
        if not lone:
            continue

        rows.append(
            [
                str(n),
                str(len(lone)),
                _median(lone, lambda s: s["registered"]),
                _median(lone, lambda s: s["accepting"] - s["registered"]),
                _median(lone, lambda s: s["back"] - s["accepting"]),
                _median(lone, lambda s: s["back"]),
            ]
        )
    return rows


def write_picture(
    path: Path, runs: Sequence[Run], sizes: Sequence[int], minimums: dict[int, list[int]]
) -> Path:
    groups: list[str] = []
    spans: dict[str, list[float | None]] = {
        s: [] for s in (LOWER_BOUND, TOOL, ONE_AT_A_TIME, ORIGINAL)
    }
    latency: dict[str, list[float | None]] = {s: [] for s in (TOOL, ONE_AT_A_TIME, ORIGINAL)}
    for n in sizes:
        t1 = single_reload_time(runs, n)
        for m in minimums[n]:
            groups.append(f"N={n}\nm={m}")
            spans[LOWER_BOUND].append(None if t1 is None else rounds_needed(n, m) * t1)
            for schedule, run in (
                (TOOL, tool_run(runs, n, m)),
                (ONE_AT_A_TIME, find_run(runs, n, m, ONE_AT_A_TIME)),
                (ORIGINAL, find_run(runs, n, m, ORIGINAL)),
            ):
                spans[schedule].append(None if run is None else run.measured.makespan)
                latency[schedule].append(None if run is None else run.measured.load.during.max_ms)
    return bench_png(
        path,
        groups,
        spans,
        latency,
        "Full reload under load: makespan (first trigger to last back), max latency during it",
    )


def markdown(
    runs: Sequence[Run],
    sizes: Sequence[int],
    minimums: dict[int, list[int]],
    env_lines: Sequence[str],
    args: argparse.Namespace,
    picture: str | None,
) -> str:
    setup = (
        f"Each run: locust, {args.users} users through nginx, the reload command "
        f"{args.reload_at:g} s into the load, {args.after_reload:g} s more load after it; "
        f"app start delay {args.start_delay:g} s; one stack per N, runs in the order listed "
        "in the last table."
    )
    legend = (
        "- **t1**: median trigger-to-back time of one vassal reloaded alone (the one-at-a-time "
        "run of the same stack).\n"
        "- **lower bound**: ceil(N / (N - m)) x t1.\n"
        "- **uwsgi_reload**: `uwsgi_reload.py --minimum-active-vassals m` (for m = N-1 it is "
        "the one-at-a-time run).\n"
        "- **one at a time**: `uwsgi_reload.py --minimum-active-vassals N-1`.\n"
        "- **2014 plan**: first N-m vassals together, then the last m one by one, each batch "
        "waited for (`loadtests/original_plan.py`, a driver for the benchmark, not an option "
        "of the tool).\n"
        "- makespan: first trigger to last back (registered by the emperor, accepting, live in "
        "the fastrouter). failed: failed requests of the whole load run. max ms during: "
        "slowest request that overlapped the reload command. tool CPU: user+system seconds of "
        "the `uwsgi_reload.py` process (getrusage of a wrapper). failed when: each burst of "
        "failed requests, its kind, when it failed (seconds since the reload command started) "
        "and the nearest vassal trigger or back."
    )
    parts = [
        "# Full reload under load: uwsgi_reload vs lower bound, one at a time, 2014 plan",
        "\n".join(f"- {line}" for line in env_lines),
        setup,
        markdown_table(SUMMARY_HEADERS, summary_rows(runs, sizes, minimums)),
        legend,
    ]
    if picture is not None:
        parts.append(f"![benchmark]({picture})")
    stages = stage_rows(runs)
    if stages:
        parts += [
            "## Where a lone reload's time goes",
            "Medians over the vassals the 2014 driver reloaded alone (its one-by-one batches), "
            "from the first poll (every 0.1 s) that saw each stage.",
            markdown_table(STAGE_HEADERS, stages),
        ]
    parts += ["## Every run", markdown_table(DETAIL_HEADERS, detail_rows(runs))]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uwsgi_reload_loadtests.bench",
        description="Makespan of a full reload under load: uwsgi_reload.py against the lower "
        "bound, one vassal at a time, and the 2014 plan.",
    )
    parser.add_argument(
        "--minimums",
        type=parse_minimums,
        default=None,
        help="minimums per N: whole numbers, 'half' (N/2), 'n-1' (default 1,half,n-1; "
        "--quick: 1,n-1); m = N-1 rows only for N <= 4",
    )
    add_run_options(
        parser,
        results="bench",
        writes="bench.md, bench.png and bench.json",
        sizes=Quick(list(DEFAULT_SIZES), list(QUICK_SIZES)),
        reload_at=Quick(2.0, 1.0),
        after_reload=Quick(1.5, 1.0),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_quick(build_parser().parse_args(argv))
    sizes: list[int] = args.sizes
    tokens = args.minimums or (["1", "n-1"] if args.quick else ["1", "half", "n-1"])
    minimums = {n: [m for m in minimums_for(n, tokens) if m < n - 1 or n <= SMALL_N] for n in sizes}
    results = results_dir(args.results_dir, "bench")
    env_lines = print_environment("uwsgi_reload_loadtests.bench", argv)
    runs: list[Run] = []
    stacks: list[dict[str, Any]] = []
    started = time.monotonic()

    def every_size() -> None:
        for n in sizes:
            bench_one_size(n, minimums[n], args, runs, stacks)

    code = guarded("bench", every_size, "stacks stopped, temp dirs removed; partial results follow")
    if code is None:
        code = EXIT_OK if all(r.ok for r in runs) else EXIT_SOME_RUN_FAILED
    if not runs:
        return code
    done = [n for n in sizes if any(r.n == n for r in runs)]
    try:
        picture: Path | None = write_picture(results / "bench.png", runs, done, minimums)
    except PictureUnavailable as exc:
        print(exc, file=sys.stderr)
        picture = None
    text = markdown(
        runs, done, minimums, env_lines, args, None if picture is None else picture.name
    )
    (results / "bench.md").write_text(text)
    (results / "bench.json").write_text(
        json.dumps(
            {
                "environment": env_lines,
                "runs": [r.as_json() for r in runs],
                "stacks": [
                    {
                        "n": st["n"],
                        "dir": st["dir"],
                        "processes": sorted([p.pid, p.start] for p in st["processes"]),
                    }
                    for st in stacks
                ],
            },
            indent=1,
        )
        + "\n"
    )
    print()
    print(text)
    print(f"benchmark took {time.monotonic() - started:.0f} s")
    print(f"table:   {results / 'bench.md'}")
    if picture is not None:
        print(f"picture: {picture}")
    print(f"data:    {results / 'bench.json'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
