"""Fleets under load: makespan host by host against its bound, hosts all at once, and batches of
hosts rolled together with shares.

    python -m uwsgi_reload_loadtests.bench_fleet [--hosts 2,3,4|none] [--vassals 4] [--rate 300]
                                    [--all-at-once-runs 20] [--batch-runs 20]
                                    [--batch-playbook-runs 5] [--batch-hosts 3,6|none]
                                    [--batch-vassals 4] [--results-dir DIR]

Part 1, for every H in ``--hosts``, on a fleet of H hosts of ``--vassals`` N vassals behind one
fastrouter (``uwsgi_reload_harness.fleet``), under paced locust load through nginx:

- a lone reload: ``uwsgi_reload.py`` on host 1 at a fleet minimum of H*N - 1 (one vassal at a
  time); the median trigger-to-back of its vassals is the time of one reload alone;
- for each fleet minimum m (1: a whole host at once; H*N - 2: two at a time), the tool on each
  host one after the other (what the playbook runs, without Ansible's own time: ``sh -c 'host1
  && host2 && ...'``), with drain. Fleet makespan: first trigger to last back over every host's
  ``--json`` timeline. Bound: H x ceil(N / min(N, H*N - m)) lone reloads (hosts one by one, each
  in as few waves as the minimum allows);
- the same through ``examples/ansible/reload.yml`` (``serial: 1``): its wall time, Ansible
  included.

Part 2, on a fleet of 3 hosts of 3 vassals at a fleet minimum of 3: ``--all-at-once-runs`` runs
of the playbook changed to ``serial: "100%"`` (every host at once), each under load, counting
the runs in which the observer saw fewer than 3 live nodes. Each host's tool counts the others'
nodes live at the moment it decides; hosts deciding together can all go below the minimum.

Part 3, batches, on a fleet of 3 hosts of 3 vassals at a fleet minimum of 3 (6 nodes may be
out at once), ``--batch-runs`` rounds of: every host's tool started at the same moment
(``Fleet.together_command``: the closest race, no Ansible between hosts) with a share of
(9 - 3) // 3 = 2 each (``--max-unavailable 2``), and the same without a share (the control);
then ``--batch-playbook-runs`` runs of ``examples/ansible/reload.yml -e batch=3``. Counted: the
runs in which the observer saw fewer than 3 live nodes, and the failed requests.

Part 4, makespan with batches, for every H in ``--batch-hosts``: H hosts of ``--batch-vassals``
N vassals, a fleet minimum m of half the HN nodes; a lone reload as in part 1; then batches of
B hosts (B = H, and H/2 when that is 2 or more), each batch's hosts started together with a
share of (HN - m) // B, one batch after the other. Bound: the fleet's own, ceil(HN / (HN - m))
lone reloads (at most HN - m of the HN nodes out at any moment, one reload time each).

Output, in the results dir (default ``reports/bench-fleet-<date>-<time>``): ``fleet.md`` (the
command, the machine, the versions, the tables) and ``fleet.json`` (every run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from uwsgi_reload import non_negative_float, non_negative_int, positive_int
from uwsgi_reload_harness.fleet import Fleet, FleetConfig, running_fleet

from .cli import EXIT_OK, EXIT_SOME_RUN_FAILED, guarded, print_environment, results_dir
from .measure import ReloadRun, VassalSpan, again, observed, vassal_spans
from .tables import markdown_table, seconds

ALL_AT_ONCE = (3, 3, 3)  # hosts, vassals, fleet minimum
BATCH_FLEET = (3, 3, 3)  # hosts, vassals, fleet minimum: the batches' race
USERS = 8


def tool_reports(stdout: str) -> list[dict[str, Any]]:
    """Every ``--json`` report on ``stdout`` (one per host the command reloaded), in order."""
    reports = []
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and isinstance(data.get("vassals"), list):
                reports.append(data)
    return reports


def spans(run: ReloadRun) -> list[VassalSpan]:
    stdout = "" if run.load.reload is None else run.load.reload.stdout
    return [span for report in tool_reports(stdout) for span in vassal_spans(report)]


def fleet_makespan(run: ReloadRun, vassals: int) -> float | None:
    """First trigger to last back over every host's timeline; None unless all came back."""
    every = spans(run)
    if len(every) < vassals or any(s.triggered is None or s.back is None for s in every):
        return None
    return max(s.back for s in every if s.back is not None) - min(
        s.triggered for s in every if s.triggered is not None
    )


def host_vassals(run: ReloadRun) -> list[list[dict[str, Any]]]:
    """Each host's vassals (name, outcome, triggered, accepting and back, in seconds after that
    host's first trigger), in order: where a host's makespan went."""
    stdout = "" if run.load.reload is None else run.load.reload.stdout
    hosts = []
    for report in tool_reports(stdout):
        every = vassal_spans(report)
        start = min((s.triggered for s in every if s.triggered is not None), default=None)

        def after(t: float | None, start: float | None = start) -> float | None:
            return None if t is None or start is None else round(t - start, 3)

        hosts.append(
            [
                {
                    "name": s.name,
                    "outcome": s.outcome,
                    "triggered": after(s.triggered),
                    "accepting": after(s.accepting),
                    "back": after(s.back),
                }
                for s in every
            ]
        )
    return hosts


def host_makespans(run: ReloadRun) -> list[float | None]:
    """Each host's own makespan (first trigger to last back of its report), in order."""
    stdout = "" if run.load.reload is None else run.load.reload.stdout
    made: list[float | None] = []
    for report in tool_reports(stdout):
        every = vassal_spans(report)
        triggers = [s.triggered for s in every if s.triggered is not None]
        backs = [s.back for s in every if s.back is not None]
        whole = every and len(triggers) == len(backs) == len(every)
        made.append(max(backs) - min(triggers) if whole else None)
    return made


def waves_per_host(hosts: int, vassals: int, minimum: int) -> int:
    """Waves a host needs when every other host is live: its N vassals, at most H*N - m out."""
    return math.ceil(vassals / min(vassals, hosts * vassals - minimum))


@dataclasses.dataclass
class MakespanRow:
    hosts: int
    vassals: int
    minimum: int
    lone_s: float
    rolled: ReloadRun
    playbook: ReloadRun

    @property
    def bound_s(self) -> float:
        return self.hosts * waves_per_host(self.hosts, self.vassals, self.minimum) * self.lone_s

    @property
    def makespan_s(self) -> float | None:
        return fleet_makespan(self.rolled, self.hosts * self.vassals)

    @property
    def hosts_sum_s(self) -> float | None:
        """The hosts' own makespans added up: the fleet makespan less the tool's start on each
        host after the first."""
        made = host_makespans(self.rolled)
        if len(made) < self.hosts or any(m is None for m in made):
            return None
        return sum(m for m in made if m is not None)

    @property
    def ok(self) -> bool:
        return self.rolled.check(self.minimum) == [] and self.playbook.check(self.minimum) == []

    def cells(self) -> list[str]:
        makespan, hosts_sum = self.makespan_s, self.hosts_sum_s
        ratio = "-" if makespan is None else f"{makespan / self.bound_s:.2f}"
        sum_ratio = "-" if hosts_sum is None else f"{hosts_sum / self.bound_s:.2f}"
        waves = waves_per_host(self.hosts, self.vassals, self.minimum)
        return [
            f"{self.hosts} x {self.vassals}",
            str(self.minimum),
            seconds(self.lone_s),
            f"{self.hosts} x {waves} x lone = {seconds(self.bound_s)}",
            seconds(makespan),
            ratio,
            f"{seconds(hosts_sum)} ({sum_ratio})",
            seconds(self.rolled.command_seconds),
            seconds(self.playbook.command_seconds),
            f"{self.rolled.observer.min_live} / {self.playbook.observer.min_live}",
            f"{self.rolled.load.total.failures} / {self.playbook.load.total.failures}",
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "hosts": self.hosts,
            "vassals": self.vassals,
            "minimum": self.minimum,
            "lone_reload_s": self.lone_s,
            "bound_s": self.bound_s,
            "fleet_makespan_s": self.makespan_s,
            "host_makespans_s": host_makespans(self.rolled),
            "host_vassals": host_vassals(self.rolled),
            "rolled": self.rolled.as_json(),
            "playbook": self.playbook.as_json(),
        }


MAKESPAN_HEADERS = [
    "fleet",
    "minimum",
    "lone reload",
    "bound (hosts one by one)",
    "fleet makespan",
    "makespan / bound",
    "hosts' own makespans, summed (/ bound)",
    "tool, host after host",
    "playbook (Ansible included)",
    "observer min (tool / playbook)",
    "failed (tool / playbook)",
]


@dataclasses.dataclass
class AllAtOnceRun:
    index: int
    serial: str
    run: ReloadRun

    @property
    def broke(self) -> bool:
        return self.run.observer.min_live < ALL_AT_ONCE[2]

    def cells(self) -> list[str]:
        return [
            str(self.index),
            self.serial,
            str(self.run.returncode),
            str(self.run.observer.min_live),
            "yes" if self.broke else "no",
            str(self.run.load.total.failures),
            seconds(self.run.command_seconds),
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "serial": self.serial,
            **self.run.as_json(),
            "output_tail": self.run.output[-6000:],
        }


ALL_AT_ONCE_HEADERS = [
    "run",
    "serial",
    "exit",
    "observer min",
    "minimum broken",
    "failed",
    "playbook s",
]


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ur-bf-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def measure(
    fleet: Fleet,
    command: list[str],
    args: argparse.Namespace,
    minimum: int,
    label: str,
    expected_exit: int | None = 0,
) -> ReloadRun:
    """One run under load, measured again (as the suite does, :func:`observed`) while the
    observer's gap is its only problem: a run watched that coarsely proves nothing."""
    attempt = again(
        fleet,
        command,
        users=USERS,
        rate=args.rate,
        reload_at=args.reload_at,
        after_reload=args.after_reload,
        observer_interval=0.02,
        observer_readers=2,
        max_run_time=args.reload_at + args.after_reload + 300,
    )
    return observed(attempt, label, minimum, lambda row: None, expected_exit=expected_exit)


def lone_reload(fleet: Fleet, args: argparse.Namespace) -> float:
    """Median trigger-to-back of host 1's vassals reloaded one at a time."""
    total = len(fleet.expected_nodes())
    command = fleet.hosts[0].reload_command("--minimum-active-vassals", str(total - 1), "--json")
    run = measure(fleet, command, args, total - 1, "lone reload")
    durations = run.durations()
    if run.returncode != 0 or not durations:
        raise SystemExit(f"the lone reload failed: {run.output[-2000:]}")
    return statistics.median(durations)


def bench_makespan(hosts: int, args: argparse.Namespace, rows: list[MakespanRow]) -> None:
    n = args.vassals
    print(f"H={hosts} x N={n}: starting the fleet...", flush=True)
    with running_fleet(FleetConfig(hosts=hosts, vassals=n)) as fleet, work_dir() as tmp:
        lone = lone_reload(fleet, args)
        print(f"  lone reload {lone:.2f} s", flush=True)
        for m in sorted({1, hosts * n - 2}):
            name = f"{hosts} x {n}, minimum {m}"
            rolled = measure(
                fleet,
                fleet.reload_command("--minimum-active-vassals", str(m), "--json"),
                args,
                m,
                f"{name}, the tool host after host",
            )
            playbook = measure(fleet, fleet.playbook_command(tmp, m), args, m, f"{name}, playbook")
            row = MakespanRow(hosts, n, m, lone, rolled, playbook)
            rows.append(row)
            print("  " + " | ".join(row.cells()), flush=True)


def bench_all_at_once(args: argparse.Namespace, runs: list[AllAtOnceRun]) -> None:
    hosts, n, m = ALL_AT_ONCE
    print(f"all at once: H={hosts} x N={n}, fleet minimum {m}: starting the fleet...", flush=True)
    with running_fleet(FleetConfig(hosts=hosts, vassals=n)) as fleet, work_dir() as tmp:
        for index in range(1, args.all_at_once_runs + 1):
            command = fleet.playbook_command(tmp, m, serial="100%")
            run = measure(fleet, command, args, m, f"all at once #{index}", expected_exit=None)
            runs.append(AllAtOnceRun(index, "100%", run))
            print("  " + " | ".join(runs[-1].cells()), flush=True)


@dataclasses.dataclass
class BatchRun:
    """One run of part 3: hosts rolled together, with or without shares."""

    index: int
    mode: str
    run: ReloadRun

    @property
    def broke(self) -> bool:
        return self.run.observer.min_live < BATCH_FLEET[2]

    def cells(self) -> list[str]:
        return [
            str(self.index),
            self.mode,
            str(self.run.returncode),
            str(self.run.observer.min_live),
            "yes" if self.broke else "no",
            str(self.run.load.total.failures),
            seconds(self.run.command_seconds),
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "mode": self.mode,
            **self.run.as_json(),
            "output_tail": self.run.output[-3000:],
        }


BATCH_HEADERS = [
    "run",
    "hosts rolled together",
    "exit",
    "observer min",
    "minimum broken",
    "failed",
    "command s",
]


def batch_modes(fleet: Fleet) -> dict[str, list[str]]:
    """Part 3's commands by name: the tool on every host at once with and without a share."""
    hosts, n, m = BATCH_FLEET
    share = (hosts * n - m) // hosts
    minimum = ["--minimum-active-vassals", str(m)]
    return {
        f"at once, share {share}": fleet.together_command(
            *minimum, "--max-unavailable", str(share)
        ),
        "at once, no share (control)": fleet.together_command(*minimum),
    }


def bench_batch_race(args: argparse.Namespace, runs: list[BatchRun]) -> None:
    hosts, n, m = BATCH_FLEET
    print(f"batches: H={hosts} x N={n}, fleet minimum {m}: starting the fleet...", flush=True)
    with running_fleet(FleetConfig(hosts=hosts, vassals=n)) as fleet, work_dir() as tmp:
        modes = batch_modes(fleet)
        for index in range(1, args.batch_runs + 1):
            for mode, command in modes.items():
                run = measure(fleet, command, args, m, f"{mode} #{index}", expected_exit=None)
                runs.append(BatchRun(index, mode, run))
                print("  " + " | ".join(runs[-1].cells()), flush=True)
        for index in range(1, args.batch_playbook_runs + 1):
            command = fleet.playbook_command(tmp, m, batch=hosts)
            mode = f"playbook -e batch={hosts} (share {(hosts * n - m) // hosts})"
            run = measure(fleet, command, args, m, f"{mode} #{index}", expected_exit=None)
            runs.append(BatchRun(index, mode, run))
            print("  " + " | ".join(runs[-1].cells()), flush=True)


def fleet_rounds(hosts: int, vassals: int, minimum: int) -> int:
    """The fleet's own bound in reload times: ceil(HN / (HN - m))."""
    return math.ceil(hosts * vassals / (hosts * vassals - minimum))


@dataclasses.dataclass
class BatchMakespanRow:
    hosts: int
    vassals: int
    minimum: int
    batch: int
    lone_s: float
    run: ReloadRun
    timeline: list[VassalSpan]

    @property
    def share(self) -> int:
        return (self.hosts * self.vassals - self.minimum) // self.batch

    @property
    def bound_s(self) -> float:
        return fleet_rounds(self.hosts, self.vassals, self.minimum) * self.lone_s

    @property
    def makespan_s(self) -> float | None:
        every = self.timeline
        if len(every) < self.hosts * self.vassals:
            return None
        triggers = [s.triggered for s in every if s.triggered is not None]
        backs = [s.back for s in every if s.back is not None]
        if len(triggers) < len(every) or len(backs) < len(every):
            return None
        return max(backs) - min(triggers)

    @property
    def ok(self) -> bool:
        return self.run.check(self.minimum) == []

    @property
    def reload_here_s(self) -> float | None:
        """The median trigger-to-back of this run's vassals: a reload's time with as many
        reloading at once as the batches make (on few cores, longer than a lone one)."""
        took = [s.took for s in self.timeline if s.took is not None]
        return statistics.median(took) if took else None

    def cells(self) -> list[str]:
        made = self.makespan_s
        rounds = fleet_rounds(self.hosts, self.vassals, self.minimum)
        here = self.reload_here_s
        schedule = "-" if made is None or here is None else f"{made / (rounds * here):.2f}"
        return [
            f"{self.hosts} x {self.vassals}",
            str(self.minimum),
            f"{self.batch} x {math.ceil(self.hosts / self.batch)}",
            str(self.share),
            seconds(self.lone_s),
            f"{rounds} x lone = {seconds(self.bound_s)}",
            seconds(made),
            "-" if made is None else f"{made / self.bound_s:.2f}",
            seconds(here),
            schedule,
            seconds(self.run.command_seconds),
            str(self.run.observer.min_live),
            str(self.run.load.total.failures),
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "hosts": self.hosts,
            "vassals": self.vassals,
            "minimum": self.minimum,
            "batch": self.batch,
            "share": self.share,
            "lone_reload_s": self.lone_s,
            "bound_s": self.bound_s,
            "fleet_makespan_s": self.makespan_s,
            "median_reload_s": self.reload_here_s,
            "vassals_timeline": [dataclasses.asdict(s) for s in self.timeline],
            "run": self.run.as_json(),
        }


BATCH_MAKESPAN_HEADERS = [
    "fleet",
    "minimum",
    "batch x batches",
    "share",
    "lone reload",
    "bound (the fleet's)",
    "fleet makespan",
    "makespan / bound",
    "median reload in the run",
    "makespan / (rounds x median)",
    "command",
    "observer min",
    "failed",
]


def batches_command(fleet: Fleet, batch: int, flags: Sequence[str], out_dir: Path) -> list[str]:
    """The hosts in batches of ``batch``, each batch's hosts started together, one batch after
    the other (as the playbook's serial does, without Ansible): each host's ``--json`` report
    and metrics go to ``out_dir``."""
    chunks = [fleet.hosts[i : i + batch] for i in range(0, len(fleet.hosts), batch)]
    steps = [fleet.together_command(*flags, hosts=c, out_dir=out_dir) for c in chunks]
    return ["sh", "-c", " && ".join(shlex.join(step) for step in steps)]


def bench_batch_makespan(
    hosts: int, args: argparse.Namespace, rows: list[BatchMakespanRow]
) -> None:
    n = args.batch_vassals
    m = hosts * n // 2
    print(f"batches: H={hosts} x N={n}, minimum {m}: starting the fleet...", flush=True)
    with running_fleet(FleetConfig(hosts=hosts, vassals=n)) as fleet:
        lone = lone_reload(fleet, args)
        print(f"  lone reload {lone:.2f} s", flush=True)
        for batch in sorted({hosts, hosts // 2} - {0, 1}, reverse=True):
            share = (hosts * n - m) // batch
            flags = ["--minimum-active-vassals", str(m), "--max-unavailable", str(share), "--json"]
            with work_dir() as out:
                command = batches_command(fleet, batch, flags, out)
                run = measure(fleet, command, args, m, f"{hosts} x {n}, batch {batch}")
                timeline = [
                    span
                    for path in sorted(out.glob("*.out"))
                    for report in tool_reports(path.read_text())
                    for span in vassal_spans(report)
                ]
            rows.append(BatchMakespanRow(hosts, n, m, batch, lone, run, timeline))
            print("  " + " | ".join(rows[-1].cells()), flush=True)


@dataclasses.dataclass
class Results:
    """Every part's runs, as the tables and the JSON show them."""

    makespan: list[MakespanRow] = dataclasses.field(default_factory=list)
    all_at_once: list[AllAtOnceRun] = dataclasses.field(default_factory=list)
    batch_runs: list[BatchRun] = dataclasses.field(default_factory=list)
    batch_makespan: list[BatchMakespanRow] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every run that must hold the minimum did: the host-by-host, the shared and the
        batch-makespan ones (the controls are measured, not judged)."""
        shared = [r for r in self.batch_runs if "control" not in r.mode]
        return (
            all(r.ok for r in self.makespan)
            and not any(r.broke for r in shared)
            and all(r.ok for r in self.batch_makespan)
        )

    def as_json(self, env_lines: Sequence[str]) -> dict[str, Any]:
        return {
            "environment": list(env_lines),
            "makespan": [r.as_json() for r in self.makespan],
            "all_at_once": [r.as_json() for r in self.all_at_once],
            "batch_runs": [r.as_json() for r in self.batch_runs],
            "batch_makespan": [r.as_json() for r in self.batch_makespan],
        }


def markdown(results: Results, env_lines: Sequence[str]) -> str:
    lines = ["# Fleet benchmark", "", *(f"    {line}" for line in env_lines), ""]
    rows, runs = results.makespan, results.all_at_once
    if rows:
        lines += [
            "## Makespan, hosts one by one",
            "",
            "Times in seconds. Fleet makespan: first trigger to last back over every host (the "
            "tool on each host in turn, with drain), so it includes the tool's start on each "
            "host after the first; the hosts' own makespans, summed, leave that out. Bound: "
            "hosts x waves per host x a lone reload. The playbook column is the wall time of "
            "`examples/ansible/reload.yml`, Ansible included.",
            "",
            markdown_table(MAKESPAN_HEADERS, [r.cells() for r in rows]),
            "",
        ]
    if runs:
        broke = sum(r.broke for r in runs)
        hosts, n, m = ALL_AT_ONCE
        lines += [
            f'## Every host at once (`serial: "100%"`), {hosts} hosts x {n} vassals, minimum {m}',
            "",
            f"The fleet minimum was broken in {broke} of {len(runs)} runs.",
            "",
            markdown_table(ALL_AT_ONCE_HEADERS, [r.cells() for r in runs]),
            "",
        ]
    if results.batch_runs:
        hosts, n, m = BATCH_FLEET
        modes = list(dict.fromkeys(r.mode for r in results.batch_runs))
        summary = [
            [
                mode,
                str(len(of)),
                str(sum(r.broke for r in of)),
                str(min(r.run.observer.min_live for r in of)),
                str(sum(r.run.load.total.failures for r in of)),
                str(sum(r.run.returncode != 0 for r in of)),
            ]
            for mode in modes
            for of in [[r for r in results.batch_runs if r.mode == mode]]
        ]
        lines += [
            f"## Hosts rolled together, {hosts} hosts x {n} vassals, minimum {m}",
            "",
            "Every host's tool started at the same moment (no Ansible between hosts: the closest "
            "race), with a share each (`--max-unavailable`) and without; then the playbook with "
            "`-e batch`. Minimum broken: the observer saw fewer live nodes than the minimum.",
            "",
            markdown_table(
                [
                    "hosts rolled together",
                    "runs",
                    "minimum broken",
                    "fewest live seen",
                    "failed requests, all runs",
                    "runs exiting non-zero",
                ],
                summary,
            ),
            "",
            markdown_table(BATCH_HEADERS, [r.cells() for r in results.batch_runs]),
            "",
        ]
    if results.batch_makespan:
        lines += [
            "## Makespan with batches",
            "",
            "Times in seconds. Each batch's hosts started together, each with its share, one "
            "batch after the other; drain and `--probe /`. Fleet makespan: first trigger to last "
            "back over every host. Bound: the fleet's own, ceil(HN / (HN - m)) lone reloads. "
            "The median reload in the run is a vassal's trigger to back with the batch's "
            "reloads under way at once; makespan / (rounds x median) is what the schedule adds "
            "to that.",
            "",
            markdown_table(BATCH_MAKESPAN_HEADERS, [r.cells() for r in results.batch_makespan]),
            "",
        ]
    return "\n".join(lines)


def parse_hosts(text: str) -> list[int]:
    if text.strip() == "none":
        return []
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"host counts are whole numbers: {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"every host count must be 2 or more: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uwsgi_reload_loadtests.bench_fleet",
        description="Fleet makespan host by host against its bound, and hosts all at once.",
    )
    parser.add_argument(
        "--hosts",
        type=parse_hosts,
        default=[2, 3, 4],
        help="values of H host by host, or none (default 2,3,4)",
    )
    parser.add_argument(
        "--vassals", type=positive_int, default=4, help="vassals per host (default 4)"
    )
    parser.add_argument(
        "--rate",
        type=non_negative_float,
        default=300.0,
        help="requests per second over all users: paced, the load leaves the machine's two "
        "cores to the reloads and to Ansible (default 300)",
    )
    parser.add_argument(
        "--all-at-once-runs",
        type=non_negative_int,
        default=20,
        help='runs of the playbook with serial: "100%%" (default 20)',
    )
    parser.add_argument(
        "--batch-runs",
        type=non_negative_int,
        default=20,
        help="rounds of every host at once with a share and without (default 20)",
    )
    parser.add_argument(
        "--batch-playbook-runs",
        type=non_negative_int,
        default=5,
        help="runs of the playbook with -e batch=3 (default 5)",
    )
    parser.add_argument(
        "--batch-hosts",
        type=parse_hosts,
        default=[3, 6],
        help="values of H for the makespan with batches, or none (default 3,6)",
    )
    parser.add_argument(
        "--batch-vassals",
        type=positive_int,
        default=4,
        help="vassals per host for the makespan with batches (default 4)",
    )
    parser.add_argument(
        "--reload-at", type=non_negative_float, default=1.5, help="seconds of load before"
    )
    parser.add_argument(
        "--after-reload", type=non_negative_float, default=1.0, help="seconds of load after"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where fleet.md and fleet.json go (default reports/bench-fleet-<date>-<time>)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out_dir = results_dir(args.results_dir, "bench-fleet")
    env_lines = print_environment("uwsgi_reload_loadtests.bench_fleet", argv)
    results = Results()
    started = time.monotonic()

    def every_run() -> None:
        for hosts in args.hosts:
            bench_makespan(hosts, args, results.makespan)
        if args.all_at_once_runs:
            bench_all_at_once(args, results.all_at_once)
        if args.batch_runs or args.batch_playbook_runs:
            bench_batch_race(args, results.batch_runs)
        for hosts in args.batch_hosts:
            bench_batch_makespan(hosts, args, results.batch_makespan)

    code = guarded("bench", every_run, "fleets stopped; partial results follow")
    if code is None:
        code = EXIT_OK if results.ok else EXIT_SOME_RUN_FAILED
    text = markdown(results, env_lines)
    (out_dir / "fleet.md").write_text(text)
    (out_dir / "fleet.json").write_text(json.dumps(results.as_json(env_lines), indent=1) + "\n")
    print()
    print(text)
    print(f"benchmark took {time.monotonic() - started:.0f} s")
    print(f"table: {out_dir / 'fleet.md'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
