"""Batches of hosts rolled together, each host with its share, on a real fleet under load.

Each host of a batch gets ``--max-unavailable (fleet_nodes - fleet_minimum) // B``: the B shares
never add up to more than the fleet may lose, whatever each host reads at the routers. The fleet
is 3 hosts x 3 vassals behind one router at a fleet minimum of 3, so 6 nodes may be out at once.
The observer reads the router every 2 ms; each run is held to the suite's one check.

- Every host's tool started at the same moment (``Fleet.together_command``: the closest race,
  without Ansible's start-up between hosts), each with a share of 2.
- ``examples/ansible/reload.yml -e batch=2``: hosts 1 and 2 together with a share of 3 each
  (together exactly 6 out), then host 3.
- The control: the race the shares remove, at its closest. Hosts rolled together without a
  share each take what the minimum allows of the fleet they read, and when they read it before
  any of them drains, each takes all of its own: ``reload_procedures.py own-host`` on every
  host at once decides from exactly that view (every other node live), and the same check fails
  with 0 live. The tool itself without shares races the same way only when the hosts read the
  routers within the same few milliseconds: how often that breaks the minimum is measured by
  the batch benchmark (``python -m uwsgi_reload_loadtests.bench_fleet``, 20 runs each, with
  and without shares; docs/fleet.md), not asserted here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from uwsgi_reload_harness.fleet import Fleet, FleetConfig, running_fleet, together
from uwsgi_reload_loadtests.measure import Broken, again, observed, reload_under_load

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Record = Callable[[dict[str, object]], None]
HOSTS, VASSALS, MINIMUM = 3, 3, 3
#: Requests per second over all users: unpaced, the load takes the cores from ansible-playbook.
RATE = 300
PROCEDURES = Path(__file__).with_name("reload_procedures.py")


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """One fleet for the module: each run starts with every node live (``again``)."""
    with running_fleet(FleetConfig(hosts=HOSTS, vassals=VASSALS, routers=1)) as running:
        yield running


@pytest.fixture
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ur-bt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def last_run(path: Path) -> dict[str, float]:
    """A host's metrics file (``--metrics-file``), read with prometheus_client's parser: the
    samples without labels but the emperor's, by name."""
    samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            if set(sample.labels) == {"emperor"}:
                samples[sample.name.removeprefix("uwsgi_reload_last_run_")] = sample.value
    return samples


def overlapping(metrics_files: Iterable[Path]) -> list[list[float]]:
    """The runs (start, from each metrics file) grouped by overlap in time, in order: hosts
    whose tools ran at the same time share a group."""
    spans = sorted(
        (run["start_timestamp_seconds"], run["end_timestamp_seconds"])
        for run in map(last_run, metrics_files)
    )
    groups: list[list[float]] = []
    end = float("-inf")
    for start, stop in spans:
        if start < end:
            groups[-1].append(start)
        else:
            groups.append([start])
        end = max(end, stop)
    return groups


def every_host(fleet: Fleet) -> list[str]:
    return sorted(vid for h in fleet.hosts for vid in h.vassal_ids)


def test_hosts_rolled_together_with_shares_keep_the_fleet_minimum_under_load(
    fleet: Fleet, record_reload: Record, work_dir: Path
) -> None:
    share = (HOSTS * VASSALS - MINIMUM) // HOSTS
    flags = ["--minimum-active-vassals", str(MINIMUM), "--max-unavailable", str(share)]
    command = fleet.together_command(*flags, out_dir=work_dir)
    name = f"fleet {HOSTS}x{VASSALS}, every host at once, share {share}, minimum {MINIMUM}"
    run = observed(again(fleet, command, rate=RATE), name, MINIMUM, record_reload)
    assert run.returncode == 0, run.output[-4000:]
    assert run.check(MINIMUM) == [], run.output[-4000:]
    assert run.observer.min_live >= MINIMUM
    assert sorted(run.replaced()) == every_host(fleet)
    # they did run together: each host's metrics file has its run's start and end
    files = [work_dir / f"{h.address}.prom" for h in fleet.hosts]
    assert [len(g) for g in overlapping(files)] == [HOSTS]


def test_the_playbook_rolls_batches_with_shares_under_load(
    fleet: Fleet, record_reload: Record, work_dir: Path
) -> None:
    batch = 2
    share = (HOSTS * VASSALS - MINIMUM) // batch
    command = fleet.playbook_command(work_dir, MINIMUM, batch=batch)
    name = f"fleet {HOSTS}x{VASSALS}, playbook batch {batch}, share {share}, minimum {MINIMUM}"
    run = observed(again(fleet, command, rate=RATE), name, MINIMUM, record_reload)
    assert run.returncode == 0, run.output[-4000:]
    assert run.check(MINIMUM) == [], run.output[-4000:]
    assert run.observer.min_live >= MINIMUM
    assert sorted(run.replaced()) == every_host(fleet)
    # hosts 1 and 2 ran together, then host 3; each host's metrics file says so
    files = [fleet.metrics_file(work_dir, h) for h in fleet.hosts]
    assert [len(g) for g in overlapping(files)] == [2, 1]
    for path in files:
        done = last_run(path)
        assert (done["exit_code"], done["success"]) == (0, 1), path


def test_control_hosts_rolled_together_each_from_the_whole_fleet_break_the_minimum(
    fleet: Fleet, record_reload: Record
) -> None:
    nodes = HOSTS * VASSALS
    router = fleet.routers[0].stats
    commands = [
        [
            sys.executable,
            str(PROCEDURES),
            "own-host",
            str(h.emperor_path),
            h.emperor_stats,
            router,
            "--minimum",
            str(MINIMUM),
            "--fleet-nodes",
            str(nodes),
        ]
        for h in fleet.hosts
    ]
    fleet.wait_all_live(timeout=60)
    run = reload_under_load(fleet, together(commands), rate=RATE)
    name = f"control: fleet {HOSTS}x{VASSALS}, every host at once, each from the whole fleet"
    record_reload(run.row(name, MINIMUM))
    assert run.returncode == 0, run.output[-4000:]
    assert Broken.BELOW_MINIMUM in {p.kind for p in run.problems(MINIMUM)}
    assert run.observer.min_live < MINIMUM


def test_a_host_started_while_other_hosts_reload_waits_for_room(fleet: Fleet) -> None:
    """Hosts 2 and 3 reload all their vassals (a share of 3 each: the 6 the fleet may lose),
    their app taking 5 s to load; host 1's tool starts while only its own 3 nodes are live.
    Nothing is wrong with its input: the minimum holds, and room comes back when hosts 2 and 3
    are done. Given its share (``--max-unavailable``, as the playbook gives every host of a
    batch), host 1's tool waits for that, at the start and between its reloads."""
    first, *others = fleet.hosts
    fleet.wait_all_live(timeout=60)
    fleet.deploy(hosts=others, start_delay=5.0)
    flags = ["--minimum-active-vassals", str(MINIMUM), "--timeout", "60"]
    rolling = subprocess.Popen(
        fleet.together_command(*flags, "--max-unavailable", "3", hosts=others),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        router = fleet.routers[0]
        fleet.wait_for(
            lambda: len(router.live_by_key().get(fleet.host, [])) == VASSALS,
            "hosts 2 and 3 out of rotation",
            30,
        )
        done = subprocess.run(
            first.reload_command(*flags, "--max-unavailable", "3"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rolling.wait(timeout=120) == 0
    finally:
        if rolling.poll() is None:
            rolling.kill()
            rolling.wait()
        fleet.deploy(hosts=others, start_delay=0.0)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-1000:]
    assert done.stdout.startswith("waiting up to 60s for room"), done.stdout[:2000]
