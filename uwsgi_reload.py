#!/usr/bin/env python3
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
"""Graceful reload for uWSGI vassals behind a fastrouter, keeping a minimum live at all times.

Standalone: Python >= 3.9 standard library only. Copy it to a server and run it.

Exit codes: 0 all reloaded, 1 not all reloaded, 2 usage or bad input, 3 another run holds the
lock, 130 interrupted (SIGINT or SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import errno
import fcntl
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Callable, Optional, TextIO

__version__ = "0.1.0"

EXIT_OK = 0
EXIT_NOT_ALL_RELOADED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_INTERRUPTED = 130


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
    except ValueError:
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

    @property
    def live(self) -> bool:
        return not self.death_mark


def parse_emperor_stats(data: Mapping[str, Any]) -> dict[str, EmperorVassal]:
    """Vassals by id (the config file name, e.g. ``vassal_01.ini``)."""
    if not isinstance(data.get("vassals"), list):
        raise StatsError("emperor stats have no 'vassals' list (is it an emperor stats server?)")
    vassals = {}
    for raw in data["vassals"]:
        vassal = EmperorVassal(
            id=str(raw["id"]),
            pid=int(raw.get("pid", 0)),
            respawns=int(raw.get("respawns", 0)),
            last_mod=int(raw.get("last_mod", 0)),
            accepting=bool(raw.get("accepting", 0)),
            ready=bool(raw.get("ready", 0)),
        )
        vassals[vassal.id] = vassal
    return vassals


def parse_fastrouter_stats(data: Mapping[str, Any]) -> list[Node]:
    """Every node of every subscription key."""
    if not isinstance(data.get("subscriptions"), list):
        raise StatsError(
            "fastrouter stats have no 'subscriptions' list (is it a fastrouter stats server?)"
        )
    return [
        Node(
            key=str(sub.get("key", "")),
            name=str(node.get("name", "")),
            death_mark=bool(node.get("death_mark", 0)),
            ref=int(node.get("ref", 0)),
        )
        for sub in data["subscriptions"]
        for node in sub.get("nodes", [])
    ]


def strip_suffix(name: str, suffix: str) -> str:
    return name[: -len(suffix)] if suffix and name.endswith(suffix) else name


def node_vassal_name(node_name: str) -> str:
    """The vassal a node belongs to: its socket is named after the vassal's config (``%n``).

    ``/run/app/shop.v2.sock`` -> ``shop.v2``: only the last extension goes, so dots survive.
    """
    base = node_name.rstrip("/").rsplit("/", 1)[-1]
    stem, dot, _ = base.rpartition(".")
    return stem if dot else base
