"""The suite runs against the installed package (tox builds and installs the wheel).

The harness plugin comes in through its ``pytest11`` entry point, under its installed name
``uwsgi_reload_harness``; a checkout without the package installed says how to install it.
"""

from __future__ import annotations

import importlib.util

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if importlib.util.find_spec("uwsgi_reload_harness") is None:
        raise pytest.UsageError(
            "uwsgi-reload is not installed in this environment: run the suite with tox, "
            "or pip install -e '.[harness,demo,fleet]' flask hypothesis prometheus-client first"
        )
