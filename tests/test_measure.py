"""``measure.ReloadRun`` on scripted data: the tool's timeline, the fewest live nodes, and each
failed request placed against the reload's events (pure: no stack, no load)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, cast

import pytest

from uwsgi_reload_harness import render
from uwsgi_reload_harness.plugin import DEFAULT_TEMPLATE
from uwsgi_reload_loadtests import observer as observer_module
from uwsgi_reload_loadtests import report as report_module
from uwsgi_reload_loadtests.endstate import EndState
from uwsgi_reload_loadtests.measure import ReloadRun, reload_command, tool_report
from uwsgi_reload_loadtests.observer import RouterObserver, Sample
from uwsgi_reload_loadtests.report import (
    FailureAt,
    LoadReport,
    ReloadInfo,
    RequestRecord,
    build_report,
    group_failures,
)

LOAD_STARTED, LOAD_ENDED = 998.0, 1006.0
RELOAD = ReloadInfo("reload", started=1000.0, ended=1004.5, returncode=0, stdout="", stderr="")
#: The tool started 0.2 s after the command (its own start-up); its times are since then.
TOOL_JSON: dict[str, Any] = {
    "started": 1000.2,
    "vassals": [
        {"name": "v1", "triggered": 0.1, "accepting": 1.0, "back": 2.0, "duration": 1.9,
         "outcome": "reloaded"},
        {"name": "v2", "triggered": 2.05, "accepting": 3.0, "back": 4.0, "duration": 1.95,
         "outcome": "reloaded"},
    ],
}  # fmt: skip
# wall clock: v1 triggered 1000.3, back 1002.2; v2 triggered 1002.25, back 1004.2

OK = [RequestRecord(LOAD_STARTED + i * 0.01, 2.0, None) for i in range(800)]
FAILED = [
    RequestRecord(999.5, 1.0, "HTTP 502"),  # before the reload: fails 0.80 s before v1's trigger
    RequestRecord(1000.333, 10.0, "HTTP 502"),  # fails 1000.343: 0.04 s after v1 triggered
    RequestRecord(1000.353, 10.0, "HTTP 502"),
    RequestRecord(1000.403, 10.0, "HTTP 502"),
    RequestRecord(1002.053, 250.0, "ConnectionResetError"),  # fails 1002.303: near v2's trigger
]


def load_report(records: list[RequestRecord], reload: ReloadInfo | None = RELOAD) -> LoadReport:
    return LoadReport.from_dict(
        json.loads(
            json.dumps(
                build_report(
                    records,
                    started=LOAD_STARTED,
                    ended=LOAD_ENDED,
                    reload=reload,
                    host="http://127.0.0.1:1",
                    host_header=None,
                    users=4,
                )
            )
        )
    )


def observer(*samples: tuple[float, int]) -> RouterObserver:
    watched = RouterObserver("/nowhere", key="k")
    watched._started, watched._stopped = LOAD_STARTED, LOAD_ENDED
    watched._samples = [Sample(t, live, t) for t, live in samples]
    return watched


def make_run(
    records: list[RequestRecord] = OK + FAILED,
    *,
    tool_json: dict[str, Any] | None = TOOL_JSON,
    reload: ReloadInfo | None = RELOAD,
    samples: tuple[tuple[float, int], ...] = ((998.0, 2), (1000.35, 1), (1002.3, 2)),
) -> ReloadRun:
    return ReloadRun(
        load_report(records, reload),
        observer(*samples),
        {"v1": [1], "v2": [2]},
        {"v1": [3], "v2": [4]},
        tool_json=tool_json,
    )


def test_the_report_counts_every_failed_request_by_when_it_failed_and_its_kind() -> None:
    load = load_report(OK + FAILED)
    assert [(round(f.at, 2), f.kind, f.count) for f in load.failed] == [
        (999.5, "HTTP 502", 1),
        (1000.34, "HTTP 502", 1),
        (1000.36, "HTTP 502", 1),
        (1000.41, "HTTP 502", 1),
        (1002.3, "ConnectionResetError", 1),
    ]
    assert load.total.failures == len(FAILED)


def test_failures_in_the_same_bucket_are_counted_together() -> None:
    records = [
        RequestRecord(10.001, 1.0, "HTTP 502"),
        RequestRecord(10.003, 2.0, "HTTP 502"),
        RequestRecord(10.004, 2.0, "ConnectionResetError"),
        RequestRecord(10.000, 30.0, "HTTP 502"),  # ends in the bucket from 10.03
        RequestRecord(10.002, 1.0, None),
    ]
    assert report_module.failed_buckets(records, 0.01) == [
        {"at": 10.0, "kind": "ConnectionResetError", "count": 1},
        {"at": 10.0, "kind": "HTTP 502", "count": 2},
        {"at": 10.03, "kind": "HTTP 502", "count": 1},
    ]


def test_failures_are_placed_against_the_reload_and_the_nearest_vassal_event() -> None:
    failures = make_run().failures()
    assert [(f.kind, f.count) for f in failures] == [(r.failure, 1) for r in FAILED]
    assert [round(f.at, 2) for f in failures] == [-0.5, 0.34, 0.36, 0.41, 2.3]
    assert [f.event for f in failures] == [
        "v1 triggered",
        "v1 triggered",
        "v1 triggered",
        "v1 triggered",
        "v2 triggered",
    ]
    assert [round(f.from_event or 0, 2) for f in failures] == [-0.8, 0.04, 0.06, 0.11, 0.05]


def test_bursts_are_failures_of_one_kind_close_together() -> None:
    groups = make_run().failure_groups()
    # the failure before the reload is 0.84 s before the next, within BURST_GAP_S
    assert [(g.kind, g.count, g.first.event, g.last.event) for g in groups] == [
        ("HTTP 502", 4, "v1 triggered", "v1 triggered"),
        ("ConnectionResetError", 1, "v2 triggered", "v2 triggered"),
    ]
    assert [(round(g.first.at, 2), round(g.last.at, 2)) for g in groups] == [
        (-0.5, 0.41),
        (2.3, 2.3),
    ]
    assert round(groups[0].first.from_event or 0, 2) == -0.8
    assert round(groups[0].last.from_event or 0, 2) == 0.11


def test_a_pause_longer_than_the_gap_starts_a_new_burst() -> None:
    failures = make_run().failures()[1:4]
    assert [g.count for g in group_failures(failures, gap=1.0)] == [3]
    assert [g.count for g in group_failures(failures, gap=0.03)] == [2, 1]


def test_a_burst_spans_events_and_other_kinds_in_between() -> None:
    failures = [
        FailureAt("HTTP 502", 5, 0.3, "v1 triggered", 0.0),
        FailureAt("HTTP 502", 5, 0.8, "v1 triggered", 0.5),
        FailureAt("ConnectionResetError", 1, 0.9, "v1 triggered", 0.6),
        FailureAt("HTTP 502", 5, 1.5, "v2 back", -0.1),
    ]
    [outage, reset] = group_failures(failures)
    assert (outage.kind, outage.count, outage.first.at, outage.last.at) == (
        "HTTP 502",
        15,
        0.3,
        1.5,
    )
    assert (outage.first.event, outage.last.event) == ("v1 triggered", "v2 back")
    assert (reset.kind, reset.count, reset.first is reset.last) == ("ConnectionResetError", 1, True)


def test_every_burst_is_in_the_table_cell_and_the_json() -> None:
    run = make_run()
    groups = run.failure_groups()
    assert run.failures_text(limit=len(groups)) == "; ".join(g.text() for g in groups)
    data = run.as_json()
    assert [g["count"] for g in data["failure_groups"]] == [g.count for g in groups]
    assert [(f["kind"], f["count"]) for f in data["failed_requests"]] == [
        (r.failure, 1) for r in FAILED
    ]
    assert data["failed_requests"][1]["s_after_reload_start"] == pytest.approx(0.34)
    assert data["failed_requests"][1]["s_from_event"] == pytest.approx(0.04)
    assert run.row("point", 1)["failed when (s after the reload started)"] == run.failures_text(2)
    assert any(p.startswith("5 failed requests") for p in run.check(1))


def test_without_the_tools_timeline_failures_are_timed_from_the_reload_start() -> None:
    run = make_run(tool_json=None)
    assert run.timeline == []
    assert run.makespan is None
    failures = run.failures()
    assert [round(f.at, 2) for f in failures] == [-0.5, 0.34, 0.36, 0.41, 2.3]
    assert {f.event for f in failures} == {None}
    assert all(g.near() is None for g in run.failure_groups())


def test_no_failure_no_text() -> None:
    run = make_run(OK)
    assert run.failures() == []
    assert run.failures_text() == "-"


def test_the_timeline_is_wall_clock_and_gives_the_makespan() -> None:
    run = make_run()
    [v1, v2] = run.timeline
    assert v1.name == "v1"
    assert v1.triggered == pytest.approx(1000.3)
    assert v1.back == pytest.approx(1002.2)
    assert v2.took == pytest.approx(1.95)
    assert run.makespan == pytest.approx(1004.2 - 1000.3)
    assert run.durations() == [1.9, 1.95]
    assert run.all_reloaded
    assert run.replaced() == ["v1", "v2"]


def test_fewest_live_during_the_reload_counts_the_sample_before_it() -> None:
    assert make_run().min_live_during() == 1
    # the only dip is before the command started: the sample just before it (2) holds
    assert make_run(samples=((998.0, 0), (999.0, 2), (1005.0, 2))).min_live_during() == 2
    # a command killed at the end of the load: the window runs to the load's end
    killed = ReloadInfo("reload", started=1000.0, ended=None, returncode=None, stdout="", stderr="")
    run = make_run(reload=killed, samples=((998.0, 2), (1005.5, 0)))
    assert run.min_live_during() == 0
    assert run.returncode is None
    assert run.check(1) == ["the reload command did not finish while the load ran"]


def test_no_sample_before_the_reload_is_no_answer() -> None:
    run = make_run(samples=((1001.0, 2),))
    assert run.min_live_seen is None


@pytest.mark.parametrize(
    ("stdout", "found"),
    [
        (json.dumps(TOOL_JSON) + "\n", True),
        # a wrapper (faults.py) prints its own JSON after the tool's
        (json.dumps(TOOL_JSON) + '\n{"injected": true}\n', True),
        ('{"injected": true}\n', False),
        ("vassal v1: back after 1.9 s\n", False),
        ("", False),
    ],
)
def test_the_tools_report_is_the_last_json_with_vassals(stdout: str, found: bool) -> None:
    assert (tool_report(stdout) == TOOL_JSON) is found


# ---------------------------------------------------------------------------------------------
# The judge's own reading of the router, and the state at the command's exit
# ---------------------------------------------------------------------------------------------


def test_the_observer_counts_live_nodes_per_key_with_its_own_parser() -> None:
    document = {
        "subscriptions": [
            {"key": "a", "nodes": [{"name": "/r/1.sock", "death_mark": 0}]},
            {"key": "b", "nodes": [{"name": "/r/2.sock", "death_mark": 1}]},
            {"key": "a", "nodes": [{"name": "/r/3.sock", "death_mark": 0}]},
        ]
    }
    assert observer_module.live_by_key(document) == {"a": 2, "b": 0}
    with pytest.raises(observer_module.StatsReadError):
        observer_module.live_by_key({"vassals": []})  # an emperor's document, not a router's


def test_with_several_keys_a_sample_counts_the_key_with_fewest_nodes() -> None:
    documents = iter(
        [
            {"subscriptions": [{"key": "a", "nodes": [{"death_mark": 0}] * 3}]},  # b is gone
            {"subscriptions": [{"key": k, "nodes": [{"death_mark": 0}] * 2} for k in "ab"]},
        ]
    )
    watched = RouterObserver("/nowhere", keys=["a", "b"], reader=lambda address: next(documents))
    first, second = watched.sample_once(), watched.sample_once()
    assert first is not None and second is not None
    assert (first.live, second.live) == (0, 2)
    assert watched.min_live_by_key() == {"a": 2, "b": 0}


def end_state(**changes: Any) -> EndState:
    state = EndState(
        exit_code=0,
        at=1.0,
        accepting={"v_01.ini": True, "v_02.ini": True},
        workers={"v_01.ini": [11], "v_02.ini": [12]},
        live_nodes={"k": ["/run/v_01.sock", "/run/v_02.sock"]},
    )
    return dataclasses.replace(state, **changes)


@pytest.mark.parametrize(
    ("changes", "wrong"),
    [
        ({}, []),
        ({"exit_code": 1, "live_nodes": {}}, []),  # only an exit 0 claims the end state
        ({"live_nodes": {"k": ["/run/v_01.sock"]}}, ["v_02 not live in the router"]),
        ({"accepting": {"v_01.ini": True, "v_02.ini": False}}, ["v_02 not accepting"]),
        ({"accepting": {"v_01.ini": True}}, ["v_02 missing"]),
        ({"workers": {"v_01.ini": [11], "v_02.ini": [2]}}, ["v_02 on an old worker"]),
        ({"error": "ConnectionRefusedError"}, ["stats unreadable at exit: ConnectionRefusedError"]),
    ],
)
def test_the_end_state_at_exit_0(changes: dict[str, Any], wrong: list[str]) -> None:
    run = ReloadRun(
        cast(LoadReport, None),
        RouterObserver("/nowhere"),
        workers_before={"v_01.ini": [1], "v_02.ini": [2]},
        workers_after={"v_01.ini": [11], "v_02.ini": [12]},
        end_state=end_state(**changes),
    )
    assert run.end_state_problems() == wrong


def test_a_vassal_missing_after_the_reload_was_not_replaced() -> None:
    run = ReloadRun(
        cast(LoadReport, None),
        RouterObserver("/nowhere"),
        workers_before={"v_01.ini": [1], "v_02.ini": [2]},
        workers_after={"v_01.ini": [11]},
    )
    assert run.replaced() == ["v_01.ini"]


class _TemplateStack:
    """What :func:`reload_command` reads of a stack."""

    emperor_path = "/run/e/vassals"
    emperor_stats = "/run/e/stats.sock"
    fastrouter_stats = "/run/e/fr.sock"
    subscription_server = "/run/e/ss.sock"
    config = dataclasses.make_dataclass("Config", [("health_path", str)])("/healthz")


def test_the_default_template_drains_and_probes_the_health_path() -> None:
    command = reload_command(cast(Any, _TemplateStack()), DEFAULT_TEMPLATE, minimum=2, timeout=5)
    assert command[1] == str(render.RELOAD_TOOL)
    assert command[command.index("--subscription-server") + 1] == "/run/e/ss.sock"
    assert command[command.index("--probe") + 1] == "/healthz"
    assert command[command.index("--minimum-active-vassals") + 1] == "2"
    assert not [part for part in command if "{" in part or "}" in part]
