"""Reload procedures the suite runs besides the tool itself: faults around it, wrong ones.

``faults.py`` wraps the tool's command (a kill, a second run, an interrupt) or replaces it (touch
every config at once); each wrong procedure is a control that the zero-downtime check must catch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAULTS = HERE / "faults.py"


def with_fault(action: str, command: Sequence[str], *args: str) -> list[str]:
    """``command`` run by ``faults.py ACTION``, which acts on it while it runs."""
    return [sys.executable, str(FAULTS), action, *args, "--", *command]
