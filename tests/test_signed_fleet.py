"""Secured subscriptions end to end, on a real fleet under load: the routers run with
``subscriptions-sign-check``, every vassal signs its announces (``examples/fleet``), the tool
signs its drain (``--subscription-sign``), with a key pair made for the fleet.

- A rogue process sends an unsigned unsubscribe of every node to every router, every 50 ms, for
  the whole reload window: on the signed fleet nothing changes (zero failed, every node stays
  live); the control is the same rogue against an unsigned fleet, which it empties.
- The tool's signed drain under load (the playbook, with the inventory's ``subscription_sign``):
  zero failed, every worker replaced; each host's metrics file says so.
- A wrong key: the tool cannot know which key a router trusts, so it is not refused at the start;
  the router ignores its drain, the node stays live, and at the drain timeout the tool stops
  there: exit 1, "not drained", nothing touched, zero failed.
- Ctrl-C in the middle of a signed rollout: exit 130, the drained vassal is subscribed again
  (signed), the fleet comes back whole, and the metrics file says 130.
- What signing does not stop: a signed unsubscribe replayed a day later still works.

uWSGI has ``subscriptions-sign-check`` only when built with OpenSSL's headers: without them the
harness refuses to start a signed fleet and says how to build one (``fleet.check_signing``).
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import uwsgi_reload as ur
from uwsgi_reload_harness import render
from uwsgi_reload_harness.fleet import Fleet, FleetConfig, check_signing, running_fleet
from uwsgi_reload_loadtests.measure import Broken, again, observed, reload_under_load

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Record = Callable[[dict[str, object]], None]
MakeFleet = Callable[..., Fleet]
HOSTS, VASSALS, ROUTERS = 2, 2, 2
NODES = HOSTS * VASSALS
MINIMUM = 2
RATE = 300
#: Sends an unsigned unsubscribe of every node to every subscription server every 50 ms, for
#: the given seconds: what anything that can reach the routers' UDP port could send.
ROGUE = """
import json, sys, time
import uwsgi_reload as ur
seconds, servers = float(sys.argv[1]), json.loads(sys.argv[2])
key, names = sys.argv[3], sys.argv[4:]
nodes = [ur.Node(key=key, name=name, death_mark=False, ref=0) for name in names]
packets = [p.packet() for p in ur.subscriptions(ur.Command.UNSUBSCRIBE, nodes)]
end = time.monotonic() + seconds
while time.monotonic() < end:
    for server in servers:
        for packet in packets:
            ur.send_datagram(server, packet)
    time.sleep(0.05)
"""
ROGUE_SECONDS = 3.0


@pytest.fixture(scope="module")
def signed_fleet() -> Iterator[Fleet]:
    """One signed fleet for the module: each run starts with every node live."""
    try:
        check_signing(render.find_uwsgi())
    except render.MissingTool as exc:
        pytest.fail(f"uwsgi-reload harness: {exc}", pytrace=False)
    config = FleetConfig(hosts=HOSTS, vassals=VASSALS, routers=ROUTERS, signed=True)
    with running_fleet(config) as fleet:
        yield fleet


@pytest.fixture
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ur-sf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def rogue(fleet: Fleet) -> list[str]:
    servers = json.dumps([r.subscription_server for r in fleet.routers])
    names = fleet.expected_nodes()
    return [sys.executable, "-c", ROGUE, str(ROGUE_SECONDS), servers, fleet.host, *names]


def last_run(path: Path) -> dict[str, float]:
    """A metrics file read with prometheus_client's parser: every sample by name (without
    ``uwsgi_reload_last_run_``), an outcome's under ``vassals_<outcome>``."""
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            name = sample.name.removeprefix("uwsgi_reload_last_run_")
            if "outcome" in sample.labels:
                name += f"_{sample.labels['outcome'].replace(' ', '_')}"
            found[name] = sample.value
    return found


def test_a_rogue_unsigned_unsubscribe_of_every_node_changes_nothing_on_a_signed_fleet(
    signed_fleet: Fleet, record_reload: Record
) -> None:
    fleet = signed_fleet
    name = f"signed fleet {HOSTS}x{VASSALS}, {ROUTERS} routers: rogue unsigned unsubscribes"
    run = observed(
        again(fleet, rogue(fleet), rate=RATE), name, NODES, record_reload, all_replaced=False
    )
    assert run.returncode == 0, run.output
    # every node stayed live in every router the whole time, and nothing failed (the rogue
    # replaces no worker: the end state's "new workers" is not asked of it)
    problems = run.problems(NODES, all_replaced=False)
    assert [p for p in problems if p.kind is not Broken.END_STATE] == [], problems
    assert run.observer.min_live == NODES
    assert sorted(run.kept_workers()) == sorted(run.workers_before)


def test_control_the_same_rogue_empties_an_unsigned_fleet(
    make_uwsgi_fleet: MakeFleet, record_reload: Record
) -> None:
    fleet = make_uwsgi_fleet(hosts=HOSTS, vassals=VASSALS, routers=ROUTERS)
    run = reload_under_load(fleet, rogue(fleet), rate=RATE)
    name = f"control: unsigned fleet {HOSTS}x{VASSALS}: rogue unsigned unsubscribes"
    record_reload(run.row(name, NODES))
    assert run.returncode == 0, run.output
    kinds = {p.kind for p in run.problems(NODES, all_replaced=False)}
    assert {Broken.BELOW_MINIMUM, Broken.FAILED_REQUESTS} <= kinds
    assert run.observer.min_live == 0
    assert run.load.total.failures > 0


def test_the_signed_drain_reloads_the_fleet_under_load_losing_nothing(
    signed_fleet: Fleet, record_reload: Record, work_dir: Path
) -> None:
    fleet = signed_fleet
    command = fleet.playbook_command(work_dir, MINIMUM)
    name = f"signed fleet {HOSTS}x{VASSALS}, {ROUTERS} routers, playbook, signed drain"
    run = observed(again(fleet, command, rate=RATE), name, MINIMUM, record_reload)
    assert run.returncode == 0, run.output[-4000:]
    assert run.check(MINIMUM) == [], run.output[-4000:]
    assert sorted(run.replaced()) == sorted(run.workers_before)
    for host in fleet.hosts:
        done = last_run(fleet.metrics_file(work_dir, host))
        assert (done["exit_code"], done["success"]) == (0, 1), host.address
        assert done["vassals_reloaded"] == VASSALS
        assert done["vassals_failed"] == done["vassals_timed_out"] == 0
        assert done["live_nodes_min"] >= MINIMUM
        assert 0 < done["drain_wait_seconds_max"] <= done["drain_wait_seconds_sum"]


def test_a_wrong_key_stops_at_the_first_drain_touching_nothing(
    signed_fleet: Fleet, record_reload: Record, work_dir: Path
) -> None:
    fleet = signed_fleet
    wrong = work_dir / "wrong.key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(wrong), "2048"], check=True, timeout=60)
    metrics = work_dir / "run.prom"
    host = fleet.hosts[0]
    command = host.reload_command(
        "--minimum-active-vassals",
        str(MINIMUM),
        "--subscription-sign",
        f"SHA1:{wrong}",
        "--metrics-file",
        str(metrics),
    )
    name = "signed fleet: the tool with a key the routers do not trust"
    run = observed(
        again(fleet, command, rate=RATE, hosts=[host]),
        name,
        MINIMUM,
        record_reload,
        all_replaced=False,
        expected_exit=1,
    )
    assert run.returncode == 1, run.output[-4000:]
    assert run.check(MINIMUM, all_replaced=False) == [], run.output[-4000:]
    assert sorted(run.kept_workers()) == sorted(host.vassal_ids)  # nothing touched
    assert run.observer.min_live == NODES  # the drains were ignored: every node stayed live
    done = last_run(metrics)
    assert done["exit_code"] == 1
    assert done["vassals_reloaded"] == 0
    # stopped at the first drain: those drained are failed ("not drained"), the rest not started
    assert done["vassals_failed"] >= 1
    assert done["vassals_failed"] + done["vassals_not_started"] == VASSALS


def test_ctrl_c_in_a_signed_rollout_brings_the_fleet_back_and_says_130(
    signed_fleet: Fleet, work_dir: Path
) -> None:
    fleet = signed_fleet
    fleet.wait_all_live(timeout=60)
    host = fleet.hosts[1]
    metrics = work_dir / "run.prom"
    before = host.worker_pids()
    # one vassal at a time: interrupted after the first trigger, with the second not started
    minimum = NODES - 1
    command = host.reload_command(
        "--minimum-active-vassals", str(minimum), "--metrics-file", str(metrics)
    )
    tool = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        fleet.wait_for(
            lambda: any(host.worker_pids().get(vid) != pids for vid, pids in before.items()),
            f"a vassal of {host.address} reloading",
            60,
        )
        tool.send_signal(signal.SIGINT)
        output, _ = tool.communicate(timeout=60)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert tool.returncode == 130, output
    fleet.wait_all_live(timeout=60)  # drained or reloading, every node comes back
    done = last_run(metrics)
    assert done["exit_code"] == 130
    assert done["success"] == 0
    outcomes = ("reloaded", "in_flight", "not_started", "failed", "timed_out")
    assert sum(done[f"vassals_{o}"] for o in outcomes) == VASSALS
    assert done["vassals_not_started"] >= 1


def test_a_signed_unsubscribe_replayed_long_after_still_takes_its_node_out(
    signed_fleet: Fleet,
) -> None:
    """What signing does not stop (docs/fleet.md): the routers check an unsubscribe's signature
    and nothing more (plugins/corerouter/cr_common.c). One dated a day before now, far past the
    routers' 60 s tolerance (which only a new node's subscribe is held to), as a captured packet
    replayed later would be, still takes its node out of every router."""
    fleet = signed_fleet
    fleet.wait_all_live(timeout=60)
    name = fleet.expected_nodes()[0]
    node = ur.Node(key=fleet.host, name=name, death_mark=False, ref=0)
    spec = fleet.subscription_sign
    assert spec is not None
    sign = functools.partial(ur.openssl_sign, spec)
    [packet] = ur.subscriptions(ur.Command.UNSUBSCRIBE, [node])
    replayed = packet.packet(sign, now=time.time() - 86_400)
    for router in fleet.routers:
        ur.send_datagram(router.subscription_server, replayed)

    def gone() -> bool:
        return all(name not in r.live_by_key().get(fleet.host, []) for r in fleet.routers)

    fleet.wait_for(gone, f"{name} out of every router", 10)
