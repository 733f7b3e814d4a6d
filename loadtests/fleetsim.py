"""A fleet of uWSGI emperors and fastrouters simulated on a fake clock behind ``uwsgi_reload.Io``:
the one simulator of the tool's fleet tests and of the ``simulate_fleet`` benchmark.

Hosts of vassals, each a node (its address) under its keys. The tool runs on one host at a time
(``roll``): it reads and touches that host's emperor, whose vassals move; the others' vassals
stand still, their nodes written into the routers' stats once per ``roll``, so that a thousand
remote nodes cost the simulation nothing per poll.

- The emperor acts on a touch ``lag`` seconds later (at the next poll, sleep or touch), and the
  vassal accepts again ``reload`` seconds after that (``math.inf``: never). A killed vassal
  comes back as a new entry: new pid, respawns 0 (core/emperor.c).
- Each router has its own view of each node (``SimVassal.routed``). A master unsubscribes its
  node as it reloads, announces it ``announce_delay`` after it accepts again and every
  ``reannounce`` seconds, to every router that hears it; R hears it ``announce_lag[R]`` later.
  The tool's packets reach the router of the subscription server they are sent to (``servers``;
  ``None``: nobody listens there, and UDP tells the sender nothing). Requests in flight keep a
  death-marked node in the first router (``ref``).
- The stats are JSON as the stats servers write it, decoded as ``take_snapshot`` does;
  ``down[name]`` refuses a stats socket's connections for a while (``EMPEROR``: the emperor's).
- Counted at every poll, touch and packet: the fewest nodes live per key in each router and in
  every router (``fewest``), each count below ``minimum`` (``broken``); at a vassal's start (its
  unsubscribe or touch), the other nodes live per key (``started``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any, NamedTuple

import uwsgi_reload as ur

KEY = "www.example.com"
#: the emperor's stats socket, beside the routers' in ``down`` and ``stats``
EMPEROR = "emperor"
#: the place of the nodes live in every router, beside each router's name
EVERY = "every router"
WALL_START = 1_000_000.0


@dataclasses.dataclass(eq=False)
class SimVassal:
    id: str
    address: str
    pid: int
    keys: tuple[str, ...] = (KEY,)
    #: routers that never hear its master (miswired)
    unheard: frozenset[str] = frozenset()
    #: seconds from the emperor acting on a touch to accepting (None: the fleet's; inf: never)
    reload: float | None = None
    probe_status: int | None = 200
    #: when each request in flight to it ends
    requests: list[float] = dataclasses.field(default_factory=list)
    respawns: int = 0
    last_mod: int = 1000
    #: not accepting until then (None: accepting)
    down_until: float | None = None
    #: the emperor acts on a touch then, giving it ``pending_mtime``
    registers_at: float | None = None
    pending_mtime: int = 0
    next_announce: float = math.inf
    #: router -> it routes to this node
    routed: dict[str, bool] = dataclasses.field(default_factory=dict)


def host(n: int, ip: object, port: int, pid: int = 100, **fields: Any) -> list[SimVassal]:
    """``n`` vassals, ``vassal_01.ini`` on, on ``ip`` from ``port`` on, pids from ``pid`` on."""
    return [
        SimVassal(f"vassal_{i + 1:02d}.ini", f"{ip}:{port + i}", pid + i, **fields)
        for i in range(n)
    ]


class Packet(NamedTuple):
    at: float
    server: str
    command: int
    address: str


class Broken(NamedTuple):
    """Fewer than the minimum live in a place (a router, or ``EVERY``)."""

    at: float
    place: str
    live: int


class SimFleet:
    """Emperors and routers on one fake clock; ``io()`` is the ``uwsgi_reload.Io`` of the rolled
    host (the first until ``roll``)."""

    def __init__(
        self,
        hosts: Sequence[Sequence[SimVassal]],
        routers: Sequence[str] = ("fr-a",),
        servers: Mapping[str, str | None] | None = None,
        *,
        reload: float = 1.0,
        lag: float = 0.05,
        announce_delay: float = 1.0,
        reannounce: float = math.inf,
    ) -> None:
        self.t, self.minimum = 0.0, 0
        self.hosts = [list(vassals) for vassals in hosts]
        self.routers = tuple(routers)
        self.servers = dict(servers or {f"ss-{r}": r for r in self.routers})
        self.reload, self.lag = reload, lag
        self.announce_delay, self.reannounce = announce_delay, reannounce
        #: router -> seconds a master's packet takes to reach it
        self.announce_lag: dict[str, float] = {}
        #: stats socket (a router, or ``EMPEROR``) -> (from, until): it refuses connections then
        self.down: dict[str, tuple[float, float]] = {}
        self.proc_readable = True
        #: the masters listen on 0.0.0.0 and their port, not on their node's address
        self.bound_on_every_address = False
        self.refuse_touch: set[str] = set()
        #: the first poll from then on fails with an unexpected error (a bug)
        self.crash_at = math.inf
        #: (at, action): run at the first sleep from ``at`` on
        self.on_sleep: list[tuple[float, Callable[[], object]]] = []
        for v in (v for vassals in self.hosts for v in vassals):
            v.routed = {r: r not in v.unheard for r in self.routers}
            v.next_announce = reannounce
        self.keys = sorted({k for vassals in self.hosts for v in vassals for k in v.keys})
        self.touched: list[tuple[float, str]] = []
        self.packets: list[Packet] = []
        #: vassal -> the fewest other nodes live per key when the tool started it
        self.started: dict[str, int] = {}
        #: vassals touched while a router routed to them after the tool unsubscribed them
        self.touched_while_routed: list[str] = []
        #: (place, key) -> the fewest nodes live there
        self.fewest: dict[tuple[str, str], int] = {}
        self.broken: list[Broken] = []
        self._arriving: list[tuple[float, str, SimVassal, bool]] = []
        self._unsubscribed: set[str] = set()
        self.roll(0)

    def roll(self, index: int) -> None:
        """The tool runs on host ``index`` from now on; the others' vassals stand still."""
        self.rolled, self._rolled_at = index, self.t
        self.vassals = {v.id: v for v in self.hosts[index]}
        self._by_address = {v.address: v for v in self.hosts[index]}
        still = [v for h, vassals in enumerate(self.hosts) if h != index for v in vassals]
        self._still_live = collections.Counter(
            (place, key) for v in still for place in self.places(v) for key in v.keys
        )
        self._still_json = {
            (r, key): ", ".join(
                node_json(v.address, False, 0)
                for v in still
                if key in v.keys and r in self.places(v)
            )
            for r in self.routers
            for key in self.keys
        }

    def live(self, v: SimVassal) -> bool:
        return v.down_until is None or self.t >= v.down_until

    def places(self, v: SimVassal) -> list[str]:
        """The routers where it is live, and ``EVERY`` when it is live in every one."""
        places = [r for r in self.routers if v.routed[r] and self.live(v)]
        return [*places, EVERY] if len(places) == len(self.routers) else places

    def kill(self, vid: str, down_for: float) -> None:
        """Dead, it is out of every router and re-added from its config as it is now: a touch
        the emperor had not acted on yet is part of the new entry, not a reload to come."""
        v = self.vassals[vid]
        if v.registers_at is not None:
            v.registers_at, v.last_mod = None, v.pending_mtime
        v.pid, v.respawns, v.down_until = v.pid + 1000, 0, self.t + down_for
        v.routed = dict.fromkeys(self.routers, False)
        v.next_announce = v.down_until + self.announce_delay

    def lose(self, router: str, vids: Iterable[str]) -> None:
        """``router`` forgets these nodes (say, it restarted) until they are announced again."""
        for vid in vids:
            self.vassals[vid].routed[router] = False

    def _master_sends(self, v: SimVassal, routed: bool) -> None:
        for r in self.routers:
            if r not in v.unheard:
                self._arriving.append((self.t + self.announce_lag.get(r, 0.0), r, v, routed))

    def _advance(self) -> None:
        for v in self.vassals.values():
            if v.registers_at is not None and self.t >= v.registers_at:
                v.registers_at, v.last_mod = None, v.pending_mtime
                v.respawns += 1
                v.down_until = self.t + (self.reload if v.reload is None else v.reload)
                self._master_sends(v, False)  # unsubscribe-on-graceful-reload
                v.next_announce = v.down_until + self.announce_delay
            if self.live(v) and self.t >= v.next_announce:
                self._master_sends(v, True)
                v.next_announce = self.t + self.reannounce
        for arrival in [a for a in self._arriving if a[0] <= self.t]:
            self._arriving.remove(arrival)
            arrival[2].routed[arrival[1]] = arrival[3]

    def _live(self, leaving_out: Sequence[SimVassal] = ()) -> collections.Counter[tuple[str, str]]:
        """(place, key) -> the nodes live there, but ``leaving_out``'s."""
        live = self._still_live.copy()
        rolled = (v for v in self.vassals.values() if v not in leaving_out)
        live.update((p, k) for v in rolled for p in self.places(v) for k in v.keys)
        return live

    def _count(self) -> None:
        live = self._live()
        for place in (*self.routers, EVERY):
            for key in self.keys:
                n = live[place, key]
                self.fewest[place, key] = min(self.fewest.get((place, key), n), n)
                if n < self.minimum:
                    self.broken.append(Broken(self.t, place, n))

    def _start(self, v: SimVassal) -> None:
        if v.id in self.started or EVERY not in self.places(v):
            return  # started before, or not live: it costs nothing
        going = [w for w in self.vassals.values() if w is v or w.registers_at is not None]
        self.started[v.id] = min(self._live(going)[EVERY, key] for key in v.keys)

    def stats(self, options: ur.Options) -> dict[str, str | None]:
        """What the emperor's (``EMPEROR``) and each router's stats socket send now (None: the
        connection is refused)."""
        self._advance()
        self._count()
        assert self.t - self._rolled_at < 1000, "the run does not end"
        entries = ", ".join(
            emperor_json(v.id, v.pid, v.respawns, v.last_mod, self.live(v))
            for v in self.vassals.values()
        )
        docs: dict[str, str | None] = {EMPEROR: f'{{"vassals": [{entries}]}}'}
        for r in options.routers:
            subscriptions = ", ".join(
                f'{{"key": {json.dumps(key)}, "nodes": [{", ".join(self._nodes(r, key))}]}}'
                for key in self.keys
            )
            docs[r] = f'{{"subscriptions": [{subscriptions}], "cheap": 0}}'
        for name, (since, until) in self.down.items():
            if since <= self.t < until:
                docs[name] = None
        return docs

    def _nodes(self, router: str, key: str) -> list[str]:
        still = self._still_json[router, key]
        nodes = [still] if still else []
        for v in self.vassals.values():
            ref = sum(end > self.t for end in v.requests) if router == self.routers[0] else 0
            if key in v.keys and ((v.routed[router] and self.live(v)) or ref):
                nodes.append(node_json(v.address, not v.routed[router], ref))
        return nodes

    # -- the tool's Io ----------------------------------------------------------------------

    def snapshot(self, options: ur.Options) -> ur.Snapshot:
        if self.t >= self.crash_at:
            self.crash_at = math.inf
            raise RuntimeError("simulated bug")
        docs = self.stats(options)
        return snapshot_of({k: s and json.loads(s) for k, s in docs.items()}, options)

    def sleep(self, seconds: float) -> None:
        for at, action in list(self.on_sleep):
            if self.t >= at:
                self.on_sleep.remove((at, action))
                action()
        self.t += seconds
        self._advance()

    def touch(self, path: str, mtime: int) -> None:
        v = self.vassals[os.path.basename(path)]
        if v.id in self.refuse_touch:
            raise PermissionError(1, "Operation not permitted", path)
        assert mtime > v.last_mod, f"{v.id} touched with mtime {mtime}, not past {v.last_mod}"
        self._start(v)
        if v.id in self._unsubscribed and self.places(v):
            self.touched_while_routed.append(v.id)
        v.pending_mtime, v.registers_at = mtime, self.t + self.lag
        self.touched.append((self.t, v.id))
        self._advance()
        self._count()

    def send(self, server: str, data: bytes) -> None:
        command, fields = subscription(data)
        self.packets.append(Packet(self.t, server, command, fields["address"]))
        v = self._by_address.get(fields["address"])
        if v is None:
            return  # another host's node: ``remote_packets``
        assert fields["key"] in v.keys, fields
        if command == ur.Command.UNSUBSCRIBE:
            self._start(v)
            self._unsubscribed.add(v.id)
        else:
            self._unsubscribed.discard(v.id)
        router = self.servers[server]
        if router is not None:
            v.routed[router] = command == ur.Command.SUBSCRIBE
        self._count()

    def probe(self, name: str, key: str, path: str, timeout: float) -> ur.ProbeResult:
        status = self._by_address[name].probe_status
        return ur.ProbeResult(status, f"GET {path} to {name} answered {status}")

    def sockets(self, pids: Iterable[int]) -> dict[int, tuple[str, ...]]:
        """What each master listens on; nothing when /proc cannot be read."""
        every = self.bound_on_every_address
        listening = {
            v.pid: "0.0.0.0:" + v.address.rpartition(":")[2] if every else v.address
            for v in self.vassals.values()
        }
        return {pid: (listening[pid],) if self.proc_readable else () for pid in pids}

    def io(self) -> ur.Io:
        local = {v.address.rpartition(":")[0] for v in self.vassals.values()}
        return ur.Io(
            clock=lambda: self.t,
            wall_clock=lambda: WALL_START + self.t,
            sleep=self.sleep,
            snapshot=self.snapshot,
            touch=self.touch,
            send=self.send,
            probe=self.probe,
            probe_pool=Inline,
            sockets=self.sockets,
            is_local=local.__contains__,
        )

    # -- what the tool did ------------------------------------------------------------------

    @property
    def remote_packets(self) -> list[Packet]:
        """The packets about a node of another host: there must be none."""
        return [p for p in self.packets if p.address not in self._by_address]

    def sent(self, vid: str, command: ur.Command) -> list[Packet]:
        address = self.vassals[vid].address
        return [p for p in self.packets if p.command == command and p.address == address]

    def run(self, emperor_dir: Path, **options: Any) -> tuple[int, str, dict[str, Any]]:
        """The tool on the rolled host with ``--json``, a config per vassal in ``emperor_dir``:
        (exit code, what it wrote, its report's vassals by config)."""
        for vid in self.vassals:
            (emperor_dir / vid).write_text("[uwsgi]\n")
        given = {"fastrouter_stats_socket": list(self.routers), **options}
        opts = ur.Options(str(emperor_dir), emperor_stats_socket="es.sock", json=True, **given)
        out, report = StringIO(), StringIO()
        with redirect_stdout(report):
            code = ur.run(opts, ur.Reporter(False, out, out), self.io())
        vassals = json.loads(report.getvalue())["vassals"]
        return code, out.getvalue(), {f"{v['name']}.ini": v for v in vassals}


def snapshot_of(docs: Mapping[str, Any], options: ur.Options) -> ur.Snapshot:
    """A snapshot of the decoded stats (None: the socket refused), made by ``take_snapshot``."""

    def read(address: str) -> Mapping[str, Any]:
        doc = docs[EMPEROR if address == options.emperor_stats_socket else address]
        if doc is None:
            raise ur.StatsError(f"cannot read stats socket {address}: Connection refused")
        return doc  # type: ignore[no-any-return]

    return ur.take_snapshot(options, read)


@functools.lru_cache(maxsize=65536)
def emperor_json(vid: str, pid: int, respawns: int, last_mod: int, accepting: bool) -> str:
    """A vassal as an emperor's stats server writes it (core/emperor.c)."""
    entry = {"id": vid, "pid": pid, "born": 999, "last_mod": last_mod, "last_heartbeat": 0}
    entry |= {"loyal": 999, "ready": 1, "accepting": int(accepting), "last_loyal": 999}
    entry |= {"last_ready": 999, "last_accepting": 999, "first_run": 999, "last_run": 999}
    entry |= {"cursed": 0, "zerg": 0, "on_demand": "", "uid": 0, "gid": 0, "monitor": ""}
    return json.dumps({**entry, "respawns": respawns})


@functools.lru_cache(maxsize=65536)
def node_json(name: str, death_mark: bool, ref: int) -> str:
    """A node as a fastrouter's stats server writes it (uWSGI 2.0.31, plugins/corerouter)."""
    node = {"name": name, "modifier1": 0, "modifier2": 0, "last_check": 1000, "pid": 0}
    node |= {"uid": 0, "gid": 0, "requests": 0, "last_requests": 0, "tx": 0, "rx": 0}
    node |= {"cores": 1, "load": 0, "weight": 1, "wrr": 0, "ref": ref, "failcnt": 0}
    return json.dumps({**node, "death_mark": int(death_mark)})


def subscription(packet: bytes) -> tuple[int, dict[str, str]]:
    """(command, vars) of a subscription packet: [modifier1][u16 size][modifier2 = command],
    then each var's key and value as [u16 length][bytes], little-endian."""
    parts, pos = [], 4
    while pos < len(packet):
        size = int.from_bytes(packet[pos : pos + 2], "little")
        parts.append(packet[pos + 2 : pos + 2 + size].decode())
        pos += 2 + size
    return packet[3], dict(zip(parts[::2], parts[1::2]))


class Inline(Executor):
    """Runs each call as it is submitted, in the calling thread: a run repeats exactly."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future
