"""The zero-downtime checks a team runs against its own app, config and reload procedure.

Run from the installed package, from any dir that is not the app's::

    python -m pytest --pyargs uwsgi_reload_loadtests.zero_downtime \\
        --uwsgi-app-dir=/path/to/app --uwsgi-wsgi-file=app.py \\
        --uwsgi-vassal-config=/path/to/vassal.ini --uwsgi-health-path=/health \\
        --reload-command='/path/to/my_reload.sh {emperor_path} {minimum}'

Each test starts a real stack (emperor, fastrouter, vassals of the given config, nginx), runs
locust through nginx, runs the reload procedure in the middle of the load, and applies the one
check of :mod:`uwsgi_reload_loadtests.measure`: zero failed requests, load really served during
the reload, every vassal's worker replaced, and an observer of the router never saw fewer live
nodes than the minimum. Only what holds for any correct reload procedure is checked here; the
contract of this project's own tool (exit codes, reports, faults) is tested in its repository.

Two traps catch procedures that touch configs with a plain ``touch``: the emperor reloads a
vassal only when its config's whole-second mtime moves past the ``last_mod`` it recorded, so a
touch is silently ignored when a config's mtime is in the future (copied with preserved
timestamps, a skewed clock) or when it was already touched in the same second.
"""

from __future__ import annotations

import sys
from typing import Callable

import pytest

from uwsgi_reload_harness.plugin import stack_config
from uwsgi_reload_harness.stack import Stack
from uwsgi_reload_harness.traps import TRAP_LINE

from .measure import ReloadRun, again, observed, reload_command, reload_under_load
from .observer import read_document

#: The minimums checked, each below the number of vassals (the others are skipped).
MINIMUMS = (1, 2, 3)


Record = Callable[[dict[str, object]], None]
#: How long a procedure may take per vassal in the traps (a trapped one waits for nothing).
TRAP_TIMEOUT = 30


def reload_loses_no_request(
    stack: Stack, template: str, record: Record, minimum: int, name: str | None = None
) -> ReloadRun:
    """Reload ``stack`` under load with the procedure ``template`` at ``minimum``; check it."""
    command = reload_command(stack, template, minimum)
    run = observed(again(stack, command), name or f"minimum {minimum}", minimum, record)
    assert run.returncode == 0, f"the reload command exited {run.returncode}\n{run.output}"
    assert run.check(minimum) == [], run.output
    assert run.min_live_during() >= minimum
    return run


def registered_mtimes(stack: Stack) -> dict[str, int]:
    """The emperor's ``last_mod`` of each vassal, read with the observer's own parser."""
    vassals = read_document(stack.emperor_stats)["vassals"]
    return {str(v["id"]): int(v["last_mod"]) for v in vassals}


def trapped_second(output: str) -> int | None:
    """The second the trap touched its config at, from the wrapper's line in ``output``."""
    for line in output.splitlines():
        if line.startswith(TRAP_LINE):
            return int(line[len(TRAP_LINE) :])
    return None


def reloads_twice_in_one_second(
    stack: Stack, template: str, record: Record, name: str = "trap: same second"
) -> tuple[ReloadRun, list[str]]:
    """The first vassal's config gets a plain touch that opens a second (the emperor reloads it,
    or is about to); the procedure under test starts at once and must reload every vassal, that
    one after its own touch. The run, and what was lost: the first vassal is reloaded after the
    procedure's touch only if the emperor registered an mtime past the trap's second (one reload
    for both touches is fine; the trap's alone is not)."""
    first = stack.vassal_links[0]
    procedure = reload_command(stack, template, 1, timeout=TRAP_TIMEOUT)
    command = [sys.executable, "-m", "uwsgi_reload_harness.traps", "same-second", str(first), "--"]
    after: dict[str, int] = {}

    def attempt() -> ReloadRun:
        stack.wait_all_live(timeout=30)
        run = reload_under_load(stack, [*command, *procedure])
        after.clear()
        after.update(registered_mtimes(stack))
        return run

    def lost(run: ReloadRun) -> list[str]:
        second = trapped_second(run.output)
        if second is None:
            return ["the trap did not run"]
        if after.get(first.name, 0) <= second:
            return [f"{first.name}: the procedure's touch in the trap's second was ignored"]
        return []

    run = observed(attempt, name, 1, record, verify=lost)
    return run, lost(run)


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


def test_configs_with_a_future_mtime_are_reloaded(
    make_uwsgi_stack: Callable[..., Stack], reload_template: str, record_reload: Record
) -> None:
    """The emperor's ``last_mod`` is an hour ahead of the clock: a plain touch is ignored."""
    stack = make_uwsgi_stack(link_mtime_offset=3600)
    reload_loses_no_request(stack, reload_template, record_reload, 1, "trap: mtime in the future")


def test_a_second_reload_within_one_second_is_not_lost(
    make_uwsgi_stack: Callable[..., Stack], reload_template: str, record_reload: Record
) -> None:
    run, lost = reloads_twice_in_one_second(make_uwsgi_stack(), reload_template, record_reload)
    assert run.returncode == 0, f"the reload command exited {run.returncode}\n{run.output}"
    assert run.check(1) == [], run.output
    assert lost == [], run.output
