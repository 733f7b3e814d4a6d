"""What is deployed: read once, at import, from the JSON file named by UWSGI_RELOAD_DEMO_CONTROL.

The file stands in for new code: change it, reload a vassal, and the vassal runs the new
"deploy". Keys (all optional; no variable or no file means the defaults):

- ``version`` (str, default ``"v1"``): reported by the views.
- ``start_delay`` (float seconds, default 0): sleep at import, a slow application start.
- ``broken`` (bool, default false): raise at import, a deploy whose application cannot load.
- ``request_delay`` (float seconds, default 0): the view sleeps this long, a slow endpoint; with it
  the vassals, not the load generator, set the pace, so requests queue in their sockets.
- ``sick_after`` (float seconds, default 0: never): ``/health`` answers 500 from this many
  seconds after the app loaded, as an app does when a dependency it needs becomes unreachable;
  ``/`` keeps answering 200.
- ``crash_after`` (float seconds, default 0: never): the first request this many seconds after
  the app loaded kills the vassal's master with SIGKILL (as the kernel's OOM killer does), then
  its own worker, in the middle of the request: the Emperor starts the vassal again.
- ``cold_requests`` (int, default 0) and ``cold_delay`` (float seconds, default 0): each worker's
  first ``cold_requests`` requests to ``/`` take ``cold_delay`` longer: a cache filled lazily, per
  process (as a connection pool is: nothing opened before the fork can be shared).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

CONTROL_ENV = "UWSGI_RELOAD_DEMO_CONTROL"
DEFAULTS: dict[str, Any] = {
    "version": "v1",
    "start_delay": 0.0,
    "broken": False,
    "request_delay": 0.0,
    "sick_after": 0.0,
    "crash_after": 0.0,
    "cold_requests": 0,
    "cold_delay": 0.0,
}


class BrokenDeploy(RuntimeError):
    """The control file says this deploy cannot load."""


def read_control(path: str | None) -> dict[str, Any]:
    control = dict(DEFAULTS)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                control.update(json.load(f))
        except FileNotFoundError:
            pass
    return control


CONTROL = read_control(os.environ.get(CONTROL_ENV))
VERSION = str(CONTROL["version"])
REQUEST_DELAY = float(CONTROL["request_delay"])
SICK_AFTER = float(CONTROL["sick_after"])
CRASH_AFTER = float(CONTROL["crash_after"])
COLD_REQUESTS = int(CONTROL["cold_requests"])
COLD_DELAY = float(CONTROL["cold_delay"])

if float(CONTROL["start_delay"]) > 0:
    time.sleep(float(CONTROL["start_delay"]))
if CONTROL["broken"]:
    raise BrokenDeploy(f"deploy {VERSION} is broken (control file {os.environ.get(CONTROL_ENV)})")

# When this code was loaded: a reload shows up as a new value.
STARTED = time.time()

#: the process whose cache is filled, and how many requests filled it so far
_cache = {"pid": 0, "filled": 0}


def serving_for() -> float:
    """Seconds since this code was loaded."""
    return time.time() - STARTED


def crash_if_due() -> None:
    """Past ``crash_after``: kill the vassal's master, then its workers (this one last), in the
    middle of this request. uWSGI's workers outlive their master unless ``no-orphans`` is set."""
    if CRASH_AFTER <= 0 or serving_for() < CRASH_AFTER or os.getpid() == MASTER_PID:
        return
    os.kill(MASTER_PID, signal.SIGKILL)
    for pid in workers(MASTER_PID) - {os.getpid()}:
        os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def workers(master: int) -> set[int]:
    """The pids whose parent is ``master`` (read from /proc: Linux only, as the demo)."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == master:
            found.add(int(entry))
    return found


def healthy() -> bool:
    return not (SICK_AFTER > 0 and serving_for() >= SICK_AFTER)


def fill_cache() -> bool:
    """The lazily filled cache: this worker's first ``cold_requests`` requests pay for it.
    True when this request did (it found the cache cold)."""
    if _cache["pid"] != os.getpid():
        _cache.update(pid=os.getpid(), filled=0)
    if _cache["filled"] >= COLD_REQUESTS:
        return False
    _cache["filled"] += 1
    time.sleep(COLD_DELAY)
    return True


# The app loads in the vassal's master (no lazy-apps), which then forks its workers.
MASTER_PID = os.getpid()
