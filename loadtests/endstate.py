"""Run a reload command and record the stack's state at the moment it exits.

    python -m uwsgi_reload_loadtests.endstate --emperor-stats ADDR --fastrouter-stats ADDR \\
        --out FILE -- COMMAND...

Both stats options may be repeated, for a fleet: every host's emperor, every router.

A reload procedure that says "done" (exit 0) must leave every vassal accepting, live in the
router and served by a new worker. Whether it did can only be judged at that moment: a vassal
still restarting when the command returns will be back a second later. So the command runs under
this wrapper, which passes its output and exit code through and, as soon as it exits, reads the
emperor's and the fastrouter's stats (with the observer's own parser, not the tool's) and each
vassal master's children, and writes them to ``FILE`` as JSON (:class:`EndState`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .observer import StatsReadError, read_document


@dataclasses.dataclass(frozen=True)
class EndState:
    """The stack as it was when the reload command exited."""

    exit_code: int
    at: float
    """Wall clock of the exit."""
    accepting: dict[str, bool]
    """Per vassal id (config name): the emperor reports it accepting."""
    workers: dict[str, list[int]]
    """Per vassal id: its master's children (the workers)."""
    live_nodes: dict[str, list[str]]
    """Per fastrouter key: the names of its live nodes (with several routers: live in all)."""
    error: str | None = None
    """Why the stats could not be read, if they could not."""

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EndState:
        return cls(**data)

    def live_vassals(self) -> set[str]:
        """Vassal stems (config name without its extension) of the live nodes, over all keys."""
        return {node_stem(name) for names in self.live_nodes.values() for name in names}


def node_stem(name: str) -> str:
    """The vassal stem a node name carries: a unix socket named after the config
    (``/run/app1.sock`` -> ``app1``), or a TCP socket whose port names it, as on a fleet's hosts
    (``127.0.0.2:38121`` -> ``38121``, the vassal of ``38121.ini``)."""
    if name.startswith("/") or ":" not in name:
        return Path(name).stem
    return name.rpartition(":")[2]


def _children(pids: set[int]) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {pid: [] for pid in pids}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid in kids:
            kids[ppid].append(int(entry.name))
    return {pid: sorted(children) for pid, children in kids.items()}


def read_end_state(
    exit_code: int, emperor_stats: Sequence[str], fastrouter_stats: Sequence[str]
) -> EndState:
    """The state of every emperor and router at this moment. Vassal ids are unique across the
    emperors (a fleet's are named after their ports); a node is live only if live in every
    router."""
    at = time.time()
    try:
        vassals = {}
        for address in emperor_stats:
            emperor = read_document(address, timeout=5.0)
            vassals.update({str(v["id"]): v for v in emperor.get("vassals") or []})
        kids = _children({int(v["pid"]) for v in vassals.values()})
        live: dict[str, set[str]] | None = None
        for address in fastrouter_stats:
            here = _live_nodes(read_document(address, timeout=5.0))
            live = here if live is None else _in_both(live, here)
    except (StatsReadError, KeyError, TypeError, ValueError) as exc:
        return EndState(exit_code, at, {}, {}, {}, error=f"{type(exc).__name__}: {exc}")
    return EndState(
        exit_code,
        at,
        accepting={vid: bool(v.get("accepting")) for vid, v in vassals.items()},
        workers={vid: kids[int(v["pid"])] for vid, v in vassals.items()},
        live_nodes={key: sorted(names) for key, names in (live or {}).items()},
    )


def _live_nodes(router: Mapping[str, Any]) -> dict[str, set[str]]:
    live: dict[str, set[str]] = {}
    for subscription in router.get("subscriptions") or []:
        nodes = subscription.get("nodes") or []
        alive = {str(node["name"]) for node in nodes if node["death_mark"] == 0}
        live.setdefault(str(subscription["key"]), set()).update(alive)
    return live


def _in_both(a: dict[str, set[str]], b: dict[str, set[str]]) -> dict[str, set[str]]:
    return {key: a[key] & b.get(key, set()) for key in a}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uwsgi_reload_loadtests.endstate")
    parser.add_argument("--emperor-stats", required=True, action="append")
    parser.add_argument("--fastrouter-stats", required=True, action="append")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    child = subprocess.Popen(command)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)  # Ctrl-C and SIGTERM are the command's to handle

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    code = child.wait()
    if code < 0:  # killed by a signal: report it as a shell would
        code = 128 - code
    state = read_end_state(code, args.emperor_stats, args.fastrouter_stats)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(state.as_json()))
    os.replace(tmp, args.out)
    return code


def wrapped(
    command: Sequence[str],
    emperor_stats: str | Sequence[str],
    fastrouter_stats: str | Sequence[str],
    out: Path,
) -> list[str]:
    """``command`` under this wrapper (one stats address, or one per emperor and router)."""
    options = []
    for flag, addresses in (
        ("--emperor-stats", emperor_stats),
        ("--fastrouter-stats", fastrouter_stats),
    ):
        for address in [addresses] if isinstance(addresses, str) else addresses:
            options += [flag, address]
    return [
        sys.executable,
        "-m",
        "uwsgi_reload_loadtests.endstate",
        *options,
        "--out",
        str(out),
        "--",
        *command,
    ]


if __name__ == "__main__":
    raise SystemExit(main())
