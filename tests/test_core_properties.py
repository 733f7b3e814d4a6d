"""Properties of whole runs over random fleets, against the simulated emperor and fastrouter.

Several fastrouter keys, other hosts' nodes, a second router (that drops nodes, or ignores the
tool's packets), N and m, reload times, vassals that never come back, kills, re-announces,
requests in flight, stats that cannot be read for a while, failed probes, a refused touch, a
SIGINT and an unexpected error, all drawn by hypothesis. Whatever happens:

- no vassal starts (is drained or touched) while that could take one of its keys below the
  minimum: the other vassals live for the key, not being reloaded, and other hosts' live nodes
  of the key are at least m;
- no other host's node is ever sent a packet;
- no vassal the tool unsubscribed is touched while a router still routes to it (the second
  router, its subscription server bound elsewhere, may never act on the unsubscribe);
- exit 0 only if every vassal runs a new instance and is live in the first router;
- no vassal the tool unsubscribed is left out of rotation when the tool exits, unless its probe
  failed and the report says so, or it is being reloaded (its new instance announces itself).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uwsgi_reload as ur
from uwsgi_reload_loadtests.fleetsim import EMPEROR, SimFleet, SimVassal


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


def build(s: Scenario) -> SimFleet:
    """This host's vassals found by name (no /proc), each under its keys; the other hosts' nodes;
    one router, or two: the second loses ``b_drops`` at ``b_drops_from`` (say, it restarted)
    until their masters announce them again, and its subscription server ``ss-b.sock`` may be
    bound elsewhere (it never acts on a packet of the tool, and keeps routing to a vassal the
    tool unsubscribed)."""
    here = [
        SimVassal(vid, f"/run/{vid[:-4]}.sock", 100 + i, keys)
        for i, (vid, keys) in enumerate(s.keys.items())
    ]
    there = [
        SimVassal(f"r{key}_{i}.ini", remote_name(key, i), 900 + i, (key,))
        for key, count in sorted(s.remote.items())
        for i in range(count)
    ]
    routers: tuple[str, ...] = ("fr.sock",)
    servers: dict[str, str | None] = {"ss.sock": "fr.sock"}
    if s.two_routers:
        routers = ("fr-a", "fr-b")
        servers = {"ss.sock": "fr-a", "ss-b.sock": None if s.b_ignores else "fr-b"}
    fleet = SimFleet([here, there], routers, servers, **s.stack)
    fleet.proc_readable = False
    for vid, v in fleet.vassals.items():
        v.reload = math.inf if vid in s.never_back else s.reload_times.get(vid)
        v.probe_status = 500 if vid in s.probe_fails else 200
        v.requests = [s.requests[vid]] if vid in s.requests else []
    fleet.refuse_touch = set(s.touch_refused)
    if s.unreadable:
        fleet.down[EMPEROR] = s.unreadable
    fleet.crash_at = math.inf if s.crash_at is None else s.crash_at
    if s.two_routers and s.b_drops_from == 0:
        fleet.lose("fr-b", s.b_drops)
    elif s.two_routers:
        fleet.on_sleep.append((s.b_drops_from, lambda: fleet.lose("fr-b", s.b_drops)))
    for at, vid, down_for in s.kills:
        fleet.on_sleep.append((at, functools.partial(fleet.kill, vid, down_for)))
    if s.interrupt_at is not None:
        fleet.on_sleep.append((s.interrupt_at, lambda: os.kill(os.getpid(), signal.SIGINT)))
    return fleet


def run(s: Scenario, fleet: SimFleet) -> tuple[int | None, str, dict[str, Any]]:
    """(exit code, or None if the run ended before its start (main() says so in one line, exit
    2); output; the report's vassals)."""
    with tempfile.TemporaryDirectory(prefix="ur-prop-", dir="/tmp") as emperor_dir:
        try:
            return fleet.run(
                Path(emperor_dir),
                minimum_active_vassals=s.minimum,
                timeout=s.timeout,
                max_parallel=s.max_parallel,
                subscription_server=list(fleet.servers) if s.drain else None,
                drain_timeout=s.drain_timeout,
                probe="/" if s.probe else None,
            )
        except (ur.ReloadError, RuntimeError) as exc:  # refused, or the error came first
            return None, str(exc), {}


def check(s: Scenario, fleet: SimFleet, code: int | None, out: str, report: dict[str, Any]) -> None:
    assert fleet.remote_packets == [], f"another host's node was sent a packet\n{out}"
    if code is None:  # refused before anything started
        assert fleet.touched == [] and fleet.packets == [], out
        return
    assert code in (ur.EXIT_OK, ur.EXIT_NOT_ALL_RELOADED, ur.EXIT_INTERRUPTED), out
    assert not fleet.touched_while_routed, f"touched while a router routed to it\n{out}"
    for vid, fewest in fleet.started.items():
        assert fewest >= s.minimum, f"{vid} started with {fewest} others live\n{out}"
    first = fleet.routers[0]
    if code == ur.EXIT_OK:
        for vid, v in fleet.vassals.items():
            renewed = v.respawns > 0 or v.pid >= 1000
            back = fleet.live(v) and v.routed[first]
            assert renewed and back, f"{vid} not back, yet exit 0\n{out}"
    touched = {vid for _, vid in fleet.touched}
    last = {p.address: p.command for p in fleet.packets if p.server == "ss.sock"}
    for vid, v in fleet.vassals.items():
        if last.get(v.address) != ur.Command.UNSUBSCRIBE:
            continue
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
    fleet = build(s)
    code, out, report = run(s, fleet)
    check(s, fleet, code, out, report)
