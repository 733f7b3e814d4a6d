"""The harness: stacks come up from examples/, reload one vassal on a touch, leave nothing."""

from __future__ import annotations

import ast
import difflib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import psutil
import pytest
import requests

from uwsgi_reload_harness import render
from uwsgi_reload_harness.render import Layout, Substitution
from uwsgi_reload_harness.stack import Proc, ProcessExitedWithError, Release, Stack, StackConfig

MakeStack = Callable[..., Stack]


def unexplained_changes(example: str, rendered: str, subs: Sequence[Substitution]) -> list[str]:
    """Lines of the diff example -> rendered that no substitution explains.

    A dropped line must hold the ``old`` of a dropping substitution; a changed line must become
    its rendered self by the substitutions whose ``old`` it holds; no line may be added.
    """
    a, b = example.splitlines(), rendered.splitlines()
    drops = [s for s in subs if s.new is None]
    problems = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        kept = [line for line in a[i1:i2] if not any(s.applies_to(line) for s in drops)]
        added = b[j1:j2]
        if len(kept) != len(added):
            problems += [f"- {x}" for x in kept] + [f"+ {x}" for x in added]
            continue
        for old_line, new_line in zip(kept, added):
            applicable = [s for s in subs if s.new is not None and s.applies_to(old_line)]
            if not applicable or render.render_text(old_line, applicable) != new_line:
                problems += [f"- {old_line}", f"+ {new_line}"]
    return problems


def diff(example: str, rendered: str, name: str) -> str:
    return "".join(
        difflib.unified_diff(
            example.splitlines(keepends=True),
            rendered.splitlines(keepends=True),
            f"examples/{name}",
            f"rendered/{name}",
        )
    )


REPO_DIR = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Without processes
# ---------------------------------------------------------------------------------------------


def test_options_are_checked_only_when_a_stack_fixture_is_requested() -> None:
    """The installed plugin is inert: a bad option fails the tests that ask for a stack only."""
    with tempfile.TemporaryDirectory(prefix="ur-t-") as tmp:
        Path(tmp, "test_one.py").write_text(
            "def test_plain():\n    pass\n\n\ndef test_stack(uwsgi_stack):\n    pass\n"
        )
        done = subprocess.run(
            [
                *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE"),
                *("test_one.py", "--uwsgi-app-dir=/nonexistent/app"),
            ],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 passed, 1 error" in done.stdout, done.stdout
    assert "app dir /nonexistent/app is not a directory" in done.stdout


def test_an_app_dir_taken_for_the_rootdir_is_refused_before_anything_is_written() -> None:
    """``--uwsgi-app-dir /app`` (a space) when the app has a pytest config of its own: pytest
    takes /app for its rootdir (the first ini upwards of its path arguments) and would write its
    cache into the app; the plugin refuses."""
    with tempfile.TemporaryDirectory(prefix="ur-t-") as tmp:
        app, project = Path(tmp, "app"), Path(tmp, "project")
        app.mkdir()
        project.mkdir()
        (app / "wsgi.py").write_text("application = None\n")
        (app / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
        (project / "test_one.py").write_text("def test_one():\n    pass\n")
        args = [sys.executable, "-m", "pytest", "-q"]
        spaced = subprocess.run(
            [*args, "--uwsgi-app-dir", str(app)],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert spaced.returncode == pytest.ExitCode.USAGE_ERROR, spaced.stdout + spaced.stderr
        assert f"--uwsgi-app-dir={app}" in spaced.stderr
        assert sorted(p.name for p in app.iterdir()) == ["pyproject.toml", "wsgi.py"]
        with_equals = subprocess.run(
            [*args, f"--uwsgi-app-dir={app}"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert with_equals.returncode == 0, with_equals.stdout + with_equals.stderr
        assert sorted(p.name for p in app.iterdir()) == ["pyproject.toml", "wsgi.py"]


def test_the_fastrouter_key_comes_from_the_vassal_config() -> None:
    flask_config = (REPO_DIR / "tests" / "flask_app" / "vassal.ini").read_text()
    assert render.subscription_key(flask_config) == "flask.test"
    example = (render.EXAMPLES_DIR / render.VASSAL_INI).read_text()
    assert render.subscription_key(example) == render.KEY
    for text in ("[uwsgi]\nsocket = x.sock\n", f"{example}subscribe2 = server=a,key=other\n"):
        with pytest.raises(ValueError, match="exactly one key"):
            render.subscription_key(text)


def test_render_substitutes_placeholders_in_one_pass() -> None:
    layout = Layout(Path("/tmp/ur-unit"))
    subs = render.substitutions(
        layout, http_port=8080, python_built_in=True, user_group=("alice", "staff")
    )
    rendered = {
        name: render.render_text((render.EXAMPLES_DIR / name).read_text(), subs)
        for name in render.RENDERED_FILES
    }
    for name, text in rendered.items():
        example = (render.EXAMPLES_DIR / name).read_text()
        print(diff(example, text, name))
        assert unexplained_changes(example, text, subs) == [], name
        for placeholder in ("some_user", "some_group", "/some/project/dir", "/etc/uwsgi.d"):
            assert placeholder not in text, (name, placeholder)

    vassal = rendered[render.VASSAL_INI].splitlines()
    assert "_main_dir = /tmp/ur-unit/run" in vassal  # not /tmp/ur-unit/ur-unit/...: one pass
    assert "subscribe2 = server=/tmp/ur-unit/uwsgi_ss.sock,key=domain.tld" in vassal
    assert f"chdir = {render.EXAMPLES_DIR}" in vassal
    assert "uid = alice" in vassal
    assert not any(line.startswith("plugin") for line in vassal)

    nginx = rendered[render.NGINX_FRAGMENT]
    assert "listen 127.0.0.1:8080;" in nginx
    assert "443" not in nginx
    assert "server unix:///tmp/ur-unit/uwsgi.sock;" in nginx
    assert "#uwsgi_param UWSGI_FASTROUTER_KEY domain.tld;" in nginx  # the key stays commented

    cmd = render.emperor_command("uwsgi", rendered[render.CONF_D])
    assert cmd[:4] == ["uwsgi", "--master", "--fastrouter", "/tmp/ur-unit/uwsgi.sock"]
    assert cmd[-4:] == ["--emperor", "/tmp/ur-unit/vassals/", "--logto", "/tmp/ur-unit/emperor.log"]
    assert "--daemonize" not in cmd
    options = render.conf_d_options(rendered[render.CONF_D])
    assert options["emperor-stats-server"] == "/tmp/ur-unit/uwsgi_stats.sock"
    assert options["emperor-nofollow"] == ""

    # Every substitution is used by some example: none documents a change that cannot happen.
    examples = "".join((render.EXAMPLES_DIR / n).read_text() for n in render.RENDERED_FILES)
    assert [s.old for s in subs if s.old not in examples] == []


def test_render_keeps_plugin_line_for_distro_uwsgi_and_takes_other_apps() -> None:
    layout = Layout(Path("/tmp/ur-unit"))
    subs = render.substitutions(
        layout,
        http_port=8080,
        app_dir=Path("/srv/shop"),
        wsgi_file="shop/wsgi.py",
        python_built_in=False,
        user_group=("alice", "staff"),
    )
    vassal = render.render_text((render.EXAMPLES_DIR / render.VASSAL_INI).read_text(), subs)
    assert "plugin = python3" in vassal.splitlines()
    assert "chdir = /srv/shop" in vassal.splitlines()
    assert "wsgi-file = shop/wsgi.py" in vassal.splitlines()


def test_nginx_config_wraps_the_fragment() -> None:
    layout = Layout(Path("/tmp/ur-unit"))
    fragment = (render.EXAMPLES_DIR / render.NGINX_FRAGMENT).read_text()
    conf = render.nginx_config(fragment, layout, run_as_root=True)
    lines = [line.strip() for line in conf.splitlines()]
    assert "daemon off;" in lines
    assert "user root;" in lines
    assert "pid /tmp/ur-unit/nginx/nginx.pid;" in lines
    http = lines.index("http {")
    assert "access_log off;" in lines[http:]
    assert "user root;" not in render.nginx_config(fragment, layout, run_as_root=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vassals": 0}, "vassals must be >= 1"),
        ({"start_delay": -1.0}, "start delay must be >= 0"),
        ({"request_delay": -0.1}, "request delay must be >= 0"),
        ({"app_dir": Path("/nonexistent")}, "is not a directory"),
        ({"wsgi_file": "nope.py"}, "does not exist"),
        ({"app_dir": REPO_DIR, "wsgi_file": "conftest.py", "start_delay": 1.0}, "demo"),
        ({"releases": (Release("v1"), Release("v1"))}, "must differ"),
        ({"releases": (Release("v1/x"),)}, "one path component"),
        ({"releases": (Release("v1", app_dir=REPO_DIR),)}, "no ./wsgi.py"),
        (
            {
                "app_dir": REPO_DIR,
                "wsgi_file": "conftest.py",
                "releases": (Release("v1"), Release("v2", sick_after=3.0)),
            },
            "release v2: its behaviour drives the demo app",
        ),
    ],
)
def test_stack_config_rejects_bad_combinations(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StackConfig(**overrides).check()  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Real stacks
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_stack_serves_demo_app_through_nginx(uwsgi_stack: Stack) -> None:
    stack = uwsgi_stack
    response = stack.get()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == "v1"
    workers = stack.worker_pids()
    assert sorted(workers) == stack.vassal_ids
    assert all(len(pids) == 1 for pids in workers.values()), workers  # processes = 1
    assert body["pid"] in {pid for pids in workers.values() for pid in pids}
    # a stack is a fleet of one host and one router
    assert len(stack.hosts) == 1 and stack.hosts[0] is stack
    live = stack.live_nodes()
    assert list(live) == [stack.fastrouter_stats] == [r.stats for r in stack.routers]
    assert len(live[stack.fastrouter_stats][stack.host]) == len(stack.vassal_ids)
    assert len(stack.vassal_ids) == stack.config.vassals
    assert all(link.is_symlink() for link in stack.vassal_links)
    command = stack.reload_command("--timeout", "5")
    assert command[-2:] == ["--timeout", "5"]
    pairs = list(zip(command, command[1:]))
    assert ("--subscription-server", stack.subscription_server) in pairs  # drains by default
    assert ("--probe", stack.config.health_path) in pairs
    assert "--probe" not in stack.reload_command(drain=False)


@pytest.mark.e2e
def test_rendered_configs_differ_from_examples_only_by_substitutions(
    make_uwsgi_stack: MakeStack,
) -> None:
    stack = make_uwsgi_stack(vassals=1)
    for name in render.RENDERED_FILES:
        example = (render.EXAMPLES_DIR / name).read_text()
        rendered = stack.layout.rendered(name).read_text()
        print(diff(example, rendered, name))
        assert unexplained_changes(example, rendered, stack.substitutions) == [], name
    assert stack.vassal_links[0].resolve() == stack.layout.rendered(render.VASSAL_INI)


@pytest.mark.e2e
def test_touch_reloads_only_that_vassal_with_the_new_deploy(make_uwsgi_stack: MakeStack) -> None:
    stack = make_uwsgi_stack(vassals=3)
    target, *others = stack.vassal_ids
    masters = stack.vassal_pids()
    workers = stack.worker_pids()
    respawns = stack.emperor_vassals()[target].respawns

    stack.deploy(version="v2")
    stack.touch(target)
    stack.wait_for(
        lambda: stack.worker_pids()[target] not in ([], workers[target]) and stack.all_live(),
        f"{target} reloaded with a new worker and every vassal live again",
        timeout=30,
    )

    after = stack.worker_pids()
    assert set(after[target]).isdisjoint(workers[target])
    assert {v: after[v] for v in others} == {v: workers[v] for v in others}
    assert stack.vassal_pids() == masters  # a reload re-execs the vassal master in place
    assert stack.emperor_vassals()[target].respawns == respawns + 1

    # Only the reloaded vassal runs the new deploy.
    versions: dict[int, str] = {}
    for _ in range(60):
        body = stack.get().json()
        versions[body["pid"]] = body["version"]
        if len(versions) == len(stack.vassal_ids):
            break
    expected = {pid: "v2" if vid == target else "v1" for vid, pids in after.items() for pid in pids}
    assert versions == expected


@pytest.mark.e2e
def test_releases_switch_with_the_current_link(make_uwsgi_stack: MakeStack) -> None:
    """A stack with releases: the vassals run the one ``current`` points to; a deploy points it
    to another, and a vassal runs that from its next load; the revert command points it back.
    The demo app's releases misbehave as asked: sick, crashing, cold."""
    releases = (
        Release("v1"),
        Release("v2", sick_after=0.5, cold_requests=2),
        Release("v3", crash_after=0.5),
    )
    stack = make_uwsgi_stack(vassals=2, health_path="/health", releases=releases)
    first, second = stack.vassal_ids
    assert stack.releases == ["v1", "v2", "v3"] and stack.current_release == "v1"
    assert stack.control_file.parent.resolve() == stack.layout.releases_dir.resolve() / "v1"
    assert {a.json()["version"] for a in stack.answers("/").values()} == {"v1"}

    stack.deploy(release="v2")
    assert stack.current_release == "v2"
    workers = stack.worker_pids()
    stack.touch(first)
    stack.wait_for(
        lambda: stack.worker_pids()[first] not in ([], workers[first]) and stack.all_live(),
        f"{first} reloaded",
        timeout=30,
    )
    answers = [stack.answers("/")[first].json() for _ in range(3)]
    assert [a["version"] for a in answers] == ["v2"] * 3
    assert [a["cold"] for a in answers] == [True, True, False]  # its worker filled its cache
    assert stack.answers("/")[second].json()["version"] == "v1"
    # sick: /health answers 500 from 0.5 s after v2 loaded; / still answers 200
    stack.wait_for(lambda: stack.answers()[first].status == 500, "v2 sick", timeout=10)
    assert stack.answers("/")[first].status == 200

    subprocess.run(stack.release_command("v1"), shell=True, check=True)
    assert stack.current_release == "v1"
    with pytest.raises(ValueError, match="no release 'v9'"):
        stack.deploy(release="v9")

    # crash: the first request 0.5 s after v3 loaded kills the vassal; the Emperor restarts it
    stack.deploy(release="v3")
    masters = stack.vassal_pids()
    stack.touch(second)
    stack.wait_for(
        lambda: (
            stack.answers("/")[second].status is None
            and stack.vassal_pids().get(second, masters[second]) != masters[second]
        ),
        f"{second} on v3 crashed and restarted by the Emperor",
        timeout=30,
    )


@pytest.mark.e2e
def test_stop_leaves_no_process_no_socket_and_no_temp_dir(make_uwsgi_stack: MakeStack) -> None:
    stack = make_uwsgi_stack(vassals=2)
    running = stack.processes()
    vassal_masters = set(stack.vassal_pids().values())
    workers = {pid for pids in stack.worker_pids().values() for pid in pids}
    # uWSGI master, emperor, fastrouter, 2 vassal masters, 2 workers, nginx master and worker
    assert len(running) >= 9, running
    assert vassal_masters | workers <= {p.pid for p in running}
    base = stack.base_dir
    assert stack.logs["emperor-stdout"].is_relative_to(base)  # each process's output is there
    assert listening(stack.http_port)  # nginx

    seen = stack.stop()

    assert running <= seen
    assert [p for p in seen if p.alive()] == []
    assert not base.exists()  # the unix sockets were there
    assert _pids_mentioning(str(base)) == []
    assert not listening(stack.http_port)
    assert stack.stop() == set(), "stop is idempotent"


@pytest.mark.e2e
def test_a_process_exiting_while_starting_fails_fast_and_leaves_nothing(
    make_uwsgi_stack: MakeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:  # nginx cannot listen on a port already taken: it exits
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(render, "free_port", lambda: taken.getsockname()[1])
        with pytest.raises(ProcessExitedWithError, match="nginx of stack") as failure:
            make_uwsgi_stack(vassals=1)
    message = str(failure.value)
    assert "exited while starting" in message
    assert "--- nginx (" in message, "the error shows nginx's log tail"
    match = re.search(r"uwsgi-reload-(ur-\w+)", message)
    assert match, message
    base = f"/tmp/{match.group(1)}"
    assert not os.path.exists(base)
    assert [pid for pid in _pids_mentioning(base)] == []


def listening(port: int) -> bool:
    """Something listens on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.e2e
def test_a_kept_stack_outlives_pytest() -> None:
    """``--uwsgi-keep-stack``: the stack still serves after the run, which says how to stop it."""
    with tempfile.TemporaryDirectory(prefix="ur-t-") as tmp:
        Path(tmp, "test_keep.py").write_text("def test_stack(uwsgi_stack):\n    pass\n")
        args = ["test_keep.py", "--uwsgi-keep-stack", "--uwsgi-vassals=1"]
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    kept = re.search(r"kept stack (\S+) in (\S+): pids (\{.*\}) \(stop with", done.stdout)
    assert kept, done.stdout + done.stderr
    url, base, pids = kept[1], Path(kept[2]), ast.literal_eval(kept[3])
    processes = set().union(*(Proc.tree(pid) for pid in pids.values()))
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert requests.get(url, headers={"Host": render.KEY}, timeout=10).status_code == 200
        assert len(processes) >= 6, processes  # emperor's 3, vassal's 2, nginx's 2
    finally:
        os.kill(pids["nginx"], signal.SIGQUIT)
        os.kill(pids["emperor"], signal.SIGINT)
        deadline = time.monotonic() + 30
        while any(p.alive() for p in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)
    assert [p for p in processes if p.alive()] == []


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line holds ``text`` (a stack's base dir)."""
    processes = psutil.process_iter(["cmdline"])
    return [p.pid for p in processes if text in " ".join(p.info["cmdline"] or [])]
