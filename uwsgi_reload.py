#!/usr/bin/env python3
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
"""Graceful reload for uWSGI vassals behind a fastrouter, keeping a minimum live at all times.

Standalone: Python >= 3.9 standard library only. Copy it to a server and run it.

Exit codes: 0 all reloaded, 1 not all reloaded, 2 usage or bad input, 3 another run holds the
lock, 130 interrupted (SIGINT or SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import errno
import fcntl
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Callable, TextIO

__version__ = "0.1.0"

EXIT_OK = 0
EXIT_NOT_ALL_RELOADED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_INTERRUPTED = 130


class ReloadError(Exception):
    """Bad input or an environment the tool cannot work with; nothing was touched."""

    exit_code = EXIT_USAGE


class LockedError(ReloadError):
    """Another run holds the lock on this emperor."""

    exit_code = EXIT_LOCKED


class StatsError(ReloadError):
    """A stats socket is missing, refuses the connection or does not speak JSON."""


# ---------------------------------------------------------------------------------------------
# Stats sockets
# ---------------------------------------------------------------------------------------------


def _connect(address: str, timeout: float) -> socket.socket:
    """Connect to a unix path, or to ``host:port`` when the address is not an existing path."""
    host, sep, port = address.rpartition(":")
    if "/" not in address and sep and port.isdigit():
        return socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def read_stats(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """Read one JSON document from a uWSGI stats server (it writes it and closes)."""
    try:
        with _connect(address, timeout) as sock:
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except FileNotFoundError:
        raise StatsError(f"stats socket {address} does not exist") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise StatsError(f"cannot read stats socket {address}: {reason}") from None
    raw = b"".join(chunks)
    try:
        data = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        raise StatsError(
            f"stats socket {address} did not answer with JSON (is it a uWSGI stats server?)"
        ) from None
    if not isinstance(data, dict):
        raise StatsError(f"stats socket {address} answered JSON that is not an object")
    return data


@dataclasses.dataclass(frozen=True)
class EmperorVassal:
    """One vassal as the emperor's stats server reports it."""

    id: str
    pid: int
    respawns: int
    last_mod: int
    accepting: bool
    ready: bool


@dataclasses.dataclass(frozen=True)
class Node:
    """One node of a fastrouter subscription."""

    key: str
    name: str
    death_mark: bool
    ref: int

    @property
    def live(self) -> bool:
        return not self.death_mark


def parse_emperor_stats(data: Mapping[str, Any]) -> dict[str, EmperorVassal]:
    """Vassals by id (the config file name, e.g. ``vassal_01.ini``)."""
    if not isinstance(data.get("vassals"), list):
        raise StatsError("emperor stats have no 'vassals' list (is it an emperor stats server?)")
    vassals = {}
    for raw in data["vassals"]:
        vassal = EmperorVassal(
            id=str(raw["id"]),
            pid=int(raw.get("pid", 0)),
            respawns=int(raw.get("respawns", 0)),
            last_mod=int(raw.get("last_mod", 0)),
            accepting=bool(raw.get("accepting", 0)),
            ready=bool(raw.get("ready", 0)),
        )
        vassals[vassal.id] = vassal
    return vassals


def parse_fastrouter_stats(data: Mapping[str, Any]) -> list[Node]:
    """Every node of every subscription key."""
    if not isinstance(data.get("subscriptions"), list):
        raise StatsError(
            "fastrouter stats have no 'subscriptions' list (is it a fastrouter stats server?)"
        )
    return [
        Node(
            key=str(sub.get("key", "")),
            name=str(node.get("name", "")),
            death_mark=bool(node.get("death_mark", 0)),
            ref=int(node.get("ref", 0)),
        )
        for sub in data["subscriptions"]
        for node in sub.get("nodes", [])
    ]


def strip_suffix(name: str, suffix: str) -> str:
    return name[: -len(suffix)] if suffix and name.endswith(suffix) else name


def node_vassal_name(node_name: str) -> str:
    """The vassal a node belongs to: its socket is named after the vassal's config (``%n``).

    ``/run/app/shop.v2.sock`` -> ``shop.v2``: only the last extension goes, so dots survive.
    """
    base = node_name.rstrip("/").rsplit("/", 1)[-1]
    stem, dot, _ = base.rpartition(".")
    return stem if dot else base


# ---------------------------------------------------------------------------------------------
# Decision logic: pure functions over parsed stats
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the emperor and the fastrouter said in one poll."""

    vassals: Mapping[str, EmperorVassal]
    nodes: Sequence[Node]


def live_keys(vassal: EmperorVassal | None, name: str, nodes: Iterable[Node]) -> frozenset[str]:
    """The fastrouter keys under which this vassal is live; empty when it is not live.

    Live means the emperor says accepting and the vassal's node is subscribed with death_mark 0.
    """
    if vassal is None or not vassal.accepting:
        return frozenset()
    return frozenset(
        node.key for node in nodes if node.live and node_vassal_name(node.name) == name
    )


def reload_registered(baseline: EmperorVassal, current: EmperorVassal | None) -> bool:
    """The emperor acted on the touch: it bumps respawns and last_mod together (core/emperor.c).

    A vassal that died instead is re-added as a new entry with a new pid and respawns 0.
    """
    if current is None:
        return False
    return (
        current.respawns != baseline.respawns
        or current.last_mod != baseline.last_mod
        or current.pid != baseline.pid
    )


class Stage(str, enum.Enum):
    """How far a triggered vassal got; what a timeout reports."""

    TOUCHED = "the emperor never registered the touch"
    REGISTERED = "reloading, but never accepting again (did the app fail to load? see its log)"
    ACCEPTING = "accepting, but its node never became live in the fastrouter"
    BACK = "back"


def reload_stage(
    baseline: EmperorVassal, current: EmperorVassal | None, keys: frozenset[str]
) -> Stage:
    """Back means: the emperor registered the reload, then reports accepting, then the node is live.

    The emperor zeroes ``accepting`` in the same step that bumps respawns, so an ``accepting`` seen
    together with a moved respawns/last_mod belongs to the new instance.
    """
    if not reload_registered(baseline, current):
        return Stage.TOUCHED
    assert current is not None
    if not current.accepting:
        return Stage.REGISTERED
    if not keys:
        return Stage.ACCEPTING
    return Stage.BACK


def touch_mtime(now: float, last_mod: int) -> int:
    """A whole-second mtime the emperor will see as newer: it compares ``st_mtime > last_mod``."""
    return max(int(now), last_mod + 1)


def pick_reloads(
    candidates: Sequence[str],
    live: Mapping[str, frozenset[str]],
    minimum: int,
    free_slots: int | None,
) -> list[str]:
    """Which of ``candidates`` (in order) may start reloading now.

    ``live`` maps every vassal counted as live (in-flight and timed-out ones already left out) to
    its keys. A vassal that is not live costs nothing and may always go; a live one may go only if
    every key it serves keeps at least ``minimum`` live vassals without it. Not-live vassals go
    first. ``free_slots`` caps the number started (``None``: no cap).
    """
    per_key: dict[str, int] = {}
    for keys in live.values():
        for key in keys:
            per_key[key] = per_key.get(key, 0) + 1
    ordered = [v for v in candidates if not live.get(v)] + [v for v in candidates if live.get(v)]
    picked: list[str] = []
    for vassal in ordered:
        if free_slots is not None and len(picked) >= free_slots:
            break
        keys = live.get(vassal, frozenset())
        if all(per_key[key] - 1 >= minimum for key in keys):
            for key in keys:
                per_key[key] -= 1
            picked.append(vassal)
    return picked


def rounds_needed(vassals: int, minimum: int) -> int:
    """Single-reload times a pipelined rollout needs at best: ceil(N / (N - m))."""
    return math.ceil(vassals / (vassals - minimum)) if vassals > minimum else 0


class Outcome(str, enum.Enum):
    RELOADED = "reloaded"
    TIMED_OUT = "timed out"
    FAILED = "failed"
    NOT_STARTED = "not started"
    IN_FLIGHT = "in flight"


@dataclasses.dataclass
class VassalReload:
    """One vassal's progress through the run. Times are seconds since the run started."""

    id: str
    name: str
    config: str
    #: the emperor's view when the run first saw it; ``baseline`` when it started reloading
    initial: EmperorVassal | None = None
    baseline: EmperorVassal | None = None
    triggered: float | None = None
    back: float | None = None
    stage: Stage | None = None
    outcome: Outcome | None = None
    detail: str = ""

    @property
    def duration(self) -> float | None:
        if self.triggered is None or self.back is None:
            return None
        return self.back - self.triggered

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "outcome": (self.outcome or Outcome.NOT_STARTED).value,
            "triggered": _round(self.triggered),
            "back": _round(self.back),
            "duration": _round(self.duration),
            "detail": self.detail,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class EventKind(enum.Enum):
    TRIGGERED = "triggered"
    RESTARTED = "restarted"
    BACK = "back"
    TIMED_OUT = "timed out"
    NOT_STARTED = "not started"


@dataclasses.dataclass
class Event:
    at: float
    vassal: VassalReload
    kind: EventKind
    what: str


class Rollout:
    """The whole run's state; ``step`` decides from one snapshot, with no I/O of its own."""

    def __init__(
        self,
        vassals: Sequence[VassalReload],
        minimum: int,
        timeout: float,
        max_parallel: int | None = None,
    ) -> None:
        self.vassals = {v.id: v for v in vassals}
        self.minimum = minimum
        self.timeout = timeout
        self.max_parallel = max_parallel
        self.lowest_live: dict[str, int] = {}

    def pending(self) -> list[VassalReload]:
        return [v for v in self.vassals.values() if v.triggered is None and v.outcome is None]

    def in_flight(self) -> list[VassalReload]:
        return [v for v in self.vassals.values() if v.triggered is not None and v.outcome is None]

    @property
    def finished(self) -> bool:
        return not self.pending() and not self.in_flight()

    def _live(self, snapshot: Snapshot) -> dict[str, frozenset[str]]:
        """Vassals counted as live: in flight and failed ones never are, whatever stats say."""
        live = {}
        for v in self.vassals.values():
            if v.triggered is None or v.outcome is Outcome.RELOADED:
                keys = live_keys(snapshot.vassals.get(v.id), v.name, snapshot.nodes)
                if keys:
                    live[v.id] = keys
        return live

    def step(self, snapshot: Snapshot, now: float) -> list[Event]:
        """Record who is back or timed out, then mark the vassals that may start now.

        The caller touches the config of every vassal in a ``triggered`` event.
        """
        events = self._adopt_restarted(snapshot, now)
        for v in self.in_flight():
            assert v.baseline is not None and v.triggered is not None
            current = snapshot.vassals.get(v.id)
            v.stage = reload_stage(v.baseline, current, live_keys(current, v.name, snapshot.nodes))
            if v.stage is Stage.BACK:
                v.back, v.outcome = now, Outcome.RELOADED
                events.append(Event(now, v, EventKind.BACK, f"back after {now - v.triggered:.2f}s"))
            elif now - v.triggered >= self.timeout:
                v.outcome, v.detail = Outcome.TIMED_OUT, v.stage.value
                events.append(
                    Event(
                        now,
                        v,
                        EventKind.TIMED_OUT,
                        f"timed out after {self.timeout:g}s: {v.detail}",
                    )
                )
        live = self._live(snapshot)
        counts: dict[str, int] = dict.fromkeys(self.lowest_live, 0)
        for keys in live.values():
            for key in keys:
                counts[key] = counts.get(key, 0) + 1
        for key, count in counts.items():
            self.lowest_live[key] = min(self.lowest_live.get(key, count), count)
        free = None if self.max_parallel is None else self.max_parallel - len(self.in_flight())
        candidates = [v.id for v in self.pending() if v.id in snapshot.vassals]
        for vassal_id in pick_reloads(candidates, live, self.minimum, free):
            v = self.vassals[vassal_id]
            v.baseline, v.triggered, v.stage = snapshot.vassals[vassal_id], now, Stage.TOUCHED
            what = "triggered" if vassal_id in live else "triggered (was not live)"
            events.append(Event(now, v, EventKind.TRIGGERED, what))
        if not self.in_flight():
            # Nothing in flight and nothing may start: no live count can rise any more.
            for v in self.pending():
                v.outcome = Outcome.NOT_STARTED
                v.detail = (
                    "not known to the emperor"
                    if v.id not in snapshot.vassals
                    else f"reloading it would leave fewer than {self.minimum} live"
                )
                events.append(Event(now, v, EventKind.NOT_STARTED, f"not started: {v.detail}"))
        return events

    def _adopt_restarted(self, snapshot: Snapshot, now: float) -> list[Event]:
        """A pending vassal with a new pid died and was started again by the emperor: it is
        loading the current code already. Touching it would reload it in the middle of its start
        and drop what queued on its socket; wait for it instead, like a reload in flight."""
        events = []
        for v in self.pending():
            current = snapshot.vassals.get(v.id)
            if current is None:
                continue
            if v.initial is None:
                v.initial = current
            elif current.pid != v.initial.pid:
                v.baseline, v.triggered, v.stage = v.initial, now, Stage.REGISTERED
                what = (
                    f"restarted by the emperor (pid {v.initial.pid} -> {current.pid}): not touched"
                )
                events.append(Event(now, v, EventKind.RESTARTED, what))
        return events

    def abandon(self, reason: str) -> None:
        """Stop: in-flight vassals stay in flight, pending ones are reported as not started."""
        for v in self.in_flight():
            v.outcome, v.detail = Outcome.IN_FLIGHT, (v.stage or Stage.TOUCHED).value
        for v in self.pending():
            v.outcome, v.detail = Outcome.NOT_STARTED, reason


# ---------------------------------------------------------------------------------------------
# The edges: configs, checks before touching anything, the lock, touching
# ---------------------------------------------------------------------------------------------


def find_configs(emperor_path: str, suffix: str) -> list[str]:
    """The vassal configs the emperor watches, as paths (links are not followed)."""
    if not os.path.exists(emperor_path):
        raise ReloadError(f"emperor path {emperor_path} does not exist")
    if not os.path.isdir(emperor_path):
        raise ReloadError(f"emperor path {emperor_path} is not a directory")
    configs = sorted(
        os.path.join(emperor_path, entry.name)
        for entry in os.scandir(emperor_path)
        if entry.name.endswith(suffix) and not entry.is_dir()
    )
    if not configs:
        raise ReloadError(f"no vassal config ending in {suffix!r} in {emperor_path}")
    return configs


def plan_fleet(configs: Sequence[str], suffix: str) -> list[VassalReload]:
    return [
        VassalReload(
            id=os.path.basename(c), name=strip_suffix(os.path.basename(c), suffix), config=c
        )
        for c in configs
    ]


def check_fleet(fleet: Sequence[VassalReload], snapshot: Snapshot, minimum: int) -> None:
    """Refuse, before touching anything, a run that cannot keep its promises."""
    known = [v for v in fleet if v.id in snapshot.vassals]
    if not known:
        ids = ", ".join(sorted(snapshot.vassals)) or "none"
        raise ReloadError(f"the emperor runs none of the configs found (its vassals: {ids})")
    if minimum >= len(known):
        raise ReloadError(
            f"--minimum-active-vassals {minimum} leaves nothing to reload: the emperor runs "
            f"{len(known)} vassals and at least {minimum} must stay live"
        )
    live = {v.id: live_keys(snapshot.vassals[v.id], v.name, snapshot.nodes) for v in known}
    names = {v.name for v in fleet}
    stray = sorted(
        {n.name for n in snapshot.nodes if n.live and node_vassal_name(n.name) not in names}
    )
    unmatched = sorted(v.id for v in known if snapshot.vassals[v.id].accepting and not live[v.id])
    if stray and unmatched:
        raise ReloadError(
            f"cannot tell which fastrouter node is which vassal: {', '.join(unmatched)} accept "
            f"but match no node, nodes {', '.join(stray)} match no vassal (each vassal's socket "
            "must be named after its config, e.g. socket = /run/uwsgi/%n.sock)"
        )
    not_live = sum(1 for keys in live.values() if not keys)
    per_key: dict[str, int] = {}
    for keys in live.values():
        for key in keys:
            per_key[key] = per_key.get(key, 0) + 1
    for key, count in sorted(per_key.items()):
        if count + not_live <= minimum:
            raise ReloadError(
                f"fastrouter key {key!r} has {count} live vassals: with "
                f"--minimum-active-vassals {minimum} none of them could be reloaded"
            )
    for v in known:
        if emperor_follows_link(v.config, snapshot.vassals[v.id]):
            raise ReloadError(
                f"the emperor follows the symlink {v.config}, so touching the link would not "
                "reload it: run the emperor with --emperor-nofollow"
            )


def emperor_follows_link(config: str, vassal: EmperorVassal) -> bool:
    """True when the emperor's last_mod is the link target's mtime, not the link's own.

    Without --emperor-nofollow the emperor stat()s through the link (core/emperor.c), and this
    tool never touches a target: many links share it and would all reload at once.
    """
    if not os.path.islink(config):
        return False
    try:
        link_mtime, target_mtime = int(os.lstat(config).st_mtime), int(os.stat(config).st_mtime)
    except OSError:
        return False
    return link_mtime != target_mtime and vassal.last_mod == target_mtime


def touch(config: str, mtime: int) -> None:
    """Set the mtime of the config itself: a link is touched, never its target."""
    os.utime(config, ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)


def lock_holder(directory_stat: os.stat_result, locks_file: str = "/proc/locks") -> int | None:
    """The pid holding a flock on the directory, read from /proc/locks (Linux)."""
    device = f"{os.major(directory_stat.st_dev):02x}:{os.minor(directory_stat.st_dev):02x}"
    wanted = f"{device}:{directory_stat.st_ino}"
    try:
        with open(locks_file, encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                if "->" not in fields and fields[1:2] == ["FLOCK"] and fields[5:6] == [wanted]:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


@contextmanager
def emperor_lock(emperor_path: str) -> Iterator[None]:
    """One run per emperor: an exclusive flock on the emperor directory itself.

    No lock file is created, so nothing in a world-writable directory can be swapped for a
    symlink; the kernel drops the lock when the process exits, however it exits.
    """
    fd = os.open(emperor_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = lock_holder(os.fstat(fd))
            who = f"pid {holder}" if holder else "another process"
            raise LockedError(
                f"another uwsgi-reload run ({who}) is reloading the emperor of {emperor_path}"
            ) from None
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Reporter:
    """Event lines with elapsed seconds; errors always, the rest unless quiet."""

    def __init__(self, quiet: bool, stream: TextIO, errors: TextIO) -> None:
        self.quiet, self.stream, self.errors = quiet, stream, errors

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def event(self, event: Event) -> None:
        self.line(f"{event.at:8.2f}s  {event.vassal.name}: {event.what}")

    def error(self, text: str) -> None:
        print(f"uwsgi-reload: error: {text}", file=self.errors, flush=True)


@dataclasses.dataclass
class Options:
    emperor_path: str
    fastrouter_stats_socket: str
    emperor_stats_socket: str
    vassal_config_file_suffix: str = ".ini"
    minimum_active_vassals: int = 1
    timeout: float = 60.0
    check_interval: float = 0.1
    quiet: bool = False
    dry_run: bool = False
    json: bool = False
    max_parallel: int | None = None


def take_snapshot(options: Options) -> Snapshot:
    # The emperor rescans its directory after every event it handles, a stats connection
    # included (core/emperor.c), so polling it also makes it notice a touch at once.
    vassals = parse_emperor_stats(read_stats(options.emperor_stats_socket))
    nodes = parse_fastrouter_stats(read_stats(options.fastrouter_stats_socket))
    return Snapshot(vassals, nodes)


def describe_plan(fleet: Sequence[VassalReload], snapshot: Snapshot, options: Options) -> list[str]:
    live = {v.id: live_keys(snapshot.vassals.get(v.id), v.name, snapshot.nodes) for v in fleet}
    order = [v for v in fleet if not live[v.id]] + [v for v in fleet if live[v.id]]
    keys = sorted({k for ks in live.values() for k in ks})
    lines = [f"dry run: would reload {len(fleet)} vassals of {options.emperor_path}, order:"]
    for v in order:
        state = (
            f"live for {', '.join(sorted(live[v.id]))}" if live[v.id] else "not live, goes first"
        )
        lines.append(f"  {v.name} ({v.id}): {state}")
    for key in keys:
        count = sum(1 for ks in live.values() if key in ks)
        at_once = count - options.minimum_active_vassals
        if options.max_parallel is not None:
            at_once = min(at_once, options.max_parallel)
        lines.append(
            f"key {key!r}: {count} live, minimum {options.minimum_active_vassals}: up to "
            f"{at_once} reloading at once, about {math.ceil(count / at_once)} reload times"
        )
    return lines


def report_json(
    fleet: Sequence[VassalReload],
    options: Options,
    started: float,
    elapsed: float,
    exit_code: int,
    rollout: Rollout | None,
) -> dict[str, Any]:
    return {
        "version": __version__,
        "emperor_path": options.emperor_path,
        "minimum_active_vassals": options.minimum_active_vassals,
        "dry_run": options.dry_run,
        "started": round(started, 3),
        "elapsed": round(elapsed, 3),
        "exit_code": exit_code,
        "lowest_live": dict(rollout.lowest_live) if rollout else {},
        "vassals": [v.as_json() for v in fleet],
    }


class _Interrupted:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.signal = signum


@dataclasses.dataclass(frozen=True)
class Io:
    """Everything the run does to the world, so that tests can replace it."""

    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    snapshot: Callable[[Options], Snapshot] = take_snapshot
    touch: Callable[[str, int], None] = touch


def run(options: Options, reporter: Reporter, io: Io | None = None) -> int:
    io = io or Io()
    configs = find_configs(options.emperor_path, options.vassal_config_file_suffix)
    fleet = plan_fleet(configs, options.vassal_config_file_suffix)
    first = io.snapshot(options)
    check_fleet(fleet, first, options.minimum_active_vassals)
    started_wall, started = io.wall_clock(), io.clock()
    if options.dry_run:
        for line in describe_plan(fleet, first, options):
            reporter.line(line)
        if options.json:
            print(json.dumps(report_json(fleet, options, started_wall, 0.0, EXIT_OK, None)))
        return EXIT_OK

    interrupted = _Interrupted()
    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    rollout = Rollout(fleet, options.minimum_active_vassals, options.timeout, options.max_parallel)
    try:
        with emperor_lock(options.emperor_path):
            exit_code = _drive(rollout, options, reporter, first, started, interrupted, io)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    elapsed = io.clock() - started
    _summarise(rollout, reporter, elapsed, exit_code)
    if options.json:
        print(json.dumps(report_json(fleet, options, started_wall, elapsed, exit_code, rollout)))
    return exit_code


def _drive(
    rollout: Rollout,
    options: Options,
    reporter: Reporter,
    current: Snapshot | None,
    started: float,
    interrupted: _Interrupted,
    io: Io,
) -> int:
    unreadable_since: float | None = None
    while True:
        now = io.clock() - started
        if current is None:
            try:
                current = io.snapshot(options)
                unreadable_since = None
            except StatsError as exc:
                unreadable_since = now if unreadable_since is None else unreadable_since
                if now - unreadable_since >= options.timeout:
                    rollout.abandon(f"stats unreadable for {options.timeout:g}s: {exc}")
                    return EXIT_NOT_ALL_RELOADED
        if interrupted.signal is not None:
            rollout.abandon(f"interrupted by {signal.Signals(interrupted.signal).name}")
            return EXIT_INTERRUPTED
        for event in rollout.step(current, now) if current is not None else []:
            vassal = event.vassal
            if event.kind is EventKind.TRIGGERED:
                assert vassal.baseline is not None
                try:
                    io.touch(vassal.config, touch_mtime(io.wall_clock(), vassal.baseline.last_mod))
                except OSError as exc:
                    vassal.outcome, vassal.detail = Outcome.FAILED, f"cannot touch: {exc}"
                    event.what = f"failed: {vassal.detail}"
            reporter.event(event)
        if rollout.finished:
            everything = all(v.outcome is Outcome.RELOADED for v in rollout.vassals.values())
            return EXIT_OK if everything else EXIT_NOT_ALL_RELOADED
        current = None
        io.sleep(options.check_interval)


def _summarise(rollout: Rollout, reporter: Reporter, elapsed: float, exit_code: int) -> None:
    vassals = list(rollout.vassals.values())
    for v in vassals:
        if v.outcome is Outcome.TIMED_OUT and v.stage is Stage.TOUCHED and os.path.islink(v.config):
            v.detail += (
                " (the configs are symlinks: the emperor sees a touch of the link only with "
                "--emperor-nofollow)"
            )
    done = sum(1 for v in vassals if v.outcome is Outcome.RELOADED)
    lowest = ", ".join(f"{k}: {n}" for k, n in sorted(rollout.lowest_live.items())) or "none"
    summary = (
        f"reloaded {done} of {len(vassals)} vassals in {elapsed:.2f}s "
        f"(minimum {rollout.minimum}; fewest live seen per key: {lowest})"
    )
    if exit_code == EXIT_OK:
        reporter.line(summary)
        return
    reporter.error(summary)
    for v in vassals:
        if v.outcome is not Outcome.RELOADED:
            reporter.error(f"{v.name}: {(v.outcome or Outcome.NOT_STARTED).value}: {v.detail}")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number greater than 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="uwsgi-reload",
        description="Graceful reload for uWSGI vassals behind a fastrouter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="exit codes: 0 all reloaded, 1 not all reloaded, 2 usage or bad input, "
        "3 another run holds the lock, 130 interrupted",
    )
    add = parser.add_argument
    add(
        "--emperor-path",
        required=True,
        default=argparse.SUPPRESS,
        metavar="<dir>",
        help="directory used by the Emperor",
    )
    add(
        "--fastrouter-stats-socket",
        required=True,
        default=argparse.SUPPRESS,
        metavar="<socket>",
        help="Fastrouter statistics socket (unix path or host:port)",
    )
    add(
        "--emperor-stats-socket",
        required=True,
        default=argparse.SUPPRESS,
        metavar="<socket>",
        help="Emperor statistics socket (unix path or host:port)",
    )
    add(
        "--vassal-config-file-suffix",
        default=".ini",
        metavar="<string>",
        help="vassal config file suffix",
    )
    add(
        "--minimum-active-vassals",
        type=_non_negative_int,
        default=1,
        metavar="<int>",
        help="the minimum number of vassals that should be active at any given time during "
        "the reload, per fastrouter key",
    )
    add(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="<seconds>",
        help="how long to wait for the reload of a vassal",
    )
    add(
        "--check-interval",
        type=_positive_float,
        default=0.1,
        metavar="<float>",
        help="interval between vassal status checks (seconds)",
    )
    add(
        "--max-parallel",
        type=_positive_int,
        default=None,
        metavar="<int>",
        help="at most this many vassals reloading at once (default: as many as the minimum allows)",
    )
    add("--dry-run", action="store_true", help="print the plan and touch nothing")
    add(
        "--json",
        action="store_true",
        help="print one JSON report on stdout (event lines go to stderr)",
    )
    add("-q", "--quiet", action="store_true", help="print only errors")
    add("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    options = Options(**vars(args))
    reporter = Reporter(options.quiet, sys.stderr if options.json else sys.stdout, sys.stderr)
    try:
        return run(options, reporter)
    except ReloadError as exc:
        reporter.error(str(exc))
        return exc.exit_code


def cli() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
