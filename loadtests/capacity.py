"""Capacity over a reload: how many vassal-seconds of serving the router lost.

The observer counts the live nodes of the key with fewest; with N vassals per key, the capacity
lost over ``[t0, t1]`` is the integral of ``max(0, N - live)``, a step function (the count at a
moment is the latest sample at or before it, as ``RouterObserver.min_live_between`` counts).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from .observer import Sample


def lost_capacity(timeline: Sequence[Sample], vassals: int, t0: float, t1: float) -> float:
    """Vassal-seconds below ``vassals`` live over ``[t0, t1]`` (wall clock)."""
    if t1 <= t0 or not timeline:
        return 0.0
    times = [s.t for s in timeline]
    first = max(0, bisect.bisect_right(times, t0) - 1)
    lost = 0.0
    for i in range(first, len(timeline)):
        start = max(timeline[i].t, t0)
        end = min(timeline[i + 1].t if i + 1 < len(timeline) else t1, t1)
        if start >= t1:
            break
        if end > start:
            lost += max(0, vassals - timeline[i].live) * (end - start)
    return lost


def min_live(timeline: Sequence[Sample], t0: float, t1: float) -> int | None:
    """Fewest live nodes in ``[t0, t1]``, the sample just before ``t0`` included."""
    times = [s.t for s in timeline]
    first = max(0, bisect.bisect_right(times, t0) - 1)
    window = [s.live for s in timeline[first : bisect.bisect_right(times, t1)]]
    return min(window) if window else None
