"""Proof power: traps for wrong reload procedures, controls the suite must catch, lock scope.

Every wrong procedure lives in ``tests/reload_procedures.py`` (a small script a team might have
written); each control test runs it under load and shows that the suite's one check fails on it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from uwsgi_reload_harness import render
from uwsgi_reload_harness.stack import Stack
from uwsgi_reload_loadtests.measure import Broken, ReloadRun, reload_under_load

# The traps ship with the package (any procedure must pass them); collected here as well.
from uwsgi_reload_loadtests.zero_downtime import (  # noqa: F401
    reload_loses_no_request,
    reloads_twice_in_one_second,
    test_a_second_reload_within_one_second_is_not_lost,
    test_configs_with_a_future_mtime_are_reloaded,
)

pytestmark = [pytest.mark.e2e]

MakeStack = Callable[..., Stack]
Record = Callable[[dict[str, object]], None]
PROCEDURES = Path(__file__).with_name("reload_procedures.py")
#: seconds a wrong procedure waits for a reload the emperor never started
GIVE_UP = 3
#: a stack with two fastrouter keys, not as many vassals under each
TWO_KEYS = {"vassals": 4, "extra_keys": (("other.test", 3),)}


def procedure(stack: Stack, mode: str, minimum: int, timeout: float = 60) -> list[str]:
    """One of ``tests/reload_procedures.py``'s procedures, for this stack."""
    stats = [stack.emperor_stats, stack.fastrouter_stats]
    limits = ["--minimum", str(minimum), "--timeout", f"{timeout:g}"]
    return [sys.executable, str(PROCEDURES), mode, str(stack.emperor_path), *stats, *limits]


def template(mode: str, timeout: float = 60) -> str:
    """The same, as a ``--reload-command`` template."""
    fields = "{emperor_path} {emperor_stats} {fastrouter_stats} --minimum {minimum}"
    return f"{{python}} {PROCEDURES} {mode} {fields} --timeout {timeout:g}"


def kinds(run: ReloadRun, minimum: int) -> set[Broken]:
    return {problem.kind for problem in run.problems(minimum)}


# ---------------------------------------------------------------------------------------------
# Controls: each wrong procedure fails the check
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_control_plain_touch_falls_into_the_future_mtime_trap(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    stack = make_uwsgi_stack(vassals=2, link_mtime_offset=3600)
    run = reload_under_load(stack, procedure(stack, "plain-touch", 1, timeout=GIVE_UP))
    record_reload(run.row("control: plain touch, mtime in the future", 1))
    assert run.returncode != 0, run.output  # it waited for a reload that never came
    assert Broken.NOT_REPLACED in kinds(run, 1), run.check(1)


@pytest.mark.slow
def test_control_plain_touch_falls_into_the_same_second_trap(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    stack = make_uwsgi_stack(vassals=2)
    wrong = template("plain-touch", timeout=GIVE_UP)
    run, lost = reloads_twice_in_one_second(stack, wrong, record_reload, "control: same second")
    # Fooled, it may even exit 0: the emperor's registration of the trap's own touch looks like
    # the reload it asked for. Only the registered mtime tells.
    assert lost, run.output


@pytest.mark.slow
@pytest.mark.parametrize("minimum", [3])
def test_control_one_fewer_than_the_minimum_is_caught(
    make_uwsgi_stack: MakeStack, record_reload: Record, minimum: int
) -> None:
    """A dip that stays above zero: no request need fail, only the observer sees it."""
    stack = make_uwsgi_stack(vassals=4)
    run = reload_under_load(stack, procedure(stack, "one-fewer", minimum))
    record_reload(run.row(f"control: one fewer than {minimum}", minimum))
    assert run.returncode == 0, run.output
    assert Broken.BELOW_MINIMUM in kinds(run, minimum), run.check(minimum)
    assert run.observer.min_live == minimum - 1


@pytest.mark.slow
def test_control_exit_before_the_last_vassal_is_back_is_caught(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    stack = make_uwsgi_stack(vassals=3)
    run = reload_under_load(stack, procedure(stack, "early-exit", 1))
    record_reload(run.row("control: exit before back", 1))
    assert run.returncode == 0, run.output
    assert Broken.END_STATE in kinds(run, 1), run.check(1)


# ---------------------------------------------------------------------------------------------
# Several fastrouter keys: the minimum holds per key
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("minimum", [2])
def test_several_keys_each_keep_the_minimum(
    make_uwsgi_stack: MakeStack, reload_template: str, record_reload: Record, minimum: int
) -> None:
    stack = make_uwsgi_stack(**TWO_KEYS)
    name = f"two keys (4 + 3 vassals), minimum {minimum}"
    run = reload_loses_no_request(stack, reload_template, record_reload, minimum, name)
    seen = run.observer.min_live_by_key()
    assert set(seen) == {"domain.tld", "other.test"}
    assert min(seen.values()) >= minimum, seen


@pytest.mark.slow
def test_control_minimum_counted_over_all_keys_together_is_caught(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    stack = make_uwsgi_stack(**TWO_KEYS)
    run = reload_under_load(stack, procedure(stack, "all-keys", 1))
    record_reload(run.row("control: minimum over all keys", 1))
    assert Broken.BELOW_MINIMUM in kinds(run, 1), run.check(1)
    assert run.observer.min_live_by_key()["domain.tld"] == 0


# ---------------------------------------------------------------------------------------------
# Lock scope
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def two_copies_of_the_tool() -> Iterator[tuple[Path, Path]]:
    """The tool copied into two dirs, as two operators might each have put it on the server."""
    base = Path(tempfile.mkdtemp(prefix="ur-c-", dir="/tmp"))
    copies = []
    for name in ("ops", "deploy"):
        (base / name).mkdir()
        copies.append(Path(shutil.copy2(render.RELOAD_TOOL, base / name / "uwsgi_reload.py")))
    yield copies[0], copies[1]
    shutil.rmtree(base, ignore_errors=True)


def tool_args(stack: Stack, tool: Path, *extra: str) -> list[str]:
    return [sys.executable, str(tool), *stack.reload_command(*extra)[2:]]


@pytest.mark.slow
def test_two_copies_of_the_tool_on_one_emperor_second_exits_3(
    make_uwsgi_stack: MakeStack, two_copies_of_the_tool: tuple[Path, Path]
) -> None:
    """The lock is the emperor's, not the script's: another copy of the tool must wait its turn."""
    stack = make_uwsgi_stack(vassals=2, start_delay=1.0)
    first_copy, second_copy = two_copies_of_the_tool
    first = subprocess.Popen(
        tool_args(stack, first_copy, "--minimum-active-vassals", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert first.stdout is not None
        lines = []
        for line in first.stdout:  # the first run holds the lock once it triggered a reload
            lines.append(line)
            if "triggered" in line:
                break
        second = subprocess.run(
            tool_args(stack, second_copy, "--minimum-active-vassals", "1"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        rest, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 3, second.stdout + second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert first.returncode == 0, "".join(lines) + rest
    stack.wait_all_live(timeout=30)


@pytest.mark.slow
def test_two_emperors_reload_at_once(make_uwsgi_stack: MakeStack) -> None:
    """One run per emperor, not one run per machine: two emperors are reloaded side by side."""
    stacks = [make_uwsgi_stack(vassals=2, start_delay=1.0) for _ in range(2)]
    workers_before = [stack.worker_pids() for stack in stacks]
    runs = [
        subprocess.Popen(
            stack.reload_command("--minimum-active-vassals", "1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for stack in stacks
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    for stack, before in zip(stacks, workers_before):
        after = stack.worker_pids()
        assert all(not set(before[vid]) & set(after[vid]) for vid in before), (before, after)
