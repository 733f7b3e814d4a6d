"""pytest plugin: options (each with an ini twin) and the fixtures that start real uWSGI stacks.

- ``uwsgi_stack``: a running :class:`uwsgi_reload_harness.stack.Stack` with the options' defaults.
- ``make_uwsgi_stack``: ``make_uwsgi_stack(vassals=2, start_delay=1.0) -> Stack``; every stack it
  made is stopped (and its temp dir removed) when the test ends, unless ``--uwsgi-keep-stack``.
- ``make_uwsgi_fleet`` / ``uwsgi_fleet``: a fleet of app hosts (an emperor each, on its own
  loopback address), fastrouters and nginx (:mod:`uwsgi_reload_harness.fleet`).
- ``reload_template``: the reload procedure under test (``--reload-command``).
- ``record_reload``: adds a row to the table of reloads printed at the end of the run.

Installed, this module is loaded by every pytest run in the environment (entry point ``pytest11``),
so it stays inert until a test asks for one of its fixtures: importing it needs nothing beyond
pytest, it registers no marker, and the options are read and checked only when a stack fixture is
requested. The stack code (requests, mirakuru) is imported then too.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import pytest

if TYPE_CHECKING:
    from .fleet import Fleet
    from .stack import ProcessGroup, Stack, StackConfig

Made = TypeVar("Made", bound="ProcessGroup")
#: The stacks and fleets a test made (their logs go into its report when it fails), those kept.
MADE = pytest.StashKey[list["ProcessGroup"]]()
KEPT = pytest.StashKey[list["ProcessGroup"]]()
ROWS = pytest.StashKey[list[dict[str, object]]]()

#: The reload command when ``--reload-command`` is not given: this project's tool, draining each
#: vassal first. Without drain, uWSGI can reset a connection the router already handed to a
#: vassal as its graceful reload begins (the router logs ``fr_instance_read(): Connection reset
#: by peer`` and does not retry a node that accepted): rare, but a lost request. Drain goes with
#: ``--probe``: drain subscribes a vassal back itself, and without a probe it does so when the
#: Emperor hears "accepting", before the worker's accepting hooks have run
#: (docs/bench/probe-stall.md).
DEFAULT_TEMPLATE = (
    "{python} {tool} --emperor-path {emperor_path} --fastrouter-stats-socket {fastrouter_stats} "
    "--emperor-stats-socket {emperor_stats} --subscription-server {subscription_server} "
    "--probe {health_path} --minimum-active-vassals {minimum} --timeout {timeout}"
)

# (name, help, ini type): --uwsgi-NAME on the command line, uwsgi_NAME in the ini file.
_OPTIONS: list[tuple[str, str, str]] = [
    ("vassals", "number of vassals (symlinks to the vassal config); default 4", "string"),
    (
        "app-dir",
        "your app's dir (the vassals' chdir); default: the demo app of examples/",
        "string",
    ),
    ("wsgi-file", "your app's wsgi file, relative to the app dir; default ./wsgi.py", "string"),
    (
        "vassal-config",
        "your vassal config, with the placeholders of examples/uwsgi_vassal.ini; "
        "default: examples/uwsgi_vassal.ini",
        "string",
    ),
    ("health-path", "the path the stack's probes and the load GET; default /", "string"),
    (
        "start-delay",
        "demo app: seconds it sleeps while loading (a slow start); default 0",
        "string",
    ),
    (
        "request-delay",
        "demo app: seconds its view sleeps per request (a slow endpoint); default 0",
        "string",
    ),
    (
        "keep-stack",
        "do not stop stacks and fleets after the test: print their dirs and pids",
        "bool",
    ),
]

_RELOAD_HELP = (
    "the reload procedure under test: a command template with {python} {tool} {emperor_path} "
    "{emperor_stats} {fastrouter_stats} {subscription_server} {health_path} {minimum} {timeout} "
    "(default: this project's uwsgi_reload.py)"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("uwsgi-reload harness")
    for name, help_text, kind in _OPTIONS:
        ini_name = f"uwsgi_{name.replace('-', '_')}"
        if kind == "bool":
            group.addoption(f"--uwsgi-{name}", action="store_true", default=None, help=help_text)
            parser.addini(ini_name, help_text, type="bool")
        else:
            group.addoption(f"--uwsgi-{name}", default=None, help=help_text)
            parser.addini(ini_name, help_text, type="string")
    group.addoption("--reload-command", default=None, help=_RELOAD_HELP)
    parser.addini("reload_command", _RELOAD_HELP, default="")


def pytest_configure(config: pytest.Config) -> None:
    """Refuse a run whose rootdir pytest took from the app's dir: it would write its cache there.

    pytest picks its rootdir before plugins parse their options, so in ``--uwsgi-app-dir /app``
    it takes ``/app`` for a test path. Only runs given a harness path option are looked at.
    """
    for name in ("app-dir", "vassal-config"):
        value = config.getoption(f"--uwsgi-{name}")
        if not value:
            continue
        given = _path(config, str(value))
        owner = given if given.is_dir() else given.parent
        started_inside = config.invocation_params.dir.resolve().is_relative_to(owner)
        if config.rootpath.resolve().is_relative_to(owner) and not started_inside:
            raise pytest.UsageError(
                f"uwsgi-reload harness: pytest took {owner} for its rootdir and would write its "
                f"cache there: write --uwsgi-{name}={value} (with '=')"
            )


def _value(config: pytest.Config, name: str) -> Any:
    value = config.getoption(f"--uwsgi-{name}")
    if value is None:
        value = config.getini(f"uwsgi_{name.replace('-', '_')}")
    return value if value != "" else None


def _path(config: pytest.Config, value: str) -> Path:
    """A path from an option: relative to where pytest was started (an ini value: to the ini)."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = config.invocation_params.dir / path
    return path.resolve()


def stack_config(config: pytest.Config) -> StackConfig:
    """The default StackConfig from command line options, then ini values; UsageError if bad."""
    from .stack import StackConfig

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
        kwargs["app_dir"] = _path(config, str(app_dir))
    if (vassal_config := _value(config, "vassal-config")) is not None:
        kwargs["vassal_config"] = _path(config, str(vassal_config))
    if (wsgi_file := _value(config, "wsgi-file")) is not None:
        kwargs["wsgi_file"] = str(wsgi_file)
    if (health_path := _value(config, "health-path")) is not None:
        kwargs["health_path"] = str(health_path)
    kwargs["keep"] = bool(_value(config, "keep-stack"))
    result = StackConfig(**kwargs)
    try:
        result.check()
    except ValueError as exc:
        raise pytest.UsageError(f"uwsgi-reload harness: {exc}") from None
    return result


def reload_template_of(config: pytest.Config) -> str:
    """The ``--reload-command`` template, or this project's tool when none is given."""
    value = config.getoption("--reload-command") or config.getini("reload_command")
    return str(value) if value else DEFAULT_TEMPLATE


def foreign_procedure(config: pytest.Config) -> bool:
    """True when the reload procedure under test is not this project's tool."""
    return reload_template_of(config) != DEFAULT_TEMPLATE


def _factory(
    request: pytest.FixtureRequest, start: Callable[..., Made]
) -> Iterator[Callable[..., Made]]:
    """``start(**overrides)`` as a factory fixture: what it made is stopped when the test ends,
    or kept (``--uwsgi-keep-stack``) and listed at the end of the run."""
    from . import render

    made: list[Made] = []

    def make(**overrides: Any) -> Made:
        for name in ("app_dir", "vassal_config"):
            if name in overrides:
                overrides[name] = Path(overrides[name])
        try:
            group = start(**overrides)
        except render.MissingTool as exc:
            pytest.fail(f"uwsgi-reload harness: {exc}", pytrace=False)
        made.append(group)
        request.node.stash.setdefault(MADE, []).append(group)
        return group

    try:
        yield make
    finally:
        for group in reversed(made):
            if group.config.keep:
                request.config.stash.setdefault(KEPT, []).append(group)
            else:
                group.stop()


@pytest.fixture
def make_uwsgi_stack(request: pytest.FixtureRequest) -> Iterator[Callable[..., Stack]]:
    """A factory of running stacks: ``make_uwsgi_stack(**StackConfig overrides) -> Stack``."""
    import dataclasses

    from .stack import start_stack

    defaults = stack_config(request.config)
    yield from _factory(request, lambda **o: start_stack(dataclasses.replace(defaults, **o)))


@pytest.fixture
def uwsgi_stack(make_uwsgi_stack: Callable[..., Stack]) -> Stack:
    """A running stack with the options' defaults."""
    return make_uwsgi_stack()


@pytest.fixture
def make_uwsgi_fleet(request: pytest.FixtureRequest) -> Iterator[Callable[..., Fleet]]:
    """A factory of running fleets on this machine (app hosts on 127.0.0.2, 127.0.0.3, ...,
    fastrouters and nginx on 127.0.0.1): ``make_uwsgi_fleet(hosts=2, vassals=2, routers=2)``,
    :class:`uwsgi_reload_harness.fleet.FleetConfig` overrides. The app dir, wsgi file, health
    path, demo delays and ``--uwsgi-keep-stack`` come from the options, as for stacks."""
    import dataclasses

    from .fleet import FleetConfig, start_fleet

    options = stack_config(request.config)
    fields = [f.name for f in dataclasses.fields(FleetConfig)]
    defaults = {name: getattr(options, name) for name in fields if hasattr(options, name)}
    yield from _factory(request, lambda **o: start_fleet(FleetConfig(**{**defaults, **o})))


@pytest.fixture
def uwsgi_fleet(make_uwsgi_fleet: Callable[..., Fleet]) -> Fleet:
    """A running fleet: 2 app hosts of ``--uwsgi-vassals`` vassals each (default 4), 1 router."""
    return make_uwsgi_fleet(hosts=2)


@pytest.fixture
def reload_template(request: pytest.FixtureRequest) -> str:
    """The reload procedure under test, a command template (``--reload-command``)."""
    return reload_template_of(request.config)


@pytest.fixture
def record_reload(request: pytest.FixtureRequest) -> Callable[[dict[str, object]], None]:
    """Add one row (column -> value) to the table of reloads printed at the end of the run."""
    return request.config.stash.setdefault(ROWS, []).append


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed:
        for group in item.stash.get(MADE, []):
            if not group.stopped:
                dirs = " ".join(map(str, group.base_dirs))
                report.sections.append((f"uwsgi {group.kind} {dirs} logs", group.report(30)))
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS, [])
    if rows:
        columns = list(dict.fromkeys(c for row in rows for c in row))
        widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
        terminalreporter.section("reloads under load")
        terminalreporter.write_line(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
        terminalreporter.write_line("-+-".join("-" * w for w in widths))
        for row in rows:
            cells = (str(row.get(c, "")).ljust(w) for c, w in zip(columns, widths))
            terminalreporter.write_line(" | ".join(cells))
    for group in config.stash.get(KEPT, []):
        masters = " ".join(str(pid) for name, pid in group.pids.items() if name != "nginx")
        terminalreporter.write_line(
            f"uwsgi-reload harness kept {group.kind} {group.url} in "
            f"{' '.join(map(str, group.base_dirs))}: "
            f"pids {group.pids} (stop with: kill -INT {masters}; "
            f"kill -QUIT {group.pids.get('nginx')})"
        )
