"""``--metrics-file``: the run in Prometheus' text format, written atomically at the end of every
run (failed and interrupted ones too), read back here with prometheus_client's own parser."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import uwsgi_reload as ur
from tests.test_canary_logic import ReleaseSim, deploy
from tests.test_reload_logic import SimStack, run_on


def metrics(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, by name and labels (the emperor label left out)."""
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        assert family.type == "gauge", family
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "emperor"))
            found[sample.name, labels] = sample.value
    return found


def test_a_good_run(tmp_path: Path) -> None:
    out_file = tmp_path.parent / f"{tmp_path.name}.prom"
    stack = SimStack(["a.ini", "b.ini", "c.ini"])
    code, out = run_on(stack, tmp_path, minimum_active_vassals=1, metrics_file=str(out_file))
    assert code == ur.EXIT_OK, out
    m = metrics(out_file)
    assert m["uwsgi_reload_last_run_exit_code", ()] == 0
    assert m["uwsgi_reload_last_run_success", ()] == 1
    assert m["uwsgi_reload_last_run_vassals", (("outcome", "reloaded"),)] == 3
    assert m["uwsgi_reload_last_run_vassals", (("outcome", "timed out"),)] == 0
    assert m["uwsgi_reload_last_run_live_nodes_min", (("key", "k"),)] == 1
    start = m["uwsgi_reload_last_run_start_timestamp_seconds", ()]
    assert m["uwsgi_reload_last_run_end_timestamp_seconds", ()] >= start > 0
    assert [p.name for p in tmp_path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_run(tmp_path: Path) -> None:
    out_file = tmp_path.parent / f"{tmp_path.name}.prom"
    stack = SimStack(["a.ini", "b.ini"])
    stack.never_back = {"a.ini"}
    code, out = run_on(stack, tmp_path, timeout=2.0, metrics_file=str(out_file))
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    m = metrics(out_file)
    assert m["uwsgi_reload_last_run_exit_code", ()] == 1
    assert m["uwsgi_reload_last_run_success", ()] == 0
    assert m["uwsgi_reload_last_run_vassals", (("outcome", "timed out"),)] == 1
    assert m["uwsgi_reload_last_run_vassals", (("outcome", "not started"),)] == 1


def test_an_interrupted_run(tmp_path: Path) -> None:
    out_file = tmp_path.parent / f"{tmp_path.name}.prom"
    stack = SimStack(["a.ini", "b.ini", "c.ini"])
    stack.on_sleep.append((0.3, lambda: os.kill(os.getpid(), signal.SIGINT)))
    code, out = run_on(stack, tmp_path, metrics_file=str(out_file))
    assert code == ur.EXIT_INTERRUPTED, out
    assert metrics(out_file)["uwsgi_reload_last_run_exit_code", ()] == 130


def test_a_reverted_run_with_drain_and_probe(tmp_path: Path) -> None:
    out_file = tmp_path.parent / f"{tmp_path.name}.prom"
    stack = ReleaseSim("sick")
    code, out = deploy(stack, tmp_path, revert_command="revert", metrics_file=str(out_file))
    assert code == ur.EXIT_REVERTED, out
    m = metrics(out_file)
    assert m["uwsgi_reload_last_run_exit_code", ()] == 4
    assert m["uwsgi_reload_last_run_vassals_reverted", ()] == 1
    assert m["uwsgi_reload_last_run_drain_wait_seconds_max", ()] > 0


def test_bad_input_writes_its_exit_code_and_touches_nothing(tmp_path: Path) -> None:
    out_file = tmp_path / "run.prom"
    code = ur.main(
        [
            "--emperor-path",
            str(tmp_path / "missing"),
            "--emperor-stats-socket",
            "/nonexistent",
            "--fastrouter-stats-socket",
            "/nonexistent",
            "--metrics-file",
            str(out_file),
        ]
    )
    assert code == ur.EXIT_USAGE
    m = metrics(out_file)
    assert m["uwsgi_reload_last_run_exit_code", ()] == 2
    assert m["uwsgi_reload_last_run_vassals", (("outcome", "reloaded"),)] == 0
