"""The suite's fixtures come from the harness plugin (``uwsgi_reload_harness.plugin``):
``uwsgi_stack``, ``make_uwsgi_stack``, ``reload_template`` and ``record_reload``, whose rows are
the table of reloads printed at the end of the run.
"""

from __future__ import annotations

import pytest

from uwsgi_reload_harness.plugin import foreign_procedure


@pytest.fixture
def tool_only(request: pytest.FixtureRequest) -> None:
    """Skip a test of this tool's own contract when another procedure is under test."""
    if foreign_procedure(request.config):
        pytest.skip(
            "tests uwsgi_reload.py's own contract; --reload-command names another procedure"
        )
