"""Safe deploys on the real stack under load: a canary serves while the tool watches it, and a bad
release is caught and reverted (``--canary``, ``--soak``, ``--canary-check``,
``--revert-command``).

Every stack here runs releases (``Release``): the vassals' ``chdir`` is the link ``current``,
pointing to v1 at start. A test deploys v2 (the link points to it), then runs the tool with one
canary; the revert command points the link back to v1 (``stack.release_command("v1")``). The
load GETs ``/`` while the tool probes ``/health``, as a team's health check does. At the end each
vassal is asked straight on its socket which release its worker runs (``stack.answers``): after a
revert, every worker must be on v1.

The controls show the same checks failing on a wrong procedure, without load (what they get
wrong is the release the vassals end on, not the requests): a revert command that does nothing
(the tool exits 4, one worker still serves v2) and no soak (v2 everywhere) for the sick release;
no revert command for the release that cannot start (its canary left down: not serving); no
canary check for the check (v2 everywhere).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import uwsgi_reload as ur
from tests.test_canary_logic import ReleaseSim
from uwsgi_reload_harness.stack import Release, Stack
from uwsgi_reload_loadtests.measure import (
    Broken,
    ReloadRun,
    observed,
    reload_under_load,
    tool_command,
)

pytestmark = pytest.mark.usefixtures("tool_only")

Record = Callable[[dict[str, object]], None]
MakeStack = Callable[..., Stack]

INTERRUPT_ON = Path(__file__).resolve().parent / "interrupt_on.py"
VASSALS, MINIMUM, TIMEOUT = 3, 1, 5
#: long enough that every failing release is caught well inside it (each fails 3 s after it
#: loaded), so the soak's length never decides a test
SOAK = 10
EXIT_NOT_ALL, EXIT_REVERTED, EXIT_INTERRUPTED = (
    ur.EXIT_NOT_ALL_RELOADED,
    ur.EXIT_REVERTED,
    ur.EXIT_INTERRUPTED,
)

#: v2 of each test: passes its first probe, then ``/health`` answers 500 3 s after it loaded;
#: its master dies on a request 3 s after it loaded; it cannot start; it is healthy
SICK = Release("v2", sick_after=3.0)
CRASH = Release("v2", crash_after=3.0)
NO_START = Release("v2", broken=True)
GOOD = Release("v2")


def release_stack(make: MakeStack, v2: Release) -> Stack:
    return make(vassals=VASSALS, health_path="/health", releases=(Release("v1"), v2))


def safe_deploy(
    stack: Stack, *flags: str, revert_command: str | None, soak: float = SOAK
) -> list[str]:
    """The tool with one canary per key soaking ``soak`` s, ``revert_command`` its way back
    (None: none), then ``flags``."""
    back = ["--revert-command", revert_command] if revert_command is not None else []
    canary = ["--canary", "1", "--soak", f"{soak:g}", "--timeout", str(TIMEOUT)]
    return tool_command(stack, MINIMUM, *canary, *back, *flags)


def back_to_v1(stack: Stack, *flags: str, soak: float = SOAK) -> list[str]:
    """:func:`safe_deploy` whose revert command points ``current`` back to v1."""
    return safe_deploy(stack, *flags, revert_command=stack.release_command("v1"), soak=soak)


def deploy_under_load(
    stack: Stack,
    command: list[str],
    name: str,
    record: Record,
    *,
    expected_exit: int,
    failures_allowed: bool = False,
) -> ReloadRun:
    """Deploy v2 and run ``command`` under load (users GET ``/``), measured again while the
    observer's gap is the run's only problem (``observed``), each time from v2 deployed and
    every vassal live."""

    def attempt() -> ReloadRun:
        stack.deploy(release="v2")
        stack.wait_all_live(30)
        return reload_under_load(stack, command, path="/")

    return observed(
        attempt,
        name,
        MINIMUM,
        record,
        all_replaced=False,
        failures_allowed=failures_allowed,
        expected_exit=expected_exit,
    )


def not_on(stack: Stack, release: str) -> list[str]:
    """Why the stack does not serve ``release`` from every worker: each vassal is asked ``GET /``
    straight on its socket; the answer must be 200, from ``release``, by the vassal's one
    current worker (processes = 1 in the example config)."""
    workers = stack.worker_pids()
    wrong = []
    for vid, answer in sorted(stack.answers("/").items()):
        if answer.status != 200:
            wrong.append(f"{vid} answered {answer.status} {answer.detail}")
            continue
        body = answer.json()
        if body["version"] != release:
            wrong.append(f"{vid} serves {body['version']}")
        if workers.get(vid) != [body["pid"]]:
            wrong.append(f"{vid} answered by pid {body['pid']}, its workers {workers.get(vid)}")
    return wrong


def serving(stack: Stack) -> bool:
    """Every vassal accepting, live in the router, and answering ``GET /`` with 200."""
    if not stack.status(through_nginx=False)[0]:
        return False
    return all(a.status == 200 for a in stack.answers("/").values())


def no_problems_but_lost_requests(run: ReloadRun) -> None:
    """The shared check with the untouched vassals' workers kept: nothing wrong but failed
    requests (asserted by each test on its own)."""
    problems = run.problems(MINIMUM, all_replaced=False)
    assert [p for p in problems if p.kind is not Broken.FAILED_REQUESTS] == [], run.output


def soak_failed_at(run: ReloadRun) -> float:
    """When (wall clock) the tool saw the canary fail its soak, from its output."""
    assert run.tool_json is not None, run.output
    found = re.search(r"^\s*([\d.]+)s\s+\S+: failed its soak", run.output, re.MULTILINE)
    assert found, run.output
    return float(run.tool_json["started"]) + float(found.group(1))


def interrupted(command: list[str], text: str, nth: int = 1) -> list[str]:
    """``command``, sent SIGINT at the ``nth`` line of its output holding ``text``."""
    return [sys.executable, str(INTERRUPT_ON), text, str(nth), "--", *command]


def run_without_load(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


# ---------------------------------------------------------------------------------------------
# Caught in the soak, reverted
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_release_turning_sick_is_caught_in_soak_and_reverted(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """v2 passes its first probe, then its health path answers 500 from 3 s after it loaded (a
    dependency unreachable): the soak's probe catches it, the revert brings the canary back to
    v1. Users GET ``/``, which keeps answering: zero failed requests."""
    stack = release_stack(make_uwsgi_stack, SICK)
    run = deploy_under_load(
        stack, back_to_v1(stack), "sick after 3 s", record_reload, expected_exit=EXIT_REVERTED
    )
    assert run.returncode == EXIT_REVERTED, run.output
    assert run.tool_json is not None and run.tool_json["canary"]["outcome"] == "failed"
    assert run.tool_json["revert"]["exit_code"] == 0
    assert run.load.total.failures == 0, run.failures_text()
    no_problems_but_lost_requests(run)
    assert not_on(stack, "v1") == []
    assert stack.current_release == "v1"

    # Control 1: a revert command that does nothing. The tool reloads the canary again, it
    # comes back (on v2, healthy for its first 3 s) and the tool exits 4: only asking the
    # workers shows the canary still on v2.
    stack.deploy(release="v2")
    control = run_without_load(safe_deploy(stack, revert_command="true"))
    assert control.returncode == EXIT_REVERTED, control.stdout + control.stderr
    assert len(not_on(stack, "v1")) == 1
    # Control 2: no soak (the recommended command, no canary): the release passes every probe
    # while it is new and goes everywhere.
    control = run_without_load(tool_command(stack, MINIMUM, "--timeout", str(TIMEOUT)))
    assert control.returncode == 0, control.stdout + control.stderr
    assert len(not_on(stack, "v1")) == VASSALS


@pytest.mark.e2e
def test_release_crashing_under_traffic_is_caught_and_reverted(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """v2's master dies on a request 3 s after it loaded (the Emperor starts it again): the soak
    sees it, the revert brings the canary back to v1, and the stack can be deployed again. The
    requests the canary held when it crashed are lost, and only those: all within a second
    before the tool saw it, no more than the canary's share of the traffic; the table of
    reloads reports them."""
    stack = release_stack(make_uwsgi_stack, CRASH)
    run = deploy_under_load(
        stack,
        back_to_v1(stack),
        "crash after 3 s",
        record_reload,
        expected_exit=EXIT_REVERTED,
        failures_allowed=True,
    )
    assert run.tool_json is not None and run.tool_json["canary"]["outcome"] == "failed"
    seen = soak_failed_at(run)
    lost = run.load.total.failures
    assert all(seen - 1.5 <= f.at <= seen + 0.5 for f in run.load.failed), (
        seen,
        run.failures_text(),
    )
    share = run.load.during.requests / VASSALS
    assert lost <= share, f"{lost} lost, more than the canary's share ({share:.0f})"
    print(f"crash under traffic: {lost} requests lost, all the crash's ({run.failures_text()})")
    no_problems_but_lost_requests(run)
    assert run.returncode == EXIT_REVERTED, run.output
    assert not_on(stack, "v1") == []
    # the next deploy reloads every vassal, the canary too
    again = run_without_load(tool_command(stack, MINIMUM, "--timeout", str(TIMEOUT)))
    assert again.returncode == 0, again.stdout + again.stderr


@pytest.mark.e2e
def test_release_that_fails_to_start_is_reverted(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """v2 cannot start (its app raises at import): the canary times out, the revert points the
    link back, and the Emperor's next restart of the canary loads v1. Drained before its
    touch, the canary held no request: zero failed."""
    stack = release_stack(make_uwsgi_stack, NO_START)
    run = deploy_under_load(
        stack, back_to_v1(stack), "fails to start", record_reload, expected_exit=EXIT_REVERTED
    )
    assert run.load.total.failures == 0, run.failures_text()
    no_problems_but_lost_requests(run)
    stack.wait_for(lambda: serving(stack), "every vassal serving", 30)
    assert not_on(stack, "v1") == []
    assert run.returncode == EXIT_REVERTED, run.output


@pytest.mark.e2e
def test_no_revert_command_exits_1_as_before(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """Without ``--revert-command``: exit 1, the canary left as it is (down: v2 cannot start),
    the rest never started, zero failed. The control of the test above: the canary does not
    serve v1 (``not_on`` names it)."""
    stack = release_stack(make_uwsgi_stack, NO_START)
    command = safe_deploy(stack, revert_command=None)
    name = "fails to start, no revert"
    run = deploy_under_load(stack, command, name, record_reload, expected_exit=EXIT_NOT_ALL)
    assert run.returncode == EXIT_NOT_ALL, run.output
    assert run.load.total.failures == 0, run.failures_text()
    no_problems_but_lost_requests(run)
    assert run.tool_json is not None and run.tool_json["revert"] is None
    assert len(run.kept_workers()) == VASSALS - 1
    wrong = not_on(stack, "v1")
    assert len(wrong) == 1 and "answered None" in wrong[0], wrong


@pytest.mark.e2e
def test_failing_canary_check_reverts(make_uwsgi_stack: MakeStack, record_reload: Record) -> None:
    """v2 is healthy by every probe, but the team's own signal (``--canary-check``) says no
    after the soak: reverted, zero failed, every worker on v1."""
    stack = release_stack(make_uwsgi_stack, GOOD)
    check = "echo 'error rate 12% (limit 1%)'; exit 1"
    command = back_to_v1(stack, "--canary-check", check, soak=1)
    run = deploy_under_load(
        stack, command, "canary check fails", record_reload, expected_exit=EXIT_REVERTED
    )
    assert run.returncode == EXIT_REVERTED, run.output
    assert run.tool_json is not None and run.tool_json["canary"]["outcome"] == "failed"
    assert run.tool_json["canary"]["failure"].startswith("check:")
    assert run.load.total.failures == 0, run.failures_text()
    no_problems_but_lost_requests(run)
    assert not_on(stack, "v1") == []

    # Control: without the check, the release passes its soak and goes everywhere.
    stack.deploy(release="v2")
    control = run_without_load(safe_deploy(stack, revert_command=None, soak=1))
    assert control.returncode == 0, control.stdout + control.stderr
    assert len(not_on(stack, "v1")) == VASSALS


# ---------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_ctrl_c_during_soak_leaves_every_vassal_serving(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """SIGINT a second into the soak: exit 130, the canary keeps serving v2, the rest were never
    touched (v1), zero failed."""
    stack = release_stack(make_uwsgi_stack, GOOD)
    # the third probe: the canary's own, then the soak's first two (1 s apart)
    command = interrupted(back_to_v1(stack), "probing", 3)
    run = deploy_under_load(
        stack, command, "SIGINT in soak", record_reload, expected_exit=EXIT_INTERRUPTED
    )
    assert run.returncode == EXIT_INTERRUPTED, run.output
    assert run.load.reload is not None
    assert json.loads(run.load.reload.stdout.strip().splitlines()[-1])["injected"] is True
    assert run.load.total.failures == 0, run.failures_text()
    no_problems_but_lost_requests(run)
    assert len(run.kept_workers()) == VASSALS - 1
    assert serving(stack)
    versions = sorted(a.json()["version"] for a in stack.answers("/").values())
    assert versions == ["v1"] * (VASSALS - 1) + ["v2"]


@pytest.mark.e2e
def test_ctrl_c_during_revert_leaves_every_vassal_serving(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """SIGINT as the revert reloads the sick canary (its second trigger): exit 130; the reload in
    flight finishes by itself, so the canary comes back on v1; zero failed."""
    stack = release_stack(make_uwsgi_stack, SICK)
    command = interrupted(back_to_v1(stack), "triggered", 2)
    run = deploy_under_load(
        stack, command, "SIGINT in revert", record_reload, expected_exit=EXIT_INTERRUPTED
    )
    assert run.returncode == EXIT_INTERRUPTED, run.output
    assert run.tool_json is not None and run.tool_json["revert"]["exit_code"] == 0
    assert run.load.total.failures == 0, run.failures_text()
    no_problems_but_lost_requests(run)
    stack.wait_for(lambda: serving(stack), "every vassal serving", 30)
    assert not_on(stack, "v1") == []


class InterruptOn(ur.Reporter):
    """Sends this process SIGINT as it prints a line holding ``text``: Ctrl-C at that moment."""

    def __init__(self, text: str) -> None:
        self.out = io.StringIO()
        super().__init__(False, self.out, self.out)
        self.text = text

    def line(self, text: str) -> None:
        super().line(text)
        if self.text in text:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_as_the_soak_starts_is_not_lost(tmp_path: Path) -> None:
    stack = ReleaseSim("good")
    for name in stack.vassals:
        (tmp_path / name).write_text("[uwsgi]\n")
    options = ur.Options(
        emperor_path=str(tmp_path),
        emperor_stats_socket="unused",
        fastrouter_stats_socket="unused",
        subscription_server="ss.sock",
        probe="/health",
        minimum_active_vassals=2,
        canary=1,
        soak=5.0,
    )
    reporter = InterruptOn("soaking")
    code = ur.run(options, reporter, stack.io())
    out = reporter.out.getvalue()
    assert code == EXIT_INTERRUPTED, out
    assert all(stack.touches(vid) == [] for vid in list(stack.vassals)[1:]), out
