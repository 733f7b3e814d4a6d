"""``loadtests.cli``: how the demo and the benchmarks end (pure; no stack)."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import pytest

from uwsgi_reload_harness.stack import StackError
from uwsgi_reload_loadtests.cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    Quick,
    add_run_options,
    guarded,
    parse_sizes,
    resolve_quick,
    results_dir,
)


def test_guarded_passes_the_result_through() -> None:
    assert guarded("demo", lambda: 1, "stopped") == 1
    assert guarded("bench", lambda: None, "stopped") is None


def test_ctrl_c_and_sigterm_are_an_interrupt(capsys: pytest.CaptureFixture[str]) -> None:
    def ctrl_c() -> None:
        raise KeyboardInterrupt

    def sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal interrupts this

    before = signal.getsignal(signal.SIGTERM)
    assert guarded("bench", ctrl_c, "stacks stopped") == EXIT_INTERRUPTED
    assert guarded("bench", sigterm, "stacks stopped") == EXIT_INTERRUPTED
    assert signal.getsignal(signal.SIGTERM) == before
    assert capsys.readouterr().err == "interrupted: stacks stopped\n" * 2


def test_a_stack_error_is_a_one_line_failure(capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> None:
        raise StackError("nginx did not answer")

    assert guarded("demo", broken, "stopped") == EXIT_ERROR
    assert capsys.readouterr().err == "demo failed: nginx did not answer\n"


def test_results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert results_dir(tmp_path / "given", "bench") == tmp_path / "given"
    assert (tmp_path / "given").is_dir()
    monkeypatch.chdir(tmp_path)
    made = results_dir(None, "bench-drain")
    assert made.parent == Path("reports") and made.name.startswith("bench-drain-")
    assert made.is_dir()


def test_the_options_every_run_takes_are_declared_once() -> None:
    from uwsgi_reload_loadtests import bench, bench_drain, demo

    shared = {"--users", "--start-delay", "--reload-at", "--after-reload", "--results-dir"}
    for parser in (demo.build_parser(), bench.build_parser(), bench_drain.build_parser()):
        assert shared <= set(parser._option_string_actions), parser.prog
    args = demo.build_parser().parse_args([])
    assert (args.users, args.reload_at, args.after_reload, args.start_delay) == (8, 3.0, 3.0, 0.0)
    assert bench_drain.build_parser().parse_args([]).sizes == [4, 8]


def test_quick_defaults() -> None:
    from uwsgi_reload_loadtests import bench

    parser = bench.build_parser()
    normal = resolve_quick(parser.parse_args([]))
    assert (normal.sizes, normal.reload_at, normal.after_reload) == ([2, 4, 8, 16], 2.0, 1.5)
    quick = resolve_quick(parser.parse_args(["--quick"]))
    assert (quick.sizes, quick.reload_at, quick.after_reload) == ([2, 4], 1.0, 1.0)
    given = resolve_quick(parser.parse_args(["--quick", "--reload-at", "3", "--sizes", "8"]))
    assert (given.sizes, given.reload_at) == ([8], 3.0)


def test_a_quick_default_is_in_the_help() -> None:
    parser = argparse.ArgumentParser()
    add_run_options(parser, results="x", writes="x.md", reload_at=Quick(2.0, 1.0))
    assert "(default 2; --quick: 1)" in " ".join(parser.format_help().split())
    with pytest.raises(SystemExit):
        parser.parse_args(["--users", "0"])


@pytest.mark.parametrize("text", ["1", "2,x", ""])
def test_sizes_are_two_or_more(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_sizes(text)
