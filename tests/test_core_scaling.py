"""The tool's work per poll does not grow with the other hosts' nodes: a fleet of 1008 remote
nodes, rolled by the tool's own run (``uwsgi_reload_loadtests.simulate_fleet``), costs each poll
one look at each node (the snapshot's index) and a few lookups per local vassal, never every node
against every vassal. Counted in calls, not timed; and the stats parser's quick path for what a
fastrouter writes takes and refuses exactly what its checks do.
"""

from __future__ import annotations

import functools
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import uwsgi_reload as ur
from uwsgi_reload_loadtests import simulate_fleet as sf

#: the per-node matching functions: each call is one look at a node name
MATCHING = ("canonical_address", "owns", "node_vassal_name")
HOSTS, VASSALS = 64, 16
#: per local vassal and poll, calls allowed beyond the index (a lookup needs none)
PER_VASSAL = 4

F = TypeVar("F", bound=Callable[..., Any])


class CountingFleet(sf.SimFleet):
    """The simulated fleet; the calls of ``MATCHING`` between two polls, and each poll's
    snapshot."""

    def __init__(self, scenario: sf.Scenario) -> None:
        super().__init__(scenario)
        self.calls = 0
        #: calls from each snapshot to the next (the last: to the end of the run)
        self.calls_after: list[int] = []
        self.snapshots: list[ur.Snapshot] = []

    def counting(self, function: F) -> F:
        @functools.wraps(function)
        def counted(*args: Any) -> Any:
            self.calls += 1
            return function(*args)

        return counted  # type: ignore[return-value]

    def snapshot(self, options: ur.Options) -> ur.Snapshot:
        if self.snapshots:
            self.calls_after.append(self.calls)
        self.calls = 0
        snapshot = super().snapshot(options)
        self.snapshots.append(snapshot)
        return snapshot


def roll_first_host(fleet: CountingFleet) -> int:
    """The tool's run on host 0 of the fleet (``simulate_fleet.roll``, one host)."""
    scenario = fleet.scenario
    with tempfile.TemporaryDirectory(prefix="sim-fleet-") as emperor_dir:
        for v in fleet.hosts[0]:
            (Path(emperor_dir) / v.id).write_text("[uwsgi]\n")
        options = ur.Options(
            emperor_path=emperor_dir,
            fastrouter_stats_socket=list(scenario.router_names),
            emperor_stats_socket=f"{sf.FIRST_HOST}:1716",
            minimum_active_vassals=scenario.minimum,
            timeout=sf.TIMEOUT,
            check_interval=scenario.check_interval,
            quiet=True,
        )
        out = io.StringIO()
        with fleet.host_run(0):
            code = ur.run(options, ur.Reporter(True, out, out), fleet.io())
    fleet.calls_after.append(fleet.calls)
    return code


@pytest.mark.parametrize("routers", [1, 2])
def test_a_poll_looks_at_each_remote_node_once(
    monkeypatch: pytest.MonkeyPatch, routers: int
) -> None:
    # F-1: one vassal at a time, so the host's run polls 2 x 16 times
    fleet = CountingFleet(sf.Scenario(HOSTS, VASSALS, HOSTS * VASSALS - 1, routers=routers))
    assert fleet.scenario.remote_nodes == 1008
    for name in MATCHING:
        monkeypatch.setattr(ur, name, fleet.counting(getattr(ur, name)))
    assert roll_first_host(fleet) == ur.EXIT_OK
    assert len(fleet.snapshots) == len(fleet.calls_after) > 2 * VASSALS
    for i, (snapshot, calls) in enumerate(zip(fleet.snapshots, fleet.calls_after)):
        # one look per node of each index: the snapshot's nodes, and its nodes live in every
        # router; at the start, once more per node (locate: which vassal is named after a node)
        passes = len(snapshot.nodes) + len(snapshot.live_nodes)
        if i == 0:
            passes += len(snapshot.nodes)
        bound = passes + PER_VASSAL * VASSALS
        assert calls <= bound, f"poll {i}: {calls} calls, more than {bound}"


#: the integer fields of a node the tool reads
NODE_NUMBERS = ("death_mark", "ref", "modifier1", "modifier2", "cores", "load", "weight")


#: node names as routers show them: spellings of the same address, and sockets named after
#: vassals
NAMES = (
    "127.0.0.2:8001",
    "[::ffff:127.0.0.2]:8001",
    "127.0.0.2:8002",
    "10.0.0.3:8001",
    "[::1]:8001",
    "[0:0::1]:8001",
    "/run/uwsgi/a.sock",
    "/run/other/a.sock",
    "/run/uwsgi/b.sock",
    "/run/uwsgi/a.v2.sock",
)
VASSAL_NAMES = ("a", "b", "a.v2", "c")
ADDRESSES = ("127.0.0.2:8001", "127.0.0.2:8002", "[::1]:8001", "10.0.0.9:1")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    placed=st.lists(
        st.tuples(st.sampled_from(NAMES), st.sampled_from(("k1", "k2")), st.booleans()),
        max_size=12,
    ),
    routers=st.lists(st.sampled_from(("", "fr-b")), min_size=12, max_size=12),
    fleet=st.lists(
        st.tuples(st.sampled_from(VASSAL_NAMES), st.frozensets(st.sampled_from(ADDRESSES))),
        max_size=4,
    ),
)
def test_the_index_finds_what_owns_finds(
    placed: list[tuple[str, str, bool]],
    routers: list[str],
    fleet: list[tuple[str, frozenset[str]]],
) -> None:
    nodes = [
        ur.Node(key, name, dead, 0, router=router)
        for (name, key, dead), router in zip(placed, routers)
    ]
    index = ur.NodeIndex(nodes)
    vassals = [
        ur.VassalReload(f"{name}.ini", name, f"/e/{name}.ini", addresses=addresses)
        for name, addresses in fleet
    ]
    for v in vassals:
        scanned = [n for n in nodes if ur.owns(v.name, v.addresses, n.name)]
        assert index.of_vassal(v.name, v.addresses) == scanned
    others = [
        n
        for n in nodes
        if n.live and not any(ur.owns(v.name, v.addresses, n.name) for v in vassals)
    ]
    per_key: dict[str, int] = {}
    per_place: dict[tuple[str, str], int] = {}
    for n in others:
        per_key[n.key] = per_key.get(n.key, 0) + 1
        per_place[n.router, n.key] = per_place.get((n.router, n.key), 0) + 1
    assert ur.others_live(index, vassals) == per_key
    assert ur.others_placed(index, vassals) == per_place


def node(**fields: Any) -> dict[str, Any]:
    return {"name": "/run/a.sock", "death_mark": 0, "ref": 0, "cores": 1, "weight": 1, **fields}


def stats(raw: dict[str, Any]) -> dict[str, Any]:
    return {"subscriptions": [{"key": "k", "nodes": [raw]}]}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (node(), ur.Node("k", "/run/a.sock", False, 0, cores=1, weight=1, router="r")),
        (
            node(death_mark=1, ref=3, modifier1=5, modifier2=6, load=7, weight=8),
            ur.Node("k", "/run/a.sock", True, 3, 5, 6, 1, 7, 8, "r"),
        ),
        # not what a fastrouter writes, taken as the checks always took it
        (node(ref=2.0, death_mark=True), ur.Node("k", "/run/a.sock", True, 2, 0, 0, 1, 0, 1, "r")),
        (node(weight=4.9), ur.Node("k", "/run/a.sock", False, 0, 0, 0, 1, 0, 4, "r")),
    ],
)
def test_a_node_as_a_fastrouter_writes_it_and_otherwise(
    raw: dict[str, Any], expected: ur.Node
) -> None:
    assert ur.parse_fastrouter_stats(stats(raw), "r") == [expected]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (node(name=""), "name"),
        (node(name=7), "name"),
        ({"ref": 0}, "name"),
        *((node(**{f: "1"}), f) for f in NODE_NUMBERS),
        *((node(**{f: None}), f) for f in NODE_NUMBERS),
    ],
)
def test_a_node_field_of_another_kind_is_a_stats_error(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ur.StatsError, match=f"has {field} "):
        ur.parse_fastrouter_stats(stats(raw), "r")
