"""Every way a run can fail, through ``main([...])``: one line on stderr, the right exit code,
nothing touched where nothing may be, and no vassal the tool drained left out of the router.

A small live fake of the stack answers on real unix sockets: an emperor stats server that registers
a touch at once (it compares the configs' mtimes with ``last_mod``, as the emperor does), a
fastrouter stats server, and a subscription server that takes the tool's packets and moves the
nodes in and out of the router. Each case injects one fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import uwsgi_reload as ur
from tests.stats_servers import RESET, StatsServer
from tests.test_cli import hold_lock, release
from tests.uwsgi_packets import decode_packet

KEY = "domain.tld"


#: What a stats server answers its nth reader instead of the document (``None``: the document).
Fault = Callable[[int], "bytes | None"]


def no_fault(n: int) -> bytes | None:
    return None


class FakeStack:
    """An emperor with ``n`` vassals behind a fastrouter, live on unix sockets in ``base``."""

    def __init__(self, base: Path, n: int = 4) -> None:
        self.base = base
        self.emperor = base / "vassals"
        self.emperor.mkdir()
        self.ids = [f"vassal_{i:02d}.ini" for i in range(1, n + 1)]
        for vid in self.ids:
            (self.emperor / vid).write_text("[uwsgi]\n")
            os.utime(self.emperor / vid, (1000, 1000))
        self.last_mod = dict.fromkeys(self.ids, 1000)
        self.respawns = dict.fromkeys(self.ids, 0)
        self.in_router = {vid[:-4]: True for vid in self.ids}
        self.packets: list[tuple[int, str]] = []
        self.emperor_fault: Fault = no_fault
        self.fastrouter_fault: Fault = no_fault
        self.reads = {"emperor": 0, "fastrouter": 0}
        self.lock = threading.Lock()
        self.emperor_stats = str(base / "es.sock")
        self.fastrouter_stats = str(base / "fs.sock")
        self.subscription_server = str(base / "ss.sock")
        self.servers = [
            StatsServer(self.emperor_stats, lambda: self._answer("emperor", self.emperor_doc)),
            StatsServer(
                self.fastrouter_stats, lambda: self._answer("fastrouter", self.fastrouter_doc)
            ),
        ]
        self.subscriptions = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.subscriptions.bind(self.subscription_server)
        self.subscriptions.settimeout(0.05)
        self.stopping = threading.Event()
        self.listener = threading.Thread(target=self._listen, daemon=True)
        self.listener.start()

    def _answer(self, which: str, doc: Callable[[], dict[str, Any]]) -> bytes:
        with self.lock:
            self.reads[which] += 1
            fault = (self.emperor_fault if which == "emperor" else self.fastrouter_fault)(
                self.reads[which]
            )
            return json.dumps(doc()).encode() if fault is None else fault

    def emperor_doc(self) -> dict[str, Any]:
        vassals = []
        for i, vid in enumerate(self.ids):
            mtime = int(os.lstat(self.emperor / vid).st_mtime)
            if mtime > self.last_mod[vid]:  # core/emperor.c: reload, respawns and last_mod move
                self.respawns[vid] += 1
                self.last_mod[vid] = mtime
            vassals.append(
                {
                    "id": vid,
                    "pid": 100 + i,
                    "respawns": self.respawns[vid],
                    "last_mod": self.last_mod[vid],
                    "accepting": 1,
                    "ready": 1,
                }
            )
        return {"version": "2.0.31", "vassals": vassals}

    def fastrouter_doc(self) -> dict[str, Any]:
        nodes = [
            {"name": f"/run/{name}.sock", "death_mark": 0, "ref": 0, "cores": 1, "weight": 1}
            for name, live in self.in_router.items()
            if live
        ]
        return {"subscriptions": [{"key": KEY, "nodes": nodes}]}

    def _listen(self) -> None:
        while not self.stopping.is_set():
            try:
                data = self.subscriptions.recv(65536)
            except socket.timeout:
                continue
            _, command, pairs = decode_packet(data)
            address = dict(pairs)["address"]
            with self.lock:
                self.packets.append((command, address))
                self.in_router[ur.node_vassal_name(address)] = command == ur.Command.SUBSCRIBE

    def argv(self, *extra: str) -> list[str]:
        return [
            "--emperor-path",
            str(self.emperor),
            "--emperor-stats-socket",
            self.emperor_stats,
            "--fastrouter-stats-socket",
            self.fastrouter_stats,
            "--check-interval",
            "0.01",
            *extra,
        ]

    def mtimes(self) -> dict[str, int]:
        return {p.name: os.lstat(p).st_mtime_ns for p in self.emperor.iterdir()}

    def out_of_router(self, settle: float = 2.0) -> list[str]:
        """Vassals out of the router once the packets sent have arrived."""
        deadline = time.monotonic() + settle
        while True:
            with self.lock:
                out = sorted(name for name, live in self.in_router.items() if not live)
            if not out or time.monotonic() > deadline:
                return out
            time.sleep(0.01)

    def unsubscribed(self) -> int:
        with self.lock:
            return sum(1 for command, _ in self.packets if command == ur.Command.UNSUBSCRIBE)

    def over_tcp(self, which: str) -> None:
        """Serve the emperor's or the fastrouter's stats on 127.0.0.1:PORT instead."""
        answer = self.servers[0 if which == "emperor" else 1].answer
        server = StatsServer(None, answer)
        self.servers.append(server)
        setattr(self, f"{which}_stats", server.address)

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.stopping.set()
        self.listener.join(5)
        self.subscriptions.close()


@pytest.fixture
def stack() -> Iterator[FakeStack]:
    with tempfile.TemporaryDirectory(prefix="ur-err-", dir="/tmp") as base:
        s = FakeStack(Path(base))
        yield s
        s.close()


def test_the_fake_stack_reloads_with_drain(
    stack: FakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    """The control: on the fake, a drained run reloads everything and puts everyone back."""
    before = stack.mtimes()
    assert ur.main(stack.argv("--subscription-server", stack.subscription_server)) == ur.EXIT_OK
    out, err = capsys.readouterr()
    assert err == "", err
    assert all(stack.mtimes()[vid] != before[vid] for vid in stack.ids), out
    assert stack.respawns == dict.fromkeys(stack.ids, 1)
    assert stack.unsubscribed() == len(stack.ids)
    assert stack.out_of_router() == []


# ---------------------------------------------------------------------------------------------
# The faults
# ---------------------------------------------------------------------------------------------

Setup = Callable[[FakeStack, pytest.MonkeyPatch], "ur.Io | None"]


def emperor_answers(payload: bytes, from_read: int = 1) -> Setup:
    def setup(stack: FakeStack, _: pytest.MonkeyPatch) -> None:
        stack.emperor_fault = lambda n: payload if n >= from_read else None
        if payload is RESET:
            stack.over_tcp("emperor")

    return setup


def fastrouter_answers(payload: bytes, from_read: int = 1) -> Setup:
    def setup(stack: FakeStack, _: pytest.MonkeyPatch) -> None:
        stack.fastrouter_fault = lambda n: payload if n >= from_read else None
        if payload is RESET:
            stack.over_tcp("fastrouter")

    return setup


def doc(value: object) -> bytes:
    return json.dumps(value).encode()


def vassals_doc(*entries: object) -> bytes:
    return doc({"vassals": list(entries)})


def nodes_doc(*nodes: object) -> bytes:
    return doc({"subscriptions": [{"key": KEY, "nodes": list(nodes)}]})


def emperor_dir_unreadable(stack: FakeStack, monkeypatch: pytest.MonkeyPatch) -> None:
    scandir = os.scandir
    emperor = str(stack.emperor)

    def refused(path: Any = ".") -> Any:
        if str(path) == emperor:
            raise PermissionError(errno.EACCES, "Permission denied", emperor)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refused)


def on_snapshot(n: int, fault: Callable[[], None]) -> Setup:
    """Run ``fault`` in place of the run's nth stats read (1: the one before anything starts)."""

    def setup(stack: FakeStack, _: pytest.MonkeyPatch) -> ur.Io:
        calls = 0

        def snapshot(options: ur.Options) -> ur.Snapshot:
            nonlocal calls
            calls += 1
            if calls == n:
                fault()
            return ur.take_snapshot(options)

        return ur.Io(snapshot=snapshot)

    return setup


def raise_(exc: BaseException) -> Callable[[], None]:
    def fault() -> None:
        raise exc

    return fault


def sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def touch_refused(*vids: str) -> Setup:
    def setup(stack: FakeStack, _: pytest.MonkeyPatch) -> ur.Io:
        def touch(config: str, mtime: int) -> None:
            if os.path.basename(config) in vids:
                raise PermissionError(errno.EPERM, "Operation not permitted", config)
            ur.touch(config, mtime)

        return ur.Io(touch=touch)

    return setup


def nothing(stack: FakeStack, _: pytest.MonkeyPatch) -> None:
    return None


def emperor_dir_not_writable(stack: FakeStack, monkeypatch: pytest.MonkeyPatch) -> None:
    access = os.access
    emperor = str(stack.emperor)

    def refused(path: Any, mode: int, **kwargs: Any) -> bool:
        return False if str(path) == emperor and mode & os.W_OK else access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", refused)


def surge_state(text: str) -> Setup:
    def setup(stack: FakeStack, _: pytest.MonkeyPatch) -> None:
        (stack.emperor / ur.SURGE_STATE).write_text(text)
        os.utime(stack.emperor / ur.SURGE_STATE, (1000, 1000))

    return setup


SURGE_1 = ("--max-surge", "1")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    setup: Setup
    exit_code: int
    #: a piece of the one line on stderr
    says: str
    extra: tuple[str, ...] = ()
    #: the configs whose mtime may change (the rest must not)
    touched: frozenset[str] = frozenset()
    drain: bool = True


DEEP = b"[" * 100_000
TRUNCATED = vassals_doc({"id": "vassal_01.ini", "pid": 100})[:20]
QUICK_TIMEOUT = ("--timeout", "0.3")
REST = frozenset({"vassal_02.ini", "vassal_03.ini"})

CASES = [
    # refused before anything is touched or drained: exit 2
    Case("emperor dir unreadable", emperor_dir_unreadable, 2, "Permission denied"),
    Case("emperor stats: a list", emperor_answers(doc([])), 2, "not an object"),
    Case("emperor stats: nothing", emperor_answers(b""), 2, "did not answer with JSON"),
    Case("emperor stats: closed mid-read", emperor_answers(TRUNCATED), 2, "did not answer"),
    Case("emperor stats: reset mid-read", emperor_answers(RESET), 2, "cannot read stats socket"),
    Case("emperor stats: nested too deep", emperor_answers(DEEP), 2, "did not answer with JSON"),
    Case("emperor stats: vassals an object", emperor_answers(doc({"vassals": {}})), 2, "list"),
    Case("emperor stats: vassal not an object", emperor_answers(vassals_doc("a")), 2, "object"),
    Case("emperor stats: vassal without id", emperor_answers(vassals_doc({"pid": 1})), 2, "id"),
    Case(
        "emperor stats: pid not a number",
        emperor_answers(vassals_doc({"id": "vassal_01.ini", "pid": "x"})),
        2,
        "pid 'x', not a number",
    ),
    Case(
        "emperor stats: accepting null",
        emperor_answers(vassals_doc({"id": "vassal_01.ini", "accepting": None})),
        2,
        "not a number",
    ),
    Case("fastrouter stats: a number", fastrouter_answers(doc(7)), 2, "not an object"),
    Case(
        "fastrouter stats: subscription not an object",
        fastrouter_answers(doc({"subscriptions": [KEY]})),
        2,
        "not an object",
    ),
    Case(
        "fastrouter stats: nodes an object",
        fastrouter_answers(doc({"subscriptions": [{"key": KEY, "nodes": {}}]})),
        2,
        "not a list",
    ),
    Case(
        "fastrouter stats: node without a name",
        fastrouter_answers(nodes_doc({"ref": 0})),
        2,
        "name",
    ),
    Case(
        "fastrouter stats: ref not a number",
        fastrouter_answers(nodes_doc({"name": "/run/vassal_01.sock", "ref": [1]})),
        2,
        "not a number",
    ),
    # surge: refused before anything is touched or made
    Case("--max-surge -1", nothing, 2, "must be 0 or more", ("--max-surge", "-1")),
    Case(
        "minimum = N without surge",
        nothing,
        2,
        "leaves nothing to reload",
        ("--minimum-active-vassals", "4"),
    ),
    Case(
        "minimum = N + K with surge",
        nothing,
        2,
        "with 1 twins per key from --max-surge",
        ("--minimum-active-vassals", "5", *SURGE_1),
    ),
    Case(
        "surge: emperor dir not writable", emperor_dir_not_writable, 2, "cannot make links", SURGE_1
    ),
    Case(
        "surge: a state file not the tool's",
        surge_state('{"twins": 3}'),
        2,
        "not one uwsgi-reload writes",
        SURGE_1,
    ),
    Case(
        "surge: a state file naming a path",
        surge_state('{"twins": [{"id": "../x.ini", "target": "/t", "of": "vassal_01.ini"}]}'),
        2,
        "not one uwsgi-reload writes",
    ),
    # surge: a twin that never comes up stops the run before any original is touched
    Case(
        "surge: the twin never comes up",
        nothing,
        1,
        "nothing was reloaded",
        ("--minimum-active-vassals", "4", *SURGE_1, *QUICK_TIMEOUT),
    ),
    Case("interrupted before the run", on_snapshot(1, raise_(KeyboardInterrupt())), 130, "before"),
    Case(
        "unexpected error before the run",
        on_snapshot(1, raise_(RuntimeError("x"))),
        2,
        "unexpected RuntimeError: x (nothing was touched)",
    ),
    # once vassals are drained: they go back into the router before the tool exits
    Case(
        "emperor stats turn odd while draining",
        emperor_answers(vassals_doc({"id": 1}), from_read=2),
        1,
        "stats unreadable for 0.3s",
        QUICK_TIMEOUT,
    ),
    Case(
        "emperor stats close mid-read while draining",
        emperor_answers(TRUNCATED, from_read=2),
        1,
        "did not answer with JSON",
        QUICK_TIMEOUT,
    ),
    Case(
        "fastrouter stats reset while draining",
        fastrouter_answers(RESET, from_read=2),
        1,
        "cannot read stats socket",
        QUICK_TIMEOUT,
    ),
    Case(
        "unexpected error while draining",
        on_snapshot(2, raise_(RuntimeError("boom"))),
        1,
        "unexpected RuntimeError: boom",
    ),
    Case("SIGINT while draining", on_snapshot(2, sigint), 130, "interrupted by SIGINT"),
    Case(
        "KeyboardInterrupt while draining",
        on_snapshot(2, raise_(KeyboardInterrupt())),
        130,
        "interrupted",
    ),
    # a touch refused: that vassal is put back, nothing more starts; the others in the same
    # poll were touched already
    Case(
        "touch refused (EPERM), drained",
        touch_refused("vassal_01.ini"),
        1,
        "not reloaded: vassal_01, vassal_04",
        touched=REST,
    ),
    Case(
        "touch refused (EPERM), not drained",
        touch_refused("vassal_01.ini"),
        1,
        "not reloaded: vassal_01, vassal_04",
        touched=REST,
        drain=False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_failure_ends_in_one_line_and_leaves_no_vassal_drained(
    stack: FakeStack,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: Case,
) -> None:
    io = case.setup(stack, monkeypatch)
    before = stack.mtimes()
    drain = ("--subscription-server", stack.subscription_server) if case.drain else ()
    code = ur.main(stack.argv(*drain, *case.extra), io=io)
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert code == case.exit_code, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("uwsgi-reload: error: "), err
    assert case.says in lines[0], err
    assert "Traceback" not in out + err
    after = stack.mtimes()
    changed = {vid for vid in before if after[vid] != before[vid]}
    assert changed == set(case.touched), out
    assert stack.out_of_router() == [], (out, stack.packets)
    if case.exit_code == ur.EXIT_USAGE:
        assert out == "" and stack.unsubscribed() == 0


def test_lock_held_exits_3_in_one_line(
    stack: FakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    before = stack.mtimes()
    holder = hold_lock(stack.emperor)
    try:
        code = ur.main(stack.argv("--subscription-server", stack.subscription_server))
    finally:
        release(holder)
    err = capsys.readouterr().err
    assert code == ur.EXIT_LOCKED
    assert len(err.splitlines()) == 1 and "is reloading the emperor" in err, err
    assert stack.mtimes() == before
    assert stack.unsubscribed() == 0


def test_dry_run_with_a_key_at_its_minimum_and_a_vassal_not_live(
    stack: FakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    """3 live for the key, minimum 3, one vassal not live: it goes first, the rest wait."""
    stack.in_router["vassal_04"] = False
    before = stack.mtimes()
    code = ur.main(stack.argv("--dry-run", "--minimum-active-vassals", "3"))
    out, err = capsys.readouterr()
    assert (code, err) == (ur.EXIT_OK, ""), err
    assert f"key '{KEY}': 3 live, minimum 3: its live vassals wait" in out
    assert stack.mtimes() == before


def test_a_failed_probe_keeps_its_vassal_out_and_the_report_says_so(
    stack: FakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    def probe(name: str, key: str, path: str, timeout: float) -> ur.ProbeResult:
        status = 500 if "vassal_01" in name else 200
        return ur.ProbeResult(status, f"GET {path} to {name} answered {status}")

    argv = stack.argv("--subscription-server", stack.subscription_server, "--probe", "/", "--json")
    assert ur.main(argv, io=ur.Io(probe=probe)) == ur.EXIT_NOT_ALL_RELOADED
    out, err = capsys.readouterr()
    report = {v["name"]: v for v in json.loads(out)["vassals"]}
    assert report["vassal_01"]["outcome"] == ur.Outcome.FAILED
    assert "left unsubscribed from the fastrouter" in report["vassal_01"]["detail"]
    assert stack.out_of_router(settle=0.2) == ["vassal_01"]
    assert err.splitlines()[-1].startswith("uwsgi-reload: error: reloaded 2 of 4")


def test_a_stats_server_that_sends_a_byte_at_a_time_is_given_up_at_the_timeout(
    short_dir: Path,
) -> None:
    """The timeout holds for the whole document, not for each read."""
    path = str(short_dir / "slow.sock")
    document = json.dumps({"vassals": []}).encode()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()

        def trickle() -> None:
            conn, _ = server.accept()
            with conn, contextlib.suppress(OSError):
                for byte in document:
                    conn.sendall(bytes([byte]))
                    time.sleep(0.1)

        threading.Thread(target=trickle, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(ur.StatsError, match=r"whole document within 0\.5s"):
            ur.read_stats(path, timeout=0.5)
        assert time.monotonic() - started < len(document) * 0.1


def test_a_stats_document_past_the_cap_is_refused(short_dir: Path) -> None:
    path = str(short_dir / "big.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()

        def flood() -> None:
            conn, _ = server.accept()
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"[" + b"0," * (2 << 20))

        threading.Thread(target=flood, daemon=True).start()
        with pytest.raises(ur.StatsError, match="sent more than 1 MiB"):
            ur.read_stats(path, timeout=5.0, max_bytes=1 << 20)


def test_an_error_line_stays_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    """An emperor of 200,000 vassals, none of them the configs found: one short line."""
    reporter = ur.Reporter(False, sys.stdout, sys.stderr)
    vassals = {
        f"v{i}.ini": ur.EmperorVassal(f"v{i}.ini", 1, 0, 0, True, True) for i in range(200_000)
    }
    fleet = [ur.VassalReload("a.ini", "a", "/e/a.ini")]
    with pytest.raises(ur.ReloadError) as refused:
        ur.check_fleet(fleet, ur.Snapshot(vassals, []), 1)
    assert "and 199990 more" in str(refused.value)
    reporter.error("x" * 10 * ur.MAX_LINE)
    (line,) = capsys.readouterr().err.splitlines()
    assert len(line) < ur.MAX_LINE + 100


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ur-", dir="/tmp") as d:
        yield Path(d)
