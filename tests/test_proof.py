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

pytestmark = [pytest.mark.e2e]

MakeStack = Callable[..., Stack]


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
