"""The tool's work per poll does not grow with the other hosts' nodes: a fleet of 1008 remote
nodes, rolled by the tool's own run (``uwsgi_reload_loadtests.simulate_fleet``), costs each poll
a few lookups per local vassal: no node name is worked out again once seen (``_Spellings``), and
no ``Node`` is made of another host's node (``NodeTable``); what is left per node is the stats'
checks and counts, in C. Counted in calls, not timed; and the stats parser's quick path for what
a fastrouter writes takes and refuses exactly what its checks do, and its table answers what an
index of the parsed nodes answers.
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
#: per local vassal, router and poll, the ``Node`` objects a poll may make (its own node)
NODES_PER_VASSAL = 2

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
        #: ``Node`` objects made, and from each snapshot to the next
        self.made = 0
        self.made_after: list[int] = []

    def counting_nodes(self) -> type[ur.Node]:
        """``ur.Node``, counting the objects made in ``made``."""
        fleet = self

        class CountedNode(ur.Node):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                fleet.made += 1
                super().__init__(*args, **kwargs)

        return CountedNode

    def counting(self, function: F) -> F:
        @functools.wraps(function)
        def counted(*args: Any) -> Any:
            self.calls += 1
            return function(*args)

        return counted  # type: ignore[return-value]

    def snapshot(self, options: ur.Options) -> ur.Snapshot:
        if self.snapshots:
            self.calls_after.append(self.calls)
            self.made_after.append(self.made)
        self.calls = self.made = 0
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
    fleet.made_after.append(fleet.made)
    return code


@pytest.mark.parametrize("routers", [1, 2])
def test_a_poll_looks_at_no_remote_node_in_python(
    monkeypatch: pytest.MonkeyPatch, routers: int
) -> None:
    # F-1: one vassal at a time, so the host's run polls 2 x 16 times
    fleet = CountingFleet(sf.Scenario(HOSTS, VASSALS, HOSTS * VASSALS - 1, routers=routers))
    assert fleet.scenario.remote_nodes == 1008
    for name in MATCHING:
        monkeypatch.setattr(ur, name, fleet.counting(getattr(ur, name)))
    monkeypatch.setattr(ur, "Node", fleet.counting_nodes())
    # the names of earlier tests' fleets: none seen yet
    monkeypatch.setattr(ur, "_spellings", ur._Spellings())
    assert roll_first_host(fleet) == ur.EXIT_OK
    assert len(fleet.snapshots) == len(fleet.calls_after) == len(fleet.made_after) > 2 * VASSALS
    for i, (snapshot, calls) in enumerate(zip(fleet.snapshots, fleet.calls_after)):
        # at the first poll, one look per node name and matching function (the spellings);
        # after it, none: a vassal's nodes are looked up by the names already worked out
        names = len({n.name for n in snapshot.nodes})
        bound = PER_VASSAL * VASSALS + (2 * names if i == 0 else 0)
        assert calls <= bound, f"poll {i}: {calls} calls, more than {bound}"
    # the code before NodeTable made a Node of each of the 1024 x routers nodes at every poll
    bound = NODES_PER_VASSAL * VASSALS * routers
    for i, made in enumerate(fleet.made_after):
        assert made <= bound, f"poll {i}: {made} Node objects made, more than {bound}"


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


#: node fields as a fastrouter writes them, and a few it does not (taken as the checks take them)
ODD_VALUES = (True, 2.0, "absent")


@st.composite
def router_stats(draw: st.DrawFn) -> dict[str, Any]:
    """One router's stats: keys (one twice, at times), nodes under names of ``NAMES`` (one twice
    under a key, at times), live or dead, now and then a field of another kind or left out."""
    subscriptions = []
    for key in draw(st.lists(st.sampled_from(("k1", "k2", "k3")), max_size=3)):
        nodes = []
        for name in draw(st.lists(st.sampled_from(NAMES), max_size=5)):
            raw = node(name=name, death_mark=draw(st.sampled_from((0, 0, 1))))
            if draw(st.integers(0, 9)) == 0:
                field = draw(st.sampled_from(NODE_NUMBERS))
                value = draw(st.sampled_from(ODD_VALUES))
                if value == "absent":
                    raw.pop(field, None)
                else:
                    raw[field] = value
            nodes.append(raw)
        subscriptions.append({"key": key, "nodes": nodes})
    return {"subscriptions": subscriptions}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    stats_per_router=st.lists(router_stats(), min_size=1, max_size=2),
    fleet=st.lists(
        st.tuples(st.sampled_from(VASSAL_NAMES), st.frozensets(st.sampled_from(ADDRESSES))),
        max_size=4,
    ),
    unreadable=st.booleans(),
)
def test_the_table_answers_what_the_parsed_nodes_answer(
    stats_per_router: list[dict[str, Any]],
    fleet: list[tuple[str, frozenset[str]]],
    unreadable: bool,
) -> None:
    routers = tuple(f"fr-{i}" for i in range(len(stats_per_router)))
    nodes: list[ur.Node] = []
    keys: list[ur.KeyNodes] = []
    for router, stats in zip(routers, stats_per_router):
        # each node through the checks, one by one: what parse_fastrouter_stats always gave
        for sub in stats["subscriptions"]:
            where = f"fastrouter stats: key {sub['key']!r}: nodes"
            nodes += [ur._node(n, sub["key"], router, where, j) for j, n in enumerate(sub["nodes"])]
        keys += ur.parse_fastrouter_keys(stats, router)
    assert ur.parse_fastrouter_stats(stats_per_router[0], routers[0]) == [
        n for n in nodes if n.router == routers[0]
    ]
    gone = {routers[-1]: "unreadable"} if unreadable else {}
    table = ur.Snapshot({}, ur.NodeTable(keys), routers, gone)
    parsed = ur.Snapshot({}, nodes, routers, gone)
    vassals = [
        ur.VassalReload(f"{name}.ini", name, f"/e/{name}.ini", addresses=addresses)
        for name, addresses in fleet
    ]
    assert list(table.nodes) == nodes and len(table.nodes) == len(nodes)
    assert table.live_nodes == parsed.live_nodes
    assert len(table.live_index) == len(parsed.live_index)
    for mine, theirs in ((table.index, parsed.index), (table.live_index, parsed.live_index)):
        assert set(mine.names()) == set(theirs.names())
        assert set(mine.live_names()) == set(theirs.live_names())
        assert mine.live_per_key == theirs.live_per_key
        assert mine.live_per_place == theirs.live_per_place
        assert mine.of_fleet(vassals) == theirs.of_fleet(vassals)
        for v in vassals:
            assert mine.of_vassal(v.name, v.addresses) == theirs.of_vassal(v.name, v.addresses)
            assert mine.of_vassal(v.name) == theirs.of_vassal(v.name)
        assert ur.others_live(mine, vassals) == ur.others_live(theirs, vassals)
        assert ur.others_placed(mine, vassals) == ur.others_placed(theirs, vassals)
