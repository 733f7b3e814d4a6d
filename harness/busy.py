"""A host's TCP table as production has it: a fastrouter opens a new connection to a node per
request, so a busy host holds tens of thousands of sockets in TIME_WAIT (UWSGI_FACTS: ~131,000
lines in /proc/net/tcp after a few seconds of load on a 3-host loopback fleet).

``busy_tcp_table(count)`` puts ``count`` more sockets in this network namespace's TCP table, on
loopback only, and keeps them there while its block runs: connections closed by the client
(TIME_WAIT, which the kernel keeps ``tcp_fin_timeout``, 60 s: fill the table just before what it
measures). The kernel caps TIME_WAIT at ``net.ipv4.tcp_max_tw_buckets`` (131,072 here): as root
the cap is raised for the block and set back after; otherwise the rest are connections held open
(ESTABLISHED, two sockets each, as many as this process may have file descriptors). Nothing is
sent anywhere but 127/8.
"""

from __future__ import annotations

import contextlib
import resource
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: The first destination on loopback, 127.0.0.2; then 127.0.0.3, ...
FIRST_DESTINATION = 2


@dataclass
class BusyTable:
    """What ``busy_tcp_table`` made: sockets in TIME_WAIT, and the open connections it holds."""

    time_wait: int = 0
    established: int = 0
    held: list[socket.socket] = field(default_factory=list, repr=False)

    @property
    def sockets(self) -> int:
        """Sockets it added to the table (an open connection is two: its two ends)."""
        return self.time_wait + 2 * self.established


def tcp_table_size() -> int:
    """Lines of /proc/net/tcp and /proc/net/tcp6: every socket in the table, any state."""
    lines = 0
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/net/{name}", "rb") as table:
            lines += sum(1 for _ in table) - 1
    return lines


TW_CAP = Path("/proc/sys/net/ipv4/tcp_max_tw_buckets")


def time_wait_cap() -> int:
    try:
        return int(TW_CAP.read_text())
    except (OSError, ValueError):
        return 0


@contextlib.contextmanager
def _time_wait_cap_at_least(wanted: int) -> Iterator[None]:
    """The kernel's cap on TIME_WAIT raised to ``wanted`` while the block runs, where this
    process may write it (root); set back after."""
    was = time_wait_cap()
    raised = False
    if was and wanted > was:
        with contextlib.suppress(OSError):
            TW_CAP.write_text(str(wanted))
            raised = True
    try:
        yield
    finally:
        if raised:
            TW_CAP.write_text(str(was))


def _connect(listener: socket.socket, destination: int) -> tuple[socket.socket, socket.socket]:
    client = socket.socket()
    try:
        client.connect(
            (f"127.0.{destination // 250}.{destination % 250}", listener.getsockname()[1])
        )
    except BaseException:
        client.close()
        raise
    server, _ = listener.accept()
    return client, server


@contextlib.contextmanager
def busy_tcp_table(count: int) -> Iterator[BusyTable]:
    """``count`` more sockets in the TCP table while the block runs (TIME_WAIT first, up to the
    kernel's cap; then open connections). ``OSError`` if the host cannot hold them (file
    descriptors: an open connection costs two)."""
    made = BusyTable()
    start, overflows = _time_wait_now(), _time_wait_overflows()
    with _time_wait_cap_at_least(start + count), socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 0))  # every 127/8 address reaches it
        listener.listen(4096)
        room = max(0, time_wait_cap() - start)
        try:
            # Per destination, a quarter of the ephemeral ports: a connect that picks a port
            # whose connection waits in TIME_WAIT to the same place takes that one over (on
            # loopback, tcp_tw_reuse); spread thin, few do.
            for destination in range(FIRST_DESTINATION, 250 * 250):
                for _ in range(_ports() // 4):
                    if made.time_wait >= min(room, count):
                        break
                    client, server = _connect(listener, destination)
                    client.close()  # closed first: the client's end waits in TIME_WAIT
                    server.close()
                    made.time_wait += 1
                else:
                    continue
                break
            # A close past the kernel's cap skips TIME_WAIT: counted by the kernel. (Not the
            # growth of the TIME_WAIT count: sockets of an earlier fill expire meanwhile.)
            made.time_wait -= _time_wait_overflows() - overflows
            while made.sockets < count:
                _room_for(len(made.held) + 2)
                made.held += _connect(listener, FIRST_DESTINATION)
                made.established += 1
            yield made
        finally:
            for held in made.held:
                held.close()


def _ports() -> int:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return high - low + 1


def _time_wait_now() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    return 0


def _time_wait_overflows() -> int:
    """Connections closed without a TIME_WAIT socket since boot, the cap being reached
    (``TCPTimeWaitOverflow`` of /proc/net/netstat)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            if names.startswith("TcpExt:"):
                fields = dict(zip(names.split()[1:], values.split()[1:]))
                return int(fields.get("TCPTimeWaitOverflow", 0))
    return 0


def _room_for(fds: int) -> None:
    """Raise this process's file limit for ``fds`` more, up to what it may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(fds + 1024, soft * 2)
    if fds + 64 > soft:
        for limits in ((wanted, max(wanted, hard)), (min(wanted, hard), hard)):
            with contextlib.suppress(ValueError, OSError):  # above the hard limit: root only
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
                return
