"""``loadtests.cli``: how the demo and the benchmarks end (pure; no stack)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from uwsgi_reload_harness.stack import StackError
from uwsgi_reload_loadtests.cli import EXIT_ERROR, EXIT_INTERRUPTED, guarded, results_dir


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
