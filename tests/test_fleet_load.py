"""Fleets under load: the Ansible playbook rolls 3 hosts of 4 vassals behind one or two routers
while locust loads nginx, the observer watching every router.

The playbook (``examples/ansible/reload.yml``) runs for real, host by host, against the fleet's
inventory (the hosts are loopback addresses reached by a local connection). Each run is held to
the suite's one check: no failed request, the fleet minimum held per key in every router, every
worker replaced, every vassal back when the command said so. The controls show the same check
catching what a fleet adds: a procedure that counts only its own host's vassals, and a broken
deploy (which must stop the rollout at its host, losing nothing, with drain).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from uwsgi_reload_harness.fleet import Fleet, FleetHost
from uwsgi_reload_loadtests.measure import (
    Broken,
    FreshStacks,
    ReloadRun,
    again,
    observed,
    reload_under_load,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MakeFleet = Callable[..., Fleet]
Record = Callable[[dict[str, object]], None]
PROCEDURES = Path(__file__).with_name("reload_procedures.py")
HOSTS, VASSALS = 3, 4
#: Requests per second over all users. Unpaced, the load takes both cores from ansible-playbook
#: (a reload of 3 hosts then took 35-50 s instead of 9) and from the observer.
RATE = 300


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """Where the inventory and each host's copy of the tool go (removed afterwards)."""
    path = Path(tempfile.mkdtemp(prefix="ur-fl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def vassals_of(hosts: Sequence[FleetHost]) -> set[str]:
    return {vid for h in hosts for vid in h.vassal_ids}


def last_run(path: Path) -> dict[str, float]:
    """A host's metrics file (the inventory's ``metrics_file``), read with prometheus_client's
    parser: every sample by name (``uwsgi_reload_last_run_`` left out), a vassal outcome's as
    ``vassals_<outcome>``."""
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            name = sample.name.removeprefix("uwsgi_reload_last_run_")
            if "outcome" in sample.labels:
                name += "_" + sample.labels["outcome"].replace(" ", "_")
            found[name] = sample.value
    return found


#: pairwise: each minimum and each router count once (a cell takes 1-3 minutes of CI)
@pytest.mark.parametrize(("minimum", "routers"), [(1, 1), (4, 2)])
def test_the_playbook_rolls_the_fleet_under_load_losing_nothing(
    make_uwsgi_fleet: MakeFleet, record_reload: Record, work_dir: Path, minimum: int, routers: int
) -> None:
    fleet = make_uwsgi_fleet(hosts=HOSTS, vassals=VASSALS, routers=routers)
    command = fleet.playbook_command(work_dir, minimum)
    name = f"fleet {HOSTS}x{VASSALS}, {routers} router(s), playbook, minimum {minimum}"
    run = observed(again(fleet, command, rate=RATE), name, minimum, record_reload)
    assert run.returncode == 0, run.output[-4000:]
    assert run.check(minimum) == [], run.output[-4000:]
    assert set(run.replaced()) == vassals_of(fleet.hosts)
    assert run.observer.min_live >= minimum
    # a playbook run under load leaves nothing behind
    dirs = fleet.base_dirs
    seen = fleet.processes() | fleet.stop()
    assert [p for p in seen if p.alive()] == []
    assert [d for d in dirs if d.exists()] == []
    # nothing the run started is left: no playbook, no tool, no locust, no end-state wrapper
    assert argv_mentions([str(work_dir), *map(str, dirs)]) == []
    # Ansible's temp dirs were its own run's, under the work dir, and it emptied them
    for temp in ("ansible-local", "ansible-remote"):
        assert not any(work_dir.joinpath(temp).glob("*")), temp


# ---------------------------------------------------------------------------------------------
# Control: counting only its own host
# ---------------------------------------------------------------------------------------------

#: 3 hosts of 3 vassals, a fleet minimum of 7: two nodes may be out at any moment.
OWN_HOSTS, OWN_VASSALS, OWN_MINIMUM = 3, 3, 7


def own_host_procedure(fleet: Fleet, hosts: Sequence[FleetHost], minimum: int) -> list[str]:
    """``reload_procedures.py own-host`` on each of ``hosts``, one after the other: waves of
    (fleet nodes - minimum) of its own vassals, taking every other node to be live."""
    total = len(fleet.expected_nodes())
    router = fleet.routers[0].stats
    steps = [
        f"{sys.executable} {PROCEDURES} own-host {h.emperor_path} {h.emperor_stats} {router} "
        f"--minimum {minimum} --fleet-nodes {total}"
        for h in hosts
    ]
    return ["sh", "-c", " && ".join(steps)]


def test_control_a_procedure_counting_only_its_own_host_is_caught(
    make_uwsgi_fleet: MakeFleet, record_reload: Record
) -> None:
    """One node of host 3 is out (drained for maintenance), 8 of 9 live, minimum 7: the tool
    reads the routers and reloads hosts 1 and 2 one vassal at a time; a procedure that counts
    only its own host takes two at a time, and the fleet drops to 6."""
    fleet = make_uwsgi_fleet(hosts=OWN_HOSTS, vassals=OWN_VASSALS, routers=1)
    rolled, out_host = fleet.hosts[:2], fleet.hosts[2]
    out = out_host.node_name(out_host.vassal_ids[0])
    fleet.take_out(out)
    live_left = len(fleet.expected_nodes()) - 1

    def rolled_live() -> bool:
        live = fleet.routers[0].live_by_key().get(fleet.host, [])
        return len(live) == live_left and out not in live

    def under_load(command: list[str]) -> Callable[[], ReloadRun]:
        def attempt() -> ReloadRun:
            fleet.wait_for(rolled_live, f"{live_left} live nodes, {out} out", 30)
            return reload_under_load(fleet, command, hosts=rolled, rate=RATE)

        return attempt

    tool = fleet.reload_command(
        "--minimum-active-vassals", str(OWN_MINIMUM), "--json", hosts=rolled
    )
    right = observed(under_load(tool), "fleet 8 of 9 live, the tool", OWN_MINIMUM, record_reload)
    assert right.returncode == 0, right.output
    assert right.check(OWN_MINIMUM) == [], right.output
    assert set(right.replaced()) == vassals_of(rolled)
    assert right.observer.min_live == OWN_MINIMUM  # one at a time, no more

    wrong_command = own_host_procedure(fleet, rolled, OWN_MINIMUM)
    wrong = under_load(wrong_command)()
    record_reload(wrong.row("control: fleet 8 of 9 live, own host only", OWN_MINIMUM))
    assert wrong.returncode == 0, wrong.output
    assert Broken.BELOW_MINIMUM in {p.kind for p in wrong.problems(OWN_MINIMUM)}
    assert wrong.observer.min_live == OWN_MINIMUM - 1


# ---------------------------------------------------------------------------------------------
# A broken deploy on host 2
# ---------------------------------------------------------------------------------------------

#: The demo app's start and per-request time: requests queue on every vassal (see test_drain).
START_DELAY, REQUEST_DELAY = 1.0, 0.01
#: Per vassal: host 1 reloads its 4 vassals together, each loading Django. Each emperor runs in a
#: session of its own, as a host of its own would (the scheduler shares the CPU between sessions
#: first): under this load its vassals took 3-6 s to load, so 5 s stopped the rollout at host 1.
BROKEN_USERS, BROKEN_MINIMUM, BROKEN_TIMEOUT = 16, 4, 10


def test_a_broken_deploy_on_host_2_stops_the_rollout_there_losing_nothing(
    make_uwsgi_fleet: MakeFleet, record_reload: Record, work_dir: Path
) -> None:
    fresh = FreshStacks(
        make_uwsgi_fleet,
        hosts=HOSTS,
        vassals=VASSALS,
        routers=2,
        start_delay=START_DELAY,
        request_delay=REQUEST_DELAY,
    )

    def broken_deploy() -> ReloadRun:
        fleet = fresh()
        fleet.deploy(hosts=[fleet.hosts[1]], version="v2", broken=True)
        command = fleet.playbook_command(work_dir, BROKEN_MINIMUM, timeout=BROKEN_TIMEOUT)
        return reload_under_load(fleet, command, users=BROKEN_USERS, rate=RATE)

    name = "fleet: broken deploy on host 2, drain"
    run = observed(
        broken_deploy, name, BROKEN_MINIMUM, record_reload, all_replaced=False, expected_exit=2
    )
    fleet = fresh.current
    assert fleet is not None
    first, broken, last = fleet.hosts
    assert run.returncode == 2, run.output[-4000:]  # ansible-playbook: a host failed
    assert f"the rollout stopped at {broken.address}" in run.output
    assert f"timed out after {BROKEN_TIMEOUT}s" in run.output  # the inventory's timeout
    assert f"{last.address}: untouched (the rollout stopped before it)" in run.output
    assert set(run.replaced()) == vassals_of([first])
    assert set(run.kept_workers()) == vassals_of([last])
    # drained first, host 2's vassals had no request queued when they went down
    assert run.check(BROKEN_MINIMUM, all_replaced=False) == [], run.output[-4000:]
    assert run.load.total.failures == 0
    # each host's metrics file: host 1 a good run, host 2 a failed one, host 3 none
    good, failed = (last_run(fleet.metrics_file(work_dir, h)) for h in (first, broken))
    assert (good["exit_code"], good["success"], good["vassals_reloaded"]) == (0, 1, VASSALS)
    assert (failed["exit_code"], failed["success"], failed["vassals_reloaded"]) == (1, 0, 0)
    assert failed["vassals_timed_out"] >= 1
    left = ("timed_out", "failed", "not_started", "in_flight")
    assert sum(failed[f"vassals_{outcome}"] for outcome in left) == VASSALS
    assert not fleet.metrics_file(work_dir, last).exists()


# ---------------------------------------------------------------------------------------------
# Teardown
# ---------------------------------------------------------------------------------------------


def argv_mentions(words: Sequence[str]) -> list[int]:
    """Pids of the processes whose command line mentions one of ``words``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = entry.joinpath("cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if any(word in argv for word in words):
                found.append(int(entry.name))
    return found
