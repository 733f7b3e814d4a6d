"""``observed``: a run the observer watched too coarsely is measured again, and nothing else is.

Pure: scripted runs, no stack.
"""

from __future__ import annotations

import types
from typing import Any, cast

import pytest

from uwsgi_reload_loadtests.measure import ATTEMPTS, MAX_OBSERVER_GAP, ReloadRun, observed
from uwsgi_reload_loadtests.observer import RouterObserver, Sample
from uwsgi_reload_loadtests.report import FailedRequests, LoadReport, ReloadInfo


def _phase(requests: int, failures: int = 0) -> Any:
    kinds = {"502": failures} if failures else {}
    return types.SimpleNamespace(
        requests=requests, failures=failures, failures_by_kind=kinds, max_ms=10.0, p99=5.0
    )


def scripted_run(
    *,
    gap: float = 0.005,
    live: int = 2,
    during_failures: int = 0,
    after_failures: int = 0,
    returncode: int = 0,
) -> ReloadRun:
    """A clean run of 1 s, but for what the arguments change."""
    observer = RouterObserver("/nowhere", key="k")
    observer._started, observer._stopped = 0.0, 1.0
    # every 5 ms, but for one gap from 0.5 s
    times = [n * 0.005 for n in range(201) if not 0.5 < n * 0.005 < 0.5 + gap - 1e-9]
    observer._samples = [Sample(t, live, t) for t in times]
    failed = [FailedRequests(0.5, "502", during_failures)] if during_failures else []
    failed += [FailedRequests(0.95, "502", after_failures)] if after_failures else []
    load = types.SimpleNamespace(
        started=0.0,
        ended=1.0,
        failed=failed,
        reload=ReloadInfo(
            "reload", started=0.1, ended=0.9, returncode=returncode, stdout="", stderr=""
        ),
        total=_phase(1000, during_failures + after_failures),
        before=_phase(300),
        during=_phase(400, during_failures),
        after=_phase(300, after_failures),
    )
    return ReloadRun(cast(LoadReport, load), observer, {"v1": [1]}, {"v1": [2]})


def run_observed(runs: list[ReloadRun], **kwargs: Any) -> tuple[ReloadRun, list[str]]:
    script = iter(runs)
    rows: list[dict[str, object]] = []
    run = observed(lambda: next(script), "point", 1, rows.append, **kwargs)
    return run, [str(row["test"]) for row in rows]


BLIND = 0.04  # seconds without a sample, on the 5 ms grid of scripted_run


def test_a_clean_run_is_measured_once() -> None:
    clean = scripted_run()
    assert clean.check(1) == []
    assert run_observed([clean]) == (clean, ["point"])


def test_a_run_only_too_coarsely_watched_is_measured_again() -> None:
    blind, clean = scripted_run(gap=BLIND), scripted_run()
    assert BLIND > MAX_OBSERVER_GAP
    assert blind.check(1) == ["observer gap 40 ms"]
    assert run_observed([blind, clean]) == (clean, ["point", "point (attempt 2)"])


def test_at_most_attempts_runs_and_the_last_is_returned() -> None:
    runs = [scripted_run(gap=BLIND) for _ in range(ATTEMPTS + 1)]
    run, rows = run_observed(runs)
    assert run is runs[ATTEMPTS - 1]
    assert len(rows) == ATTEMPTS


@pytest.mark.parametrize(
    "broken",
    [
        {"during_failures": 3},  # a lost request is never measured away
        {"live": 0},  # nor a moment below the minimum
    ],
)
def test_a_coarse_run_with_another_problem_is_returned_at_once(broken: dict[str, int]) -> None:
    bad = scripted_run(gap=BLIND, **broken)
    assert run_observed([bad, scripted_run()]) == (bad, ["point"])


def test_failures_allowed_during_the_reload_only() -> None:
    blind_with_failures, clean = scripted_run(gap=BLIND, during_failures=3), scripted_run()
    run, rows = run_observed([blind_with_failures, clean], failures_allowed=True)
    assert run is clean and len(rows) == 2
    after = scripted_run(gap=BLIND, after_failures=3)
    assert run_observed([after, clean], failures_allowed=True) == (after, ["point"])


def test_a_blind_run_with_the_wrong_exit_code_is_not_measured_again() -> None:
    wrong = scripted_run(gap=BLIND, returncode=1)
    assert run_observed([wrong, scripted_run()]) == (wrong, ["point"])
    # an exit code the test expects does not stop the retries
    expected = scripted_run(gap=BLIND, returncode=130)
    clean = scripted_run(returncode=130)
    result = run_observed([expected, clean], expected_exit=130)
    assert result == (clean, ["point", "point (attempt 2)"])


def test_a_blind_run_the_test_itself_rejects_is_not_measured_again() -> None:
    blind = scripted_run(gap=BLIND)
    run, rows = run_observed([blind, scripted_run()], verify=lambda run: ["not what I expected"])
    assert (run, rows) == (blind, ["point"])
