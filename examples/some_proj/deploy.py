"""What is deployed: read once, at import, from the JSON file named by UWSGI_RELOAD_DEMO_CONTROL.

The file stands in for new code: change it, reload a vassal, and the vassal runs the new
"deploy". Keys (all optional; no variable or no file means the defaults):

- ``version`` (str, default ``"v1"``): reported by the view.
- ``start_delay`` (float seconds, default 0): sleep at import, a slow application start.
- ``broken`` (bool, default false): raise at import, a deploy whose application cannot load.
- ``request_delay`` (float seconds, default 0): the view sleeps this long, a slow endpoint; with it
  the vassals, not the load generator, set the pace, so requests queue in their sockets.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

CONTROL_ENV = "UWSGI_RELOAD_DEMO_CONTROL"
DEFAULTS: dict[str, Any] = {
    "version": "v1",
    "start_delay": 0.0,
    "broken": False,
    "request_delay": 0.0,
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

if float(CONTROL["start_delay"]) > 0:
    time.sleep(float(CONTROL["start_delay"]))
if CONTROL["broken"]:
    raise BrokenDeploy(f"deploy {VERSION} is broken (control file {os.environ.get(CONTROL_ENV)})")

# When this code was loaded: a reload shows up as a new value.
STARTED = time.time()
