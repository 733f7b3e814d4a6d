"""Watch a fastrouter's live nodes from a thread while something else (a reload) happens.

A node is live when it is subscribed with ``death_mark == 0`` (see UWSGI_FACTS.md, fastrouter
stats). The observer proves a "never fewer than N live" claim only as finely as it sampled, so it
also reports its largest gap between samples: a test asserts on ``max_gap`` before trusting
``min_live``.

The observer is the judge of the tool, so it shares none of the tool's code: it reads the stats
socket and parses the document with its own few lines (:func:`read_document`,
:func:`live_by_key`). A parsing bug in the tool cannot blind the tool and its judge together.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import json
import math
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Callable, NamedTuple

StatsReader = Callable[[str], Mapping[str, Any]]


class StatsReadError(Exception):
    """The stats socket could not be read or did not hold a fastrouter document."""


class ObserverError(Exception):
    """The observer has no sample to answer the question with."""


class Sample(NamedTuple):
    t: float
    """Wall clock (``time.time()``) when the read started, comparable with a load report's."""
    live: int
    """Live nodes of the observed key; with several keys, of the key that had fewest."""
    done: float
    """Wall clock when the read returned. The router rendered ``live`` at some moment between
    ``t`` and ``done``: a read kept waiting (a busy router, or a reader thread waiting for the
    GIL) can report a change that happened after ``t``."""
    by_key: tuple[tuple[str, int], ...] = ()
    """Live nodes of every key the router listed, sorted by key."""


def read_document(address: str, timeout: float = 1.0) -> Mapping[str, Any]:
    """Connect to a uWSGI stats server (unix path, or ``host:port``), read to EOF, parse JSON."""
    if address.startswith("/") or ":" not in address:
        family, target = socket.AF_UNIX, address
    else:
        host, _, port = address.rpartition(":")
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        target = (host.strip("[]"), int(port))  # type: ignore[assignment]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(target)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        data = json.loads(b"".join(chunks))
    except (OSError, ValueError) as exc:
        raise StatsReadError(f"{address}: {exc}") from None
    if not isinstance(data, dict):
        raise StatsReadError(f"{address}: not a stats document")
    return data


def live_by_key(data: Mapping[str, Any]) -> dict[str, int]:
    """Live nodes (``death_mark`` 0) per key of one fastrouter stats document."""
    subscriptions = data.get("subscriptions")
    if not isinstance(subscriptions, list):
        raise StatsReadError("no subscriptions list: not a fastrouter stats document")
    live: dict[str, int] = {}
    for subscription in subscriptions:
        key = str(subscription["key"])
        nodes = subscription.get("nodes") or []
        live[key] = live.get(key, 0) + sum(1 for n in nodes if n.get("death_mark") == 0)
    return live


def count_live(data: Mapping[str, Any], key: str | None = None) -> int:
    """Live nodes in one fastrouter stats document, for ``key`` or over all keys."""
    live = live_by_key(data)
    return live.get(key, 0) if key is not None else sum(live.values())


def _read_with_timeout(timeout: float) -> StatsReader:
    def read(address: str) -> Mapping[str, Any]:
        return read_document(address, timeout=timeout)

    return read


def _raise_thread_priority(niceness: int = -10) -> None:
    """Run this thread ahead of the load on a small machine, where allowed (root, Linux).

    On Linux, setpriority() with a thread id changes that thread only; others may not lower
    their niceness, and then the observer runs at normal priority and reports its gaps.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


class RouterObserver:
    """Sample a fastrouter stats server every ``interval`` seconds from ``readers`` threads.

    The readers are staggered by ``interval / readers``, so one read kept waiting by a busy
    router does not stop the others from sampling on time. Use as a context manager (or
    ``start()``/``stop()``). A failed read (socket briefly missing, refused, or not JSON) is
    counted in ``errors`` and leaves a gap in the timeline; it never stops a thread.

    What a sample's ``live`` counts: the nodes of ``key``; with ``keys``, the fewest nodes any of
    those keys had (a key with no node left counts 0), so ``min_live`` is held against a minimum
    per key; with neither, every live node.
    """

    def __init__(
        self,
        fastrouter_stats_address: str,
        key: str | None = None,
        interval: float = 0.01,
        *,
        read_timeout: float = 1.0,
        reader: StatsReader | None = None,
        clock: Callable[[], float] = time.time,
        readers: int = 2,
        keys: Sequence[str] = (),
    ) -> None:
        self.address = fastrouter_stats_address
        self.key = key
        self.keys = tuple(keys) or ((key,) if key is not None else ())
        self.interval = interval
        self._read = reader if reader is not None else _read_with_timeout(read_timeout)
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._errors: list[tuple[float, str]] = []
        self._started: float | None = None
        self._stopped: float | None = None
        self._stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self.readers = readers

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> RouterObserver:
        if self._threads:
            raise RuntimeError("RouterObserver already started")
        # A full garbage collection of a big process (pytest after a few hundred tests: ~20 ms)
        # holds the GIL and stalls every reader at once; frozen objects are not scanned.
        gc.freeze()
        self._started = self._clock()
        first = time.monotonic()
        self._threads = [
            threading.Thread(
                target=self._loop,
                args=(first + n * self.interval / self.readers,),
                name=f"router-observer-{n} {self.address}",
                daemon=True,
            )
            for n in range(self.readers)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        if not self._threads or self._stopped is not None:
            return
        self._stop_event.set()
        for thread in self._threads:
            thread.join()
        gc.unfreeze()
        self._stopped = self._clock()

    def __enter__(self) -> RouterObserver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def sample_once(self) -> Sample | None:
        """Read the stats once and record the sample (or the error)."""
        t = self._clock()
        try:
            by_key = live_by_key(self._read(self.address))
        except StatsReadError as exc:
            self._failed(t, str(exc))
            return None
        except Exception as exc:  # a half-written or odd document: a gap, not a dead thread
            self._failed(t, f"{type(exc).__name__}: {exc}")
            return None
        observed = [by_key.get(key, 0) for key in self.keys] or [sum(by_key.values())]
        live = min(observed)
        sample = Sample(t, live, self._clock(), tuple(sorted(by_key.items())))
        with self._lock:
            self._samples.append(sample)
        return sample

    def _failed(self, t: float, message: str) -> None:
        with self._lock:
            self._errors.append((t, message))

    def _loop(self, next_at: float) -> None:
        _raise_thread_priority()
        self._stop_event.wait(max(0.0, next_at - time.monotonic()))
        while not self._stop_event.is_set():
            self.sample_once()
            # Each reader keeps its own grid (its offset from the others), skipping the points a
            # slow read overran: readers that fell into step would all wait on the same slow read.
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:
                next_at += math.ceil((now - next_at) / self.interval) * self.interval
            self._stop_event.wait(max(0.0, next_at - now))

    # -- results --------------------------------------------------------------------------

    @property
    def timeline(self) -> list[Sample]:
        with self._lock:
            return sorted(self._samples)

    @property
    def samples(self) -> int:
        with self._lock:
            return len(self._samples)

    @property
    def errors(self) -> int:
        """Failed reads."""
        with self._lock:
            return len(self._errors)

    @property
    def error_messages(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._errors)

    @property
    def live(self) -> int | None:
        """The latest live count, ``None`` before the first good read."""
        with self._lock:
            return max(self._samples).live if self._samples else None

    @property
    def min_live(self) -> int:
        timeline = self.timeline
        if not timeline:
            raise ObserverError(f"no sample of {self.address} ({self.errors} failed reads)")
        return min(s.live for s in timeline)

    @property
    def max_gap(self) -> float:
        """Largest time in seconds without a good sample, from start to stop (or now).

        Counts the lead-in before the first sample and the tail after the last, so an observer
        that never read anything has a gap as long as it ran.
        """
        if self._started is None:
            return 0.0
        end = self._stopped if self._stopped is not None else self._clock()
        points = [self._started, *(s.t for s in self.timeline), end]
        return max(b - a for a, b in zip(points, points[1:]))

    def min_live_by_key(self) -> dict[str, int]:
        """Fewest live nodes seen per observed key (every key seen, without ``keys``)."""
        timeline = self.timeline
        if not timeline:
            raise ObserverError(f"no sample of {self.address} ({self.errors} failed reads)")
        keys = self.keys or sorted({k for s in timeline for k, _ in s.by_key})
        return {key: min(dict(s.by_key).get(key, 0) for s in timeline) for key in keys}

    def min_live_between(self, t0: float, t1: float) -> int:
        """Fewest live nodes at any time in ``[t0, t1]`` (wall clock).

        The count at a moment is the latest sample at or before it, so the sample just before
        ``t0`` counts too.
        """
        if t1 < t0:
            raise ValueError(f"t1 {t1} is before t0 {t0}")
        timeline = self.timeline
        times = [s.t for s in timeline]
        first = bisect.bisect_right(times, t0) - 1
        last = bisect.bisect_right(times, t1)
        window = timeline[max(0, first) : last]
        if first < 0 or not window:
            raise ObserverError(f"no sample of {self.address} at or before {t0:.3f}")
        return min(s.live for s in window)

    def wait_for(
        self, predicate: Callable[[int], bool], timeout: float, what: str = "live count"
    ) -> Sample:
        """Block until a new sample satisfies ``predicate(live)``; ``ObserverError`` on timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            timeline = self.timeline
            for sample in timeline[seen:]:
                if predicate(sample.live):
                    return sample
            seen = len(timeline)
            time.sleep(self.interval / 2)
        last = self.live
        raise ObserverError(
            f"timed out after {timeout} s waiting for {what} on {self.address} "
            f"(last live count: {last}, failed reads: {self.errors})"
        )


class RoutersObserver:
    """Several routers watched at once (a fleet's HA pair): one :class:`RouterObserver` each.

    Each router is judged on its own samples, so the answers are the worst of any router: the
    fewest live nodes any of them had, the largest gap any of them left. A node the tool counts
    live must be live in every router, so each router on its own must never fall below the
    minimum. (The routers are read by separate threads; pairing their samples in time would
    claim more precision than the reads have.)
    """

    def __init__(self, addresses: Sequence[str], **options: Any) -> None:
        if not addresses:
            raise ValueError("no router to observe")
        self.routers = [RouterObserver(address, **options) for address in addresses]
        self.address = ", ".join(addresses)
        self.interval = self.routers[0].interval

    def start(self) -> RoutersObserver:
        for router in self.routers:
            router.start()
        return self

    def stop(self) -> None:
        for router in self.routers:
            router.stop()

    def __enter__(self) -> RoutersObserver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def timeline(self) -> list[Sample]:
        """Every router's samples in one time order."""
        return sorted(s for router in self.routers for s in router.timeline)

    @property
    def samples(self) -> int:
        return sum(router.samples for router in self.routers)

    @property
    def errors(self) -> int:
        return sum(router.errors for router in self.routers)

    @property
    def error_messages(self) -> list[tuple[float, str]]:
        return sorted(m for router in self.routers for m in router.error_messages)

    @property
    def live(self) -> int | None:
        latest = [router.live for router in self.routers]
        return None if None in latest else min(n for n in latest if n is not None)

    @property
    def min_live(self) -> int:
        return min(router.min_live for router in self.routers)

    @property
    def max_gap(self) -> float:
        return max(router.max_gap for router in self.routers)

    def min_live_by_key(self) -> dict[str, int]:
        fewest: dict[str, int] = {}
        for router in self.routers:
            for key, n in router.min_live_by_key().items():
                fewest[key] = min(n, fewest.get(key, n))
        return fewest

    def min_live_between(self, t0: float, t1: float) -> int:
        return min(router.min_live_between(t0, t1) for router in self.routers)
