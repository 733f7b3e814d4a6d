"""Pacing for a rate-limited load: each user starts a request at most once per interval.

With ``--rate`` the load no longer saturates the stack: a closed loop of users with no think
time keeps every live vassal busy, so during a reload the users queue on the vassals left and
latency measures capacity. Paced users keep the offered rate fixed, so latency during a reload
measures what the reload itself does (below the capacity of the vassals left serving).
"""

from __future__ import annotations


class Pacer:
    """Starts on a grid of ``interval`` seconds; a late request moves the grid, never doubles up.

    Call ``start(now)`` as each request starts and wait ``wait(now)`` seconds before the next.
    Starts keep to the grid (sleeping a little late does not drift the rate); a start more than
    one interval behind it (after a slow request) becomes the grid's new origin, so a stall is
    not followed by a burst that would queue on the server.
    """

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval}")
        self.interval = interval
        self._next: float | None = None

    def start(self, now: float) -> None:
        if self._next is None or now - self._next >= self.interval:
            self._next = now
        self._next += self.interval

    def wait(self, now: float) -> float:
        return 0.0 if self._next is None else max(0.0, self._next - now)


def user_interval(rate: float, users: int) -> float:
    """Seconds between one user's requests for ``rate`` requests/s shared by ``users``."""
    if rate <= 0 or users <= 0:
        raise ValueError(f"rate and users must be positive, not {rate} and {users}")
    return users / rate
