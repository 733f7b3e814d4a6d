"""Surge (``--max-surge``) on the real stack, under load: no capacity lost.

Every run goes through the same measurement as the zero-downtime suite (``reload_under_load``,
``ReloadRun.problems``), judged against the number of vassals N itself as the minimum: the
observer must never see fewer than N live nodes under the key, before, during or after the
reload. Each promise has its control: a wrong procedure the same check catches.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.procedures import with_fault
from tests.test_proof import procedure
from uwsgi_reload_harness.fleet import Fleet
from uwsgi_reload_harness.stack import Stack
from uwsgi_reload_loadtests.capacity import lost_capacity
from uwsgi_reload_loadtests.measure import (
    Broken,
    FreshStacks,
    ReloadRun,
    again,
    observed,
    reload_under_load,
    tool_command,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Record = Callable[[dict[str, object]], None]
MakeStack = Callable[..., Stack]
MakeFleet = Callable[..., Fleet]

#: Users for the broken deploy: enough that every vassal has requests queued (tests/test_drain.py).
BROKEN_USERS = 32


def surge_command(stack: Stack, minimum: int, surge: int, timeout: float = 60) -> list[str]:
    return tool_command(stack, minimum, "--max-surge", str(surge), "--timeout", f"{timeout:g}")


def lost(run: ReloadRun, vassals: int) -> float:
    return lost_capacity(run.live, vassals, *run.window())


def summary(run: ReloadRun, vassals: int) -> str:
    return (
        f"exit {run.returncode}, {run.load.total.failures} failed, observer min "
        f"{run.observer.min_live}, lost {lost(run, vassals):.3f} vassal-s, max "
        f"{run.load.during.max_ms:.0f} ms during"
    )


def report(run: ReloadRun) -> dict[str, Any]:
    assert run.tool_json is not None, run.output
    return dict(run.tool_json)


def twins(run: ReloadRun) -> list[dict[str, Any]]:
    return list(report(run)["twins"])


def clean(stack: Stack) -> list[str]:
    """What a run left of its twins: links or other files in the emperor dir, vassals the
    emperor still runs."""
    left = sorted(p.name for p in Path(stack.emperor_path).iterdir())
    wrong = [f"file {name}" for name in left if name not in stack.vassal_ids]
    wrong += [f"vassal {v}" for v in sorted(stack.emperor_vassals()) if v not in stack.vassal_ids]
    return wrong


def check_surged(run: ReloadRun, stack: Stack, vassals: int) -> list[str]:
    """The test's own checks (``verify``): every twin added, live, removed and gone; none left."""
    complaints = []
    if run.tool_json is not None:
        for twin in run.tool_json.get("twins", []):
            if twin["phase"] != "gone":
                complaints.append(f"twin {twin['name']} {twin['phase']}")
    return complaints + clean(stack)


def test_surge_reloads_a_lone_vassal_with_no_capacity_lost(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """N = 1, m = 1, K = 1: the key served by one vassal is never without a node."""
    stack = make_uwsgi_stack(vassals=1)
    # without surge the same minimum is refused, nothing touched
    refused = subprocess.run(stack.reload_command("--minimum-active-vassals", "1"), check=False)
    assert refused.returncode == 2
    command = surge_command(stack, 1, 1)
    run = observed(
        again(stack, command),
        "surge N=1 m=1 K=1",
        1,
        record_reload,
        verify=lambda r: check_surged(r, stack, 1),
    )
    print(summary(run, 1))
    assert run.returncode == 0, run.output
    assert run.check(1) == [], run.output
    assert sorted(run.replaced()) == sorted(stack.vassal_ids)
    assert run.observer.min_live >= 1
    assert lost(run, 1) == 0.0
    [twin] = twins(run)
    assert twin["phase"] == "gone" and twin["live"] is not None, twin
    triggered = min(float(v["triggered"]) for v in report(run)["vassals"])
    back = max(float(v["back"]) for v in report(run)["vassals"])
    assert float(twin["live"]) <= triggered and float(twin["removed"]) >= back
    assert clean(stack) == []


def test_control_twin_removed_before_its_original_is_back_is_caught(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """A surge done wrong (``reload_procedures.py early-surge``): the twin goes as the last
    original is touched. The observer sees the key without a node; requests may fail too."""
    stack = make_uwsgi_stack(vassals=1)
    run = reload_under_load(stack, procedure(stack, "early-surge", 1))
    record_reload(run.row("control: surge twin removed too early", 1))
    print(summary(run, 1))
    assert run.returncode == 0, run.output
    assert Broken.BELOW_MINIMUM in {p.kind for p in run.problems(1)}, run.check(1)
    assert run.observer.min_live == 0
    assert lost(run, 1) > 0
    assert clean(stack) == []


def test_surge_two_keeps_four_of_four(make_uwsgi_stack: MakeStack, record_reload: Record) -> None:
    """N = 4, m = 4, K = 2: never fewer than 4 live, and 2 originals may reload at once."""
    stack = make_uwsgi_stack(vassals=4)
    command = surge_command(stack, 4, 2)
    run = observed(
        again(stack, command),
        "surge N=4 m=4 K=2",
        4,
        record_reload,
        verify=lambda r: check_surged(r, stack, 4),
    )
    print(summary(run, 4))
    assert run.returncode == 0, run.output
    assert run.check(4) == [], run.output
    assert sorted(run.replaced()) == sorted(stack.vassal_ids)
    assert lost(run, 4) == 0.0
    assert len(twins(run)) == 2


def test_control_without_surge_four_vassals_fall_below_four(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """The tool at its best without surge (m = N - 1) still takes one node out: the same check
    against N catches it."""
    stack = make_uwsgi_stack(vassals=4)
    command = tool_command(stack, 3)
    run = reload_under_load(stack, command)
    record_reload(run.row("control: N=4 m=3 no surge, checked against 4", 4))
    print(summary(run, 4))
    assert run.returncode == 0, run.output
    # right for its own minimum (a coarse observer aside: the machine may be busy)
    assert {p.kind for p in run.problems(3)} <= {Broken.OBSERVER_GAP}, run.check(3)
    assert Broken.BELOW_MINIMUM in {p.kind for p in run.problems(4)}
    assert lost(run, 4) > 0


def broken_run(fresh: FreshStacks[Stack], command: Callable[[Stack], list[str]]) -> ReloadRun:
    stack = fresh()
    stack.deploy(version="v2", broken=True)
    return reload_under_load(stack, command(stack), users=BROKEN_USERS)


def test_broken_deploy_with_surge_touches_no_original(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """The twins load the new code first: it fails, so they never come up; the run stops before
    any original is touched, and no request fails."""
    fresh = FreshStacks(make_uwsgi_stack, vassals=2)
    run = observed(
        lambda: broken_run(fresh, lambda s: surge_command(s, 2, 1, timeout=5)),
        "surge broken deploy N=2 m=2 K=1",
        2,
        record_reload,
        all_replaced=False,
        expected_exit=1,
    )
    stack = fresh.current
    assert stack is not None
    print(summary(run, 2))
    assert run.returncode == 1, run.output
    assert "nothing was reloaded" in run.output
    assert sorted(run.kept_workers()) == stack.vassal_ids  # no original touched
    assert run.check(2, all_replaced=False) == [], run.output
    assert run.load.total.failures == 0
    [twin] = twins(run)
    assert twin["live"] is None and twin["phase"] == "gone", twin
    assert all(v["triggered"] is None for v in report(run)["vassals"])
    assert clean(stack) == []


def test_control_broken_deploy_without_surge_touches_an_original(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """Without surge the first original reloaded is the one to find the broken code: the same
    check ("every original kept its workers") fails."""
    fresh = FreshStacks(make_uwsgi_stack, vassals=2)
    run = broken_run(
        fresh,
        lambda s: tool_command(s, 1, "--timeout", "5"),
    )
    stack = fresh.current
    assert stack is not None
    record_reload(run.row("control: broken deploy, no surge", 2))
    print(summary(run, 2))
    assert run.returncode == 1, run.output
    assert sorted(run.kept_workers()) != stack.vassal_ids
    assert Broken.BELOW_MINIMUM in {p.kind for p in run.problems(2, all_replaced=False)}


def test_a_run_killed_mid_surge_is_cleaned_up_by_the_next(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """SIGKILL to the tool once its twin is live and its first original triggered; a second run
    finds the twin in the state file, drains and removes it, then surges and reloads again."""
    stack = make_uwsgi_stack(vassals=2)
    limits = ["--minimum-active-vassals", "2", "--max-surge", "1", "--timeout", "60"]
    command = with_fault("kill-and-rerun", stack.reload_command(*limits))
    run = observed(
        again(stack, command),
        "surge: SIGKILL mid-surge, second run",
        2,
        record_reload,
        verify=lambda r: check_surged(r, stack, 2),
    )
    print(summary(run, 2))
    assert run.returncode == 0, run.output
    assert run.check(2) == [], run.output
    assert sorted(run.replaced()) == sorted(stack.vassal_ids)
    assert lost(run, 2) == 0.0
    found = twins(run)
    assert [t["leftover"] for t in found] == [True, False], found
    assert all(t["phase"] == "gone" for t in found), found
    assert found[0]["name"] == "uwsgi_vassal_01.surge-1"
    assert clean(stack) == []


def test_ctrl_c_mid_surge_removes_the_twin_before_exiting(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """SIGINT once the twin is live and the first original triggered: nothing more starts, the
    twin is drained and removed only while the minimum holds without it, and the tool exits 130
    leaving no twin behind."""
    stack = make_uwsgi_stack(vassals=2)
    # without --json: the fault waits for the tool's "triggered" line on stdout
    tool = [part for part in surge_command(stack, 2, 1) if part != "--json"]
    command = with_fault("interrupt", tool)
    run = observed(
        again(stack, command),
        "surge: SIGINT mid-surge",
        2,
        record_reload,
        all_replaced=False,
        expected_exit=130,
        verify=lambda r: clean(stack),
    )
    print(summary(run, 2))
    assert run.returncode == 130, run.output
    assert run.check(2, all_replaced=False) == [], run.output
    assert lost(run, 2) == 0.0
    assert clean(stack) == []
    assert not (Path(stack.emperor_path) / ".uwsgi-reload-surge").exists()


def test_surge_on_a_fleet_is_per_host(make_uwsgi_fleet: MakeFleet, record_reload: Record) -> None:
    """Two hosts of two vassals each (configs named after their ports) behind two routers,
    rolled host after host with --max-surge 1 and the minimum at every node of the key: each
    host adds its own twin on a free port of its own address; never fewer than 4 live."""
    fleet = make_uwsgi_fleet(hosts=2, vassals=2, routers=2)
    command = fleet.reload_command(
        "--json", "--minimum-active-vassals", "4", "--max-surge", "1", "--timeout", "60"
    )
    run = observed(
        again(fleet, command), "surge on a fleet: 2 hosts x 2, K=1 m=4", 4, record_reload
    )
    print(summary(run, 4))
    assert run.returncode == 0, run.output
    assert run.check(4) == [], run.output
    assert lost(run, 4) == 0.0
    for host in fleet.hosts:
        left = sorted(p.name for p in host.emperor_path.iterdir())
        assert left == sorted(host.vassal_ids), left
        assert sorted(host.emperor_vassals()) == sorted(host.vassal_ids)
    # each host's twin: a port-named link on that host's address
    added = [line for line in run.output.splitlines() if ": added (twin of " in line]
    assert len(added) == 2, run.output
    assert all(line.split(": added")[0].strip().split()[-1].isdigit() for line in added), added


def test_surge_with_two_keys_each_served_by_one_vassal(
    make_uwsgi_stack: MakeStack, record_reload: Record
) -> None:
    """Two fastrouter keys, one vassal each: one twin per key, and neither key is ever without
    a node (the observer holds the minimum per key)."""
    stack = make_uwsgi_stack(vassals=1, extra_keys=(("other.test", 1),))
    run = observed(
        again(stack, surge_command(stack, 1, 1)),
        "surge: 2 keys x 1 vassal, K=1 m=1",
        1,
        record_reload,
        verify=lambda r: check_surged(r, stack, 1),
    )
    print(summary(run, 1))
    assert run.returncode == 0, run.output
    assert run.check(1) == [], run.output
    assert sorted(run.replaced()) == sorted(stack.vassal_ids)
    assert run.observer.min_live_by_key() == {stack.host: 1, "other.test": 1}
    assert len(twins(run)) == 2
