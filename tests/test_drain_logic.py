"""Rotation control: subscription packets, the readiness probe, and draining / fast return / probe
decisions in whole runs against a simulated emperor and fastrouter (no sleeping)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import uwsgi_reload as ur
from tests.test_reload_logic import SimStack, SimVassal, fleet, run_on, vassal
from tests.uwsgi_packets import decode_packet, decode_vars

KEY = "domain.tld"


def node(name: str = "/run/a.sock", key: str = KEY, **fields: Any) -> ur.Node:
    return ur.Node(key=key, name=name, death_mark=bool(fields.pop("dead", 0)), ref=0, **fields)


def var(key: str, value: str) -> bytes:
    """One uwsgi var spelled out from the documented format, independently of the encoder."""
    k, v = key.encode(), value.encode()
    return struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v


# ---------------------------------------------------------------------------------------------
# Packets
# ---------------------------------------------------------------------------------------------


def test_unsubscribe_packet_is_the_documented_bytes() -> None:
    packet = ur.Subscription(ur.Command.UNSUBSCRIBE, node("/run/a.sock")).packet()
    body = var("key", KEY) + var("address", "/run/a.sock")
    assert packet == bytes([224]) + struct.pack("<H", len(body)) + bytes([1]) + body


def test_subscribe_packet_repeats_what_the_node_had() -> None:
    n = node("127.0.0.1:3031", modifier1=5, cores=4, load=2, weight=3)
    modifier1, modifier2, pairs = decode_packet(ur.Subscription(ur.Command.SUBSCRIBE, n).packet())
    assert (modifier1, modifier2) == (224, 0)
    assert dict(pairs) == {
        "key": KEY,
        "address": "127.0.0.1:3031",
        "modifier1": "5",
        "modifier2": "0",
        "cores": "4",
        "load": "2",
        "weight": "3",
    }


def test_subscribe_weight_is_at_least_one() -> None:
    # the router stores weight 0 as 1 (core/subscription.c); stats from elsewhere may say 0
    pairs = dict(ur.Subscription(ur.Command.SUBSCRIBE, node(weight=0)).vars())
    assert pairs["weight"] == "1"


@pytest.mark.parametrize("pairs", [[], [("a", "")], [("key", "dömain"), ("x" * 300, "y" * 35000)]])
def test_vars_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert decode_vars(ur.encode_vars(pairs)) == pairs


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xe0\x05\x00",  # short header
        b"\xe0\x05\x00\x00\x03\x00ke",  # body shorter than the header says
        b"\xe0\x04\x00\x00\x03\x00ke",  # a var runs past the body
        b"\xe0\x01\x00\x00\x03",  # a length cut in half
    ],
)
def test_decode_refuses_malformed_packets(data: bytes) -> None:
    with pytest.raises(ur.PacketError):
        decode_packet(data)


def test_packet_body_over_64k_is_refused() -> None:
    with pytest.raises(ur.PacketError):
        ur.encode_packet(0, 0, b"x" * 65536)


def test_send_datagram_over_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "ss.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        sent = ur.Subscription(ur.Command.UNSUBSCRIBE, node()).packet()
        ur.send_datagram(path, sent)
        assert server.recv(4096) == sent


def test_send_datagram_over_udp() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        ur.send_datagram(f"127.0.0.1:{port}", b"\xe0\x00\x00\x01")
        assert server.recv(4096) == b"\xe0\x00\x00\x01"


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------


def test_probe_request_is_a_uwsgi_get_for_the_key() -> None:
    modifier1, modifier2, pairs = decode_packet(
        ur.probe_request("/health?full=1", KEY, "/run/a.sock")
    )
    assert (modifier1, modifier2) == (0, 0)
    env = dict(pairs)
    assert env["REQUEST_METHOD"] == "GET"
    assert env["PATH_INFO"] == "/health"
    assert env["QUERY_STRING"] == "full=1"
    assert env["REQUEST_URI"] == "/health?full=1"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["SERVER_NAME"] == env["HTTP_HOST"] == KEY
    assert env["SERVER_PORT"] == "80"
    assert env["REMOTE_ADDR"] == "127.0.0.1"


def test_probe_of_a_tcp_node_names_its_port() -> None:
    env = dict(ur.probe_vars("/", KEY, "127.0.0.1:3031"))
    assert env["SERVER_PORT"] == "3031"
    assert env["QUERY_STRING"] == ""


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n", 200),
        (b"HTTP/1.0 302 Found\r\n", 302),
        (b"HTTP/1.1 503\r\n", 503),
        (b"HTTP/1.1 404 Not Found\n", 404),
    ],
)
def test_parse_status_line(head: bytes, status: int) -> None:
    assert ur.parse_status_line(head) == status


@pytest.mark.parametrize("head", [b"", b"garbage\r\n", b"HTTP/1.1 OK\r\n", b"Status: 200\r\n"])
def test_parse_status_line_refuses_what_is_not_one(head: bytes) -> None:
    with pytest.raises(ur.PacketError):
        ur.parse_status_line(head)


@pytest.mark.parametrize(
    ("status", "ok"), [(200, True), (204, True), (302, True), (404, False), (500, False)]
)
def test_probe_passes_on_2xx_and_3xx_only(status: int, ok: bool) -> None:
    assert ur.ProbeResult(status, "").ok is ok
    assert ur.ProbeResult(None, "no answer").ok is False


class UwsgiAppSocket:
    """A vassal socket that reads one uwsgi request and answers ``reply`` (or nothing)."""

    def __init__(self, path: str, reply: bytes | None) -> None:
        self.reply = reply
        self.requests: list[dict[str, str]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            header = conn.recv(4, socket.MSG_WAITALL)
            size = struct.unpack("<H", header[1:3])[0]
            body = conn.recv(size, socket.MSG_WAITALL)
            self.requests.append(dict(decode_vars(body)))
            if self.reply is not None:
                conn.sendall(self.reply)
            else:
                self.done.wait(5)

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ur-t-", dir="/tmp") as d:
        yield Path(d)


@pytest.mark.parametrize(
    ("reply", "status", "ok"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, True),
        (b"HTTP/1.1 500 Internal Server Error\r\n\r\n", 500, False),
        (b"", None, False),  # closed without a word
    ],
)
def test_probe_node_reads_the_status(
    short_dir: Path, reply: bytes, status: int | None, ok: bool
) -> None:
    path = str(short_dir / "v.sock")
    app = UwsgiAppSocket(path, reply)
    try:
        result = ur.probe_node(path, KEY, "/ready", timeout=2.0)
    finally:
        app.close()
    assert (result.status, result.ok) == (status, ok), result.detail
    assert app.requests[0]["PATH_INFO"] == "/ready"
    assert app.requests[0]["HTTP_HOST"] == KEY


def test_probe_node_without_an_answer_times_out(short_dir: Path) -> None:
    path = str(short_dir / "v.sock")
    app = UwsgiAppSocket(path, None)
    try:
        result = ur.probe_node(path, KEY, "/", timeout=0.2)
    finally:
        app.close()
    assert not result.ok
    assert "timed out" in result.detail


def test_probe_node_nobody_there(short_dir: Path) -> None:
    result = ur.probe_node(str(short_dir / "gone.sock"), KEY, "/", timeout=0.2)
    assert not result.ok
    assert "No such file" in result.detail


# ---------------------------------------------------------------------------------------------
# Whole runs: an emperor and a fastrouter with a subscription server, simulated
# ---------------------------------------------------------------------------------------------


class RouterSim(SimStack):
    """SimStack plus a fastrouter: nodes leave on unsubscribe and come back on subscribe, requests
    in flight keep a death-marked node (``ref``), and each vassal's master announces itself
    ``announce_delay`` after it accepts and then every ``reannounce`` seconds."""

    def __init__(self, names: list[str], **kwargs: float) -> None:
        self.announce_delay = kwargs.pop("announce_delay", 1.0)
        self.reannounce = kwargs.pop("reannounce", math.inf)
        super().__init__(names, **kwargs)
        self.in_router = dict.fromkeys(self.vassals, True)
        self.next_announce = dict.fromkeys(self.vassals, self.reannounce)
        #: in-flight requests per vassal: the times they finish
        self.requests: dict[str, list[float]] = {vid: [] for vid in self.vassals}
        self.packets: list[tuple[float, int, dict[str, str]]] = []
        self.probes: list[tuple[str, str, str]] = []
        self.probe_status: dict[str, int | None] = {}
        #: where the tool runs its probes: at once, in the calling thread, so runs repeat exactly
        self.pool: Callable[[], Executor] = Inline
        self.touched_in_flight: list[tuple[str, int]] = []
        self.fewest_in_router = len(names)
        #: the tool's calls in order: ("snapshot" | "touch" | "sleep", sim time, seconds slept)
        self.calls: list[tuple[str, float, float]] = []
        #: (vassal, seconds) a touched vassal the emperor had not yet acted on was back in the
        #: router after its master announced it: a request routed to it then waits out its restart
        self.exposed: list[tuple[str, float]] = []
        self._exposed_since: dict[str, float] = {}

    def _vid(self, address: str) -> str:
        return f"{ur.node_vassal_name(address)}.ini"

    def _advance(self) -> None:
        was = {vid: v.down_until for vid, v in self.vassals.items()}
        super()._advance()
        for vid, v in self.vassals.items():
            if v.down_until is not None and v.down_until != was[vid]:  # a reload registered
                self.in_router[vid] = False  # unsubscribe-on-graceful-reload
                self._close_exposure(vid)
                self.next_announce[vid] = v.down_until + self.announce_delay
            if self.live(v) and self.t >= self.next_announce[vid]:
                if v.registers_at is not None and not self.in_router[vid]:
                    self._exposed_since[vid] = self.next_announce[vid]
                self.in_router[vid] = True
                self.next_announce[vid] = self.t + self.reannounce
        routed = sum(self.in_router[vid] and self.live(v) for vid, v in self.vassals.items())
        self.fewest_in_router = min(self.fewest_in_router, routed)

    def ref(self, vid: str) -> int:
        return sum(1 for end in self.requests[vid] if end > self.t)

    def touch(self, path: str, mtime: int) -> None:
        vid = os.path.basename(path)
        self.touched_in_flight.append((vid, self.ref(vid)))
        self.calls.append(("touch", self.t, 0.0))
        super().touch(path, mtime)

    def _close_exposure(self, vid: str) -> None:
        if vid in self._exposed_since:
            self.exposed.append((vid, self.t - self._exposed_since.pop(vid)))

    def sleep(self, seconds: float) -> None:
        self.calls.append(("sleep", self.t, seconds))
        super().sleep(seconds)

    def snapshot(self, options: ur.Options) -> ur.Snapshot:
        self.calls.append(("snapshot", self.t, 0.0))
        self._advance()
        vassals = {
            v.vid: vassal(v.vid, v.pid, v.respawns, v.last_mod, accepting=self.live(v))
            for v in self.vassals.values()
        }
        nodes = [
            ur.Node(
                key=KEY,
                name=self.address(v),
                death_mark=not self.in_router[v.vid],
                ref=self.ref(v.vid),
                cores=1,
                weight=1,
            )
            for v in self.vassals.values()
            if (self.in_router[v.vid] and self.live(v)) or self.ref(v.vid)
        ]
        return ur.Snapshot(vassals, nodes)

    def address(self, v: SimVassal) -> str:
        return f"/run/{ur.strip_suffix(v.vid, '.ini')}.sock"

    def send(self, address: str, data: bytes) -> None:
        assert address == "ss.sock"
        modifier1, command, pairs = decode_packet(data)
        assert modifier1 == 224
        fields = dict(pairs)
        assert fields["key"] == KEY
        self.packets.append((self.t, command, fields))
        self.in_router[self._vid(fields["address"])] = command == ur.Command.SUBSCRIBE
        if command == ur.Command.UNSUBSCRIBE:
            self._close_exposure(self._vid(fields["address"]))

    def probe(self, name: str, key: str, path: str, timeout: float) -> ur.ProbeResult:
        self.probes.append((name, key, path))
        status = self.probe_status.get(self._vid(name), 200)
        return ur.ProbeResult(status, f"GET {path} to {name} answered {status}")

    def sent(self, vid: str, command: ur.Command) -> list[float]:
        return [t for t, c, f in self.packets if c == command and self._vid(f["address"]) == vid]

    def io(self) -> ur.Io:
        return dataclasses.replace(
            super().io(), send=self.send, probe=self.probe, probe_pool=self.pool
        )


VASSALS = ("vassal_01", "vassal_02", "vassal_03")


class Inline(Executor):
    """An executor that runs each call as it is submitted."""

    def submit(  # type: ignore[override]
        self, fn: Callable[..., ur.ProbeResult], /, *args: Any, **kwargs: Any
    ) -> Future[ur.ProbeResult]:
        future: Future[ur.ProbeResult] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def run_sim(
    emperor_dir: Path,
    n: int = 4,
    minimum: int = 1,
    *,
    drain: bool = True,
    probe: str | None = None,
    drain_timeout: float = 5.0,
    timeout: float = 10.0,
    setup: object = None,
    **stack_args: float,
) -> tuple[int, RouterSim, str]:
    stack = RouterSim([f"vassal_{i:02d}.ini" for i in range(1, n + 1)], **stack_args)
    code, output = run_on(
        stack,
        emperor_dir,
        setup,
        minimum_active_vassals=minimum,
        timeout=timeout,
        subscription_server="ss.sock" if drain else None,
        drain_timeout=drain_timeout,
        probe=probe,
    )
    return code, stack, output


@pytest.mark.parametrize(("n", "minimum"), [(2, 1), (4, 1), (4, 3), (5, 2)])
def test_drain_keeps_the_minimum_in_the_router(tmp_path: Path, n: int, minimum: int) -> None:
    code, stack, out = run_sim(tmp_path, n=n, minimum=minimum)
    assert code == ur.EXIT_OK, out
    # draining counts as not live: the router itself never has fewer than the minimum
    assert stack.fewest_in_router >= minimum, out
    assert all(v.respawns == 1 for v in stack.vassals.values())
    for vid in stack.vassals:
        # unsubscribed first, touched after, subscribed again on return
        [unsubscribed] = stack.sent(vid, ur.Command.UNSUBSCRIBE)
        touched = next(t for t, v in stack.touched if v == vid)
        assert unsubscribed < touched
        assert len(stack.sent(vid, ur.Command.SUBSCRIBE)) == 1


def test_touch_waits_until_no_request_is_in_flight(tmp_path: Path) -> None:
    def busy(stack: RouterSim) -> None:
        stack.requests["vassal_01.ini"] = [0.45, 0.7]
        stack.requests["vassal_02.ini"] = [0.25]

    code, stack, out = run_sim(tmp_path, n=3, minimum=1, setup=busy)
    assert code == ur.EXIT_OK, out
    touched = {vid: t for t, vid in stack.touched}
    assert touched["vassal_01.ini"] >= 0.7
    assert 0.25 <= touched["vassal_02.ini"] < 0.7
    assert all(ref == 0 for _, ref in stack.touched_in_flight), stack.touched_in_flight
    assert "vassal_01: triggered after draining 0.70s" in out


def test_drain_timeout_touches_anyway_and_says_so(tmp_path: Path) -> None:
    def stuck(stack: RouterSim) -> None:
        stack.requests["vassal_01.ini"] = [math.inf]

    code, stack, out = run_sim(tmp_path, n=2, minimum=1, drain_timeout=2.0, setup=stuck)
    assert code == ur.EXIT_OK, out
    touched = {vid: t for t, vid in stack.touched}
    assert 2.0 <= touched["vassal_01.ini"] < 2.2
    assert ("vassal_01.ini", 1) in stack.touched_in_flight
    assert "triggered anyway: drain timed out after 2s with 1 requests in flight" in out
    # the summary repeats it
    assert out.count("drain timed out after 2s") == 2


def test_reannounce_while_draining_is_unsubscribed_again(tmp_path: Path) -> None:
    def reannounces(stack: RouterSim) -> None:
        stack.requests["vassal_01.ini"] = [0.6]
        stack.next_announce["vassal_01.ini"] = 0.3  # the master announces mid-drain

    code, stack, out = run_sim(tmp_path, n=2, minimum=1, setup=reannounces)
    assert code == ur.EXIT_OK, out
    unsubscribed = stack.sent("vassal_01.ini", ur.Command.UNSUBSCRIBE)
    assert len(unsubscribed) == 2 and unsubscribed[1] >= 0.3, unsubscribed
    assert "vassal_01: re-announced while draining: unsubscribed again" in out
    assert all(ref == 0 for _, ref in stack.touched_in_flight)


def test_after_a_touch_the_stats_are_read_at_once(tmp_path: Path) -> None:
    """The stats connection makes the emperor rescan: it acts on the touch now, not a poll later."""
    code, stack, out = run_sim(tmp_path, n=4, minimum=1)
    assert code == ur.EXIT_OK, out
    kinds = [kind for kind, _, _ in stack.calls]
    after_touches = [
        next(k for k in kinds[i:] if k != "touch")
        for i, kind in enumerate(kinds)
        if kind == "touch"
    ]
    assert len(after_touches) == 4
    assert set(after_touches) == {"snapshot"}


def test_polls_closely_while_a_drained_vassal_is_not_yet_reloading(tmp_path: Path) -> None:
    def busy(stack: RouterSim) -> None:
        stack.requests["vassal_01.ini"] = [0.3]

    code, stack, out = run_sim(tmp_path, n=2, minimum=1, lag=0.2, setup=busy)
    assert code == ur.EXIT_OK, out
    touched = next(t for t, vid in stack.touched if vid == "vassal_01.ini")
    registered = touched + 0.2
    sleeps = [(t, s) for kind, t, s in stack.calls if kind == "sleep"]
    # draining (0 to 0.3 s) and touched but not yet registered (0.3 to 0.5 s): 10 ms polls
    assert all(s == ur.CLOSE_WATCH_INTERVAL for t, s in sleeps if t < registered - 1e-9)
    # reloading, nothing out of the router and not reloading: the check interval
    assert any(s == 0.1 for t, s in sleeps if t > registered + 0.1)


def test_reannounce_after_the_touch_is_undone_within_one_close_poll(tmp_path: Path) -> None:
    """The old master announces itself after the touch, before the emperor acts on it."""

    def announces_late(stack: RouterSim) -> None:
        for vid in stack.vassals:
            stack.next_announce[vid] = 0.05

    code, stack, out = run_sim(tmp_path, n=2, minimum=1, lag=0.3, setup=announces_late)
    assert code == ur.EXIT_OK, out
    assert "re-announced before its reload: unsubscribed again" in out
    assert stack.exposed, "the set-up did not put a touched vassal back in the router"
    assert max(seconds for _, seconds in stack.exposed) <= ur.CLOSE_WATCH_INTERVAL + 1e-9


def test_fast_return_subscribes_as_soon_as_it_accepts(tmp_path: Path) -> None:
    code, stack, out = run_sim(tmp_path, n=2, minimum=1, announce_delay=1.0)
    assert code == ur.EXIT_OK, out
    # reload takes lag 0.05 + 1 s; without the fast return the node would be live 1 s later
    first_sub = stack.sent("vassal_01.ini", ur.Command.SUBSCRIBE)[0]
    assert first_sub < 1.4
    fields = next(f for _, c, f in stack.packets if c == ur.Command.SUBSCRIBE)
    assert (fields["cores"], fields["weight"], fields["modifier1"]) == ("1", "1", "0")
    assert stack.t < 2 * 1.4, out


def test_without_a_subscription_server_nothing_is_sent(tmp_path: Path) -> None:
    code, stack, out = run_sim(tmp_path, n=3, minimum=1, drain=False)
    assert code == ur.EXIT_OK, out
    assert stack.packets == []
    assert "draining" not in out


def test_not_live_vassal_is_not_drained(tmp_path: Path) -> None:
    def one_out(stack: RouterSim) -> None:
        stack.in_router["vassal_03.ini"] = False  # accepting, never announced

    code, stack, out = run_sim(tmp_path, n=3, minimum=2, setup=one_out)
    assert code == ur.EXIT_OK, out
    assert stack.touched[0] == (0.0, "vassal_03.ini"), out
    assert stack.sent("vassal_03.ini", ur.Command.UNSUBSCRIBE) == []


def test_probe_passes_before_back_and_before_the_fast_return(tmp_path: Path) -> None:
    code, stack, out = run_sim(tmp_path, n=2, minimum=1, probe="/ready")
    assert code == ur.EXIT_OK, out
    assert stack.probes == [
        ("/run/vassal_01.sock", KEY, "/ready"),
        ("/run/vassal_02.sock", KEY, "/ready"),
    ]
    assert "probe passed (GET /ready to /run/vassal_01.sock answered 200): subscribed" in out


def test_the_probes_of_one_step_run_together(tmp_path: Path) -> None:
    """Two vassals accepting at once are probed at once: each probe waits for the other to start,
    which one after the other would never happen (each would time out at the barrier)."""
    both = threading.Barrier(2, timeout=5)

    def together(stack: RouterSim) -> None:
        answer = stack.probe

        def probe(name: str, key: str, path: str, timeout: float) -> ur.ProbeResult:
            if "vassal_03" not in name:  # the first round: 01 and 02 (03 goes alone, after)
                try:
                    both.wait()
                except threading.BrokenBarrierError:
                    return ur.ProbeResult(None, f"GET {path} to {name}: probed alone")
            return answer(name, key, path, timeout)

        stack.probe = probe  # type: ignore[method-assign]
        stack.pool = ThreadPoolExecutor

    code, stack, out = run_sim(tmp_path, n=3, minimum=1, probe="/", setup=together)
    assert code == ur.EXIT_OK, out
    assert len(stack.probes) == 3
    assert "probed alone" not in out


def test_a_slow_probe_holds_no_other_vassal_back(tmp_path: Path) -> None:
    """vassal_01 answers its probe only after 0.5 s more of the run (as a worker still in its
    accepting hook does): meanwhile the tool goes on polling, and vassal_02 is back first."""

    def slow_first(stack: RouterSim) -> None:
        answer = stack.probe

        def probe(name: str, key: str, path: str, timeout: float) -> ur.ProbeResult:
            if "vassal_01" in name:
                until, deadline = stack.t + 0.5, time.monotonic() + 5
                while stack.t < until and time.monotonic() < deadline:
                    time.sleep(0.001)
            return answer(name, key, path, timeout)

        stack.probe = probe  # type: ignore[method-assign]
        stack.pool = ThreadPoolExecutor

    code, stack, out = run_sim(tmp_path, n=3, minimum=1, probe="/", setup=slow_first)
    assert code == ur.EXIT_OK, out
    lines = out.splitlines()
    back = {v: next(i for i, line in enumerate(lines) if f"{v}: back" in line) for v in VASSALS}
    assert back["vassal_02"] < back["vassal_01"] < back["vassal_03"], out
    assert stack.fewest_in_router >= 1


def test_probe_without_drain_still_gates_back(tmp_path: Path) -> None:
    code, stack, out = run_sim(tmp_path, n=2, minimum=1, drain=False, probe="/")
    assert code == ur.EXIT_OK, out
    assert len(stack.probes) == 2
    assert stack.packets == []


@pytest.mark.parametrize("status", [500, 404, None])
def test_failed_probe_stops_the_rollout_and_keeps_the_vassal_out(
    tmp_path: Path, status: int | None
) -> None:
    def broken(stack: RouterSim) -> None:
        stack.probe_status["vassal_01.ini"] = status

    code, stack, out = run_sim(tmp_path, n=4, minimum=2, probe="/", setup=broken)
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    touched = [vid for _, vid in stack.touched]
    # 01 and 02 went together; 01's probe failed: 03 and 04 never start
    assert touched == ["vassal_01.ini", "vassal_02.ini"], out
    assert "vassal_01: failed: probe failed" in out
    assert "vassal_03: not started: the probe of vassal_01 failed" in out
    assert stack.sent("vassal_01.ini", ur.Command.SUBSCRIBE) == []
    assert not stack.in_router["vassal_01.ini"]
    # the in-flight one completes normally
    assert "vassal_02: back after" in out


def test_failed_probe_unsubscribes_a_node_its_master_announced(tmp_path: Path) -> None:
    def broken(stack: RouterSim) -> None:
        stack.probe_status["vassal_01.ini"] = 500
        stack.reload_times = {"vassal_02.ini": 3.0}

    code, stack, out = run_sim(
        tmp_path, n=3, minimum=1, probe="/", announce_delay=0.3, setup=broken
    )
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    # 01's master announced it again 0.3 s after it accepted; the tool takes it out every time
    # for as long as the run lasts (vassal_02 is still reloading)
    assert len(stack.sent("vassal_01.ini", ur.Command.UNSUBSCRIBE)) >= 2, out
    assert "re-announced after its failed probe: unsubscribed again" in out


def test_failed_probe_puts_a_draining_vassal_back_untouched(tmp_path: Path) -> None:
    def setup(stack: RouterSim) -> None:
        stack.probe_status["vassal_01.ini"] = 500
        stack.reload_times = {"vassal_02.ini": 0.3}  # 02 is back early: 03 starts draining
        stack.requests["vassal_03.ini"] = [math.inf]  # and still drains when 01's probe fails

    code, stack, out = run_sim(tmp_path, n=3, minimum=1, probe="/", setup=setup, drain_timeout=30)
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    assert "vassal_03.ini" not in [vid for _, vid in stack.touched]
    assert stack.sent("vassal_03.ini", ur.Command.SUBSCRIBE), out
    assert "vassal_03: not started: the probe of vassal_01 failed (was draining" in out


def test_interrupt_while_draining_puts_the_vassal_back(tmp_path: Path) -> None:
    def setup(stack: RouterSim) -> None:
        stack.requests["vassal_01.ini"] = [math.inf]
        stack.on_sleep.append((0.3, lambda: os.kill(os.getpid(), signal.SIGINT)))

    code, stack, out = run_sim(tmp_path, n=3, minimum=2, setup=setup, drain_timeout=30)
    assert code == ur.EXIT_INTERRUPTED, out
    assert stack.touched == []
    assert stack.sent("vassal_01.ini", ur.Command.SUBSCRIBE)
    assert "was draining, not touched" in out


def rsnap(**vassals: tuple[int, bool, bool]) -> ur.Snapshot:
    """name=(respawns, accepting, live in the router) for each vassal, under KEY."""
    return ur.Snapshot(
        {
            f"{n}.ini": vassal(f"{n}.ini", respawns=r, accepting=a)
            for n, (r, a, _) in vassals.items()
        },
        [node(f"/run/{n}.sock") for n, (_, _, live) in vassals.items() if live],
    )


def test_core_drain_probe_and_a_failed_probe_by_phase() -> None:
    P, E = ur.Phase, ur.EventKind
    rollout = ur.Rollout(
        fleet("a", "b", "c", "d"), ur.Rules(minimum=2, timeout=10, drain=True, probe=True)
    )
    a, b, c, _ = rollout.vassals.values()
    up, out, accepting = (0, True, True), (0, True, False), (1, True, False)
    events = rollout.step(rsnap(a=up, b=up, c=up, d=up), 0.0)
    assert [(e.vassal, e.kind) for e in events] == [(a, E.DRAINING), (b, E.DRAINING)]
    assert {s.command for e in events for s in e.send} == {ur.Command.UNSUBSCRIBE}
    assert (a.phase, b.phase, c.phase) == (P.DRAINING, P.DRAINING, P.PENDING)
    assert rollout.watch_closely()
    events = rollout.step(rsnap(a=out, b=out, c=up, d=up), 0.1)
    assert [e.kind for e in events] == [E.TRIGGERED_DRAINED] * 2
    assert all(e.touches for e in events)
    assert (a.phase, b.phase) == (P.RELOADING, P.RELOADING)
    probes = rollout.step(rsnap(a=accepting, b=accepting, c=up, d=up), 1.0)
    assert [(e.vassal, e.kind) for e in probes] == [(a, E.PROBE), (b, E.PROBE)]
    assert (a.phase, b.phase) == (P.PROBING, P.PROBING)
    # while a probe is out nothing else is decided
    assert rollout.step(rsnap(a=accepting, b=accepting, c=up, d=up), 1.05) == []
    (passed,) = rollout.probed(a, ur.ProbeResult(200, "answered 200"), 1.1)
    assert (passed.kind, a.phase) == (E.SUBSCRIBED, P.SUBSCRIBING)
    assert [s.command for s in passed.send] == [ur.Command.SUBSCRIBE]
    (failed,) = rollout.probed(b, ur.ProbeResult(500, "answered 500"), 1.1)
    assert (failed.kind, failed.phase, rollout.stopped_by) == (E.FAILED, P.PROBE_FAILED, b)
    assert [s.command for s in failed.send] == [ur.Command.UNSUBSCRIBE]
    assert rollout.probed(b, ur.ProbeResult(200, "late"), 1.2) == []
    # b's master announces it again: out it goes, recognised by its phase
    events = rollout.step(rsnap(a=(1, True, True), b=(1, True, True), c=up, d=up), 1.2)
    kinds = [(e.vassal.name, e.kind, e.phase) for e in events]
    assert kinds == [
        ("a", E.BACK, P.BACK),
        ("b", E.UNSUBSCRIBED_AGAIN, P.PROBE_FAILED),
        ("c", E.NOT_STARTED, P.NOT_STARTED),
        ("d", E.NOT_STARTED, P.NOT_STARTED),
    ]
    assert c.not_started is ur.NotStarted.STOPPED
    assert rollout.done


def test_core_abandon_puts_draining_vassals_back() -> None:
    rollout = ur.Rollout(fleet("a", "b"), ur.Rules(minimum=1, timeout=10, drain=True))
    a, b = rollout.vassals.values()
    rollout.step(rsnap(a=(0, True, True), b=(0, True, True)), 0.0)
    assert a.phase is ur.Phase.DRAINING
    (back,) = rollout.abandon("interrupted by SIGINT", 0.1)
    assert (back.vassal, back.kind) == (a, ur.EventKind.NOT_STARTED)
    assert [(p.command, p.node.name) for p in back.send] == [(ur.Command.SUBSCRIBE, "/run/a.sock")]
    assert (a.phase, a.not_started) == (ur.Phase.NOT_STARTED, ur.NotStarted.ABANDONED)
    assert b.phase is ur.Phase.NOT_STARTED


def test_core_puts_back_drained_vassals_whose_old_instance_still_serves() -> None:
    """A touch refused, or one the emperor never registered: subscribed again."""
    P, E, SUBSCRIBE = ur.Phase, ur.EventKind, ur.Command.SUBSCRIBE
    rollout = ur.Rollout(fleet("a", "b", "c"), ur.Rules(minimum=1, timeout=2, drain=True))
    a, b, c = rollout.vassals.values()
    up, out = (0, True, True), (0, True, False)
    rollout.step(rsnap(a=up, b=up, c=up), 0.0)
    events = rollout.step(rsnap(a=out, b=out, c=up), 0.1)
    assert [e.kind for e in events] == [E.TRIGGERED_DRAINED] * 2
    (failed,) = rollout.act_failed(a, "[Errno 1] Operation not permitted", 0.1)
    assert (failed.kind, a.phase, rollout.stopped_by) == (E.FAILED, P.TOUCH_FAILED, a)
    assert [(p.command, p.node.name) for p in failed.send] == [(SUBSCRIBE, "/run/a.sock")]
    events = rollout.step(rsnap(a=up, b=out, c=up), 0.2)
    assert [(e.vassal, e.kind) for e in events] == [(c, E.NOT_STARTED)]
    assert c.not_started is ur.NotStarted.STOPPED
    (timed_out,) = rollout.step(rsnap(a=up, b=out, c=up), 2.1)
    assert (timed_out.kind, b.phase, b.stalled_in) == (E.TIMED_OUT, P.TIMED_OUT, P.RELOADING)
    assert [(p.command, p.node.name) for p in timed_out.send] == [(SUBSCRIBE, "/run/b.sock")]
    assert rollout.done
    assert ur.vassal_detail(c, rollout) == "the touch of a failed"


def test_json_report_has_the_drain_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def busy(stack: RouterSim) -> None:
        stack.requests["vassal_01.ini"] = [0.5]

    names = [f"vassal_{i:02d}.ini" for i in (1, 2)]
    for name in names:
        (tmp_path / name).write_text("[uwsgi]\n")
    stack = RouterSim(names)
    busy(stack)
    options = ur.Options(
        emperor_path=str(tmp_path),
        fastrouter_stats_socket="unused",
        emperor_stats_socket="unused",
        subscription_server="ss.sock",
        json=True,
    )
    code = ur.run(options, ur.Reporter(True, io.StringIO(), io.StringIO()), stack.io())
    report = json.loads(capsys.readouterr().out)
    assert code == report["exit_code"] == 0
    by_name = {v["name"]: v for v in report["vassals"]}
    assert by_name["vassal_01"]["drain"] == pytest.approx(0.5, abs=0.11)
    assert by_name["vassal_01"]["drain_timed_out"] is False


# ---------------------------------------------------------------------------------------------
# Command line: the new flags are validated before anything is read or touched
# ---------------------------------------------------------------------------------------------


def cli(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--emperor-path",
        str(tmp_path),
        "--fastrouter-stats-socket",
        str(tmp_path / "fr.sock"),
        "--emperor-stats-socket",
        str(tmp_path / "em.sock"),
        *extra,
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--subscription-server", "/nonexistent/ss.sock"], "/nonexistent/ss.sock does not exist"),
        (["--subscription-server", "127.0.0.1:70000"], "is not 1-65535"),
        (["--drain-timeout", "0"], "must be a number greater than 0"),
        (["--probe", "health"], "is not a request path"),
        (["--probe", "/a b"], "is not a request path"),
        (["--probe-timeout", "x"], "is not a number"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert ur.main(cli(tmp_path, *extra)) == ur.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


def test_subscription_server_must_be_a_bound_datagram_socket(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = short_dir / "plain"
    plain.write_text("")
    stale = str(short_dir / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(stale)  # the file stays, nobody listens: a fastrouter that has gone
    config = short_dir / "a.ini"
    config.write_text("[uwsgi]\n")
    before = config.stat().st_mtime_ns
    assert ur.main(cli(short_dir, "--subscription-server", str(plain))) == ur.EXIT_USAGE
    assert "is not a socket" in capsys.readouterr().err
    assert ur.main(cli(short_dir, "--subscription-server", stale)) == ur.EXIT_USAGE
    assert "does not take datagrams" in capsys.readouterr().err
    assert config.stat().st_mtime_ns == before


def test_vassal_dying_while_draining_is_waited_for_not_touched(tmp_path: Path) -> None:
    def setup(stack: RouterSim) -> None:
        stack.requests["vassal_01.ini"] = [1.0]
        stack.on_sleep.append((0.3, lambda: stack.kill("vassal_01.ini", down_for=0.5)))

    code, stack, out = run_sim(tmp_path, n=3, minimum=1, setup=setup)
    assert code == ur.EXIT_OK, out
    assert "vassal_01.ini" not in [vid for _, vid in stack.touched]
    assert "vassal_01: restarted by the emperor while draining (pid 100 -> 1100)" in out
    assert "vassal_01: back after" in out


def test_dry_run_describes_drain_and_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["vassal_01.ini", "vassal_02.ini"]
    for name in names:
        (tmp_path / name).write_text("[uwsgi]\n")
    stack = RouterSim(names)
    options = ur.Options(
        emperor_path=str(tmp_path),
        fastrouter_stats_socket="unused",
        emperor_stats_socket="unused",
        subscription_server="ss.sock",
        probe="/ready",
        dry_run=True,
    )
    out = io.StringIO()
    assert ur.run(options, ur.Reporter(False, out, out), stack.io()) == ur.EXIT_OK
    assert "drain: each live vassal is unsubscribed via ss.sock" in out.getvalue()
    assert "probe: GET /ready" in out.getvalue()
    assert stack.packets == [] and stack.touched == [] and stack.probes == []


class VanishingSim(RouterSim):
    """A broken deploy: once the emperor acted on the touch, the new instance dies while starting
    and the vassal is missing from the emperor's stats (core/emperor.c removes a dead vassal and
    throttles its respawn) for the rest of the run."""

    def snapshot(self, options: ur.Options) -> ur.Snapshot:
        snap = super().snapshot(options)
        gone = {vid for vid in self.never_back if self.vassals[vid].down_until is not None}
        return ur.Snapshot({k: v for k, v in snap.vassals.items() if k not in gone}, snap.nodes)


def test_a_broken_vassal_that_vanished_is_not_put_back_in_rotation(tmp_path: Path) -> None:
    """Registered, then gone from the stats: still a reload in flight, never the old instance.

    Subscribing its node again on the timeout would route requests to a dead socket (the broken
    deploy run of tests/test_drain.py lost every request after the timeout that way).
    """
    broken = {"vassal_01.ini", "vassal_02.ini"}
    stack = VanishingSim([f"vassal_{i:02d}.ini" for i in range(1, 5)])
    stack.never_back = set(broken)
    code, out = run_on(
        stack,
        tmp_path,
        None,
        minimum_active_vassals=2,
        timeout=3.0,
        subscription_server="ss.sock",
        drain_timeout=5.0,
        probe=None,
    )
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    for vid in sorted(broken):
        assert stack.sent(vid, ur.Command.SUBSCRIBE) == [], out
        assert not stack.in_router[vid]
    assert stack.fewest_in_router >= 2, out


class RestartingRouter(RouterSim):
    """A router restarted at ``restart_at``: every node gone, each back at its master's next
    announce, ``announce_after`` seconds later. ``touched_out``: vassals touched while the
    restart had them out of the router (not drained by the tool: out of it on their own)."""

    def __init__(self, names: list[str], restart_at: float, announce_after: float) -> None:
        super().__init__(names, reload=1.0, announce_delay=0.1)
        self.restart_at, self.announce_after = restart_at, announce_after
        self.lost: set[str] = set()
        self.touched_out: list[str] = []

    def _advance(self) -> None:
        if self.restart_at <= self.t:
            self.restart_at = math.inf
            self.lost = {vid for vid, up in self.in_router.items() if up}
            for vid in self.vassals:
                self.in_router[vid] = False
                self.next_announce[vid] = self.t + self.announce_after
        super()._advance()
        self.lost -= {vid for vid, up in self.in_router.items() if up}

    def touch(self, path: str, mtime: int) -> None:
        if os.path.basename(path) in self.lost:
            self.touched_out.append(os.path.basename(path))
        super().touch(path, mtime)


@pytest.mark.parametrize("announce_after", [2.0, 30.0])
def test_a_router_restarted_mid_rollout_is_waited_for_not_reloaded_into(
    tmp_path: Path, announce_after: float
) -> None:
    """Its nodes gone, the vassals still accept: none is touched while out of the router (it
    would stay out a reload longer); they are reloaded once their masters announce them again,
    or, if they never do within the timeout, reported as not started (exit 1)."""
    stack = RestartingRouter(
        [f"vassal_{i:02d}.ini" for i in range(1, 5)], restart_at=0.5, announce_after=announce_after
    )
    code, out = run_on(
        stack, tmp_path, minimum_active_vassals=2, timeout=10.0, subscription_server="ss.sock"
    )
    assert stack.touched_out == [], out
    if announce_after < 10.0:
        assert code == ur.EXIT_OK, out
        assert all(v.respawns == 1 for v in stack.vassals.values()), out
    else:
        assert code == ur.EXIT_NOT_ALL_RELOADED, out
        assert "out of the fastrouter for 10s" in out, out


def test_control_reloading_every_vassal_out_of_the_router_touches_them_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check fails on the rule before: a vassal out of the router goes first."""
    monkeypatch.setattr(ur.Rollout, "_waiting", lambda self, live, snapshot, now: {})
    stack = RestartingRouter(
        [f"vassal_{i:02d}.ini" for i in range(1, 5)], restart_at=0.5, announce_after=2.0
    )
    run_on(stack, tmp_path, minimum_active_vassals=2, timeout=10.0, subscription_server="ss.sock")
    assert stack.touched_out != []
