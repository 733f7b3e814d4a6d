"""A poll's snapshot: the stats parser's quick path for what a fastrouter writes takes and
refuses exactly what its checks do, and the snapshot's lookups (a vassal's nodes, where it counts
as live, the other hosts' live nodes) answer what a scan of every node with ``owns`` answers. The
CPU a poll costs is measured by the benchmark (``uwsgi_reload_loadtests.simulate_fleet``), not
pinned here.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import uwsgi_reload as ur

#: the integer fields of a node the tool reads
NODE_NUMBERS = ("death_mark", "ref", "modifier1", "modifier2", "cores", "load", "weight", "failcnt")


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


def expected_node(raw: dict[str, Any], key: str, router: str) -> ur.Node:
    """A node as the checks take it, field by field: absent is 0, a float is cut."""
    mark, *numbers, failcnt = [int(raw.get(f, 0)) for f in NODE_NUMBERS]
    return ur.Node._make((key, raw["name"], bool(mark), *numbers, router, failcnt))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    stats_per_router=st.lists(router_stats(), min_size=1, max_size=2),
    fleet=st.lists(
        st.tuples(st.sampled_from(VASSAL_NAMES), st.frozensets(st.sampled_from(ADDRESSES))),
        max_size=4,
    ),
    accepting=st.booleans(),
    unreadable=st.booleans(),
)
def test_the_snapshot_answers_what_a_scan_of_every_node_answers(
    stats_per_router: list[dict[str, Any]],
    fleet: list[tuple[str, frozenset[str]]],
    accepting: bool,
    unreadable: bool,
) -> None:
    routers = tuple(f"fr-{i}" for i in range(len(stats_per_router)))
    nodes: list[ur.Node] = []
    for router, stats in zip(routers, stats_per_router):
        parsed = ur.parse_fastrouter_stats(stats, router)
        expected = [
            expected_node(raw, sub["key"], router)
            for sub in stats["subscriptions"]
            for raw in sub["nodes"]
        ]
        assert parsed == expected
        nodes += parsed
    gone = {routers[-1]: "unreadable"} if unreadable else {}
    vassals = [
        ur.VassalReload(f"{name}.ini", name, f"/e/{name}.ini", addresses=addresses)
        for name, addresses in fleet
    ]
    emperor = {
        v.id: ur.EmperorVassal(v.id, 1, 0, 0, accepting=accepting, ready=True) for v in vassals
    }
    snapshot = ur.Snapshot(emperor, nodes, routers, gone)
    # live in every router: one (key, name) per node live in each of them, none if one is gone
    live_in: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for n in nodes:
        if n.live:
            live_in[n.key, n.name].add(n.router)
    everywhere = {kn for kn, rs in live_in.items() if rs == set(routers) and not unreadable}
    assert snapshot.everywhere == everywhere
    for v in vassals:
        mine = [n for n in nodes if ur.owns(v.name, v.addresses, n.name)]
        assert snapshot.nodes_of(v.name, v.addresses) == mine
        places = {(n.router, n.key) for n in mine if n.live}
        places |= {(ur.EVERY_ROUTER, n.key) for n in mine if (n.key, n.name) in everywhere}
        assert snapshot.places(v) == (places if accepting else set())
    theirs = [
        n
        for n in nodes
        if n.live and not any(ur.owns(v.name, v.addresses, n.name) for v in vassals)
    ]
    others = collections.Counter((n.router, n.key) for n in theirs)
    mine_everywhere = {
        (n.key, n.name)
        for n in nodes
        if (n.key, n.name) in everywhere
        and n.live
        and any(ur.owns(v.name, v.addresses, n.name) for v in vassals)
    }
    others.update((ur.EVERY_ROUTER, key) for key, _ in everywhere - mine_everywhere)
    assert snapshot.others(vassals) == {p: c for p, c in others.items() if c}
