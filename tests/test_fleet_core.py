"""Fleets: vassals found by the socket their master listens on (/proc), other hosts' nodes that
count for the minimum and are never touched, several routers, and an unsubscribe no router acts on.

Table-driven tests of the /proc parsing and the matching, one test against a real listening socket
of this test process, and whole runs against a simulated fleet: several hosts behind one or two
fastrouters, of which the tool reloads one host's vassals.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import uwsgi_reload as ur
from tests.test_drain_logic import KEY
from tests.test_reload_logic import per_pid, vassal
from uwsgi_reload_loadtests.fleetsim import EVERY, SimFleet, host
from uwsgi_reload_loadtests.fleetsim import KEY as FLEET_KEY

# ---------------------------------------------------------------------------------------------
# /proc/net tables
# ---------------------------------------------------------------------------------------------

TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout "
    "inode\n"
)


def tcp_line(local: str, state: str, inode: int) -> str:
    return (
        f"   0: {local} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000     0"
        f"        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
    )


@pytest.mark.parametrize(
    ("local", "state", "expected"),
    [
        ("0200007F:0C31", "0A", "127.0.0.2:3121"),  # the documented example
        ("0100007F:1F90", "0A", "127.0.0.1:8080"),
        ("00000000:0C31", "0A", "0.0.0.0:3121"),
        ("0200007F:0C31", "01", None),  # established: not a listening socket
        ("0200007F:0C31", "06", None),  # time-wait
        ("00000000000000000000000001000000:0C31", "0A", "[::1]:3121"),
        ("00000000000000000000000000000000:0C31", "0A", "[::]:3121"),
        # an IPv4-mapped address is the IPv4 address the router names
        ("0000000000000000FFFF00000200007F:0C31", "0A", "127.0.0.2:3121"),
        # fe80::1: four little-endian 32-bit words
        ("000080FE000000000000000001000000:0C31", "0A", "[fe80::1]:3121"),
        ("nonsense:0C31", "0A", None),
    ],
)
def test_parse_proc_net_tcp(local: str, state: str, expected: str | None) -> None:
    table = ur.parse_proc_net_tcp(TCP_HEADER + tcp_line(local, state, 4242) + "short line\n")
    assert table == ({} if expected is None else {4242: expected})


UNIX_HEADER = "Num       RefCount Protocol Flags    Type St Inode Path\n"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "0000000000000000: 00000002 00000000 00010000 0001 01 12345 /run/uwsgi/a.sock",
            {12345: "/run/uwsgi/a.sock"},
        ),
        (
            "0000000000000000: 00000002 00000000 00010000 0001 01 12345 @abstract",
            {12345: "@abstract"},
        ),
        # connected, not listening
        ("0000000000000000: 00000003 00000000 00000000 0001 03 12345 /run/uwsgi/a.sock", {}),
        # listening without a name
        ("0000000000000000: 00000002 00000000 00010000 0001 01 12345", {}),
        ("0000000000000000: 00000002 00000000 zz 0001 01 12345 /x", {}),
    ],
)
def test_parse_proc_net_unix(line: str, expected: dict[int, str]) -> None:
    assert ur.parse_proc_net_unix(UNIX_HEADER + line + "\n") == expected


@pytest.mark.parametrize(
    ("link", "inode"),
    [("socket:[12345]", 12345), ("pipe:[12345]", None), ("/dev/null", None), ("socket:[x]", None)],
)
def test_socket_inode(link: str, inode: int | None) -> None:
    assert ur.socket_inode(link) == inode


def fake_proc(base: Path, pid: int, links: list[str], tcp: str, tcp6: str, unix: str) -> str:
    fd = base / str(pid) / "fd"
    fd.mkdir(parents=True)
    for i, link in enumerate(links):
        (fd / str(i)).symlink_to(link)
    (base / "net").mkdir()
    (base / "net" / "tcp").write_text(TCP_HEADER + tcp)
    (base / "net" / "tcp6").write_text(TCP_HEADER + tcp6)
    (base / "net" / "unix").write_text(UNIX_HEADER + unix)
    return str(base)


def test_listening_sockets_of_a_fake_proc(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path,
        77,
        ["socket:[1]", "socket:[2]", "socket:[3]", "socket:[9]", "pipe:[4]", "/dev/null"],
        tcp=tcp_line("0200007F:0C31", "0A", 1) + tcp_line("0300007F:0C31", "0A", 5),
        tcp6=tcp_line("00000000000000000000000001000000:0C32", "0A", 2),
        unix="0000000000000000: 00000002 00000000 00010000 0001 01 3 /run/a.sock\n",
    )
    # inode 5 is another process's socket; inode 9 is in no table (a UDP socket, say)
    assert ur.listening_sockets([77], proc) == {77: ("/run/a.sock", "127.0.0.2:3121", "[::1]:3122")}


def test_listening_sockets_of_a_process_it_cannot_see(tmp_path: Path) -> None:
    assert ur.listening_sockets([77], str(tmp_path)) == {77: ()}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ur-", dir="/tmp") as d:
        yield Path(d)


def test_listening_sockets_of_this_very_process(short_dir: Path) -> None:
    """The real /proc: this test process listens on TCP and on a unix path."""
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        address = f"127.0.0.1:{tcp.getsockname()[1]}"
        path = str(short_dir / "v.sock")
        unix.bind(path)
        unix.listen()
        found = ur.listening_sockets([os.getpid()])[os.getpid()]
        assert address in found, found
        assert path in found, found
    assert address not in ur.listening_sockets([os.getpid()])[os.getpid()]


def test_listening_sockets_of_this_very_process_over_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6) as tcp:
        try:
            tcp.bind(("::1", 0))
        except OSError:
            pytest.skip("no ::1 here")
        tcp.listen()
        assert f"[::1]:{tcp.getsockname()[1]}" in ur.listening_sockets([os.getpid()])[os.getpid()]


def test_netlink_and_proc_agree_on_the_listening_sockets(short_dir: Path) -> None:
    """The kernel's socket diagnostics (what the tool asks first) and /proc/net (its fallback)
    name each listening socket alike: TCP, a unix path, an abstract unix name."""
    with (
        socket.socket() as tcp,
        socket.socket(socket.AF_UNIX) as path,
        socket.socket(socket.AF_UNIX) as abstract,
    ):
        tcp.bind(("127.0.0.1", 0))
        path.bind(str(short_dir / "v.sock"))
        abstract.bind(f"\0uwsgi-reload-test-{os.getpid()}")
        mine = {}
        for s in (tcp, path, abstract):
            s.listen()
            mine[os.fstat(s.fileno()).st_ino] = s
        from_netlink = ur.sock_diag_listening()
        from_proc = ur.parse_proc_net_tcp(Path("/proc/net/tcp").read_text())
        from_proc.update(ur.parse_proc_net_unix(Path("/proc/net/unix").read_text()))
        assert {i: from_netlink.get(i) for i in mine} == {i: from_proc.get(i) for i in mine}
        assert from_netlink[os.fstat(tcp.fileno()).st_ino] == f"127.0.0.1:{tcp.getsockname()[1]}"
        assert from_netlink[os.fstat(path.fileno()).st_ino] == str(short_dir / "v.sock")
        assert from_netlink[os.fstat(abstract.fileno()).st_ino].startswith("@uwsgi-reload-test")


def test_where_netlink_is_refused_proc_is_read(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(timeout: float = 2.0) -> dict[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ur, "sock_diag_listening", refused)
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        found = ur.listening_sockets([os.getpid()])[os.getpid()]
        assert f"127.0.0.1:{tcp.getsockname()[1]}" in found


# ---------------------------------------------------------------------------------------------
# Matching nodes to vassals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("127.0.0.2:3121", "127.0.0.2:3121"),
        ("[::1]:3121", "[::1]:3121"),
        ("[0:0:0:0:0:0:0:1]:3121", "[::1]:3121"),
        ("[::ffff:127.0.0.2]:3121", "127.0.0.2:3121"),
        ("/run/uwsgi/a.sock", "/run/uwsgi/a.sock"),
        ("app1.example:3121", "app1.example:3121"),
    ],
)
def test_canonical_address(name: str, canonical: str) -> None:
    assert ur.canonical_address(name) == canonical


LOCAL = {"127.0.0.2", "10.0.0.2", "::1"}


@pytest.mark.parametrize(
    ("listening", "nodes", "expected"),
    [
        (["127.0.0.2:3121"], ["127.0.0.2:3121", "127.0.0.3:3121"], {"127.0.0.2:3121"}),
        (["[::1]:3121"], ["[::1]:3121"], {"[::1]:3121"}),
        (["/run/a.sock"], ["/run/a.sock", "/run/b.sock"], {"/run/a.sock"}),
        # a bind on every address is the announced address of this machine on its port
        (["0.0.0.0:3121"], ["10.0.0.2:3121", "10.0.0.3:3121", "10.0.0.2:3122"], {"10.0.0.2:3121"}),
        (
            ["[::]:3121"],
            ["10.0.0.2:3121", "[::1]:3121", "[::1]:3122"],
            {"10.0.0.2:3121", "[::1]:3121"},
        ),
        (["0.0.0.0:3121"], ["[::1]:3121"], set()),
        (["0.0.0.0:3121"], ["app1.example:3121"], set()),
        # not in the router yet: its port on the addresses of this machine the nodes show
        (["0.0.0.0:3125"], ["10.0.0.2:3121", "10.0.0.3:3121"], {"10.0.0.2:3125"}),
        ([], ["127.0.0.2:3121"], set()),
    ],
)
def test_node_addresses(listening: list[str], nodes: list[str], expected: set[str]) -> None:
    assert ur.node_addresses(listening, nodes, LOCAL.__contains__) == expected


@pytest.mark.parametrize(
    ("addresses", "node_name", "mine"),
    [
        ({"127.0.0.2:3121"}, "127.0.0.2:3121", True),
        ({"127.0.0.2:3121"}, "127.0.0.3:3121", False),
        ({"[::1]:3121"}, "[0::1]:3121", True),
        # known addresses decide: a node named after the vassal on another host is not it
        ({"/run/h1/a.sock"}, "/run/h2/a.sock", False),
        (set(), "/run/h2/a.sock", True),  # by name, when /proc told nothing
        (set(), "127.0.0.2:3121", False),
    ],
)
def test_owns(addresses: set[str], node_name: str, mine: bool) -> None:
    assert ur.owns("a", frozenset(addresses), node_name) is mine


def test_is_local_host() -> None:
    assert ur.is_local_host("127.0.0.5")
    assert not ur.is_local_host("192.0.2.1")  # TEST-NET-1: no machine has it
    assert not ur.is_local_host("app1.example")


def fleet_of(*names: str) -> list[ur.VassalReload]:
    return [ur.VassalReload(id=f"{n}.ini", name=n, config=f"/e/{n}.ini") for n in names]


def tnode(name: str, dead: bool = False, router: str = "") -> ur.Node:
    return ur.Node(key=KEY, name=name, death_mark=dead, ref=0, router=router)


@pytest.mark.parametrize(
    ("listening", "nodes", "addresses"),
    [
        # by the socket it listens on
        ({10: ("127.0.0.2:3121",)}, ["127.0.0.2:3121", "127.0.0.3:3121"], {"127.0.0.2:3121"}),
        # /proc unreadable: by name
        ({}, ["/run/a.sock", "127.0.0.3:3121"], set()),
        # listens on a relative path the router names otherwise: by name
        ({10: ("a.sock",)}, ["/run/a.sock"], set()),
        # not in the router yet: its own address all the same
        ({10: ("127.0.0.2:3121",)}, ["127.0.0.3:3121"], {"127.0.0.2:3121"}),
    ],
)
def test_locate(
    listening: dict[int, tuple[str, ...]], nodes: list[str], addresses: set[str]
) -> None:
    snapshot = ur.Snapshot({"a.ini": vassal("a.ini", pid=10)}, [tnode(n) for n in nodes])

    def sockets(pid: int) -> tuple[str, ...]:
        if pid not in listening:
            raise PermissionError(13, "Permission denied")
        return listening[pid]

    (located,) = ur.locate(fleet_of("a"), snapshot, per_pid(sockets), lambda host: False)
    assert located.addresses == addresses
    assert located.listening == listening.get(10, ())


def local_and_remote(
    local: int, remote: int, minimum: int
) -> tuple[list[ur.VassalReload], ur.Snapshot]:
    fleet = [
        dataclasses.replace(v, addresses=frozenset({f"127.0.0.2:{3121 + i}"}))
        for i, v in enumerate(fleet_of(*(f"v{i}" for i in range(local))))
    ]
    vassals = {v.id: vassal(v.id, pid=10 + i) for i, v in enumerate(fleet)}
    nodes = [tnode(f"127.0.0.2:{3121 + i}") for i in range(local)]
    nodes += [tnode(f"127.0.0.{3 + i // 4}:{3121 + i % 4}") for i in range(remote)]
    return fleet, ur.Snapshot(vassals, nodes)


@pytest.mark.parametrize(
    ("local", "remote", "minimum", "refused"),
    [
        (4, 8, 4, None),
        (4, 8, 11, None),  # one of the 4 at a time
        (4, 8, 12, "leaves nothing to reload"),
        (4, 0, 4, "leaves nothing to reload"),
        (1, 3, 3, None),  # one vassal here, the other hosts keep 3
    ],
)
def test_check_fleet_counts_the_routers_total(
    local: int, remote: int, minimum: int, refused: str | None
) -> None:
    fleet, snapshot = local_and_remote(local, remote, minimum)
    if refused is None:
        ur.check_fleet(fleet, snapshot, minimum)
    else:
        with pytest.raises(ur.ReloadError, match=refused):
            ur.check_fleet(fleet, snapshot, minimum)


def test_check_fleet_refuses_a_local_vassal_that_matches_no_node() -> None:
    fleet, snapshot = local_and_remote(2, 4, 1)
    fleet[1] = dataclasses.replace(fleet[1], addresses=frozenset({"127.0.0.2:9999"}))
    with pytest.raises(ur.ReloadError, match="cannot tell which fastrouter node is which vassal"):
        ur.check_fleet(fleet, snapshot, 1)
    # not accepting: it is not live, and goes first
    vassals = dict(snapshot.vassals)
    vassals["v1.ini"] = vassal("v1.ini", pid=11, accepting=False)
    ur.check_fleet(fleet, ur.Snapshot(vassals, snapshot.nodes), 1)


@pytest.mark.parametrize(
    ("routers", "nodes", "unreadable", "live"),
    [
        (("",), [tnode("n1"), tnode("n2", dead=True)], {}, {"n1"}),
        (("a", "b"), [tnode("n1", router="a"), tnode("n1", router="b")], {}, {"n1"}),
        # live in one router only: not live
        (("a", "b"), [tnode("n1", router="a")], {}, set()),
        (("a", "b"), [tnode("n1", router="a"), tnode("n1", True, router="b")], {}, set()),
        # a router that cannot be read: nothing is live there
        (("a", "b"), [tnode("n1", router="a")], {"b": "cannot read"}, set()),
    ],
)
def test_live_in_every_router(
    routers: tuple[str, ...], nodes: list[ur.Node], unreadable: dict[str, str], live: set[str]
) -> None:
    snapshot = ur.Snapshot({}, nodes, routers, unreadable)
    assert {name for _, name in snapshot.everywhere} == live


@pytest.mark.parametrize(
    ("live", "others", "minimum", "expected"),
    [
        # 3 hosts x 4 vassals, minimum 4: this host's 4 may all go while the other 8 are live
        ({v: frozenset({"k"}) for v in "abcd"}, {"k": 8}, 4, ["a", "b", "c", "d"]),
        ({v: frozenset({"k"}) for v in "abcd"}, {"k": 8}, 10, ["a", "b"]),
        ({v: frozenset({"k"}) for v in "abcd"}, {"k": 8}, 12, []),
        ({v: frozenset({"k"}) for v in "abcd"}, {"k2": 8}, 2, ["a", "b"]),
    ],
)
def test_pick_reloads_counts_other_hosts(
    live: dict[str, frozenset[str]], others: dict[str, int], minimum: int, expected: list[str]
) -> None:
    assert ur.pick_reloads(sorted(live), live, minimum, None, others) == expected


# ---------------------------------------------------------------------------------------------
# Whole runs: this host's vassals and other hosts' nodes behind one or two fastrouters
# ---------------------------------------------------------------------------------------------


def fleet_stack(
    local: int,
    remote: int,
    routers: tuple[str, ...] = ("fr-a",),
    servers: dict[str, str | None] | None = None,
    **timing: float,
) -> SimFleet:
    """This host's vassals listen on 127.0.0.2 (TCP); other hosts' nodes (4 a host on 127.0.0.3,
    ..., on the same ports) are live all along. Each router keeps its own view of this host's
    nodes: a vassal's master announces to every router, a packet of the tool reaches the router
    its subscription server belongs to (``servers``: server -> router, or None when no router
    listens there; default ``ss-<router>`` for each)."""
    hosts = [host(local, "127.0.0.2", 3121)]
    hosts += [host(min(4, remote - j), f"127.0.0.{3 + j // 4}", 3121) for j in range(0, remote, 4)]
    return SimFleet(hosts, routers, servers, **timing)


def fewest_total(stack: SimFleet) -> int:
    """The fewest nodes of the key live in every router: this host's and the others'."""
    return stack.fewest[EVERY, FLEET_KEY]


def sent_to(stack: SimFleet, vid: str, command: ur.Command) -> set[str]:
    """The subscription servers that were sent ``command`` about ``vid``."""
    return {p.server for p in stack.sent(vid, command)}


def routed_everywhere(stack: SimFleet) -> bool:
    return all(all(v.routed.values()) for v in stack.vassals.values())


def run_fleet(
    stack: SimFleet, tmp_path: Path, minimum: int, drain: bool = True, **options: object
) -> tuple[int, str, dict[str, Any]]:
    servers = list(stack.servers) if drain else None
    return stack.run(
        tmp_path, minimum_active_vassals=minimum, subscription_server=servers, **options
    )


@pytest.mark.parametrize("drain", [False, True])
def test_three_hosts_minimum_four_reloads_this_hosts_four_at_once(
    tmp_path: Path, drain: bool
) -> None:
    stack = fleet_stack(local=4, remote=8, announce_delay=0.3)
    code, out, report = run_fleet(stack, tmp_path, minimum=4, drain=drain)
    assert code == ur.EXIT_OK, out
    starts = [t for t, _ in stack.touched]
    assert len(starts) == 4 and max(starts) - min(starts) < 0.1, out  # one wave
    assert fewest_total(stack) >= 4, out
    assert fewest_total(stack) == 8, out  # all 4 of this host were out together
    assert stack.remote_packets == [], out
    assert all(v.respawns == 1 for v in stack.vassals.values())
    assert {v["outcome"] for v in report.values()} == {"reloaded"}
    if drain:
        for vid in stack.vassals:
            assert sent_to(stack, vid, ur.Command.UNSUBSCRIBE) == {"ss-fr-a"}
            assert sent_to(stack, vid, ur.Command.SUBSCRIBE) == {"ss-fr-a"}


@pytest.mark.parametrize(("minimum", "fewest"), [(10, 10), (11, 11), (9, 9)])
def test_a_fleet_minimum_above_this_hosts_share_paces_it(
    tmp_path: Path, minimum: int, fewest: int
) -> None:
    stack = fleet_stack(local=4, remote=8, announce_delay=0.3)
    code, out, _ = run_fleet(stack, tmp_path, minimum=minimum)
    assert code == ur.EXIT_OK, out
    assert fewest_total(stack) == fewest, out
    assert stack.remote_packets == [], out


def test_a_minimum_of_the_whole_fleet_leaves_nothing_to_reload(tmp_path: Path) -> None:
    stack = fleet_stack(local=4, remote=8)
    with pytest.raises(ur.ReloadError, match="leaves nothing to reload"):
        run_fleet(stack, tmp_path, minimum=12)
    assert stack.touched == [] and stack.packets == []


def test_the_dry_run_shows_this_hosts_count_and_the_routers(tmp_path: Path) -> None:
    stack = fleet_stack(local=4, remote=8)
    code, out, _ = run_fleet(stack, tmp_path, minimum=10, dry_run=True)
    assert code == ur.EXIT_OK
    assert "4 live, minimum 10: up to 2 reloading at once, about 2 reload times" in out
    assert "the router counts 12 live (4 on this host, 8 on other hosts)" in out
    assert stack.touched == [] and stack.packets == []


def test_a_vassal_bound_on_every_address_is_told_from_other_hosts_by_its_address(
    tmp_path: Path,
) -> None:
    stack = fleet_stack(local=4, remote=8, announce_delay=0.3)
    stack.bound_on_every_address = True  # 0.0.0.0:3121..3124, the other hosts use them too
    code, out, _ = run_fleet(stack, tmp_path, minimum=4)
    assert code == ur.EXIT_OK, out
    assert stack.remote_packets == [], out
    assert fewest_total(stack) >= 4, out


def test_without_proc_and_a_name_the_run_is_refused(tmp_path: Path) -> None:
    stack = fleet_stack(local=2, remote=4)
    stack.proc_readable = False  # another user's vassals: their fds cannot be read
    with pytest.raises(ur.ReloadError, match="cannot tell which fastrouter node is which vassal"):
        run_fleet(stack, tmp_path, minimum=1)
    assert stack.touched == [] and stack.packets == []


TWO = ("fr-a", "fr-b")


def test_two_routers_each_keep_the_minimum(tmp_path: Path) -> None:
    stack = fleet_stack(local=4, remote=0, routers=TWO, announce_delay=0.3)
    stack.lose("fr-b", ["vassal_04.ini"])  # (say, B restarted)
    code, out, _ = run_fleet(stack, tmp_path, minimum=3)
    assert code == ur.EXIT_OK, out
    assert fewest_total(stack) >= 3, out
    # B has 3, the minimum: only the vassal B lacks may go, alone (A keeps 3)
    first, second = stack.touched[0], stack.touched[1]
    assert first[1] == "vassal_04.ini" and second[0] > first[0] + 1.0, out
    # drained from A, where it was live: the unsubscribe goes to every server
    for vid in stack.vassals:
        assert sent_to(stack, vid, ur.Command.UNSUBSCRIBE) == {"ss-fr-a", "ss-fr-b"}, vid
        assert sent_to(stack, vid, ur.Command.SUBSCRIBE) == {"ss-fr-a", "ss-fr-b"}, vid
    assert routed_everywhere(stack)


def test_a_vassal_live_in_one_router_only_is_not_back(tmp_path: Path) -> None:
    """A node is live when it is live in every router: a snapshot with it in A only."""
    fleet = fleet_of("a")
    a, b = tnode("/run/a.sock", router="fr-a"), tnode("/run/a.sock", True, router="fr-b")
    snapshot = ur.Snapshot({"a.ini": vassal("a.ini")}, [a, b], TWO)
    assert snapshot.live_keys(fleet[0]) == frozenset()
    assert snapshot.places(fleet[0]) == {("fr-a", KEY)}
    assert snapshot.nodes_of(fleet[0].name) == [a, b]


@pytest.mark.parametrize(("drain", "shortest"), [(False, 4.0), (True, 1.0)])
def test_two_routers_back_means_back_in_both(tmp_path: Path, drain: bool, shortest: float) -> None:
    """The masters' announces reach router B 2 s late: without the fast return (which
    subscribes at every server) a vassal is back only once B has it too."""
    stack = fleet_stack(local=2, remote=2, routers=TWO, announce_delay=1.0)
    stack.announce_lag["fr-b"] = 2.0
    code, out, report = run_fleet(stack, tmp_path, minimum=2, drain=drain)
    assert code == ur.EXIT_OK, out
    assert fewest_total(stack) >= 2, out
    durations = [float(v["duration"]) for v in report.values()]
    assert shortest <= min(durations) < shortest + 0.5, out


def test_a_router_that_cannot_be_read_starts_nothing(tmp_path: Path) -> None:
    stack = fleet_stack(local=4, remote=0, routers=TWO, reload=0.5, announce_delay=0.1)
    stack.down["fr-b"] = (0.3, 2.0)
    code, out, _ = run_fleet(stack, tmp_path, minimum=3)
    assert code == ur.EXIT_OK, out
    started = [p.at for p in stack.packets if p.command == ur.Command.UNSUBSCRIBE]
    assert not any(0.3 <= t < 2.0 for t in started), out
    assert fewest_total(stack) >= 3, out


def test_a_router_unreadable_for_the_timeout_gives_the_run_up(tmp_path: Path) -> None:
    stack = fleet_stack(local=4, remote=0, routers=TWO, reload=0.5, announce_delay=0.1)
    stack.down["fr-b"] = (0.3, 1000.0)
    code, out, report = run_fleet(stack, tmp_path, minimum=3, timeout=3.0)
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    assert fewest_total(stack) >= 3, out
    assert {v["outcome"] for v in report.values()} >= {"not started"}


@pytest.mark.parametrize(
    ("routers", "servers", "ignoring"),
    [
        # the subscription server given is no router's: nothing acts on the unsubscribe
        (("fr-a",), {"ss-wrong": None}, ["fr-a"]),
        # router B's server is bound elsewhere: B keeps routing to the node
        (TWO, {"ss-fr-a": "fr-a", "ss-wrong": None}, ["fr-b"]),
    ],
)
def test_an_unsubscribe_no_router_acts_on_is_never_taken_for_a_drain(
    tmp_path: Path, routers: tuple[str, ...], servers: dict[str, str | None], ignoring: list[str]
) -> None:
    stack = fleet_stack(local=4, remote=4, routers=routers, servers=servers)
    code, out, report = run_fleet(stack, tmp_path, minimum=2, drain_timeout=1.0)
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    assert stack.touched == [], out  # not touched as "drained"
    assert fewest_total(stack) >= 2, out
    ignored = [v for v in report.values() if v["drain_ignored_by"]]
    assert ignored and all(v["drain_ignored_by"] == ignoring for v in ignored), report
    assert all(v["outcome"] == "failed" for v in ignored)
    for vid in (vid for vid, v in report.items() if v["drain_ignored_by"]):
        # one unsubscribe per server: a router that has not acted is not sent one every poll
        assert len(stack.sent(vid, ur.Command.UNSUBSCRIBE)) == len(servers), out
    assert {v["outcome"] for v in report.values()} <= {"failed", "not started"}
    # whoever was taken out of a router that did act is back in it
    assert routed_everywhere(stack)


def test_the_command_line_takes_several_routers_and_servers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = fleet_stack(local=4, remote=8, routers=TWO)
    for vid in stack.vassals:
        (tmp_path / vid).write_text("[uwsgi]\n")
    argv = ["--emperor-path", str(tmp_path), "--emperor-stats-socket", "es.sock"]
    argv += ["--fastrouter-stats-socket", "fr-a", "--fastrouter-stats-socket", "fr-b"]
    argv += ["--subscription-server", "127.0.0.1:29626", "--subscription-server", "[::1]:29627"]
    argv += ["--minimum-active-vassals", "8", "--dry-run", "--json"]
    assert ur.main(argv, io=stack.io()) == ur.EXIT_OK
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["fastrouter_stats_socket"] == ["fr-a", "fr-b"]
    assert report["subscription_server"] == ["127.0.0.1:29626", "[::1]:29627"]
    assert [v["addresses"] for v in report["vassals"]] == [
        [v.address] for v in stack.vassals.values()
    ]
    assert "the 2 routers count 12 live (4 on this host, 8 on other hosts)" in captured.err
    assert stack.touched == [] and stack.packets == []


def test_one_router_and_one_server_read_as_before() -> None:
    argv = ["--emperor-path", "e", "--emperor-stats-socket", "es", "--fastrouter-stats-socket"]
    args = ur.build_parser().parse_args([*argv, "fr", "--subscription-server", "127.0.0.1:1"])
    options = ur.Options(**vars(args))
    assert (options.routers, options.subscription_servers) == (("fr",), ("127.0.0.1:1",))
    report = ur.report_json([], options, 0.0, 0.0, 0, None)
    assert (report["fastrouter_stats_socket"], report["subscription_server"]) == (
        "fr",
        "127.0.0.1:1",
    )
    args = ur.build_parser().parse_args([*argv, "fr"])
    assert ur.Options(**vars(args)).subscription_servers == ()


def test_a_router_that_cannot_be_read_at_the_start_touches_nothing(tmp_path: Path) -> None:
    stack = fleet_stack(local=4, remote=0, routers=TWO)
    stack.down["fr-b"] = (0.0, 1000.0)
    with pytest.raises(ur.StatsError, match="fr-b"):
        run_fleet(stack, tmp_path, minimum=1)
    assert stack.touched == [] and stack.packets == []


def test_a_vassal_bound_on_every_address_and_down_at_the_start_is_found_once_back(
    tmp_path: Path,
) -> None:
    stack = fleet_stack(local=4, remote=8, announce_delay=0.3)
    stack.bound_on_every_address = True
    # the emperor is starting it: not accepting, not in the router
    stack.vassals["vassal_04.ini"].down_until = 0.5
    code, out, report = run_fleet(stack, tmp_path, minimum=4)
    assert code == ur.EXIT_OK, out
    assert report["vassal_04.ini"]["addresses"] == ["127.0.0.2:3124"]
    assert [t for t, vid in stack.touched if vid == "vassal_04.ini"] >= [0.5], out
    assert stack.remote_packets == [] and fewest_total(stack) >= 4, out


@pytest.mark.parametrize(
    ("remote", "starts"),
    [
        # each router keeps one other node, but none is live in both: a client that reaches
        # either router may find none of the nodes live in the other; v stays
        ({"fr-a": ["127.0.0.3:1"], "fr-b": ["127.0.0.4:1"]}, False),
        ({"fr-a": ["127.0.0.3:1"], "fr-b": ["127.0.0.3:1"]}, True),
        # B has no other node: B would go empty
        ({"fr-a": ["127.0.0.3:1", "127.0.0.4:1"], "fr-b": []}, False),
    ],
)
def test_the_minimum_holds_in_each_router_and_in_every_router(
    remote: dict[str, list[str]], starts: bool
) -> None:
    fleet = [dataclasses.replace(fleet_of("v")[0], addresses=frozenset({"127.0.0.2:1"}))]
    nodes = [tnode("127.0.0.2:1", router=r) for r in TWO]
    nodes += [tnode(name, router=r) for r, names in remote.items() for name in names]
    rollout = ur.Rollout(fleet, ur.Rules(minimum=1, timeout=10))
    (event,) = rollout.step(ur.Snapshot({"v.ini": vassal("v.ini")}, nodes, TWO), 0.0)
    assert event.touches is starts


# ---------------------------------------------------------------------------------------------
# --max-unavailable: a budget per host, so that hosts rolled together share the fleet's room
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("share", "most"), [("1", 1), ("2", 2), ("25%", 2), ("10%", 0)])
def test_max_unavailable_caps_this_hosts_vassals_out_at_once(
    tmp_path: Path, share: str, most: int
) -> None:
    """4 local vassals, 4 remote nodes: minimum 1 lets all 4 go at once; the budget caps them
    (25% of the key's 8 live nodes: 2)."""
    stack = fleet_stack(local=4, remote=4, announce_delay=0.3)
    if most == 0:  # 10% of 8 nodes is 0: refused before anything is touched
        with pytest.raises(ur.ReloadError, match="is 0: nothing could be reloaded"):
            run_fleet(stack, tmp_path, minimum=1, max_unavailable=share)
        assert stack.touched == []
        return
    code, out, _ = run_fleet(stack, tmp_path, minimum=1, max_unavailable=share)
    assert code == ur.EXIT_OK, out
    assert 8 - fewest_total(stack) == most, out


def test_control_without_a_budget_the_host_takes_out_what_the_minimum_allows(
    tmp_path: Path,
) -> None:
    stack = fleet_stack(local=4, remote=4, announce_delay=0.3)
    code, out, _ = run_fleet(stack, tmp_path, minimum=1)
    assert code == ur.EXIT_OK, out
    assert 8 - fewest_total(stack) == 4, out


def test_a_drain_timeout_touches_no_vassal_a_router_that_ignores_the_drain_routes_to(
    tmp_path: Path,
) -> None:
    """B's subscription server is not the one given; B lacks vassal_01 at the start, and its
    master re-announces at 0.5 s to both routers; requests in flight never end in A."""
    servers = {"ss-fr-a": "fr-a", "ss-wrong": None}
    timing = {"reload": 0.2, "lag": 0.0, "announce_delay": 0.0, "reannounce": 0.5}
    stack = fleet_stack(local=2, remote=0, routers=TWO, servers=servers, **timing)
    first = stack.vassals["vassal_01.ini"]
    first.routed["fr-b"], first.requests = False, [math.inf]
    code, out, _ = run_fleet(stack, tmp_path, minimum=0, drain_timeout=0.5, timeout=1.0)
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    assert stack.touched_while_routed == [], out


def test_other_hosts_reloading_are_waited_for_not_given_up() -> None:
    """Two vassals here, four other nodes, minimum 5: one vassal here goes at a time. As the
    first is back, two other nodes are out (their host reloads): nothing is in flight, nothing
    may start. The rollout waits for them, up to the timeout, and goes on once they are back."""
    fleet, full = local_and_remote(2, 4, 5)
    v0, v1 = fleet
    rollout = ur.Rollout(fleet, ur.Rules(minimum=5, timeout=10))
    (event,) = rollout.step(full, 0.0)
    assert (event.vassal.name, event.kind) == (v0.name, ur.EventKind.TRIGGERED)
    reloading = {**full.vassals, v0.id: vassal(v0.id, pid=10, respawns=1, last_mod=2000)}
    # v0 back, two of the other host's nodes out: 4 live, v1 would leave 3
    others_out = ur.Snapshot(reloading, [n for n in full.nodes if n.name not in OUT])
    rollout.step(others_out, 2.0)
    assert rollout.vassals[v0.id].phase is ur.Phase.BACK
    for now in (3.0, 11.0):
        assert rollout.step(others_out, now) == []
        assert rollout.vassals[v1.id].phase is ur.Phase.PENDING, now
    # they are back: v1 goes
    (event,) = rollout.step(ur.Snapshot(reloading, full.nodes), 11.5)
    assert (event.vassal.name, event.kind) == (v1.name, ur.EventKind.TRIGGERED)


def test_other_hosts_out_for_the_whole_timeout_leave_the_rest_not_started() -> None:
    fleet, full = local_and_remote(2, 4, 5)
    v0, v1 = fleet
    rollout = ur.Rollout(fleet, ur.Rules(minimum=5, timeout=10))
    rollout.step(full, 0.0)
    reloading = {**full.vassals, v0.id: vassal(v0.id, pid=10, respawns=1, last_mod=2000)}
    others_out = ur.Snapshot(reloading, [n for n in full.nodes if n.name not in OUT])
    rollout.step(others_out, 2.0)
    rollout.step(others_out, 3.0)
    (event,) = rollout.step(others_out, 13.0)
    assert (event.vassal.name, event.kind) == (v1.name, ur.EventKind.NOT_STARTED)
    assert rollout.vassals[v1.id].not_started is ur.NotStarted.MINIMUM


#: two of the other host's nodes (``local_and_remote``), out while their host reloads
OUT = {"127.0.0.3:3121", "127.0.0.3:3122"}


def test_a_host_of_a_batch_waits_for_room_at_the_start(tmp_path: Path) -> None:
    """With ``--max-unavailable`` the minimum leaving nothing to reload at the start is waited
    on: the other hosts' nodes come back (here at 3 s) and the run goes on; without it the run
    is refused at once, as before (``test_a_minimum_of_the_whole_fleet_leaves_nothing...``)."""
    stack = fleet_stack(local=4, remote=8, announce_delay=0.3)
    others = [v for h in stack.hosts[1:] for v in h]
    for v in others:
        v.routed["fr-a"] = False
    stack.roll(0)

    def back() -> None:
        for v in others:
            v.routed["fr-a"] = True
        stack.roll(0)

    stack.on_sleep.append((3.0, back))
    code, out, _ = run_fleet(stack, tmp_path, minimum=8, max_unavailable="4", timeout=10.0)
    assert code == ur.EXIT_OK, out
    assert out.startswith("waiting up to 10s for room: --minimum-active-vassals 8"), out
    assert min(t for t, _ in stack.touched) >= 3.0, out
