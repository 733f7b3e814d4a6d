"""Drive ``loadtests/locustfile.py`` headless in a subprocess and read its report back.

Locust is never imported here: importing it monkey-patches the whole process with gevent, which
a pytest process (threads, subprocesses, sockets) must not get.

Benchmark from a shell::

    python -m uwsgi_reload_loadtests.runner http://127.0.0.1:8080 --host-header domain.tld -u 8 \\
        --reload-command "uwsgi-reload ..." --report-json reload.json
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Union

from uwsgi_reload import non_negative_float, positive_float, positive_int

from .report import (
    PHASES,
    LoadReport,
    PhaseStats,
    ReloadInfo,
    ReportError,
    SeriesBucket,
    group_failures,
    load_report,
    place_failures,
)

__all__ = [
    "LOCUSTFILE",
    "LoadReport",
    "LoadRunError",
    "PhaseStats",
    "ReloadInfo",
    "ReportError",
    "SeriesBucket",
    "format_report",
    "locust_command",
    "main",
    "run_load",
]

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
# Time locust gets on top of --run-time to start, write its report and exit.
GRACE_S = 30.0
STDERR_TAIL_LINES = 30

StrPath = Union[str, "os.PathLike[str]"]


class LoadRunError(Exception):
    """Locust failed, hung, or wrote no usable report."""


def locust_command(
    url: str,
    *,
    report_path: StrPath,
    host_header: str | None = None,
    users: int = 8,
    spawn_rate: float | None = None,
    reload_command: str | None = None,
    reload_at: float = 2.0,
    after_reload: float = 2.0,
    max_run_time: float = 60,
    request_timeout: float = 10.0,
    url_path: str = "/",
    rate: float = 0.0,
    locustfile: StrPath = LOCUSTFILE,
) -> list[str]:
    """The argv of one headless locust run (``--run-time`` takes whole seconds)."""
    argv = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        os.fspath(locustfile),
        "--headless",
        "--only-summary",
        "-u",
        str(users),
        "-r",
        str(spawn_rate if spawn_rate is not None else users),
        "--run-time",
        f"{max(1, math.ceil(max_run_time))}s",
        "--host",
        url,
        "--url-path",
        url_path,
        "--request-timeout",
        str(request_timeout),
        "--report-json",
        os.fspath(report_path),
    ]
    if host_header:
        argv += ["--host-header", host_header]
    if rate:
        argv += ["--rate", str(rate)]
    if reload_command:
        argv += [
            "--reload-command",
            reload_command,
            "--reload-at",
            str(reload_at),
            "--after-reload",
            str(after_reload),
        ]
    return argv


def run_load(
    url: str,
    *,
    host_header: str | None = None,
    users: int = 8,
    spawn_rate: float | None = None,
    reload_command: str | None = None,
    reload_at: float = 2.0,
    after_reload: float = 2.0,
    max_run_time: float = 60,
    request_timeout: float = 10.0,
    url_path: str = "/",
    rate: float = 0.0,
    report_path: StrPath | None = None,
    env: Mapping[str, str] | None = None,
    locustfile: StrPath = LOCUSTFILE,
    timeout: float | None = None,
    nice: int = 0,
) -> LoadReport:
    """Run locust headless against ``url`` and return its report.

    Without ``reload_command`` the load runs for ``max_run_time`` seconds. With it, the command
    runs ``reload_at`` seconds into the load and locust quits ``after_reload`` seconds after the
    command ends (``max_run_time`` still bounds the whole run: a command still running then is
    killed and ``report.reload.ended`` is ``None``). ``env`` adds variables to ``os.environ`` for
    locust and the reload command. ``report_path`` keeps the JSON report (default: a temporary
    file, removed). Locust gets ``timeout`` seconds (default ``max_run_time`` + 30) before it is
    killed; then, and when it exits 2 or more or writes no report, ``LoadRunError`` carries the
    tail of its stderr. Exit code 1 (locust's "some requests failed") is a normal result.
    ``rate``: requests per second over all users (each paced to its share); 0, as fast as the
    server answers.
    """
    with tempfile.TemporaryDirectory(prefix="ur-load-") as tmp:
        path = Path(report_path) if report_path is not None else Path(tmp, "report.json")
        path.unlink(missing_ok=True)
        argv = locust_command(
            url,
            report_path=path,
            host_header=host_header,
            users=users,
            spawn_rate=spawn_rate,
            reload_command=reload_command,
            reload_at=reload_at,
            after_reload=after_reload,
            max_run_time=max_run_time,
            request_timeout=request_timeout,
            url_path=url_path,
            rate=rate,
            locustfile=locustfile,
        )
        if nice:
            # a lower priority for the load generator keeps the stack and an observer in the
            # caller responsive on a small machine
            argv = ["nice", "-n", str(nice), *argv]
        deadline = timeout if timeout is not None else max_run_time + GRACE_S
        stderr_path = Path(tmp, "locust.stderr")
        with open(stderr_path, "w+b") as stderr:
            returncode = _run(argv, stderr, deadline, {**os.environ, **(env or {})})
            if returncode is None:
                raise LoadRunError(
                    f"locust did not exit within {deadline:.0f} s and was killed\n"
                    + _tail(stderr_path)
                )
        if returncode not in (0, 1):
            raise LoadRunError(f"locust exited {returncode}\n{_tail(stderr_path)}")
        try:
            report = load_report(path)
        except ReportError as exc:
            message = f"{exc} (locust exited {returncode})\n{_tail(stderr_path)}"
            raise LoadRunError(message) from None
        if report.total.requests == 0:
            raise LoadRunError(f"locust made no request at all\n{_tail(stderr_path)}")
        return report


def _run(
    argv: Sequence[str], stderr: IO[bytes], timeout: float, env: Mapping[str, str]
) -> int | None:
    """Run locust in its own process group; on timeout SIGTERM it (locust then still writes its
    report and kills the reload command), then SIGKILL the group. ``None`` if it timed out."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env=dict(env),
        start_new_session=True,
    )
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        proc.wait()
        return None
    except BaseException:
        # Interrupted (Ctrl-C, pytest timeout): do not leave a load generator behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").rstrip("\n").splitlines()
    return "locust stderr (last lines):\n" + "\n".join(text[-lines:])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def format_report(report: LoadReport) -> str:
    """A table of the phases, for people benchmarking."""
    head = (
        "phase",
        "requests",
        "failed",
        "rps",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "failures by kind",
    )
    rows = [head]
    for name in ("total", *PHASES):
        phase = report.phase(name)
        kinds = ", ".join(f"{k}: {v}" for k, v in phase.failures_by_kind.items()) or "-"
        rows.append(
            (
                name,
                str(phase.requests),
                str(phase.failures),
                f"{phase.rps:.0f}",
                f"{phase.p50:.1f}",
                f"{phase.p90:.1f}",
                f"{phase.p99:.1f}",
                f"{phase.p999:.1f}",
                f"{phase.max_ms:.1f}",
                kinds,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            cell.ljust(w) if i in (0, len(head) - 1) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = f"{report.host}" + (f" (Host: {report.host_header})" if report.host_header else "")
    title += f", {report.users} users, {report.ended - report.started:.1f} s of load"
    out = [title, *lines]
    since = "the reload command started" if report.reload is not None else "the load started"
    for burst in group_failures(place_failures(report)):
        out.append(f"failed: {burst.text()} after {since}")
    reload = report.reload
    if reload is not None:
        if reload.duration is None:
            out.append(
                f"reload command: {reload.command!r} still running when the load stopped (killed)"
            )
        else:
            out.append(
                f"reload command: {reload.command!r} exited {reload.returncode} after "
                f"{reload.duration:.2f} s"
            )
            if reload.returncode != 0 and reload.stderr.strip():
                out.append("reload stderr (last lines):")
                out.extend("  " + line for line in reload.stderr.strip().splitlines()[-10:])
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uwsgi_reload_loadtests.runner",
        description="GET / under load with locust (headless, in a subprocess), optionally run a "
        "reload command in the middle, and print requests, failures and latency before, during "
        "and after it.",
    )
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--host-header", help="Host header to send (the fastrouter routes by key)")
    parser.add_argument("--url-path", default="/", help="path to GET (default /)")
    parser.add_argument(
        "-u",
        "--users",
        type=positive_int,
        default=8,
        help="concurrent users, one keep-alive connection each (default 8)",
    )
    parser.add_argument(
        "--rate",
        type=non_negative_float,
        default=0.0,
        help="requests per second over all users, each user paced to its share; 0: as fast as "
        "the server answers (default 0)",
    )
    parser.add_argument("--reload-command", help="shell command to run under load")
    parser.add_argument(
        "--reload-at",
        type=non_negative_float,
        default=2.0,
        help="seconds of load before the command (default 2)",
    )
    parser.add_argument(
        "--after-reload",
        type=non_negative_float,
        default=2.0,
        help="seconds of load after the command ends (default 2)",
    )
    parser.add_argument(
        "--run-time",
        type=positive_float,
        default=60.0,
        help="upper bound of the whole run, seconds; without --reload-command, "
        "the length of the run (default 60)",
    )
    parser.add_argument(
        "--request-timeout",
        type=positive_float,
        default=10.0,
        help="per-request timeout, seconds (default 10)",
    )
    parser.add_argument("--report-json", help="keep the JSON report at this path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when no request failed, 1 when some did, 2 on bad usage or a failed locust run."""
    args = build_parser().parse_args(argv)
    try:
        report = run_load(
            args.url,
            host_header=args.host_header,
            users=args.users,
            reload_command=args.reload_command,
            reload_at=args.reload_at,
            after_reload=args.after_reload,
            max_run_time=args.run_time,
            request_timeout=args.request_timeout,
            url_path=args.url_path,
            rate=args.rate,
            report_path=args.report_json,
        )
    except LoadRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.report_json:
        print(f"report: {shlex.quote(args.report_json)}")
    return 1 if report.total.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
