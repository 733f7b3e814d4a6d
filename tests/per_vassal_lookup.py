"""The listening-socket lookup before netlink, kept as a control: for each vassal master it read
and parsed the whole of ``/proc/net/tcp``, ``tcp6`` and ``unix`` again (the tool at commit
aeddcb4, ``listening_sockets(pid)``). On a host with a busy TCP table its start-up grew with the
vassals times the connections; ``tests/test_busy_host.py`` shows its reads failing the check that
the tool's one lookup passes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from uwsgi_reload import parse_proc_net_tcp, parse_proc_net_unix, socket_inode


def listening_sockets(pids: Iterable[int], proc: str = "/proc") -> dict[int, tuple[str, ...]]:
    """The addresses each process listens on, the tables read once per process."""
    found = {}
    for pid in pids:
        fd_dir = os.path.join(proc, str(pid), "fd")
        inodes = set()
        for fd in os.listdir(fd_dir):
            inode = socket_inode(os.readlink(os.path.join(fd_dir, fd)))
            if inode is not None:
                inodes.add(inode)
        table: dict[int, str] = {}
        for name in ("tcp", "tcp6", "unix"):
            parse = parse_proc_net_unix if name == "unix" else parse_proc_net_tcp
            with open(os.path.join(proc, "net", name), encoding="utf-8", errors="replace") as f:
                table.update(parse(f.read()))
        found[pid] = tuple(sorted({table[i] for i in inodes if i in table}))
    return found
