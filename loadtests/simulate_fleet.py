"""A fleet rolled host by host, in simulation: the tool's own run against simulated emperors and
fastrouters on a fake clock, for the makespan in reload times and the tool's CPU per poll.

    python -m uwsgi_reload_loadtests.simulate_fleet [--hosts 2,4,8,16,32,64] [--vassals 16]
                                       [--minimums 1,half,F-N,F-1] [--routers 1]
                                       [--check-interval 1] [--results-dir DIR]

A fleet of H hosts, each an emperor of N vassals (TCP sockets ``10.0.0.<h+2>:8001...``),
announced to one or two fastrouters under one key. The hosts are rolled one after the other, as
``examples/ansible/reload.yml`` does (``serial: 1``, stop at the first failing host): for each
host, ``uwsgi_reload.run`` itself (the real ``Rollout``, ``Driver``, ``locate``, ``check_fleet``,
with only ``Io`` replaced) polls that host's emperor and every router, and decides which of that
host's vassals to touch; the other hosts' nodes are remote nodes it counts for the minimum. Each
vassal takes exactly one time unit, *a reload time*, from its touch to live again in every
router (the emperor registers the touch at once; the node leaves the routers until then).

Per configuration (H, N, m):

* makespan: fake time from the first host's run start to the last one's end, in reload times,
  against the bound for rolling host by host, ``H x ceil(N / min(N, H*N - m))``: each host may
  have at most ``H*N - m`` of its N vassals down at once, and the next host starts when it is done.
* polls: the tool's reads of the stats (``Io.snapshot`` calls).
* CPU per poll, ``time.process_time`` of this process: *read*, the tool's decoding of the stats
  JSON (``json.loads`` as ``read_stats`` does, ``parse_emperor_stats``,
  ``parse_fastrouter_stats``, ``Snapshot``, as ``take_snapshot`` does); *decide*,
  everything the tool does between two polls (``Rollout.step`` and the ``Driver``'s handling of its
  events; after a host's last poll, its summary), less the simulator's own time in ``Io.touch``.
  The start-up checks of each host's run (``locate``, ``check_fleet``) are counted apart. Remote
  nodes: ``(H-1) x N``.
* minimum held: the simulator counts, at every poll and after every touch, the nodes live in
  each router and in every router, and checks that the count never went below m.

Output, in the results dir (default ``reports/simulate-fleet-<date>-<time>``):
``fleet-simulated.md`` (the command, the machine, the tables) and ``fleet-simulated.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import ipaddress
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uwsgi_reload as ur

from . import fleetsim
from .cli import EXIT_OK, EXIT_SOME_RUN_FAILED, results_dir
from .fleetsim import Broken, SimFleet
from .tables import _cpu_model, _ram, command_line, environment_lines, markdown_table

#: the first host's address; host h is this plus h
FIRST_HOST = ipaddress.IPv4Address("10.0.0.2")
FIRST_PORT = 8001
ROUTERS = ("fr-a", "fr-b")
#: a vassal not back after this many reload times is a failure (it never happens here)
TIMEOUT = 10.0
#: the tool's --check-interval, in reload times: a power of 2 keeps polls on whole reload times,
#: so that every vassal is seen back the moment it is; one reload time is the fewest polls that
#: do (a real run polls every 0.1 s, some 25 times per reload of 2.5 s)
DEFAULT_INTERVAL = 1.0
DEFAULT_HOSTS = (2, 4, 8, 16, 32, 64)
DEFAULT_MINIMUMS = ("1", "half", "F-N", "F-1")
#: the tool's default --check-interval, for the share of a core its polls take
REAL_INTERVAL_US = 0.1e6


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One configuration: H hosts of N vassals behind ``routers`` routers, fleet minimum m."""

    hosts: int
    vassals: int
    minimum: int
    routers: int = 1
    #: seconds between polls, in reload times (``--check-interval``)
    check_interval: float = DEFAULT_INTERVAL
    #: a control: the routers the tool is given (the first ones); None: every router
    tool_routers: int | None = None
    #: a control: the hosts (the first ones) whose vassals announce to the last router; None:
    #: every host (with fewer, the last router lacks the other hosts' nodes)
    hosts_in_last_router: int | None = None
    #: a label for the table: how m was chosen ("1", "half", "F-N", ...)
    label: str = ""

    @property
    def fleet_size(self) -> int:
        return self.hosts * self.vassals

    @property
    def remote_nodes(self) -> int:
        """The nodes of the other hosts, for the tool on one host."""
        return (self.hosts - 1) * self.vassals

    @property
    def at_once(self) -> int:
        """How many of one host's vassals may be down at once: the rest of the fleet keeps m."""
        return min(self.vassals, self.fleet_size - self.minimum)

    @property
    def bound(self) -> int:
        """Reload times for rolling host by host: H x ceil(N / min(N, H*N - m))."""
        return self.hosts * math.ceil(self.vassals / self.at_once)

    @property
    def router_names(self) -> tuple[str, ...]:
        return ROUTERS[: self.routers]


def minimum_for(token: str, hosts: int, vassals: int) -> int:
    """``1`` (a number), ``half`` (of the fleet), ``F-N`` (a whole host out at once), ``F-K``
    (K of the fleet's F = H*N nodes out at once)."""
    fleet = hosts * vassals
    if token == "half":
        return fleet // 2
    if token.startswith("F-"):
        rest = token[2:]
        return fleet - (vassals if rest == "N" else int(rest))
    return int(token)


def parse_minimums(text: str) -> list[str]:
    """``--minimums``: tokens for ``minimum_for``."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens:
        raise argparse.ArgumentTypeError("no minimum given")
    for token in tokens:
        number = token[2:] if token.startswith("F-") else token
        if token != "half" and number != "N" and not number.isdigit():
            raise argparse.ArgumentTypeError(
                f"a minimum is a number, half, F-N or F-<number>: {token!r}"
            )
    return tokens


# ---------------------------------------------------------------------------------------------
# The simulated fleet, and the tool's CPU around it
# ---------------------------------------------------------------------------------------------


def fleet_of(scenario: Scenario) -> SimFleet:
    """H hosts of N vassals; each touch takes its vassal out of every router for exactly one
    reload time (the emperor acts on it at once, the master announces as it accepts)."""
    n, in_last = scenario.vassals, scenario.hosts_in_last_router
    in_last = scenario.hosts if in_last is None else in_last
    hosts = []
    for h in range(scenario.hosts):
        deaf = frozenset(scenario.router_names[-1:] if h >= in_last else ())
        hosts.append(fleetsim.host(n, FIRST_HOST + h, FIRST_PORT, 10_000 + h * n, unheard=deaf))
    fleet = SimFleet(hosts, scenario.router_names, lag=0.0, announce_delay=0.0)
    fleet.minimum = scenario.minimum
    return fleet


class Meter:
    """The tool's CPU (``time.process_time``) around a simulated fleet's ``Io``, the simulator's
    own work (its bookkeeping, the stats JSON it writes) left out. Per poll: *read*, decoding the
    stats (and of it ``json.loads``); *decide*, from the end of its snapshot to the next snapshot
    or sleep, less the time in ``touch`` (the last poll of a host run: to the end of the run, its
    summary included). Per host run: *start*, its start-up checks, from its first snapshot to its
    first reading of the wall clock (``run`` reads it once ``locate`` and ``check_fleet`` are
    done)."""

    def __init__(self, fleet: SimFleet) -> None:
        self.fleet = fleet
        self.read_cpu: list[float] = []
        self.json_cpu: list[float] = []
        self.decide_cpu: list[float] = []
        self.start_cpu: list[float] = []
        #: when the tool last took over from the simulator (None: the simulator runs)
        self._since: float | None = None
        #: the tool's CPU so far in the interval under way
        self._open = 0.0
        self._starting = self._deciding = False

    def _pause(self) -> float:
        """The simulator takes over: the CPU the tool used since it last did."""
        spent = 0.0 if self._since is None else time.process_time() - self._since
        self._since = None
        return spent

    def _end_interval(self) -> None:
        self._open += self._pause()
        if self._deciding and not self._starting:
            self.decide_cpu.append(self._open)
            self._deciding = False
        self._open = 0.0

    def _wall_clock(self) -> float:
        if self._starting:
            self.start_cpu.append(self._open + self._pause())
            self._open, self._starting = 0.0, False
            self._since = time.process_time()
        return fleetsim.WALL_START + self.fleet.t

    def _snapshot(self, options: ur.Options) -> ur.Snapshot:
        self._end_interval()
        raw = self.fleet.stats(options)
        started = time.process_time()
        docs = {what: None if text is None else json.loads(text) for what, text in raw.items()}
        decoded = time.process_time()
        snapshot = fleetsim.snapshot_of(docs, options)
        self._since = time.process_time()
        self.read_cpu.append(self._since - started)
        self.json_cpu.append(decoded - started)
        self._deciding = True
        return snapshot

    def _sleep(self, seconds: float) -> None:
        self._end_interval()
        self.fleet.sleep(seconds)

    def _touch(self, path: str, mtime: int) -> None:
        self._open += self._pause()
        self.fleet.touch(path, mtime)
        self._since = time.process_time()

    def io(self) -> ur.Io:
        return dataclasses.replace(
            self.fleet.io(),
            wall_clock=self._wall_clock,
            snapshot=self._snapshot,
            sleep=self._sleep,
            touch=self._touch,
        )

    @contextmanager
    def host_run(self, host: int) -> Iterator[None]:
        """The tool runs on ``host``; its start-up checks are measured apart from its polls."""
        self.fleet.roll(host)
        self._open, self._starting = 0.0, True
        try:
            yield
        finally:
            if self._starting:  # refused by its start-up checks
                self._wall_clock()
            self._end_interval()


# ---------------------------------------------------------------------------------------------
# Rolling the fleet
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    scenario: Scenario
    #: the tool's exit code per host rolled (the roll stops at the first failing host)
    exit_codes: list[int]
    makespan: float
    polls: int
    read_us: float
    #: of ``read_us``, ``json.loads``
    json_us: float
    decide_us: float
    #: the most CPU one poll's decision took
    decide_max_us: float
    #: per host run, the start-up checks (``locate``, ``check_fleet``)
    start_ms: float
    #: per place (a router, or every router): the fewest nodes live at any check
    fewest: dict[str, int]
    broken: list[Broken]
    #: vassals reloaded exactly once (none twice: ``reloaded_twice``)
    reloaded: int
    reloaded_twice: int
    cpu_s: float

    @property
    def ok(self) -> bool:
        """Every host's run exited 0 and every vassal of the fleet was reloaded exactly once."""
        return (
            self.exit_codes == [ur.EXIT_OK] * self.scenario.hosts
            and self.reloaded == self.scenario.fleet_size
            and not self.reloaded_twice
        )

    @property
    def minimum_held(self) -> bool:
        return not self.broken

    @property
    def ratio(self) -> float:
        return self.makespan / self.scenario.bound

    def as_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.scenario),
            "exit_codes": self.exit_codes,
            "makespan_reload_times": self.makespan,
            "bound_reload_times": self.scenario.bound,
            "polls": self.polls,
            "read_us_per_poll": self.read_us,
            "json_loads_us_per_poll": self.json_us,
            "decide_us_per_poll": self.decide_us,
            "decide_max_us": self.decide_max_us,
            "start_ms_per_host_run": self.start_ms,
            "fewest_live": self.fewest,
            "minimum_held": self.minimum_held,
            "broken": [b._asdict() for b in self.broken[:10]],
            "reloaded": self.reloaded,
            "reloaded_twice": self.reloaded_twice,
            "cpu_s": self.cpu_s,
        }


def roll(scenario: Scenario, meter: Meter | None = None) -> Result:
    """Roll the whole fleet host by host with the tool; stop at the first host that fails."""
    meter = meter or Meter(fleet_of(scenario))
    fleet = meter.fleet
    routers = scenario.router_names[: scenario.tool_routers]
    codes = []
    started = time.process_time()
    with tempfile.TemporaryDirectory(prefix="sim-fleet-") as emperor_dir:
        # every host's emperor watches configs of the same names; the tool only lists them
        for vid in fleet.vassals:
            (Path(emperor_dir) / vid).write_text("[uwsgi]\n")
        for host in range(scenario.hosts):
            options = ur.Options(
                emperor_path=emperor_dir,
                fastrouter_stats_socket=list(routers),
                emperor_stats_socket=f"{FIRST_HOST + host}:1716",
                minimum_active_vassals=scenario.minimum,
                timeout=TIMEOUT,
                check_interval=scenario.check_interval,
                quiet=True,
            )
            out = io.StringIO()
            with meter.host_run(host):
                try:
                    code = ur.run(options, ur.Reporter(True, out, out), meter.io())
                except ur.ReloadError as exc:  # refused before anything was touched
                    code = exc.exit_code
            codes.append(code)
            if code != ur.EXIT_OK:
                break
    cpu = time.process_time() - started
    return Result(
        scenario=scenario,
        exit_codes=codes,
        makespan=fleet.t,
        polls=len(meter.read_cpu),
        read_us=_mean_us(meter.read_cpu),
        json_us=_mean_us(meter.json_cpu),
        decide_us=_mean_us(meter.decide_cpu),
        decide_max_us=max(meter.decide_cpu, default=0.0) * 1e6,
        start_ms=statistics.fmean(meter.start_cpu) * 1e3 if meter.start_cpu else 0.0,
        fewest={place: n for (place, _), n in fleet.fewest.items()},
        broken=fleet.broken,
        reloaded=sum(v.respawns == 1 for host in fleet.hosts for v in host),
        reloaded_twice=sum(v.respawns > 1 for host in fleet.hosts for v in host),
        cpu_s=cpu,
    )


def _mean_us(values: Sequence[float]) -> float:
    return statistics.fmean(values) * 1e6 if values else 0.0


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

HEADERS = (
    "H",
    "N",
    "routers",
    "m",
    "m is",
    "remote nodes",
    "at once",
    "exit",
    "reloaded",
    "makespan (reload times)",
    "bound",
    "ratio",
    "polls",
    "read us/poll",
    "decide us/poll",
    "read + decide us/poll",
    "decide max us",
    "start ms/host",
    "fewest live",
    "minimum held",
)


def rows(results: Sequence[Result]) -> list[list[str]]:
    out = []
    for r in results:
        s = r.scenario
        codes = sorted(set(r.exit_codes))
        out.append(
            [
                str(s.hosts),
                str(s.vassals),
                str(s.routers),
                str(s.minimum),
                s.label or "-",
                str(s.remote_nodes),
                str(s.at_once),
                ",".join(map(str, codes)),
                f"{r.reloaded}/{s.fleet_size}",
                f"{r.makespan:g}",
                str(s.bound),
                f"{r.ratio:.2f}x",
                str(r.polls),
                f"{r.read_us:.0f}",
                f"{r.decide_us:.0f}",
                f"{r.read_us + r.decide_us:.0f}",
                f"{r.decide_max_us:.0f}",
                f"{r.start_ms:.1f}",
                str(min(r.fewest.values())),
                "yes" if r.minimum_held else "NO",
            ]
        )
    return out


SCALING_HEADERS = (
    "remote nodes",
    "H",
    "polls",
    "read us/poll",
    "of it json.loads us/poll",
    "decide us/poll",
    "read + decide us/poll",
    "vs the smallest fleet",
    "% of a core at 0.1 s polls",
)


@dataclasses.dataclass(frozen=True)
class Fit:
    """``us = intercept + slope x remote nodes``, least squares over the per-H means."""

    intercept: float
    slope: float


def by_remote_nodes(
    results: Sequence[Result],
) -> list[tuple[int, int, int, float, float, float]]:
    """(remote nodes, H, polls, read us, decide us, json.loads us) per H, weighted by polls."""
    out = []
    for hosts in sorted({r.scenario.hosts for r in results}):
        same = [r for r in results if r.scenario.hosts == hosts]
        polls = sum(r.polls for r in same)
        if not polls:
            continue
        read = sum(r.read_us * r.polls for r in same) / polls
        decide = sum(r.decide_us * r.polls for r in same) / polls
        decoding = sum(r.json_us * r.polls for r in same) / polls
        out.append((same[0].scenario.remote_nodes, hosts, polls, read, decide, decoding))
    return out


def fit(points: Sequence[tuple[float, float]]) -> Fit | None:
    """Ordinary least squares (``statistics.linear_regression`` is Python 3.10+)."""
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return Fit(mean_y - slope * mean_x, slope)


def scaling_rows(results: Sequence[Result]) -> list[list[str]]:
    table = by_remote_nodes(results)
    if not table:
        return []
    base = table[0][3] + table[0][4]
    return [
        [
            str(remote),
            str(hosts),
            str(polls),
            f"{read:.0f}",
            f"{decoding:.0f}",
            f"{decide:.0f}",
            f"{read + decide:.0f}",
            f"{(read + decide) / base:.1f}x",
            f"{(read + decide) / REAL_INTERVAL_US * 100:.1f}",
        ]
        for remote, hosts, polls, read, decide, decoding in table
    ]


def machine_lines(argv: Sequence[str]) -> list[str]:
    """The command and the machine; no uWSGI, nginx or locust runs here."""
    env = {
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"),
        "cpu": _cpu_model(),
        "ram": _ram(),
        "kernel": platform.release(),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "uwsgi": "-",
        "nginx": "-",
        "locust": "-",
        "django": "-",
    }
    command, machine, _ = environment_lines(
        command_line(["-m", "uwsgi_reload_loadtests.simulate_fleet", *argv]), env
    )
    versions = (
        f"versions: python {env['python']} ({platform.python_implementation()}), "
        f"uwsgi_reload {ur.__version__}; no uWSGI, nginx or load: a simulation"
    )
    return [command, machine, versions]


def markdown(results: Sequence[Result], env_lines: Sequence[str], args: argparse.Namespace) -> str:
    lines = ["# A fleet rolled host by host, simulated: makespan and the tool's CPU per poll", ""]
    lines += [f"- {line}" for line in env_lines]
    routers = "1 fastrouter" if args.routers == 1 else f"{args.routers} fastrouters"
    lines += [
        f"- simulation: H hosts x N vassals under one key behind {routers}; "
        "each vassal takes exactly 1 reload time from its touch to live again in every router; "
        f"the tool polls every {args.check_interval:g} reload time(s) (`--check-interval`), "
        f"`--timeout {TIMEOUT:g}` reload times. The hosts are rolled one by one (as "
        "`examples/ansible/reload.yml`, `serial: 1`); on each, `uwsgi_reload.run` itself "
        "decides (only its `Io` is simulated: the emperor's and the routers' stats as JSON, "
        "the touch, the clock, `/proc`).",
        "- m is: how the fleet minimum m was chosen for F = H x N nodes: `half` = F/2, `F-N` = "
        "a whole host out at once exactly, `F-1` = one vassal of the fleet at a time.",
        "- at once: min(N, F - m), the vassals of one host that may be down together; bound = "
        "H x ceil(N / at once) reload times; ratio = makespan / bound.",
        "- read: the tool's decoding of one poll's stats (`json.loads`, `parse_emperor_stats`, "
        "`parse_fastrouter_stats`, `Snapshot`, as `take_snapshot`); decide: the "
        "tool's work between two polls "
        "(`Rollout.step` and the `Driver`'s handling of its events, the simulator's time in the "
        "touch left out; after a host's last poll, its summary too); both "
        "`time.process_time`, means over the polls; start: each host run's start-up checks "
        "(`locate`, `check_fleet`), from its first poll to its first reading of the clock.",
        "- fewest live / minimum held: the fewest nodes live for the key, in each router and "
        "in every router, counted by the simulator at every poll and after every touch; held: "
        "never below m.",
        "",
        markdown_table(HEADERS, rows(results)),
        "",
        "## CPU per poll against the number of remote nodes",
        "",
        "Per H, over every row of that H, weighted by polls; remote nodes = "
        "(H-1) x N, the other hosts' nodes the tool reads and counts at every poll. Of it "
        "json.loads: the part of read that is the stats' JSON decoding alone (the standard "
        "library's C decoder, as `read_stats`). % of a core "
        "at 0.1 s polls: read + decide against the tool's default `--check-interval` of 0.1 s "
        "(a real run polls that often whatever the reload time).",
        "",
        markdown_table(SCALING_HEADERS, scaling_rows(results)),
        "",
    ]
    points = by_remote_nodes(results)
    read_fit = fit([(float(p[0]), p[3]) for p in points])
    decide_fit = fit([(float(p[0]), p[4]) for p in points])
    json_fit = fit([(float(p[0]), p[5]) for p in points])
    if read_fit and decide_fit and json_fit:
        lines += [
            "Least squares over these rows: read = "
            f"{read_fit.intercept:.0f} us {read_fit.slope * 1000:+.0f} us per 1000 remote "
            f"nodes (of it json.loads = {json_fit.intercept:.0f} us "
            f"{json_fit.slope * 1000:+.0f} us per 1000 remote nodes); decide = "
            f"{decide_fit.intercept:.0f} us {decide_fit.slope * 1000:+.0f} us per 1000 remote "
            "nodes.",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    """Every (H, m) asked for, m in 0..F-1, each m once per H."""
    out = []
    for hosts in args.hosts:
        seen = set()
        for token in args.minimums:
            m = minimum_for(token, hosts, args.vassals)
            if not 0 <= m < hosts * args.vassals or m in seen:
                continue
            seen.add(m)
            out.append(
                Scenario(
                    hosts,
                    args.vassals,
                    m,
                    routers=args.routers,
                    check_interval=args.check_interval,
                    label=token,
                )
            )
    return out


def _hosts(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"hosts are whole numbers: {text!r}") from None
    if not values or any(h < 1 for h in values):
        raise argparse.ArgumentTypeError(f"every number of hosts must be 1 or more: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uwsgi_reload_loadtests.simulate_fleet",
        description="Roll a simulated fleet host by host with the tool's own run: makespan in "
        "reload times, the tool's CPU per poll, the minimum checked at every poll.",
    )
    parser.add_argument(
        "--hosts",
        type=_hosts,
        default=list(DEFAULT_HOSTS),
        help=f"numbers of hosts, one fleet each (default {','.join(map(str, DEFAULT_HOSTS))})",
    )
    parser.add_argument(
        "--vassals",
        type=ur.positive_int,
        default=16,
        help="vassals per host (default 16)",
    )
    parser.add_argument(
        "--minimums",
        type=parse_minimums,
        default=list(DEFAULT_MINIMUMS),
        help="fleet minimums: a number, half, F-N (a whole host out at once), F-K (K of the "
        f"fleet's F = H*N out at once) (default {','.join(DEFAULT_MINIMUMS)})",
    )
    parser.add_argument(
        "--routers", type=int, choices=(1, 2), default=1, help="fastrouters (default 1)"
    )
    parser.add_argument(
        "--check-interval",
        type=ur.positive_float,
        default=DEFAULT_INTERVAL,
        help="the tool's --check-interval, in reload times; a power of 2 keeps polls on whole "
        f"reload times (default {DEFAULT_INTERVAL:g})",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where fleet-simulated.md and fleet-simulated.json go "
        "(default reports/simulate-fleet-<date>-<time>)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    results = results_dir(args.results_dir, "simulate-fleet")
    env_lines = machine_lines(argv)
    for line in env_lines:
        print(line, flush=True)
    done: list[Result] = []
    started = time.monotonic()
    for scenario in scenarios(args):
        result = roll(scenario)
        done.append(result)
        print(
            f"H={scenario.hosts} N={scenario.vassals} m={scenario.minimum} ({scenario.label}): "
            f"exit {','.join(map(str, sorted(set(result.exit_codes))))} "
            f"({len(result.exit_codes)} hosts), makespan {result.makespan:g} "
            f"(bound {scenario.bound}), {result.polls} polls, read {result.read_us:.0f} us + "
            f"decide {result.decide_us:.0f} us per poll, minimum held: {result.minimum_held}, "
            f"{result.cpu_s:.1f} s CPU",
            flush=True,
        )
    text = markdown(done, env_lines, args)
    (results / "fleet-simulated.md").write_text(text)
    (results / "fleet-simulated.json").write_text(
        json.dumps({"environment": env_lines, "results": [r.as_json() for r in done]}, indent=1)
        + "\n"
    )
    print()
    print(text)
    print(f"simulation took {time.monotonic() - started:.0f} s")
    print(f"table: {results / 'fleet-simulated.md'}")
    ok = all(r.ok and r.minimum_held for r in done)
    return EXIT_OK if ok else EXIT_SOME_RUN_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
