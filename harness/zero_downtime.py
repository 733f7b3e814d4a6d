"""The zero-downtime checks a team runs against its own app, config and reload procedure.

Run from the installed package, from any dir that is not the app's::

    python -m pytest --pyargs uwsgi_reload_harness.zero_downtime \\
        --uwsgi-app-dir=/path/to/app --uwsgi-wsgi-file=app.py \\
        --uwsgi-vassal-config=/path/to/vassal.ini --uwsgi-health-path=/health \\
        --reload-command='/path/to/my_reload.sh {emperor_path} {minimum}'

Each test starts a real stack (emperor, fastrouter, vassals of the given config, nginx), runs
locust through nginx, runs the reload procedure in the middle of the load, and applies the one
check of :mod:`uwsgi_reload_loadtests.measure`: zero failed requests, load really served during
the reload, every vassal's worker replaced, and an observer of the router never saw fewer live
nodes than the minimum. Only what holds for any correct reload procedure is checked here; the
contract of this project's own tool (exit codes, reports, faults) is tested in its repository.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pytest

from .plugin import stack_config

if TYPE_CHECKING:
    from uwsgi_reload_loadtests.measure import ReloadRun

    from .stack import Stack

#: The minimums checked, each below the number of vassals (the others are skipped).
MINIMUMS = (1, 2, 3)


def reload_loses_no_request(
    stack: Stack, template: str, record: Callable[[dict[str, object]], None], minimum: int
) -> ReloadRun:
    """Reload ``stack`` under load with the procedure ``template`` at ``minimum``; check it."""
    from uwsgi_reload_loadtests.measure import again, observed, reload_command

    command = reload_command(stack, template, minimum)
    run = observed(again(stack, command), f"minimum {minimum}", minimum, record)
    assert run.returncode == 0, f"the reload command exited {run.returncode}\n{run.output}"
    assert run.check(minimum) == [], run.output
    assert run.min_live_during() >= minimum
    return run


def skip_unless_below_vassals(config: pytest.Config, minimum: int) -> None:
    vassals = stack_config(config).vassals
    if minimum >= vassals:
        pytest.skip(f"minimum {minimum} needs more than {vassals} vassals")


@pytest.mark.parametrize("minimum", MINIMUMS)
def test_reload_loses_no_request(
    request: pytest.FixtureRequest,
    make_uwsgi_stack: Callable[..., Stack],
    reload_template: str,
    record_reload: Callable[[dict[str, object]], None],
    minimum: int,
) -> None:
    skip_unless_below_vassals(request.config, minimum)
    reload_loses_no_request(make_uwsgi_stack(), reload_template, record_reload, minimum)
