"""Warm-up and canary under load: the first requests after a reload, and what a soak costs.

    python -m uwsgi_reload_loadtests.bench_warmup [--vassals 4] [--minimum 2]
                                    [--cold-requests 10] [--cold-delay 0.05] [--soak 5]
                                    [--users 8] [--rate 200] [--repeat 3] [--results-dir DIR]

One stack of ``--vassals`` vassals of the demo app with four releases: v1 and v2 are slow on
their first requests (each worker fills its cache lazily, its first ``--cold-requests``
requests to ``/`` taking ``--cold-delay`` s longer each), w1 and w2 are not. Every run deploys
the release of its pair that ``current`` does not point to and runs ``uwsgi_reload.py`` with
drain (``--subscription-server <stack's> --probe /health``) and ``--minimum-active-vassals
--minimum`` under locust load on ``/`` through nginx, paced to ``--rate`` requests/s.

Part 1, ``--repeat`` times each, taking turns: the cold release without warm-up, the cold
release with ``--warmup / --warmup-requests <cold requests>`` (the tool fills each reloaded
worker's cache while the vassal is out of rotation), and the release with no cache to fill (what
a reload costs the slowest request anyway: CPU taken by the apps loading, fewer vassals
serving). Each row: the steady p99 (the load before the reload, less its first second) and the
slowest request of that steady load, the slowest request from the reload's start to the end of
the load (the last vassal's first users come after the tool exits), and that against the steady
p99: the issue's target is 2x at most with warm-up.

Part 2, ``--repeat`` times each, taking turns, with the releases with no cache to fill: the
same reload without a canary, and with ``--canary 1 --soak <soak>``: the makespan (first
trigger to last back, from the tool's ``--json``) and the command's whole time; the difference
is what the canary and its soak cost.

Output, in the results dir (default ``reports/bench-warmup-<date>-<time>``): ``warmup.md`` (the
command, the machine, the versions, the tables) and ``warmup.json`` (every run).
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

from uwsgi_reload import non_negative_float, positive_float, positive_int
from uwsgi_reload_harness.stack import Release, Stack, StackConfig, running_stack

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

#: The slowest request after a reload, against the steady p99, with warm-up (the issue's target).
TARGET = 2.0
HEALTH, USERS_PATH = "/health", "/"
#: Part 1's runs: a cold release without and with warm-up, a release with no cache to fill
COLD_OFF, COLD_ON, NO_CACHE = "cold, no warm-up", "cold, --warmup", "no cache to fill"


@dataclasses.dataclass
class Run:
    part: str  # "warm-up" or "canary"
    mode: str  # part 1: COLD_OFF, COLD_ON, NO_CACHE; part 2: "off" / "on"
    release: str
    measured: ReloadRun

    @property
    def ok(self) -> bool:
        return self.measured.all_reloaded and self.measured.load.total.failures == 0

    @property
    def slowest_ms(self) -> float:
        """The slowest request from the reload's start to the end of the load."""
        load = self.measured.load
        return max(load.during.max_ms, load.after.max_ms)

    @property
    def ratio(self) -> float | None:
        steady = self.measured.load.steady.p99
        return self.slowest_ms / steady if steady else None

    def as_json(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "mode": self.mode,
            "release": self.release,
            "slowest_ms_from_reload_start": self.slowest_ms,
            "slowest_vs_steady_p99": self.ratio,
            "max_ms_steady": self.measured.load.steady.max_ms,
            "max_ms_after": self.measured.load.after.max_ms,
            **self.measured.as_json(),
        }


#: The releases slow on their first requests, and those with no cache to fill.
COLD, WARM = ("v1", "v2"), ("w1", "w2")


def release_stack(args: argparse.Namespace) -> StackConfig:
    cold = [Release(n, cold_requests=args.cold_requests, cold_delay=args.cold_delay) for n in COLD]
    return StackConfig(
        vassals=args.vassals,
        health_path=HEALTH,
        start_delay=args.start_delay,
        releases=(*cold, *map(Release, WARM)),
    )


def measure(
    stack: Stack, pair: Sequence[str], flags: Sequence[str], args: argparse.Namespace
) -> tuple[str, ReloadRun]:
    """Deploy the release of ``pair`` that ``current`` does not point to, then reload under
    load."""
    release = pair[1] if stack.current_release == pair[0] else pair[0]
    stack.wait_all_live(60)
    stack.deploy(release=release)
    command = tool_command(stack, args.minimum, "--timeout", "60", *flags)
    measured = reload_under_load(
        stack,
        command,
        path=USERS_PATH,
        users=args.users,
        reload_at=args.reload_at,
        after_reload=args.after_reload,
        rate=args.rate,
        observer_interval=0.02,
        observer_readers=2,
        max_run_time=args.reload_at + args.after_reload + 300,
    )
    return release, measured


def bench(args: argparse.Namespace, runs: list[Run]) -> None:
    print(f"starting stack ({args.vassals} vassals, releases v1 and v2)...", flush=True)
    warm = ["--warmup", USERS_PATH, "--warmup-requests", str(args.cold_requests)]
    canary = ["--canary", "1", "--soak", f"{args.soak:g}"]
    parts: list[tuple[str, dict[str, tuple[Sequence[str], list[str]]]]] = [
        ("warm-up", {COLD_OFF: (COLD, []), COLD_ON: (COLD, warm), NO_CACHE: (WARM, [])}),
        ("canary", {"off": (WARM, []), "on": (WARM, canary)}),
    ]
    with running_stack(release_stack(args)) as stack:
        for part, modes in parts:
            for _ in range(args.repeat):
                for mode, (pair, flags) in modes.items():
                    release, measured = measure(stack, pair, flags, args)
                    run = Run(part, mode, release, measured)
                    runs.append(run)
                    print(f"{part} {mode} ({release}): {run_line(run)}", flush=True)
        stop_and_check(stack)


def run_line(run: Run) -> str:
    m = run.measured
    return (
        f"exit {m.returncode}, slowest {run.slowest_ms:.0f} ms "
        f"(p99 steady {m.load.steady.p99:.1f} ms, {_ratio(run.ratio)}), "
        f"makespan {seconds(m.makespan)} s, command {seconds(m.command_seconds)} s, "
        f"failed {m.load.total.failures}"
    )


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


WARMUP_HEADERS = (
    "release",
    "deployed",
    "exit",
    "p99 steady ms",
    "max steady ms",
    "slowest after the reload started ms",
    "slowest / p99 steady",
    "makespan s",
    "requests during",
    "failed",
)


def warmup_rows(runs: Sequence[Run]) -> list[list[str]]:
    return [
        [
            r.mode,
            r.release,
            str(r.measured.returncode),
            f"{r.measured.load.steady.p99:.1f}",
            f"{r.measured.load.steady.max_ms:.0f}",
            f"{r.slowest_ms:.0f}",
            _ratio(r.ratio),
            seconds(r.measured.makespan),
            str(r.measured.load.during.requests),
            str(r.measured.load.total.failures),
        ]
        for r in runs
        if r.part == "warm-up"
    ]


CANARY_HEADERS = (
    "canary + soak",
    "deployed",
    "exit",
    "makespan s",
    "command s",
    "slowest after the reload started ms",
    "requests during",
    "failed",
)


def canary_rows(runs: Sequence[Run]) -> list[list[str]]:
    return [
        [
            r.mode,
            r.release,
            str(r.measured.returncode),
            seconds(r.measured.makespan),
            seconds(r.measured.command_seconds),
            f"{r.slowest_ms:.0f}",
            str(r.measured.load.during.requests),
            str(r.measured.load.total.failures),
        ]
        for r in runs
        if r.part == "canary"
    ]


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summary(runs: Sequence[Run]) -> list[str]:
    """The medians of each mode, and whether warm-up met the target in every run."""
    lines = []
    warm = [r for r in runs if r.part == "warm-up"]
    for mode in (COLD_OFF, COLD_ON, NO_CACHE):
        ratios = [r.ratio for r in warm if r.mode == mode]
        slowest = [r.slowest_ms for r in warm if r.mode == mode]
        if ratios:
            lines.append(
                f"- {mode}: slowest request after the reload started, median "
                f"{seconds(_median(slowest), 0)} ms, {_ratio(_median(ratios))} the steady p99 "
                f"(worst {_ratio(max((x for x in ratios if x is not None), default=None))})"
            )
    met = [r.ratio is not None and r.ratio <= TARGET for r in warm if r.mode == COLD_ON]
    if met:
        lines.append(
            f"- target (with warm-up, the slowest request within {TARGET:g}x the steady p99): "
            f"met in {sum(met)} of {len(met)} runs"
        )
    canary = [r for r in runs if r.part == "canary"]
    spans = {
        mode: _median([r.measured.makespan for r in canary if r.mode == mode])
        for mode in ("off", "on")
    }
    if spans["off"] is not None and spans["on"] is not None:
        lines.append(
            f"- canary + soak: median makespan {seconds(spans['on'])} s against "
            f"{seconds(spans['off'])} s without: {seconds(spans['on'] - spans['off'])} s more"
        )
    return lines


def markdown(runs: Sequence[Run], env_lines: Sequence[str], args: argparse.Namespace) -> str:
    lines = ["# Warm-up and canary under load", ""]
    lines += [f"- {line}" for line in env_lines]
    pace = (
        f"paced to {args.rate:g} requests/s in all (`--rate`)"
        if args.rate
        else "each as fast as the stack answers (closed loop)"
    )
    lines += [
        f"- stack: {args.vassals} vassals of the demo app, releases v1 and v2 (each worker's "
        f"first {args.cold_requests} requests to `/` take {args.cold_delay * 1000:g} ms longer "
        "each: a cache filled lazily, per process), w1 and w2 (no cache to fill); each run "
        f"deploys the other release of its pair; app start {args.start_delay:g} s",
        f"- load: {args.users} locust users GET `/` through nginx, {pace}; reload "
        f"{args.reload_at:g} s into the load, {args.after_reload:g} s of load after it",
        f"- every run: `--subscription-server <stack's> --probe {HEALTH} "
        f"--minimum-active-vassals {args.minimum} --timeout 60`; warm-up on: `--warmup / "
        f"--warmup-requests {args.cold_requests}`; canary on: `--canary 1 --soak "
        f"{args.soak:g}`",
        f"- p99 steady: the load before the reload less its first {WARMUP_S:g} s; max steady: "
        "the slowest request of that steady load (how far one request strays with no reload "
        "running); slowest after the reload started: the slowest request of the reload and "
        "the load after it; makespan: first trigger to last back (`--json`); command s: the "
        "tool's whole run",
        "",
        *summary(runs),
        "",
        "## First requests after a reload: without and with warm-up, and no cache to fill",
        "",
        markdown_table(WARMUP_HEADERS, warmup_rows(runs)) if runs else "(no run)",
        "",
        "## What a canary and its soak cost in makespan",
        "",
        markdown_table(CANARY_HEADERS, canary_rows(runs)) if runs else "(no run)",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uwsgi_reload_loadtests.bench_warmup",
        description="The first requests after a reload without and with --warmup, on an app "
        "whose first requests are slow; the makespan without and with --canary 1 --soak.",
    )
    parser.add_argument(
        "--vassals", type=positive_int, default=4, help="vassals in the stack (default 4)"
    )
    parser.add_argument(
        "--minimum", type=positive_int, default=2, help="--minimum-active-vassals (default 2)"
    )
    parser.add_argument(
        "--cold-requests",
        type=positive_int,
        default=10,
        help="requests each worker pays to fill its cache, and the warm-up requests (default 10)",
    )
    parser.add_argument(
        "--cold-delay",
        type=non_negative_float,
        default=0.05,
        help="seconds each of those requests takes longer (default 0.05)",
    )
    parser.add_argument(
        "--soak", type=positive_float, default=5.0, help="the canary's soak (default 5)"
    )
    add_run_options(
        parser,
        results="bench-warmup",
        writes="warmup.md and warmup.json",
        start_delay=0.0,
        reload_at=4.0,
        after_reload=3.0,
    )
    parser.add_argument(
        "--rate",
        type=non_negative_float,
        default=200.0,
        help="requests per second over all users (0: as fast as the stack answers) (default 200)",
    )
    parser.add_argument(
        "--repeat", type=positive_int, default=3, help="runs of each mode (default 3)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.minimum >= args.vassals:
        print("bench_warmup: --minimum must be below --vassals", file=sys.stderr)
        return 2
    results = results_dir(args.results_dir, "bench-warmup")
    env_lines = print_environment("uwsgi_reload_loadtests.bench_warmup", argv)
    runs: list[Run] = []
    started = time.monotonic()
    code = guarded("bench", lambda: bench(args, runs), "stack stopped; partial results follow")
    if code is None:
        code = EXIT_OK if all(r.ok for r in runs) else EXIT_SOME_RUN_FAILED
    text = markdown(runs, env_lines, args)
    (results / "warmup.md").write_text(text)
    (results / "warmup.json").write_text(
        json.dumps({"environment": env_lines, "runs": [r.as_json() for r in runs]}, indent=1) + "\n"
    )
    print()
    print(text)
    print(f"benchmark took {time.monotonic() - started:.0f} s")
    print(f"table: {results / 'warmup.md'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
