"""What ``tests/test_faults.py`` does to a running stack or fleet while the tool rolls it, and
how it watches the routers.

- ``NodeWatch``: which nodes every router has live, read every few ms by a thread of the test
  (the observer's own parser, none of the tool's code), so that a check can ask what a router
  showed at the moment a reload started.
- ``on_first_reload``: a thread that waits until the emperor of a host registered its first
  reload of the run, then acts (restarts a router, kills the emperor): a fault at a moment of
  the rollout, found by a real probe, not by a sleep.
- ``restart_router``: a fleet's fastrouter stopped (SIGINT) and started again by the harness:
  its subscriptions are gone until the vassals' masters announce again.
- ``DatagramRelay``: a unix datagram socket in front of a subscription server that forwards
  packets until it is told to stop; then it receives them and drops them (a subscription server
  that no longer answers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from tests.uwsgi_packets import decode_packet
from uwsgi_reload_harness import render
from uwsgi_reload_harness.fleet import Fleet, FleetRouter
from uwsgi_reload_harness.stack import Host
from uwsgi_reload_loadtests.observer import StatsReadError, read_document

#: Seconds between two reads of every router by ``NodeWatch``.
WATCH_INTERVAL = 0.005
#: Seconds ``on_first_reload`` polls the emperor for, at most.
FIRST_RELOAD_WITHIN = 60.0


# ---------------------------------------------------------------------------------------------
# Watching the routers by node
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NodeSample:
    """When the reads started (wall clock), and each router's live node names (``None``: it
    could not be read)."""

    t: float
    live: Mapping[str, frozenset[str] | None]


def live_nodes(address: str) -> frozenset[str] | None:
    try:
        data = read_document(address, timeout=1.0)
    except StatsReadError:
        return None
    return frozenset(
        str(node["name"])
        for subscription in data.get("subscriptions") or []
        for node in subscription.get("nodes") or []
        if node.get("death_mark") == 0
    )


class NodeWatch:
    """Every router's live nodes, in the order given, read one after the other every
    ``WATCH_INTERVAL`` while the block runs."""

    def __init__(self, routers: Sequence[str]) -> None:
        self.routers = list(routers)
        self.samples: list[NodeSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="node-watch", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            self.samples.append(NodeSample(t, {r: live_nodes(r) for r in self.routers}))
            self._stop.wait(WATCH_INTERVAL)

    def __enter__(self) -> NodeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float = float("inf")) -> list[NodeSample]:
        return [s for s in self.samples if t0 <= s.t <= t1]


# ---------------------------------------------------------------------------------------------
# Faults at a moment of the rollout
# ---------------------------------------------------------------------------------------------


def reload_state(host: Host) -> dict[str, tuple[int, int, int]]:
    return {vid: (v.pid, v.respawns, v.last_mod) for vid, v in host.emperor_vassals().items()}


class Fault:
    """A thread that waits for ``host``'s first registered reload, then runs ``act(vassal id)``.
    ``at``: when it acted (wall clock); ``error``: what it raised, re-raised by ``check``."""

    def __init__(self, host: Host, act: Callable[[str], None]) -> None:
        self.host, self.act = host, act
        self.before = reload_state(host)
        self.at: float | None = None
        self.done: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fault", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + FIRST_RELOAD_WITHIN
            while time.monotonic() < deadline:
                now = reload_state(self.host)
                moved = sorted(vid for vid, was in self.before.items() if now.get(vid) != was)
                if moved:
                    self.at = time.time()
                    self.act(moved[0])
                    self.done = time.time()
                    return
                time.sleep(0.02)
        except BaseException as exc:  # handed to the test by check()
            self.error = exc

    def check(self, timeout: float = 30.0) -> None:
        """Wait for the thread; raise what it raised, or say that it never acted."""
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self.at is None:
            raise AssertionError(f"no reload of {self.host.emperor_path} was seen: no fault")


def on_first_reload(host: Host, act: Callable[[str], None]) -> Fault:
    return Fault(host, act)


def block_announces(host: Host, vassal_id: str) -> None:
    """``S`` on the vassal master's FIFO: it toggles the blocking of its subscription packets
    (blocked: the master announces nothing, core/fifo.c)."""
    with open(host.layout.run_dir / f"{Path(vassal_id).stem}.fifo", "w") as fifo:
        fifo.write("S")


def _answers(address: str) -> bool:
    return live_nodes(address) is not None


def restart_router(fleet: Fleet, router: FleetRouter) -> None:
    """Stop the router (SIGINT: a uWSGI master's shutdown) and start it again from its config,
    through the harness; back once its stats answer. Its subscriptions start empty."""
    fleet.processes_started[router.name].stop()
    fleet.start(
        router.name,
        [render.find_uwsgi(), "--ini", str(router.config)],
        functools.partial(_answers, router.stats),
        f"stats of {router.name} at {router.stats}",
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )


# ---------------------------------------------------------------------------------------------
# A subscription server that stops answering
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Relayed:
    at: float
    unsubscribe: bool
    address: str
    forwarded: bool


class DatagramRelay:
    """A unix datagram socket that forwards each packet to ``target`` while ``forwarding``; with
    ``stop_after_unsubscribe`` it stops forwarding right after the first unsubscribe it passed
    on (a node mid-drain). Every packet is recorded."""

    def __init__(self, target: str, *, stop_after_unsubscribe: bool = True) -> None:
        self.target = target
        self.stop_after_unsubscribe = stop_after_unsubscribe
        self.forwarding = True
        self.packets: list[Relayed] = []
        self.base = Path(tempfile.mkdtemp(prefix="ur-rl-", dir="/tmp"))
        self.address = str(self.base / "ss.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="relay", daemon=True)

    def _loop(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
            while not self._stop.is_set():
                try:
                    data = self._sock.recv(65536)
                except TimeoutError:
                    continue
                _, modifier2, pairs = decode_packet(data)
                forward = self.forwarding
                if forward:
                    out.sendto(data, self.target)
                    if modifier2 == 1 and self.stop_after_unsubscribe:
                        self.forwarding = False
                address = dict(pairs).get("address", "")
                self.packets.append(Relayed(time.time(), modifier2 == 1, address, forward))

    def __enter__(self) -> DatagramRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()
        shutil.rmtree(self.base, ignore_errors=True)

    @property
    def dropped(self) -> list[Relayed]:
        return [p for p in self.packets if not p.forwarded]


@contextlib.contextmanager
def relay(target: str) -> Iterator[DatagramRelay]:
    with DatagramRelay(target) as running:
        yield running
