"""What the demo and the benchmarks' command lines share: the options every run takes, exit
codes, the results dir, the machine and versions printed first, and how a stack failure or
Ctrl-C ends a run."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple

from uwsgi_reload import non_negative_float, positive_int
from uwsgi_reload_harness import render
from uwsgi_reload_harness.stack import Proc, Stack, StackError

from .runner import LoadRunError
from .tables import command_line, environment, environment_lines

EXIT_OK, EXIT_SOME_RUN_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


class Quick(NamedTuple):
    """An option's default, and its default with ``--quick``."""

    normal: Any
    quick: Any


def parse_sizes(text: str) -> list[int]:
    """``--sizes``: numbers of vassals, each 2 or more."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are whole numbers: {text!r}") from None
    if not sizes or any(n < 2 for n in sizes):
        raise argparse.ArgumentTypeError(f"every size must be 2 or more: {text!r}")
    return sizes


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _default(value: Any) -> tuple[Any, str]:
    """(the argparse default, its text for the help)."""
    if isinstance(value, Quick):
        return None, f"(default {_shown(value.normal)}; --quick: {_shown(value.quick)})"
    return value, f"(default {_shown(value)})"


def add_run_options(
    parser: argparse.ArgumentParser,
    *,
    results: str,
    writes: str,
    start_delay: float | Quick = 0.0,
    reload_at: float | Quick = 2.0,
    after_reload: float | Quick = 1.5,
    users: int = 8,
    sizes: Sequence[int] | Quick | None = None,
) -> None:
    """The options of a reload under load, the same for the demo and both benchmarks.

    ``results``: the name of the default results dir (``reports/<results>-<date>-<time>``);
    ``writes``: what goes there, for the help. A ``Quick`` default adds ``--quick``, and
    ``resolve_quick(args)`` picks the value; ``sizes`` adds ``--sizes``.
    """
    quick: dict[str, Quick] = {}

    def add(flag: str, kind: Callable[[str], Any], value: Any, text: str) -> None:
        default, shown = _default(value)
        action = parser.add_argument(flag, type=kind, default=default, help=f"{text} {shown}")
        if isinstance(value, Quick):
            quick[action.dest] = value

    if sizes is not None:
        add("--sizes", parse_sizes, sizes, "numbers of vassals, one stack each")
    add("--users", positive_int, users, "locust users (one connection each) through nginx")
    add("--start-delay", non_negative_float, start_delay, "seconds the app sleeps while loading")
    add("--reload-at", non_negative_float, reload_at, "seconds of load before the reload command")
    add("--after-reload", non_negative_float, after_reload, "seconds of load after it ends")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help=f"where {writes} go (default reports/{results}-<date>-<time>)",
    )
    if quick:
        parser.add_argument(
            "--quick", action="store_true", help="small sizes, fewer runs, shorter load"
        )
    parser.set_defaults(quick_defaults=quick)


def resolve_quick(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the options left at a ``Quick`` default, for ``--quick`` or not."""
    for dest, value in getattr(args, "quick_defaults", {}).items():
        if getattr(args, dest) is None:
            setattr(args, dest, value.quick if args.quick else value.normal)
    return args


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


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
