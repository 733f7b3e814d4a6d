"""The pacing of ``--rate``: a fixed grid of starts, no burst after a slow request."""

from __future__ import annotations

import pytest

from uwsgi_reload_loadtests.pacing import Pacer, user_interval


def starts(pacer: Pacer, latencies: list[float]) -> list[float]:
    """When each request starts, for requests that take ``latencies`` seconds in turn."""
    now, result = 0.0, []
    for latency in latencies:
        result.append(now)
        pacer.start(now)
        now += latency
        now += pacer.wait(now)
    return [round(t, 6) for t in result]


def test_fast_requests_keep_to_the_grid() -> None:
    assert starts(Pacer(0.1), [0.01, 0.05, 0.099, 0.0, 0.02]) == [0.0, 0.1, 0.2, 0.3, 0.4]


def test_a_slow_request_moves_the_grid_without_a_burst() -> None:
    # the second request takes 0.35 s: the next starts when it ends, then every 0.1 s again
    assert starts(Pacer(0.1), [0.01, 0.35, 0.01, 0.01]) == [0.0, 0.1, 0.45, 0.55]


def test_sleeping_late_does_not_drift_the_rate() -> None:
    pacer, now = Pacer(0.1), 0.0
    for _ in range(100):
        pacer.start(now)
        now += 0.01  # the request
        now += pacer.wait(now) + 0.003  # the sleep overshoots by 3 ms every time
    assert now == pytest.approx(10.003)


def test_user_interval_shares_the_rate() -> None:
    assert user_interval(rate=200, users=32) == pytest.approx(0.16)
    with pytest.raises(ValueError):
        user_interval(rate=0, users=8)
    with pytest.raises(ValueError):
        Pacer(0)
