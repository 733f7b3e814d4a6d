"""The simulated fleet benchmark (``uwsgi_reload_loadtests.simulate_fleet``) on small fleets: the
tool's own run gives the exact makespan in reload times, keeps the minimum, and the simulator's
check of the minimum fails on a wrongly wired fleet (the control)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import uwsgi_reload as ur
from uwsgi_reload_loadtests import simulate_fleet as sf
from uwsgi_reload_loadtests.cli import EXIT_OK, EXIT_SOME_RUN_FAILED
from uwsgi_reload_loadtests.fleetsim import EVERY


@pytest.mark.parametrize(
    ("hosts", "vassals", "minimum", "at_once", "makespan"),
    [
        # 3 hosts of 4, minimum 4: each host's 4 go at once while the other 8 stay live
        (3, 4, 4, 4, 3),
        (3, 4, 8, 4, 3),  # F - N: exactly a whole host out at once
        (3, 4, 9, 3, 6),  # 3 of 4 at once: two rounds per host
        (3, 4, 10, 2, 6),
        (3, 4, 11, 1, 12),  # F - 1: one at a time, all along the fleet
        (2, 16, 1, 16, 2),
        (1, 4, 1, 3, 2),  # a single host: the tool alone, ceil(N / (N - m))
    ],
)
def test_small_fleets_take_exactly_the_bound(
    hosts: int, vassals: int, minimum: int, at_once: int, makespan: int
) -> None:
    scenario = sf.Scenario(hosts, vassals, minimum)
    assert (scenario.at_once, scenario.bound) == (at_once, makespan)
    result = sf.roll(scenario)
    assert result.exit_codes == [ur.EXIT_OK] * hosts
    assert result.ok and result.reloaded == hosts * vassals and result.reloaded_twice == 0
    assert result.makespan == makespan, result
    assert result.ratio == 1.0
    assert result.minimum_held, result.broken
    # the tool took every slot the minimum leaves: one host's at-once vassals down together
    assert min(result.fewest.values()) == hosts * vassals - at_once


@pytest.mark.parametrize("interval", [0.125, 0.5, 1.0])
def test_the_makespan_does_not_depend_on_the_poll_interval(interval: float) -> None:
    result = sf.roll(sf.Scenario(3, 4, 10, check_interval=interval))
    assert result.makespan == 6 and result.ok and result.minimum_held
    # one poll per interval and one more after each round's touches, per host run, and a few
    # at each host's start (how many is the start's business, not the schedule's)
    rounds, hosts = 2 * 3, 3
    per_rounds = rounds * (round(1 / interval) + 1)
    assert per_rounds + hosts <= result.polls <= per_rounds + 3 * hosts


def test_the_cpu_is_measured_per_poll() -> None:
    scenario = sf.Scenario(3, 4, 11)
    meter = sf.Meter(sf.fleet_of(scenario))
    result = sf.roll(scenario, meter)
    assert result.polls == len(meter.read_cpu) == len(meter.decide_cpu) > 0
    assert len(meter.start_cpu) == 3
    assert result.polls == len(meter.json_cpu)
    assert result.read_us >= result.json_us > 0 and result.decide_us > 0
    assert result.decide_max_us >= result.decide_us
    assert result.start_ms > 0


def test_two_routers_each_keep_the_minimum() -> None:
    result = sf.roll(sf.Scenario(3, 4, 8, routers=2))
    assert result.ok and result.makespan == 3
    assert result.minimum_held
    assert result.fewest == {"fr-a": 8, "fr-b": 8, EVERY: 8}


# ---------------------------------------------------------------------------------------------
# The control: the simulator's check of the minimum fails on a wrongly wired fleet
# ---------------------------------------------------------------------------------------------

#: Router B has only host 1's nodes (the other hosts never announce to it) and the tool is given
#: router A alone: in B the other hosts' nodes are not there to count.
MISWIRED = sf.Scenario(3, 4, 4, routers=2, tool_routers=1, hosts_in_last_router=1)


def test_control_a_router_the_tool_does_not_read_goes_below_the_minimum() -> None:
    result = sf.roll(MISWIRED)
    # the tool saw nothing wrong: router A kept 8 of 12
    assert result.exit_codes == [ur.EXIT_OK] * 3
    assert result.fewest["fr-a"] == 8
    # router B had host 1's 4 nodes only, and all 4 went at once
    assert not result.minimum_held
    assert result.fewest["fr-b"] == 0 and result.fewest[EVERY] == 0
    assert {b.place for b in result.broken} == {"fr-b", EVERY}
    assert min(b.at for b in result.broken) == 0.0


def test_given_both_routers_the_tool_refuses_the_miswired_fleet() -> None:
    result = sf.roll(sf.Scenario(3, 4, 4, routers=2, hosts_in_last_router=1))
    # router B counts 4 live for a minimum of 4: nothing could be reloaded, nothing is touched
    assert result.exit_codes == [ur.EXIT_USAGE]
    assert result.reloaded == 0 and result.minimum_held
    assert not result.ok


def test_the_check_sees_every_touch() -> None:
    """The check runs after each touch, not only at polls: a fleet taken below the minimum and
    back before the next poll is still caught."""
    fleet = sf.fleet_of(sf.Scenario(1, 2, 2))
    fleet.snapshot(ur.Options("e", "fr-a", "es"))
    fleet.touch("e/vassal_01.ini", 2_000_000)
    assert [(b.place, b.live) for b in fleet.broken] == [("fr-a", 1), (EVERY, 1)]


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def test_fit() -> None:
    line = sf.fit([(0.0, 100.0), (1000.0, 5100.0), (2000.0, 10100.0)])
    assert line is not None
    assert (round(line.intercept, 6), round(line.slope, 6)) == (100.0, 5.0)
    assert sf.fit([(1.0, 2.0)]) is None and sf.fit([(1.0, 2.0), (1.0, 3.0)]) is None


@pytest.mark.parametrize(
    ("token", "expected"),
    [("1", 1), ("7", 7), ("half", 24), ("F-N", 32), ("F-1", 47), ("F-4", 44)],
)
def test_minimum_for(token: str, expected: int) -> None:
    assert sf.minimum_for(token, 3, 16) == expected


@pytest.mark.parametrize("text", ["", "x", "F-x", "-3", "1,,y"])
def test_bad_minimums_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        sf.parse_minimums(text)


def test_scenarios_skip_a_minimum_that_leaves_nothing_and_repeats() -> None:
    args = sf.build_parser().parse_args(
        ["--hosts", "1,2", "--vassals", "4", "--minimums", "1,half,F-N,F-1,9"]
    )
    assert [(s.hosts, s.minimum, s.label) for s in sf.scenarios(args)] == [
        (1, 1, "1"),
        (1, 2, "half"),
        # F-N is 0 for one host; F-1 is 3
        (1, 0, "F-N"),
        (1, 3, "F-1"),
        (2, 1, "1"),
        (2, 4, "half"),  # F-N is 4 too
        (2, 7, "F-1"),
    ]


def test_the_table_carries_its_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--hosts", "2,3", "--vassals", "4", "--minimums", "4,F-1"]
    argv += ["--results-dir", str(tmp_path)]
    assert sf.main(argv) == EXIT_OK
    text = (tmp_path / "fleet-simulated.md").read_text()
    command = shlex.join([Path(sys.executable).name, "-m", sf.__name__, *argv])
    assert f"- command: {command}\n" in text
    assert command in capsys.readouterr().out
    table = [line.strip("| ").split(" | ") for line in text.splitlines() if line[:2] == "| "]
    header = table[0]
    rows = [row for row in table[2:] if len(row) == len(header)]  # the first table's
    column = {name: i for i, name in enumerate(header)}
    by_config = {(row[column["H"]], row[column["m"]]): row for row in rows}
    assert by_config[("3", "4")][column["makespan (reload times)"]] == "3"
    assert by_config[("3", "11")][column["makespan (reload times)"]] == "12"
    assert {row[column["minimum held"]] for row in by_config.values()} == {"yes"}
    assert (tmp_path / "fleet-simulated.json").is_file()


def test_the_command_fails_when_the_minimum_broke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sf, "scenarios", lambda args: [MISWIRED])
    assert sf.main(["--results-dir", str(tmp_path)]) == EXIT_SOME_RUN_FAILED
    assert "| NO |" in (tmp_path / "fleet-simulated.md").read_text()


def test_the_module_runs_as_a_command(tmp_path: Path) -> None:
    argv = ["--hosts", "2", "--vassals", "2", "--results-dir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", sf.__name__, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    command = shlex.join([Path(sys.executable).name, "-m", sf.__name__, *argv])
    assert (tmp_path / "fleet-simulated.md").read_text().splitlines()[2] == f"- command: {command}"
