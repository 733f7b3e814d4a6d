"""What the demo and the benchmarks' command lines share: exit codes, the results dir, the
machine and versions printed first, and how a stack failure or Ctrl-C ends a run."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable

from uwsgi_reload_harness import render
from uwsgi_reload_harness.stack import Proc, Stack, StackError

from .plot import command_line, environment, environment_lines
from .runner import LoadRunError

EXIT_OK, EXIT_SOME_RUN_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def results_dir(given: Path | None, name: str) -> Path:
    """``given``, or ``reports/<name>-<date>-<time>``; created."""
    results = given or Path("reports", time.strftime(f"{name}-%Y%m%d-%H%M%S"))
    results.mkdir(parents=True, exist_ok=True)
    return results


def print_environment(module: str, argv: Sequence[str]) -> list[str]:
    """Print and return the command, the machine and the versions (uWSGI and nginx found)."""
    lines = environment_lines(
        command_line(["-m", module, *argv]),
        environment(render.find_uwsgi(), render.find_nginx()),
    )
    for line in lines:
        print(line, flush=True)
    return lines


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the stack's ``finally`` blocks run."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def guarded(what: str, body: Callable[[], int | None], interrupted: str) -> int | None:
    """Run ``body`` with SIGTERM taken as Ctrl-C; its result, or the exit code of how it ended.

    Ctrl-C prints ``interrupted: <interrupted>`` and gives ``EXIT_INTERRUPTED``; a stack that
    would not come up, a failed load run or a missing tool prints ``<what> failed: ...`` and gives
    ``EXIT_ERROR``. The stacks have been stopped by then (their ``with`` blocks unwound).
    """
    try:
        with sigterm_as_interrupt():
            return body()
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (StackError, LoadRunError, render.MissingTool) as exc:
        print(f"{what} failed: {exc}", file=sys.stderr)
        return EXIT_ERROR


def stop_and_check(stack: Stack) -> tuple[set[Proc], set[Proc]]:
    """Stop the stack now; (every process seen, those still alive after stopping)."""
    seen = stack.processes() | stack.stop()
    return seen, {p for p in seen if p.alive()}
