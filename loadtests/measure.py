"""Reload under load on a real stack: the one measuring function, and the one check.

``reload_under_load`` runs a reload command under locust load through nginx while a
``RouterObserver`` watches the router, and returns a ``ReloadRun``: the load report, the observer,
the command's exit code and output, the tool's ``--json`` report and per-vassal timeline (when
the command is the tool), the workers before and after, and the CPU the command used (when asked
for). The demo, both benchmarks and the zero-downtime suite all measure with it.

A fleet (:class:`uwsgi_reload_harness.fleet.Fleet`) is measured the same way: the load goes
through its nginx to every router, one observer per router watches it, and the end state reads
every host's emperor and every router.

``ReloadRun.check`` returns the list of broken promises; a good reload has none, and the control
tests show the same function finding them in a bad one.

A failed request never comes alone: ``ReloadRun.failures()`` places each one (its kind, when it
failed) against the reload: seconds since the reload command started, and the nearest vassal
trigger or back of the tool's timeline. ``failure_groups()`` sums up bursts of them for tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import psutil

from uwsgi_reload_harness import render
from uwsgi_reload_harness.fleet import Fleet
from uwsgi_reload_harness.stack import Host, Stack

from .endstate import EndState, wrapped
from .observer import ObserverError, RouterObserver, RoutersObserver, Sample
from .report import FailureAt, FailureGroup, ReloadEvent, group_failures, place_failures
from .runner import LoadReport, run_load

USERS = 8
#: Requests that must be served while the reload runs for the run to count as "under load".
MIN_REQUESTS_DURING = 200
#: The observer must have looked at the router at least this often.
MAX_OBSERVER_GAP = 0.025
#: Runs of one measurement, at most, when the observer's gap was its only problem.
ATTEMPTS = 3
#: Seconds locust may run on top of ``reload_at + after_reload`` before the command is killed.
COMMAND_GRACE_S = 90.0


def reload_command(stack: Stack, template: str, minimum: int, timeout: float = 60) -> list[str]:
    """The reload command under test for this stack, from a ``--reload-command`` template."""
    fields = {
        "python": sys.executable,
        "tool": str(render.RELOAD_TOOL),
        "emperor_path": str(stack.emperor_path),
        "emperor_stats": stack.emperor_stats,
        "fastrouter_stats": stack.fastrouter_stats,
        "subscription_server": stack.subscription_server,
        "health_path": stack.config.health_path,
        "minimum": str(minimum),
        "timeout": f"{timeout:g}",
    }
    return [part.format(**fields) for part in shlex.split(template)]


def tool_command(stack: Stack, minimum: int, *extra: str, drain: bool = True) -> list[str]:
    """This repository's ``uwsgi_reload.py --json`` for ``stack`` (:meth:`Stack.reload_command`:
    with ``drain``, it drains each vassal and probes the health path)."""
    return stack.reload_command(
        "--json", "--minimum-active-vassals", str(minimum), *extra, drain=drain
    )


Observer = RouterObserver | RoutersObserver


def observer_of(target: Stack | Fleet, **options: Any) -> Observer:
    """One observer per router, counting the fewest live nodes of any key under load."""
    stats = [r.stats for r in target.routers]
    if len(stats) == 1:
        return RouterObserver(stats[0], keys=list(target.keys), **options)
    return RoutersObserver(stats, keys=list(target.keys), **options)


# ---------------------------------------------------------------------------------------------
# What the command said about itself
# ---------------------------------------------------------------------------------------------


def tool_report(stdout: str) -> dict[str, Any] | None:
    """The last JSON object with a ``vassals`` list on ``stdout``: the report of
    ``uwsgi_reload.py --json`` (or of the 2014 driver, shaped like it); None for a command that
    printed none (a foreign procedure, or the tool without ``--json``)."""
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and isinstance(data.get("vassals"), list):
                return data
    return None


@dataclasses.dataclass(frozen=True)
class VassalSpan:
    """One vassal's reload from the tool's ``--json``, wall clock (``time.time()``), like the
    load report's and the observer's times; None: that never happened."""

    name: str
    triggered: float | None
    accepting: float | None
    back: float | None
    outcome: str

    @property
    def took(self) -> float | None:
        if self.back is None or self.triggered is None:
            return None
        return self.back - self.triggered


def vassal_spans(report: dict[str, Any] | None) -> list[VassalSpan]:
    """The per-vassal timeline of a tool report (its times are seconds since its ``started``)."""
    if report is None:
        return []
    started = float(report["started"])

    def at(value: Any) -> float | None:
        return None if value is None else started + float(value)

    return [
        VassalSpan(
            str(v["name"]),
            at(v.get("triggered")),
            at(v.get("accepting")),
            at(v.get("back")),
            str(v.get("outcome", "")),
        )
        for v in report["vassals"]
    ]


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


def cpu_measured(command: Sequence[str], cpu_file: Path) -> list[str]:
    """``command`` run by a wrapper that writes its CPU seconds to ``cpu_file``."""
    return [sys.executable, "-c", MEASURE_CPU, str(cpu_file), *command]


def read_cpu_seconds(cpu_file: Path) -> float | None:
    try:
        data = json.loads(cpu_file.read_text())
    except (OSError, ValueError):
        return None
    return float(data["user"]) + float(data["system"])


# ---------------------------------------------------------------------------------------------
# One reload under load
# ---------------------------------------------------------------------------------------------


class Broken(enum.Enum):
    """What a reload under load can break: the kinds of problem ``ReloadRun.problems`` finds."""

    NOT_FINISHED = enum.auto()
    FAILED_REQUESTS = enum.auto()
    LITTLE_LOAD = enum.auto()
    OBSERVER_GAP = enum.auto()
    BELOW_MINIMUM = enum.auto()
    NOT_REPLACED = enum.auto()
    END_STATE = enum.auto()
    """The command exited 0 with a vassal not accepting, not live, or on an old worker."""


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: Broken
    text: str

    def __str__(self) -> str:
        return self.text


@dataclasses.dataclass
class ReloadRun:
    """One reload command run under load, with everything measured around it."""

    load: LoadReport
    observer: Observer
    workers_before: dict[str, list[int]]
    workers_after: dict[str, list[int]]
    users: int = USERS
    command: list[str] = dataclasses.field(default_factory=list)
    tool_json: dict[str, Any] | None = None
    """The command's ``--json`` report (``vassals``: name, triggered, back, duration...); None
    for a command that printed none."""
    cpu_seconds: float | None = None
    """User + system seconds of the command's process tree, when measured."""
    end_state: EndState | None = None
    """The stack at the moment the command exited (read by ``endstate.py``)."""

    # -- the command -----------------------------------------------------------------------

    @property
    def reload_started(self) -> float:
        assert self.load.reload is not None
        return self.load.reload.started

    @property
    def reload_ended(self) -> float:
        assert self.load.reload is not None and self.load.reload.ended is not None
        return self.load.reload.ended

    @property
    def returncode(self) -> int | None:
        """None when the command did not finish while the load ran (it was killed)."""
        return None if self.load.reload is None else self.load.reload.returncode

    @property
    def output(self) -> str:
        reload = self.load.reload
        return "" if reload is None else reload.stdout + reload.stderr

    @property
    def command_seconds(self) -> float | None:
        return None if self.load.reload is None else self.load.reload.duration

    def window(self) -> tuple[float, float]:
        """The reload command's run, wall clock; to the end of the load if it never ended."""
        reload = self.load.reload
        if reload is None:
            raise ObserverError("the reload command never ran")
        return reload.started, reload.ended if reload.ended is not None else self.load.ended

    # -- the tool's timeline ---------------------------------------------------------------

    @property
    def timeline(self) -> list[VassalSpan]:
        """Each vassal's reload from the tool's ``--json``; empty for a foreign command."""
        return vassal_spans(self.tool_json)

    def durations(self) -> list[float]:
        """Trigger-to-back seconds of every vassal that came back."""
        if self.tool_json is None:
            return []
        return [
            float(v["duration"]) for v in self.tool_json["vassals"] if v["duration"] is not None
        ]

    @property
    def makespan(self) -> float | None:
        """First trigger to last back; None unless every vassal came back."""
        spans = self.timeline
        triggers = [s.triggered for s in spans if s.triggered is not None]
        backs = [s.back for s in spans if s.back is not None]
        if not spans or len(triggers) < len(spans) or len(backs) < len(spans):
            return None
        return max(backs) - min(triggers)

    @property
    def all_reloaded(self) -> bool:
        return self.returncode == 0 and self.makespan is not None

    # -- the router ------------------------------------------------------------------------

    def min_live_during(self) -> int:
        """Fewest live nodes the observer saw while the reload command ran (the sample just
        before it started counts: it held until the next one)."""
        return self.observer.min_live_between(*self.window())

    @property
    def min_live_seen(self) -> int | None:
        """``min_live_during()``, or None when the observer has no sample to answer with."""
        try:
            return self.min_live_during()
        except ObserverError:
            return None

    @property
    def live(self) -> list[Sample]:
        return self.observer.timeline

    @property
    def blind(self) -> bool:
        """The observer went longer than ``MAX_OBSERVER_GAP`` without a sample."""
        return self.observer.max_gap > MAX_OBSERVER_GAP

    # -- failed requests -------------------------------------------------------------------

    def events(self) -> list[ReloadEvent]:
        """Every vassal's trigger and back from the tool's timeline, in time order."""
        events = []
        for span in self.timeline:
            if span.triggered is not None:
                events.append(ReloadEvent(span.triggered, f"{span.name} triggered"))
            if span.back is not None:
                events.append(ReloadEvent(span.back, f"{span.name} back"))
        return sorted(events, key=lambda e: e.at)

    def failures(self) -> list[FailureAt]:
        """The failed requests by kind and when they failed: seconds since the reload command
        started (since the load started if it never did), and from the nearest vassal trigger
        or back."""
        return place_failures(self.load, self.events())

    def failure_groups(self) -> list[FailureGroup]:
        return group_failures(self.failures())

    def failures_text(self, limit: int = 3) -> str:
        """The failed requests in a few words, for a table cell; "-" when none failed."""
        groups = self.failure_groups()
        if not groups:
            return "-"
        parts = [g.text() for g in groups[:limit]]
        if len(groups) > limit:
            rest = sum(g.count for g in groups[limit:])
            parts.append(f"{rest} more in {len(groups) - limit} more bursts")
        return "; ".join(parts)

    # -- the workers -----------------------------------------------------------------------

    def replaced(self) -> list[str]:
        """Vassals serving from new workers only: none of their workers from before the reload
        is still there, and they have a worker (a dead or missing vassal is not replaced)."""
        return [
            vid
            for vid, before in self.workers_before.items()
            if self.workers_after.get(vid) and not set(before) & set(self.workers_after[vid])
        ]

    def kept_workers(self) -> list[str]:
        """Vassals still served by a worker from before the reload: those it never reloaded."""
        return [
            vid
            for vid, before in self.workers_before.items()
            if set(before) & set(self.workers_after.get(vid, []))
        ]

    def end_state_problems(self) -> list[str]:
        """What was wrong at the moment the command exited 0: each vassal must be accepting,
        live in the router and served by a worker started by this reload."""
        state = self.end_state
        if state is None or state.exit_code != 0:
            return []
        if state.error is not None:
            return [f"stats unreadable at exit: {state.error}"]
        live = state.live_vassals()
        wrong = []
        for vid, before in sorted(self.workers_before.items()):
            stem = Path(vid).stem
            if vid not in state.accepting:
                wrong.append(f"{stem} missing")
            elif not state.accepting[vid]:
                wrong.append(f"{stem} not accepting")
            elif stem not in live:
                wrong.append(f"{stem} not live in the router")
            elif not state.workers.get(vid) or set(before) & set(state.workers[vid]):
                wrong.append(f"{stem} on an old worker")
        return wrong

    # -- judging and reporting -------------------------------------------------------------

    def check(self, minimum: int, *, all_replaced: bool = True) -> list[str]:
        """What broke the zero-downtime promise, as text; empty when nothing did."""
        return [p.text for p in self.problems(minimum, all_replaced=all_replaced)]

    def problems(self, minimum: int, *, all_replaced: bool = True) -> list[Problem]:
        """What broke the zero-downtime promise; empty when nothing did.

        The minimum holds per fastrouter key: the observer counts the key with fewest nodes.
        """
        problems = []
        load = self.load
        if load.reload is None or load.reload.ended is None:
            text = "the reload command did not finish while the load ran"
            return [Problem(Broken.NOT_FINISHED, text)]
        if load.total.failures:
            text = (
                f"{load.total.failures} failed requests {load.total.failures_by_kind}: "
                f"{self.failures_text()}"
            )
            problems.append(Problem(Broken.FAILED_REQUESTS, text))
        if load.during.requests < MIN_REQUESTS_DURING:
            text = f"only {load.during.requests} requests during the reload"
            problems.append(Problem(Broken.LITTLE_LOAD, text))
        if self.blind:
            text = f"observer gap {self.observer.max_gap * 1000:.0f} ms"
            problems.append(Problem(Broken.OBSERVER_GAP, text))
        if self.observer.min_live < minimum:
            per_key = ", ".join(f"{k} {n}" for k, n in self.observer.min_live_by_key().items())
            text = (
                f"observer saw {self.observer.min_live} live nodes (minimum {minimum}; {per_key})"
            )
            problems.append(Problem(Broken.BELOW_MINIMUM, text))
        not_replaced = sorted(set(self.workers_before) - set(self.replaced()))
        if all_replaced and not_replaced:
            text = f"workers not replaced: {', '.join(not_replaced)}"
            problems.append(Problem(Broken.NOT_REPLACED, text))
        if wrong := self.end_state_problems():
            text = f"exited 0 before the stack was back: {', '.join(wrong)}"
            problems.append(Problem(Broken.END_STATE, text))
        return problems

    def row(self, name: str, minimum: int) -> dict[str, object]:
        during = self.load.during
        took = self.command_seconds
        return {
            "test": name,
            "minimum": minimum,
            "users": self.users,
            "exit": self.returncode,
            "reload s": None if took is None else round(took, 2),
            "requests during": during.requests,
            "failed": self.load.total.failures,
            "observer min": self.observer.min_live,
            "observer gap ms": round(self.observer.max_gap * 1000),
            "max ms during": round(during.max_ms),
            "p99 ms before": round(self.load.before.p99, 1),
            "failed when (s after the reload started)": self.failures_text(limit=2),
        }

    def as_json(self) -> dict[str, Any]:
        """Every number of the run, for a benchmark's JSON."""
        load = self.load
        return {
            "command": self.command,
            "returncode": self.returncode,
            "command_seconds": self.command_seconds,
            "makespan": self.makespan,
            "durations": self.durations(),
            "requests": load.total.requests,
            "requests_during": load.during.requests,
            "failures": load.total.failures,
            "failures_by_kind": load.total.failures_by_kind,
            "failure_groups": [g.as_json() for g in self.failure_groups()],
            "failed_requests": [f.as_json() for f in self.failures()],
            "p99_ms_before": load.before.p99,
            "p99_ms_steady": load.steady.p99,
            "p99_ms_during": load.during.p99,
            "p999_ms_during": load.during.p999,
            "max_ms_during": load.during.max_ms,
            "min_live_during": self.min_live_seen,
            "observer_gap_s": self.observer.max_gap,
            "observer_errors": self.observer.errors,
            "cpu_seconds": self.cpu_seconds,
            "result": self.tool_json,
        }


@contextlib.contextmanager
def progress(observer: Observer, total: int, every: float = 1.0) -> Iterator[None]:
    """Print a line with the live node count every ``every`` seconds while the block runs."""
    stop = threading.Event()
    started = time.monotonic()

    def loop() -> None:
        while not stop.wait(every):
            live = observer.live
            shown = "?" if live is None else str(live)
            print(f"  {time.monotonic() - started:5.1f} s  live nodes {shown}/{total}", flush=True)

    thread = threading.Thread(target=loop, name="reload-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def reload_under_load(
    target: Stack | Fleet,
    command: Sequence[str],
    *,
    reload_at: float = 1.5,
    after_reload: float = 1.5,
    users: int = USERS,
    rate: float = 0.0,
    observer_interval: float = 0.006,
    observer_readers: int = 3,
    measure_cpu: bool = False,
    load_json: Path | None = None,
    show_progress: bool = False,
    max_run_time: float | None = None,
    hosts: Sequence[Host] | None = None,
    path: str | None = None,
) -> ReloadRun:
    """Load through nginx on the stack's (or fleet's) health path, ``command`` ``reload_at`` s
    in, the router (every router) watched the whole time.

    ``rate``: requests/s over all users (0: as fast as the stack answers). ``measure_cpu``: run
    the command under a wrapper that records its CPU seconds. ``load_json``: keep the load
    report there. ``show_progress``: print the live node count every second. ``max_run_time``
    bounds the load (default ``reload_at + after_reload + COMMAND_GRACE_S``): a command still
    running then is killed. ``hosts``: of a fleet, the hosts ``command`` reloads (default: every
    host); the workers and the end state are theirs, the routers count every host's nodes.
    ``path``: what the load GETs (default: the health path), for an app whose health path is
    not its users' (the safe-deploy tests probe ``/health`` while the users GET ``/``).
    """
    hosts = target.hosts if hosts is None else hosts

    def worker_pids() -> dict[str, list[int]]:
        return {vid: pids for h in hosts for vid, pids in h.worker_pids().items()}

    workers_before = worker_pids()
    observer = observer_of(target, interval=observer_interval, readers=observer_readers)
    vassals = sum(len(h.vassal_ids) for h in hosts)
    shown = progress(observer, vassals) if show_progress else contextlib.nullcontext()
    emperor_paths = [h.emperor_path for h in hosts]
    with tempfile.TemporaryDirectory(prefix="ur-measure-") as tmp:
        cpu_file = Path(tmp, "cpu.json")
        end_file = Path(tmp, "end-state.json")
        run_command = cpu_measured(command, cpu_file) if measure_cpu else list(command)
        emperors, routers = [h.emperor_stats for h in hosts], [r.stats for r in target.routers]
        run_command = wrapped(run_command, emperors, routers, end_file)
        with observer, shown:
            try:
                load = run_load(
                    target.url,
                    # users take the keys in turn: every key is under load
                    host_header=",".join(target.keys),
                    url_path=target.config.health_path if path is None else path,
                    users=users,
                    rate=rate,
                    reload_command=shlex.join(run_command),
                    reload_at=reload_at,
                    after_reload=after_reload,
                    max_run_time=(
                        reload_at + after_reload + COMMAND_GRACE_S
                        if max_run_time is None
                        else max_run_time
                    ),
                    report_path=load_json,
                    nice=5,
                )
            except BaseException:
                stop_reload_commands(emperor_paths)
                raise
        cpu_seconds = read_cpu_seconds(cpu_file) if measure_cpu else None
        end_state = (
            EndState.from_json(json.loads(end_file.read_text())) if end_file.exists() else None
        )
    return ReloadRun(
        load,
        observer,
        workers_before,
        worker_pids(),
        users,
        command=list(command),
        tool_json=None if load.reload is None else tool_report(load.reload.stdout),
        cpu_seconds=cpu_seconds,
        end_state=end_state,
    )


def stop_reload_commands(emperor_paths: Sequence[Path], timeout: float = 10.0) -> None:
    """SIGTERM what still runs with ``--emperor-path <one of these dirs>`` in its argv: a reload
    command locust started in a session of its own, left behind when locust was killed
    (Ctrl-C). The dirs are fresh temp dirs, so only commands started for this stack or fleet
    match (an emperor itself has ``--emperor <dir>/``: SIGTERM would make it reload, not
    stop)."""
    wanted = {("--emperor-path", str(path)) for path in emperor_paths}
    strays = []
    for process in psutil.process_iter(["cmdline"]):
        argv = process.info["cmdline"] or []
        if wanted & set(zip(argv, argv[1:])):
            strays.append(process)
    for process in strays:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    psutil.wait_procs(strays, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Repeated runs
# ---------------------------------------------------------------------------------------------


def again(stack: Stack | Fleet, command: Sequence[str], **options: Any) -> Callable[[], ReloadRun]:
    """One reload under load of ``stack`` (or a fleet), repeatable: each starts with every
    vassal live. ``options``: of :func:`reload_under_load`."""

    def attempt() -> ReloadRun:
        stack.wait_all_live(timeout=30)
        return reload_under_load(stack, command, **options)

    return attempt


StackOrFleet = TypeVar("StackOrFleet", Stack, Fleet)


class FreshStacks(Generic[StackOrFleet]):
    """A new stack (or fleet) for each attempt of a run that leaves it changed (a broken
    deploy).

    Making one stops the one before, so two stacks never share the machine.
    """

    def __init__(self, make: Callable[..., StackOrFleet], **config: object) -> None:
        self._make: Callable[..., StackOrFleet] = make
        self._config = config
        self.current: StackOrFleet | None = None

    def __call__(self) -> StackOrFleet:
        if self.current is not None:
            self.current.stop()
        self.current = self._make(**self._config)
        return self.current


def observed(
    attempt: Callable[[], ReloadRun],
    name: str,
    minimum: int,
    record: Callable[[dict[str, object]], None],
    *,
    all_replaced: bool = True,
    failures_allowed: bool = False,
    expected_exit: int | None = 0,
    verify: Callable[[ReloadRun], list[str]] | None = None,
) -> ReloadRun:
    """``attempt()`` again, up to ``ATTEMPTS`` runs, while the observer's gap is its only problem.

    The machine can stall every process at once for 20-30 ms, the observer's threads included
    (measured on a 2-core VM: a real-time process pinned to each core was late at the same
    moments as the observer's largest gaps). A run the observer watched that coarsely proves
    nothing either way, so it is measured again. Any other problem ends the retries and the run
    is returned at once for the test to fail on, as is the last attempt: a lost request, a
    minimum broken, a worker not replaced, a wrong end state, an exit code other than
    ``expected_exit`` (None: any), or a complaint of the test's own ``verify``.
    ``failures_allowed``: failed requests during the reload are what the test measures (it
    asserts on them), so they alone do not end the retries; failures before or after the reload
    still do. Every attempt gets its row in the table.
    """
    number = 0
    while True:
        number += 1
        run = attempt()
        label = name if number == 1 else f"{name} (attempt {number})"
        record(run.row(label, minimum))
        others = [
            problem
            for problem in run.problems(minimum, all_replaced=all_replaced)
            if problem.kind is not Broken.OBSERVER_GAP
            and not (
                failures_allowed and _only_during(run) and problem.kind is Broken.FAILED_REQUESTS
            )
        ]
        wrong_exit = expected_exit is not None and run.returncode != expected_exit
        complaints = verify(run) if verify is not None else []
        if not run.blind or others or wrong_exit or complaints or number == ATTEMPTS:
            return run
        print(f"{label}: observer gap {run.observer.max_gap * 1000:.0f} ms, measuring again")


def _only_during(run: ReloadRun) -> bool:
    return run.load.before.failures == 0 and run.load.after.failures == 0
