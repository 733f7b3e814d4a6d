"""Properties of whole runs over random fleets, against the simulated emperor and fastrouter.

Several fastrouter keys, other hosts' nodes, a second router (that drops nodes, or ignores the
tool's packets), N and m, reload times, vassals that never come back, kills, re-announces,
requests in flight, stats that cannot be read for a while, failed probes, a refused touch, a
SIGINT and an unexpected error, all drawn by hypothesis. Whatever happens:

- no vassal starts (is drained or touched) while that could take one of its keys below the
  minimum: the other vassals live for the key, not being reloaded, and other hosts' live nodes
  of the key are at least m;
- no other host's node is ever sent a packet;
- no vassal is touched while a second router that never acted on its unsubscribe (its
  subscription server bound elsewhere) still routes to it;
- exit 0 only if every vassal runs a new instance and is live in the router;
- no vassal the tool unsubscribed is left out of rotation when the tool exits, unless its probe
  failed and the report says so, or it is being reloaded (its new instance announces itself).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uwsgi_reload as ur
from tests.test_drain_logic import RouterSim
from tests.test_reload_logic import run_on
from tests.uwsgi_packets import decode_packet


class FleetSim(RouterSim):
    """RouterSim with each vassal under its own set of keys, recording every start."""

    def __init__(self, keys: dict[str, tuple[str, ...]], **kwargs: float) -> None:
        super().__init__(list(keys), **kwargs)
        self.keys = keys
        self.minimum = 0
        #: vassal -> the fewest others live per key when the tool started it (drain or touch)
        self.started: dict[str, int] = {}
        self.touch_refused: set[str] = set()
        self.unreadable: tuple[float, float] | None = None
        self.crash_at: float | None = None
        self.last_packet: dict[str, int] = {}
        #: per key, other hosts' nodes: live all along, never the tool's to touch
        self.remote: dict[str, int] = {}
        #: a second router (its subscription server ``ss-b.sock``): it has what the first has,
        #: but drops the nodes of ``b_drops`` from ``b_drops_from`` on (say, it was restarted)
        self.two_routers = False
        self.b_drops: set[str] = set()
        self.b_drops_from = math.inf
        self.b_packets: list[tuple[float, int, str]] = []
        #: the second router's subscription server is bound elsewhere: it never acts on a packet
        #: of the tool, and keeps routing to a vassal the tool unsubscribed (``b_held``) until
        #: its master unsubscribes it (its reload) or dies
        self.b_ignores = False
        self.b_held: set[str] = set()
        #: vassals touched while the second router still routed to them: never as "drained"
        self.touched_while_held: list[str] = []

    def up(self, vid: str) -> bool:
        return self.live(self.vassals[vid]) and self.in_router[vid]

    def _start(self, vid: str) -> None:
        if vid in self.started or not self.up(vid):
            return  # started before, or not live: it costs nothing
        others = [
            w
            for w in self.vassals
            if w != vid and self.up(w) and self.vassals[w].registers_at is None
        ]
        self.started[vid] = min(
            sum(1 for w in others if k in self.keys[w]) + self.remote.get(k, 0)
            for k in self.keys[vid]
        )

    def touch(self, path: str, mtime: int) -> None:
        vid = os.path.basename(path)
        if vid in self.touch_refused:
            raise PermissionError(1, "Operation not permitted", path)
        self._start(vid)
        if vid in self.b_held and not (self.t >= self.b_drops_from and vid in self.b_drops):
            self.touched_while_held.append(vid)
        super().touch(path, mtime)

    def kill(self, vid: str, down_for: float) -> None:
        """Dead, it is re-added from its config as it is now (core/emperor.c): a touch the
        emperor had not acted on yet is part of the new entry, not a reload to come."""
        v = self.vassals[vid]
        if v.registers_at is not None:
            v.registers_at, v.last_mod = None, v.pending_mtime
        super().kill(vid, down_for)
        # its new master announces itself once up, whoever unsubscribed the old one
        self.next_announce[vid] = self.t + down_for + self.announce_delay

    def snapshot(self, options: ur.Options) -> ur.Snapshot:
        if self.unreadable and self.unreadable[0] <= self.t < self.unreadable[1]:
            raise ur.StatsError("stats socket es.sock did not answer with JSON")
        if self.crash_at is not None and self.t >= self.crash_at:
            self.crash_at = None
            raise RuntimeError("simulated bug")
        assert self.t < 1000, "the run does not end"
        plain = super().snapshot(options)
        nodes = [n._replace(key=key) for n in plain.nodes for key in self.keys[self._vid(n.name)]]
        nodes += [
            ur.Node(key=key, name=remote_name(key, i), death_mark=False, ref=0, cores=1, weight=1)
            for key, count in sorted(self.remote.items())
            for i in range(count)
        ]
        if not self.two_routers:
            return ur.Snapshot(plain.vassals, nodes)
        dropped = self.b_drops if self.t >= self.b_drops_from else set()
        self.b_held = {vid for vid in self.b_held if self.live(self.vassals[vid])}
        held = self.b_held - dropped
        in_b = [
            n._replace(
                router="fr-b",
                death_mark=(n.death_mark or self._vid(n.name) in dropped)
                and self._vid(n.name) not in held,
            )
            for n in nodes
        ]
        shown = {self._vid(n.name) for n in in_b if not n.name.startswith("127.0.0.9:")}
        in_b += [
            ur.Node(
                key, self.address(self.vassals[vid]), False, 0, cores=1, weight=1, router="fr-b"
            )
            for vid in sorted(held - shown)
            for key in self.keys[vid]
        ]
        in_a = [n._replace(router="fr-a") for n in nodes]
        return ur.Snapshot(plain.vassals, in_a + in_b, ("fr-a", "fr-b"))

    def send(self, address: str, data: bytes) -> None:
        _, command, pairs = decode_packet(data)
        fields = dict(pairs)
        assert not fields["address"].startswith("127.0.0.9:"), f"another host's node: {fields}"
        vid = self._vid(fields["address"])
        if address == "ss-b.sock":
            self.b_packets.append((self.t, command, vid))
            if command == ur.Command.SUBSCRIBE and not self.b_ignores:
                self.b_drops.discard(vid)
            return
        if self.b_ignores and self.two_routers:
            if command == ur.Command.UNSUBSCRIBE and self.in_router[vid]:
                self.b_held.add(vid)
            elif command == ur.Command.SUBSCRIBE:
                self.b_held.discard(vid)
        assert fields["key"] in self.keys[vid]
        if command == ur.Command.UNSUBSCRIBE:
            self._start(vid)
        self.last_packet[vid] = command
        self.packets.append((self.t, command, fields))
        self.in_router[vid] = command == ur.Command.SUBSCRIBE
        if command == ur.Command.UNSUBSCRIBE:
            self._close_exposure(vid)


def remote_name(key: str, i: int) -> str:
    """Another host's node: on an address no vassal here is named after."""
    return f"127.0.0.9:{4000 + 10 * int(key[1:]) + i}"


@dataclasses.dataclass
class Scenario:
    keys: dict[str, tuple[str, ...]]
    remote: dict[str, int]
    two_routers: bool
    b_ignores: bool
    b_drops: set[str]
    b_drops_from: float
    minimum: int
    drain: bool
    probe: bool
    timeout: float
    drain_timeout: float
    max_parallel: int | None
    stack: dict[str, float]
    reload_times: dict[str, float]
    never_back: set[str]
    probe_fails: set[str]
    requests: dict[str, float]
    kills: list[tuple[float, str, float]]
    touch_refused: set[str]
    unreadable: tuple[float, float] | None
    interrupt_at: float | None
    crash_at: float | None


SECONDS = st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0, 4.0])


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(2, 6))
    names = [f"vassal_{i:02d}.ini" for i in range(1, n + 1)]
    all_keys = ["k1", "k2", "k3"][: draw(st.integers(1, 3))]
    keys = {
        vid: tuple(
            sorted(draw(st.sets(st.sampled_from(all_keys), min_size=1, max_size=len(all_keys))))
        )
        for vid in names
    }
    some = st.sets(st.sampled_from(names), max_size=2)
    remote = draw(st.dictionaries(st.sampled_from(all_keys), st.integers(1, 3), max_size=2))
    maybe_time = st.none() | SECONDS
    unreadable_from = draw(maybe_time)
    return Scenario(
        keys=keys,
        remote=remote,
        two_routers=draw(st.booleans()),
        b_ignores=draw(st.booleans()),
        b_drops=draw(some),
        b_drops_from=draw(SECONDS),
        minimum=draw(st.integers(0, n - 1 + max(remote.values(), default=0))),
        drain=draw(st.booleans()),
        probe=draw(st.booleans()),
        timeout=draw(st.sampled_from([1.0, 3.0, 10.0])),
        drain_timeout=draw(st.sampled_from([0.5, 2.0])),
        max_parallel=draw(st.sampled_from([None, None, 1, 2])),
        stack={
            "reload": draw(st.sampled_from([0.2, 1.0])),
            "lag": draw(st.sampled_from([0.0, 0.05, 0.3])),
            "announce_delay": draw(st.sampled_from([0.0, 0.3, 1.0])),
            "reannounce": draw(st.sampled_from([math.inf, 0.5, 2.0])),
        },
        reload_times=draw(st.dictionaries(st.sampled_from(names), SECONDS, max_size=3)),
        never_back=draw(some),
        probe_fails=draw(some),
        requests=draw(
            st.dictionaries(st.sampled_from(names), st.sampled_from([0.3, math.inf]), max_size=2)
        ),
        kills=draw(
            st.lists(
                st.tuples(SECONDS, st.sampled_from(names), st.sampled_from([0.2, 1.5])),
                max_size=2,
            )
        ),
        touch_refused=draw(st.sets(st.sampled_from(names), max_size=1)),
        unreadable=None
        if unreadable_from is None
        else (unreadable_from, unreadable_from + draw(st.sampled_from([0.3, 20.0]))),
        interrupt_at=draw(st.none() | st.none() | SECONDS),
        crash_at=draw(st.none() | st.none() | SECONDS),
    )


def build(s: Scenario) -> FleetSim:
    stack = FleetSim(s.keys, **s.stack)
    stack.minimum = s.minimum
    stack.remote = dict(s.remote)
    stack.two_routers = s.two_routers
    stack.b_ignores = s.b_ignores
    stack.b_drops, stack.b_drops_from = set(s.b_drops), s.b_drops_from
    stack.reload_times = dict(s.reload_times)
    stack.never_back = set(s.never_back)
    stack.probe_status = dict.fromkeys(s.probe_fails, 500)
    stack.requests = {vid: [s.requests[vid]] if vid in s.requests else [] for vid in s.keys}
    stack.touch_refused = set(s.touch_refused)
    stack.unreadable = s.unreadable
    stack.crash_at = s.crash_at
    for at, vid, down_for in s.kills:
        stack.on_sleep.append((at, lambda v=vid, d=down_for: stack.kill(v, d)))
    if s.interrupt_at is not None:
        stack.on_sleep.append((s.interrupt_at, lambda: os.kill(os.getpid(), signal.SIGINT)))
    return stack


def run(s: Scenario, stack: FleetSim) -> tuple[int | None, str, dict[str, dict[str, object]]]:
    """(exit code, or None if the run ended before its start (main() says so in one line, exit
    2); output; the report's vassals)."""
    report = io.StringIO()
    servers = ["ss.sock", "ss-b.sock"] if s.two_routers else ["ss.sock"]
    with tempfile.TemporaryDirectory(prefix="ur-prop-", dir="/tmp") as emperor_dir:
        try:
            with redirect_stdout(report):
                code, out = run_on(
                    stack,
                    Path(emperor_dir),
                    None,
                    minimum_active_vassals=s.minimum,
                    timeout=s.timeout,
                    max_parallel=s.max_parallel,
                    fastrouter_stats_socket=["fr-a", "fr-b"] if s.two_routers else "fr.sock",
                    subscription_server=servers if s.drain else None,
                    drain_timeout=s.drain_timeout,
                    probe="/" if s.probe else None,
                    json=True,
                )
        except (ur.ReloadError, RuntimeError) as exc:  # refused, or the error came first
            return None, str(exc), {}
    vassals = json.loads(report.getvalue())["vassals"]
    return code, out, {f"{v['name']}.ini": v for v in vassals}


def check(
    s: Scenario, stack: FleetSim, code: int | None, out: str, report: dict[str, dict[str, object]]
) -> None:
    if code is None:  # refused before anything started
        assert stack.touched == [] and stack.packets == [], out
        return
    assert code in (ur.EXIT_OK, ur.EXIT_NOT_ALL_RELOADED, ur.EXIT_INTERRUPTED), out
    assert not stack.touched_while_held, f"touched while a router routed to it\n{out}"
    for vid, fewest in stack.started.items():
        assert fewest >= s.minimum, f"{vid} started with {fewest} others live\n{out}"
    if code == ur.EXIT_OK:
        for vid, v in stack.vassals.items():
            renewed = v.respawns > 0 or v.pid >= 1000
            assert renewed and stack.up(vid), f"{vid} not back, yet exit 0\n{out}"
    touched = {vid for _, vid in stack.touched}
    for vid, command in stack.last_packet.items():
        if command != ur.Command.UNSUBSCRIBE:
            continue
        v = stack.vassals[vid]
        kept_out = report[vid]["outcome"] == "failed" and "left unsubscribed" in str(
            report[vid]["detail"]
        )
        reloading = vid in touched or v.pid >= 1000
        assert kept_out or reloading, f"{vid} left out of the router\n{out}"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.dictionaries(
        st.sampled_from("abcdefg"),
        st.frozensets(st.sampled_from(["k1", "k2", "k3"]), max_size=3),
        min_size=1,
    ),
    st.integers(0, 5),
    st.none() | st.integers(0, 4),
)
def test_pick_reloads_keeps_every_key_at_its_minimum(
    live: dict[str, frozenset[str]], minimum: int, slots: int | None
) -> None:
    candidates = sorted(live)
    picked = ur.pick_reloads(candidates, live, minimum, slots)
    assert len(set(picked)) == len(picked) and set(picked) <= set(candidates)
    if slots is not None:
        assert len(picked) <= slots
    for key in {k for keys in live.values() for k in keys}:
        before = sum(1 for keys in live.values() if key in keys)
        after = sum(1 for v, keys in live.items() if key in keys and v not in picked)
        assert after >= minimum or after == before, (key, before, after)
    # whatever may go without a cost goes
    free = [v for v in candidates if not live[v]]
    if slots is None:
        assert set(free) <= set(picked)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scenarios())
def test_any_run_keeps_its_promises(s: Scenario) -> None:
    stack = build(s)
    code, out, report = run(s, stack)
    check(s, stack, code, out, report)
