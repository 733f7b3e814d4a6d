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
lock, 4 failed and reverted (``--revert-command``), 130 interrupted (SIGINT or SIGTERM).

Map of this file, top to bottom (each layer uses only the ones above it):

- Stats sockets: ``read_stats``, ``parse_emperor_stats``, ``parse_fastrouter_stats``.
- Which node is which vassal: ``listening_sockets`` (/proc), ``node_addresses``, ``owns``.
- The uwsgi protocol: subscription packets, the probe.
- The core, pure (no I/O, no clock): ``Snapshot`` (one poll), ``Rules`` (the run's settings),
  the minimum (``pick_reloads``: the one check), the state machines ``Rollout`` (vassals) and
  ``Surge`` (twins), each ``step(snapshot, now) -> events`` with its phase table (``MOVES``).
- Display: ``event_text``, ``vassal_detail``, derived from phases and events.
- The edges: configs, checks before touching anything, the lock, touching, the surge state.
- The run: ``main -> run -> Driver.drive(machine) -> machine.step``. ``Driver`` is the one loop
  for every machine: it polls, steps, acts on the events (touch, link, packets, probes in a
  pool), reports, and times out; ``Io`` holds everything it does to the world.
- Command line: ``build_parser``, ``main``.
"""

from __future__ import annotations

import argparse
import collections
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
import subprocess
import sys
import time
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from itertools import repeat
from typing import Any, Callable, ClassVar, NamedTuple, TextIO, TypeVar

__version__ = "0.1.0"

EXIT_OK = 0
EXIT_NOT_ALL_RELOADED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_REVERTED = 4
EXIT_INTERRUPTED = 130

#: The names an error line shows, at most ("and N more").
MISSED_SHOWN = 10

#: Seconds between polls while a drained vassal is out of the router and not yet reloading
#: (see ``Rollout.watch_closely``), or a probe is out; ``--check-interval`` otherwise.
CLOSE_WATCH_INTERVAL = 0.01


class ReloadError(Exception):
    """Bad input or an environment the tool cannot work with; nothing was touched."""

    exit_code = EXIT_USAGE


class NoRoom(ReloadError):
    """The minimum leaves nothing to reload with the nodes live now."""


class LockedError(ReloadError):
    """Another run holds the lock on this emperor."""

    exit_code = EXIT_LOCKED


class StatsError(ReloadError):
    """A stats socket is missing, refuses the connection or does not speak JSON."""


def shown_names(names: Sequence[str], most: int = MISSED_SHOWN) -> str:
    """``a, b, c and 4 more``: an error line stays bounded however many names there are."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


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


#: The most a stats document may hold: an emperor's of ~200,000 vassals is about 60 MB.
STATS_MAX_BYTES = 64 << 20


def read_stats(
    address: str, timeout: float = 5.0, max_bytes: int = STATS_MAX_BYTES
) -> dict[str, Any]:
    """Read one JSON document from a uWSGI stats server (it writes it and closes), all of it
    within ``timeout`` (a server that sends a byte at a time does not hold the run)."""
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        with _connect(address, timeout) as sock:
            while chunk := _recv_by(sock, deadline):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise StatsError(
                        f"stats socket {address} sent more than {max_bytes >> 20} MiB: not a "
                        "stats document this tool reads"
                    )
    except FileNotFoundError:
        raise StatsError(f"stats socket {address} does not exist") from None
    except socket.timeout:
        raise StatsError(
            f"stats socket {address} did not send its whole document within {timeout:g}s"
        ) from None
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


def _recv_by(sock: socket.socket, deadline: float) -> bytes:
    """The next bytes, or ``socket.timeout`` once ``deadline`` (``time.monotonic``) is past."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout
    sock.settimeout(left)
    return sock.recv(65536)


@dataclasses.dataclass(frozen=True)
class EmperorVassal:
    """One vassal as the emperor's stats server reports it."""

    id: str
    pid: int
    respawns: int
    last_mod: int
    accepting: bool
    ready: bool


class Node(NamedTuple):
    """One node of a fastrouter subscription (a tuple: a poll makes one per node)."""

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
    #: connections to it the router could not open (plugins/corerouter/cr_common.c)
    failcnt: int = 0

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


def _objects(value: object, what: str) -> list[Mapping[str, Any]]:
    """``value`` if it is a list of objects; a ``StatsError`` saying what is wrong otherwise."""
    if not isinstance(value, list):
        raise StatsError(f"{what} is {_shown(value)}, not a list")
    for i, entry in enumerate(value):
        if not isinstance(entry, (dict, Mapping)):  # dict first: no ABC check for JSON's
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


#: The integer fields of a node the tool reads, in ``Node``'s order.
_NODE_NUMBERS = ("death_mark", "ref", "modifier1", "modifier2", "cores", "load", "weight")
_COLUMNS = tuple(map(operator.itemgetter, ("name", *_NODE_NUMBERS, "failcnt")))


def parse_fastrouter_stats(data: Mapping[str, Any], router: str = "") -> list[Node]:
    """Every node of every subscription key (tagged with ``router``).

    Anything but the shape a fastrouter's stats server writes is a ``StatsError``.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("subscriptions"), list):
        raise StatsError(
            "fastrouter stats have no 'subscriptions' list (is it a fastrouter stats server?)"
        )
    nodes: list[Node] = []
    for i, sub in enumerate(_objects(data["subscriptions"], "fastrouter stats: subscriptions")):
        key = _text(sub, "key", f"fastrouter stats: subscriptions[{i}]", default="")
        where = f"fastrouter stats: key {key!r}: nodes"
        raw = _objects(sub.get("nodes", []), where)
        try:  # what a fastrouter writes, every field there and of its type: checked in C
            names, death_marks, *rest, failcnts = columns = [[*map(c, raw)] for c in _COLUMNS]
            plain = {str}.issuperset(map(type, names)) and "" not in names
            plain = plain and all({int}.issuperset(map(type, n)) for n in columns[1:])
        except KeyError:
            plain = False
        if plain:
            marks = map(bool, death_marks)
            nodes += map(Node, repeat(key), names, marks, *rest, repeat(router), failcnts)
            continue
        for j, node in enumerate(raw):
            name = _text(node, "name", f"{where}[{j}]")
            fields = (*_NODE_NUMBERS, "failcnt")
            mark, *more, failcnt = (_int_field(node, f, f"{where}: {name}") for f in fields)
            nodes.append(Node._make((key, name, mark != 0, *more, router, failcnt)))
    return nodes


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


# A fleet's node names are the same from poll to poll: each poll indexes every node by its
# address (``Snapshot.nodes_of``), so the spelling of each name is worked out once, here.
@functools.lru_cache(maxsize=65536)
def canonical_address(name: str) -> str:
    """A node or socket address in one spelling: ``127.0.0.2:3121``, ``[::1]:3121``; a unix
    path (or anything that is not an IP and a port) as it is."""
    parsed = _ip_port(name)
    return name if parsed is None else _host_port_text(parsed[0].compressed, parsed[1])


def _ip_port(address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """The IP (an IPv4-mapped one as IPv4) and the port of ``host:port``; None otherwise."""
    if not _is_host_port(address):
        return None
    host, port = _split_host_port(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port


def _proc_ip(hex_address: str) -> str:
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) byte order."""
    words = [int(hex_address[i : i + 8], 16) for i in range(0, len(hex_address), 8)]
    return _ip_text(b"".join(struct.pack("<I", word) for word in words))


def _ip_text(raw: bytes) -> str:
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


def listening_sockets(pids: Iterable[int], proc: str = "/proc") -> dict[int, tuple[str, ...]]:
    """The addresses each process listens on, as node names spell them (none when its fds
    cannot be read: another user's process, or gone), from one read of the kernel's listening
    sockets: netlink (``sock_diag_listening``), or /proc/net where netlink is refused (or
    ``proc`` is not the live one)."""
    inodes = {pid: _socket_inodes(os.path.join(proc, str(pid), "fd")) for pid in pids}
    table: dict[int, str] = {}
    if any(inodes.values()):
        try:
            if proc != "/proc":
                raise OSError(errno.ENOENT, "not the live /proc")
            table = sock_diag_listening()
        except OSError:
            for name in ("tcp", "tcp6", "unix"):
                parse = parse_proc_net_unix if name == "unix" else parse_proc_net_tcp
                table.update(_read_table(os.path.join(proc, "net", name), parse))
    return {
        pid: tuple(sorted({table[i] for i in found if i in table})) for pid, found in inodes.items()
    }


def _socket_inodes(fd_dir: str) -> set[int]:
    links = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):  # closed meanwhile
                links.append(os.readlink(os.path.join(fd_dir, fd)))
    return {inode for inode in map(socket_inode, links) if inode is not None}


def _read_table(path: str, parse: Callable[[str], dict[int, str]]) -> dict[int, str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse(f.read())
    except OSError:
        return {}


#: Socket diagnostics over netlink (linux/sock_diag.h, inet_diag.h, unix_diag.h): what ``ss -l``
#: asks. The kernel filters the sockets by state, so a dump of the listening ones costs the same
#: with a few hundred thousand connections in TIME_WAIT as with none.
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_INET_DIAG_REQ = struct.Struct("=BBBxI48x")  # family, protocol, extensions, states, socket id
_UNIX_DIAG_REQ = struct.Struct("=BBxxIIIII")  # family, protocol, states, inode, show, cookie
_LISTENING = 1 << 10  # TCP_LISTEN, the state of a listening unix socket too


def sock_diag_listening(timeout: float = 2.0) -> dict[int, str]:
    """Every listening TCP (IPv4, IPv6) and named unix socket of this network namespace:
    inode -> address (``@name``: an abstract unix socket). ``OSError`` when netlink is refused."""
    table = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(timeout)
        for family in (socket.AF_INET, socket.AF_INET6):
            request = _INET_DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, _LISTENING)
            size = 4 if family == socket.AF_INET else 16
            for msg in _sock_diag(nl, request):
                # inet_diag_msg: family, state, timer, retrans, then the socket id (source port
                # and address in network order) ... and the inode at byte 68
                port, ip = int.from_bytes(msg[4:6], "big"), _ip_text(msg[8 : 8 + size])
                table[int.from_bytes(msg[68:72], sys.byteorder)] = _host_port_text(ip, port)
        request = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, _LISTENING, 0, 1, 2**32 - 1, 2**32 - 1)
        for msg in _sock_diag(nl, request):
            # unix_diag_msg (16 bytes, the inode at 4), then attributes: UNIX_DIAG_NAME is 0
            pos = 16
            while pos + 4 <= len(msg):
                length, kind = struct.unpack_from("=HH", msg, pos)
                name = msg[pos + 4 : pos + length]
                if kind == 0 and name:
                    path = (
                        "@" + name[1:].decode(errors="replace")
                        if name[0] == 0
                        else name.split(b"\0")[0].decode(errors="replace")
                    )
                    table[int.from_bytes(msg[4:8], sys.byteorder)] = path
                pos += (length + 3) & ~3
    return table


def _sock_diag(nl: socket.socket, request: bytes) -> Iterator[bytes]:
    """Send one dump request, yield the payload of each answer until the kernel says done."""
    flags = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
    nl.send(_NLMSG.pack(_NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + request)
    while True:
        data = nl.recv(1 << 16)
        pos = 0
        while pos + _NLMSG.size <= len(data):
            length, kind, _, _, _ = _NLMSG.unpack_from(data, pos)
            payload = data[pos + _NLMSG.size : pos + length]
            if kind == 3:  # NLMSG_DONE
                return
            if kind == 2:  # NLMSG_ERROR: a negative errno, 0 for an acknowledgement
                code = -int.from_bytes(payload[:4], sys.byteorder, signed=True)
                if code:
                    raise OSError(code, os.strerror(code))
            else:
                yield payload
            pos += (length + 3) & ~3
            if length < _NLMSG.size:
                raise OSError(errno.EPROTO, "a netlink message shorter than its header")


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
    parsed = _ip_port(address)
    return (parsed[0].version, parsed[1]) if parsed and parsed[0].is_unspecified else None


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


def encode_vars(pairs: Iterable[tuple[str, str | bytes]]) -> bytes:
    """uwsgi vars: repeated [u16 LE length][key][u16 LE length][value]."""
    out = bytearray()
    for key, value in pairs:
        for part in (key.encode(), value if isinstance(value, bytes) else value.encode()):
            if len(part) > 0xFFFF:
                raise PacketError(f"a uwsgi var is longer than 65535 bytes: {part[:40]!r}...")
            out += _LENGTH.pack(len(part)) + part
    return bytes(out)


def encode_packet(modifier1: int, modifier2: int, body: bytes) -> bytes:
    """A uwsgi packet: [modifier1][u16 LE body size][modifier2] + body."""
    if len(body) > 0xFFFF:
        raise PacketError(f"a uwsgi packet body holds at most 65535 bytes, not {len(body)}")
    return _HEADER.pack(modifier1, len(body), modifier2) + body


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

    def packet(self, sign: Callable[[bytes], bytes] | None = None, now: float = 0.0) -> bytes:
        """The packet; signed with ``sign`` (``--subscription-sign``) as a uWSGI master signs
        its announces (core/subscription.c): a ``unix`` var (the time, plus 1 for an
        unsubscribe), then a ``sign`` var, the signature of every var before it."""
        body = encode_vars(self.vars())
        if sign is not None:
            body += encode_vars([("unix", str(int(now) + self.command))])
            body += encode_vars([("sign", sign(body))])
        return encode_packet(SUBSCRIPTION_MODIFIER1, self.command, body)

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
    """Send ``GET path`` over the uwsgi protocol straight to a vassal's socket; read the status
    line, all of it within ``timeout``."""
    head, deadline = b"", time.monotonic() + timeout
    try:
        with _connect(node_name, timeout) as sock:
            sock.sendall(probe_request(path, key, node_name))
            while b"\n" not in head and len(head) < 8192 and (chunk := _recv_by(sock, deadline)):
                head += chunk
    except socket.timeout:
        return ProbeResult(None, f"GET {path} to {node_name}: timed out after {timeout:g}s")
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return ProbeResult(None, f"GET {path} to {node_name}: {reason}")
    try:
        status = parse_status_line(head)
    except PacketError as exc:
        return ProbeResult(None, f"GET {path} to {node_name}: {exc}")
    return ProbeResult(status, f"GET {path} to {node_name} answered {status}")


# ---------------------------------------------------------------------------------------------
# The core: pure decisions over one poll's stats (no I/O, no clock)
# ---------------------------------------------------------------------------------------------

#: The router of the (router, key) places that count the nodes live in every router: no address
#: given on the command line can hold a NUL.
EVERY_ROUTER = "\0"

#: what the minimum is kept for: a fastrouter key, or a (router, key) pair
Place = TypeVar("Place", bound=Hashable)


_NAME, _DEATH_MARK = operator.itemgetter(1), operator.itemgetter(2)
_KEY_NAME, _ROUTER_KEY = operator.itemgetter(0, 1), operator.itemgetter(9, 0)


def _positions_by(values: Iterable[str]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        found.setdefault(value, []).append(i)
    return found


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the emperor and the fastrouters said in one poll, and what the core asks of it: a
    vassal's nodes (``nodes_of``), where it counts as live (``places``), the live nodes that are
    no vassal's of this run (``others``). Each is worked out once per poll, on first use."""

    vassals: Mapping[str, EmperorVassal]
    #: the nodes of every router (``Node.router`` says which)
    nodes: Sequence[Node]
    #: the fastrouters read; a node is live only when it is live in every one of them
    routers: tuple[str, ...] = ("",)
    #: the routers that could not be read this time, with why: nothing counts as live there
    unreadable: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def _by_address(self) -> dict[str, list[int]]:
        return _positions_by(map(canonical_address, map(_NAME, self.nodes)))

    @functools.cached_property
    def _by_vassal_name(self) -> dict[str, list[int]]:
        return _positions_by(map(node_vassal_name, map(_NAME, self.nodes)))

    @functools.cached_property
    def _live(self) -> list[bool]:
        return list(map(operator.not_, map(_DEATH_MARK, self.nodes)))

    def _positions(self, name: str, addresses: frozenset[str]) -> list[int]:
        if not addresses:
            return self._by_vassal_name.get(name, [])
        return sorted(i for a in addresses for i in self._by_address.get(a, ()))

    def nodes_of(self, name: str, addresses: frozenset[str] = frozenset()) -> list[Node]:
        """The nodes ``owns`` gives the vassal, live or not, in every router, in stats order."""
        return [self.nodes[i] for i in self._positions(name, addresses)]

    @functools.cached_property
    def names(self) -> list[str]:
        """Every node name, each once."""
        return sorted({node.name for node in self.nodes})

    @functools.cached_property
    def everywhere(self) -> frozenset[tuple[str, str]]:
        """(key, name) of the nodes live in every router; none while a router is unreadable."""
        if self.unreadable:
            return frozenset()
        if len(self.routers) <= 1:
            return frozenset(itertools.compress(map(_KEY_NAME, self.nodes), self._live))
        routers: dict[tuple[str, str], set[str]] = {}
        for n in self.nodes:
            if n.live:
                routers.setdefault((n.key, n.name), set()).add(n.router)
        every = set(self.routers)
        return frozenset(kn for kn, live_in in routers.items() if live_in >= every)

    def live_everywhere(self, node: Node) -> bool:
        return node.live and (node.key, node.name) in self.everywhere

    @functools.cached_property
    def live_counts(self) -> dict[tuple[str, str], int]:
        """Live nodes per (router, key), and per (``EVERY_ROUTER``, key) those live in every
        router: each router keeps the minimum, and so does what a client sees whichever router
        it reaches."""
        counts = collections.Counter(itertools.compress(map(_ROUTER_KEY, self.nodes), self._live))
        counts.update((EVERY_ROUTER, key) for key, _ in self.everywhere)
        return counts

    def places(self, v: Instance) -> frozenset[tuple[str, str]]:
        """Where the vassal counts as live: (router, key) for each router that has its node live,
        (``EVERY_ROUTER``, key) where every router has; none unless the emperor says it accepts."""
        current = self.vassals.get(v.id)
        if current is None or not current.accepting:
            return frozenset()
        found = set()
        for n in self.nodes_of(v.name, v.addresses):
            if n.live:
                found.add((n.router, n.key))
                if self.live_everywhere(n):
                    found.add((EVERY_ROUTER, n.key))
        return frozenset(found)

    def live_keys(self, v: Instance) -> frozenset[str]:
        """The keys under which the vassal is live in every router (``places``)."""
        return frozenset(key for router, key in self.places(v) if router == EVERY_ROUTER)

    def others(self, instances: Iterable[Instance]) -> dict[tuple[str, str], int]:
        """Per place, the live nodes that are none of ``instances``': other hosts' (or vassals of
        this emperor the run does not reload). They count for the minimum, never touched."""
        counts = dict(self.live_counts)
        mine = {i for v in instances for i in self._positions(v.name, v.addresses)}
        everywhere = set()
        for node in (self.nodes[i] for i in mine):
            if node.live:
                counts[node.router, node.key] -= 1
                if self.live_everywhere(node):
                    everywhere.add((node.key, node.name))
        for key, _ in everywhere:
            counts[EVERY_ROUTER, key] -= 1
        return {place: count for place, count in counts.items() if count}


def per_key(places: Mapping[tuple[str, str], int]) -> dict[str, int]:
    """The counts of the (``EVERY_ROUTER``, key) places, by key."""
    return {key: n for (router, key), n in places.items() if router == EVERY_ROUTER}


def live_keys(
    vassal: EmperorVassal | None,
    name: str,
    nodes: Iterable[Node],
    addresses: frozenset[str] = frozenset(),
) -> frozenset[str]:
    """The fastrouter keys under which this vassal has a live node; empty unless accepting.
    (The core asks ``Snapshot.live_keys``, which also wants the node live in every router.)"""
    if vassal is None or not vassal.accepting:
        return frozenset()
    return frozenset(n.key for n in nodes if n.live and owns(name, addresses, n.name))


def announced_as(
    name: str,
    listening: Iterable[str],
    snapshot: Snapshot,
    is_local: Callable[[str], bool],
    announce: Iterable[Node] = (),
) -> tuple[frozenset[str], bool]:
    """(the node names a vassal whose master listens on ``listening`` is announced as, whether a
    node matched): ``announce``'s names when its master listens there (a twin, before the router
    has it); the sockets' addresses when a node has one; ``frozenset()`` when a node is named
    after the vassal (``owns``); else the sockets' addresses, unmatched yet."""
    found = {canonical_address(a) for a in listening}
    wanted = frozenset(canonical_address(n.name) for n in announce)
    if wanted and wanted <= found:
        return wanted, True
    addresses = node_addresses(listening, snapshot.names, is_local)
    if addresses and snapshot.nodes_of(name, addresses):
        return addresses, True
    if snapshot.nodes_of(name):
        return frozenset(), True
    return addresses, False


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


def pick_reloads(
    candidates: Sequence[str],
    live: Mapping[str, frozenset[Place]],
    minimum: int,
    free_slots: int | None,
    others: Mapping[Place, int] | None = None,
    budget: Mapping[Place, int] | None = None,
) -> list[str]:
    """Which of ``candidates`` (in order) may go out of rotation now: the one minimum check, for
    the vassals a rollout reloads, the twins a surge removes and the plan of ``--dry-run``.

    ``live`` maps every vassal counted as live (in-flight and timed-out ones already left out) to
    its places (``Snapshot.places``). A vassal that is not live costs nothing and may always go;
    a live one may go only if every place it is live in keeps at least ``minimum`` live nodes
    without it. Not-live vassals go first. ``free_slots`` caps the number started (``None``: no
    cap). ``others``: per place, the live nodes that are not candidates' (``Snapshot.others``).
    ``budget``: per place, how many more live ones may go (``--max-unavailable``).
    """
    per_place: dict[Place, int] = dict(others or {})
    for places in live.values():
        for place in places:
            per_place[place] = per_place.get(place, 0) + 1
    ordered = [v for v in candidates if not live.get(v)] + [v for v in candidates if live.get(v)]
    room = dict(budget or {})
    picked: list[str] = []
    for vassal in ordered:
        if free_slots is not None and len(picked) >= free_slots:
            break
        going: frozenset[Place] = live.get(vassal, frozenset())
        if all(per_place[p] - 1 >= minimum and room.get(p, 1) > 0 for p in going):
            for place in going:
                per_place[place] -= 1
                if place in room:
                    room[place] -= 1
            picked.append(vassal)
    return picked


def unavailable_caps(spec: str, snapshot: Snapshot) -> dict[str, int]:
    """Per key, the most of this run's vassals out of rotation at once (``--max-unavailable``:
    a number, or a percentage of the key's live nodes, every host's, rounded down)."""
    counts = per_key(snapshot.live_counts)
    if spec.endswith("%"):
        return {key: int(float(spec[:-1]) * count / 100) for key, count in counts.items()}
    return dict.fromkeys(counts, int(spec))


def rounds_needed(vassals: int, minimum: int) -> int:
    """Single-reload times a pipelined rollout needs at best: ceil(N / (N - m))."""
    return math.ceil(vassals / (vassals - minimum)) if vassals > minimum else 0


@dataclasses.dataclass(frozen=True)
class Rules:
    """What a run keeps to, the same for each of its machines (``Options.rules``)."""

    minimum: int = 1
    timeout: float = 60.0
    max_parallel: int | None = None
    #: the caller sends packets to the subscription server: drain first, subscribe at once
    drain: bool = False
    drain_timeout: float = 5.0
    #: an instance counts as back (live) only once the caller's probe of its socket passed
    probe: bool = False
    #: twins per key, live before the first reload
    surge: int = 0
    #: vassals per key reloaded first, then watched while they serve for ``soak`` seconds
    canary: int = 0
    soak: float = 0.0
    #: warm-up requests before a reloaded vassal goes back into rotation (kept out until then)
    warmup: bool = False


E = TypeVar("E", bound=enum.Enum)


def _table(phases: type[E], text: str) -> dict[E, frozenset[E]]:
    """A state machine's legal moves, one line per phase (``A -> B C``); phases with no line are
    final."""
    table: dict[E, frozenset[E]] = {phase: frozenset() for phase in phases}
    for line in text.strip().splitlines():
        source, _, targets = line.partition("->")
        table[phases[source.strip()]] = frozenset(phases[t] for t in targets.split())
    return table


class IllegalMove(RuntimeError):
    """A move its phase table does not list: a bug in the core, never bad input."""


#: Where one vassal is in the run, the one record of it, owned by ``Rollout``. DRAINING:
#: unsubscribed from the router, touched once no request is in flight to it there. RELOADING:
#: touched, the emperor has not registered the reload yet. STARTING: registered (or restarted by
#: the emperor), the new instance loads. ACCEPTING: a probe is asked for but no node of it is
#: known to probe yet. PROBING: the probe is out, its answer decides. SUBSCRIBING: accepting (its
#: probe passed, if any), waiting for its node to be live in the router. DRAIN_IGNORED: drained,
#: but a router still had its node live at the drain timeout (it never acted on the unsubscribe:
#: UDP tells no error), not touched, and nothing more starts. ABANDONED: still in flight when the
#: run was given up (interrupted, stats unreadable). DRAINING to SUBSCRIBING are in flight
#: (``IN_FLIGHT``); BACK and the phases after it are final.
Phase = enum.Enum(
    "Phase",
    "PENDING DRAINING RELOADING STARTING ACCEPTING PROBING SUBSCRIBING BACK TIMED_OUT "
    "PROBE_FAILED TOUCH_FAILED DRAIN_IGNORED NOT_STARTED ABANDONED",
)

#: Every legal move of a vassal (docs/design.md draws it); ``Instance.move`` refuses the rest.
PHASE_MOVES = _table(
    Phase,
    """
    PENDING     -> DRAINING RELOADING STARTING NOT_STARTED
    DRAINING    -> RELOADING STARTING DRAIN_IGNORED NOT_STARTED
    RELOADING   -> STARTING ACCEPTING PROBING SUBSCRIBING BACK TIMED_OUT TOUCH_FAILED ABANDONED
    STARTING    -> ACCEPTING PROBING SUBSCRIBING BACK TIMED_OUT ABANDONED
    ACCEPTING   -> STARTING PROBING TIMED_OUT ABANDONED
    PROBING     -> SUBSCRIBING BACK PROBE_FAILED ABANDONED
    SUBSCRIBING -> STARTING BACK TIMED_OUT ABANDONED
    """,
)

IN_FLIGHT = frozenset(
    Phase[p] for p in ["DRAINING", "RELOADING", "STARTING", "ACCEPTING", "PROBING", "SUBSCRIBING"]
)
#: A reload that shows the new code failing (what ``--revert-command`` reverts).
CODE_FAILED = frozenset({Phase.TIMED_OUT, Phase.PROBE_FAILED})
#: Phases in which a vassal counts as live when the stats show it live: untouched, or reloaded.
COUNTS_LIVE = frozenset(
    Phase[p] for p in ["PENDING", "BACK", "NOT_STARTED", "TOUCH_FAILED", "DRAIN_IGNORED"]
)


#: Where one twin is, the one record of it, owned by ``Surge``. PLANNED: in the state file, its
#: link not made yet. STARTING: its link is made (the emperor spawns it), not live in the router
#: yet. PROBING: live in the router (or subscribed by the tool), the probe is out. FAILED: never
#: came up in time, its probe failed, or its link could not be made: the run stops. DRAINING:
#: unsubscribed, its link goes once no request is in flight to it. REMOVED: its link is removed,
#: the emperor still lists it (its master is stopping). GONE: the emperor no longer lists it.
#: KEPT: left in place (removing it would take a key below the minimum, its link is no longer the
#: one the tool made, or the run was given up): the next run removes it.
TwinPhase = enum.Enum(
    "TwinPhase", "PLANNED STARTING PROBING LIVE FAILED DRAINING REMOVED GONE KEPT"
)

#: Every legal move of a twin (docs/design.md draws it).
TWIN_MOVES = _table(
    TwinPhase,
    """
    PLANNED  -> STARTING GONE
    STARTING -> PROBING LIVE FAILED DRAINING REMOVED KEPT
    PROBING  -> STARTING LIVE FAILED DRAINING REMOVED KEPT
    LIVE     -> DRAINING REMOVED KEPT
    FAILED   -> GONE DRAINING REMOVED KEPT
    DRAINING -> REMOVED KEPT
    REMOVED  -> GONE KEPT
    """,
)
#: Twins whose removal has not begun.
TWIN_UP = frozenset({TwinPhase.STARTING, TwinPhase.PROBING, TwinPhase.LIVE, TwinPhase.FAILED})


class NotStarted(enum.Enum):
    """Why a vassal in ``Phase.NOT_STARTED`` was never touched."""

    UNKNOWN = enum.auto()  # the emperor did not list it for the whole timeout
    STARTING = enum.auto()  # the emperor was starting it (not accepting) for the whole timeout
    MINIMUM = enum.auto()  # reloading it would take a key below the minimum
    STOPPED = enum.auto()  # a failed probe or touch stopped the rollout (``Rollout.stopped_by``)
    ABANDONED = enum.auto()  # the driver gave the run up (``Rollout.abandoned``)
    MISSING = enum.auto()  # live earlier, then out of the router for the whole timeout
    CANARY = enum.auto()  # held back while the canaries went, and a canary failed


class Outcome(str, enum.Enum):
    """A vassal's outcome as the ``--json`` report spells it (``outcome(phase)``)."""

    RELOADED = "reloaded"
    TIMED_OUT = "timed out"
    FAILED = "failed"
    NOT_STARTED = "not started"
    IN_FLIGHT = "in flight"


@dataclasses.dataclass
class Instance:
    """What the core knows of one vassal of the emperor, whichever machine drives it (an
    original a ``Rollout`` reloads, a twin a ``Surge`` adds and removes). Times are seconds since
    the run started."""

    id: str
    name: str
    config: str
    #: the one record of where it is: moved by its machine through ``move`` only
    phase: Any = None
    #: the node names it is announced as, from the sockets its master listens on (``owns``);
    #: empty: a node is its when the node's socket is named after it
    addresses: frozenset[str] = frozenset()
    #: its fastrouter nodes when it was taken out: what a subscribe announces again
    nodes: tuple[Node, ...] = ()
    #: draining: when it was taken out of the router, how long until its ``ref`` reached 0
    drain_started: float | None = None
    drained: float | None = None

    MOVES: ClassVar[Mapping[Any, frozenset[Any]]] = {}

    def move(self, to: enum.Enum) -> None:
        """The one way a phase changes: a move its table (``MOVES``) does not list is refused."""
        if to is not self.phase and to not in self.MOVES[self.phase]:
            raise IllegalMove(f"{self.name}: {self.phase.name} -> {to.name} is not a legal move")
        self.phase = to


@dataclasses.dataclass
class VassalReload(Instance):
    """One vassal the run reloads: its ``phase``, and what the run saw of it on the way (data
    for the report, not state: decisions read ``phase``)."""

    phase: Phase = Phase.PENDING
    #: what /proc showed its master listening on when the run began (``locate``)
    listening: tuple[str, ...] = ()
    #: the places it was live in during this run, and since when it waits to start
    #: (``Rollout._waiting``)
    seen_in: frozenset[tuple[str, str]] = frozenset()
    waiting_since: float | None = None
    #: the emperor's view when the run first saw it; ``baseline`` when it started reloading
    initial: EmperorVassal | None = None
    baseline: EmperorVassal | None = None
    triggered: float | None = None
    #: first seen accepting after the emperor registered its reload (before the router has it)
    accepting: float | None = None
    back: float | None = None
    #: requests still in flight when its drain timed out (``None``: it drained in time)
    drain_left: int | None = None
    #: the routers that still had it live at the drain timeout (``Phase.DRAIN_IGNORED``)
    ignored_by: tuple[str, ...] = ()
    #: the in-flight phase it was in when it timed out or the run was given up
    stalled_in: Phase | None = None
    not_started: NotStarted | None = None
    probe_result: ProbeResult | None = None
    touch_error: str = ""

    MOVES: ClassVar[Mapping[Any, frozenset[Any]]] = PHASE_MOVES

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


@dataclasses.dataclass
class Twin(Instance):
    """One temporary vassal: a new link (``config``) to what its original's (``of``) links to
    (``target``)."""

    phase: TwinPhase = TwinPhase.PLANNED
    target: str = ""
    of: str = ""
    #: found in the state file of an earlier run
    leftover: bool = False
    #: its node names are known (``announced_as``)
    located: bool = False
    added: float | None = None
    live: float | None = None
    removed: float | None = None
    gone: float | None = None
    detail: str = ""
    #: the nodes it will be announced as: its original's, renamed after it (``twin_nodes``);
    #: subscribed by the tool as soon as it accepts, once its master is seen listening there
    announce: tuple[Node, ...] = ()
    #: when the tool subscribed it (the fast start), and whether its probe passed
    subscribed: float | None = None
    probe_passed: bool = False

    MOVES: ClassVar[Mapping[Any, frozenset[Any]]] = TWIN_MOVES

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


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


#: What happened to a vassal or a twin in one step; its line is ``event_text``. UNSUBSCRIBED_AGAIN:
#: its master announced it again; TRIGGERED_UNDRAINED: its drain timed out, touched with requests
#: in flight to it; RESTARTED: the emperor restarted it (a new pid), waited for, not touched;
#: SUBSCRIBED: the fast return (or start), subscribed as soon as it accepts (and its probe
#: passed); FAILED: its probe failed, its config could not be touched, a twin never came up, a
#: canary failed its soak. A twin's own: ADD (the caller makes its link), LIVE, REMOVE (the caller
#: removes its link), GONE, KEPT. COMMAND: the caller runs a team's command (``--canary-check``,
#: ``--revert-command``), then hands the result to the machine's ``ran``; SOAKED: the canaries
#: served the whole soak, healthy.
EventKind = enum.Enum(
    "EventKind",
    "DRAINING UNSUBSCRIBED_AGAIN TRIGGERED TRIGGERED_NOT_LIVE TRIGGERED_DRAINED "
    "TRIGGERED_UNDRAINED RESTARTED PROBE SUBSCRIBED BACK TIMED_OUT FAILED NOT_STARTED "
    "ADD LIVE REMOVE GONE KEPT COMMAND SOAKED",
)
#: Events whose vassal the caller touches.
TRIGGERS = frozenset(k for k in EventKind if k.name.startswith("TRIGGERED"))


@dataclasses.dataclass(frozen=True)
class Event:
    at: float
    vassal: Instance
    kind: EventKind
    #: the vassal's phase when it happened
    phase: enum.Enum | None
    #: packets the caller sends to the subscription server
    send: tuple[Subscription, ...] = ()
    #: the node the caller probes (``PROBE``), then hands the result to the machine's ``probed``
    probe: Node | None = None
    #: the probe answer it follows from (``SUBSCRIBED``, ``FAILED``)
    result: ProbeResult | None = None
    #: ``RESTARTED``: the vassal's master pid before and after
    pids: tuple[int, int] | None = None
    #: ``COMMAND``: what the caller runs
    command: str | None = None
    #: the words of an event whose machine says them itself (a soak, a command)
    words: str = ""

    @property
    def touches(self) -> bool:
        return self.kind in TRIGGERS


def _event(v: Instance, kind: EventKind, now: float, **details: Any) -> Event:
    return Event(now, v, kind, v.phase, **details)


def drain_done(snapshot: Snapshot, v: Instance) -> tuple[bool, int]:
    """(drained, requests in flight): drained when no node of the vassal is live and none has a
    request in flight, in any router. An unsubscribed node with ``ref`` 0 is removed at once,
    one with requests in flight only death-marked (plugins/corerouter/cr_common.c)."""
    mine = snapshot.nodes_of(v.name, v.addresses)
    in_flight = sum(n.ref for n in mine)
    return not any(n.live for n in mine) and in_flight == 0, in_flight


def take_out(v: Instance, snapshot: Snapshot, now: float, rules: Rules) -> Event | None:
    """Drain first: unsubscribe the vassal's live nodes (remembering them all for the subscribe
    that puts it back); ``None`` when there is nothing to drain or no subscription server."""
    v.nodes = tuple(snapshot.nodes_of(v.name, v.addresses))
    live = [n for n in v.nodes if n.live]
    if not rules.drain or not live:
        return None
    v.drain_started = now
    v.move(type(v.phase).DRAINING)
    return _event(v, EventKind.DRAINING, now, send=subscriptions(Command.UNSUBSCRIBE, live))


def unsubscribe_again(
    v: Instance, snapshot: Snapshot, now: float, routers: Iterable[str] | None = None
) -> list[Event]:
    """Its master re-announces every subscribe-freq cycles (core/master.c), undoing our
    unsubscribe: send it again whenever its node shows up live (in ``routers`` only, if given)."""
    where = None if routers is None else set(routers)
    again = [
        n
        for n in snapshot.nodes_of(v.name, v.addresses)
        if n.live and (where is None or n.router in where)
    ]
    if not again:
        return []
    return [
        _event(v, EventKind.UNSUBSCRIBED_AGAIN, now, send=subscriptions(Command.UNSUBSCRIBE, again))
    ]


def probe_target(v: Instance, snapshot: Snapshot, known: Iterable[Node]) -> Node | None:
    """The node to probe: as it is in the router now, or else one of ``known`` (its nodes as they
    were, or will be: the socket path is the same across a reload)."""
    nodes = sorted(snapshot.nodes_of(v.name, v.addresses) or known, key=lambda n: (n.key, n.name))
    return nodes[0] if nodes else None


class Machine:
    """What ``Driver.drive`` steps: a state machine over one kind of instance, with no I/O.
    ``step`` decides from one poll; the other methods are how the driver tells it what happened
    (its defaults: nothing to locate, to answer or to undo)."""

    rules: Rules
    #: why the driver gave it up (``abandon``)
    abandoned: str | None = None

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def step(self, snapshot: Snapshot, now: float) -> list[Event]:
        raise NotImplementedError

    def watch_closely(self) -> bool:
        """Poll every ``CLOSE_WATCH_INTERVAL`` rather than ``--check-interval``."""
        return False

    def unlocated(self, snapshot: Snapshot) -> list[Instance]:
        """The instances whose node names are not known yet (the driver reads /proc)."""
        return []

    def located(self, v: Instance, addresses: frozenset[str]) -> None:
        v.addresses = addresses

    def probed(self, v: Instance, result: ProbeResult, now: float) -> list[Event]:
        """The answer to the probe of a ``PROBE`` event."""
        return []

    def act_failed(self, v: Instance, error: str, now: float) -> list[Event]:
        """The driver could not do what an event asked (touch a config, make or remove a link)."""
        return []

    def ran(self, v: Instance, result: CommandResult, now: float) -> list[Event]:
        """What the command of a ``COMMAND`` event gave."""
        return []

    def abandon(self, reason: str, now: float) -> list[Event]:
        """The driver gives the machine up: a signal, stats unreadable, an error."""
        self.abandoned = reason
        return []


class Rollout(Machine):
    """The originals' state machine: ``step`` decides from one snapshot, with no I/O of its own.

    Each vassal's ``phase`` moves here only (``PHASE_MOVES``): by ``step`` from what the stats
    show, and by the methods through which the caller reports what it did (``probed``,
    ``act_failed``, ``abandon``). With ``rules.drain`` a live vassal is drained (unsubscribed,
    and touched once the router has no request in flight to it, or after the drain timeout) and
    subscribed again as soon as it accepts (the fast return). With ``rules.probe`` a vassal
    counts as back only after the caller's probe of its socket passed; a failed probe stops the
    rollout.
    """

    def __init__(self, vassals: Sequence[VassalReload], rules: Rules) -> None:
        self.vassals = {v.id: v for v in vassals}
        self.rules = rules
        self.lowest_live: dict[str, int] = {}
        #: the vassal whose failed probe, touch or drain stopped the rollout: nothing more starts
        self.stopped_by: VassalReload | None = None
        #: vassals that may not start yet: the rest, while the canaries go first (``release``)
        self.held: set[str] = set()
        #: why the canaries failed (``canary_failed``)
        self.canary_failure: str | None = None
        #: per key, the most of its vassals out of rotation at once (``unavailable_caps``)
        self.caps: dict[str, int] | None = None
        #: the last snapshot stepped on: what a probe's answer is weighed against
        self._last: Snapshot | None = None
        #: per draining vassal, the routers that had its node live since its unsubscribe, and
        #: those of them that then had it no longer (they act on the tool's packets)
        self._routed: dict[str, set[str]] = {}
        self._acted: dict[str, set[str]] = {}
        #: per place, the most live nodes of other hosts seen in this run; since when nothing is
        #: in flight and nothing may start (``_stuck``)
        self._others_seen: dict[tuple[str, str], int] = {}
        self._stuck_since: float | None = None

    def in_phase(self, *phases: Phase) -> list[VassalReload]:
        return [v for v in self.vassals.values() if v.phase in phases]

    def watch_closely(self) -> bool:
        """A drained vassal is out of the router but its reload has not begun (draining, or
        touched and not yet registered by the emperor). Its master may re-announce it now, and a
        request the router sends it after the touch waits out the whole restart (or fails with a
        broken deploy): poll often so that a re-announce is undone at once. Once the reload has
        begun its master announces nothing until the new instance is up (core/master.c)."""
        return any(
            v.phase is Phase.DRAINING
            or (v.phase is Phase.RELOADING and v.drain_started is not None)
            or self._warming(v)
            for v in self.vassals.values()
        )

    def _warming(self, v: VassalReload) -> bool:
        """With warm-up, a drained vassal stays out of rotation from its touch until it passed
        its warm-up (and probe): its master's own announce is undone."""
        return (
            self.rules.warmup
            and v.drain_started is not None
            and v.phase in (Phase.STARTING, Phase.ACCEPTING, Phase.PROBING)
        )

    @property
    def done(self) -> bool:
        return not self._pending() and not self.in_phase(*IN_FLIGHT)

    def _pending(self) -> list[VassalReload]:
        return [v for v in self.in_phase(Phase.PENDING) if v.id not in self.held]

    def release(self) -> Rollout:
        """The canaries passed: the vassals held back may start."""
        self.held.clear()
        return self

    def canary_failed(self, why: str) -> None:
        """A canary failed its soak: the vassals held back are not started."""
        self.canary_failure = why
        for v in self.in_phase(Phase.PENDING):
            if v.id in self.held:
                v.not_started = NotStarted.CANARY
                v.move(Phase.NOT_STARTED)

    def step(self, snapshot: Snapshot, now: float) -> list[Event]:
        """Record who is back or timed out, drain, then mark the vassals that may start now.

        The caller touches the config of every vassal in an event that ``touches`` (reporting a
        failure to ``act_failed``), sends every event's ``send`` packets, and probes the node of
        every ``probe`` event, handing each answer to ``probed``. While a probe is out, nothing
        else is decided (its outcome may stop the rollout); the vassals in flight are followed.
        """
        self._last = snapshot
        events = self._adopt_restarted(snapshot, now)
        probes = self._reloads(snapshot, now, events)
        if probes or self.in_phase(Phase.PROBING):
            return events + probes
        if self.rules.drain:  # a vassal whose probe failed stays out for as long as the run lasts
            for v in self.in_phase(Phase.PROBE_FAILED):
                events += unsubscribe_again(v, snapshot, now)
        if snapshot.unreadable:
            # Nothing is live there: no drain is done, nothing may start, no count is known.
            return events
        for v in self.in_phase(Phase.DRAINING):
            events += self._drain(v, snapshot, now)
        live = {}
        for v in self.in_phase(*COUNTS_LIVE):
            places = snapshot.places(v)
            if places:
                live[v.id] = places
        others = snapshot.others(self.vassals.values())
        self._count_lowest(live, others)
        if self.stopped_by is not None:
            return events + self._stop(now)
        free = self.rules.max_parallel
        if free is not None:
            free -= len(self.in_phase(*IN_FLIGHT))
        waiting = self._waiting(live, snapshot, now)
        candidates = [v.id for v in self._pending() if v.id not in waiting]
        budget = self._budget()
        for vassal_id in pick_reloads(candidates, live, self.rules.minimum, free, others, budget):
            v = self.vassals[vassal_id]
            v.baseline = snapshot.vassals[vassal_id]
            drain = take_out(v, snapshot, now, self.rules) if v.baseline.accepting else None
            if drain is not None:
                self._acted[v.id] = set()
                self._routed[v.id] = {n.router for n in v.nodes if n.live}
                events.append(drain)
                continue
            v.triggered = now
            v.move(Phase.RELOADING)
            kind = EventKind.TRIGGERED if vassal_id in live else EventKind.TRIGGERED_NOT_LIVE
            events.append(_event(v, kind, now))
        if self._stuck(waiting, others, now):
            # Nothing in flight, nothing may start, none may come back: no live count can rise.
            for v in self._pending():
                current = snapshot.vassals.get(v.id)
                v.not_started = (
                    NotStarted.UNKNOWN
                    if current is None
                    else NotStarted.STARTING
                    if not current.accepting
                    else NotStarted.MISSING
                    if v.id in waiting
                    else NotStarted.MINIMUM
                )
                v.move(Phase.NOT_STARTED)
                events.append(_event(v, EventKind.NOT_STARTED, now))
        return events

    def _waiting(
        self, live: Mapping[str, frozenset[tuple[str, str]]], snapshot: Snapshot, now: float
    ) -> dict[str, float]:
        """Pending vassals that may not start now, with since when they wait (at most the
        timeout: then they are not started). Those the emperor does not list or is starting:
        uWSGI 2.0 loses a reload that reaches a vassal before it accepts, and its master then
        ignores reloads for worker-reload-mercy; they wait until it accepts. And those out of a
        router (or key) they were live in earlier in the run, though they accept: a restarted
        router has lost every node until the masters announce again; they wait for that, not a
        reload (it would keep them out a reload longer, and costs the minimum nothing only when
        down; a vassal live in another router would be counted there only)."""
        waiting = {}
        for v in self.in_phase(Phase.PENDING):
            current = snapshot.vassals.get(v.id)
            places = live.get(v.id, frozenset())
            v.seen_in |= places
            if current is not None and current.accepting and places >= v.seen_in:
                v.waiting_since = None
            else:
                v.waiting_since = now if v.waiting_since is None else v.waiting_since
                waiting[v.id] = v.waiting_since
        return waiting

    def _stuck(
        self, waiting: Mapping[str, float], others: Mapping[tuple[str, str], int], now: float
    ) -> bool:
        """Nothing in flight, nothing may start, and nothing that could give room came back
        within the timeout: a vassal waited for, or other hosts' nodes seen live earlier in the
        run (their hosts are reloading: room comes back when they are done)."""
        for place, count in others.items():
            self._others_seen[place] = max(count, self._others_seen.get(place, 0))
        if self.in_phase(*IN_FLIGHT):
            self._stuck_since = None
            return False
        self._stuck_since = now if self._stuck_since is None else self._stuck_since
        fewer = any(others.get(place, 0) < n for place, n in self._others_seen.items())
        since = [*waiting.values(), *([self._stuck_since] if fewer else [])]
        return all(now - t >= self.rules.timeout for t in since)

    def _budget(self) -> dict[tuple[str, str], int] | None:
        """Per key, how many more may go out of rotation: the cap less the vassals this run has
        out now (in flight, or failed and kept out)."""
        if self.caps is None:
            return None
        out = collections.Counter(
            key
            for v in self.in_phase(*IN_FLIGHT, *CODE_FAILED, Phase.ABANDONED)
            for key in {n.key for n in v.nodes}
        )
        return {(EVERY_ROUTER, key): cap - out[key] for key, cap in self.caps.items()}

    def _count_lowest(
        self, live: Mapping[str, frozenset[tuple[str, str]]], others: Mapping[tuple[str, str], int]
    ) -> None:
        counts = dict(others)
        for places in live.values():
            for place in places:
                counts[place] = counts.get(place, 0) + 1
        for key in set(self.lowest_live) | {key for _, key in counts}:
            count = counts.get((EVERY_ROUTER, key), 0)
            self.lowest_live[key] = min(self.lowest_live.get(key, count), count)

    def _stage(self, v: VassalReload, snapshot: Snapshot) -> Stage:
        assert v.baseline is not None
        return reload_stage(v.baseline, snapshot.vassals.get(v.id), snapshot.live_keys(v))

    def _reloads(self, snapshot: Snapshot, now: float, events: list[Event]) -> list[Event]:
        """Advance every touched vassal; return the probes to run before deciding anything else."""
        probes = []
        for v in self.in_phase(*IN_FLIGHT):
            if v.phase is Phase.DRAINING:
                continue
            assert v.triggered is not None
            stage = self._stage(v, snapshot)
            if v.accepting is None and stage in (Stage.ACCEPTING, Stage.BACK):
                v.accepting = now
            if stage is Stage.BACK and self._warming(v):
                events += unsubscribe_again(v, snapshot, now)  # its master announced it: not yet
            if v.phase is Phase.PROBING:
                continue  # its answer decides; the probe's own timeout bounds the wait
            if stage is Stage.TOUCHED:
                # Once the emperor registered the reload, a vassal never goes back to RELOADING:
                # one that dies while starting (a broken deploy) vanishes from the emperor's
                # stats until it is respawned, and is still a reload in flight, not the old
                # instance (core/emperor.c removes a dead vassal, then spawns it again).
                if v.phase is Phase.RELOADING and v.drain_started is not None:
                    # The old instance re-announced itself before the emperor acted on the touch.
                    events += unsubscribe_again(v, snapshot, now)
            elif stage is Stage.REGISTERED:
                v.move(Phase.STARTING)
            elif self.rules.probe and v.phase is not Phase.SUBSCRIBING:
                target = probe_target(v, snapshot, v.nodes)
                v.move(Phase.ACCEPTING if target is None else Phase.PROBING)
                if target is not None:
                    probes.append(_event(v, EventKind.PROBE, now, probe=target))
                    continue
            elif stage is Stage.ACCEPTING:
                if v.phase is not Phase.SUBSCRIBING:
                    v.move(Phase.SUBSCRIBING)
                    events += self._fast_return(v, now)
            else:
                events.append(self._back(v, now))
                continue
            if now - v.triggered >= self.rules.timeout:
                v.stalled_in = v.phase
                v.move(Phase.TIMED_OUT)
                back = self._put_back(v) if self._old_instance_serves(v, snapshot) else ()
                events.append(_event(v, EventKind.TIMED_OUT, now, send=back))
        return probes

    def _back(self, v: VassalReload, now: float) -> Event:
        v.back = now
        v.move(Phase.BACK)
        return _event(v, EventKind.BACK, now)

    def _fast_return(
        self, v: VassalReload, now: float, result: ProbeResult | None = None
    ) -> list[Event]:
        """Subscribe the reloaded vassal's nodes at once, not on its master's next announce."""
        if not self.rules.drain or not v.nodes:
            return []
        send = subscriptions(Command.SUBSCRIBE, v.nodes)
        return [_event(v, EventKind.SUBSCRIBED, now, send=send, result=result)]

    def probed(self, v: Instance, result: ProbeResult, now: float) -> list[Event]:
        """The answer to the probe a ``probe`` event asked for."""
        assert isinstance(v, VassalReload)
        if v.phase is not Phase.PROBING:
            return []  # the run was given up meanwhile
        v.probe_result = result
        if result.ok:
            assert self._last is not None
            if self._stage(v, self._last) is Stage.BACK and not self.rules.warmup:
                return [self._back(v, now)]
            v.move(Phase.SUBSCRIBING)
            return self._fast_return(v, now, result)
        v.move(Phase.PROBE_FAILED)
        self.stopped_by = self.stopped_by or v
        out = [n for n in v.nodes if n.live] if self.rules.drain else []
        send = subscriptions(Command.UNSUBSCRIBE, out)
        return [_event(v, EventKind.FAILED, now, send=send, result=result)]

    def act_failed(self, v: Instance, error: str, now: float) -> list[Event]:
        """The caller could not touch the config of a vassal an event triggered: it stays as it
        was (subscribed again if it was drained), and nothing more starts (the next touch would
        most likely fail the same way)."""
        assert isinstance(v, VassalReload)
        v.touch_error = error
        v.move(Phase.TOUCH_FAILED)
        self.stopped_by = self.stopped_by or v
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
        if not self.rules.drain or v.drain_started is None:
            return ()
        return subscriptions(Command.SUBSCRIBE, (n for n in v.nodes if n.live))

    def _drain(self, v: VassalReload, snapshot: Snapshot, now: float) -> list[Event]:
        """Touch once the router has no request in flight to the vassal, or at the deadline."""
        assert v.drain_started is not None and v.baseline is not None
        current = snapshot.vassals.get(v.id)
        if current is not None and current.pid != v.baseline.pid:
            # It died and the emperor is starting it with the current code: touching it would
            # reload it in the middle of its start. Wait for it like a reload in flight.
            v.drained, v.triggered = now - v.drain_started, now
            v.move(Phase.STARTING)
            return [_event(v, EventKind.RESTARTED, now, pids=(v.baseline.pid, current.pid))]
        # A router acted on the unsubscribe when it had the node live since the drain began
        # and then did not; one that never had it live has shown nothing yet.
        seen, acted = self._routed.setdefault(v.id, set()), self._acted.setdefault(v.id, set())
        live_in = {n.router for n in snapshot.nodes_of(v.name, v.addresses) if n.live}
        acted.update(seen - live_in)
        seen |= live_in
        drained, in_flight = drain_done(snapshot, v)
        took = now - v.drain_started
        # again only where it was out and came back (its master's announce): a router that
        # has not acted yet is not sent the same packet at every poll
        events = [] if drained else unsubscribe_again(v, snapshot, now, acted)
        if not drained and took >= self.rules.drain_timeout:
            ignored = tuple(r for r in snapshot.routers if r in live_in and r not in acted)
            if ignored:
                return self._drain_ignored(v, ignored, now)
            if live_in:
                return events  # re-announced where the drain worked: out again, then touched
        if drained:
            kind = EventKind.TRIGGERED_DRAINED
        elif took >= self.rules.drain_timeout:
            kind, v.drain_left = EventKind.TRIGGERED_UNDRAINED, in_flight
        else:
            return events
        v.drained = took
        v.baseline = snapshot.vassals.get(v.id, v.baseline)
        v.triggered = now
        v.move(Phase.RELOADING)
        events.append(_event(v, kind, now))
        return events

    def _drain_ignored(self, v: VassalReload, routers: tuple[str, ...], now: float) -> list[Event]:
        """A router had the node live all along: it never acted on the unsubscribe (a
        subscription server of another router, or none at that address: UDP tells no error).
        Touching it would send requests into its restart; so it is not touched, it goes back
        where it was taken out, and nothing more starts (the next drain would go the same way).
        It still counts as live: the minimum holds as before."""
        v.drained, v.ignored_by = now - (v.drain_started or now), routers
        v.move(Phase.DRAIN_IGNORED)
        self.stopped_by = self.stopped_by or v
        return [_event(v, EventKind.FAILED, now, send=self._put_back(v))]

    def _stop(self, now: float) -> list[Event]:
        """Nothing more starts: pending vassals are not started, drained ones go back untouched."""
        events = []
        for v in self.in_phase(Phase.DRAINING, Phase.PENDING):
            back = self._put_back(v)
            v.not_started = NotStarted.STOPPED
            v.move(Phase.NOT_STARTED)
            events.append(_event(v, EventKind.NOT_STARTED, now, send=back))
        return events

    def _adopt_restarted(self, snapshot: Snapshot, now: float) -> list[Event]:
        """A pending vassal with a new pid died and was started again by the emperor: it is
        loading the current code already. Touching it would reload it in the middle of its start
        and drop what queued on its socket; wait for it instead, like a reload in flight."""
        events = []
        for v in self.in_phase(Phase.PENDING):
            current = snapshot.vassals.get(v.id)
            if current is None:
                continue
            if v.initial is None:
                v.initial = current
            elif current.pid != v.initial.pid:
                v.baseline, v.triggered = v.initial, now
                v.move(Phase.STARTING)
                pids = (v.initial.pid, current.pid)
                events.append(_event(v, EventKind.RESTARTED, now, pids=pids))
        return events

    def abandon(self, reason: str, now: float) -> list[Event]:
        """Give the run up: in-flight vassals stay in flight, pending ones are not started; the
        events put the draining (untouched) ones back into rotation."""
        self.abandoned = reason
        events = []
        for v in self.in_phase(Phase.PENDING, *IN_FLIGHT):
            if v.phase in (Phase.PENDING, Phase.DRAINING):
                back = self._put_back(v)
                v.not_started = NotStarted.ABANDONED
                v.move(Phase.NOT_STARTED)
                if back:
                    events.append(_event(v, EventKind.NOT_STARTED, now, send=back))
            else:
                v.stalled_in = v.phase
                v.move(Phase.ABANDONED)
        return events


class Surge(Machine):
    """The twins' state machine: ``step`` decides from one snapshot, with no I/O of its own.

    Adding (until ``remove`` is called): every twin's link is made and the twin followed until it
    is live in the router (and passed the probe); one that is not within the timeout fails the
    surge. Removing: each twin goes only while every place it is live in keeps the minimum
    without it (``pick_reloads``): drained first (with ``rules.drain``), then its link removed,
    then gone once the emperor no longer lists it.
    """

    def __init__(self, twins: Sequence[Twin], rules: Rules) -> None:
        self.twins = list(twins)
        self.rules = rules
        self.removing = False
        #: when the removal began: the deadline of the whole removal
        self.removal_started: float | None = None
        self._last: Snapshot | None = None

    def in_phase(self, *phases: TwinPhase) -> list[Twin]:
        return [t for t in self.twins if t.phase in phases]

    def remove(self) -> Surge:
        """From now on ``step`` removes the twins."""
        self.removing = True
        return self

    @property
    def failed(self) -> list[Twin]:
        return self.in_phase(TwinPhase.FAILED)

    @property
    def done(self) -> bool:
        if self.removing:
            return not self.in_phase(
                *TWIN_UP, TwinPhase.PLANNED, TwinPhase.DRAINING, TwinPhase.REMOVED
            )
        if self.failed:  # the run stops: once no probe is out
            return not self.in_phase(TwinPhase.PROBING)
        return all(t.phase is TwinPhase.LIVE for t in self.twins)

    @property
    def left(self) -> list[Twin]:
        """The twins whose links may still be there (or whose masters still run)."""
        return self.in_phase(*TWIN_UP, TwinPhase.DRAINING, TwinPhase.REMOVED, TwinPhase.KEPT)

    def watch_closely(self) -> bool:
        """A drained twin may be re-announced by its master: poll often while one drains."""
        return bool(self.in_phase(TwinPhase.DRAINING))

    def unlocated(self, snapshot: Snapshot) -> list[Instance]:
        return [t for t in self.twins if not t.located]

    def located(self, t: Instance, addresses: frozenset[str]) -> None:
        """The node names the twin's master is announced as (the caller read /proc)."""
        assert isinstance(t, Twin)
        t.addresses, t.located = addresses, True

    def step(self, snapshot: Snapshot, now: float) -> list[Event]:
        self._last = snapshot
        return self._down(snapshot, now) if self.removing else self._up(snapshot, now)

    def _up(self, snapshot: Snapshot, now: float) -> list[Event]:
        events = []
        for t in self.twins:
            if t.phase is TwinPhase.PLANNED:
                t.added = now
                t.move(TwinPhase.STARTING)
                events.append(_event(t, EventKind.ADD, now))
                continue
            if t.phase is not TwinPhase.STARTING:
                continue
            current = snapshot.vassals.get(t.id)
            live = bool(snapshot.live_keys(t))
            if live or self._may_start(t, current):
                # Its master announces itself only once its accepting hook ran: the tool
                # subscribes it itself as soon as it accepts (core/master.c).
                if self.rules.probe and not t.probe_passed:
                    t.move(TwinPhase.PROBING)
                    target = probe_target(t, snapshot, t.announce)
                    events.append(_event(t, EventKind.PROBE, now, probe=target))
                elif live:
                    t.live = now
                    t.move(TwinPhase.LIVE)
                    events.append(_event(t, EventKind.LIVE, now))
                else:
                    events.append(self._subscribe(t, now))
            elif t.added is not None and now - t.added >= self.rules.timeout:
                if current is None:
                    how = "the emperor never ran it (or it keeps dying: see its log)"
                elif not current.accepting:
                    how = "never accepting (did the app fail to load? see its log)"
                else:
                    how = "accepting, but its node never became live in the fastrouter"
                events.append(self._fail(t, f"not live after {self.rules.timeout:g}s: {how}", now))
        return events

    def _may_start(self, t: Twin, current: EmperorVassal | None) -> bool:
        """The fast start: the tool can subscribe the twin itself (it has the subscription
        server, the twin accepts, its master listens where its nodes will be) and has not yet."""
        return (
            self.rules.drain
            and t.subscribed is None
            and bool(t.announce)
            and bool(t.addresses)
            and current is not None
            and current.accepting
        )

    def _subscribe(self, t: Twin, now: float) -> Event:
        t.subscribed = now
        send = subscriptions(Command.SUBSCRIBE, t.announce)
        return _event(t, EventKind.SUBSCRIBED, now, send=send)

    def _fail(self, t: Twin, detail: str, now: float) -> Event:
        t.detail = detail
        t.move(TwinPhase.FAILED)
        return _event(t, EventKind.FAILED, now)

    def probed(self, t: Instance, result: ProbeResult, now: float) -> list[Event]:
        assert isinstance(t, Twin)
        if t.phase is not TwinPhase.PROBING:
            return []
        if not result.ok:
            return [self._fail(t, f"probe failed: {result.detail}", now)]
        t.probe_passed = True
        if self._last is not None and self._last.live_keys(t):
            t.live = now
            t.move(TwinPhase.LIVE)
            return [_event(t, EventKind.LIVE, now)]
        t.move(TwinPhase.STARTING)
        return [self._subscribe(t, now)] if self.rules.drain and t.subscribed is None else []

    def act_failed(self, t: Instance, error: str, now: float) -> list[Event]:
        """The caller could not make the twin's link (there is nothing to remove then), or could
        not remove it (it stays, for the next run)."""
        assert isinstance(t, Twin)
        if t.phase is TwinPhase.REMOVED:
            t.detail = f"not removed: {error}"
            t.move(TwinPhase.KEPT)
            return [_event(t, EventKind.KEPT, now)]
        event = self._fail(t, f"cannot make its link: {error}", now)
        t.move(TwinPhase.GONE)
        return [event]

    def _down(self, snapshot: Snapshot, now: float) -> list[Event]:
        """Drain and remove every twin that may go now; follow the removed ones until gone."""
        if self.removal_started is None:
            self.removal_started = now
        overdue = now - self.removal_started >= self.rules.timeout
        events: list[Event] = []
        for t in self.in_phase(TwinPhase.PLANNED):
            t.move(TwinPhase.GONE)  # never made
        for t in self.in_phase(TwinPhase.REMOVED):
            if t.id not in snapshot.vassals:
                t.gone = now
                t.move(TwinPhase.GONE)
                events.append(_event(t, EventKind.GONE, now))
            elif overdue:
                t.detail = (
                    f"link removed, but the emperor still lists it after {self.rules.timeout:g}s"
                )
                t.move(TwinPhase.KEPT)
                events.append(_event(t, EventKind.KEPT, now))
        for t in self.in_phase(TwinPhase.DRAINING):
            assert t.drain_started is not None
            took = now - t.drain_started
            if drain_done(snapshot, t)[0] or took >= self.rules.drain_timeout:
                t.drained = took
                events.append(self._remove(t, now))
            else:
                events += unsubscribe_again(t, snapshot, now)
        if snapshot.unreadable:
            return events
        up = self.in_phase(*TWIN_UP)
        live = {t.id: snapshot.places(t) for t in up}
        others = snapshot.others(self.twins)
        going = set(pick_reloads([t.id for t in up], live, self.rules.minimum, None, others))
        for t in up:
            if t.id in going:
                events.append(take_out(t, snapshot, now, self.rules) or self._remove(t, now))
            elif overdue:
                t.detail = (
                    f"removing it would leave fewer than {self.rules.minimum} live; the next "
                    "run removes it"
                )
                t.move(TwinPhase.KEPT)
                events.append(_event(t, EventKind.KEPT, now))
        return events

    def _remove(self, t: Twin, now: float) -> Event:
        t.removed = now
        t.move(TwinPhase.REMOVED)
        return _event(t, EventKind.REMOVE, now)

    def abandon(self, reason: str, now: float) -> list[Event]:
        """Give up: twins still starting fail (the run removes them); while removing, what is
        left stays for the next run (the state file keeps it)."""
        self.abandoned = reason
        if not self.removing:
            return [
                self._fail(t, reason, now)
                for t in self.in_phase(TwinPhase.STARTING, TwinPhase.PROBING)
            ]
        events = []
        for t in self.in_phase(*TWIN_UP, TwinPhase.DRAINING):
            t.detail = reason
            t.move(TwinPhase.KEPT)
            events.append(_event(t, EventKind.KEPT, now))
        return events


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What a team's command (``--canary-check``, ``--revert-command``) gave: its exit code
    (``None``: it could not run, or ran past its time and was killed), the end of its output."""

    code: int | None
    output: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        said = f": {self.output}" if self.output else ""
        return (f"exited {self.code}" if self.code is not None else "did not finish") + said


#: Seconds between two probes of each canary while it soaks.
SOAK_PROBE_INTERVAL = 1.0


def pick_canaries(fleet: Sequence[VassalReload], snapshot: Snapshot, per_key: int) -> list[str]:
    """The vassals that go first: ``per_key`` live vassals of each fastrouter key (a vassal that
    serves several keys counts for each), in the fleet's order."""
    keys = {v.id: snapshot.live_keys(v) for v in fleet}
    chosen: list[str] = []
    for key in sorted({k for ks in keys.values() for k in ks}):
        serving = [v.id for v in fleet if key in keys[v.id]]
        for vid in serving:
            if sum(1 for c in chosen if key in keys[c]) >= per_key:
                break
            if vid not in chosen:
                chosen.append(vid)
    return chosen


class Soak(Machine):
    """The canaries serve real traffic for ``rules.soak`` seconds (Kubernetes' minReadySeconds,
    Nomad's min_healthy_time), watched: each keeps its master (a vassal that crashes is respawned
    by the emperor: a new pid, or its respawns moved), keeps accepting, the routers open every
    connection to it (``failcnt`` does not move), and with ``rules.probe`` it passes a probe every
    ``SOAK_PROBE_INTERVAL``; at the end ``check`` (``--canary-check``) must exit 0. The first
    failure ends the soak (``failure``)."""

    def __init__(self, canaries: Sequence[VassalReload], rules: Rules, check: str | None) -> None:
        self.canaries, self.rules, self.check = list(canaries), rules, check
        #: the line its own events print under
        self.who = Instance("", "canary", "")
        self.started: float | None = None
        self.seen: dict[str, EmperorVassal] = {}
        self.failcnt: dict[tuple[str, str, str], int] = {}
        self.last_probe = -math.inf
        self.out = 0
        self.checked: CommandResult | None = None
        #: the canary that failed (``None``: the check) and why; when the soak ended healthy
        self.failure: tuple[VassalReload | None, str] | None = None
        self.passed: float | None = None

    @property
    def done(self) -> bool:
        return self.out == 0 and (self.failure is not None or self.passed is not None)

    def step(self, snapshot: Snapshot, now: float) -> list[Event]:
        if self.failure or self.passed is not None or self.abandoned or snapshot.unreadable:
            return []
        if self.started is None:
            self.started = now
            self.seen = {
                v.id: snapshot.vassals[v.id] for v in self.canaries if v.id in snapshot.vassals
            }
            self.failcnt = self._failcnt(snapshot)
        for v in self.canaries:
            why = self._unhealthy(v, snapshot)
            if why:
                return [self._fail(v, why, now)]
        if self.out:
            return []  # answers first
        soaked = now - self.started >= self.rules.soak
        if soaked and self.check is not None and self.checked is None:
            self.out += 1
            return [_event(self.who, EventKind.COMMAND, now, command=self.check)]
        if soaked:
            self.passed = now
            words = f"{len(self.canaries)} served {self.rules.soak:g}s healthy: the rest may go"
            return [_event(self.who, EventKind.SOAKED, now, words=words)]
        if not self.rules.probe or now - self.last_probe < SOAK_PROBE_INTERVAL:
            return []
        self.last_probe = now
        targets = [(v, probe_target(v, snapshot, v.nodes)) for v in self.canaries]
        self.out = sum(1 for _, target in targets if target is not None)
        return [_event(v, EventKind.PROBE, now, probe=t) for v, t in targets if t is not None]

    def _failcnt(self, snapshot: Snapshot) -> dict[tuple[str, str, str], int]:
        return {
            (n.router, n.key, n.name): n.failcnt
            for v in self.canaries
            for n in snapshot.nodes_of(v.name, v.addresses)
        }

    def _unhealthy(self, v: VassalReload, snapshot: Snapshot) -> str:
        before, now = self.seen.get(v.id), snapshot.vassals.get(v.id)
        if now is None:
            return "the emperor no longer lists it (it died)"
        if before is not None and (now.pid, now.respawns) != (before.pid, before.respawns):
            return (
                f"crashed under traffic: the emperor restarted it (pid {before.pid} -> "
                f"{now.pid}, respawns {before.respawns} -> {now.respawns})"
            )
        if not now.accepting:
            return "no longer accepting"
        for place, count in self._failcnt(snapshot).items():
            if count > self.failcnt.get(place, count):
                router = place[0] or "the fastrouter"
                return f"{router} failed {count - self.failcnt[place]} connections to it"
        return ""

    def _fail(self, v: VassalReload | None, why: str, now: float) -> Event:
        self.failure = (v, why)
        return _event(v or self.who, EventKind.FAILED, now, words=f"failed its soak: {why}")

    def probed(self, v: Instance, result: ProbeResult, now: float) -> list[Event]:
        self.out -= 1
        if result.ok or self.failure is not None:
            return []
        assert isinstance(v, VassalReload)
        return [self._fail(v, f"probe failed: {result.detail}", now)]

    def ran(self, v: Instance, result: CommandResult, now: float) -> list[Event]:
        self.out -= 1
        self.checked = result
        if result.ok:
            return []
        return [self._fail(None, f"--canary-check {result.describe()}", now)]


class TeamCommand(Machine):
    """One of the team's commands (``--revert-command``), run by the driver in its pool."""

    def __init__(self, name: str, command: str, rules: Rules) -> None:
        self.who, self.command, self.rules = Instance("", name, ""), command, rules
        self.sent = False
        self.result: CommandResult | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.abandoned is not None

    def step(self, snapshot: Snapshot, now: float) -> list[Event]:
        if self.sent:
            return []
        self.sent = True
        return [_event(self.who, EventKind.COMMAND, now, command=self.command)]

    def ran(self, v: Instance, result: CommandResult, now: float) -> list[Event]:
        self.result = result
        return [_event(self.who, EventKind.COMMAND, now, words=result.describe())]


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

#: When a re-announced node was unsubscribed again, by the phase it was in.
_AGAIN: dict[Any, str] = {
    Phase.DRAINING: "while draining",
    Phase.RELOADING: "before its reload",
    Phase.PROBE_FAILED: "after its failed probe",
    TwinPhase.DRAINING: "while draining",
}

_STOPPED_BY = {Phase.TOUCH_FAILED: "touch", Phase.DRAIN_IGNORED: "drain"}


def vassal_detail(v: VassalReload, rollout: Rollout) -> str:
    """Why a vassal did not come back (``""`` if it did)."""
    if v.phase in (Phase.TIMED_OUT, Phase.ABANDONED):
        assert v.stalled_in is not None
        return HOW_FAR[v.stalled_in]
    if v.phase is Phase.PROBE_FAILED:
        assert v.probe_result is not None
        detail = f"probe failed: {v.probe_result.detail}"
        if rollout.rules.drain and v.nodes:
            detail += "; left unsubscribed from the fastrouter until its master announces it again"
        return detail
    if v.phase is Phase.TOUCH_FAILED:
        return f"cannot touch: {v.touch_error}"
    if v.phase is Phase.DRAIN_IGNORED:
        routers = ", ".join(f"fastrouter {r}" if r else "the fastrouter" for r in v.ignored_by)
        return (
            f"not drained: {routers} still had it live {rollout.rules.drain_timeout:g}s after "
            "the unsubscribe (is --subscription-server that router's subscription server?); "
            "not touched"
        )
    if v.phase is not Phase.NOT_STARTED:
        return ""
    if v.not_started is NotStarted.UNKNOWN:
        return f"not known to the emperor (not listed for {rollout.rules.timeout:g}s)"
    if v.not_started is NotStarted.STARTING:
        return f"never accepting while the emperor started it ({rollout.rules.timeout:g}s)"
    if v.not_started is NotStarted.MINIMUM:
        return f"reloading it would leave fewer than {rollout.rules.minimum} live"
    if v.not_started is NotStarted.CANARY:
        return f"held back while the canaries went, and a canary failed: {rollout.canary_failure}"
    if v.not_started is NotStarted.MISSING:
        return (
            f"accepting, but out of the fastrouter for {rollout.rules.timeout:g}s: its master "
            "never announced it again (was the router restarted?)"
        )
    if v.not_started is NotStarted.STOPPED:
        assert rollout.stopped_by is not None
        failed = _STOPPED_BY.get(rollout.stopped_by.phase, "probe")
        reason = f"the {failed} of {rollout.stopped_by.name} failed"
    else:
        reason = str(rollout.abandoned)
    return reason if v.drain_started is None else f"{reason} (was draining, not touched)"


#: The events whose words need nothing but the packets' keys, the node probed, the phase.
_WORDS = {
    EventKind.DRAINING: "draining: unsubscribed from {keys}",
    EventKind.UNSUBSCRIBED_AGAIN: "re-announced {again}: unsubscribed again",
    EventKind.PROBE: "probing {probe}",
    EventKind.TRIGGERED: "triggered",
    EventKind.TRIGGERED_NOT_LIVE: "triggered (was not live)",
    EventKind.GONE: "gone",
}


def drain_timeout_text(v: VassalReload, rules: Rules) -> str:
    return f"drain timed out after {rules.drain_timeout:g}s with {v.drain_left} requests in flight"


def event_text(event: Event, machine: Machine) -> str:
    """The line an event prints after the vassal's (or twin's) name."""
    v, kind, rules = event.vassal, event.kind, machine.rules
    keys = ", ".join(sorted({s.node.key for s in event.send}))
    if event.words or event.command:
        return event.words or f"running {event.command}"
    if kind in _WORDS:
        probe = "" if event.probe is None else event.probe.name
        return _WORDS[kind].format(keys=keys, probe=probe, again=_AGAIN.get(event.phase))
    if kind is EventKind.SUBSCRIBED:
        why = "accepting" if event.result is None else f"probe passed ({event.result.detail})"
        return f"{why}: subscribed to {keys}"
    if isinstance(v, Twin):
        return _twin_text(event, v)
    assert isinstance(v, VassalReload) and isinstance(machine, Rollout)
    if kind is EventKind.TRIGGERED_DRAINED:
        return f"triggered after draining {v.drained:.2f}s"
    if kind is EventKind.TRIGGERED_UNDRAINED:
        return f"triggered anyway: {drain_timeout_text(v, rules)}"
    if kind is EventKind.RESTARTED:
        assert event.pids is not None
        where = "" if v.drain_started is None else " while draining"
        old, new = event.pids
        return f"restarted by the emperor{where} (pid {old} -> {new}): not touched"
    if kind is EventKind.BACK:
        assert v.triggered is not None
        return f"back after {event.at - v.triggered:.2f}s"
    again = "; subscribed again" if event.send else ""
    if kind is EventKind.TIMED_OUT:
        return f"timed out after {rules.timeout:g}s: {vassal_detail(v, machine)}{again}"
    if kind is EventKind.FAILED and event.result is not None:
        what = f"failed: probe failed: {event.result.detail}; nothing more starts"
        return f"{what}; unsubscribed to keep it out of rotation" if event.send else what
    if kind is EventKind.FAILED:
        return f"failed: {vassal_detail(v, machine)}; nothing more starts{again}"
    assert kind is EventKind.NOT_STARTED
    return f"not started: {vassal_detail(v, machine)}{again}"


def _twin_text(event: Event, t: Twin) -> str:
    kind = event.kind
    if kind is EventKind.ADD:
        return f"added (twin of {strip_suffix(t.of, os.path.splitext(t.of)[1])})"
    if kind is EventKind.LIVE:
        assert t.added is not None
        return f"live after {event.at - t.added:.2f}s"
    if kind is EventKind.FAILED:
        return f"failed: {t.detail}"
    if kind is EventKind.REMOVE:
        drained = "" if t.drained is None else f" after draining {t.drained:.2f}s"
        return f"link removed{drained}"
    return f"left in place: {t.detail}"


# ---------------------------------------------------------------------------------------------
# Surge: which twins to add
# ---------------------------------------------------------------------------------------------

#: The tool's record of the twins it made, in the emperor directory, written (atomically) before
#: any twin link exists: a run killed with SIGKILL leaves it, and the next run removes exactly the
#: links it lists. Not a name the emperor takes for a config (core/emperor.c
#: ``uwsgi_emperor_is_valid``: .ini .xml .yml .yaml .js .json).
SURGE_STATE = ".uwsgi-reload-surge"
#: A twin of ``shop.v2.ini`` is ``shop.v2.surge-1.ini``: uWSGI's ``%n`` cuts the name at its last
#: dot (core/uwsgi.c, the magic table), so its socket, log, pid and fifo are its own.
SURGE_MARK = ".surge-"


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
    live = {v.id: snapshot.live_keys(v) for v in fleet}
    twins: list[Twin] = []
    covered: dict[str, int] = {}
    for key in sorted({k for ks in live.values() for k in ks}):
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
            mine = [
                n for n in snapshot.nodes_of(v.name, v.addresses) if snapshot.live_everywhere(n)
            ]
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
        renamed.append(n._replace(name=name, death_mark=False, ref=0, router=""))
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
        ids = shown_names(sorted(snapshot.vassals)) or "none"
        raise ReloadError(f"the emperor runs none of the configs found (its vassals: {ids})")
    others = per_key(snapshot.others(fleet))
    most_others = max(others.values(), default=0)
    if minimum >= len(known) + most_others + surge:
        elsewhere = f" and the router has {most_others} other live nodes" if most_others else ""
        added = f", with {surge} twins per key from --max-surge," if surge else ""
        raise NoRoom(
            f"--minimum-active-vassals {minimum} leaves nothing to reload: the emperor runs "
            f"{len(known)} vassals{elsewhere}{added} and at least {minimum} must stay live"
        )
    # whether a node is a vassal's (or a twin's) depends on its name only (``owns``)
    mine = {n.name for v in (*fleet, *twins) for n in snapshot.nodes_of(v.name, v.addresses)}
    stray = sorted({n.name for n in snapshot.nodes if n.live} - mine)
    unmatched = [
        v
        for v in known
        if snapshot.vassals[v.id].accepting and not snapshot.nodes_of(v.name, v.addresses)
    ]
    if stray and unmatched:
        v = unmatched[0]
        where = f"listens on {', '.join(v.listening)}" if v.listening else "has no socket in /proc"
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        raise ReloadError(
            f"cannot tell which fastrouter node is which vassal: {v.id}{more} accepts but matches "
            f"no node (its master {where}, and no node is named after it); nodes "
            f"{shown_names(stray, 3)} match no vassal of this emperor (each vassal's node must "
            "be the address its master listens on, or a socket named after its config, e.g. "
            "socket = /run/uwsgi/%n.sock)"
        )
    live = [snapshot.live_keys(v) for v in known]
    not_live = sum(1 for keys in live if not keys)
    for key, count in sorted(collections.Counter(k for keys in live for k in keys).items()):
        if count + others.get(key, 0) + not_live + surge <= minimum:
            elsewhere = f" and {others[key]} other live nodes" if others.get(key) else ""
            if surge:
                elsewhere += f" and {surge} twins from --max-surge"
            raise NoRoom(
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


def openssl_sign(spec: str, data: bytes) -> bytes:
    """The signature of ``data`` with the private key of ``spec`` (``SHA1:/path/key.pem``, as
    uWSGI spells it), by the openssl command: the tool stays standard library only."""
    algo, _, keyfile = spec.partition(":")
    done = subprocess.run(
        ["openssl", "dgst", f"-{algo.lower()}", "-sign", keyfile],
        input=data,
        capture_output=True,
        timeout=10,
    )
    if done.returncode or not done.stdout:
        said = done.stderr.decode(errors="replace").strip().splitlines()[:1]
        raise OSError(errno.EINVAL, f"openssl cannot sign with {spec}: {' '.join(said)}")
    return done.stdout


def run_command(command: str, timeout: float) -> CommandResult:
    """Run a team's command with the shell, for at most ``timeout`` seconds; its exit code and
    the last lines of what it printed."""
    try:
        done = subprocess.run(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return CommandResult(None, f"still running after {timeout:g}s: stopped")
    except OSError as exc:
        return CommandResult(None, str(exc))
    said = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return CommandResult(done.returncode, _bounded(" / ".join(said))[:300])


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

    def error(self, text: str) -> None:
        print(f"uwsgi-reload: error: {_bounded(text)}", file=self.errors, flush=True)

    def warning(self, text: str) -> None:
        print(f"uwsgi-reload: warning: {_bounded(text)}", file=self.errors, flush=True)


#: The longest error or warning line: whatever it quotes, a line stays readable.
MAX_LINE = 2000


def _bounded(text: str) -> str:
    line = " ".join(text.split())
    if len(line) <= MAX_LINE:
        return line
    return f"{line[:MAX_LINE]}... ({len(line) - MAX_LINE} more characters)"


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
    #: vassals per key reloaded first and watched for ``soak`` seconds before the rest
    canary: int = 0
    soak: float = 30.0
    canary_check: str | None = None
    #: the team's way back to the previous code, run when the new code fails
    revert_command: str | None = None
    #: requests sent to a reloaded vassal before it goes back into rotation
    warmup: str | None = None
    warmup_requests: int = 10
    #: a Prometheus textfile written at the end of every run
    metrics_file: str | None = None
    #: ``ALGO:private key``: sign the subscription packets (routers with sign-check)
    subscription_sign: str | None = None
    #: ``N`` or ``P%``: the most of this host's vassals out of rotation at once, per key
    max_unavailable: str | None = None

    @property
    def routers(self) -> tuple[str, ...]:
        """Every fastrouter stats socket."""
        return _several(self.fastrouter_stats_socket)

    @property
    def subscription_servers(self) -> tuple[str, ...]:
        """Every subscription server (none: no drain)."""
        return _several(self.subscription_server)

    @property
    def rules(self) -> Rules:
        return Rules(
            minimum=self.minimum_active_vassals,
            timeout=self.timeout,
            max_parallel=self.max_parallel,
            drain=bool(self.subscription_servers),
            drain_timeout=self.drain_timeout,
            probe=self.probe is not None or self.warmup is not None,
            surge=self.max_surge,
            canary=self.canary,
            soak=self.soak,
            warmup=self.warmup is not None,
        )


def _several(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(dict.fromkeys(value))


def take_snapshot(
    options: Options, read: Callable[[str], Mapping[str, Any]] = read_stats
) -> Snapshot:
    """The emperor's vassals and every router's nodes (``read``: a stats socket's document). A
    router that cannot be read is left out (``Snapshot.unreadable``); a ``StatsError`` when the
    emperor or every router cannot be."""
    # The emperor rescans its directory after every event it handles, a stats connection
    # included (core/emperor.c), so polling it also makes it notice a touch at once.
    vassals = parse_emperor_stats(read(options.emperor_stats_socket))
    routers = options.routers
    nodes: list[Node] = []
    unreadable: dict[str, str] = {}
    for router in routers:
        try:
            nodes += parse_fastrouter_stats(read(router), router)
        except StatsError as exc:
            if len(routers) == 1:
                raise
            unreadable[router] = str(exc)
    if len(unreadable) == len(routers):
        raise StatsError("; ".join(unreadable.values()))
    return Snapshot(vassals, nodes, routers, unreadable)


def locate(
    fleet: Sequence[VassalReload],
    snapshot: Snapshot,
    sockets: Callable[[Iterable[int]], Mapping[int, tuple[str, ...]]],
    is_local: Callable[[str], bool],
) -> list[VassalReload]:
    """Each vassal with the node names it is announced as, from the sockets its master listens
    on (``listening_sockets``). When those match no node but a node is named after the vassal
    (``node_vassal_name``), or when they cannot be read, the name decides (``owns``)."""
    pids = {v.id: snapshot.vassals[v.id].pid for v in fleet if v.id in snapshot.vassals}
    try:
        found = sockets(pid for pid in pids.values() if pid > 0)
    except OSError:
        found = {}
    located = []
    for v in fleet:
        listening = tuple(found.get(pids.get(v.id, 0), ()))
        addresses, _ = announced_as(v.name, listening, snapshot, is_local)
        located.append(dataclasses.replace(v, addresses=addresses, listening=listening))
    return located


def describe_plan(
    fleet: Sequence[VassalReload], snapshot: Snapshot, options: Options, twins: Sequence[Twin] = ()
) -> list[str]:
    rules = options.rules
    live = {v.id: snapshot.places(v) for v in fleet}
    keys_of = {v.id: sorted(snapshot.live_keys(v)) for v in fleet}
    others = snapshot.others(fleet)
    # the twins to add count in every place of their key
    counted = {
        p: others.get(p, 0) + rules.surge for p in {*others, *(p for v in live.values() for p in v)}
    }
    routers = (
        f"{len(snapshot.routers)} routers count" if len(snapshot.routers) > 1 else "router counts"
    )
    lines = [f"dry run: would reload {len(fleet)} vassals of {options.emperor_path}, order:"]
    for v in sorted(fleet, key=lambda v: bool(keys_of[v.id])):
        current = snapshot.vassals.get(v.id)
        state = (
            f"live for {', '.join(keys_of[v.id])}"
            if keys_of[v.id]
            else "not listed by the emperor: waited for"
            if current is None
            else "not accepting (starting): waits until it accepts"
            if not current.accepting
            else "not live, goes first"
        )
        node = f" (node {', '.join(sorted(v.addresses))})" if v.addresses else ""
        lines.append(f"  {v.name} ({v.id}): {state}{node}")
    for key in sorted({k for keys in keys_of.values() for k in keys}):
        serving = [v.id for v in fleet if key in keys_of[v.id]]
        at_once = len(pick_reloads(serving, live, rules.minimum, rules.max_parallel, counted))
        rounds = math.ceil(len(serving) / max(at_once, 1))
        how = f"up to {at_once} reloading at once, about {rounds} reload times"
        how = how if at_once else "its live vassals wait until the not-live ones are back"
        elsewhere = per_key(others).get(key, 0)
        twins_text = f", {rules.surge} twins to add" if rules.surge else ""
        lines.append(
            f"key {key!r}: {len(serving)} live, minimum {rules.minimum}: {how}; the {routers} "
            f"{len(serving) + elsewhere + rules.surge} live ({len(serving)} on this host, "
            f"{elsewhere} on other hosts{twins_text})"
        )
    if rules.drain:
        servers = options.subscription_servers
        lines.append(
            f"drain: each live vassal is unsubscribed via {', '.join(servers)} and "
            "touched once no router has a request in flight to it (at most "
            f"{options.drain_timeout:g}s), then subscribed again as soon as it accepts"
        )
    if options.probe:
        lines.append(
            f"probe: GET {options.probe} on each reloaded vassal's socket before counting it "
            "back; a failure stops the rollout"
        )
    if rules.canary:
        canaries = [v.name for v in fleet if v.id in pick_canaries(fleet, snapshot, rules.canary)]
        lines.append(
            f"canary: {shown_names(canaries)} first, watched for {rules.soak:g}s of real traffic"
            f"{' and --canary-check' if options.canary_check else ''} before the rest"
        )
    if options.revert_command:
        lines.append(
            f"revert: when the new code fails, run {options.revert_command!r}, then reload "
            "every vassal already reloaded"
        )
    if options.warmup:
        lines.append(
            f"warm-up: GET {options.warmup} x {options.warmup_requests} on each reloaded vassal's "
            "socket, kept out of rotation until then"
        )
    for t in sorted(twins, key=lambda t: not t.leftover):
        lines.append(
            f"surge: twin {t.name} ({t.id}, twin of {t.of}) was left by an earlier run: drained "
            "and removed first"
            if t.leftover
            else f"surge: would add {t.id} (a link to {t.target}, twin of {t.of}), live before "
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
    soak: Soak | None = None,
    revert: tuple[TeamCommand, Rollout | None] | None = None,
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
        "canary": _canary_json(options, rollout, soak),
        "revert": _revert_json(options, revert),
    }


def _canary_json(options: Options, rollout: Rollout | None, soak: Soak | None) -> Any:
    if not options.canary or rollout is None:
        return None
    failed = soak.failure if soak else None
    return {
        "vassals": [vid for vid in rollout.vassals if vid not in rollout.held],
        "soak": options.soak,
        "canary_check": options.canary_check,
        "outcome": "failed" if failed else "passed" if soak and soak.passed else "not reached",
        "failure": f"{failed[0].name if failed[0] else 'check'}: {failed[1]}" if failed else None,
    }


def _revert_json(options: Options, revert: tuple[TeamCommand, Rollout | None] | None) -> Any:
    if revert is None:
        return None
    command, again = revert
    result = command.result
    return {
        "command": options.revert_command,
        "exit_code": result.code if result else None,
        "output": result.output if result else "",
        "vassals": [v.as_json() for v in again.vassals.values()] if again else [],
    }


def _one_or_all(values: Sequence[str]) -> str | list[str] | None:
    """As given: one address as a string (as before several were allowed), several as a list."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


#: Prometheus metrics of the last run: (name, help); every one a gauge, labelled by emperor.
METRICS = {
    "start_timestamp_seconds": "When the last run started.",
    "end_timestamp_seconds": "When the last run ended.",
    "exit_code": "The last run's exit code (0 all reloaded, 1 not all, 2 bad input, 4 reverted, "
    "130 interrupted).",
    "success": "1 when the last run reloaded every vassal, else 0.",
    "vassals": "The last run's vassals by outcome.",
    "vassals_reverted": "Vassals the last run brought back to the previous code.",
    "live_nodes_min": "The fewest live nodes the last run saw per fastrouter key.",
    "drain_wait_seconds_max": "The longest drain of the last run.",
    "drain_wait_seconds_sum": "The drains of the last run, together.",
    "drain_timeouts": "Drains of the last run that timed out with requests in flight.",
    "probe_failures": "Probes of the last run that failed.",
}


def metrics_text(
    options: Options,
    started: float,
    ended: float,
    exit_code: int,
    rollout: Rollout | None = None,
    reverted: Rollout | None = None,
) -> str:
    """The run in Prometheus' text format (node_exporter's textfile collector reads it)."""
    vassals = list(rollout.vassals.values()) if rollout else []
    back = [v for v in (reverted.vassals.values() if reverted else ()) if v.phase is Phase.BACK]
    drains = [v.drained for v in vassals if v.drained is not None]
    lowest = sorted(rollout.lowest_live.items()) if rollout else []
    values: dict[str, list[tuple[dict[str, str], float]]] = {
        "start_timestamp_seconds": [({}, started)],
        "end_timestamp_seconds": [({}, ended)],
        "exit_code": [({}, exit_code)],
        "success": [({}, exit_code == EXIT_OK)],
        "vassals": [
            ({"outcome": o.value}, sum(1 for v in vassals if outcome(v.phase) is o))
            for o in Outcome
        ],
        "vassals_reverted": [({}, len(back))],
        "live_nodes_min": [({"key": key}, count) for key, count in lowest],
        "drain_wait_seconds_max": [({}, max(drains, default=0.0))],
        "drain_wait_seconds_sum": [({}, sum(drains))],
        "drain_timeouts": [({}, sum(1 for v in vassals if v.drain_left is not None))],
        "probe_failures": [({}, sum(1 for v in vassals if v.phase is Phase.PROBE_FAILED))],
    }
    lines = []
    for name, samples in values.items():
        metric = f"uwsgi_reload_last_run_{name}"
        lines += [f"# HELP {metric} {METRICS[name]}", f"# TYPE {metric} gauge"]
        for labels, value in samples:
            pairs = {"emperor": options.emperor_path, **labels}.items()
            text = ",".join(f'{k}="{_label(v)}"' for k, v in pairs)
            lines.append(f"{metric}{{{text}}} {float(value)!r}")
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _write_metrics(path: str, text: str, reporter: Reporter) -> None:
    """Atomically (a new file renamed over the old one): the collector never reads half a file."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except OSError as exc:
        reporter.warning(f"cannot write the metrics file {path}: {exc.strerror or exc}")
        with contextlib.suppress(OSError):
            os.unlink(temporary)


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
    #: pids -> the addresses each listens on (one read of the kernel's listening sockets)
    sockets: Callable[[Iterable[int]], Mapping[int, tuple[str, ...]]] = listening_sockets
    #: is this IP address one of this machine's (a node of a vassal bound on 0.0.0.0 or ::)
    is_local: Callable[[str], bool] = is_local_host
    #: surge: (target, link) makes a twin's link; (link, target) removes it
    make_link: Callable[[str, str], None] = make_twin_link
    remove_link: Callable[[str, str], None] = remove_twin_link
    #: (emperor path, twins) records the twins made (none: removes the record)
    write_state: Callable[[str, Sequence[Twin]], None] = write_surge_state
    #: (port, host): nothing listens there (a twin of a config named after its port)
    port_free: Callable[[int, str], bool] = port_free
    #: (a team's command, timeout) -> what it gave
    run_command: Callable[[str, float], CommandResult] = run_command
    #: ("ALGO:private key file", data) -> its signature (``--subscription-sign``)
    sign: Callable[[str, bytes], bytes] = openssl_sign


def _wait_for_room(
    fleet: Sequence[VassalReload],
    snapshot: Snapshot,
    options: Options,
    reporter: Reporter,
    io: Io,
    twins: Sequence[Twin],
) -> Snapshot:
    """``check_fleet``, and the snapshot it passed on. With ``--max-unavailable`` (a host of a
    fleet rolled in batches) a minimum that leaves nothing to reload now is waited on up to
    ``--timeout``: other hosts' nodes out of rotation come back when their reloads are done."""
    deadline, told = io.clock() + options.timeout, False
    while True:
        try:
            check_fleet(fleet, snapshot, options.minimum_active_vassals, options.max_surge, twins)
            return snapshot
        except NoRoom as exc:
            if not options.max_unavailable or options.dry_run or io.clock() >= deadline:
                raise
            if not told:
                reporter.line(f"waiting up to {options.timeout:g}s for room: {exc}")
                told = True
        io.sleep(options.check_interval)
        snapshot = io.snapshot(options)
        if snapshot.unreadable:
            raise StatsError("; ".join(snapshot.unreadable.values()))


def run(options: Options, reporter: Reporter, io: Io | None = None) -> int:
    io = io or Io()
    if options.max_surge and not options.subscription_servers:
        # Without one a twin leaves the router only as its master stops, with requests in
        # flight to it: the run would lose requests that one without twins keeps.
        raise ReloadError(
            "--max-surge needs --subscription-server: a twin is drained before it is removed"
        )
    if options.warmup and not options.subscription_servers:
        raise ReloadError(
            "--warmup needs --subscription-server: without drain a reloaded vassal takes user "
            "requests as soon as its master announces it, before any warm-up"
        )
    if options.subscription_sign and not options.subscription_servers:
        raise ReloadError("--subscription-sign needs --subscription-server: it signs its packets")
    if options.subscription_sign:
        try:
            io.sign(options.subscription_sign, b"uwsgi-reload")
        except (OSError, subprocess.SubprocessError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ReloadError(f"--subscription-sign: {reason}") from None
    if options.canary_check and not options.canary:
        raise ReloadError("--canary-check needs --canary: it judges the canaries after the soak")
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
    first = _wait_for_room(fleet, first, options, reporter, io, leftovers)
    caps = unavailable_caps(options.max_unavailable, first) if options.max_unavailable else None
    for key, cap in (caps or {}).items():
        if cap < 1:
            raise ReloadError(
                f"--max-unavailable {options.max_unavailable} of fastrouter key {key!r}'s "
                f"{per_key(first.live_counts)[key]} live nodes is 0: nothing could be reloaded"
            )
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
    rollout = Rollout(fleet, options.rules)
    if options.canary:
        rollout.held = set(rollout.vassals) - set(pick_canaries(fleet, first, options.canary))
    rollout.caps = caps
    surges = [Surge(leftovers, options.rules), Surge(twins, options.rules)]
    try:
        with emperor_lock(options.emperor_path), io.probe_pool() as pool:
            driver = Driver(options, reporter, io, pool, interrupted, started)
            exit_code, extra, ran = driver.run(rollout, *surges)
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
                    driver.soak,
                    driver.revert,
                )
                print(json.dumps(report), flush=True)
        except OSError:
            pass  # stdout or stderr closed (a pipe whose reader went): the exit code still tells
        if options.metrics_file:
            reverted = driver.revert[1] if driver.revert else None
            metrics = metrics_text(
                options, started_wall, io.wall_clock(), exit_code, rollout, reverted
            )
            _write_metrics(options.metrics_file, metrics, reporter)
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
    surge = f"--max-surge {options.max_surge}"
    if not os.access(options.emperor_path, os.W_OK | os.X_OK):
        raise ReloadError(
            f"{surge}: cannot make links in {options.emperor_path} (not writable by this user)"
        )
    try:
        taken = set(os.listdir(options.emperor_path)) | {t.id for t in leftovers}
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
        raise ReloadError(f"{surge}: cannot read {options.emperor_path} or a link: {exc}") from None


class Ending(enum.Enum):
    """How ``Driver.drive`` left a machine."""

    DONE = enum.auto()
    INTERRUPTED = enum.auto()
    #: stats unreadable for the whole timeout, or an unexpected error: the machine was given up
    GIVEN_UP = enum.auto()


class Driver:
    """The one loop for every machine (``Rollout``, ``Surge``): it polls the stats, steps the
    machine, acts on its events (touches, twin links, packets, probes, which run in the pool so
    that a slow answer never holds the loop), reports each, and gives the machine up on a
    signal, on stats unreadable for the whole timeout, or on an unexpected error. ``run`` strings
    the machines of one run together: add the twins, remove the leftovers, roll, remove the
    twins."""

    def __init__(
        self,
        options: Options,
        reporter: Reporter,
        io: Io,
        pool: Executor,
        interrupted: _Interrupted,
        started: float,
    ) -> None:
        self.options, self.reporter, self.io, self.pool = options, reporter, io, pool
        self.interrupted, self.started = interrupted, started
        #: the signals the run had when it began: one received later, even between two machines,
        #: gives up every machine of the run (only the clean-up of twins runs after it)
        self.signals = interrupted.count
        #: probes and commands out, with what they are about; answered in the order asked
        self.probes: dict[Future[Any], Instance] = {}
        #: signs a subscription packet (``--subscription-sign``), or none
        spec = options.subscription_sign
        self._sign = None if spec is None else functools.partial(io.sign, spec)
        #: what the run's canary soak and revert did (for the report)
        self.soak: Soak | None = None
        self.revert: tuple[TeamCommand, Rollout | None] | None = None

    def now(self) -> float:
        return self.io.clock() - self.started

    def line(self, text: str, at: float | None = None) -> None:
        self.reporter.line(f"{self.now() if at is None else at:8.2f}s  {text}")

    def run(self, rollout: Rollout, leftovers: Surge, twins: Surge) -> tuple[int, str, bool]:
        """(exit code, what else went wrong, whether the rollout ran). The new twins go up
        first, then the leftovers go (the new twins keep the minimum while they do: a killed run
        may have left an original drained); on a failure there, every twin is removed and
        nothing is reloaded."""
        path = self.options.emperor_path
        ending = Ending.DONE
        if twins.twins:
            # recorded before any link exists: a run killed from here on leaves them all listed
            self.io.write_state(path, leftovers.left + twins.twins)
            self.line(f"surge: adding {len(twins.twins)} twins")
            ending = self.drive(twins)
        if leftovers.twins and ending is Ending.DONE and not twins.failed:
            self.line(f"surge: removing {len(leftovers.twins)} twins an earlier run left")
            ending = self.drive(leftovers.remove())
            self.io.write_state(path, leftovers.left + twins.left)
        if ending is Ending.DONE and not twins.failed and not leftovers.left:
            ending, code, failure = self._roll(rollout)
            if twins.twins:
                self.line(f"surge: removing {len(twins.twins)} twins")
                self.drive(twins.remove(), cleanup=True)
                self.io.write_state(path, twins.left)
            extra = f"twins left in place: {_why(twins.left)} (the next run removes them)"
            extra = "; ".join(filter(None, (failure, extra if twins.left else "")))
            if code == EXIT_OK and twins.left:
                code = EXIT_NOT_ALL_RELOADED
            return (EXIT_INTERRUPTED if ending is Ending.INTERRUPTED else code), extra, True
        for surge in (twins, leftovers):
            if surge.left:
                self.drive(surge.remove(), cleanup=True)
        left = leftovers.left + twins.left
        self.io.write_state(path, left)
        kept = f"; twins left in place: {_why(left)}" if left else ""
        if ending is Ending.INTERRUPTED:
            why = f"interrupted by {signal.Signals(self.interrupted.signal or 2).name}"
            return EXIT_INTERRUPTED, f"{why} before the first reload{kept}", False
        if twins.failed:
            t = twins.failed[0]
            what = f"surge: twin {t.name} of {t.of} failed: {t.detail}"
        else:
            what = "the twins an earlier run left could not all be removed"
        return EXIT_NOT_ALL_RELOADED, f"{what}; nothing was reloaded{kept}", False

    def _roll(self, rollout: Rollout) -> tuple[Ending, int, str]:
        """The canaries first (the rest held back), their soak, then the rest; when the new
        code fails (a canary, a timeout, a probe), the revert. (ending, exit code, what failed)."""
        ending = self.drive(rollout)
        canaries = [v for v in rollout.vassals.values() if v.id not in rollout.held]
        if rollout.rules.canary and ending is Ending.DONE:
            if all(v.phase is Phase.BACK for v in canaries):
                self.line(f"canary: {len(canaries)} reloaded: soaking {rollout.rules.soak:g}s")
                self.soak = Soak(canaries, rollout.rules, self.options.canary_check)
                ending = self.drive(self.soak)
                if self.soak.failure is not None:
                    who, why = self.soak.failure
                    rollout.canary_failed(f"{who.name} {why}" if who else why)
                elif ending is Ending.DONE:
                    ending = self.drive(rollout.release())
            if rollout.in_phase(Phase.PENDING):  # held back: not started
                reason = self.soak.abandoned if self.soak else "the canaries were not all reloaded"
                self._act(rollout, rollout.abandon(reason or "interrupted", self.now()))
        everything = all(v.phase is Phase.BACK for v in rollout.vassals.values())
        code = EXIT_OK if ending is Ending.DONE and everything else EXIT_NOT_ALL_RELOADED
        failed = [v.name for v in rollout.vassals.values() if v.phase in CODE_FAILED]
        if rollout.canary_failure:
            failure = f"canary failed: {rollout.canary_failure}"
        elif failed:
            failure = f"the new code failed on {shown_names(failed)}"
        else:
            failure = ""
        if not failure or not self.options.revert_command or ending is Ending.INTERRUPTED:
            return ending, code, ""
        return self._revert(rollout, failure, self.options.revert_command)

    def _revert(self, rollout: Rollout, failure: str, command: str) -> tuple[Ending, int, str]:
        """Run the team's way back, then reload every vassal the run touched, with the same
        rules: each ends on the previous code (exit 4), or the report says which did not."""
        self.line(f"revert: {failure}")
        revert = TeamCommand("revert", command, rollout.rules)
        self.revert = (revert, None)
        ending = self.drive(revert)
        if revert.result is None or not revert.result.ok:
            how = revert.result.describe() if revert.result else "interrupted"
            return ending, EXIT_NOT_ALL_RELOADED, f"{failure}; --revert-command {how}: not reverted"
        touched = [v for v in rollout.vassals.values() if v.triggered is not None]
        again = Rollout(
            [VassalReload(v.id, v.name, v.config, addresses=v.addresses) for v in touched],
            rollout.rules,
        )
        self.revert = (revert, again)
        ending = self.drive(again)
        missed = [v.name for v in again.vassals.values() if v.phase is not Phase.BACK]
        if ending is Ending.INTERRUPTED:
            return ending, EXIT_INTERRUPTED, f"{failure}; interrupted while reverting"
        if missed:
            left = shown_names(missed)
            return ending, EXIT_NOT_ALL_RELOADED, f"{failure}; revert incomplete: {left} not back"
        return ending, EXIT_REVERTED, f"{failure}; reverted {len(touched)} vassals (exit 4)"

    def drive(self, machine: Machine, cleanup: bool = False) -> Ending:
        """Step ``machine`` until it is done, or give it up (``Ending``). A clean-up (removing
        twins) runs after an interrupt and gives up only on a signal received while it runs."""
        signals = self.interrupted.count if cleanup else self.signals
        unreadable_since: float | None = None
        try:
            while True:
                now = self.now()
                snapshot, problem = self._poll()
                if problem:
                    if unreadable_since is None and snapshot is not None:
                        self.line(f"{problem}: nothing counts as live there, nothing starts", now)
                    unreadable_since = now if unreadable_since is None else unreadable_since
                    if now - unreadable_since >= self.options.timeout:
                        reason = f"stats unreadable for {self.options.timeout:g}s: {problem}"
                        return self._give_up(machine, reason, Ending.GIVEN_UP)
                else:
                    unreadable_since = None
                if self.interrupted.count > signals:
                    name = signal.Signals(self.interrupted.signal or 2).name
                    return self._give_up(machine, f"interrupted by {name}", Ending.INTERRUPTED)
                # answers first: a vassal back (or a failed probe) counts in this step's decisions
                events = self._answers(machine, now)
                if snapshot is not None:
                    self._locate(machine, snapshot)
                    events += machine.step(snapshot, now)
                acted = self._act(machine, events)
                if machine.done:
                    return Ending.DONE
                if acted:
                    # Read the stats at once: the emperor rescans on that connection and acts on
                    # the touch (or the new link) now rather than on the next poll.
                    continue
                interval = self.options.check_interval
                if machine.watch_closely() or self.probes:
                    interval = min(interval, CLOSE_WATCH_INTERVAL)
                self.io.sleep(interval)
        except KeyboardInterrupt:
            return self._give_up(machine, "interrupted", Ending.INTERRUPTED)
        except Exception as exc:
            return self._give_up(
                machine, f"unexpected {type(exc).__name__}: {exc}", Ending.GIVEN_UP
            )
        finally:
            self.probes.clear()  # answers still to come belong to a machine given up

    def _poll(self) -> tuple[Snapshot | None, str]:
        """This poll's snapshot, and what could not be read (a router: nothing is live there)."""
        try:
            snapshot = self.io.snapshot(self.options)
        except StatsError as exc:
            return None, str(exc)
        return snapshot, "; ".join(snapshot.unreadable.values())

    def _give_up(self, machine: Machine, reason: str, ending: Ending) -> Ending:
        self._act(machine, machine.abandon(reason, self.now()))
        return ending

    def _locate(self, machine: Machine, snapshot: Snapshot) -> None:
        """An instance's node: the address its master listens on (``announced_as``)."""
        pids = {}
        for v in machine.unlocated(snapshot):
            current = snapshot.vassals.get(v.id)
            if current is not None and current.pid > 0:
                pids[current.pid] = v
        if not pids:
            return
        try:
            found = self.io.sockets(pids)
        except OSError:
            return
        for pid, v in pids.items():
            announce = v.announce if isinstance(v, Twin) else ()
            listening = found.get(pid, ())
            addresses, matched = announced_as(
                v.name, listening, snapshot, self.io.is_local, announce
            )
            if matched:
                machine.located(v, addresses)

    def _answers(self, machine: Machine, now: float) -> list[Event]:
        events = []
        for future in [f for f in self.probes if f.done()]:
            v, result = self.probes.pop(future), future.result()
            if isinstance(result, CommandResult):
                events += machine.ran(v, result, now)
            else:
                events += machine.probed(v, result, now)
        return events

    def _act(self, machine: Machine, events: list[Event]) -> bool:
        """Do what each event asks, then print it; True when a config or link was changed."""
        acted = False
        while events:
            event = events.pop(0)
            v = event.vassal
            try:
                acted = self._change(event) or acted
            except OSError as exc:
                event, *more = machine.act_failed(v, str(exc), event.at)
                events[:0] = more
            text = event_text(event, machine)
            if event.send:
                problem = self._send(event.send)
                if problem:
                    text += f" ({problem})"
            self.line(f"{v.name}: {text}", event.at)
            if event.probe is not None:
                self.probes[self.pool.submit(self._probe, event.probe)] = v
            if event.command is not None:
                command = self.pool.submit(self.io.run_command, event.command, self.options.timeout)
                self.probes[command] = v
            if not events:
                # answers already in (a quick vassal, or a pool that runs probes at once)
                events += self._answers(machine, self.now())
        return acted

    def _probe(self, node: Node) -> ProbeResult:
        """The warm-up requests, then the probe: each a GET straight to the vassal's socket."""
        o, result = self.options, ProbeResult(200, "")
        for _ in range(o.warmup_requests if o.warmup else 0):
            assert o.warmup is not None
            result = self.io.probe(node.name, node.key, o.warmup, o.probe_timeout)
            if not result.ok:
                return ProbeResult(result.status, f"warm-up {result.detail}")
        if o.probe is None:
            return ProbeResult(result.status, f"warmed up ({o.warmup_requests} x {result.detail})")
        return self.io.probe(node.name, node.key, o.probe, o.probe_timeout)

    def _change(self, event: Event) -> bool:
        """Touch the config, make or remove the link an event asks for: True if it did."""
        v = event.vassal
        if event.touches:
            assert isinstance(v, VassalReload) and v.baseline is not None
            self.io.touch(v.config, touch_mtime(self.io.wall_clock(), v.baseline.last_mod))
        elif event.kind is EventKind.ADD:
            assert isinstance(v, Twin)
            self.io.make_link(v.target, v.config)
        elif event.kind is EventKind.REMOVE:
            assert isinstance(v, Twin)
            self.io.remove_link(v.config, v.target)
        else:
            return False
        return True

    def _send(self, packets: Sequence[Subscription]) -> str:
        """Send packets to every subscription server; what went wrong, or ``""``."""
        problems = []
        for server in self.options.subscription_servers:
            for packet in packets:
                try:
                    self.io.send(server, packet.packet(self._sign, self.io.wall_clock()))
                except Exception as exc:  # a packet not sent must not keep the others from going
                    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                    problems.append(
                        f"subscription server {server}: cannot {packet.describe()}: {reason}"
                    )
        for problem in problems:
            self.reporter.warning(problem)
        return "; ".join(problems)


def _why(twins: Sequence[Twin]) -> str:
    return "; ".join(f"{t.name}: {t.detail}" if t.detail else t.name for t in twins)


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
            reporter.line(f"{v.name}: {drain_timeout_text(v, rollout.rules)}: triggered anyway")
    missed = [v for v in vassals if v.phase is not Phase.BACK]
    for v in missed:
        reporter.line(f"{v.name}: {outcome(v.phase).value}: {details[v.id]}")
    lowest = ", ".join(f"{k}: {n}" for k, n in sorted(rollout.lowest_live.items())) or "none"
    summary = (
        f"reloaded {len(vassals) - len(missed)} of {len(vassals)} vassals in {elapsed:.2f}s "
        f"(minimum {rollout.rules.minimum}; fewest live seen per key: {lowest})"
    )
    if exit_code == EXIT_OK:
        reporter.line(summary)
        return
    if rollout.abandoned is not None:
        summary = f"{rollout.abandoned}: {summary}"
    if extra:
        summary += f"; {extra}"
    names = [v.name for v in missed]
    reporter.error(f"{summary}; not reloaded: {shown_names(names)}" if names else summary)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


N = TypeVar("N", int, float)


def _number(kind: Callable[[str], N], ok: Callable[[N], bool], must: str) -> Callable[[str], N]:
    """An argparse ``type=``: a finite ``kind`` for which ``ok`` holds (``must`` says so)."""

    def check(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            what = "number" if kind is float else "whole number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be {must}")
        return value

    return check


positive_float = _number(float, lambda v: v > 0, "a number greater than 0")
non_negative_float = _number(float, lambda v: v >= 0, "0 or more")
non_negative_int = _number(int, lambda v: v >= 0, "0 or more")
positive_int = _number(int, lambda v: v >= 1, "1 or more")


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


def _share(text: str) -> str:
    number = text[:-1] if text.endswith("%") else text
    try:
        ok = float(number) > 0 and (text.endswith("%") or number.isdigit())
    except ValueError:
        ok = False
    if not ok or not math.isfinite(float(number)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or a percentage > 0")
    return text


def _sign_spec(text: str) -> str:
    algo, colon, keyfile = text.partition(":")
    if not colon or not algo.isalnum() or not keyfile:
        raise argparse.ArgumentTypeError(f"{text!r} is not <algo>:<private key file>")
    if not os.access(keyfile, os.R_OK):
        raise argparse.ArgumentTypeError(f"{keyfile} is not a readable file")
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
        "3 another run holds the lock, 4 failed and reverted, 130 interrupted",
    )
    add, unset = parser.add_argument, argparse.SUPPRESS  # unset: Options has its default
    # fmt: off
    add("--emperor-path", required=True, default=unset, metavar="<dir>",
        help="directory used by the Emperor")
    add("--fastrouter-stats-socket", required=True, action="append", default=unset,
        metavar="<socket>", help="Fastrouter statistics socket (unix path or host:port); once "
        "per router: a reloaded vassal is back once it is live in every router, and the minimum "
        "holds in each router and among the nodes live in all of them")
    add("--emperor-stats-socket", required=True, default=unset, metavar="<socket>",
        help="Emperor statistics socket (unix path or host:port)")
    add("--vassal-config-file-suffix", default=".ini", metavar="<string>",
        help="vassal config file suffix")
    add("--minimum-active-vassals", type=non_negative_int, default=1, metavar="<int>",
        help="the minimum number of vassals that should be active at any given time during the "
        "reload, per fastrouter key: every live node for the key counts, other hosts' included")
    add("--timeout", type=positive_float, default=60.0, metavar="<seconds>",
        help="how long to wait for the reload of a vassal")
    add("--check-interval", type=positive_float, default=0.1, metavar="<float>",
        help="interval between vassal status checks (seconds)")
    add("--max-unavailable", type=_share, default=unset, metavar="<int|percent>",
        help="at most this many of this host's vassals out of rotation at once per fastrouter "
        "key, on top of the minimum (N%% of the key's live nodes, every host's): one host's "
        "share of a batch; it then waits up to --timeout for room at the start (default: none)")
    add("--max-parallel", type=positive_int, default=None, metavar="<int>",
        help="at most this many vassals reloading at once (default: as many as the minimum "
        "allows)")
    add = parser.add_argument_group("rotation control: drain").add_argument
    add("--subscription-server", type=_subscription_server, action="append", default=unset,
        metavar="<socket>", help="the fastrouter's subscription server (unix datagram path or "
        "host:port UDP), once per router: drain each vassal before its reload (unsubscribe at "
        "every server, wait until no router has a request in flight to it) and subscribe it "
        "again as soon as it accepts (default: off)")
    add("--subscription-sign", type=_sign_spec, default=unset, metavar="<algo:keyfile>",
        help="sign the packets to the subscription server with this key, as vassals sign their "
        "announces (SHA1:/etc/uwsgi/keys/domain.tld.pem), by the openssl command (default: off)")
    add("--drain-timeout", type=positive_float, default=5.0, metavar="<seconds>",
        help="with --subscription-server: reload a vassal anyway when requests are still in "
        "flight to it after this long (unless a router never acted on the unsubscribe)")
    add = parser.add_argument_group("rotation control: probe and warm-up").add_argument
    add("--probe", type=_probe_path, default=unset, metavar="<path>",
        help="before counting a reloaded vassal back, GET this path straight from its socket "
        "(uwsgi protocol, Host: the fastrouter key); anything but 2xx/3xx stops the rollout "
        "(default: off)")
    add("--probe-timeout", type=positive_float, default=5.0, metavar="<seconds>",
        help="how long the probe waits for the status line")
    add("--warmup", type=_probe_path, default=unset, metavar="<path>",
        help="with --subscription-server: GET this path --warmup-requests times straight from "
        "a reloaded vassal's socket while it is out of rotation, before it goes back")
    add("--warmup-requests", type=positive_int, default=10, metavar="<int>",
        help="how many warm-up requests")
    add = parser.add_argument_group("surge").add_argument
    add("--max-surge", type=non_negative_int, default=0, metavar="<int>",
        help="with --subscription-server: before the first reload, add this many temporary "
        "twins per fastrouter key (new links to an original's config, named <name>.surge-<i>, "
        "or a free port for configs named after their port), wait until they are live, reload "
        "the originals counting them, then drain and remove them: the minimum may then be the "
        "number of vassals")
    add = parser.add_argument_group("safe deploys").add_argument
    add("--canary", type=non_negative_int, default=0, metavar="<int>",
        help="reload this many vassals per fastrouter key first, then watch them serve for "
        "--soak seconds (their master, the routers' failcnt, the probe, --canary-check) before "
        "the rest go")
    add("--soak", type=non_negative_float, default=30.0, metavar="<seconds>",
        help="with --canary: how long the canaries serve real traffic, watched")
    add("--canary-check", default=unset, metavar="<command>",
        help="with --canary: a shell command run after the soak; any exit but 0 fails the "
        "canaries (an error rate from your metrics, a smoke test)")
    add("--revert-command", default=unset, metavar="<command>",
        help="when the new code fails (a canary, a timeout, a probe): run this shell command "
        "(the way back: flip the release link), then reload every vassal already reloaded; "
        "exit 4 once all are back on the previous code")
    add = parser.add_argument_group("output").add_argument
    add("--metrics-file", default=unset, metavar="<path>",
        help="at the end of every run, failed ones too, write its metrics there (Prometheus)")
    add("--dry-run", action="store_true", help="print the plan and touch nothing")
    add("--json", action="store_true",
        help="print one JSON report on stdout (event lines go to stderr)")
    add("-q", "--quiet", action="store_true", help="print only errors")
    add("--version", action="version", version=f"%(prog)s {__version__}")
    # fmt: on
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
        if options.metrics_file and not isinstance(exc, LockedError):  # the holder writes it
            now = time.time()
            metrics = metrics_text(options, now, now, exc.exit_code)
            _write_metrics(options.metrics_file, metrics, reporter)
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
