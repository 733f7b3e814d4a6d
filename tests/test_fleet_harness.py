"""The fleet harness: app hosts on their own loopback addresses behind one or two fastrouters."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from uwsgi_reload_harness import fleet as fleet_module
from uwsgi_reload_harness import render
from uwsgi_reload_harness.fleet import Fleet, FleetConfig, running_fleet
from uwsgi_reload_harness.stack import ProcessExitedWithError

pytestmark = [pytest.mark.e2e]

MakeFleet = Callable[..., Fleet]
NODE = re.compile(r"^127\.0\.0\.(\d+):(\d+)$")


def test_a_fleet_serves_through_nginx_and_every_router_lists_each_node_by_address(
    make_uwsgi_fleet: MakeFleet,
) -> None:
    fleet = make_uwsgi_fleet(hosts=2, vassals=2, routers=1)

    assert fleet.get().status_code == 200
    [router] = fleet.routers
    live = fleet.live_nodes()[router.stats][fleet.host]
    assert [h.address for h in fleet.hosts] == ["127.0.0.2", "127.0.0.3"]
    expected = sorted(h.node_name(vid) for h in fleet.hosts for vid in h.vassal_ids)
    assert live == expected == fleet.expected_nodes()
    assert all(NODE.match(name) for name in live), live
    for host in fleet.hosts:
        assert host.emperor_stats.startswith(f"{host.address}:")
        assert sorted(host.emperor_vassals()) == sorted(host.vassal_ids)
        assert all(len(pids) == 1 for pids in host.worker_pids().values())


def test_with_two_routers_every_node_is_live_in_both_and_commands_name_both(
    make_uwsgi_fleet: MakeFleet,
) -> None:
    fleet = make_uwsgi_fleet(hosts=2, vassals=2, routers=2)

    live = fleet.live_nodes()
    assert len(live) == 2
    assert [by_key[fleet.host] for by_key in live.values()] == [fleet.expected_nodes()] * 2
    assert fleet.get().status_code == 200
    command = fleet.hosts[1].reload_command("--timeout", "30")
    assert command[-2:] == ["--timeout", "30"]
    pairs = list(zip(command, command[1:]))
    stats = [value for flag, value in pairs if flag == "--fastrouter-stats-socket"]
    servers = [value for flag, value in pairs if flag == "--subscription-server"]
    assert stats == [r.stats for r in fleet.routers]
    assert servers == [r.subscription_server for r in fleet.routers]
    assert ("--emperor-stats-socket", fleet.hosts[1].emperor_stats) in pairs
    assert ("--emperor-path", str(fleet.hosts[1].emperor_path)) in pairs
    assert ("--probe", fleet.config.health_path) in pairs  # drain goes with a probe
    assert "--subscription-server" not in fleet.hosts[1].reload_command(drain=False)
    assert "--probe" not in fleet.hosts[1].reload_command(drain=False)
    sh, dash_c, script = fleet.reload_command("--timeout", "30")
    assert [sh, dash_c] == ["sh", "-c"]
    assert [shlex.split(part) for part in script.split(" && ")] == [
        h.reload_command("--timeout", "30") for h in fleet.hosts
    ]


def test_touching_one_link_on_host_2_reloads_that_vassal_and_it_comes_back_in_every_router(
    make_uwsgi_fleet: MakeFleet,
) -> None:
    fleet = make_uwsgi_fleet(hosts=2, vassals=2, routers=2)
    host = fleet.hosts[1]
    target = host.vassal_ids[0]
    before = fleet.worker_pids()
    assert sorted(before) == sorted(vid for h in fleet.hosts for vid in h.vassal_ids)

    host.touch(target)
    fleet.wait_for(
        lambda: host.worker_pids().get(target, before[target]) != before[target],
        f"new workers for {target} on {host.address}",
        30.0,
    )
    fleet.wait_all_live(30.0)

    after = fleet.worker_pids()
    assert [vid for vid, workers in after.items() if workers != before[vid]] == [target]
    node = host.node_name(target)
    assert fleet.node(node) == (host, target)
    for by_key in fleet.live_nodes().values():
        assert node in by_key[fleet.host]


def test_stop_leaves_no_process_and_no_dir(make_uwsgi_fleet: MakeFleet) -> None:
    fleet = make_uwsgi_fleet(hosts=2, vassals=1, routers=2)
    running = fleet.processes()
    workers = {pid for pids in fleet.worker_pids().values() for pid in pids}
    # per host: emperor master + emperor + vassal master + worker; per router: master + gateway;
    # nginx master + worker
    assert len(running) >= 2 * 4 + 2 * 2 + 2, running
    assert workers <= {p.pid for p in running}
    dirs = fleet.base_dirs
    assert all(d.is_dir() and d.name.startswith("ur-") for d in dirs)

    started = time.monotonic()
    seen = fleet.stop()
    took = time.monotonic() - started

    assert running <= seen
    assert [p for p in seen if p.alive()] == []
    assert [d for d in dirs if d.exists()] == []
    assert fleet.stop() == set(), "stop is idempotent"
    assert took < 20, f"stopping took {took:.1f} s"


def test_the_rendered_configs_differ_from_the_examples_by_substitutions_only(
    make_uwsgi_fleet: MakeFleet,
) -> None:
    fleet = make_uwsgi_fleet(hosts=1, vassals=1, routers=1)
    host = fleet.hosts[0]
    for name in (fleet_module.FLEET_VASSAL_INI, fleet_module.FLEET_CONF_D):
        example = (fleet_module.FLEET_DIR / name).read_text()
        rendered = host.layout.rendered(name).read_text()
        assert render.render_text(example, host.substitutions) == rendered
    text = host.layout.rendered(fleet_module.FLEET_VASSAL_INI).read_text()
    # one router: the line announcing to router 2 is dropped, router 1's names its server
    subscribes = re.findall(r"^subscribe2 = server=([^,]+),", text, re.MULTILINE)
    assert subscribes == [fleet.routers[0].subscription_server]
    assert "10.0." not in "".join(ln for ln in text.splitlines() if not ln.startswith(";"))


@pytest.mark.parametrize(
    ("config", "word"),
    [
        (FleetConfig(hosts=0), "hosts"),
        (FleetConfig(routers=3), "routers"),
        (FleetConfig(vassals=0), "vassals"),
    ],
)
def test_a_config_the_harness_cannot_honour_is_refused(config: FleetConfig, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        config.check()


def test_running_fleet_outside_pytest_stops_everything_and_removes_its_dirs() -> None:
    with running_fleet(FleetConfig(hosts=1, vassals=1, routers=1)) as fleet:
        assert fleet.get().status_code == 200
        running = fleet.processes()
        dirs = fleet.base_dirs
        assert fleet.logs["router-1-stdout"].parent in dirs  # each process's output is there

    assert [p for p in running if p.alive()] == []
    assert [d for d in dirs if d.exists()] == []
    assert [d for d in dirs if _pids_mentioning(str(d))] == []


def test_a_process_exiting_while_starting_fails_fast_and_leaves_nothing(
    make_uwsgi_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fleet_module._free_ports
    with socket.socket() as taken:  # nginx cannot listen on a port already taken: it exits
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        draws: list[int] = []

        def nginx_port_taken(address: str, count: int, used: set[int]) -> list[int]:
            draws.append(count)
            # the first port drawn is nginx's
            return [port] if len(draws) == 1 else real(address, count, used)

        monkeypatch.setattr(fleet_module, "_free_ports", nginx_port_taken)
        started = time.monotonic()
        with pytest.raises(ProcessExitedWithError, match="nginx of fleet") as failure:
            make_uwsgi_fleet(hosts=1, vassals=1, routers=1)
        took = time.monotonic() - started

    message = str(failure.value)
    assert "exited while starting" in message
    assert took < 30, f"failing took {took:.1f} s"
    bases = set(re.findall(r"/tmp/ur-\w+", message))
    assert len(bases) >= 2, "the fleet's dir and the host's, in the log tails"
    assert [b for b in bases if os.path.exists(b)] == []
    assert [b for b in bases if _pids_mentioning(b)] == []


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line holds ``text`` (a fleet's dir)."""
    processes = psutil.process_iter(["cmdline"])
    return [p.pid for p in processes if text in " ".join(p.info["cmdline"] or [])]


@pytest.mark.usefixtures("tool_only")
def test_the_tool_run_host_by_host_reloads_every_vassal_of_the_fleet(
    make_uwsgi_fleet: MakeFleet,
) -> None:
    fleet = make_uwsgi_fleet(hosts=2, vassals=2, routers=2)
    before = fleet.worker_pids()

    done = subprocess.run(
        fleet.reload_command("--timeout", "30"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    fleet.wait_all_live(30.0)
    after = fleet.worker_pids()
    unchanged = [vid for vid, workers in after.items() if set(workers) & set(before[vid])]
    assert unchanged == [], "every vassal of every host has new workers"


# ---------------------------------------------------------------------------------------------
# Signed fleets: rendering, and a uWSGI without OpenSSL
# ---------------------------------------------------------------------------------------------


def _prepared(config: FleetConfig) -> Fleet:
    return fleet_module.prepare(config, render.find_uwsgi())


def _remove(fleet: Fleet) -> None:
    for base in fleet.base_dirs:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("signed", [True, False])
def test_a_signed_fleet_renders_the_examples_keys_and_an_unsigned_one_drops_them(
    signed: bool,
) -> None:
    fleet = _prepared(FleetConfig(hosts=2, vassals=1, routers=2, signed=signed))
    try:
        checks = {r.config.read_text().count("subscriptions-sign-check =") for r in fleet.routers}
        [router_text] = checks
        host = fleet.hosts[0]
        vassal = host.layout.rendered(fleet_module.FLEET_VASSAL_INI).read_text()
        signs = re.findall(r"^subscribe2 = .*,sign=SHA1:(\S+)$", vassal, re.MULTILINE)
        if signed:
            key = Path(signs[0])
            assert router_text == 1
            assert len(signs) == 2 and set(signs) == {str(key)} and key.is_file()
            assert fleet.subscription_sign == f"SHA1:{key}"
            public = key.parent.parent / "subscription-keys" / f"{fleet.host}.pem"
            assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
            command = host.reload_command()
            pairs = list(zip(command, command[1:]))
            assert ("--subscription-sign", f"SHA1:{key}") in pairs
            assert "--subscription-sign" not in host.reload_command(drain=False)
        else:
            assert (router_text, signs, fleet.subscription_sign) == (0, [], None)
            assert "--subscription-sign" not in host.reload_command()
        for r in fleet.routers:  # strict either way: an unknown option stops the router
            assert "\nstrict = true\n" in r.config.read_text()
    finally:
        _remove(fleet)


def test_a_signed_fleet_with_a_uwsgi_built_without_openssl_is_refused_saying_how_to_fix_it(
    tmp_path: Path,
) -> None:
    # a uwsgi whose --help has no --subscriptions-sign-check, as a build without libssl-dev
    fake = tmp_path / "uwsgi"
    fake.write_text("#!/bin/sh\necho '    --wsgi-file    load .wsgi file'\n")
    fake.chmod(0o755)
    with pytest.raises(render.MissingTool, match="libssl-dev"):
        fleet_module.prepare(FleetConfig(hosts=1, vassals=1, signed=True), str(fake))
    assert fleet_module.sign_check_built_in(render.find_uwsgi())  # this suite's uwsgi has it
