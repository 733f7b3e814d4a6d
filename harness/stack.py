"""One uWSGI stack under test: emperor + fastrouter + N vassals + nginx, from ``examples/``.

The fixtures and :func:`running_stack` (outside pytest) start stacks through a
:class:`StackRuntime`, a pytest-xprocess ``XProcess`` rooted in a short temp dir of its own.

:func:`start_stack` renders the examples into a short temp dir (:mod:`.render`), starts the
emperor (which runs the fastrouter and its subscription server, as the conf.d fragment says) and
nginx under pytest-xprocess, and returns a :class:`Stack` once real probes agree: the emperor
reports every vassal accepting, the fastrouter has a live node per vassal for the key, and nginx
answers 200 through to the app.

Stopping is not xprocess's ``terminate()``: it sends SIGTERM to the leaves of the tree first, and
SIGTERM to a uWSGI 2.0 master means *reload*: a vassal master respawns the worker it just lost
(a new pid, outside xprocess's list) and ignores the emperor's stop message, so the tree hangs
for 20 s and leaks the new worker. SIGINT to the emperor's master is uWSGI's shutdown: the
emperor stops every vassal ("RAGNAROK") and exits. Without --die-on-term, core/master.c maps
SIGTERM to reap_them_all (reload) and SIGINT to kill_them_all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import py  # type: ignore[import-untyped]  # pytest's py.path shim, what XProcess wants
import requests
from xprocess import ProcessStarter, XProcess

from uwsgi_reload import (
    EmperorVassal,
    StatsError,
    node_vassal_name,
    parse_emperor_stats,
    parse_fastrouter_stats,
    read_stats,
    touch,
    touch_mtime,
)

from . import render
from .render import KEY, Layout, Substitution

CONTROL_ENV = "UWSGI_RELOAD_DEMO_CONTROL"
POLL_INTERVAL = 0.1
STOP_TIMEOUT = 30.0


class StackError(RuntimeError):
    """The stack could not do what a test asked; the message carries the relevant log tails."""


class ProcessExitedWithError(StackError):
    """A process of the stack exited while it was starting or while the stack was waited on."""


class StackTimeout(StackError):
    """A probe did not succeed before its deadline."""


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """What a stack is made of; the pytest options give the defaults, fixtures override them."""

    vassals: int = 4
    app_dir: Path = render.EXAMPLES_DIR
    wsgi_file: str = render.DEFAULT_WSGI_FILE
    #: The vassal config every vassal links to, with the placeholders of the example's.
    vassal_config: Path = render.EXAMPLES_DIR / render.VASSAL_INI
    #: What the readiness probe and the load GET (with the fastrouter key as Host).
    health_path: str = "/"
    start_delay: float = 0.0
    #: seconds the demo app's view sleeps per request (a slow endpoint: requests queue in sockets)
    request_delay: float = 0.0
    #: More vassals under other fastrouter keys: ``(("other.test", 2),)`` adds two vassals whose
    #: config is the vassal config subscribing under ``other.test`` instead of its own key.
    extra_keys: tuple[tuple[str, int], ...] = ()
    #: Seconds added to now for the links' own mtime before the emperor starts: a positive value
    #: gives configs "from the future" (copied with preserved timestamps, a skewed clock), so the
    #: emperor's ``last_mod`` is ahead of the clock and a plain ``touch`` is ignored.
    link_mtime_offset: float = 0.0
    #: Recorded for tests that want to deploy a broken version (``stack.deploy(broken=True)``).
    broken_deploy: bool = False
    keep: bool = False
    start_timeout: float = 60.0

    @property
    def demo_app(self) -> bool:
        return self.app_dir.resolve() == render.EXAMPLES_DIR.resolve()

    def check(self) -> None:
        """Raise ValueError on a combination the harness cannot honour."""
        if self.vassals < 1:
            raise ValueError(f"vassals must be >= 1, not {self.vassals}")
        if any(count < 1 for _, count in self.extra_keys):
            raise ValueError(f"every extra key needs >= 1 vassal: {self.extra_keys}")
        if self.start_delay < 0:
            raise ValueError(f"start delay must be >= 0, not {self.start_delay}")
        if self.request_delay < 0:
            raise ValueError(f"request delay must be >= 0, not {self.request_delay}")
        if not self.app_dir.is_dir():
            raise ValueError(f"app dir {self.app_dir} is not a directory")
        wsgi = self.app_dir / self.wsgi_file
        if not wsgi.is_file():
            raise ValueError(f"wsgi file {wsgi} does not exist")
        if not self.vassal_config.is_file():
            raise ValueError(f"vassal config {self.vassal_config} is not a file")
        render.subscription_key(self.vassal_config.read_text())  # ValueError when it has none
        if not self.health_path.startswith("/"):
            raise ValueError(f"health path must start with /, not {self.health_path!r}")
        if not self.demo_app and (self.start_delay or self.request_delay or self.broken_deploy):
            raise ValueError(
                "start delay, request delay and broken deploy drive the demo app in examples/: "
                f"{self.app_dir} does not read {CONTROL_ENV}"
            )


# ---------------------------------------------------------------------------------------------
# Processes, from /proc (Linux): identity is (pid, start time), so a reused pid is not confused
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    start: int

    def alive(self) -> bool:
        stat = _proc_stat(self.pid)
        return stat is not None and stat[2] == self.start and stat[0] != "Z"


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # comm (field 2) may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _all_procs() -> dict[int, tuple[str, int, int]]:
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                procs[int(entry)] = stat
    return procs


def children(pids: set[int]) -> dict[int, list[int]]:
    """Live children of each pid, from the ppid field of /proc/*/stat."""
    found: dict[int, list[int]] = {pid: [] for pid in pids}
    for pid, (state, ppid, _) in sorted(_all_procs().items()):
        if ppid in found and state != "Z":
            found[ppid].append(pid)
    return found


def process_tree(root: int) -> set[Proc]:
    """``root`` and all its live descendants."""
    procs = _all_procs()
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in procs and procs[pid][0] != "Z":
            tree.add(Proc(pid, procs[pid][2]))
            todo += [p for p, (_, ppid, _) in procs.items() if ppid == pid]
    return tree


def stop_trees(
    roots: Sequence[int], sig: signal.Signals, timeout: float = STOP_TIMEOUT
) -> set[Proc]:
    """Send ``sig`` to each root only, wait for every tree to go, SIGKILL what stays.

    Descendants are collected on every poll, so a process respawned during shutdown is not missed.
    Several roots are stopped together (an emperor takes ~4 s to bury its vassals). Returns every
    process seen.
    """
    seen: set[Proc] = set().union(*(process_tree(root) for root in roots))
    for root in roots:
        with contextlib.suppress(ProcessLookupError):
            os.kill(root, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = seen.union(*(process_tree(root) for root in roots))
        if not any(p.alive() for p in seen):
            return seen
        time.sleep(POLL_INTERVAL)
    for proc in seen:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    return seen


def stop_tree(root: int, sig: signal.Signals, timeout: float = STOP_TIMEOUT) -> set[Proc]:
    """:func:`stop_trees` for one root."""
    return stop_trees([root], sig, timeout)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200 * lines))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------------


class ProcessGroup:
    """What a stack and a fleet share: the processes xprocess started for them, their logs, and
    waiting on probes while checking that none of those processes exited."""

    name: str
    config: Any
    layout: Layout
    xprocess: Any
    pids: dict[str, int]
    logs: dict[str, Path]

    def status(self) -> tuple[bool, str]:
        raise NotImplementedError

    def get(self, path: str | None = None, timeout: float = 10.0) -> requests.Response:
        raise NotImplementedError

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    def _xname(self, name: str) -> str:
        return f"{self.name}-{name}"

    def check_running(self) -> None:
        """Raise ProcessExitedWithError if a process of the group is gone."""
        for name in self.pids:
            if not self.xprocess.getinfo(self._xname(name)).isrunning():
                raise ProcessExitedWithError(
                    f"{name} of {self.kind} {self.name} exited\n{self.report()}"
                )

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll ``check`` until true; raise StackTimeout naming ``what`` (with log tails)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            if check():
                return
            if time.monotonic() > deadline:
                raise StackTimeout(f"waited {timeout:g} s for {what}\n{self.report()}")
            time.sleep(POLL_INTERVAL)

    def log_tail(self, name: str, lines: int = 30) -> str:
        return log_tail(self.logs[name], lines)

    def report(self, lines: int = 15) -> str:
        return "\n".join(
            f"--- {name} ({path}) ---\n{log_tail(path, lines)}"
            for name, path in self.logs.items()
            if path.exists()
        )

    def processes(self) -> set[Proc]:
        """Every live process of the group: the trees of the processes xprocess started."""
        return set().union(*(process_tree(pid) for pid in self.pids.values()))

    def _reap(self, pid: int) -> None:
        # xprocess keeps the Popen; wait on it so it neither stays a zombie nor warns when
        # collected (ResourceWarning: "subprocess is still running" is an error here).
        for resource in self.xprocess.resources:
            popen = getattr(resource, "popen", None)
            if popen is not None and popen.pid == pid:
                popen.wait(STOP_TIMEOUT)


@dataclasses.dataclass
class Stack(ProcessGroup):
    """A running stack. Socket paths come from the rendered conf.d fragment."""

    name: str
    config: StackConfig
    layout: Layout
    substitutions: list[Substitution]
    http_port: int
    vassal_ids: list[str]
    logs: dict[str, Path]
    xprocess: Any
    host: str = KEY  # the fastrouter key: nginx requests carry it as Host
    #: Vassal ids by fastrouter key: :attr:`host` first, then ``StackConfig.extra_keys``.
    keys: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: pid of each process xprocess started: ``emperor`` (the uWSGI master) and ``nginx``.
    pids: dict[str, int] = dataclasses.field(default_factory=dict)
    stopped: bool = False
    _options: dict[str, str] = dataclasses.field(default_factory=dict)

    # --- where things are ---------------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        return self.layout.base

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    @property
    def emperor_path(self) -> Path:
        return self.layout.vassals_dir

    @property
    def vassal_links(self) -> list[Path]:
        return [self.emperor_path / vid for vid in self.vassal_ids]

    def _option(self, name: str) -> str:
        if not self._options:
            text = self.layout.rendered(render.CONF_D).read_text()
            self._options = render.conf_d_options(text)
        return self._options[name]

    @property
    def emperor_stats(self) -> str:
        return self._option("emperor-stats-server")

    @property
    def fastrouter_stats(self) -> str:
        return self._option("fastrouter-stats-server")

    @property
    def subscription_server(self) -> str:
        return self._option("fastrouter-subscription-server")

    @property
    def fastrouter_socket(self) -> str:
        return self._option("fastrouter")

    @property
    def control_file(self) -> Path:
        return self.layout.control_file

    # --- probes -------------------------------------------------------------------------------

    def emperor_vassals(self) -> dict[str, EmperorVassal]:
        return parse_emperor_stats(read_stats(self.emperor_stats))

    def live_node_vassals(self, key: str | None = None) -> list[str]:
        """Vassal names (socket stems) of the live nodes for ``key`` (default :attr:`host`)."""
        return self.live_by_key().get(key or self.host, [])

    def live_by_key(self) -> dict[str, list[str]]:
        """Vassal names (socket stems) of the live nodes, by fastrouter key."""
        nodes = parse_fastrouter_stats(read_stats(self.fastrouter_stats))
        live: dict[str, list[str]] = {}
        for node in nodes:
            if node.live:
                live.setdefault(node.key, []).append(node_vassal_name(node.name))
        return {key: sorted(names) for key, names in live.items()}

    def live_nodes(self) -> int:
        return len(self.live_node_vassals())

    def vassal_pids(self) -> dict[str, int]:
        """Vassal master pid by vassal id, as the emperor reports them."""
        return {vid: v.pid for vid, v in self.emperor_vassals().items()}

    def worker_pids(self) -> dict[str, list[int]]:
        """Worker pids by vassal id: the children of each vassal master."""
        masters = self.vassal_pids()
        kids = children(set(masters.values()))
        return {vid: kids[pid] for vid, pid in masters.items()}

    def get(
        self, path: str | None = None, timeout: float = 10.0, host: str | None = None
    ) -> requests.Response:
        """GET ``path`` (default: the health path) through nginx, a fastrouter key as Host."""
        path = self.config.health_path if path is None else path
        return requests.get(
            self.url + path.lstrip("/"), headers={"Host": host or self.host}, timeout=timeout
        )

    def status(self, through_nginx: bool = True) -> tuple[bool, str]:
        """(every vassal accepting and live in the router [and nginx answers 200], a summary)."""
        try:
            vassals = self.emperor_vassals()
            accepting = sorted(vid for vid, v in vassals.items() if v.accepting)
            live = self.live_by_key()
        except StatsError as exc:
            return False, str(exc)
        expected = {
            key: sorted(node_vassal_name(vid) for vid in ids) for key, ids in self.keys.items()
        }
        live_counts = ", ".join(
            f"{len(live.get(key, []))}/{len(stems)} live nodes for {key}"
            for key, stems in expected.items()
        )
        summary = f"{len(accepting)}/{len(self.vassal_ids)} vassals accepting, {live_counts}"
        if accepting != sorted(self.vassal_ids) or live != expected:
            return False, summary
        if not through_nginx:
            return True, summary
        codes: list[object] = []
        for key in self.keys:
            try:
                codes.append(self.get(timeout=2.0, host=key).status_code)
            except requests.RequestException as exc:
                codes.append(type(exc).__name__)
        answered = ", ".join(map(str, codes))
        return all(code == 200 for code in codes), f"{summary}, nginx answered {answered}"

    def all_live(self) -> bool:
        return self.status()[0]

    def wait_all_live(self, timeout: float = 30.0) -> None:
        last = [""]

        def check() -> bool:
            ok, last[0] = self.status()
            return ok

        try:
            self.wait_for(check, f"all {len(self.vassal_ids)} vassals live", timeout)
        except StackTimeout as exc:
            raise StackTimeout(f"{exc.args[0]}\nlast status: {last[0]}") from None

    # --- acting on the stack ------------------------------------------------------------------

    def deploy(
        self,
        version: str | None = None,
        start_delay: float | None = None,
        broken: bool | None = None,
        request_delay: float | None = None,
    ) -> dict[str, Any]:
        """Rewrite the demo app's control file (atomically); vassals load it on their next start."""
        control: dict[str, Any] = json.loads(self.control_file.read_text())
        changes = {
            "version": version,
            "start_delay": start_delay,
            "broken": broken,
            "request_delay": request_delay,
        }
        control.update({k: v for k, v in changes.items() if v is not None})
        write_atomically(self.control_file, json.dumps(control))
        return control

    def touch(self, vassal_id: str) -> int:
        """Make the emperor reload one vassal: move its link's own mtime past ``last_mod``.

        The emperor compares whole seconds (``st_mtime > last_mod``) and, with --emperor-nofollow,
        lstat()s the link: touching the shared target would reload every vassal.
        """
        last_mod = self.emperor_vassals()[vassal_id].last_mod
        mtime = touch_mtime(time.time(), last_mod)
        touch(str(self.emperor_path / vassal_id), mtime)
        return mtime

    def reload_command(self, *extra: str) -> list[str]:
        """uwsgi_reload.py for this stack, as examples/uwsgi_reload.sh runs it."""
        return [
            sys.executable,
            str(render.RELOAD_TOOL),
            "--emperor-path",
            str(self.emperor_path),
            "--fastrouter-stats-socket",
            self.fastrouter_stats,
            "--emperor-stats-socket",
            self.emperor_stats,
            *extra,
        ]

    # --- logs and teardown --------------------------------------------------------------------

    def stop(self) -> set[Proc]:
        """Stop nginx, then the emperor (SIGINT: it stops its vassals); remove the base dir.

        Idempotent. Returns every process seen while stopping.
        """
        seen: set[Proc] = set()
        if self.stopped:
            return seen
        self.stopped = True
        # nginx: SIGQUIT is a graceful shutdown (workers finish their requests, then exit).
        signals = {"nginx": signal.SIGQUIT, "emperor": signal.SIGINT}
        for name in ("nginx", "emperor"):
            if name in self.pids:
                seen |= stop_tree(self.pids[name], signals[name])
                self._reap(self.pids[name])
        for name in ("nginx", "emperor"):
            shutil.rmtree(self.xprocess.getinfo(self._xname(name)).controldir, ignore_errors=True)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        return seen


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Starting
# ---------------------------------------------------------------------------------------------


def vassal_ids(n: int) -> list[str]:
    return [f"uwsgi_vassal_{i:02d}.ini" for i in range(1, n + 1)]


def prepare(config: StackConfig, uwsgi: str) -> Stack:
    """Render the examples into a new base dir: every file of the stack, no process yet."""
    config.check()
    layout = Layout(Path(tempfile.mkdtemp(prefix="ur-", dir="/tmp")))
    for directory in (layout.run_dir, layout.vassals_dir, layout.nginx_dir):
        directory.mkdir()
    port = render.free_port()
    subs = render.substitutions(
        layout,
        http_port=port,
        app_dir=config.app_dir.resolve(),
        wsgi_file=config.wsgi_file,
        python_built_in=render.python_built_in(uwsgi),
    )
    files = render.render_examples(layout, subs, vassal_config=config.vassal_config)
    vassal_text = files[render.VASSAL_INI].read_text()
    host = render.subscription_key(vassal_text)
    counts = [(host, config.vassals), *config.extra_keys]
    ids = vassal_ids(sum(count for _, count in counts))
    keys: dict[str, list[str]] = {}
    targets: dict[str, Path] = {host: files[render.VASSAL_INI]}
    unassigned = iter(ids)
    for key, count in counts:
        if key not in targets:
            targets[key] = layout.rendered(f"uwsgi_vassal.{key}.ini")
            targets[key].write_text(render.with_subscription_key(vassal_text, key))
        keys.setdefault(key, []).extend(next(unassigned) for _ in range(count))
    mtime = time.time() + config.link_mtime_offset
    for key, key_ids in keys.items():
        for vid in key_ids:
            # As the original README: ln -s .../uwsgi_vassal.ini /etc/uwsgi.d/uwsgi_vassal_NN.ini
            link = layout.vassals_dir / vid
            link.symlink_to(targets[key])
            if config.link_mtime_offset:
                os.utime(link, (mtime, mtime), follow_symlinks=False)
    layout.nginx_conf.write_text(
        render.nginx_config(
            files[render.NGINX_FRAGMENT].read_text(), layout, run_as_root=os.geteuid() == 0
        )
    )
    write_atomically(
        layout.control_file,
        json.dumps(
            {
                "version": "v1",
                "start_delay": config.start_delay,
                "broken": False,
                "request_delay": config.request_delay,
            }
        ),
    )
    conf = render.shell_assignments(files[render.CONF_D].read_text())
    logs = {
        "emperor": Path(conf["UWSGI_LOG_FILE"]),
        "nginx": layout.nginx_dir / "error.log",
        **{node_vassal_name(vid): layout.run_dir / f"{node_vassal_name(vid)}.log" for vid in ids},
    }
    return Stack(
        host=host,
        keys=keys,
        name=f"uwsgi-reload-{layout.base.name}",
        config=config,
        layout=layout,
        substitutions=subs,
        http_port=port,
        vassal_ids=ids,
        logs=logs,
        xprocess=None,
    )


def _starter(
    cmd: list[str], env: dict[str, str], check: Callable[[], bool], wait: float
) -> type[Any]:
    class Starter(ProcessStarter):  # type: ignore[misc]  # xprocess is untyped
        args = cmd
        timeout = wait

        def startup_check(self) -> bool:
            return check()

    Starter.env = env
    return Starter


def start_process(
    owner: ProcessGroup,
    name: str,
    cmd: list[str],
    env: dict[str, str],
    ready: Callable[[], bool],
    what: str,
) -> None:
    """Start one process of ``owner`` under xprocess; return once ``ready()``; fail fast if it
    exits while starting (``ProcessExitedWithError``), or at the deadline (``StackTimeout``),
    either with the log tails."""
    xname = owner._xname(name)
    kind = owner.kind

    def check() -> bool:
        if not owner.xprocess.getinfo(xname).isrunning():
            raise ProcessExitedWithError(
                f"{name} of {kind} {owner.name} exited while starting ({' '.join(cmd)})\n"
                f"{owner.report()}"
            )
        return ready()

    timeout = owner.config.start_timeout + owner.config.start_delay
    try:
        pid, logfile = owner.xprocess.ensure(
            xname, _starter(cmd, env, check, timeout), persist_logs=False
        )
    except TimeoutError:
        raise StackTimeout(
            f"{name} of {kind} {owner.name} not ready after {timeout:g} s: waited for {what}\n"
            f"last status: {owner.status()[1]}\n{owner.report()}"
        ) from None
    owner.pids[name] = pid
    owner.logs[f"{name}-stdout"] = Path(str(logfile))


def start_nginx(owner: ProcessGroup, nginx: str) -> None:
    """nginx in the foreground with the group's config; ready once it answers 200 through."""
    cmd = [
        nginx,
        "-p",
        str(owner.layout.nginx_dir),
        "-e",
        str(owner.logs["nginx"]),
        "-c",
        str(owner.layout.nginx_conf),
    ]

    def ready() -> bool:
        try:
            return owner.get(timeout=2.0).status_code == 200
        except requests.RequestException:
            return False

    start_process(owner, "nginx", cmd, dict(os.environ), ready, "HTTP 200 through nginx")


def start_stack(xprocess: Any, config: StackConfig) -> Stack:
    """Render, start the emperor then nginx, return once every vassal is live through nginx."""
    uwsgi, nginx = render.find_uwsgi(), render.find_nginx()
    stack = prepare(config, uwsgi)
    stack.xprocess = xprocess
    try:
        emperor_cmd = render.emperor_command(
            uwsgi, stack.layout.rendered(render.CONF_D).read_text()
        )
        # No bytecode written next to the app's sources: the app dir stays as it was.
        env = {**os.environ, CONTROL_ENV: str(stack.control_file), "PYTHONDONTWRITEBYTECODE": "1"}
        n = len(stack.vassal_ids)

        def emperor_ready() -> bool:
            return stack.status(through_nginx=False)[0]

        start_process(
            stack,
            "emperor",
            emperor_cmd,
            env,
            emperor_ready,
            f"{n} vassals accepting and live in the router",
        )
        start_nginx(stack, nginx)
        stack.wait_all_live(config.start_timeout)
    except BaseException:
        _stop_started(stack)
        raise
    return stack


def _stop_started(stack: Stack) -> None:
    """After a failed start: stop whatever xprocess started, even if ensure() did not return."""
    for name in ("emperor", "nginx"):
        info = stack.xprocess.getinfo(stack._xname(name))
        if name not in stack.pids and info.pid:
            stack.pids[name] = info.pid  # even if it exited: stop() reaps it
    stack.stop()


class _QuietLog:
    """xprocess prints every start to stdout by default; a command-line tool has its own lines."""

    def debug(self, msg: str, *args: object) -> None:
        pass


class StackRuntime:
    """Starts stacks under an ``XProcess`` of its own, rooted in a short temp dir.

    Neither pytest's cache (``.pytest_cache`` in the rootdir, which may be a team's app dir) nor
    any other dir outside ``/tmp/ur-*`` receives the processes' records and stdout logs. The
    fixtures and :func:`running_stack` both start stacks through one runtime.
    """

    def __init__(self) -> None:
        self.rootdir = Path(tempfile.mkdtemp(prefix="ur-x-", dir="/tmp"))
        # XProcess wants a py.path root and a config whose __dict__ it may stash log handles in.
        self.xprocess = XProcess(
            types.SimpleNamespace(), py.path.local(self.rootdir), log=_QuietLog()
        )

    def start(self, config: StackConfig) -> Stack:
        return start_stack(self.xprocess, config)

    def close(self, *, keep: bool = False) -> None:
        """Close the log handles ``ensure()`` keeps open; remove the root unless stacks are kept."""
        self.xprocess._force_clean_up()
        if not keep:
            shutil.rmtree(self.rootdir, ignore_errors=True)


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[Stack]:
    """A running stack outside pytest (a demo, a benchmark), stopped on the way out.

    The same :func:`start_stack` and :meth:`Stack.stop` as the fixtures, through a
    :class:`StackRuntime` removed with the stack's base dir however the block ends (an
    exception, Ctrl-C).
    """
    runtime = StackRuntime()
    try:
        stack = runtime.start(config)
        try:
            yield stack
        finally:
            stack.stop()
    finally:
        runtime.close()
