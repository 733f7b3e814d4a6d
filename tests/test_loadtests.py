"""The load tools: report maths, the locust runner, and the fastrouter observer.

Pure parts run on synthetic data. The ``e2e`` tests start their own throwaway uWSGI servers
(one short temp dir each, no fixed ports), drive locust in a subprocess (never imported here:
it would gevent-patch this process), and stop every process they started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import pytest

from uwsgi_reload import StatsError, read_stats
from uwsgi_reload_harness.render import find_uwsgi
from uwsgi_reload_loadtests.observer import ObserverError, RouterObserver, count_live
from uwsgi_reload_loadtests.report import (
    SCHEMA_VERSION,
    LoadReport,
    ReloadInfo,
    ReportError,
    RequestRecord,
    build_report,
    failure_kind,
    load_report,
    percentile,
    phase_of,
)
from uwsgi_reload_loadtests.runner import (
    LoadRunError,
    format_report,
    locust_command,
    main,
    run_load,
)

START_TIMEOUT = 15.0

# Answers 200 only to the Host header the fastrouter key would be: proves --host-header is sent.
APP = textwrap.dedent(
    """
    def application(environ, start_response):
        if environ.get("HTTP_HOST") != "domain.tld":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"wrong host"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    """
)


# ---------------------------------------------------------------------------------------------
# Report maths (pure)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "pct", "expected"),
    [
        ([], 50, 0.0),
        ([7.0], 99.9, 7.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 75, 3.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
        ([float(i) for i in range(1, 1001)], 99.9, 999.0),
        ([float(i) for i in range(1, 101)], 100, 100.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], pct: float, expected: float) -> None:
    assert percentile(values, pct) == expected


class _BadStatus(ConnectionError):
    code = 502


@pytest.mark.parametrize(
    ("exception", "kind"),
    [
        (None, None),
        (_BadStatus(), "HTTP 502"),
        (ConnectionRefusedError(111, "refused"), "ConnectionRefusedError"),
        (OSError(), "OSError"),
    ],
)
def test_failure_kind(exception: BaseException | None, kind: str | None) -> None:
    assert failure_kind(exception) == kind


RELOAD = ReloadInfo("reload", started=110.0, ended=112.0, returncode=0, stdout="", stderr="")


@pytest.mark.parametrize(
    ("start", "latency_ms", "phase"),
    [
        (100.0, 10.0, "before"),
        (109.5, 400.0, "before"),  # ends at 109.9
        (109.5, 600.0, "during"),  # queued before the reload, answered during it
        (111.0, 5.0, "during"),
        (111.99, 2000.0, "during"),  # started during, ended after
        (112.5, 5.0, "after"),
    ],
)
def test_phase_of_uses_overlap(start: float, latency_ms: float, phase: str) -> None:
    assert phase_of(RequestRecord(start, latency_ms, None), RELOAD) == phase


def test_phase_of_without_reload_or_end() -> None:
    assert phase_of(RequestRecord(200.0, 1.0, None), None) == "before"
    unfinished = dataclasses.replace(RELOAD, ended=None, returncode=None)
    assert phase_of(RequestRecord(200.0, 1.0, None), unfinished) == "during"


def _synthetic_records() -> list[RequestRecord]:
    records = [RequestRecord(100.0 + i * 0.01, 2.0, None) for i in range(1000)]  # 100..110
    records += [RequestRecord(110.0 + i * 0.01, 50.0, "HTTP 502") for i in range(100)]  # 110..111
    records += [RequestRecord(111.0 + i * 0.01, 3.0, None) for i in range(100)]  # 111..112
    records += [RequestRecord(112.01 + i * 0.01, 1.0, None) for i in range(300)]  # 112..115
    return records


def test_report_round_trip_splits_phases_and_series(tmp_path: Path) -> None:
    data = build_report(
        _synthetic_records(),
        started=100.0,
        ended=115.0,
        reload=RELOAD,
        host="http://127.0.0.1:1",
        host_header="domain.tld",
        users=4,
    )
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    report = load_report(path)

    assert (report.before.requests, report.during.requests, report.after.requests) == (
        1000,
        200,
        300,
    )
    assert report.total.requests == 1500
    assert report.during.failures_by_kind == {"HTTP 502": 100}
    assert report.total.failures == report.during.failures == 100
    assert report.before.failures == report.after.failures == 0
    assert report.before.rps == pytest.approx(100.0)
    # steady: before, less the first second of the load
    assert report.steady.requests == 900
    assert report.steady.start == 101.0 and report.steady.end == RELOAD.started
    assert report.during.rps == pytest.approx(100.0)
    assert report.during.max_ms == 50.0
    assert report.during.p50 == 3.0  # nearest rank over 100 x 3 ms and 100 x 50 ms
    assert report.reload == RELOAD
    assert report.host_header == "domain.tld"
    assert report.bucket_s == 0.1
    assert len(report.series) == 150
    assert sum(b.requests for b in report.series) == 1500
    assert sum(b.failures for b in report.series) == 100
    assert sum(b.failures for b in report.series[100:110]) == 100  # the reload's first second
    assert all(b.failures > 0 for b in report.series[100:110])
    assert report.series[105].max_ms == 50.0
    # every failed request counted by when it failed (its end) and its kind
    assert sum(f.count for f in report.failed) == 100
    assert {f.kind for f in report.failed} == {"HTTP 502"}
    assert report.failed[0].at == pytest.approx(110.05)
    assert report.failed[-1].at == pytest.approx(111.04)


def test_report_without_reload_puts_everything_before() -> None:
    records = [RequestRecord(100.0 + i * 0.1, 1.0, None) for i in range(10)]
    report = LoadReport.from_dict(
        build_report(
            records,
            started=100.0,
            ended=101.0,
            reload=None,
            host="h",
            host_header=None,
            users=1,
        )
    )
    assert report.before.requests == report.total.requests == 10
    assert report.during.requests == report.after.requests == 0
    assert report.during.max_ms == 0.0
    assert report.reload is None
    assert report.steady.requests == 0  # a run of 1 s is all warm-up


def test_malformed_report_is_a_report_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no load report"):
        load_report(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"schema": SCHEMA_VERSION}))
    with pytest.raises(ReportError, match="malformed"):
        load_report(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text('{"schema": 1}')
    with pytest.raises(ReportError, match="schema 1, expected"):
        load_report(tmp_path / "old.json")


def test_format_report_has_one_row_per_phase() -> None:
    report = LoadReport.from_dict(
        build_report(
            _synthetic_records(),
            started=100.0,
            ended=115.0,
            reload=RELOAD,
            host="http://127.0.0.1:1",
            host_header=None,
            users=4,
        )
    )
    lines = format_report(report).splitlines()
    rows = {line.split()[0]: line.split() for line in lines[3:7]}
    assert set(rows) == {"total", "before", "during", "after"}
    assert rows["during"][1:3] == ["200", "100"]
    # the failures as one burst, timed from the reload command's start: 110.05 to 111.04
    [burst] = [line.split() for line in lines if line.startswith("failed:")]
    assert burst[1:4] == ["100", "x", "HTTP"]
    assert burst[6] == "+0.05..+1.04"
    assert "exited 0 after 2.00 s" in lines[-1]


def test_locust_command() -> None:
    argv = locust_command(
        "http://127.0.0.1:9",
        report_path="/tmp/r.json",
        host_header="domain.tld",
        users=3,
        reload_command="sleep 1",
        reload_at=1.5,
        after_reload=0.5,
        max_run_time=2.5,
    )
    assert argv[1:3] == ["-m", "locust"]
    pairs = dict(zip(argv, argv[1:]))
    assert pairs["-u"] == "3"
    assert pairs["-r"] == "3"
    assert pairs["--run-time"] == "3s"  # locust takes whole seconds: round up
    assert pairs["--host-header"] == "domain.tld"
    assert pairs["--reload-command"] == "sleep 1"
    assert pairs["--reload-at"] == "1.5"
    assert "--headless" in argv
    plain = locust_command("http://127.0.0.1:9", report_path="/tmp/r.json")
    assert "--reload-command" not in plain
    assert "--host-header" not in plain


def test_cli_help_and_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--reload-command" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["http://127.0.0.1:9", "--users", "0"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------
# Observer (pure: injected reader and clock)
# ---------------------------------------------------------------------------------------------


def _fastrouter_doc(*nodes: tuple[str, int]) -> dict[str, Any]:
    subs: dict[str, list[dict[str, Any]]] = {}
    for key, death_mark in nodes:
        subs.setdefault(key, []).append(
            {"name": f"/run/{key}{len(subs[key])}.sock", "death_mark": death_mark, "ref": 0}
        )
    return {"subscriptions": [{"key": k, "nodes": v} for k, v in subs.items()]}


def test_count_live_by_key() -> None:
    doc = _fastrouter_doc(("a", 0), ("a", 1), ("a", 0), ("b", 0))
    assert count_live(doc, "a") == 2
    assert count_live(doc, "b") == 1
    assert count_live(doc, "c") == 0
    assert count_live(doc) == 3


class _Script:
    """A clock and a stats reader that replay a list of (time, document or error)."""

    def __init__(self, steps: list[tuple[float, Mapping[str, Any] | None]]) -> None:
        self.steps = steps
        self.index = -1
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def read(self, address: str) -> Mapping[str, Any]:
        doc = self.steps[self.index][1]
        if doc is None:
            raise StatsError(f"cannot read stats socket {address}: Connection refused")
        return doc

    def run(self, observer: RouterObserver) -> None:
        for index, (t, _) in enumerate(self.steps):
            self.index, self.now = index, t
            observer.sample_once()


def test_observer_timeline_gaps_and_windows() -> None:
    two, one = _fastrouter_doc(("k", 0), ("k", 0)), _fastrouter_doc(("k", 0), ("k", 1))
    script = _Script(
        [
            (10.00, two),
            (10.01, two),
            (10.02, one),
            (10.03, None),
            (10.04, None),
            (10.05, one),
            (10.06, two),
            (10.07, two),
        ]
    )
    observer = RouterObserver("/nowhere", key="k", reader=script.read, clock=script.clock)
    observer._started = 10.0
    script.run(observer)
    script.now = 10.08
    observer._stopped = 10.08

    assert observer.samples == 6
    assert observer.errors == 2
    assert observer.min_live == 1
    assert observer.max_gap == pytest.approx(0.03)  # 10.02 -> 10.05, the two failed reads
    assert observer.min_live_between(10.0, 10.015) == 2
    # 10.025 is covered by the sample at 10.02 (one live)
    assert observer.min_live_between(10.025, 10.026) == 1
    assert observer.min_live_between(10.06, 10.5) == 2
    assert observer.live == 2
    assert [s.live for s in observer.timeline] == [2, 2, 1, 1, 2, 2]
    with pytest.raises(ObserverError):
        observer.min_live_between(9.0, 9.5)


def test_observer_sample_records_when_the_read_returned() -> None:
    clock = iter([5.0, 5.3])
    observer = RouterObserver(
        "/nowhere",
        key="k",
        reader=lambda address: _fastrouter_doc(("k", 0)),
        clock=lambda: next(clock),
    )
    assert observer.sample_once() == (5.0, 1, 5.3, (("k", 1),))


def test_observer_thread_survives_a_missing_socket() -> None:
    base = tempfile.mkdtemp(prefix="ur-", dir="/tmp")
    try:
        with RouterObserver(os.path.join(base, "missing.sock"), interval=0.005) as observer:
            time.sleep(0.1)
        assert observer.errors >= 5
        assert observer.samples == 0
        assert observer.max_gap >= 0.1  # the whole run is one gap
        with pytest.raises(ObserverError, match="no sample"):
            _ = observer.min_live
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------------------------------------
# Throwaway uWSGI servers
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Uwsgi:
    """One uWSGI instance in its own session (so its workers go with it), one log file."""

    def __init__(self, name: str, base: str, args: list[str]) -> None:
        self.name = name
        self.logfile = os.path.join(base, f"{name}.log")
        with open(self.logfile, "wb") as log:
            self.proc = subprocess.Popen(
                [find_uwsgi(), "--master", "--need-app", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        with open(self.logfile, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])

    def wait_until(self, probe: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited {self.proc.returncode} while waiting for {what}\n"
                    + self.log_tail()
                )
            if probe():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no {what} after {START_TIMEOUT} s\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGINT (uWSGI 2.0 reloads on SIGTERM), then SIGKILL the group; reap."""
        for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()
        # The group may outlive its leader (a worker still dying): finish it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclasses.dataclass
class HttpApp:
    server: Uwsgi
    url: str


@pytest.fixture
def base_dir() -> Iterator[str]:
    base = tempfile.mkdtemp(prefix="ur-", dir="/tmp")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def http_app(base_dir: str) -> Iterator[HttpApp]:
    app = Path(base_dir, "app.py")
    app.write_text(APP)
    port = _free_port()
    server = Uwsgi(
        "http",
        base_dir,
        [
            "--http-socket",
            f"127.0.0.1:{port}",
            "--wsgi-file",
            str(app),
            "--processes",
            "2",
            "--disable-logging",
        ],
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        request = urllib.request.Request(url + "/", headers={"Host": "domain.tld"})
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    try:
        server.wait_until(answers, "HTTP 200 on /")
        yield HttpApp(server, url)
    finally:
        server.stop()
    assert not _group_alive(server.pid), "uWSGI left processes behind"


# ---------------------------------------------------------------------------------------------
# Load runs (e2e)
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_load_runs_and_splits_around_the_reload_command(http_app: HttpApp, base_dir: str) -> None:
    report_path = Path(base_dir, "report.json")
    report = run_load(
        http_app.url,
        host_header="domain.tld",
        users=4,
        reload_command="sleep 1; echo done",
        reload_at=1.0,
        after_reload=1.0,
        max_run_time=20,
        report_path=report_path,
    )

    assert report_path.exists(), "the report should be kept at report_path"
    assert report.reload is not None
    assert report.reload.returncode == 0, report.reload.stderr
    assert report.reload.stdout == "done\n"
    assert report.reload.duration == pytest.approx(1.0, abs=0.5)
    assert report.total.failures == 0, report.total.failures_by_kind
    for phase in (report.before, report.during, report.after):
        assert phase.requests > 100, f"{phase.name}: only {phase.requests} requests"
    assert report.total.requests == sum(
        p.requests for p in (report.before, report.during, report.after)
    )
    assert report.during.start == report.reload.started
    assert report.during.end == report.reload.ended
    assert sum(b.requests for b in report.series) == report.total.requests
    # The run stopped by itself after --after-reload, well before --run-time.
    assert report.ended - report.reload.started < 5.0


@pytest.mark.e2e
def test_rate_paces_the_load(http_app: HttpApp) -> None:
    report = run_load(http_app.url, host_header="domain.tld", users=4, rate=50, max_run_time=3)
    offered = 50 * (report.ended - report.started)
    assert report.total.failures == 0, report.total.failures_by_kind
    # users start over the first second; unpaced, this app serves thousands in 3 s
    served = report.total.requests
    assert 0.6 * offered <= served <= 1.05 * offered, (served, offered)


@pytest.mark.e2e
def test_wrong_host_header_fails_as_http_404(http_app: HttpApp) -> None:
    report = run_load(http_app.url, host_header="other.tld", users=2, max_run_time=1)
    assert report.total.requests > 10
    assert report.total.failures_by_kind == {"HTTP 404": report.total.requests}


# Exits once nothing accepts on 127.0.0.1:PORT any more.
WAIT_CLOSED = textwrap.dedent(
    """
    import socket, sys, time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.5).close()
        except OSError:
            sys.exit(0)
        time.sleep(0.02)
    sys.exit(1)
    """
)


@pytest.mark.e2e
def test_failures_counted_by_kind_when_the_server_stops(http_app: HttpApp, base_dir: str) -> None:
    wait_closed = Path(base_dir, "wait_closed.py")
    wait_closed.write_text(WAIT_CLOSED)
    port = http_app.url.rsplit(":", 1)[1]
    report = run_load(
        http_app.url,
        host_header="domain.tld",
        users=4,
        reload_at=1.0,
        after_reload=1.0,
        reload_command=f"kill -INT {http_app.server.pid} && {sys.executable} {wait_closed} {port}",
        max_run_time=20,
    )

    assert report.reload is not None
    assert report.reload.returncode == 0, report.reload.stderr
    assert report.before.requests > 100
    assert report.before.failures == 0, report.before.failures_by_kind
    assert report.after.requests > 0
    assert report.after.failures == report.after.requests, "nothing listens after the kill"
    assert report.after.failures_by_kind.get("ConnectionRefusedError", 0) > 0, (
        report.after.failures_by_kind
    )
    assert sum(report.total.failures_by_kind.values()) == report.total.failures
    assert sum(b.failures for b in report.series) == report.total.failures


def test_nothing_listening_is_connection_refused() -> None:
    report = run_load(f"http://127.0.0.1:{_free_port()}", users=2, max_run_time=1)
    assert report.total.requests > 0
    assert report.total.failures_by_kind == {"ConnectionRefusedError": report.total.requests}


def test_run_time_bounds_a_hanging_reload_command(base_dir: str) -> None:
    pidfile = Path(base_dir, "cmd.pid")
    started = time.monotonic()
    report = run_load(
        f"http://127.0.0.1:{_free_port()}",
        users=1,
        max_run_time=2,
        reload_at=0.5,
        reload_command=f"echo $$ > {pidfile}; exec sleep 60",
    )

    assert time.monotonic() - started < 15
    assert report.reload is not None
    assert report.reload.ended is None, "the command was still running at --run-time"
    assert report.reload.returncode is None
    assert report.after.requests == 0
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed by the locustfile at quit


def test_locust_failure_raises_with_its_stderr(base_dir: str) -> None:
    broken = Path(base_dir, "broken_locustfile.py")
    broken.write_text("raise RuntimeError('this locustfile is broken')\n")
    with pytest.raises(LoadRunError, match="this locustfile is broken"):
        run_load("http://127.0.0.1:9", max_run_time=1, locustfile=broken)


# ---------------------------------------------------------------------------------------------
# Observer on a real fastrouter (e2e)
# ---------------------------------------------------------------------------------------------


def _stats_readable(address: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            read_stats(address, timeout=1)
        except StatsError:
            return False
        return True

    return probe


@pytest.mark.e2e
def test_observer_sees_the_vassal_leave_the_router(base_dir: str) -> None:
    app = Path(base_dir, "app.py")
    app.write_text(APP)
    subscription, stats = f"{base_dir}/ss.sock", f"{base_dir}/fr-stats.sock"
    router = Uwsgi(
        "fastrouter",
        base_dir,
        [
            "--fastrouter",
            f"{base_dir}/fr.sock",
            "--fastrouter-subscription-server",
            subscription,
            "--fastrouter-stats-server",
            stats,
        ],
    )
    vassal: Uwsgi | None = None
    try:
        router.wait_until(_stats_readable(stats), f"stats on {stats}")
        with (
            RouterObserver(stats, key="k") as observer,
            RouterObserver(stats, key="other") as other_key,
        ):
            observer.wait_for(lambda live: live == 0, timeout=5, what="a first sample")
            vassal = Uwsgi(
                "vassal",
                base_dir,
                [
                    "--socket",
                    f"{base_dir}/v1.sock",
                    "--wsgi-file",
                    str(app),
                    "--subscribe2",
                    f"server={subscription},key=k",
                ],
            )
            vassal.wait_until(lambda: observer.live == 1, "one live node for key k")
            time.sleep(0.2)
            stopping = time.time()
            vassal.stop()
            observer.wait_for(lambda live: live == 0, timeout=5, what="no live node for key k")
            time.sleep(0.1)

        assert observer.errors == 0, observer.error_messages[:3]
        assert observer.samples > 50
        assert observer.max_gap < 0.025, f"sampled only every {observer.max_gap * 1000:.0f} ms"
        # A read that started before the stop may return after it, with the node gone: only
        # reads that returned before the stop say what the router had before it.
        before = [s for s in observer.timeline if stopping - 0.1 <= s.t and s.done < stopping]
        assert len(before) > 3, observer.timeline[-20:]
        assert {s.live for s in before} == {1}, before[-20:]
        assert observer.min_live_between(stopping, time.time()) == 0
        assert observer.timeline[-1].live == 0
        assert other_key.samples > 50
        assert {s.live for s in other_key.timeline} == {0}
    finally:
        if vassal is not None:
            vassal.stop()
        router.stop()
    assert not _group_alive(router.pid)
