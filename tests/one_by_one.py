"""A correct reload procedure that is not this project's tool: one vassal at a time.

It shares no code with ``uwsgi_reload.py``: it is what a team might write, and the suite must
pass it through ``--reload-command``. For each config link of the emperor dir, in order: move
the link's own mtime past the emperor's ``last_mod`` (whole seconds), wait until the emperor
registered the reload and reports the vassal accepting, then until the fastrouter has its node
live again. With one vassal out at a time, any minimum below the number of vassals holds.

``--together`` makes it wrong on purpose, a control: it touches every link first and only then
waits for each, so the router has no live node for a while. The suite must fail on it.

    one_by_one.py EMPEROR_DIR EMPEROR_STATS FASTROUTER_STATS [--timeout S] [--together]
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
    for subscription in read_json(router_address)["subscriptions"]:
        for node in subscription["nodes"]:
            if Path(str(node["name"])).stem == stem and node["death_mark"] == 0:
                return True
    return False


def wait(what: str, done: Any, deadline: float) -> None:
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"one_by_one: timed out waiting for {what}")
        time.sleep(0.05)


def trigger(link: Path, emperor: str) -> dict[str, Any]:
    """Touch ``link`` so that the emperor reloads its vassal; the vassal's stats before."""
    before = vassal(emperor, link.name)
    if before is None:
        raise SystemExit(f"one_by_one: the emperor does not know {link.name}")
    mtime = max(int(time.time()), int(before["last_mod"]) + 1)
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
    print(f"one_by_one: {link.name} reloaded", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="one_by_one.py")
    parser.add_argument("emperor_dir", type=Path)
    parser.add_argument("emperor_stats")
    parser.add_argument("fastrouter_stats")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--together", action="store_true", help="wrong on purpose: a control")
    args = parser.parse_args(argv)
    links = sorted(args.emperor_dir.glob("*.ini"))
    waves = [links] if args.together else [[link] for link in links]
    for wave in waves:
        triggered = [(link, trigger(link, args.emperor_stats)) for link in wave]
        for link, before in triggered:
            wait_back(link, before, args.emperor_stats, args.fastrouter_stats, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
