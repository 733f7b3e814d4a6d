"""Reload procedures that are not this project's tool: one correct, the others wrong on purpose.

They share no code with ``uwsgi_reload.py``: each is what a team might write, run by the suite
through ``--reload-command`` (a foreign procedure) or as a control. The correct one must pass the
suite; every wrong one must make it fail, and a test shows that it does.

    reload_procedures.py MODE EMPEROR_DIR EMPEROR_STATS FASTROUTER_STATS [--minimum M] [--timeout S]
        [--fleet-nodes T]

Modes:
- ``one-by-one`` (correct): for each config link in order, move the link's own mtime past the
  emperor's ``last_mod`` (whole seconds), wait until the emperor registered the reload and reports
  the vassal accepting, then until the fastrouter has its node live again.
- ``together``: touch every link at once, then wait for each: the router has no live node.
- ``plain-touch``: one by one, but ``touch`` sets the mtime to now: ignored by the emperor when a
  config's mtime is ahead of the clock (or was set in the same second).
- ``one-fewer``: waves of N - M + 1 vassals: one live vassal fewer than the minimum M.
- ``all-keys``: waves of N - M vassals counted over every fastrouter key together, not per key.
- ``early-exit``: one by one, but it does not wait for the last vassal to come back.
- ``own-host``: one host of a fleet of T nodes (``--fleet-nodes``), counting only its own
  vassals: it takes the other hosts' T - N nodes to be live without looking at the router, and
  reloads waves of T - M of its own N. Right while every other node is live; wrong when one is
  out (a node drained for maintenance, a host still coming back).
- ``early-surge``: a surge done wrong: one twin (a new link ``<name>.surge-1.ini`` to the first
  config's target), waited for until live, then each config touched one by one, and the twin's
  link removed as soon as the last config is touched, before that vassal is back: the key falls
  below its N vassals (to 0 with N = 1) while it restarts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODES = (
    "one-by-one",
    "together",
    "plain-touch",
    "one-fewer",
    "all-keys",
    "early-exit",
    "own-host",
    "early-surge",
)


def read_json(address: str) -> Any:
    """Connect to a uWSGI stats server (unix path or host:port), read to EOF, parse."""
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX)
        target: Any = address
    else:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET)
        target = (host, int(port))
    with sock:
        sock.settimeout(5)
        sock.connect(target)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def vassal(stats_address: str, name: str) -> dict[str, Any] | None:
    for entry in read_json(stats_address)["vassals"]:
        if entry["id"] == name:
            return dict(entry)
    return None


def node_live(router_address: str, stem: str) -> bool:
    """A node named after the config (``/run/app1.sock``) or by its port (``10.0.0.2:8001``
    for ``8001.ini``, as on a fleet's hosts) is live."""
    for subscription in read_json(router_address)["subscriptions"]:
        for node in subscription["nodes"]:
            name = str(node["name"])
            named = Path(name).stem == stem or name.rpartition(":")[2] == stem
            if named and node["death_mark"] == 0:
                return True
    return False


def wait(what: str, done: Any, deadline: float) -> None:
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"reload_procedures: timed out waiting for {what}")
        time.sleep(0.05)


def trigger(link: Path, emperor: str, *, plain: bool = False) -> dict[str, Any]:
    """Touch ``link`` so that the emperor reloads its vassal; the vassal's stats before."""
    before = vassal(emperor, link.name)
    if before is None:
        raise SystemExit(f"reload_procedures: the emperor does not know {link.name}")
    now = int(time.time())
    # past what the emperor registered and past the link's own mtime: a touch it has not
    # rescanned yet (someone else's, in this same second) would otherwise swallow this one
    newest = max(int(before["last_mod"]), int(link.lstat().st_mtime))
    mtime = now if plain else max(now, newest + 1)
    os.utime(link, (mtime, mtime), follow_symlinks=False)
    return before


def wait_back(
    link: Path, before: dict[str, Any], emperor: str, router: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout

    def registered_and_accepting() -> bool:
        now = vassal(emperor, link.name)
        if now is None:
            return False
        moved = now["pid"] != before["pid"] or now["respawns"] != before["respawns"]
        moved = moved or now["last_mod"] != before["last_mod"]
        return bool(moved and now["accepting"])

    wait(f"{link.name} to accept again", registered_and_accepting, deadline)
    wait(f"{link.name} to be live in the router", lambda: node_live(router, link.stem), deadline)
    print(f"reload_procedures: {link.name} reloaded", flush=True)


def waves(mode: str, links: list[Path], minimum: int, fleet_nodes: int = 0) -> list[list[Path]]:
    """The links to reload together, wave after wave."""
    size = {"together": len(links), "one-fewer": len(links) - minimum + 1}.get(mode, 1)
    if mode == "all-keys":
        size = len(links) - minimum
    if mode == "own-host":
        size = fleet_nodes - minimum
    size = max(1, size)
    return [links[i : i + size] for i in range(0, len(links), size)]


def early_surge(links: list[Path], emperor: str, router: str, timeout: float) -> int:
    first = links[0]
    twin = first.with_name(f"{first.stem}.surge-1.ini")
    twin.symlink_to(os.readlink(first) if first.is_symlink() else first)
    try:
        deadline = time.monotonic() + timeout
        wait(f"{twin.name} to be live", lambda: node_live(router, twin.stem), deadline)
        for number, link in enumerate(links, 1):
            before = trigger(link, emperor)
            if number == len(links):
                twin.unlink()  # wrong: its original is not back yet
            wait_back(link, before, emperor, router, timeout)
    finally:
        if twin.is_symlink():
            twin.unlink()
    deadline = time.monotonic() + timeout
    wait(f"{twin.name} to stop", lambda: vassal(emperor, twin.name) is None, deadline)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reload_procedures.py")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("emperor_dir", type=Path)
    parser.add_argument("emperor_stats")
    parser.add_argument("fastrouter_stats")
    parser.add_argument("--minimum", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--fleet-nodes", type=int, default=0)
    args = parser.parse_args(argv)
    links = sorted(args.emperor_dir.glob("*.ini"))
    if args.mode == "early-surge":
        return early_surge(links, args.emperor_stats, args.fastrouter_stats, args.timeout)
    for number, wave in enumerate(waves(args.mode, links, args.minimum, args.fleet_nodes), 1):
        plain = args.mode == "plain-touch"
        triggered = [(link, trigger(link, args.emperor_stats, plain=plain)) for link in wave]
        if args.mode == "early-exit" and number == len(links):
            return 0
        for link, before in triggered:
            wait_back(link, before, args.emperor_stats, args.fastrouter_stats, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
