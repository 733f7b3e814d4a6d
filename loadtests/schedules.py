"""The schedules the benchmark compares, by name, and the command that runs the 2014 one.

Light on purpose: ``original_plan.py`` imports its name from here and must start as fast as the
tool (its CPU is compared with the tool's), so nothing heavier than the standard library.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uwsgi_reload_harness.stack import Stack

TOOL = "uwsgi_reload"
ONE_AT_A_TIME = "one at a time"
ORIGINAL = "2014 plan"
LOWER_BOUND = "lower bound"

ORIGINAL_PLAN_MODULE = "uwsgi_reload_loadtests.original_plan"


def original_plan_command(stack: Stack, minimum: int) -> list[str]:
    """The 2014 schedule (``python -m uwsgi_reload_loadtests.original_plan``) for ``stack``."""
    return [
        sys.executable,
        "-m",
        ORIGINAL_PLAN_MODULE,
        "--emperor-path",
        str(stack.emperor_path),
        "--emperor-stats-socket",
        stack.emperor_stats,
        "--fastrouter-stats-socket",
        stack.fastrouter_stats,
        "--minimum-active-vassals",
        str(minimum),
    ]
