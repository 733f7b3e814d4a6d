"""The load report: built from raw request records in the locust process, read back as dataclasses.

Pure functions and plain data only (no locust, no gevent), so both sides can import it.

Phases split the run around the reload command (wall clock, ``time.time()``):

* ``before``: requests that ended before the command started;
* ``during``: requests whose ``[start, end]`` overlaps ``[command start, command end]``, so a
  request queued before the reload and answered after it counts as ``during``;
* ``after``: requests that started after the command ended.

Without a reload command (or if it never started) every request is ``before``. A command still
running when the load stops has no end: ``during`` then runs to the end of the load. Latency
percentiles include failed requests (a request that hangs 2 s and then fails is still 2 s of
waiting). ``rps`` is the phase's request count divided by its window: ``before`` is
[load start, command start], ``during`` [command start, command end], ``after`` [command end,
load end].

Every failed request is also counted by when it failed (its end, to ``FAILED_BUCKET_S``) and its
kind: exact counts, and a size bounded by the run's length, however many fail.
``place_failures`` puts them against the reload's events (seconds since the reload command
started, and from the nearest vassal trigger or back), and ``group_failures`` sums them up in
bursts, for the tables of the demo, the benchmarks, the suite and the runner.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

SCHEMA_VERSION = 3
BUCKET_S = 0.1
PHASES = ("before", "during", "after")
#: Seconds at the start of the load left out of the ``steady`` phase: the users connect and
#: spawn then, and those first requests are the slowest of a quiet run (up to 70 ms against a
#: p50 of 13 ms, measured on the demo stack).
WARMUP_S = 1.0
#: Failed requests are counted per kind in buckets this long, by when they failed. Finer than
#: the tool's polling (0.1 s), which times the triggers and backs they are compared with.
FAILED_BUCKET_S = 0.01


class ReportError(Exception):
    """A load report is missing or does not have the expected shape."""


class RequestRecord(NamedTuple):
    """One request as the load client saw it."""

    start: float
    """Wall-clock start, seconds since the epoch."""
    latency_ms: float
    failure: str | None
    """``None`` for a success, else its kind: ``"HTTP 502"``, ``"ConnectionRefusedError"``..."""

    @property
    def end(self) -> float:
        return self.start + self.latency_ms / 1000.0


@dataclasses.dataclass(frozen=True)
class FailedRequests:
    """``count`` requests of one kind (``"HTTP 502"``...) that failed in the
    ``FAILED_BUCKET_S`` from ``at`` (wall clock: their start + their latency)."""

    at: float
    kind: str
    count: int


@dataclasses.dataclass(frozen=True)
class ReloadInfo:
    """The reload command run under load, with its wall-clock start and end."""

    command: str
    started: float
    ended: float | None
    """``None`` if the command was still running when the load stopped (it was then killed)."""
    returncode: int | None
    stdout: str
    stderr: str

    @property
    def completed(self) -> bool:
        return self.ended is not None

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


@dataclasses.dataclass(frozen=True)
class PhaseStats:
    """Requests, failures and latency of one phase (or of the whole run)."""

    name: str
    start: float
    end: float
    duration_s: float
    requests: int
    failures: int
    failures_by_kind: dict[str, int]
    rps: float
    p50: float
    p90: float
    p99: float
    p999: float
    max_ms: float
    """Latencies are milliseconds, 0.0 when the phase has no requests."""

    @property
    def ok(self) -> int:
        return self.requests - self.failures


@dataclasses.dataclass(frozen=True)
class SeriesBucket:
    """Requests that started in ``[t, t + bucket)`` seconds after the load started."""

    t: float
    requests: int
    failures: int
    max_ms: float
    p99_ms: float


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What one load run saw, split in phases around the reload command."""

    started: float
    ended: float
    host: str
    host_header: str | None
    users: int
    total: PhaseStats
    before: PhaseStats
    during: PhaseStats
    after: PhaseStats
    steady: PhaseStats
    """The ``before`` phase without its first ``WARMUP_S`` seconds: the steady state to compare
    the reload with."""
    reload: ReloadInfo | None
    bucket_s: float
    series: list[SeriesBucket]
    failed: list[FailedRequests]
    """Every failed request, counted by when it failed and its kind, in time order."""

    def phase(self, name: str) -> PhaseStats:
        return {
            "total": self.total,
            "before": self.before,
            "during": self.during,
            "after": self.after,
            "steady": self.steady,
        }[name]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadReport:
        try:
            if data.get("schema") != SCHEMA_VERSION:
                raise ReportError(
                    f"load report schema {data.get('schema')!r}, expected {SCHEMA_VERSION}"
                )
            phases = data["phases"]
            reload = data["reload"]
            series = data["series"]
            failed = data["failed_requests"]
            return cls(
                started=float(data["started"]),
                ended=float(data["ended"]),
                host=str(data["host"]),
                host_header=None if data["host_header"] is None else str(data["host_header"]),
                users=int(data["users"]),
                total=_phase_from_dict("total", phases["total"]),
                before=_phase_from_dict("before", phases["before"]),
                during=_phase_from_dict("during", phases["during"]),
                after=_phase_from_dict("after", phases["after"]),
                steady=_phase_from_dict("steady", phases["steady"]),
                reload=None if reload is None else _reload_from_dict(reload),
                bucket_s=float(series["bucket_s"]),
                series=[
                    SeriesBucket(
                        t=float(b["t"]),
                        requests=int(b["requests"]),
                        failures=int(b["failures"]),
                        max_ms=float(b["max_ms"]),
                        p99_ms=float(b["p99_ms"]),
                    )
                    for b in series["buckets"]
                ],
                failed=[
                    FailedRequests(float(f["at"]), str(f["kind"]), int(f["count"]))
                    for f in failed["buckets"]
                ],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"malformed load report: {type(exc).__name__}: {exc}") from None


def load_report(path: str | os.PathLike[str]) -> LoadReport:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ReportError(f"no load report at {os.fspath(path)}") from None
    except ValueError as exc:
        raise ReportError(f"load report {os.fspath(path)} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ReportError(f"load report {os.fspath(path)} is not a JSON object")
    return LoadReport.from_dict(data)


def _phase_from_dict(name: str, raw: Mapping[str, Any]) -> PhaseStats:
    latency = raw["latency_ms"]
    return PhaseStats(
        name=name,
        start=float(raw["start"]),
        end=float(raw["end"]),
        duration_s=float(raw["duration_s"]),
        requests=int(raw["requests"]),
        failures=int(raw["failures"]),
        failures_by_kind={str(k): int(v) for k, v in raw["failures_by_kind"].items()},
        rps=float(raw["rps"]),
        p50=float(latency["p50"]),
        p90=float(latency["p90"]),
        p99=float(latency["p99"]),
        p999=float(latency["p99.9"]),
        max_ms=float(latency["max"]),
    )


def _reload_from_dict(raw: Mapping[str, Any]) -> ReloadInfo:
    return ReloadInfo(
        command=str(raw["command"]),
        started=float(raw["started"]),
        ended=None if raw["ended"] is None else float(raw["ended"]),
        returncode=None if raw["returncode"] is None else int(raw["returncode"]),
        stdout=str(raw["stdout"]),
        stderr=str(raw["stderr"]),
    )


# ---------------------------------------------------------------------------------------------
# Failed requests against the reload's events
# ---------------------------------------------------------------------------------------------

#: Failed requests of one kind further apart than this are two bursts.
BURST_GAP_S = 1.0


@dataclasses.dataclass(frozen=True)
class ReloadEvent:
    """A vassal's trigger or back, from the tool's timeline (wall clock)."""

    at: float
    what: str
    """``"uwsgi_vassal_02 triggered"``, ``"uwsgi_vassal_02 back"``."""


def _from_event(t: float, events: Sequence[ReloadEvent]) -> tuple[str | None, float | None]:
    """The event nearest to ``t`` (the earlier one on a tie), and ``t`` minus its time."""
    if not events:
        return None, None
    nearest = min(events, key=lambda e: (abs(t - e.at), e.at))
    return nearest.what, t - nearest.at


def _relative(seconds: float) -> str:
    return f"{abs(seconds):.2f} s {'before' if seconds < 0 else 'after'}"


@dataclasses.dataclass(frozen=True)
class FailureAt:
    """Failed requests of one kind, at one moment (to ``FAILED_BUCKET_S``), placed against the
    reload."""

    kind: str
    count: int
    at: float
    """When they failed (start + latency), seconds since the reload command started."""
    event: str | None
    """The nearest vassal trigger or back (None: no timeline, a foreign command)."""
    from_event: float | None
    """Seconds from ``event`` to the failure; negative: before it."""

    def near(self) -> str | None:
        """``0.02 s after uwsgi_vassal_02 triggered``; None without a timeline."""
        if self.event is None or self.from_event is None:
            return None
        return f"{_relative(self.from_event)} {self.event}"

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "count": self.count,
            "s_after_reload_start": round(self.at, 3),
            "nearest_event": self.event,
            "s_from_event": None if self.from_event is None else round(self.from_event, 3),
        }


@dataclasses.dataclass(frozen=True)
class FailureGroup:
    """A burst of failed requests of one kind: none more than ``BURST_GAP_S`` after the last."""

    kind: str
    count: int
    first: FailureAt
    last: FailureAt

    def near(self) -> str | None:
        """Where the burst starts and ends against the nearest vassal events:
        ``0.02 s after v1 triggered``, or ``0.02 s after v1 triggered to 0.01 s before v2 back``;
        None without a timeline."""
        start, end = self.first.near(), self.last.near()
        if start is None or end is None:
            return None
        return start if self.first is self.last else f"{start} to {end}"

    def text(self) -> str:
        """``3 x HTTP 502 at +1.23..+1.41 s (0.02 s after uwsgi_vassal_02 triggered to ...)``."""
        if self.first is self.last:
            when = f"{self.first.at:+.2f} s"
        else:
            when = f"{self.first.at:+.2f}..{self.last.at:+.2f} s"
        near = self.near()
        return f"{self.count} x {self.kind} at {when}" + ("" if near is None else f" ({near})")

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "count": self.count,
            "first": self.first.as_json(),
            "last": self.last.as_json(),
            "text": self.text(),
        }


def group_failures(failures: Sequence[FailureAt], gap: float = BURST_GAP_S) -> list[FailureGroup]:
    """Bursts: failures of one kind, each at most ``gap`` s after the one before."""
    bursts: dict[str, list[list[FailureAt]]] = {}
    for failure in sorted(failures, key=lambda f: f.at):
        of_kind = bursts.setdefault(failure.kind, [])
        if of_kind and failure.at - of_kind[-1][-1].at <= gap:
            of_kind[-1].append(failure)
        else:
            of_kind.append([failure])
    groups = [
        FailureGroup(burst[0].kind, sum(f.count for f in burst), burst[0], burst[-1])
        for of_kind in bursts.values()
        for burst in of_kind
    ]
    return sorted(groups, key=lambda g: (g.first.at, g.kind))


def place_failures(report: LoadReport, events: Sequence[ReloadEvent] = ()) -> list[FailureAt]:
    """The report's failed requests by kind and when they failed: seconds since the reload
    command started (since the load started if it never did), and from the nearest of
    ``events`` (the vassals' triggers and backs, when the reload command reported them)."""
    t0 = report.started if report.reload is None else report.reload.started
    placed = []
    for failed in report.failed:
        event, offset = _from_event(failed.at, events)
        placed.append(FailureAt(failed.kind, failed.count, failed.at - t0, event, offset))
    return placed


# ---------------------------------------------------------------------------------------------
# Building the report (runs in the locust process)
# ---------------------------------------------------------------------------------------------


def failure_kind(exception: BaseException | None) -> str | None:
    """The failure kind of a locust request exception.

    ``"HTTP 502"`` for a bad status (geventhttpclient's ``BadStatusCode`` has ``.code``), else the
    exception class: ``ConnectionRefusedError``, ``ConnectionResetError``, ``timeout``...
    """
    if exception is None:
        return None
    code = getattr(exception, "code", None)
    if isinstance(code, int) and not isinstance(code, bool) and code >= 100:
        return f"HTTP {code}"
    return type(exception).__name__


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    # round(): 99.9 / 100 * 1000 is 999.0000000000001, whose ceil would skip a rank
    rank = max(1, math.ceil(round(pct / 100.0 * len(sorted_values), 9)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def phase_of(record: RequestRecord, reload: ReloadInfo | None) -> str:
    if reload is None or record.end < reload.started:
        return "before"
    if reload.ended is not None and record.start > reload.ended:
        return "after"
    return "during"


def phase_stats(records: Sequence[RequestRecord], start: float, end: float) -> dict[str, Any]:
    latencies = sorted(r.latency_ms for r in records)
    kinds = Counter(r.failure for r in records if r.failure is not None)
    duration = max(0.0, end - start)
    return {
        "start": start,
        "end": end,
        "duration_s": round(duration, 6),
        "requests": len(records),
        "failures": sum(kinds.values()),
        "failures_by_kind": dict(sorted(kinds.items())),
        "rps": round(len(records) / duration, 3) if duration > 0 else 0.0,
        "latency_ms": {
            "p50": round(percentile(latencies, 50), 3),
            "p90": round(percentile(latencies, 90), 3),
            "p99": round(percentile(latencies, 99), 3),
            "p99.9": round(percentile(latencies, 99.9), 3),
            "max": round(latencies[-1], 3) if latencies else 0.0,
        },
    }


def time_series(
    records: Iterable[RequestRecord], started: float, ended: float, bucket_s: float = BUCKET_S
) -> list[dict[str, Any]]:
    """Fixed buckets by request start, empty ones included: a hole in the traffic is a signal."""
    count = max(1, math.ceil((ended - started) / bucket_s))
    latencies: list[list[float]] = [[] for _ in range(count)]
    failures = [0] * count
    for record in records:
        index = min(count - 1, max(0, int((record.start - started) / bucket_s)))
        latencies[index].append(record.latency_ms)
        if record.failure is not None:
            failures[index] += 1
    buckets = []
    for index, values in enumerate(latencies):
        values.sort()
        buckets.append(
            {
                "t": round(index * bucket_s, 3),
                "requests": len(values),
                "failures": failures[index],
                "max_ms": round(values[-1], 3) if values else 0.0,
                "p99_ms": round(percentile(values, 99), 3),
            }
        )
    return buckets


def failed_buckets(records: Iterable[RequestRecord], bucket_s: float) -> list[dict[str, Any]]:
    """The failed requests counted by kind and by when they failed (their end), in buckets of
    ``bucket_s`` on the wall clock; only the buckets with a failure, in time order."""
    # round(): 10.0 + 0.03 is 10.029999999999999, which would land in the bucket before
    counts = Counter(
        (math.floor(round(r.end / bucket_s, 6)), r.failure)
        for r in records
        if r.failure is not None
    )
    return [
        {"at": round(index * bucket_s, 6), "kind": kind, "count": count}
        for (index, kind), count in sorted(counts.items())
    ]


def build_report(
    records: Sequence[RequestRecord],
    *,
    started: float,
    ended: float,
    reload: ReloadInfo | None,
    host: str,
    host_header: str | None,
    users: int,
    bucket_s: float = BUCKET_S,
) -> dict[str, Any]:
    """The JSON-ready report (see ``LoadReport.from_dict`` for reading it back)."""
    by_phase: dict[str, list[RequestRecord]] = {name: [] for name in PHASES}
    for record in records:
        by_phase[phase_of(record, reload)].append(record)
    if reload is None:
        windows = {"before": (started, ended), "during": (ended, ended), "after": (ended, ended)}
    else:
        reload_end = ended if reload.ended is None else reload.ended
        windows = {
            "before": (started, reload.started),
            "during": (reload.started, reload_end),
            "after": (reload_end, ended),
        }
    phases = {"total": phase_stats(records, started, ended)}
    for name in PHASES:
        phases[name] = phase_stats(by_phase[name], *windows[name])
    before_end = windows["before"][1]
    steady_start = min(started + WARMUP_S, before_end)
    steady = [r for r in by_phase["before"] if r.start >= steady_start]
    phases["steady"] = phase_stats(steady, steady_start, before_end)
    return {
        "schema": SCHEMA_VERSION,
        "host": host,
        "host_header": host_header,
        "users": users,
        "started": started,
        "ended": ended,
        "reload": None if reload is None else dataclasses.asdict(reload),
        "phases": phases,
        "series": {
            "bucket_s": bucket_s,
            "t0": started,
            "buckets": time_series(records, started, ended, bucket_s),
        },
        "failed_requests": {
            "bucket_s": FAILED_BUCKET_S,
            "buckets": failed_buckets(records, FAILED_BUCKET_S),
        },
    }


def write_report(path: str | os.PathLike[str], report: Mapping[str, Any]) -> None:
    """Write atomically: a reader never sees half a report."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
