"""GET / as fast as possible, or at ``--rate`` requests/s; optionally run a reload command under
that load and report on it.

Plain load against any deployment::

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 --run-time 30s \\
        --host http://127.0.0.1:8080 --host-header domain.tld

Reload under load (the run quits by itself ``--after-reload`` seconds after the command ends,
still bounded by ``--run-time``), then write the JSON report (schema in ``loadtests/report.py``)::

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 --run-time 60s --only-summary \\
        --host http://127.0.0.1:8080 --host-header domain.tld \\
        --reload-command "uwsgi-reload --emperor-stats /run/emperor.sock ..." \\
        --reload-at 2 --after-reload 2 --report-json reload.json

Every request is recorded (start, latency, failure kind) in this process: run it as a single
local runner, not ``--master``/``--worker`` (the report would only see one node's requests).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import time
from typing import Any, Callable

import gevent
import gevent.subprocess
from locust import FastHttpUser, constant, constant_throughput, events, task
from locust.env import Environment
from locust.runners import LocalRunner

from uwsgi_reload_loadtests.report import (
    ReloadInfo,
    RequestRecord,
    build_report,
    failure_kind,
    write_report,
)

logger = logging.getLogger("loadtests")


class _Run:
    """What this locust process records (one run per process)."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.started: float | None = None
        self.stopped: float | None = None
        self.reload: ReloadInfo | None = None
        self.reload_greenlet: gevent.Greenlet | None = None
        self.reload_proc: gevent.subprocess.Popen[str] | None = None
        self.report_written = False


RUN = _Run()


def _add_arguments(parser: Any, **_: Any) -> None:
    group = parser.add_argument_group("uwsgi-reload load", "Reload under load and JSON report")
    group.add_argument(
        "--host-header",
        default="",
        help="Host header to send (the fastrouter routes by key, e.g. domain.tld); several, "
        "comma-separated, are taken by the users in turn; default: from --host",
    )
    group.add_argument("--url-path", default="/", help="path to GET (default /)")
    group.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        help="connect and network timeout per request, seconds (default 10)",
    )
    group.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="requests per second over all users, each user paced to its share; 0 (default): "
        "as fast as the server answers",
    )
    group.add_argument("--reload-command", default="", help="shell command to run under load")
    group.add_argument(
        "--reload-at",
        type=float,
        default=2.0,
        help="seconds after the test starts to run --reload-command (default 2)",
    )
    group.add_argument(
        "--after-reload",
        type=float,
        default=2.0,
        help="seconds of load after --reload-command ends, then quit (default 2)",
    )
    group.add_argument(
        "--report-json", default="", help="write the per-phase JSON report here when locust quits"
    )


def _record_request(
    start_time: float, response_time: float, exception: BaseException | None, **_: Any
) -> None:
    RUN.records.append(RequestRecord(start_time, response_time, failure_kind(exception)))


def _option(environment: Environment, name: str) -> Any:
    return getattr(environment.parsed_options, name, None)


def _on_test_start(environment: Environment, **_: Any) -> None:
    if RUN.started is not None:
        return
    RUN.started = time.time()
    command = _option(environment, "reload_command")
    if not command:
        return
    if not isinstance(environment.runner, LocalRunner):
        logger.error("--reload-command needs a local runner (not --master/--worker); ignored")
        return
    RUN.reload_greenlet = gevent.spawn(_reload_then_quit, environment, str(command))


def _reload_then_quit(environment: Environment, command: str) -> None:
    assert RUN.started is not None
    gevent.sleep(max(0.0, float(_option(environment, "reload_at")) - (time.time() - RUN.started)))
    logger.info("running reload command: %s", command)
    started = time.time()
    RUN.reload = ReloadInfo(command, started, None, None, "", "")
    # Its own session, so that stopping it early (at --run-time) stops its whole tree.
    proc = gevent.subprocess.Popen(
        command,
        shell=True,
        stdin=gevent.subprocess.DEVNULL,
        stdout=gevent.subprocess.PIPE,
        stderr=gevent.subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    RUN.reload_proc = proc
    stdout, stderr = proc.communicate()
    RUN.reload = ReloadInfo(command, started, time.time(), proc.returncode, stdout, stderr)
    logger.info("reload command exited %s after %.3f s", proc.returncode, time.time() - started)
    gevent.sleep(max(0.0, float(_option(environment, "after_reload"))))
    logger.info("--after-reload elapsed, quitting")
    assert environment.runner is not None
    environment.runner.quit()


def _stop_reload_command() -> None:
    greenlet = RUN.reload_greenlet
    if greenlet is not None and not greenlet.dead:
        greenlet.kill(block=True, timeout=5)
    proc = RUN.reload_proc
    if proc is not None and proc.poll() is None:
        logger.warning("reload command still running at quit: killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _on_test_stop(**_: Any) -> None:
    if RUN.stopped is None:
        RUN.stopped = time.time()


def _on_quitting(environment: Environment, **_: Any) -> None:
    _stop_reload_command()
    path = _option(environment, "report_json")
    if not path or RUN.report_written:
        return
    ended = RUN.stopped if RUN.stopped is not None else time.time()
    started = RUN.started if RUN.started is not None else ended
    header = _option(environment, "host_header")
    report = build_report(
        RUN.records,
        started=started,
        ended=ended,
        reload=RUN.reload,
        host=str(environment.host or ""),
        host_header=str(header) if header else None,
        users=int(_option(environment, "num_users") or 0),
    )
    write_report(str(path), report)
    RUN.report_written = True
    logger.info("load report written to %s (%d requests)", path, len(RUN.records))


def _listen(hook: Any, listener: Callable[..., None]) -> None:
    """``hook.add_listener`` (locust's EventHook is untyped: as a decorator it erases types)."""
    hook.add_listener(listener)


_listen(events.init_command_line_parser, _add_arguments)
_listen(events.request, _record_request)
_listen(events.test_start, _on_test_start)
_listen(events.test_stop, _on_test_stop)
_listen(events.quitting, _on_quitting)


#: Each user's number, so that users take the ``--host-header`` keys in turn.
_USER_NUMBERS = itertools.count()


class GetRoot(FastHttpUser):
    """One connection per user, keep-alive; no think time, or paced to ``--rate``."""

    max_retries = 0

    def __init__(self, environment: Environment) -> None:
        timeout = _option(environment, "request_timeout")
        if timeout:
            self.network_timeout = self.connection_timeout = float(timeout)
        # "http://127.0.0.1:8080/" + "/" would request "//"
        self.host = str(self.host or environment.host or "").rstrip("/")
        super().__init__(environment)
        hosts = [h for h in str(_option(environment, "host_header") or "").split(",") if h]
        self._headers = {"Host": hosts[next(_USER_NUMBERS) % len(hosts)]} if hosts else {}
        self._path = str(_option(environment, "url_path") or "/")
        rate = float(_option(environment, "rate") or 0)
        users = int(_option(environment, "num_users") or 1)
        # Paced, the offered rate stays fixed: latency during a reload then measures the reload,
        # not the capacity of the vassals left serving. Each user takes its share of the rate.
        self._wait = constant_throughput(rate / users) if rate > 0 else constant(0)

    def wait_time(self) -> float:
        return self._wait(self)

    @task
    def get_root(self) -> None:
        self.client.get(self._path, headers=self._headers)
