#!/usr/bin/env python3
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
"""Graceful reload for uWSGI vassals behind a fastrouter, keeping a minimum live at all times.

Standalone: Python >= 3.9 standard library only. Copy it to a server and run it.

In a fleet (many hosts announcing to the same routers) it reloads the vassals of this host's
emperor: each vassal's node is the address its master listens on (/proc), other hosts' nodes
count for the minimum and are never touched.

Exit codes: 0 all reloaded, 1 not all reloaded, 2 usage or bad input, 3 another run holds the
lock, 130 interrupted (SIGINT or SIGTERM).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import enum
import errno
import fcntl
import functools
import ipaddress
import itertools
import json
import math
import operator
import os
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, TextIO, TypeVar

__version__ = "0.1.0"

EXIT_OK = 0
EXIT_NOT_ALL_RELOADED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_INTERRUPTED = 130

#: The vassals the final error line names, at most.
MISSED_SHOWN = 10

#: Seconds between polls while a drained vassal is out of the router and not yet reloading
#: (see ``Rollout.watch_closely``); ``--check-interval`` otherwise.
CLOSE_WATCH_INTERVAL = 0.01


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
    except (ValueError, RecursionError):
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
    #: as the node subscribed; a fast-return subscribe repeats them (core/subscription.c)
    modifier1: int = 0
    modifier2: int = 0
    cores: int = 0
    load: int = 0
    weight: int = 0
    #: the fastrouter stats socket it was read from (``""``: the only one)
    router: str = ""

    @property
    def live(self) -> bool:
        return not self.death_mark


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _int_field(raw: Mapping[str, Any], field: str, what: str) -> int:
    """An integer field of a stats entry (0 when absent); a ``StatsError`` when it is not one."""
    value = raw.get(field, 0)
    try:
        if isinstance(value, (str, bytes)) or value is None:
            raise TypeError
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise StatsError(f"{what} has {field} {_shown(value)}, not a number") from None


_DICT = frozenset({dict})
_INT = frozenset({int})
_STR = frozenset({str})


def _objects(value: object, what: str) -> list[Mapping[str, Any]]:
    """``value`` if it is a list of objects; a ``StatsError`` saying what is wrong otherwise."""
    if not isinstance(value, list):
        raise StatsError(f"{what} is {_shown(value)}, not a list")
    if _DICT.issuperset(map(type, value)):
        return value  # what JSON gives, told in one pass in C
    for i, entry in enumerate(value):
        if not isinstance(entry, (dict, Mapping)):  # dict first: what JSON gives, no ABC check
            raise StatsError(f"{what}[{i}] is {_shown(entry)}, not an object")
    return value


def _text(raw: Mapping[str, Any], field: str, what: str, default: str | None = None) -> str:
    value = raw.get(field, default)
    if not isinstance(value, str) or (default is None and not value):
        raise StatsError(f"{what} has {field} {_shown(value)}, not a name")
    return value


def parse_emperor_stats(data: Mapping[str, Any]) -> dict[str, EmperorVassal]:
    """Vassals by id (the config file name, e.g. ``vassal_01.ini``).

    Anything but the shape an emperor's stats server writes is a ``StatsError``.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("vassals"), list):
        raise StatsError("emperor stats have no 'vassals' list (is it an emperor stats server?)")
    vassals = {}
    for i, raw in enumerate(_objects(data["vassals"], "emperor stats: vassals")):
        what = f"emperor stats: vassals[{i}]"
        vid = _text(raw, "id", what)
        what = f"emperor stats: vassal {vid}"
        vassal = EmperorVassal(
            id=vid,
            pid=_int_field(raw, "pid", what),
            respawns=_int_field(raw, "respawns", what),
            last_mod=_int_field(raw, "last_mod", what),
            accepting=bool(_int_field(raw, "accepting", what)),
            ready=bool(_int_field(raw, "ready", what)),
        )
        vassals[vassal.id] = vassal
    return vassals


def parse_fastrouter_stats(data: Mapping[str, Any], router: str = "") -> list[Node]:
    """Every node of every subscription key (tagged with ``router``).

    Anything but the shape a fastrouter's stats server writes is a ``StatsError``.
    """
    return list(NodeTable(parse_fastrouter_keys(data, router)))


def parse_fastrouter_keys(data: Mapping[str, Any], router: str = "") -> list[KeyNodes]:
    """``parse_fastrouter_stats`` with the same checks and errors, each key's nodes kept as the
    stats wrote them (``KeyNodes``): join them into a ``NodeTable``."""
    if not isinstance(data, Mapping) or not isinstance(data.get("subscriptions"), list):
        raise StatsError(
            "fastrouter stats have no 'subscriptions' list (is it a fastrouter stats server?)"
        )
    keys = []
    subscribed = _objects(data["subscriptions"], "fastrouter stats: subscriptions")
    for i, sub in enumerate(subscribed):
        key = _text(sub, "key", f"fastrouter stats: subscriptions[{i}]", default="")
        where = f"fastrouter stats: key {key!r}: nodes"
        keys.append(KeyNodes.checked(router, key, _objects(sub.get("nodes", []), where), where))
    return keys


#: The integer fields of a node the tool reads, in ``Node``'s order.
_NODE_NUMBERS = ("death_mark", "ref", "modifier1", "modifier2", "cores", "load", "weight")
_NAME = operator.itemgetter("name")
_NUMBER_FIELDS = tuple(operator.itemgetter(field) for field in _NODE_NUMBERS)
_DEATH_MARK = _NUMBER_FIELDS[0]
_NUMBERS = operator.itemgetter(*_NODE_NUMBERS)


def _node(raw: Mapping[str, Any], key: str, router: str, where: str, j: int) -> Node:
    """One node of ``key``, through the checks that say what is wrong with it."""
    name = _text(raw, "name", f"{where}[{j}]")
    what = f"{where}: {name}"
    numbers = [_int_field(raw, field, what) for field in _NODE_NUMBERS]
    death_mark, ref, modifier1, modifier2, cores, load, weight = numbers
    # positional, in Node's field order: keywords cost a third more per node
    return Node(key, name, bool(death_mark), ref, modifier1, modifier2, cores, load, weight, router)


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
# Which node is which vassal: the socket its master really listens on (/proc), or its name
# ---------------------------------------------------------------------------------------------

#: /proc/net/tcp{,6} state of a listening socket (include/net/tcp_states.h: TCP_LISTEN)
TCP_LISTEN = "0A"
#: /proc/net/unix flag of a listening socket (__SO_ACCEPTCON, include/linux/net.h)
UNIX_ACCEPTCON = 0x10000


def _host_port_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# a poll works each name out once (``_Spellings``), but ``node_addresses`` goes through every
# node name for each vassal bound on every address: a cache smaller than the fleet's node names
# would miss on every one of them, for each such vassal
@functools.lru_cache(maxsize=65536)
def canonical_address(name: str) -> str:
    """A node or socket address in one spelling: ``127.0.0.2:3121``, ``[::1]:3121``; a unix
    path (or anything that is not an IP and a port) as it is."""
    if not _is_host_port(name):
        return name
    host, port = _split_host_port(name)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return name
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return _host_port_text(ip.compressed, port)


def _proc_ip(hex_address: str) -> str:
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) byte order."""
    words = [int(hex_address[i : i + 8], 16) for i in range(0, len(hex_address), 8)]
    raw = b"".join(struct.pack("<I", word) for word in words)
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.compressed


def parse_proc_net_tcp(text: str) -> dict[int, str]:
    """Listening sockets of /proc/net/tcp or /proc/net/tcp6: inode -> ``host:port``."""
    found = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != TCP_LISTEN:
            continue
        hex_address, _, hex_port = fields[1].partition(":")
        try:
            found[int(fields[9])] = _host_port_text(_proc_ip(hex_address), int(hex_port, 16))
        except ValueError:
            continue
    return found


def parse_proc_net_unix(text: str) -> dict[int, str]:
    """Listening unix sockets with a name, of /proc/net/unix: inode -> path (``@name``: an
    abstract one)."""
    found = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            flags, inode = int(fields[3], 16), int(fields[6])
        except ValueError:
            continue
        if flags & UNIX_ACCEPTCON:
            found[inode] = fields[7]
    return found


def socket_inode(link: str) -> int | None:
    """The inode of an fd link that is a socket (``socket:[12345]``)."""
    if link.startswith("socket:[") and link.endswith("]") and link[8:-1].isdigit():
        return int(link[8:-1])
    return None


def listening_sockets(pid: int, proc: str = "/proc") -> tuple[str, ...]:
    """The addresses a process listens on, as node names spell them; ``()`` when its fds cannot
    be read (another user's process, or gone)."""
    fd_dir = os.path.join(proc, str(pid), "fd")
    inodes = set()
    try:
        for fd in os.listdir(fd_dir):
            try:
                inode = socket_inode(os.readlink(os.path.join(fd_dir, fd)))
            except OSError:
                continue  # closed meanwhile
            if inode is not None:
                inodes.add(inode)
    except OSError:
        return ()
    table: dict[int, str] = {}
    for name, parse in (("tcp", parse_proc_net_tcp), ("tcp6", parse_proc_net_tcp)):
        table.update(_read_table(os.path.join(proc, "net", name), parse))
    table.update(_read_table(os.path.join(proc, "net", "unix"), parse_proc_net_unix))
    return tuple(sorted({table[i] for i in inodes if i in table}))


def _read_table(path: str, parse: Callable[[str], dict[int, str]]) -> dict[int, str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse(f.read())
    except OSError:
        return {}


def is_local_host(host: str) -> bool:
    """An address of this machine: binding to it works (EADDRNOTAVAIL otherwise)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def _wildcard_port(address: str) -> tuple[int, int] | None:
    """(IP version, port) of a bind on every address (``0.0.0.0:P``: 4, ``[::]:P``: 6)."""
    if not _is_host_port(address):
        return None
    host, port = _split_host_port(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (ip.version, port) if ip.is_unspecified else None


def node_addresses(
    listening: Iterable[str], node_names: Iterable[str], is_local: Callable[[str], bool]
) -> frozenset[str]:
    """The node names a vassal listening on ``listening`` is announced as: each socket's own
    address, and for a bind on every address (``0.0.0.0``, ``::``) its port on each address of
    this machine that a node shows (another host's node on the same port is not ours; a vassal
    not in the router yet is found once it is, under an address its neighbours use)."""
    addresses = set()
    wildcards = set()
    for address in listening:
        wildcard = _wildcard_port(address)
        if wildcard is None:
            addresses.add(canonical_address(address))
        else:
            wildcards.add(wildcard)
    if not wildcards:
        return frozenset(addresses)
    hosts = set()
    for name in node_names:
        canonical = canonical_address(name)
        if _is_host_port(canonical):
            hosts.add(_split_host_port(canonical)[0])
    for host in sorted(hosts):
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            continue
        if not is_local(host):
            continue
        for wildcard_version, port in wildcards:
            # a [::] bind takes IPv4 too unless IPV6_V6ONLY (the Linux default is dual-stack)
            if wildcard_version == 6 or version == 4:
                addresses.add(_host_port_text(host, port))
    return frozenset(addresses)


def owns(name: str, addresses: frozenset[str], node_name: str) -> bool:
    """The node is the vassal's: its address is one the vassal listens on (``addresses``, from
    /proc), or, when those are not known, the node's socket is named after the vassal."""
    if addresses:
        return canonical_address(node_name) in addresses
    return node_vassal_name(node_name) == name


class _Positions:
    """The positions in a sequence of each key, found in one pass and kept in ints only: a list
    per key would add an object per node to every poll, and with them the garbage collector's
    passes over the whole heap."""

    def __init__(self, keys: Iterable[str]) -> None:
        #: key -> its last position; position -> the one before it with the same key, or -1
        self._last: dict[str, int] = {}
        self._before: list[int] = []
        for i, key in enumerate(keys):
            self._before.append(self._last.get(key, -1))
            self._last[key] = i

    def keys(self) -> Collection[str]:
        return self._last.keys()

    def get(self, key: str) -> list[int]:
        """``key``'s positions, in order."""
        found = []
        i = self._last.get(key, -1)
        while i >= 0:
            found.append(i)
            i = self._before[i]
        found.reverse()
        return found


class _Spellings:
    """Node names seen so far, under what ``owns`` matches them on: the address
    (``canonical_address``) and the vassal a node is named after (``node_vassal_name``). A
    fleet's node names are the same from poll to poll: each is worked out the first time it is
    seen, and a vassal's nodes are then looked up by name, not found by a look at every node."""

    #: names kept at most: past them, ``_learned`` starts a new one (an index keeps its own)
    LIMIT = 65536

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.by_address: dict[str, set[str]] = {}
        self.by_vassal_name: dict[str, set[str]] = {}

    def learn(self, names: Iterable[str]) -> None:
        for name in set(names) - self.seen:
            self.seen.add(name)
            self.by_address.setdefault(canonical_address(name), set()).add(name)
            self.by_vassal_name.setdefault(node_vassal_name(name), set()).add(name)

    def of_vassal(self, name: str, addresses: frozenset[str]) -> Collection[str]:
        """The names seen that ``owns`` gives the vassal."""
        if not addresses:
            return self.by_vassal_name.get(name, ())
        if len(addresses) == 1:
            return self.by_address.get(next(iter(addresses)), ())
        return {n for a in addresses for n in self.by_address.get(a, ())}


_spellings = _Spellings()


def _learned(names: Sequence[Collection[str]]) -> _Spellings:
    """The spellings of node names, every one of ``names`` among them (a set check in C per
    poll; a name is worked out once)."""
    global _spellings
    new = [part for part in names if not _spellings.seen.issuperset(part)]
    if new:
        if len(_spellings.seen) + sum(map(len, new)) > _Spellings.LIMIT:
            _spellings, new = _Spellings(), list(names)
        for part in new:
            _spellings.learn(part)
    return _spellings


class NodeIndex:
    """One snapshot's nodes by what ``owns`` matches them on: the nodes' names are indexed once
    (one pass over the nodes), and the names ``owns`` gives a vassal come from ``_Spellings``,
    so a vassal's nodes are a lookup, not a scan. The counts per key are taken once too, so that
    the other hosts' nodes are the total less this host's own. Built from one snapshot's nodes
    and never changed (``Snapshot.index``). ``NodeTable``: the same from the stats as read."""

    def __init__(self, nodes: Iterable[Node]) -> None:
        self._nodes = tuple(nodes)

    @property
    def nodes(self) -> tuple[Node, ...]:
        return self._nodes

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node: object) -> bool:
        return node in self.nodes

    def _at(self, i: int) -> Node:
        return self.nodes[i]

    @functools.cached_property
    def _by_name(self) -> _Positions:
        return _Positions(node.name for node in self.nodes)

    def _where(self, name: str) -> list[int]:
        """The positions of the nodes named ``name``, in order."""
        return self._by_name.get(name)

    def names(self) -> Collection[str]:
        """The nodes' names, each once."""
        return self._by_name.keys()

    def live_names(self) -> Collection[str]:
        """The names of the live nodes, each once."""
        return {node.name for node in self.nodes if node.live}

    @functools.cached_property
    def _spellings(self) -> _Spellings:
        return _learned([self._by_name.keys()])

    @functools.cached_property
    def _found(self) -> dict[tuple[str, frozenset[str]], list[int]]:
        """``_positions`` already asked for: a poll asks for each vassal's several times."""
        return {}

    def _positions(self, name: str, addresses: frozenset[str]) -> list[int]:
        found = self._found.get((name, addresses))
        if found is None:
            names = self._spellings.of_vassal(name, addresses)
            if len(names) == 1:
                found = self._where(next(iter(names)))
            else:
                found = sorted(i for n in names for i in self._where(n))
            self._found[name, addresses] = found
        return found

    def of_vassal(self, name: str, addresses: frozenset[str] = frozenset()) -> list[Node]:
        """The nodes ``owns`` gives the vassal, in the snapshot's order."""
        return [self._at(i) for i in self._positions(name, addresses)]

    def of_fleet(self, fleet: Iterable[VassalReload]) -> list[Node]:
        """The nodes that are a vassal's of ``fleet``, each once, in the snapshot's order."""
        positions: set[int] = set()
        for v in fleet:
            positions.update(self._positions(v.name, v.addresses))
        return [self._at(i) for i in sorted(positions)]

    @functools.cached_property
    def live_per_key(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            if node.live:
                counts[node.key] = counts.get(node.key, 0) + 1
        return counts

    @functools.cached_property
    def live_per_place(self) -> dict[tuple[str, str], int]:
        """Live nodes per (router, key)."""
        counts: dict[tuple[str, str], int] = {}
        for node in self.nodes:
            if node.live:
                place = (node.router, node.key)
                counts[place] = counts.get(place, 0) + 1
        return counts


def _indexed(nodes: Iterable[Node]) -> NodeIndex:
    """``nodes`` as an index: a snapshot's own (``Snapshot.index``) as it is."""
    return nodes if isinstance(nodes, NodeIndex) else NodeIndex(nodes)


class KeyNodes:
    """The nodes of one key in one router's stats, checked (``parse_fastrouter_keys``).

    What a fastrouter writes (each node under a name of its own, integers) is checked field by
    field over all the nodes at once, in C, and kept as read: a ``Node`` is made of a node only
    when it is asked for, so the other hosts' nodes, which a poll only counts, never are.
    Anything else is made into ``Node`` objects at once, through the checks that say what is
    wrong with it (``_node``)."""

    def __init__(
        self,
        router: str,
        key: str,
        raw: Sequence[Mapping[str, Any]],
        names: Sequence[str],
        marks: list[int],
        made: Sequence[Node] | None = None,
    ) -> None:
        self.router = router
        self.key = key
        self._raw = raw
        self.names = names
        #: every node, made at once (``None``: each when asked for, from ``raw``)
        self._made = made
        #: the first position of each name
        self.positions: dict[str, int] = {}
        if made is None:
            self.positions = dict(zip(names, range(len(names))))  # in C: names are unique
        else:
            for j, name in enumerate(names):
                self.positions.setdefault(name, j)
        #: each node's death_mark (0: live)
        self.marks = marks
        #: how many are live
        self.live = self.marks.count(0)
        #: no name is there twice (what a fastrouter writes)
        self.unique = len(self.positions) == len(names)

    @classmethod
    def checked(
        cls, router: str, key: str, raw: Sequence[Mapping[str, Any]], where: str
    ) -> KeyNodes:
        """The nodes ``raw`` (JSON objects) of ``key``, each taken as ``_node`` takes it."""
        try:
            names = list(map(_NAME, raw))
            marks = list(map(_DEATH_MARK, raw))
            plain = (
                _DICT.issuperset(map(type, raw))
                and _STR.issuperset(map(type, names))
                and "" not in names
                and _INT.issuperset(map(type, marks))
                and all(_INT.issuperset(map(type, map(f, raw))) for f in _NUMBER_FIELDS[1:])
            )
        except (KeyError, TypeError):  # a field left out, or an object that is no dict
            plain = False
        if plain:
            nodes = cls(router, key, raw, names, marks)
            if nodes.unique:
                return nodes
        made = [_node(n, key, router, where, j) for j, n in enumerate(raw)]
        marks = [int(not n.live) for n in made]
        return cls(router, key, raw, [n.name for n in made], marks, made)

    def __len__(self) -> int:
        return len(self.names)

    def node(self, j: int) -> Node:
        """The node at position ``j``."""
        if self._made is not None:
            return self._made[j]
        death_mark, ref, modifier1, modifier2, cores, load, weight = _NUMBERS(self._raw[j])
        name = self.names[j]
        # positional, in Node's field order: keywords cost a third more per node
        return Node(
            self.key,
            name,
            bool(death_mark),
            ref,
            modifier1,
            modifier2,
            cores,
            load,
            weight,
            self.router,
        )

    def where(self, name: str) -> list[int]:
        """The positions of the nodes named ``name``, in order."""
        if self._made is None:
            j = self.positions.get(name)
            return [] if j is None else [j]
        return [j for j, n in enumerate(self.names) if n == name]

    def live_names(self) -> Collection[str]:
        """The names of the live nodes."""
        if self.live == len(self.names) and self._made is None:
            return self.positions.keys()
        return _LiveNames(self)


class _LiveNames(Collection[str]):
    """The names of a key's live nodes, looked up rather than copied into a set."""

    def __init__(self, nodes: KeyNodes) -> None:
        self._nodes = nodes

    def __contains__(self, name: object) -> bool:
        marks = self._nodes.marks
        return isinstance(name, str) and any(marks[j] == 0 for j in self._nodes.where(name))

    def __iter__(self) -> Iterator[str]:
        live = itertools.compress(self._nodes.names, map(operator.not_, self._nodes.marks))
        return iter(dict.fromkeys(live))

    def __len__(self) -> int:
        return self._nodes.live if self._nodes.unique else len(dict.fromkeys(self))


class NodeTable(NodeIndex):
    """A snapshot's nodes as the routers' stats listed them (``KeyNodes``, in order): the index
    of ``NodeIndex`` without a ``Node`` per node. Per poll, the other hosts' nodes cost their
    checks and their counts, in C; a ``Node`` is made only of a node a vassal's lookup finds."""

    def __init__(self, keys: Iterable[KeyNodes]) -> None:
        self.keys = tuple(keys)
        #: the position of the first node of each of ``keys``, and the number of nodes last
        self._starts = list(itertools.accumulate((len(k) for k in self.keys), initial=0))
        self._made: dict[int, Node] = {}

    @functools.cached_property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(self._at(i) for i in range(len(self)))

    def __len__(self) -> int:
        return self._starts[-1]

    def _at(self, i: int) -> Node:
        node = self._made.get(i)
        if node is None:
            k = bisect.bisect_right(self._starts, i) - 1
            node = self._made[i] = self.keys[k].node(i - self._starts[k])
        return node

    def places(self, name: str) -> list[tuple[int, KeyNodes, int]]:
        """The nodes named ``name``: (position, their key's nodes, position among them)."""
        return [(s + j, k, j) for k, s in zip(self.keys, self._starts) for j in k.where(name)]

    def _where(self, name: str) -> list[int]:
        return [s + j for k, s in zip(self.keys, self._starts) for j in k.where(name)]

    @functools.cached_property
    def _spellings(self) -> _Spellings:
        return _learned([k.positions.keys() for k in self.keys])

    def names(self) -> Collection[str]:
        return _union([k.positions.keys() for k in self.keys])

    def live_names(self) -> Collection[str]:
        return _union([k.live_names() for k in self.keys])

    @functools.cached_property
    def live_per_key(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for k in self.keys:
            if k.live:
                counts[k.key] = counts.get(k.key, 0) + k.live
        return counts

    @functools.cached_property
    def live_per_place(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for k in self.keys:
            if k.live:
                counts[k.router, k.key] = counts.get((k.router, k.key), 0) + k.live
        return counts


class LiveNodes(NodeIndex):
    """The nodes of a ``NodeTable`` live in every one of ``routers`` (``Snapshot.live_nodes``):
    one per (key, name), the first the stats list live; worked out per key on the names, in C,
    and per vassal on its own nodes."""

    def __init__(self, table: NodeTable, routers: Iterable[str]) -> None:
        self._table = table
        wanted = tuple(routers)
        #: key -> router -> the names live there
        live: dict[str, dict[str, list[Collection[str]]]] = {}
        for k in table.keys:
            live.setdefault(k.key, {}).setdefault(k.router, []).append(k.live_names())
        #: key -> the names live under it in every router
        self._every: dict[str, Collection[str]] = {}
        for key, per_router in live.items():
            if wanted:
                names = [_union(per_router.get(r, [])) for r in wanted]
            else:  # no router named: any live node is (``set() <= anything``)
                names = [_union([n for part in per_router.values() for n in part])]
            every = names[0]
            for other in names[1:]:
                every = set(every).intersection(other)
            if every:
                self._every[key] = every

    def _live_here(self, k: KeyNodes, j: int, name: str) -> bool:
        return k.marks[j] == 0 and name in self._every.get(k.key, ())

    @functools.cached_property
    def nodes(self) -> tuple[Node, ...]:
        found: list[Node] = []
        seen: set[tuple[str, str]] = set()
        for i in range(len(self._table)):
            node = self._table._at(i)
            live = node.live and node.name in self._every.get(node.key, ())
            if live and (node.key, node.name) not in seen:
                seen.add((node.key, node.name))
                found.append(node)
        return tuple(found)

    def __len__(self) -> int:
        return sum(map(len, self._every.values()))

    def _at(self, i: int) -> Node:
        return self._table._at(i)

    def _where(self, name: str) -> list[int]:
        found, keys = [], set()
        for i, k, j in self._table.places(name):
            if k.key not in keys and self._live_here(k, j, name):
                keys.add(k.key)
                found.append(i)
        return found

    @functools.cached_property
    def _spellings(self) -> _Spellings:
        return self._table._spellings

    @functools.cached_property
    def live_per_key(self) -> dict[str, int]:
        return {key: len(names) for key, names in self._every.items()}


def _union(parts: Sequence[Collection[str]]) -> Collection[str]:
    if len(parts) == 1:
        return parts[0]
    return set().union(*parts)


# ---------------------------------------------------------------------------------------------
# The uwsgi protocol: subscription packets and the readiness probe
# ---------------------------------------------------------------------------------------------

#: modifier1 of a subscription packet; modifier2 is the command (core/subscription.c).
SUBSCRIPTION_MODIFIER1 = 224
_HEADER = struct.Struct("<BHB")
_LENGTH = struct.Struct("<H")


class Command(enum.IntEnum):
    SUBSCRIBE = 0
    UNSUBSCRIBE = 1


class PacketError(ValueError):
    """Bytes that are not a well-formed uwsgi packet."""


def _is_host_port(address: str) -> bool:
    _, sep, port = address.rpartition(":")
    return "/" not in address and bool(sep) and port.isdigit()


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def encode_vars(pairs: Iterable[tuple[str, str]]) -> bytes:
    """uwsgi vars: repeated [u16 LE length][key][u16 LE length][value]."""
    out = bytearray()
    for key, value in pairs:
        for part in (key.encode(), value.encode()):
            if len(part) > 0xFFFF:
                raise PacketError(f"a uwsgi var is longer than 65535 bytes: {part[:40]!r}...")
            out += _LENGTH.pack(len(part)) + part
    return bytes(out)


def decode_vars(body: bytes) -> list[tuple[str, str]]:
    pairs, pos = [], 0
    while pos < len(body):
        parts = []
        for _ in range(2):
            if pos + 2 > len(body):
                raise PacketError(f"uwsgi vars truncated at byte {pos}")
            (size,) = _LENGTH.unpack_from(body, pos)
            pos += 2
            if pos + size > len(body):
                raise PacketError(f"uwsgi var of {size} bytes truncated at byte {pos}")
            parts.append(body[pos : pos + size].decode("utf-8", "replace"))
            pos += size
        pairs.append((parts[0], parts[1]))
    return pairs


def encode_packet(modifier1: int, modifier2: int, body: bytes) -> bytes:
    """A uwsgi packet: [modifier1][u16 LE body size][modifier2] + body."""
    if len(body) > 0xFFFF:
        raise PacketError(f"a uwsgi packet body holds at most 65535 bytes, not {len(body)}")
    return _HEADER.pack(modifier1, len(body), modifier2) + body


def decode_packet(data: bytes) -> tuple[int, int, list[tuple[str, str]]]:
    """(modifier1, modifier2, vars) of one whole packet."""
    if len(data) < _HEADER.size:
        raise PacketError(f"a uwsgi packet has a 4-byte header, got {len(data)} bytes")
    modifier1, size, modifier2 = _HEADER.unpack_from(data)
    if len(data) - _HEADER.size != size:
        raise PacketError(f"header says {size} bytes of body, got {len(data) - _HEADER.size}")
    return modifier1, modifier2, decode_vars(data[_HEADER.size :])


@dataclasses.dataclass(frozen=True)
class Subscription:
    """One packet for the fastrouter's subscription server, about one node under one key."""

    command: Command
    node: Node

    def vars(self) -> list[tuple[str, str]]:
        pairs = [("key", self.node.key), ("address", self.node.name)]
        if self.command is Command.SUBSCRIBE:
            n = self.node
            # A weight of 0 reads as 1 in the router; send what it showed (core/subscription.c).
            pairs += [
                ("modifier1", str(n.modifier1)),
                ("modifier2", str(n.modifier2)),
                ("cores", str(n.cores)),
                ("load", str(n.load)),
                ("weight", str(max(n.weight, 1))),
            ]
        return pairs

    def packet(self) -> bytes:
        return encode_packet(SUBSCRIPTION_MODIFIER1, self.command, encode_vars(self.vars()))

    def describe(self) -> str:
        return f"{self.command.name.lower()} {self.node.name} from {self.node.key}"


def subscriptions(command: Command, nodes: Iterable[Node]) -> tuple[Subscription, ...]:
    """One packet per (key, node name): the caller sends each to every subscription server."""
    seen: dict[tuple[str, str], Node] = {}
    for n in nodes:
        seen.setdefault((n.key, n.name), n)
    return tuple(Subscription(command, n) for n in seen.values())


def send_datagram(address: str, data: bytes) -> None:
    """One datagram to a unix path, or over UDP to ``host:port``."""
    if _is_host_port(address):
        host, port = _split_host_port(address)
        with socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM
        ) as s:
            s.sendto(data, (host, port))
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(data, address)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    status: int | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 400


def probe_vars(path: str, key: str, node_name: str) -> list[tuple[str, str]]:
    """The CGI vars of ``GET path`` as nginx would pass them for Host ``key``."""
    path_info, _, query = path.partition("?")
    port = str(_split_host_port(node_name)[1]) if _is_host_port(node_name) else "80"
    return [
        ("REQUEST_METHOD", "GET"),
        ("REQUEST_URI", path),
        ("PATH_INFO", path_info),
        ("QUERY_STRING", query),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("SERVER_NAME", key),
        ("SERVER_PORT", port),
        ("HTTP_HOST", key),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("HTTP_USER_AGENT", f"uwsgi-reload/{__version__} probe"),
    ]


def probe_request(path: str, key: str, node_name: str) -> bytes:
    return encode_packet(0, 0, encode_vars(probe_vars(path, key, node_name)))


def parse_status_line(head: bytes) -> int:
    """The status code of an HTTP response's first line (``HTTP/1.1 200 OK``)."""
    line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("latin-1")
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        shown = line[:60] or "nothing"
        raise PacketError(f"not an HTTP status line: {shown!r}")
    return int(parts[1])


def probe_node(node_name: str, key: str, path: str, timeout: float) -> ProbeResult:
    """Send ``GET path`` over the uwsgi protocol straight to a vassal's socket; read the status."""
    head = b""
    try:
        with _connect(node_name, timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(probe_request(path, key, node_name))
            while b"\n" not in head and len(head) < 8192:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return ProbeResult(None, f"GET {path} to {node_name}: {reason}")
    try:
        status = parse_status_line(head)
    except PacketError as exc:
        return ProbeResult(None, f"GET {path} to {node_name}: {exc}")
    return ProbeResult(status, f"GET {path} to {node_name} answered {status}")


# ---------------------------------------------------------------------------------------------
# Decision logic: pure functions over parsed stats
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the emperor and the fastrouters said in one poll."""

    vassals: Mapping[str, EmperorVassal]
    #: the nodes of every router (``Node.router`` says which): a ``NodeTable`` as read
    nodes: Collection[Node]
    #: the fastrouters read; a node is live only when it is live in every one of them
    routers: tuple[str, ...] = ("",)
    #: the routers that could not be read this time, with why: nothing counts as live there
    unreadable: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def live_nodes(self) -> tuple[Node, ...]:
        """One node per (key, name) that is live in every router."""
        if self.unreadable:
            return ()
        if isinstance(self.nodes, NodeTable):
            return self.live_index.nodes
        live_in: dict[tuple[str, str], set[str]] = {}
        first: dict[tuple[str, str], Node] = {}
        for node in self.nodes:
            if node.live:
                live_in.setdefault((node.key, node.name), set()).add(node.router)
                first.setdefault((node.key, node.name), node)
        every = set(self.routers)
        return tuple(node for kn, node in first.items() if live_in[kn] >= every)

    @functools.cached_property
    def index(self) -> NodeIndex:
        """``nodes``, indexed (pass it where ``nodes`` goes)."""
        return _indexed(self.nodes)

    @functools.cached_property
    def live_index(self) -> NodeIndex:
        """``live_nodes``, indexed (pass it where ``live_nodes`` goes)."""
        if isinstance(self.nodes, NodeTable) and not self.unreadable:
            return LiveNodes(self.nodes, self.routers)
        return NodeIndex(self.live_nodes)


def live_keys(
    vassal: EmperorVassal | None,
    name: str,
    nodes: Iterable[Node],
    addresses: frozenset[str] = frozenset(),
) -> frozenset[str]:
    """The fastrouter keys under which this vassal is live; empty when it is not live.

    Live means the emperor says accepting and the vassal's node is subscribed with death_mark 0
    (pass ``Snapshot.live_index``: live in every router). ``addresses``: see ``owns``.
    """
    if vassal is None or not vassal.accepting:
        return frozenset()
    mine = _indexed(nodes).of_vassal(name, addresses)
    return frozenset(node.key for node in mine if node.live)


def _less(totals: Mapping[Place, int], mine: Iterable[Place]) -> dict[Place, int]:
    """``totals`` less one per place in ``mine``; places left with none are left out."""
    counts = dict(totals)
    for place in mine:
        counts[place] -= 1
    return {place: count for place, count in counts.items() if count}


def others_live(nodes: Iterable[Node], fleet: Iterable[VassalReload]) -> dict[str, int]:
    """Per key, the live nodes that are no vassal of ``fleet``: other hosts' (or vassals of this
    emperor this run does not reload). They count for the minimum and are never touched.

    Every live node less ``fleet``'s own: a lookup per vassal, not a scan of the other hosts'
    nodes per vassal (pass ``Snapshot.live_index``)."""
    index = _indexed(nodes)
    return _less(index.live_per_key, (n.key for n in index.of_fleet(fleet) if n.live))


def placements(
    vassal: EmperorVassal | None,
    name: str,
    nodes: Iterable[Node],
    addresses: frozenset[str] = frozenset(),
) -> frozenset[tuple[str, str]]:
    """The (router, key) pairs under which this vassal is live in that router (``live_keys`` per
    router): a vassal live in one router and not in another still counts in the first one."""
    if vassal is None or not vassal.accepting:
        return frozenset()
    mine = _indexed(nodes).of_vassal(name, addresses)
    return frozenset((node.router, node.key) for node in mine if node.live)


def others_placed(
    nodes: Iterable[Node], fleet: Iterable[VassalReload]
) -> dict[tuple[str, str], int]:
    """``others_live`` per (router, key): each router's own count (pass ``Snapshot.index``)."""
    index = _indexed(nodes)
    mine = ((n.router, n.key) for n in index.of_fleet(fleet) if n.live)
    return _less(index.live_per_place, mine)


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


class Stage(enum.Enum):
    """What one poll's stats show of a touched vassal (``reload_stage``): an observation of the
    emperor and the router, from which ``Rollout`` moves the vassal's ``Phase``."""

    TOUCHED = enum.auto()
    REGISTERED = enum.auto()
    ACCEPTING = enum.auto()
    BACK = enum.auto()


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


def touch_mtime(now: float, last_mod: int, current: float | None = None) -> int:
    """A whole-second mtime the emperor will see as newer: it compares ``st_mtime > last_mod``.

    ``current``: the config's own mtime. When someone else touched it in the same second and the
    emperor has not rescanned yet, ``last_mod`` is the old one and ``last_mod + 1`` may equal
    that pending mtime: the emperor would then register one reload, for the other touch, and
    ours would be lost. Past both, the reload it registers comes after our touch.
    """
    newest = last_mod if current is None else max(last_mod, int(current))
    return max(int(now), newest + 1)


#: The router of the (router, key) pairs that count nodes live in every router: no address
#: given on the command line can hold a NUL.
EVERY_ROUTER = "\0"

#: what the minimum is kept for: a fastrouter key, or a (router, key) pair
Place = TypeVar("Place", bound=Hashable)


def pick_reloads(
    candidates: Sequence[str],
    live: Mapping[str, frozenset[Place]],
    minimum: int,
    free_slots: int | None,
    others: Mapping[Place, int] | None = None,
) -> list[str]:
    """Which of ``candidates`` (in order) may start reloading now.

    ``live`` maps every vassal counted as live (in-flight and timed-out ones already left out) to
    its keys. A vassal that is not live costs nothing and may always go; a live one may go only if
    every key it serves keeps at least ``minimum`` live vassals without it. Not-live vassals go
    first. ``free_slots`` caps the number started (``None``: no cap). ``others``: per key, the
    live nodes that are not candidates' (other hosts'): they count for the minimum too. With
    several routers the keys are (router, key) pairs: each router keeps its minimum.
    """
    per_key: dict[Place, int] = dict(others or {})
    for keys in live.values():
        for key in keys:
            per_key[key] = per_key.get(key, 0) + 1
    ordered = [v for v in candidates if not live.get(v)] + [v for v in candidates if live.get(v)]
    picked: list[str] = []
    for vassal in ordered:
        if free_slots is not None and len(picked) >= free_slots:
            break
        places: frozenset[Place] = live.get(vassal, frozenset())
        if all(per_key[place] - 1 >= minimum for place in places):
            for place in places:
                per_key[place] -= 1
            picked.append(vassal)
    return picked


def rounds_needed(vassals: int, minimum: int) -> int:
    """Single-reload times a pipelined rollout needs at best: ceil(N / (N - m))."""
    return math.ceil(vassals / (vassals - minimum)) if vassals > minimum else 0


class Phase(enum.Enum):
    """Where one vassal is in the run: the one record of it, owned by ``Rollout``.

    DRAINING to SUBSCRIBING are in flight; BACK and the phases after it are final.
    """

    PENDING = enum.auto()
    #: unsubscribed from the router; touched once no request is in flight to it there
    DRAINING = enum.auto()
    #: touched; the emperor has not registered the reload yet
    RELOADING = enum.auto()
    #: registered (or restarted by the emperor): the new instance loads, not accepting yet
    STARTING = enum.auto()
    #: accepting; a probe is asked for but no node of it is known to probe yet
    ACCEPTING = enum.auto()
    #: accepting; the probe is out, its answer decides
    PROBING = enum.auto()
    #: accepting (its probe passed, if any): waiting for its node to be live in the router
    SUBSCRIBING = enum.auto()
    BACK = enum.auto()
    TIMED_OUT = enum.auto()
    PROBE_FAILED = enum.auto()
    TOUCH_FAILED = enum.auto()
    #: drained, but a router still had its node live at the drain timeout: that router never
    #: acted on the unsubscribe (UDP tells no error); not touched, and nothing more starts
    DRAIN_IGNORED = enum.auto()
    NOT_STARTED = enum.auto()
    #: still in flight when the run was given up (interrupted, stats unreadable)
    ABANDONED = enum.auto()


IN_FLIGHT = frozenset(
    {
        Phase.DRAINING,
        Phase.RELOADING,
        Phase.STARTING,
        Phase.ACCEPTING,
        Phase.PROBING,
        Phase.SUBSCRIBING,
    }
)
#: Phases in which a vassal counts as live when the stats show it live: untouched, or reloaded.
COUNTS_LIVE = frozenset(
    {Phase.PENDING, Phase.BACK, Phase.NOT_STARTED, Phase.TOUCH_FAILED, Phase.DRAIN_IGNORED}
)


class NotStarted(enum.Enum):
    """Why a vassal in ``Phase.NOT_STARTED`` was never touched."""

    UNKNOWN = enum.auto()  # the emperor does not run it
    MINIMUM = enum.auto()  # reloading it would take a key below the minimum
    STOPPED = enum.auto()  # a failed probe or touch stopped the rollout (``Rollout.stopped_by``)
    ABANDONED = enum.auto()  # the driver gave the run up (``Rollout.abandoned``)


class Outcome(str, enum.Enum):
    """A vassal's outcome as the ``--json`` report spells it (``outcome(phase)``)."""

    RELOADED = "reloaded"
    TIMED_OUT = "timed out"
    FAILED = "failed"
    NOT_STARTED = "not started"
    IN_FLIGHT = "in flight"


@dataclasses.dataclass
class VassalReload:
    """One vassal in the run: its ``phase``, and what the run saw of it on the way (data for the
    report, not state: decisions read ``phase``). Times are seconds since the run started."""

    id: str
    name: str
    config: str
    phase: Phase = Phase.PENDING
    #: the node names it is announced as, from the sockets its master listens on (``owns``);
    #: empty: a node is its when the node's socket is named after it
    addresses: frozenset[str] = frozenset()
    #: what /proc showed its master listening on when the run began (``locate``)
    listening: tuple[str, ...] = ()
    #: the emperor's view when the run first saw it; ``baseline`` when it started reloading
    initial: EmperorVassal | None = None
    baseline: EmperorVassal | None = None
    triggered: float | None = None
    #: first seen accepting after the emperor registered its reload (before the router has it)
    accepting: float | None = None
    back: float | None = None
    #: draining: when it was taken out of the router, how long until its ``ref`` reached 0
    drain_started: float | None = None
    drained: float | None = None
    #: requests still in flight when its drain timed out (``None``: it drained in time)
    drain_left: int | None = None
    #: the routers that still had it live at the drain timeout (``Phase.DRAIN_IGNORED``)
    ignored_by: tuple[str, ...] = ()
    #: its fastrouter nodes when it was picked: what the fast-return subscribe announces
    nodes: tuple[Node, ...] = ()
    #: the in-flight phase it was in when it timed out or the run was given up
    stalled_in: Phase | None = None
    not_started: NotStarted | None = None
    probe_result: ProbeResult | None = None
    touch_error: str = ""

    @property
    def duration(self) -> float | None:
        if self.triggered is None or self.back is None:
            return None
        return self.back - self.triggered

    def as_json(self, detail: str = "") -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "outcome": outcome(self.phase).value,
            "triggered": _round(self.triggered),
            "accepting": _round(self.accepting),
            "back": _round(self.back),
            "duration": _round(self.duration),
            "drain": _round(self.drained),
            "drain_timed_out": self.drain_left is not None,
            "drain_ignored_by": list(self.ignored_by),
            #: the node names it was found as, from /proc (empty: by its name)
            "addresses": sorted(self.addresses),
            "detail": detail,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class EventKind(enum.Enum):
    """What happened to a vassal in one step; its line is ``event_text``."""

    DRAINING = enum.auto()
    #: its master announced it again: unsubscribed again
    UNSUBSCRIBED_AGAIN = enum.auto()
    TRIGGERED = enum.auto()
    TRIGGERED_NOT_LIVE = enum.auto()
    TRIGGERED_DRAINED = enum.auto()
    #: its drain timed out: touched with requests still in flight to it
    TRIGGERED_UNDRAINED = enum.auto()
    #: the emperor restarted it (a new pid): waited for, not touched
    RESTARTED = enum.auto()
    PROBE = enum.auto()
    #: the fast return: subscribed as soon as it accepts (and its probe passed)
    SUBSCRIBED = enum.auto()
    BACK = enum.auto()
    TIMED_OUT = enum.auto()
    #: its probe failed (``Phase.PROBE_FAILED``) or its config could not be touched
    FAILED = enum.auto()
    NOT_STARTED = enum.auto()


#: Events whose vassal the caller touches.
TRIGGERS = frozenset(
    {
        EventKind.TRIGGERED,
        EventKind.TRIGGERED_NOT_LIVE,
        EventKind.TRIGGERED_DRAINED,
        EventKind.TRIGGERED_UNDRAINED,
    }
)


@dataclasses.dataclass(frozen=True)
class Event:
    at: float
    vassal: VassalReload
    kind: EventKind
    #: the vassal's phase when it happened
    phase: Phase
    #: packets the caller sends to the subscription server
    send: tuple[Subscription, ...] = ()
    #: the node the caller probes (``PROBE``), then hands the result to ``Rollout.probed``
    probe: Node | None = None
    #: the probe answer it follows from (``SUBSCRIBED``, ``FAILED``)
    result: ProbeResult | None = None
    #: ``RESTARTED``: the vassal's master pid before and after
    pids: tuple[int, int] | None = None

    @property
    def touches(self) -> bool:
        return self.kind in TRIGGERS


def _event(v: VassalReload, kind: EventKind, now: float, **details: Any) -> Event:
    return Event(now, v, kind, v.phase, **details)


def nodes_of(
    name: str, nodes: Iterable[Node], addresses: frozenset[str] = frozenset()
) -> list[Node]:
    """The fastrouter nodes of one vassal, live or not, under any key, in any router."""
    return _indexed(nodes).of_vassal(name, addresses)


def drain_done(
    name: str, nodes: Iterable[Node], addresses: frozenset[str] = frozenset()
) -> tuple[bool, int]:
    """(drained, requests in flight): drained when no node of the vassal is live and none has a
    request in flight, in any router. An unsubscribed node with ``ref`` 0 is removed at once,
    one with requests in flight only death-marked (plugins/corerouter/cr_common.c)."""
    mine = nodes_of(name, nodes, addresses)
    in_flight = sum(n.ref for n in mine)
    return not any(n.live for n in mine) and in_flight == 0, in_flight


class Rollout:
    """The whole run's state; ``step`` decides from one snapshot, with no I/O of its own.

    Each vassal's ``phase`` is moved here only: by ``step`` from what the stats show, and by the
    methods through which the caller reports what it did (``probed``, ``touch_failed``,
    ``abandon``).

    With ``subscriptions`` the caller can send packets to the fastrouter's subscription server:
    a live vassal is then drained (unsubscribed, and touched once the router has no request in
    flight to it, or after ``drain_timeout``) and subscribed again as soon as it accepts (the fast
    return). With ``probe`` a vassal counts as back only after the caller's probe of its socket
    passed; a failed probe stops the rollout.
    """

    def __init__(
        self,
        vassals: Sequence[VassalReload],
        minimum: int,
        timeout: float,
        max_parallel: int | None = None,
        *,
        subscriptions: bool = False,
        drain_timeout: float = 5.0,
        probe: bool = False,
    ) -> None:
        self.vassals = {v.id: v for v in vassals}
        self.minimum = minimum
        self.timeout = timeout
        self.max_parallel = max_parallel
        self.subscriptions = subscriptions
        self.drain_timeout = drain_timeout
        self.probe = probe
        self.lowest_live: dict[str, int] = {}
        #: the vassal whose failed probe or touch stopped the rollout: nothing more starts
        self.stopped_by: VassalReload | None = None
        #: why the caller gave the run up (``abandon``)
        self.abandoned: str | None = None
        #: the last snapshot stepped on: what a probe's answer is weighed against
        self._last: Snapshot | None = None
        #: per draining vassal, the routers seen without a live node of it since its unsubscribe
        self._acted: dict[str, set[str]] = {}

    def in_phase(self, *phases: Phase) -> list[VassalReload]:
        return [v for v in self.vassals.values() if v.phase in phases]

    def pending(self) -> list[VassalReload]:
        return self.in_phase(Phase.PENDING)

    def in_flight(self) -> list[VassalReload]:
        """Draining or reloading: started, not finished."""
        return self.in_phase(*IN_FLIGHT)

    def draining(self) -> list[VassalReload]:
        return self.in_phase(Phase.DRAINING)

    def watch_closely(self) -> bool:
        """A drained vassal is out of the router but its reload has not begun (draining, or
        touched and not yet registered by the emperor). Its master may re-announce it now, and a
        request the router sends it after the touch waits out the whole restart (or fails with a
        broken deploy): poll often so that a re-announce is undone at once. Once the reload has
        begun its master announces nothing until the new instance is up (core/master.c)."""
        return any(
            v.phase is Phase.DRAINING
            or (v.phase is Phase.RELOADING and v.drain_started is not None)
            for v in self.vassals.values()
        )

    @property
    def finished(self) -> bool:
        return not self.pending() and not self.in_flight()

    def _live(self, snapshot: Snapshot) -> dict[str, frozenset[tuple[str, str]]]:
        """Vassals counted as live, with the (router, key) pairs they are live under, and
        (``EVERY_ROUTER``, key) where live in every router: draining, in flight and failed ones
        never are."""
        live = {}
        for v in self.vassals.values():
            if v.phase in COUNTS_LIVE:
                current = snapshot.vassals.get(v.id)
                places = placements(current, v.name, snapshot.index, v.addresses)
                everywhere = live_keys(current, v.name, snapshot.live_index, v.addresses)
                places |= {(EVERY_ROUTER, key) for key in everywhere}
                if places:
                    live[v.id] = places
        return live

    def _observe(self, v: VassalReload, snapshot: Snapshot) -> Stage:
        assert v.baseline is not None
        current = snapshot.vassals.get(v.id)
        keys = live_keys(current, v.name, snapshot.live_index, v.addresses)
        return reload_stage(v.baseline, current, keys)

    def step(self, snapshot: Snapshot, now: float) -> list[Event]:
        """Record who is back or timed out, drain, then mark the vassals that may start now.

        The caller touches the config of every vassal in an event that ``touches`` (reporting a
        failure to ``touch_failed``), sends every event's ``send`` packets, and probes the node of
        every ``probe`` event, handing each answer to ``probed``. While a probe is out, nothing
        else is decided (its outcome may stop the rollout); the vassals in flight are still
        followed.
        """
        self._last = snapshot
        events = self._adopt_restarted(snapshot, now)
        probes = self._reloads(snapshot, now, events)
        if probes or self.in_phase(Phase.PROBING):
            return events + probes
        events += self._keep_out(snapshot, now)
        if snapshot.unreadable:
            # Nothing is live there: no drain is done, nothing may start, no count is known.
            return events
        for v in self.draining():
            events += self._drain(v, snapshot, now)
        # Each router keeps the minimum on its own, and so do the nodes live in every router
        # (what a client sees whichever router it reaches).
        live = self._live(snapshot)
        others = others_placed(snapshot.index, self.vassals.values())
        for key, count in others_live(snapshot.live_index, self.vassals.values()).items():
            others[EVERY_ROUTER, key] = count
        counts = dict(others)
        for places in live.values():
            for place in places:
                counts[place] = counts.get(place, 0) + 1
        keys = set(self.lowest_live) | {key for _, key in counts}
        for key in keys:
            count = counts.get((EVERY_ROUTER, key), 0)
            self.lowest_live[key] = min(self.lowest_live.get(key, count), count)
        if self.stopped_by is not None:
            events += self._stop(now)
            return events
        free = None if self.max_parallel is None else self.max_parallel - len(self.in_flight())
        candidates = [v.id for v in self.pending() if v.id in snapshot.vassals]
        for vassal_id in pick_reloads(candidates, live, self.minimum, free, others):
            v = self.vassals[vassal_id]
            v.baseline = snapshot.vassals[vassal_id]
            v.nodes = tuple(nodes_of(v.name, snapshot.index, v.addresses))
            # live in any router: a node live in one router only is drained from it too
            live_nodes = tuple(n for n in v.nodes if n.live)
            if self.subscriptions and v.baseline.accepting and live_nodes:
                v.drain_started, v.phase = now, Phase.DRAINING
                self._acted[v.id] = set()
                send = subscriptions(Command.UNSUBSCRIBE, live_nodes)
                events.append(_event(v, EventKind.DRAINING, now, send=send))
                continue
            v.triggered, v.phase = now, Phase.RELOADING
            kind = EventKind.TRIGGERED if vassal_id in live else EventKind.TRIGGERED_NOT_LIVE
            events.append(_event(v, kind, now))
        if not self.in_flight():
            # Nothing in flight and nothing may start: no live count can rise any more.
            for v in self.pending():
                v.phase = Phase.NOT_STARTED
                v.not_started = (
                    NotStarted.UNKNOWN if v.id not in snapshot.vassals else NotStarted.MINIMUM
                )
                events.append(_event(v, EventKind.NOT_STARTED, now))
        return events

    def _reloads(self, snapshot: Snapshot, now: float, events: list[Event]) -> list[Event]:
        """Advance every touched vassal; return the probes to run before deciding anything else."""
        probes = []
        for v in self.in_flight():
            if v.phase is Phase.DRAINING:
                continue
            assert v.triggered is not None
            stage = self._observe(v, snapshot)
            if v.accepting is None and stage in (Stage.ACCEPTING, Stage.BACK):
                v.accepting = now
            if v.phase is Phase.PROBING:
                continue  # its answer decides; the probe's own timeout bounds the wait
            if stage is Stage.TOUCHED:
                # Once the emperor registered the reload, a vassal never goes back to RELOADING:
                # one that dies while starting (a broken deploy) vanishes from the emperor's
                # stats until it is respawned, and is still a reload in flight, not the old
                # instance (core/emperor.c removes a dead vassal, then spawns it again).
                drained = self.subscriptions and v.drain_started is not None
                if v.phase is Phase.RELOADING and drained:
                    # The old instance re-announced itself before the emperor acted on the touch.
                    events += self._unsubscribe_again(v, snapshot, now)
            elif stage is Stage.REGISTERED:
                v.phase = Phase.STARTING
            elif self.probe and v.phase is not Phase.SUBSCRIBING:
                target = self._probe_target(v, snapshot)
                v.phase = Phase.ACCEPTING if target is None else Phase.PROBING
                if target is not None:
                    probes.append(_event(v, EventKind.PROBE, now, probe=target))
                    continue
            elif stage is Stage.ACCEPTING:
                if v.phase is not Phase.SUBSCRIBING:
                    v.phase = Phase.SUBSCRIBING
                    events += self._fast_return(v, now)
            else:
                events.append(self._back(v, now))
                continue
            if now - v.triggered >= self.timeout:
                v.stalled_in, v.phase = v.phase, Phase.TIMED_OUT
                back = self._put_back(v) if self._old_instance_serves(v, snapshot) else ()
                events.append(_event(v, EventKind.TIMED_OUT, now, send=back))
        return probes

    def _back(self, v: VassalReload, now: float) -> Event:
        v.back, v.phase = now, Phase.BACK
        return _event(v, EventKind.BACK, now)

    def _probe_target(self, v: VassalReload, snapshot: Snapshot) -> Node | None:
        """The node to probe: as it is in the router now, or as it was when the vassal was picked
        (the socket path is the same across a reload)."""
        mine = nodes_of(v.name, snapshot.index, v.addresses)
        known = sorted(mine or v.nodes, key=lambda n: (n.key, n.name))
        return known[0] if known else None

    def _fast_return(
        self, v: VassalReload, now: float, result: ProbeResult | None = None
    ) -> list[Event]:
        """Subscribe the reloaded vassal's nodes at once, not on its master's next announce."""
        if not self.subscriptions or not v.nodes:
            return []
        send = subscriptions(Command.SUBSCRIBE, v.nodes)
        return [_event(v, EventKind.SUBSCRIBED, now, send=send, result=result)]

    def probed(self, v: VassalReload, result: ProbeResult, now: float) -> list[Event]:
        """The answer to the probe a ``probe`` event asked for."""
        if v.phase is not Phase.PROBING:
            return []  # the run was given up meanwhile
        v.probe_result = result
        if result.ok:
            assert self._last is not None
            if self._observe(v, self._last) is Stage.BACK:
                return [self._back(v, now)]
            v.phase = Phase.SUBSCRIBING
            return self._fast_return(v, now, result)
        v.phase = Phase.PROBE_FAILED
        if self.stopped_by is None:
            self.stopped_by = v
        out = tuple(n for n in v.nodes if n.live) if self.subscriptions else ()
        send = subscriptions(Command.UNSUBSCRIBE, out)
        return [_event(v, EventKind.FAILED, now, send=send, result=result)]

    def touch_failed(self, v: VassalReload, error: str, now: float) -> list[Event]:
        """The caller could not touch the config of a vassal an event triggered: it stays as it
        was (subscribed again if it was drained), and nothing more starts (the next touch would
        most likely fail the same way)."""
        v.touch_error, v.phase = error, Phase.TOUCH_FAILED
        if self.stopped_by is None:
            self.stopped_by = v
        return [_event(v, EventKind.FAILED, now, send=self._put_back(v))]

    @staticmethod
    def _old_instance_serves(v: VassalReload, snapshot: Snapshot) -> bool:
        """The emperor never acted on the touch and the instance from before it still accepts:
        only then may a drained vassal go back into rotation on a timeout."""
        current = snapshot.vassals.get(v.id)
        return (
            v.stalled_in is Phase.RELOADING
            and v.baseline is not None
            and current is not None
            and current.accepting
            and not reload_registered(v.baseline, current)
        )

    def _put_back(self, v: VassalReload) -> tuple[Subscription, ...]:
        """Subscribe again a vassal this run drained whose old instance still serves."""
        if not self.subscriptions or v.drain_started is None:
            return ()
        return subscriptions(Command.SUBSCRIBE, (n for n in v.nodes if n.live))

    def _unsubscribe_again(
        self,
        v: VassalReload,
        snapshot: Snapshot,
        now: float,
        routers: set[str] | None = None,
    ) -> list[Event]:
        """Its master re-announces every subscribe-freq cycles (core/master.c), undoing our
        unsubscribe: send it again whenever its node shows up live (in ``routers`` only, when
        given)."""
        again = [
            n
            for n in nodes_of(v.name, snapshot.index, v.addresses)
            if n.live and (routers is None or n.router in routers)
        ]
        if not again:
            return []
        send = subscriptions(Command.UNSUBSCRIBE, again)
        return [_event(v, EventKind.UNSUBSCRIBED_AGAIN, now, send=send)]

    def _keep_out(self, snapshot: Snapshot, now: float) -> list[Event]:
        """A vassal whose probe failed stays out of rotation for as long as the run lasts."""
        events = []
        if self.subscriptions:
            for v in self.in_phase(Phase.PROBE_FAILED):
                events += self._unsubscribe_again(v, snapshot, now)
        return events

    def _drain(self, v: VassalReload, snapshot: Snapshot, now: float) -> list[Event]:
        """Touch once the router has no request in flight to the vassal, or at the deadline."""
        assert v.drain_started is not None and v.baseline is not None
        current = snapshot.vassals.get(v.id)
        if current is not None and current.pid != v.baseline.pid:
            # It died and the emperor is starting it with the current code: touching it would
            # reload it in the middle of its start. Wait for it like a reload in flight.
            v.drained, v.triggered, v.phase = now - v.drain_started, now, Phase.STARTING
            pids = (v.baseline.pid, current.pid)
            return [_event(v, EventKind.RESTARTED, now, pids=pids)]
        mine = nodes_of(v.name, snapshot.index, v.addresses)
        acted = self._acted.setdefault(v.id, set())
        live_in = {n.router for n in mine if n.live}
        acted.update(r for r in snapshot.routers if r not in live_in)
        drained, in_flight = drain_done(v.name, snapshot.index, v.addresses)
        took = now - v.drain_started
        if not drained and took >= self.drain_timeout:
            ignored = tuple(r for r in snapshot.routers if r in live_in and r not in acted)
            if ignored:
                return self._drain_ignored(v, ignored, now)
        # again only where it was out and came back (its master's announce): a router that
        # has not acted yet is not sent the same packet at every poll
        events = [] if drained else self._unsubscribe_again(v, snapshot, now, acted)
        if drained:
            kind = EventKind.TRIGGERED_DRAINED
        elif took >= self.drain_timeout:
            kind, v.drain_left = EventKind.TRIGGERED_UNDRAINED, in_flight
        else:
            return events
        v.drained = took
        v.baseline = snapshot.vassals.get(v.id, v.baseline)
        v.triggered, v.phase = now, Phase.RELOADING
        events.append(_event(v, kind, now))
        return events

    def _drain_ignored(self, v: VassalReload, routers: tuple[str, ...], now: float) -> list[Event]:
        """A router had the node live all along: it never acted on the unsubscribe (a
        subscription server of another router, or none at that address: UDP tells no error).
        Touching it would send requests into its restart; so it is not touched, it goes back
        where it was taken out, and nothing more starts (the next drain would go the same way).
        It still counts as live: the minimum holds as before."""
        v.drained, v.ignored_by, v.phase = (
            now - (v.drain_started or now),
            routers,
            Phase.DRAIN_IGNORED,
        )
        if self.stopped_by is None:
            self.stopped_by = v
        return [_event(v, EventKind.FAILED, now, send=self._put_back(v))]

    def _stop(self, now: float) -> list[Event]:
        """Nothing more starts: pending vassals are not started, drained ones go back untouched."""
        events = []
        for v in self.draining():
            v.phase, v.not_started = Phase.NOT_STARTED, NotStarted.STOPPED
            events.append(_event(v, EventKind.NOT_STARTED, now, send=self._put_back(v)))
        for v in self.pending():
            v.phase, v.not_started = Phase.NOT_STARTED, NotStarted.STOPPED
            events.append(_event(v, EventKind.NOT_STARTED, now))
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
                v.baseline, v.triggered, v.phase = v.initial, now, Phase.STARTING
                pids = (v.initial.pid, current.pid)
                events.append(_event(v, EventKind.RESTARTED, now, pids=pids))
        return events

    def abandon(self, reason: str) -> tuple[Subscription, ...]:
        """Give the run up: in-flight vassals stay in flight, pending ones are not started.

        Returns the packets that put draining (untouched) vassals back into rotation.
        """
        self.abandoned = reason
        back: list[Subscription] = []
        for v in self.in_flight():
            if v.phase is Phase.DRAINING:
                v.phase, v.not_started = Phase.NOT_STARTED, NotStarted.ABANDONED
                back += self._put_back(v)
            else:
                v.stalled_in, v.phase = v.phase, Phase.ABANDONED
        for v in self.pending():
            v.phase, v.not_started = Phase.NOT_STARTED, NotStarted.ABANDONED
        return tuple(back)


# ---------------------------------------------------------------------------------------------
# Display: the words for phases and events, derived from them (the core holds none)
# ---------------------------------------------------------------------------------------------

_OUTCOMES = {
    Phase.PENDING: Outcome.NOT_STARTED,
    Phase.BACK: Outcome.RELOADED,
    Phase.TIMED_OUT: Outcome.TIMED_OUT,
    Phase.PROBE_FAILED: Outcome.FAILED,
    Phase.TOUCH_FAILED: Outcome.FAILED,
    Phase.DRAIN_IGNORED: Outcome.FAILED,
    Phase.NOT_STARTED: Outcome.NOT_STARTED,
}


def outcome(phase: Phase) -> Outcome:
    """The report's outcome of a phase: anything still (or left) in flight is ``in flight``."""
    return _OUTCOMES.get(phase, Outcome.IN_FLIGHT)


#: How far an in-flight vassal got: what a timeout, or a run given up, reports.
HOW_FAR = {
    Phase.DRAINING: "draining: taken out of the fastrouter, not touched yet",
    Phase.RELOADING: "the emperor never registered the touch",
    Phase.STARTING: "reloading, but never accepting again (did the app fail to load? see its log)",
    Phase.ACCEPTING: "accepting, but its node never became live in the fastrouter",
    Phase.PROBING: "accepting, its probe not answered yet",
    Phase.SUBSCRIBING: "accepting, but its node never became live in the fastrouter",
}

#: When a re-announced node was unsubscribed again, by the vassal's phase.
_AGAIN = {
    Phase.DRAINING: "while draining",
    Phase.RELOADING: "before its reload",
    Phase.PROBE_FAILED: "after its failed probe",
}


def vassal_detail(v: VassalReload, rollout: Rollout) -> str:
    """Why a vassal did not come back (``""`` if it did)."""
    if v.phase in (Phase.TIMED_OUT, Phase.ABANDONED):
        assert v.stalled_in is not None
        return HOW_FAR[v.stalled_in]
    if v.phase is Phase.PROBE_FAILED:
        assert v.probe_result is not None
        detail = f"probe failed: {v.probe_result.detail}"
        if rollout.subscriptions and v.nodes:
            detail += "; left unsubscribed from the fastrouter until its master announces it again"
        return detail
    if v.phase is Phase.TOUCH_FAILED:
        return f"cannot touch: {v.touch_error}"
    if v.phase is Phase.DRAIN_IGNORED:
        return drain_ignored_text(v, rollout)
    if v.phase is not Phase.NOT_STARTED:
        return ""
    if v.not_started is NotStarted.UNKNOWN:
        return "not known to the emperor"
    if v.not_started is NotStarted.MINIMUM:
        return f"reloading it would leave fewer than {rollout.minimum} live"
    if v.not_started is NotStarted.STOPPED:
        assert rollout.stopped_by is not None
        failed = _STOPPED_BY.get(rollout.stopped_by.phase, "probe")
        reason = f"the {failed} of {rollout.stopped_by.name} failed"
    else:
        reason = str(rollout.abandoned)
    return reason if v.drain_started is None else f"{reason} (was draining, not touched)"


_STOPPED_BY = {Phase.TOUCH_FAILED: "touch", Phase.DRAIN_IGNORED: "drain"}


def _router_name(router: str) -> str:
    return f"fastrouter {router}" if router else "the fastrouter"


def drain_ignored_text(v: VassalReload, rollout: Rollout) -> str:
    routers = ", ".join(_router_name(r) for r in v.ignored_by)
    return (
        f"not drained: {routers} still had it live {rollout.drain_timeout:g}s after the "
        "unsubscribe (is --subscription-server that router's subscription server?); not touched"
    )


def drain_timeout_text(v: VassalReload, rollout: Rollout) -> str:
    return (
        f"drain timed out after {rollout.drain_timeout:g}s with {v.drain_left} requests in flight"
    )


def event_text(event: Event, rollout: Rollout) -> str:
    """The line an event prints after the vassal's name."""
    v, kind = event.vassal, event.kind
    keys = ", ".join(sorted({s.node.key for s in event.send}))
    if kind is EventKind.DRAINING:
        return f"draining: unsubscribed from {keys}"
    if kind is EventKind.UNSUBSCRIBED_AGAIN:
        return f"re-announced {_AGAIN[event.phase]}: unsubscribed again"
    if kind is EventKind.TRIGGERED:
        return "triggered"
    if kind is EventKind.TRIGGERED_NOT_LIVE:
        return "triggered (was not live)"
    if kind is EventKind.TRIGGERED_DRAINED:
        return f"triggered after draining {v.drained:.2f}s"
    if kind is EventKind.TRIGGERED_UNDRAINED:
        return f"triggered anyway: {drain_timeout_text(v, rollout)}"
    if kind is EventKind.RESTARTED:
        assert event.pids is not None
        where = "" if v.drain_started is None else " while draining"
        old, new = event.pids
        return f"restarted by the emperor{where} (pid {old} -> {new}): not touched"
    if kind is EventKind.PROBE:
        assert event.probe is not None
        return f"probing {event.probe.name}"
    if kind is EventKind.SUBSCRIBED:
        why = "accepting" if event.result is None else f"probe passed ({event.result.detail})"
        return f"{why}: subscribed to {keys}"
    if kind is EventKind.BACK:
        assert v.triggered is not None
        return f"back after {event.at - v.triggered:.2f}s"
    if kind is EventKind.TIMED_OUT:
        what = f"timed out after {rollout.timeout:g}s: {vassal_detail(v, rollout)}"
        return f"{what}; subscribed again" if event.send else what
    if kind is EventKind.FAILED:
        if event.phase in (Phase.TOUCH_FAILED, Phase.DRAIN_IGNORED):
            what = f"failed: {vassal_detail(v, rollout)}; nothing more starts"
            return f"{what}; subscribed again" if event.send else what
        assert event.result is not None
        what = f"failed: probe failed: {event.result.detail}; nothing more starts"
        return f"{what}; unsubscribed to keep it out of rotation" if event.send else what
    assert kind is EventKind.NOT_STARTED
    what = f"not started: {vassal_detail(v, rollout)}"
    return what if v.drain_started is None else f"{what}; subscribed again"


# ---------------------------------------------------------------------------------------------
# Surge: temporary twins that keep every key at full capacity while the originals reload
# ---------------------------------------------------------------------------------------------

#: The tool's record of the twins it made, in the emperor directory, written (atomically) before
#: any twin link exists: a run killed with SIGKILL leaves it, and the next run removes exactly the
#: links it lists. Not a name the emperor takes for a config (core/emperor.c
#: ``uwsgi_emperor_is_valid``: .ini .xml .yml .yaml .js .json).
SURGE_STATE = ".uwsgi-reload-surge"
#: A twin of ``shop.v2.ini`` is ``shop.v2.surge-1.ini``: uWSGI's ``%n`` cuts the name at its last
#: dot (core/uwsgi.c, the magic table), so its socket, log, pid and fifo are its own.
SURGE_MARK = ".surge-"


class TwinPhase(enum.Enum):
    """Where one twin is: the one record of it, owned by ``Surge``."""

    #: in the state file; its link is not made yet
    PLANNED = enum.auto()
    #: its link is made: the emperor spawns it; not live in the router yet
    STARTING = enum.auto()
    #: live in the router; the probe is out
    PROBING = enum.auto()
    LIVE = enum.auto()
    #: never came up in time, its probe failed, or its link could not be made: the run stops
    FAILED = enum.auto()
    #: unsubscribed from the router; its link goes once no request is in flight to it
    DRAINING = enum.auto()
    #: its link is removed; the emperor still lists it (its master is stopping)
    REMOVED = enum.auto()
    #: the emperor no longer lists it
    GONE = enum.auto()
    #: left in place: removing it would take a key below the minimum, its link is no longer the
    #: one the tool made, or the run was given up; the next run removes it
    KEPT = enum.auto()


#: Twins whose removal has not begun.
TWIN_UP = frozenset({TwinPhase.STARTING, TwinPhase.PROBING, TwinPhase.LIVE, TwinPhase.FAILED})


@dataclasses.dataclass
class Twin:
    """One temporary vassal: a new link to the config of an original (``of``)."""

    id: str
    name: str
    config: str
    #: what its link points to: the original's link target (or the original itself)
    target: str
    of: str
    phase: TwinPhase = TwinPhase.PLANNED
    #: found in the state file of an earlier run
    leftover: bool = False
    addresses: frozenset[str] = frozenset()
    added: float | None = None
    live: float | None = None
    removed: float | None = None
    gone: float | None = None
    drain_started: float | None = None
    drained: float | None = None
    nodes: tuple[Node, ...] = ()
    detail: str = ""
    #: the nodes it will be announced as: its original's, renamed after it (``twin_nodes``);
    #: subscribed by the tool as soon as it accepts, once its master is seen listening there
    announce: tuple[Node, ...] = ()
    #: when the tool subscribed it (the fast start), and whether its probe passed
    subscribed: float | None = None
    probe_passed: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "of": self.of,
            "subscribed": _round(self.subscribed),
            "leftover": self.leftover,
            "phase": self.phase.name.lower(),
            "added": _round(self.added),
            "live": _round(self.live),
            "drain": _round(self.drained),
            "removed": _round(self.removed),
            "gone": _round(self.gone),
            "detail": self.detail,
        }

    def state(self) -> dict[str, str]:
        return {"id": self.id, "target": self.target, "of": self.of}


class TwinEventKind(enum.Enum):
    #: the caller makes its link (``Surge.add_failed`` on an error)
    ADD = enum.auto()
    PROBE = enum.auto()
    #: the fast start: subscribed as soon as it accepts (and passed the probe)
    SUBSCRIBED = enum.auto()
    LIVE = enum.auto()
    FAILED = enum.auto()
    DRAINING = enum.auto()
    UNSUBSCRIBED_AGAIN = enum.auto()
    #: the caller removes its link (``Surge.remove_failed`` on an error)
    REMOVE = enum.auto()
    GONE = enum.auto()
    KEPT = enum.auto()


@dataclasses.dataclass(frozen=True)
class TwinEvent:
    at: float
    twin: Twin
    kind: TwinEventKind
    send: tuple[Subscription, ...] = ()
    probe: Node | None = None


def _twin_event(t: Twin, kind: TwinEventKind, now: float, **details: Any) -> TwinEvent:
    return TwinEvent(now, t, kind, **details)


class Surge:
    """The twins' state; ``up`` and ``down`` decide from one snapshot, with no I/O of their own.

    ``up`` adds every twin and follows it until it is live in the router (and passed the probe);
    one that is not within ``timeout`` fails the surge. ``down`` removes the twins, each only
    while every key it is live under keeps ``minimum`` live nodes without it: drained first (with
    ``subscriptions``), then its link removed, then gone once the emperor no longer lists it.
    """

    def __init__(
        self,
        twins: Sequence[Twin],
        minimum: int,
        timeout: float,
        *,
        subscriptions: bool = False,
        drain_timeout: float = 5.0,
        probe: bool = False,
    ) -> None:
        self.twins = list(twins)
        self.minimum = minimum
        self.timeout = timeout
        self.subscriptions = subscriptions
        self.drain_timeout = drain_timeout
        self.probe = probe
        #: when ``down`` first ran: the deadline of the whole removal
        self.removal_started: float | None = None
        self._last: Snapshot | None = None

    def in_phase(self, *phases: TwinPhase) -> list[Twin]:
        return [t for t in self.twins if t.phase in phases]

    @property
    def failed(self) -> list[Twin]:
        return self.in_phase(TwinPhase.FAILED)

    @property
    def up_done(self) -> bool:
        """Every twin live, or one failed (the run stops)."""
        if self.failed:
            return not self.in_phase(TwinPhase.PROBING)
        return all(t.phase is TwinPhase.LIVE for t in self.twins)

    @property
    def down_done(self) -> bool:
        return not self.in_phase(*TWIN_UP, TwinPhase.PLANNED, TwinPhase.DRAINING, TwinPhase.REMOVED)

    @property
    def left(self) -> list[Twin]:
        """The twins whose links may still be there (or whose masters still run)."""
        return self.in_phase(*TWIN_UP, TwinPhase.DRAINING, TwinPhase.REMOVED, TwinPhase.KEPT)

    def up(self, snapshot: Snapshot, now: float) -> list[TwinEvent]:
        self._last = snapshot
        events = []
        for t in self.twins:
            if t.phase is TwinPhase.PLANNED:
                t.added, t.phase = now, TwinPhase.STARTING
                events.append(_twin_event(t, TwinEventKind.ADD, now))
            elif t.phase is TwinPhase.STARTING:
                current = snapshot.vassals.get(t.id)
                if live_keys(current, t.name, snapshot.live_index, t.addresses):
                    mine = nodes_of(t.name, snapshot.live_index, t.addresses)
                    if self.probe and not t.probe_passed:
                        t.phase = TwinPhase.PROBING
                        target = sorted(mine, key=lambda n: (n.key, n.name))[0]
                        events.append(_twin_event(t, TwinEventKind.PROBE, now, probe=target))
                    else:
                        t.live, t.phase = now, TwinPhase.LIVE
                        events.append(_twin_event(t, TwinEventKind.LIVE, now))
                elif self._may_start(t, current):
                    # Its master announces itself only once its accepting hook ran (and, when
                    # that hook had to retry, subscribe-freq cycles later: core/master.c).
                    if self.probe and not t.probe_passed:
                        t.phase = TwinPhase.PROBING
                        target = t.announce[0]
                        events.append(_twin_event(t, TwinEventKind.PROBE, now, probe=target))
                    else:
                        events.append(self._subscribe(t, now))
                elif t.added is not None and now - t.added >= self.timeout:
                    if current is None:
                        how = "the emperor never ran it (or it keeps dying: see its log)"
                    elif not current.accepting:
                        how = "never accepting (did the app fail to load? see its log)"
                    else:
                        how = "accepting, but its node never became live in the fastrouter"
                    events.append(self._fail(t, f"not live after {self.timeout:g}s: {how}", now))
        return events

    def _may_start(self, t: Twin, current: EmperorVassal | None) -> bool:
        """The fast start: the tool can subscribe the twin itself (it has the subscription
        server, the twin accepts, its master listens where its nodes will be) and has not yet."""
        return (
            self.subscriptions
            and t.subscribed is None
            and bool(t.announce)
            and bool(t.addresses)
            and current is not None
            and current.accepting
        )

    def _subscribe(self, t: Twin, now: float) -> TwinEvent:
        t.subscribed = now
        send = subscriptions(Command.SUBSCRIBE, t.announce)
        return _twin_event(t, TwinEventKind.SUBSCRIBED, now, send=send)

    def _fail(self, t: Twin, detail: str, now: float) -> TwinEvent:
        t.detail, t.phase = detail, TwinPhase.FAILED
        return _twin_event(t, TwinEventKind.FAILED, now)

    def fail(self, t: Twin, detail: str, now: float) -> list[TwinEvent]:
        """The caller gave the twin up (stats unreadable for the whole timeout)."""
        return [self._fail(t, detail, now)]

    def probed(self, t: Twin, result: ProbeResult, now: float) -> list[TwinEvent]:
        if t.phase is not TwinPhase.PROBING:
            return []
        if not result.ok:
            return [self._fail(t, f"probe failed: {result.detail}", now)]
        t.probe_passed = True
        last = self._last
        if last is not None and self._keys(t, last):
            t.live, t.phase = now, TwinPhase.LIVE
            return [_twin_event(t, TwinEventKind.LIVE, now)]
        t.phase = TwinPhase.STARTING
        return [self._subscribe(t, now)] if self.subscriptions and t.subscribed is None else []

    def add_failed(self, t: Twin, error: str, now: float) -> list[TwinEvent]:
        """Its link could not be made: there is nothing to remove."""
        event = self._fail(t, f"cannot make its link: {error}", now)
        t.phase = TwinPhase.GONE
        return [event]

    def remove_failed(self, t: Twin, error: str, now: float) -> list[TwinEvent]:
        t.detail, t.phase = f"not removed: {error}", TwinPhase.KEPT
        return [_twin_event(t, TwinEventKind.KEPT, now)]

    def _keys(self, t: Twin, snapshot: Snapshot) -> frozenset[str]:
        return live_keys(snapshot.vassals.get(t.id), t.name, snapshot.live_index, t.addresses)

    def down(self, snapshot: Snapshot, now: float) -> list[TwinEvent]:
        """Drain and remove every twin that may go now; follow the removed ones until gone."""
        self._last = snapshot
        if self.removal_started is None:
            self.removal_started = now
        overdue = now - self.removal_started >= self.timeout
        events: list[TwinEvent] = []
        for t in self.in_phase(TwinPhase.PLANNED):
            t.phase = TwinPhase.GONE  # never made
        for t in self.in_phase(TwinPhase.REMOVED):
            if t.id not in snapshot.vassals:
                t.gone, t.phase = now, TwinPhase.GONE
                events.append(_twin_event(t, TwinEventKind.GONE, now))
            elif overdue:
                t.detail = f"link removed, but the emperor still lists it after {self.timeout:g}s"
                t.phase = TwinPhase.KEPT
                events.append(_twin_event(t, TwinEventKind.KEPT, now))
        for t in self.in_phase(TwinPhase.DRAINING):
            events += self._drain(t, snapshot, now)
        if snapshot.unreadable:
            return events
        # Per key, the live nodes of everything but the twins on their way out.
        leaving = self.in_phase(TwinPhase.DRAINING, TwinPhase.REMOVED)
        index = snapshot.live_index
        # one node per (key, name) there: a node of two leaving twins is left out once
        out = {(n.key, n.name) for t in leaving for n in index.of_vassal(t.name, t.addresses)}
        counts = _less(index.live_per_key, (key for key, _ in out))
        for t in self.in_phase(*TWIN_UP):
            keys = self._keys(t, snapshot)
            if not all(counts.get(k, 0) - 1 >= self.minimum for k in keys):
                if overdue:
                    t.detail = (
                        f"removing it would leave fewer than {self.minimum} live; the next "
                        "run removes it"
                    )
                    t.phase = TwinPhase.KEPT
                    events.append(_twin_event(t, TwinEventKind.KEPT, now))
                continue
            for k in keys:
                counts[k] -= 1
            t.nodes = tuple(nodes_of(t.name, snapshot.index, t.addresses))
            live_nodes = tuple(n for n in t.nodes if n.live)
            if self.subscriptions and live_nodes:
                t.drain_started, t.phase = now, TwinPhase.DRAINING
                send = subscriptions(Command.UNSUBSCRIBE, live_nodes)
                events.append(_twin_event(t, TwinEventKind.DRAINING, now, send=send))
            else:
                events.append(self._remove(t, now))
        return events

    def _remove(self, t: Twin, now: float) -> TwinEvent:
        t.removed, t.phase = now, TwinPhase.REMOVED
        return _twin_event(t, TwinEventKind.REMOVE, now)

    def _drain(self, t: Twin, snapshot: Snapshot, now: float) -> list[TwinEvent]:
        assert t.drain_started is not None
        drained, _ = drain_done(t.name, snapshot.index, t.addresses)
        took = now - t.drain_started
        if drained or took >= self.drain_timeout:
            t.drained = took
            return [self._remove(t, now)]
        # its master re-announces every subscribe-freq cycles (core/master.c)
        again = [n for n in nodes_of(t.name, snapshot.index, t.addresses) if n.live]
        if not again:
            return []
        send = subscriptions(Command.UNSUBSCRIBE, again)
        return [_twin_event(t, TwinEventKind.UNSUBSCRIBED_AGAIN, now, send=send)]

    def give_up(self, reason: str, now: float) -> list[TwinEvent]:
        """Stop removing: what is left stays for the next run (the state file keeps it)."""
        events = []
        for t in self.in_phase(*TWIN_UP, TwinPhase.DRAINING):
            t.detail, t.phase = reason, TwinPhase.KEPT
            events.append(_twin_event(t, TwinEventKind.KEPT, now))
        return events

    def watch_closely(self) -> bool:
        """A drained twin may be re-announced by its master: poll often (``CLOSE_WATCH_INTERVAL``
        while one drains)."""
        return bool(self.in_phase(TwinPhase.DRAINING))

    def located(self, t: Twin, addresses: frozenset[str]) -> None:
        """The node names the twin's master listens on (found in /proc by the caller)."""
        t.addresses = addresses

    def listening(self, t: Twin, sockets: Iterable[str]) -> None:
        """What the twin's master listens on (/proc): where it announces itself, when that is
        where its original's nodes, renamed after it, say (``Twin.announce``)."""
        found = {canonical_address(a) for a in sockets}
        if t.announce and all(canonical_address(n.name) in found for n in t.announce):
            t.addresses = frozenset(canonical_address(n.name) for n in t.announce)


def twin_event_text(event: TwinEvent) -> str:
    t, kind = event.twin, event.kind
    keys = ", ".join(sorted({s.node.key for s in event.send}))
    of = f"twin of {strip_suffix(t.of, os.path.splitext(t.of)[1])}"
    if kind is TwinEventKind.ADD:
        return f"added ({of})"
    if kind is TwinEventKind.PROBE:
        assert event.probe is not None
        return f"probing {event.probe.name}"
    if kind is TwinEventKind.SUBSCRIBED:
        return f"accepting: subscribed to {keys}"
    if kind is TwinEventKind.LIVE:
        assert t.added is not None
        return f"live after {event.at - t.added:.2f}s"
    if kind is TwinEventKind.FAILED:
        return f"failed: {t.detail}"
    if kind is TwinEventKind.DRAINING:
        return f"draining: unsubscribed from {keys}"
    if kind is TwinEventKind.UNSUBSCRIBED_AGAIN:
        return "re-announced while draining: unsubscribed again"
    if kind is TwinEventKind.REMOVE:
        drained = "" if t.drained is None else f" after draining {t.drained:.2f}s"
        return f"link removed{drained}"
    if kind is TwinEventKind.GONE:
        return "gone"
    return f"left in place: {t.detail}"


def _all_digits(stem: str) -> bool:
    return stem.isdigit() and 0 < int(stem) < 65536


def plan_twins(
    fleet: Sequence[VassalReload],
    snapshot: Snapshot,
    surge: int,
    suffix: str,
    taken: Iterable[str],
    target_of: Callable[[str], str],
    port_free: Callable[[int, str], bool],
) -> list[Twin]:
    """``surge`` twins per fastrouter key, each a twin of a live original of that key (in turn).

    A name-based original ``S<suffix>`` gets ``S.surge-<i><suffix>``; an original named after its
    port (all digits: ``socket = ADDRESS:%n``) gets a free port (``port_free(port, host)``, none
    of ``taken``). ``taken``: every file name in the emperor directory.
    """
    names = set(taken)
    live = {
        v.id: live_keys(snapshot.vassals.get(v.id), v.name, snapshot.live_index, v.addresses)
        for v in fleet
    }
    keys = sorted({k for ks in live.values() for k in ks})
    twins: list[Twin] = []
    covered: dict[str, int] = {}
    for key in keys:
        serving = [v for v in fleet if key in live[v.id]]
        i = 0
        while covered.get(key, 0) < surge:
            v = serving[i % len(serving)]
            i += 1
            name = _twin_name(v, suffix, names, port_free)
            if name is None:
                raise ReloadError(
                    f"--max-surge {surge}: no free port for a twin of {v.id} (its name is its port)"
                )
            names.add(name + suffix)
            mine = nodes_of(v.name, snapshot.live_index, v.addresses)
            twins.append(
                Twin(
                    id=name + suffix,
                    name=name,
                    config=os.path.join(os.path.dirname(v.config), name + suffix),
                    target=target_of(v.config),
                    of=v.id,
                    announce=twin_nodes(v.name, name, mine),
                )
            )
            for k in live[v.id]:
                covered[k] = covered.get(k, 0) + 1
    return twins


def twin_nodes(original: str, twin: str, nodes: Iterable[Node]) -> tuple[Node, ...]:
    """The original's nodes renamed after its twin: ``/run/a.sock`` -> ``/run/a.surge-1.sock``,
    ``10.0.0.2:8001`` -> ``10.0.0.2:8005`` (what ``%n`` makes of the twin's name); none when a
    node's name does not carry the original's."""
    renamed = []
    for n in nodes:
        if _is_host_port(n.name):
            host, port = _split_host_port(n.name)
            if str(port) != original or not twin.isdigit():
                return ()
            name = _host_port_text(host, int(twin))
        else:
            head, _, base = n.name.rpartition("/")
            if node_vassal_name(n.name) != original:
                return ()
            name = f"{head}/{twin}{base[len(original) :]}" if head else twin + base[len(original) :]
        renamed.append(dataclasses.replace(n, name=name, death_mark=False, ref=0, router=""))
    return tuple(renamed)


def _twin_name(
    v: VassalReload, suffix: str, taken: set[str], port_free: Callable[[int, str], bool]
) -> str | None:
    if _all_digits(v.name):
        host = _split_host_port(v.listening[0])[0] if v.listening else ""
        stems = [n[: -len(suffix)] for n in taken if n.endswith(suffix)]
        ports = [int(s) for s in stems if _all_digits(s)] + [int(v.name)]
        for port in range(max(ports) + 1, 65536):
            if f"{port}{suffix}" not in taken and port_free(port, host):
                return str(port)
        return None
    i = 1
    while f"{v.name}{SURGE_MARK}{i}{suffix}" in taken:
        i += 1
    return f"{v.name}{SURGE_MARK}{i}"


# ---------------------------------------------------------------------------------------------
# The edges: configs, checks before touching anything, the lock, touching
# ---------------------------------------------------------------------------------------------


def find_configs(emperor_path: str, suffix: str) -> list[str]:
    """The vassal configs the emperor watches, as paths (links are not followed)."""
    if not os.path.exists(emperor_path):
        raise ReloadError(f"emperor path {emperor_path} does not exist")
    if not os.path.isdir(emperor_path):
        raise ReloadError(f"emperor path {emperor_path} is not a directory")
    try:
        with os.scandir(emperor_path) as entries:
            configs = sorted(
                os.path.join(emperor_path, entry.name)
                for entry in entries
                if entry.name.endswith(suffix) and not entry.is_dir()
            )
    except OSError as exc:
        raise ReloadError(
            f"cannot read emperor path {emperor_path}: {exc.strerror or exc}"
        ) from None
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


def check_fleet(
    fleet: Sequence[VassalReload],
    snapshot: Snapshot,
    minimum: int,
    surge: int = 0,
    twins: Sequence[Twin] = (),
) -> None:
    """Refuse, before touching anything, a run that cannot keep its promises. ``surge``: the
    twins per key that will be live before the first reload (they count for the minimum);
    ``twins``: those an earlier run left (their nodes are known, not strays)."""
    known = [v for v in fleet if v.id in snapshot.vassals]
    if not known:
        ids = ", ".join(sorted(snapshot.vassals)) or "none"
        raise ReloadError(f"the emperor runs none of the configs found (its vassals: {ids})")
    others = others_live(snapshot.live_index, fleet)
    most_others = max(others.values(), default=0)
    if minimum >= len(known) + most_others + surge:
        elsewhere = f" and the router has {most_others} other live nodes" if most_others else ""
        added = f", with {surge} twins per key from --max-surge," if surge else ""
        raise ReloadError(
            f"--minimum-active-vassals {minimum} leaves nothing to reload: the emperor runs "
            f"{len(known)} vassals{elsewhere}{added} and at least {minimum} must stay live"
        )
    live = {
        v.id: live_keys(snapshot.vassals[v.id], v.name, snapshot.live_index, v.addresses)
        for v in known
    }
    # whether a node is a vassal's (or a twin's) depends on its name only (``owns``)
    mine = {n.name for n in snapshot.index.of_fleet(fleet)}
    stray = sorted(
        name
        for name in set(snapshot.index.live_names()).difference(mine)
        if not any(owns(t.name, t.addresses, name) for t in twins)
    )
    unmatched = [
        v
        for v in known
        if snapshot.vassals[v.id].accepting and not nodes_of(v.name, snapshot.index, v.addresses)
    ]
    if stray and unmatched:
        v = unmatched[0]
        where = f"listens on {', '.join(v.listening)}" if v.listening else "has no socket in /proc"
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        shown = ", ".join(stray[:3]) + (f" and {len(stray) - 3} more" if len(stray) > 3 else "")
        raise ReloadError(
            f"cannot tell which fastrouter node is which vassal: {v.id}{more} accepts but matches "
            f"no node (its master {where}, and no node is named after it); nodes {shown} match "
            "no vassal of this emperor (each vassal's node must be the address its master "
            "listens on, or a socket named after its config, e.g. socket = /run/uwsgi/%n.sock)"
        )
    not_live = sum(1 for keys in live.values() if not keys)
    per_key: dict[str, int] = {}
    for keys in live.values():
        for key in keys:
            per_key[key] = per_key.get(key, 0) + 1
    for key, count in sorted(per_key.items()):
        if count + others.get(key, 0) + not_live + surge <= minimum:
            elsewhere = f" and {others[key]} other live nodes" if others.get(key) else ""
            if surge:
                elsewhere += f" and {surge} twins from --max-surge"
            raise ReloadError(
                f"fastrouter key {key!r} has {count} live vassals{elsewhere}: with "
                f"--minimum-active-vassals {minimum} none of them could be reloaded"
            )
    for v in known:
        if emperor_follows_link(v.config, snapshot.vassals[v.id]):
            raise ReloadError(
                f"the emperor follows the symlink {v.config}, so touching the link would not "
                "reload it: run the emperor with --emperor-nofollow"
            )


#: Reads of the emperor's stats, this far apart, before a link whose mtime the emperor has not
#: taken counts as followed (it may be a touch the emperor has not rescanned yet).
FOLLOW_RECHECKS = 10
FOLLOW_RECHECK_INTERVAL = 0.1


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
    """Set the mtime of the config itself: a link is touched, never its target. The mtime also
    moves past the config's current one (``touch_mtime``): a touch pending in the same second."""
    mtime = max(mtime, int(os.lstat(config).st_mtime) + 1)
    os.utime(config, ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)


def link_target(config: str) -> str:
    """What a twin of ``config`` links to: the config's own link target, or the config itself."""
    return os.readlink(config) if os.path.islink(config) else os.path.abspath(config)


def make_twin_link(target: str, config: str) -> None:
    """A new link; never replaces a file that is there (``FileExistsError``)."""
    os.symlink(target, config)


def remove_twin_link(config: str, target: str) -> None:
    """Remove a twin's link, only if it is still the link the tool made (already gone: fine)."""
    try:
        current = os.readlink(config)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OSError(f"{config} is no longer a link uwsgi-reload made ({exc.strerror})") from None
    if current != target:
        raise OSError(f"{config} now points to {current}, not to {target}: not the tool's link")
    os.unlink(config)


def port_free(port: int, host: str) -> bool:
    """Nothing listens on ``port`` (at ``host``, or any address): binding it works."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host or "0.0.0.0", port))
    except OSError:
        return False
    return True


def write_surge_state(emperor_path: str, twins: Sequence[Twin]) -> None:
    """Record the twins (atomically: a new file renamed over the old one); none: remove it.

    Written before any twin link is made, so a run killed at any moment leaves every link it
    made listed; the next run removes exactly those (``read_surge_state``)."""
    path = os.path.join(emperor_path, SURGE_STATE)
    if not twins:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    data = {"version": 1, "pid": os.getpid(), "twins": [t.state() for t in twins]}
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(emperor_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_surge_state(emperor_path: str, suffix: str) -> list[Twin]:
    """The twins an earlier run left (killed, or stopped before it could remove them): those whose
    link is still the one it made (to be drained and removed), or whose link is gone (to be
    waited for until the emperor drops them). A link someone else changed is not the tool's."""
    path = os.path.join(emperor_path, SURGE_STATE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ReloadError(f"cannot read the surge state {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        raw = f.read()
    bad = ReloadError(
        f"the surge state {path} is not one uwsgi-reload writes: check the links it lists "
        "and remove it"
    )
    try:
        entries = json.loads(raw)["twins"]
        records = [(e["id"], e["target"], e["of"]) for e in entries]
    except (ValueError, TypeError, KeyError):
        raise bad from None
    twins = []
    for vid, target, of in records:
        if not all(isinstance(x, str) and x for x in (vid, target, of)):
            raise bad
        if "/" in vid or vid in (".", "..") or vid == SURGE_STATE:
            raise bad
        config = os.path.join(emperor_path, vid)
        twin = Twin(id=vid, name=strip_suffix(vid, suffix), config=config, target=target, of=of)
        twin.leftover = True
        try:
            ours = os.readlink(config) == target
        except FileNotFoundError:
            twin.phase = TwinPhase.REMOVED  # removed; its master may still be stopping
        except OSError:
            continue  # not a link: not the tool's
        else:
            if not ours:
                continue
            twin.phase = TwinPhase.STARTING
        twins.append(twin)
    return twins


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
    try:
        fd = os.open(emperor_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ReloadError(
            f"cannot lock emperor path {emperor_path}: {exc.strerror or exc}"
        ) from None
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

    def event(self, event: Event, text: str) -> None:
        self.line(f"{event.at:8.2f}s  {event.vassal.name}: {text}")

    def error(self, text: str) -> None:
        print(f"uwsgi-reload: error: {' '.join(text.split())}", file=self.errors, flush=True)

    def warning(self, text: str) -> None:
        print(f"uwsgi-reload: warning: {' '.join(text.split())}", file=self.errors, flush=True)


@dataclasses.dataclass
class Options:
    emperor_path: str
    #: one address, or several (``--fastrouter-stats-socket`` given more than once)
    fastrouter_stats_socket: str | Sequence[str]
    emperor_stats_socket: str
    vassal_config_file_suffix: str = ".ini"
    minimum_active_vassals: int = 1
    timeout: float = 60.0
    check_interval: float = 0.1
    quiet: bool = False
    dry_run: bool = False
    json: bool = False
    max_parallel: int | None = None
    subscription_server: str | Sequence[str] | None = None
    drain_timeout: float = 5.0
    probe: str | None = None
    probe_timeout: float = 5.0
    #: temporary twins per fastrouter key, live before the first reload, removed after the last
    max_surge: int = 0

    @property
    def routers(self) -> tuple[str, ...]:
        """Every fastrouter stats socket."""
        return _several(self.fastrouter_stats_socket)

    @property
    def subscription_servers(self) -> tuple[str, ...]:
        """Every subscription server (none: no drain)."""
        return _several(self.subscription_server)


def _several(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(dict.fromkeys(value))


def take_snapshot(options: Options) -> Snapshot:
    """The emperor's vassals and every router's nodes. A router that cannot be read is left out
    (``Snapshot.unreadable``); a ``StatsError`` when the emperor or every router cannot be."""
    # The emperor rescans its directory after every event it handles, a stats connection
    # included (core/emperor.c), so polling it also makes it notice a touch at once.
    vassals = parse_emperor_stats(read_stats(options.emperor_stats_socket))
    routers = options.routers
    keys: list[KeyNodes] = []
    unreadable: dict[str, str] = {}
    for router in routers:
        try:
            keys += parse_fastrouter_keys(read_stats(router), router)
        except StatsError as exc:
            if len(routers) == 1:
                raise
            unreadable[router] = str(exc)
    if len(unreadable) == len(routers):
        raise StatsError("; ".join(unreadable.values()))
    return Snapshot(vassals, NodeTable(keys), routers, unreadable)


def locate(
    fleet: Sequence[VassalReload],
    snapshot: Snapshot,
    sockets: Callable[[int], tuple[str, ...]],
    is_local: Callable[[str], bool],
) -> list[VassalReload]:
    """Each vassal with the node names it is announced as, from the sockets its master listens
    on (``listening_sockets``). When those match no node but a node is named after the vassal
    (``node_vassal_name``), or when they cannot be read, the name decides (``owns``)."""
    names = sorted(snapshot.index.names())
    located = []
    for v in fleet:
        current = snapshot.vassals.get(v.id)
        listening: tuple[str, ...] = ()
        if current is not None and current.pid > 0:
            try:
                listening = tuple(sockets(current.pid))
            except OSError:
                listening = ()
        addresses = node_addresses(listening, names, is_local)
        by_socket = bool(addresses) and bool(snapshot.index.of_vassal(v.name, addresses))
        by_name = bool(snapshot.index.of_vassal(v.name))
        if not by_socket and by_name:
            addresses = frozenset()
        located.append(dataclasses.replace(v, addresses=addresses, listening=listening))
    return located


def describe_plan(
    fleet: Sequence[VassalReload],
    snapshot: Snapshot,
    options: Options,
    twins: Sequence[Twin] = (),
) -> list[str]:
    live = {
        v.id: live_keys(snapshot.vassals.get(v.id), v.name, snapshot.live_index, v.addresses)
        for v in fleet
    }
    others = others_live(snapshot.live_index, fleet)
    routers = (
        "router counts" if len(snapshot.routers) == 1 else f"{len(snapshot.routers)} routers count"
    )
    order = [v for v in fleet if not live[v.id]] + [v for v in fleet if live[v.id]]
    keys = sorted({k for ks in live.values() for k in ks})
    lines = [f"dry run: would reload {len(fleet)} vassals of {options.emperor_path}, order:"]
    for v in order:
        state = (
            f"live for {', '.join(sorted(live[v.id]))}" if live[v.id] else "not live, goes first"
        )
        if v.addresses:
            state += f" (node {', '.join(sorted(v.addresses))})"
        lines.append(f"  {v.name} ({v.id}): {state}")
    for key in keys:
        count = sum(1 for ks in live.values() if key in ks)
        total = count + others.get(key, 0) + options.max_surge
        at_once = min(count, total - options.minimum_active_vassals)
        if options.max_parallel is not None:
            at_once = min(at_once, options.max_parallel)
        head = f"key {key!r}: {count} live, minimum {options.minimum_active_vassals}: "
        if at_once > 0:
            rounds = math.ceil(count / at_once)
            tail = f"up to {at_once} reloading at once, about {rounds} reload times"
        else:
            tail = "its live vassals wait until the not-live ones are back"
        elsewhere = total - count - options.max_surge
        counted = (
            f"; the {routers} {total} live ({count} on this host, {elsewhere} on other hosts"
            + (f", {options.max_surge} twins to add)" if options.max_surge else ")")
        )
        lines.append(head + tail + counted)
    if options.subscription_server:
        lines.append(
            f"drain: each live vassal is unsubscribed via "
            f"{', '.join(options.subscription_servers)} and touched once no router has a "
            f"request in flight to it (at most {options.drain_timeout:g}s), then subscribed "
            "again as soon as it accepts"
        )
    if options.probe:
        lines.append(
            f"probe: GET {options.probe} on each reloaded vassal's socket before counting it "
            "back; a failure stops the rollout"
        )
    for t in twins:
        if t.leftover:
            lines.append(
                f"surge: twin {t.name} ({t.id}, twin of {t.of}) was left by an earlier run: "
                "drained and removed first"
            )
    for t in twins:
        if not t.leftover:
            lines.append(
                f"surge: would add {t.id} (a link to {t.target}, twin of {t.of}), live before "
                "the first reload, drained and removed after the last"
            )
    return lines


def report_json(
    fleet: Sequence[VassalReload],
    options: Options,
    started: float,
    elapsed: float,
    exit_code: int,
    rollout: Rollout | None,
    details: Mapping[str, str] | None = None,
    twins: Sequence[Twin] = (),
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
        "subscription_server": _one_or_all(options.subscription_servers),
        "fastrouter_stats_socket": _one_or_all(options.routers),
        "drain_timeout": options.drain_timeout if options.subscription_server else None,
        "probe": options.probe,
        "vassals": [v.as_json((details or {}).get(v.id, "")) for v in fleet],
        "max_surge": options.max_surge,
        "twins": [t.as_json() for t in twins],
    }


def _one_or_all(values: Sequence[str]) -> str | list[str] | None:
    """As given: one address as a string (as before several were allowed), several as a list."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


class _Interrupted:
    def __init__(self) -> None:
        self.signal: int | None = None
        #: signals received so far: one more while twins are removed gives the removal up
        self.count = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.signal = signum
        self.count += 1


@dataclasses.dataclass(frozen=True)
class Io:
    """Everything the run does to the world, so that tests can replace it."""

    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    snapshot: Callable[[Options], Snapshot] = take_snapshot
    touch: Callable[[str, int], None] = touch
    #: (subscription server address, packet)
    send: Callable[[str, bytes], None] = send_datagram
    #: (node name, key, path, timeout) -> result
    probe: Callable[[str, str, str, float], ProbeResult] = probe_node
    #: where probes run, so that the run goes on polling while a vassal takes its time to answer
    probe_pool: Callable[[], Executor] = lambda: ThreadPoolExecutor(thread_name_prefix="probe")
    #: pid -> the addresses it listens on (read from /proc)
    sockets: Callable[[int], tuple[str, ...]] = listening_sockets
    #: is this IP address one of this machine's (a node of a vassal bound on 0.0.0.0 or ::)
    is_local: Callable[[str], bool] = is_local_host
    #: surge: (target, link) makes a twin's link; (link, target) removes it
    make_link: Callable[[str, str], None] = make_twin_link
    remove_link: Callable[[str, str], None] = remove_twin_link
    #: (emperor path, twins) records the twins made (none: removes the record)
    write_state: Callable[[str, Sequence[Twin]], None] = write_surge_state
    #: (port, host): nothing listens there (a twin of a config named after its port)
    port_free: Callable[[int, str], bool] = port_free


def run(options: Options, reporter: Reporter, io: Io | None = None) -> int:
    io = io or Io()
    suffix = options.vassal_config_file_suffix
    configs = find_configs(options.emperor_path, suffix)
    # Twins an earlier run left are no vassals to reload: they are removed first.
    leftovers = read_surge_state(options.emperor_path, suffix)
    left_ids = {t.id for t in leftovers}
    configs = [c for c in configs if os.path.basename(c) not in left_ids]
    if not configs:
        raise ReloadError(
            f"no vassal config ending in {suffix!r} in {options.emperor_path} but the twins an "
            "earlier run left"
        )
    fleet = plan_fleet(configs, suffix)
    first = io.snapshot(options)
    for _ in range(FOLLOW_RECHECKS):
        if not any(
            v.id in first.vassals and emperor_follows_link(v.config, first.vassals[v.id])
            for v in fleet
        ):
            break
        # A link touched a moment ago (another deploy step) looks the same as a followed link
        # until the emperor rescans; each stats read makes it rescan (core/emperor.c).
        io.sleep(FOLLOW_RECHECK_INTERVAL)
        first = io.snapshot(options)
    if first.unreadable:
        raise StatsError("; ".join(first.unreadable.values()))
    fleet = locate(fleet, first, io.sockets, io.is_local)
    check_fleet(fleet, first, options.minimum_active_vassals, options.max_surge, leftovers)
    twins = _plan_surge(fleet, first, options, io, leftovers)
    started_wall, started = io.wall_clock(), io.clock()
    if options.dry_run:
        for line in describe_plan(fleet, first, options, leftovers + twins):
            reporter.line(line)
        if options.json:
            report = report_json(
                fleet, options, started_wall, 0.0, EXIT_OK, None, twins=leftovers + twins
            )
            print(json.dumps(report))
        return EXIT_OK

    interrupted = _Interrupted()
    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    rollout = Rollout(
        fleet,
        options.minimum_active_vassals,
        options.timeout,
        options.max_parallel,
        subscriptions=options.subscription_server is not None,
        drain_timeout=options.drain_timeout,
        probe=options.probe is not None,
    )
    surges = [_surge(leftovers, options), _surge(twins, options)]
    try:
        with emperor_lock(options.emperor_path), io.probe_pool() as pool:
            probes = _Probes(pool, options, io)
            driver = _SurgeDriver(options, reporter, io, started, interrupted)
            exit_code, extra, ran = driver.before(*surges)
            if ran:
                exit_code = _drive_to_the_end(
                    rollout, options, reporter, None, started, interrupted, probes
                )
                extra = driver.after(surges[1])
                if extra and exit_code == EXIT_OK:
                    exit_code = EXIT_NOT_ALL_RELOADED
        elapsed = io.clock() - started
        details = _details(rollout)
        try:
            if not ran and exit_code != EXIT_OK:
                reporter.error(extra)
            else:
                _summarise(rollout, details, reporter, elapsed, exit_code, extra)
            if options.json:
                report = report_json(
                    fleet,
                    options,
                    started_wall,
                    elapsed,
                    exit_code,
                    rollout,
                    details,
                    [t for s in surges for t in s.twins],
                )
                print(json.dumps(report), flush=True)
        except OSError:
            pass  # stdout or stderr closed (a pipe whose reader went): the exit code still tells
    finally:
        # restored only now: a SIGINT while the summary is written must not look like one
        # before the run (main's KeyboardInterrupt)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code


def _plan_surge(
    fleet: Sequence[VassalReload],
    first: Snapshot,
    options: Options,
    io: Io,
    leftovers: Sequence[Twin],
) -> list[Twin]:
    """The twins to add (none without ``--max-surge``); a ``ReloadError`` when the emperor
    directory cannot hold them."""
    if not options.max_surge:
        return []
    if not os.access(options.emperor_path, os.W_OK | os.X_OK):
        raise ReloadError(
            f"--max-surge {options.max_surge}: cannot make links in {options.emperor_path} "
            "(not writable by this user)"
        )
    try:
        taken = set(os.listdir(options.emperor_path))
    except OSError as exc:
        raise ReloadError(
            f"cannot read emperor path {options.emperor_path}: {exc.strerror or exc}"
        ) from None
    taken |= {t.id for t in leftovers}
    try:
        return plan_twins(
            fleet,
            first,
            options.max_surge,
            options.vassal_config_file_suffix,
            taken,
            link_target,
            io.port_free,
        )
    except OSError as exc:
        raise ReloadError(
            f"--max-surge {options.max_surge}: cannot read a vassal's link: {exc}"
        ) from None


def _surge(twins: Sequence[Twin], options: Options) -> Surge:
    return Surge(
        twins,
        options.minimum_active_vassals,
        options.timeout,
        subscriptions=options.subscription_server is not None,
        drain_timeout=options.drain_timeout,
        probe=options.probe is not None,
    )


def _names(twins: Sequence[Twin]) -> str:
    shown = ", ".join(t.name for t in twins[:MISSED_SHOWN])
    return shown + (f" and {len(twins) - MISSED_SHOWN} more" if len(twins) > MISSED_SHOWN else "")


class _SurgeDriver:
    """Drives a ``Surge``: makes and removes the links, sends its packets, probes, records the
    twins left in the state file. The explicit phases of a run with twins: remove the leftovers,
    add the twins (``before``), the rollout, remove the twins (``after``)."""

    def __init__(
        self,
        options: Options,
        reporter: Reporter,
        io: Io,
        started: float,
        interrupted: _Interrupted,
    ) -> None:
        self.options, self.reporter, self.io = options, reporter, io
        self.started, self.interrupted = started, interrupted

    def before(self, leftovers: Surge, twins: Surge) -> tuple[int, str, bool]:
        """Add the new twins, then remove the leftovers (the new twins keep the minimum while
        they go: a killed run may have left an original drained, out of the router). Returns
        (exit code, error, whether the rollout may run); on a failure every twin is removed."""
        emperor_path = self.options.emperor_path
        stopped = False
        if twins.twins:
            # recorded before any link exists: a run killed from here on leaves them all listed
            self.io.write_state(emperor_path, leftovers.left + twins.twins)
            self._line(f"surge: adding {len(twins.twins)} twins")
            stopped = self.drive(twins, removing=False)
        failed = twins.failed
        if leftovers.twins and not stopped and not failed:
            self._line(f"surge: removing {len(leftovers.twins)} twins an earlier run left")
            stopped = self.drive(leftovers, removing=True)
            self.io.write_state(emperor_path, leftovers.left + twins.left)
        if not stopped and not failed and not leftovers.left:
            return EXIT_OK, "", True
        for surge in (twins, leftovers):
            if surge.left:
                self.drive(surge, removing=True)
        left = leftovers.left + twins.left
        self.io.write_state(emperor_path, left)
        kept = f"; twins left in place: {self._why(left)}" if left else ""
        if stopped:
            why = f"interrupted by {signal.Signals(self.interrupted.signal or 2).name}"
            return EXIT_INTERRUPTED, f"{why} before the first reload{kept}", False
        if failed:
            what = f"surge: twin {failed[0].name} of {failed[0].of} failed: {failed[0].detail}"
        else:
            what = "the twins an earlier run left could not all be removed"
        return EXIT_NOT_ALL_RELOADED, f"{what}; nothing was reloaded{kept}", False

    def after(self, twins: Surge) -> str:
        """Remove the twins; what is left, or ``""``."""
        if not twins.twins:
            return ""
        self._line(f"surge: removing {len(twins.twins)} twins")
        self.drive(twins, removing=True)
        self.io.write_state(self.options.emperor_path, twins.left)
        if twins.left:
            return f"twins left in place: {self._why(twins.left)} (the next run removes them)"
        return ""

    @staticmethod
    def _why(twins: Sequence[Twin]) -> str:
        return "; ".join(f"{t.name}: {t.detail}" if t.detail else t.name for t in twins)

    def _line(self, text: str) -> None:
        self.reporter.line(f"{self.io.clock() - self.started:8.2f}s  {text}")

    def drive(self, surge: Surge, *, removing: bool) -> bool:
        """Step ``surge`` until it is done; True when a signal stopped it (while removing: a
        signal more than there were when the removal began)."""
        io, options = self.io, self.options
        signals = self.interrupted.count
        unreadable_since: float | None = None
        while True:
            now = io.clock() - self.started
            if self.interrupted.count > signals:
                if removing:
                    name = signal.Signals(self.interrupted.signal or 2).name
                    self._report(surge.give_up(f"interrupted by {name} while removing", now))
                return True
            try:
                snapshot = io.snapshot(options)
            except StatsError as exc:
                unreadable_since = now if unreadable_since is None else unreadable_since
                if now - unreadable_since >= options.timeout:
                    reason = f"stats unreadable for {options.timeout:g}s: {exc}"
                    if removing:
                        self._report(surge.give_up(reason, now))
                    else:
                        for t in surge.in_phase(TwinPhase.STARTING, TwinPhase.PROBING):
                            self._report(surge.fail(t, reason, now))
                    return False
                io.sleep(options.check_interval)
                continue
            unreadable_since = None
            self._locate(surge, snapshot)
            events = surge.down(snapshot, now) if removing else surge.up(snapshot, now)
            acted = self._report(events, surge)
            if surge.down_done if removing else surge.up_done:
                return False
            if acted:
                continue  # the emperor rescans on the next stats read: no sleep
            interval = options.check_interval
            if surge.watch_closely():
                interval = min(interval, CLOSE_WATCH_INTERVAL)
            io.sleep(interval)

    def _report(self, events: list[TwinEvent], surge: Surge | None = None) -> bool:
        """Act on each event and print it; True when a link was made or removed."""
        acted = False
        while events:
            event = events.pop(0)
            t = event.twin
            if surge is not None and event.kind is TwinEventKind.ADD:
                try:
                    self.io.make_link(t.target, t.config)
                    acted = True
                except OSError as exc:
                    event, *more = surge.add_failed(t, exc.strerror or str(exc), event.at)
                    events[:0] = more
            elif surge is not None and event.kind is TwinEventKind.REMOVE:
                try:
                    self.io.remove_link(t.config, t.target)
                    acted = True
                except OSError as exc:
                    event, *more = surge.remove_failed(t, str(exc), event.at)
                    events[:0] = more
            text = twin_event_text(event)
            if event.send:
                problem = _send(event.send, self.options, self.reporter, self.io)
                if problem:
                    text += f" ({problem})"
            self.reporter.line(f"{event.at:8.2f}s  {t.name}: {text}")
            if surge is not None and event.kind is TwinEventKind.PROBE:
                assert event.probe is not None and self.options.probe is not None
                n = event.probe
                result = self.io.probe(
                    n.name, n.key, self.options.probe, self.options.probe_timeout
                )
                events += surge.probed(t, result, self.io.clock() - self.started)
        return acted

    def _locate(self, surge: Surge, snapshot: Snapshot) -> None:
        """A twin's node: the address its master listens on, as for the originals (``locate``)."""
        names = sorted(snapshot.index.names())
        for t in surge.twins:
            current = snapshot.vassals.get(t.id)
            if t.addresses or current is None or current.pid <= 0:
                continue
            try:
                listening = tuple(self.io.sockets(current.pid))
            except OSError:
                continue
            surge.listening(t, listening)
            if t.addresses:
                continue
            addresses = node_addresses(listening, names, self.io.is_local)
            if addresses and any(owns(t.name, addresses, n) for n in names):
                surge.located(t, addresses)


def _drive_to_the_end(
    rollout: Rollout,
    options: Options,
    reporter: Reporter,
    current: Snapshot | None,
    started: float,
    interrupted: _Interrupted,
    probes: _Probes,
) -> int:
    """``_drive``; on any exception, give the run up with the fleet put back as it was: the
    vassals drained and not touched are subscribed again before the error is reported."""
    try:
        return _drive(rollout, options, reporter, current, started, interrupted, probes)
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt)
        reason = "interrupted" if stopped else f"unexpected {type(exc).__name__}: {exc}"
        _send(rollout.abandon(reason), options, reporter, probes.io)
        if stopped:
            return EXIT_INTERRUPTED
        if isinstance(exc, Exception):
            return EXIT_NOT_ALL_RELOADED
        raise


class _Probes:
    """Probes out in the pool, answered to the rollout in the order they were asked for."""

    def __init__(self, pool: Executor, options: Options, io: Io) -> None:
        self.pool, self.options, self.io = pool, options, io
        self.out: dict[Future[ProbeResult], VassalReload] = {}

    def start(self, vassal: VassalReload, node: Node) -> None:
        assert self.options.probe is not None
        args = (node.name, node.key, self.options.probe, self.options.probe_timeout)
        self.out[self.pool.submit(self.io.probe, *args)] = vassal

    def answered(self, rollout: Rollout, now: float) -> list[Event]:
        events = []
        for future in [f for f in self.out if f.done()]:
            events += rollout.probed(self.out.pop(future), future.result(), now)
        return events


def _drive(
    rollout: Rollout,
    options: Options,
    reporter: Reporter,
    current: Snapshot | None,
    started: float,
    interrupted: _Interrupted,
    probes: _Probes,
) -> int:
    io = probes.io
    unreadable_since: float | None = None
    while True:
        touched = False
        now = io.clock() - started
        if current is None:
            problem = ""
            try:
                current = io.snapshot(options)
                # a router that cannot be read: nothing is live there, nothing may start
                problem = "; ".join(current.unreadable.values())
            except StatsError as exc:
                problem = str(exc)
            if problem:
                if unreadable_since is None and current is not None:
                    reporter.line(
                        f"{now:8.2f}s  {problem}: nothing counts as live there, nothing starts"
                    )
                unreadable_since = now if unreadable_since is None else unreadable_since
                if now - unreadable_since >= options.timeout:
                    reason = f"stats unreadable for {options.timeout:g}s: {problem}"
                    _send(rollout.abandon(reason), options, reporter, io)
                    return EXIT_NOT_ALL_RELOADED
            else:
                unreadable_since = None
        if interrupted.signal is not None:
            reason = f"interrupted by {signal.Signals(interrupted.signal).name}"
            _send(rollout.abandon(reason), options, reporter, io)
            return EXIT_INTERRUPTED
        # answers first: a vassal back (or a failed probe) counts in this step's decisions
        events = probes.answered(rollout, now)
        events += rollout.step(current, now) if current is not None else []
        while events:
            event = events.pop(0)
            vassal = event.vassal
            if event.touches:
                assert vassal.baseline is not None
                try:
                    io.touch(vassal.config, touch_mtime(io.wall_clock(), vassal.baseline.last_mod))
                    touched = True
                except OSError as exc:
                    event, *more = rollout.touch_failed(vassal, str(exc), now)
                    events[:0] = more
            text = event_text(event, rollout)
            if event.send:
                problem = _send(event.send, options, reporter, io)
                if problem:
                    text += f" ({problem})"
            reporter.event(event, text)
            if event.kind is EventKind.PROBE and event.probe is not None:
                probes.start(vassal, event.probe)
            if not events:
                # answers already in (a quick vassal, or a pool that runs probes at once)
                events += probes.answered(rollout, io.clock() - started)
        if rollout.finished:
            everything = all(v.phase is Phase.BACK for v in rollout.vassals.values())
            return EXIT_OK if everything else EXIT_NOT_ALL_RELOADED
        current = None
        if touched:
            # Read the stats at once: the emperor rescans on that connection and acts on the
            # touch now rather than on the next poll.
            continue
        interval = options.check_interval
        if rollout.watch_closely() or probes.out:
            interval = min(interval, CLOSE_WATCH_INTERVAL)
        io.sleep(interval)


def _send(packets: Sequence[Subscription], options: Options, reporter: Reporter, io: Io) -> str:
    """Send packets to every subscription server; what went wrong, or ``""``."""
    if not packets:
        return ""
    problems = []
    for server in options.subscription_servers:
        for packet in packets:
            try:
                io.send(server, packet.packet())
            except Exception as exc:  # a packet not sent must not keep the others from going
                reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                problems.append(
                    f"subscription server {server}: cannot {packet.describe()}: {reason}"
                )
    for problem in problems:
        reporter.warning(problem)
    return "; ".join(problems)


def _details(rollout: Rollout) -> dict[str, str]:
    """Why each vassal did not come back, as the summary and the report say it."""
    details = {}
    for v in rollout.vassals.values():
        details[v.id] = vassal_detail(v, rollout)
        if (
            v.phase is Phase.TIMED_OUT
            and v.stalled_in is Phase.RELOADING
            and os.path.islink(v.config)
        ):
            details[v.id] += (
                " (the configs are symlinks: the emperor sees a touch of the link only with "
                "--emperor-nofollow)"
            )
    return details


def _summarise(
    rollout: Rollout,
    details: Mapping[str, str],
    reporter: Reporter,
    elapsed: float,
    exit_code: int,
    extra: str = "",
) -> None:
    """What became of each vassal that did not come back, then one line: on stderr (the only
    line there) when not all came back (``extra``: what else went wrong, the twins left)."""
    vassals = list(rollout.vassals.values())
    for v in vassals:
        if v.drain_left is not None:
            reporter.line(f"{v.name}: {drain_timeout_text(v, rollout)}: triggered anyway")
    missed = [v for v in vassals if v.phase is not Phase.BACK]
    for v in missed:
        reporter.line(f"{v.name}: {outcome(v.phase).value}: {details[v.id]}")
    lowest = ", ".join(f"{k}: {n}" for k, n in sorted(rollout.lowest_live.items())) or "none"
    summary = (
        f"reloaded {len(vassals) - len(missed)} of {len(vassals)} vassals in {elapsed:.2f}s "
        f"(minimum {rollout.minimum}; fewest live seen per key: {lowest})"
    )
    if exit_code == EXIT_OK:
        reporter.line(summary)
        return
    if rollout.abandoned is not None:
        summary = f"{rollout.abandoned}: {summary}"
    names = [v.name for v in missed]
    shown = ", ".join(names[:MISSED_SHOWN])
    if len(names) > MISSED_SHOWN:
        shown += f" and {len(names) - MISSED_SHOWN} more"
    if extra:
        summary += f"; {extra}"
    reporter.error(f"{summary}; not reloaded: {shown}" if names else summary)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number greater than 0."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number greater than 0")
    return value


def non_negative_float(text: str) -> float:
    """argparse ``type=``: a finite number, 0 or more."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def non_negative_int(text: str) -> int:
    """argparse ``type=``: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: a whole number, 1 or more."""
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _subscription_server(text: str) -> str:
    """A unix datagram socket that exists and is bound, or ``host:port`` (UDP: unverifiable)."""
    if _is_host_port(text):
        port = _split_host_port(text)[1]
        if not 0 < port < 65536:
            raise argparse.ArgumentTypeError(f"{text!r}: port {port} is not 1-65535")
        return text
    try:
        mode = os.stat(text).st_mode
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{text} does not exist") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise argparse.ArgumentTypeError(f"{text} is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(text)
        except OSError as exc:
            raise argparse.ArgumentTypeError(
                f"{text} does not take datagrams (is it the fastrouter's subscription "
                f"server?): {exc.strerror or exc}"
            ) from None
    return text


def _probe_path(text: str) -> str:
    if not text.startswith("/") or any(c.isspace() or not c.isprintable() for c in text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a request path (it starts with / and has no spaces)"
        )
    return text


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
        action="append",
        default=argparse.SUPPRESS,
        metavar="<socket>",
        help="Fastrouter statistics socket (unix path or host:port); give it once per router: "
        "a reloaded vassal is back once it is live in every router, and the minimum holds in "
        "each router and among the nodes live in all of them",
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
        type=non_negative_int,
        default=1,
        metavar="<int>",
        help="the minimum number of vassals that should be active at any given time during "
        "the reload, per fastrouter key: every live node the router has for the key counts, "
        "other hosts' included (with several routers, each router keeps it)",
    )
    add(
        "--timeout",
        type=positive_float,
        default=60.0,
        metavar="<seconds>",
        help="how long to wait for the reload of a vassal",
    )
    add(
        "--check-interval",
        type=positive_float,
        default=0.1,
        metavar="<float>",
        help="interval between vassal status checks (seconds)",
    )
    add(
        "--max-parallel",
        type=positive_int,
        default=None,
        metavar="<int>",
        help="at most this many vassals reloading at once (default: as many as the minimum allows)",
    )
    add(
        "--subscription-server",
        type=_subscription_server,
        action="append",
        default=argparse.SUPPRESS,  # Options: None, off
        metavar="<socket>",
        help="the fastrouter's subscription server (unix datagram path or host:port UDP), once "
        "per router: drain each vassal before its reload (unsubscribe at every server, wait "
        "until no router has a request in flight to it) and subscribe it again as soon as it "
        "accepts (default: off)",
    )
    add(
        "--drain-timeout",
        type=positive_float,
        default=5.0,
        metavar="<seconds>",
        help="with --subscription-server: reload a vassal anyway when requests are still in "
        "flight to it after this long",
    )
    add(
        "--probe",
        type=_probe_path,
        default=argparse.SUPPRESS,  # Options: None, off
        metavar="<path>",
        help="before counting a reloaded vassal back, GET this path straight from its socket "
        "(uwsgi protocol, Host: the fastrouter key); anything but 2xx/3xx stops the rollout "
        "(default: off)",
    )
    add(
        "--probe-timeout",
        type=positive_float,
        default=5.0,
        metavar="<seconds>",
        help="how long the probe waits for the status line",
    )
    add(
        "--max-surge",
        type=non_negative_int,
        default=0,
        metavar="<int>",
        help="before the first reload, add this many temporary twins per fastrouter key (new "
        "links to an original's config, named <name>.surge-<i>, or a free port for configs "
        "named after their port), wait until they are live, reload the originals counting "
        "them, then drain and remove them: the minimum may then be the number of vassals",
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


def main(argv: Sequence[str] | None = None, *, io: Io | None = None) -> int:
    """The command line; ``io`` replaces what the run does to the world (tests)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    options = Options(**vars(args))
    reporter = Reporter(options.quiet, sys.stderr if options.json else sys.stdout, sys.stderr)
    # Once the rollout has begun, run() reports every failure itself: what reaches here
    # happened before anything was touched or drained.
    try:
        return run(options, reporter, io)
    except ReloadError as exc:
        reporter.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        reporter.error("interrupted before anything was touched")
        return EXIT_INTERRUPTED
    except Exception as exc:
        reporter.error(f"unexpected {type(exc).__name__}: {exc} (nothing was touched)")
        return EXIT_USAGE


def cli() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
