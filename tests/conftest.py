"""Fixtures of the zero-downtime suite, and the table of what each reload under load measured."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.zero_downtime import DEFAULT_TEMPLATE

Rows = list[dict[str, object]]
_ROWS = pytest.StashKey[Rows]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("uwsgi-reload suite")
    help_text = (
        "the reload command under test, a template with {python} {tool} {emperor_path} "
        "{emperor_stats} {fastrouter_stats} {subscription_server} {minimum} {timeout} "
        "(default: this project's uwsgi_reload.py)"
    )
    group.addoption("--reload-command", default=None, help=help_text)
    parser.addini("reload_command", help_text, default=DEFAULT_TEMPLATE)


@pytest.fixture
def reload_template(request: pytest.FixtureRequest) -> str:
    value = request.config.getoption("--reload-command") or request.config.getini("reload_command")
    return str(value)


@pytest.fixture
def record_reload(request: pytest.FixtureRequest) -> Callable[[dict[str, object]], None]:
    rows = request.config.stash.setdefault(_ROWS, [])
    return rows.append


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    terminalreporter.section("reloads under load")
    terminalreporter.write_line(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    terminalreporter.write_line("-+-".join("-" * w for w in widths))
    for row in rows:
        cells = (str(row.get(c, "")).ljust(w) for c, w in zip(columns, widths))
        terminalreporter.write_line(" | ".join(cells))
