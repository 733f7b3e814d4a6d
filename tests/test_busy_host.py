"""A production-shaped host: a TCP table with 100,000 sockets in it while the tool runs.

A fastrouter opens a new connection to a node per request, so a busy host holds tens of
thousands of sockets in TIME_WAIT (``uwsgi_reload_harness.busy``). The tool finds each vassal
master's listening sockets at start-up; it must pay for the vassals it reloads, not for the
connections the host holds. Two tests on one stack, each filling the table right before what
it needs (TIME_WAIT lasts 60 s):

- the recommended command (drain + probe) reloads the stack under load on the busy host and
  passes the zero-downtime check;
- what the start-up lookup reads, counted with an audit hook (no timer): nothing of the
  connection tables with netlink, one read of each table for all the vassals where netlink is
  refused; the lookup before (``tests/per_vassal_lookup.py``, one read per vassal) fails the
  same check.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping

import pytest

import uwsgi_reload
from tests import per_vassal_lookup
from uwsgi_reload_harness.busy import busy_tcp_table, tcp_table_size
from uwsgi_reload_harness.plugin import MADE, stack_config
from uwsgi_reload_harness.stack import Stack, running_stack
from uwsgi_reload_loadtests.measure import ReloadRun, observed, reload_under_load, tool_command

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Sockets put in the TCP table before each part (on top of what it holds).
BUSY = 100_000
VASSALS = 4
MINIMUM = 1
TABLES = ("tcp", "tcp6", "unix")

Record = Callable[[dict[str, object]], None]
Lookup = Callable[[Iterable[int]], Mapping[int, tuple[str, ...]]]


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    config = dataclasses.replace(stack_config(request.config), vassals=VASSALS)
    with running_stack(config) as started:
        yield started


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest, stack: Stack) -> None:
    """The module's stack is the test's: its log tails go into a failing test's report."""
    request.node.stash.setdefault(MADE, []).append(stack)


# ---------------------------------------------------------------------------------------------
# What a lookup reads, from the interpreter's audit events
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Reads:
    """The connection tables a block of code opened (``/proc/net/NAME``: times), and the netlink
    sockets it made."""

    tables: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    netlink_sockets: int = 0

    def one_read_each_at_most(self) -> bool:
        """The promise: one read of a table serves every vassal of the lookup."""
        return all(count <= 1 for count in self.tables.values())


class Audit:
    """One audit hook for the whole process (a hook cannot be removed), recording only while a
    ``recording()`` block runs in it."""

    hooked = False
    current: Reads | None = None

    @classmethod
    def _hook(cls, event: str, args: tuple[object, ...]) -> None:
        reads = cls.current
        if reads is None:
            return
        if event == "open" and isinstance(args[0], str) and args[0].startswith("/proc/net/"):
            reads.tables[args[0].rpartition("/")[2]] += 1
        elif event == "socket.__new__" and args[1] == socket.AF_NETLINK:
            reads.netlink_sockets += 1

    @classmethod
    @contextlib.contextmanager
    def recording(cls) -> Iterator[Reads]:
        if not cls.hooked:
            sys.addaudithook(cls._hook)
            cls.hooked = True
        cls.current = reads = Reads()
        try:
            yield reads
        finally:
            cls.current = None


def lookup_reads(lookup: Lookup, pids: list[int]) -> tuple[Reads, Mapping[int, tuple[str, ...]]]:
    with Audit.recording() as reads:
        found = lookup(pids)
    return reads, found


def refuse_netlink(timeout: float = 2.0) -> dict[int, str]:
    raise PermissionError(1, "netlink refused (a container without it)")


def test_start_up_reads_follow_the_vassals_not_the_connections(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = sorted(stack.vassal_pids().values())
    sockets = {
        pid: (str(stack.layout.run_dir / f"{vid[:-4]}.sock"),)
        for vid, pid in stack.vassal_pids().items()
    }
    with busy_tcp_table(BUSY) as made:
        size = tcp_table_size()
        assert size >= BUSY, made

        netlink, found = lookup_reads(uwsgi_reload.listening_sockets, pids)
        assert found == sockets
        assert netlink.tables == {} and netlink.netlink_sockets == 1, netlink
        # the kernel answered with the listening sockets only, not the table
        assert len(uwsgi_reload.sock_diag_listening()) * 100 < size

        with monkeypatch.context() as patched:
            patched.setattr(uwsgi_reload, "sock_diag_listening", refuse_netlink)
            fallback, found = lookup_reads(uwsgi_reload.listening_sockets, pids)
        assert found == sockets
        assert fallback.tables == dict.fromkeys(TABLES, 1), fallback
        assert fallback.one_read_each_at_most()

        # control: the lookup before read every table once per vassal
        before, found = lookup_reads(per_vassal_lookup.listening_sockets, pids)
        assert found == sockets
        assert before.tables == dict.fromkeys(TABLES, VASSALS), before
        assert not before.one_read_each_at_most()


def test_a_busy_host_is_reloaded_under_load_losing_nothing(
    stack: Stack, record_reload: Record
) -> None:
    """The recommended command (drain + probe) with the table full: zero failed requests, load
    served through the reload, every worker replaced, the minimum held."""
    sizes = []

    def attempt() -> ReloadRun:
        stack.wait_all_live(timeout=30)
        with busy_tcp_table(BUSY):
            sizes.append(tcp_table_size())
            return reload_under_load(stack, tool_command(stack, MINIMUM))

    name = f"busy host: {BUSY:,} more sockets in the TCP table"
    run = observed(attempt, name, MINIMUM, record_reload)
    print(f"sockets in the TCP table at each start: {sizes}")
    assert min(sizes) >= BUSY, sizes
    assert run.returncode == 0, run.output
    assert run.check(MINIMUM) == [], run.output
    assert sorted(run.replaced()) == sorted(stack.vassal_ids)
