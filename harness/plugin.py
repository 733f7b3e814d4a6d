"""pytest plugin: options (each with an ini twin) and the default uWSGI stack fixtures.

- ``uwsgi_stack``: a running :class:`harness.stack.Stack` built with the options' defaults.
- ``make_uwsgi_stack``: ``make_uwsgi_stack(vassals=2, start_delay=1.0) -> Stack``; every stack it
  made is stopped (and its temp dir removed) when the test ends.

On a failing test the log tails of its stacks are added to the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from harness import render
from harness.stack import Stack, StackConfig, start_stack

STACKS = pytest.StashKey[list[Stack]]()
KEPT = pytest.StashKey[list[Stack]]()

# (name, help, ini type): --uwsgi-NAME on the command line, uwsgi_NAME in the ini file.
_OPTIONS: list[tuple[str, str, str]] = [
    ("vassals", "number of vassals (symlinks to examples/uwsgi_vassal.ini); default 4", "string"),
    ("app-dir", "the app's dir (the vassal's chdir); default: the demo in examples/", "string"),
    ("wsgi-file", "the app's wsgi file, relative to the app dir; default ./wsgi.py", "string"),
    (
        "start-delay",
        "seconds the demo app sleeps while loading (a slow start); default 0",
        "string",
    ),
    (
        "request-delay",
        "seconds the demo app's view sleeps per request (a slow endpoint); default 0",
        "string",
    ),
    ("broken-deploy", "record that tests should deploy a broken version of the demo", "bool"),
    ("keep-stack", "do not stop stacks after the test: print their dir and pids", "bool"),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("uwsgi-reload harness")
    for name, help_text, kind in _OPTIONS:
        if kind == "bool":
            group.addoption(f"--uwsgi-{name}", action="store_true", default=None, help=help_text)
        else:
            group.addoption(f"--uwsgi-{name}", default=None, help=help_text)
        ini_name = f"uwsgi_{name.replace('-', '_')}"
        if kind == "bool":
            parser.addini(ini_name, help_text, type="bool")
        else:
            parser.addini(ini_name, help_text, type="string")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: starts real uWSGI and nginx processes (the harness's stacks)"
    )
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.stash[KEPT] = []
    stack_config(config)  # bad option combinations fail before any test runs


def _value(config: pytest.Config, name: str) -> Any:
    value = config.getoption(f"--uwsgi-{name}")
    if value is None:
        value = config.getini(f"uwsgi_{name.replace('-', '_')}")
    return value if value != "" else None


def stack_config(config: pytest.Config) -> StackConfig:
    """The default StackConfig from command line options, then ini values."""
    kwargs: dict[str, Any] = {}
    try:
        if (vassals := _value(config, "vassals")) is not None:
            kwargs["vassals"] = int(vassals)
        if (start_delay := _value(config, "start-delay")) is not None:
            kwargs["start_delay"] = float(start_delay)
        if (request_delay := _value(config, "request-delay")) is not None:
            kwargs["request_delay"] = float(request_delay)
    except ValueError as exc:
        raise pytest.UsageError(f"uwsgi-reload harness: {exc}") from None
    if (app_dir := _value(config, "app-dir")) is not None:
        kwargs["app_dir"] = Path(app_dir).resolve()
    if (wsgi_file := _value(config, "wsgi-file")) is not None:
        kwargs["wsgi_file"] = str(wsgi_file)
    kwargs["broken_deploy"] = bool(_value(config, "broken-deploy"))
    kwargs["keep"] = bool(_value(config, "keep-stack"))
    result = StackConfig(**kwargs)
    try:
        result.check()
    except ValueError as exc:
        raise pytest.UsageError(f"uwsgi-reload harness: {exc}") from None
    return result


@pytest.fixture
def make_uwsgi_stack(request: pytest.FixtureRequest) -> Iterator[Callable[..., Stack]]:
    """A factory of running stacks: ``make_uwsgi_stack(**StackConfig overrides) -> Stack``."""
    if not hasattr(request.config, "cache"):
        # pytest-xprocess keeps its process records in the cache; its own error is an AttributeError
        pytest.fail(
            "uwsgi-reload harness: the stacks need pytest's cache (pytest-xprocess keeps its "
            "process records there): drop -p no:cacheprovider",
            pytrace=False,
        )
    xprocess = request.getfixturevalue("xprocess")
    defaults = stack_config(request.config)
    made: list[Stack] = []
    request.node.stash[STACKS] = made

    def make(**overrides: Any) -> Stack:
        if "app_dir" in overrides:
            overrides["app_dir"] = Path(overrides["app_dir"])
        try:
            stack = start_stack(xprocess, dataclasses.replace(defaults, **overrides))
        except render.MissingTool as exc:
            pytest.fail(f"uwsgi-reload harness: {exc}", pytrace=False)
        made.append(stack)
        return stack

    yield make
    for stack in reversed(made):
        if stack.config.keep:
            request.config.stash[KEPT].append(stack)
        else:
            stack.stop()


@pytest.fixture
def uwsgi_stack(make_uwsgi_stack: Callable[..., Stack]) -> Stack:
    """A running stack with the options' defaults."""
    return make_uwsgi_stack()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    stacks: list[Stack] | None = item.stash.get(STACKS, None)
    if report.failed and stacks:
        for stack in stacks:
            if not stack.stopped:
                report.sections.append((f"uwsgi stack {stack.base_dir} logs", stack.report(30)))
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for stack in config.stash.get(KEPT, []):
        terminalreporter.write_line(
            f"uwsgi-reload harness kept stack {stack.base_dir}: pids {stack.pids} "
            f"(stop with: kill -INT {stack.pids.get('emperor')}; "
            f"kill -QUIT {stack.pids.get('nginx')})"
        )
