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
    "fastrouter_stats",
    "subscription_servers",
    "probe_path",
}

MakeFleet = Callable[..., Fleet]


def playbook(inventory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), str(PLAYBOOK)],
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
