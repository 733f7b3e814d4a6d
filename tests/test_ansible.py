"""``examples/ansible/reload.yml``, run for real by ansible-playbook against a local fleet.

The fleet's hosts are loopback addresses (127.0.0.2, 127.0.0.3, ...) reached by a local
connection; the inventory has the variables of ``examples/ansible/inventory.sample.ini``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.stats_servers import StatsServer
from uwsgi_reload_harness.fleet import Fleet

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "examples" / "ansible" / "reload.yml"
SAMPLE_INVENTORY = REPO / "examples" / "ansible" / "inventory.sample.ini"
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
ENV = {**os.environ, "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_NOCOLOR": "1"}
#: What the playbook reads from the inventory: per host, then for the group.
HOST_VARS = {"emperor_stats"}
GROUP_VARS = {
    "emperor_path",
    "fleet_minimum",
    "fleet_nodes",
    "fastrouter_stats",
    "subscription_servers",
    "probe_path",
    "subscription_sign",
}

MakeFleet = Callable[..., Fleet]


def playbook(inventory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), *extra, str(PLAYBOOK)],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        check=False,
    )


def summary(stdout: str) -> list[str]:
    """The lines of the playbook's summary of the fleet."""
    start = stdout.index('"msg": [')
    return list(json.loads("{" + stdout[start : stdout.index("]", start) + 1] + "}")["msg"])


@pytest.fixture
def tool_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ur-ans-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def inventory_sections(text: str) -> dict[str, list[str]]:
    """The lines of each ``[section]`` of an INI inventory, comments left out."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif line and not line.startswith("#"):
            current.append(line)
    return sections


def test_the_sample_inventory_sets_what_the_playbook_reads() -> None:
    sections = inventory_sections(SAMPLE_INVENTORY.read_text())
    group_vars = {line.split("=", 1)[0] for line in sections["app:vars"]}
    assert group_vars >= GROUP_VARS
    for host in sections["app"]:
        assert {word.split("=", 1)[0] for word in host.split()[1:]} >= HOST_VARS, host
    text = PLAYBOOK.read_text()
    assert all(name in text for name in HOST_VARS | GROUP_VARS)


def test_the_playbook_passes_ansibles_syntax_check() -> None:
    done = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "--syntax-check", "-i", str(SAMPLE_INVENTORY), str(PLAYBOOK)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_the_playbook_reloads_the_fleet_host_by_host(
    make_uwsgi_fleet: MakeFleet, tool_dir: Path
) -> None:
    fleet = make_uwsgi_fleet(hosts=3, vassals=2, routers=2)
    before = fleet.worker_pids()
    inventory = tool_dir / "inventory.ini"
    inventory.write_text(fleet.ansible_inventory(tool_dir, minimum=4))
    done = playbook(inventory)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    after = fleet.worker_pids()
    kept = [vid for vid, pids in before.items() if set(pids) & set(after.get(vid, []))]
    assert kept == [], kept
    assert summary(done.stdout) == [f"{h.address}: 2/2 vassals reloaded, ok" for h in fleet.hosts]
    # the inventory's own variables win over the playbook's defaults: each host's copy went to
    # its tool_path, none to the default /usr/local/bin
    for h in fleet.hosts:
        copy = tool_dir / h.address / "uwsgi_reload.py"
        assert copy.read_bytes() == (REPO / "uwsgi_reload.py").read_bytes(), copy


@pytest.mark.e2e
@pytest.mark.slow
def test_a_failing_host_stops_the_rollout_there(
    make_uwsgi_fleet: MakeFleet, tool_dir: Path
) -> None:
    fleet = make_uwsgi_fleet(hosts=3, vassals=2, routers=1)
    first, failing, last = fleet.hosts
    before = fleet.worker_pids()
    inventory = tool_dir / "inventory.ini"
    # host 2's emperor stats point nowhere (a loopback port nothing listens on): the tool
    # refuses with exit 2 and touches nothing there
    text = fleet.ansible_inventory(tool_dir, minimum=2)
    inventory.write_text(text.replace(failing.emperor_stats, f"{failing.address}:1"))
    done = playbook(inventory)
    assert done.returncode != 0, done.stdout[-4000:]
    after = fleet.worker_pids()
    for host, reloaded in ((first, True), (failing, False), (last, False)):
        for vid in host.vassal_ids:
            assert (not set(before[vid]) & set(after[vid])) is reloaded, (host, vid)
    lines = summary(done.stdout)
    assert lines[0] == f"{first.address}: 2/2 vassals reloaded, ok"
    assert lines[1].startswith(f"{failing.address}: 0/0 vassals reloaded, failed: ")
    assert lines[2] == f"{last.address}: untouched (the rollout stopped before it)"
    assert f"the rollout stopped at {failing.address}" in done.stdout


# ---------------------------------------------------------------------------------------------
# Batches: refused before anything is touched
# ---------------------------------------------------------------------------------------------

#: 3 hosts x 3 vassals, a fleet minimum of 3: 6 nodes may be out at once, over the whole fleet.
BATCH_NODES, BATCH_MINIMUM = 9, 3


def batch_inventory(tool_dir: Path, router_stats: str, **group_vars: object) -> Path:
    """Three hosts whose emperors nothing answers for (the run must stop before asking them),
    one router at ``router_stats``."""
    hosts = [
        f"127.0.0.{i} ansible_connection=local ansible_python_interpreter={sys.executable} "
        f"emperor_stats=127.0.0.{i}:1 tool_path={tool_dir / str(i) / 'uwsgi_reload.py'}"
        for i in (2, 3, 4)
    ]
    variables = {
        "python": sys.executable,
        "emperor_path": tool_dir / "emperor",
        "fleet_minimum": BATCH_MINIMUM,
        "fleet_nodes": BATCH_NODES,
        "fastrouter_stats": json.dumps([router_stats]),
        "subscription_servers": json.dumps(["127.0.0.1:1"]),
        "tool_source": REPO / "uwsgi_reload.py",
        **group_vars,
    }
    lines = [f"{name}={value}" for name, value in variables.items() if value is not None]
    inventory = tool_dir / "inventory.ini"
    inventory.write_text("\n".join(["[app]", *hosts, "", "[app:vars]", *lines]) + "\n")
    return inventory


def failed_assertion(stdout: str) -> str:
    """The condition of the playbook's assert that failed (Ansible prints it as JSON)."""
    start = stdout.index("FAILED! => ") + len("FAILED! => ")
    return str(json.loads(stdout[start : stdout.index("\n", start)])["assertion"])


@pytest.mark.parametrize(
    ("batch", "group_vars", "assertion"),
    [
        # (9 - 3) // 7 = 0: no host could take a vassal out
        ("7", {}, "batch_n | int == 1 or share | int >= 1"),
        # not a number of hosts: the share would be worked out for nothing
        ("100%", {}, "batch_n | int >= 1"),
        ("2", {"fleet_nodes": None}, "batch_n | int == 1 or fleet_nodes is defined"),
    ],
)
def test_a_batch_without_a_share_is_refused_before_anything_is_touched(
    tool_dir: Path, batch: str, group_vars: dict[str, object], assertion: str
) -> None:
    inventory = batch_inventory(tool_dir, "127.0.0.1:1", **group_vars)
    done = playbook(inventory, "-e", f"batch={batch}")
    assert done.returncode != 0, done.stdout[-3000:]
    assert failed_assertion(done.stdout) == assertion, done.stdout[-3000:]
    assert sorted(p.name for p in tool_dir.iterdir()) == ["inventory.ini"]  # no copy of the tool


def router_stats(live: int, dead: int) -> bytes:
    """A fastrouter's stats with ``live`` live nodes and ``dead`` death-marked ones."""
    nodes = [
        {"name": f"127.0.0.2:{8000 + i}", "death_mark": int(i >= live)} for i in range(live + dead)
    ]
    document = {"subscriptions": [{"key": "domain.tld", "hits": 0, "nodes": nodes}]}
    return json.dumps(document).encode()


def test_a_batch_is_refused_while_a_router_counts_fewer_live_nodes_than_fleet_nodes(
    tool_dir: Path,
) -> None:
    """fleet_nodes says 9, a router has 8 live (one node down): shares of (9 - 3) // 3 = 2 could
    take 6 of the 8 out, 2 live of a minimum of 3. Nothing is touched: no copy of the tool."""
    router = StatsServer(None, lambda: router_stats(live=8, dead=1))
    try:
        done = playbook(batch_inventory(tool_dir, router.address), "-e", "batch=3")
    finally:
        router.close()
    assert done.returncode != 0, done.stdout[-3000:]
    assert "fatal: [127.0.0.2]" in done.stdout, done.stdout[-3000:]
    assert "has 8 live nodes of key domain.tld" in done.stdout, done.stdout[-3000:]
    assert sorted(p.name for p in tool_dir.iterdir()) == ["inventory.ini"]
