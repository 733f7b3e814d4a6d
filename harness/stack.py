"""One uWSGI stack under test: emperor + fastrouter + N vassals + nginx, from ``examples/``.

:func:`start_stack` renders the examples into a short temp dir (:mod:`.render`), starts the
emperor (which runs the fastrouter and its subscription server, as the conf.d fragment says) and
nginx, and returns a :class:`Stack` once real probes agree: the emperor reports every vassal
accepting, the fastrouter has a live node per vassal for each key, and nginx answers 200 through
to the app.

A stack is a fleet of one host and one router: a :class:`Stack` is its own only :class:`Host`
and has one :class:`Router`, and answers what a :class:`.fleet.Fleet` answers, with the same
meaning (:class:`ProcessGroup`).

A stack made with releases (:class:`Release`) runs the one its ``current`` link points to, as a
deploy with a release directory per version does: ``deploy(release=NAME)`` points the link
elsewhere, ``release_command(NAME)`` is the same as a shell command (a team's way back), and
``answers(path)`` asks every vassal straight on its socket which release its worker runs.

Each process runs under a mirakuru executor (:class:`Process`), which polls its readiness probe
and fails at once if it exits while starting. It is stopped with SIGINT, uWSGI's shutdown: the
emperor stops every vassal ("RAGNAROK") and exits. SIGTERM (what xprocess sends) means *reload*
to a uWSGI 2.0 master: core/master.c maps it to reap_them_all without --die-on-term, and SIGINT
to kill_them_all. nginx stops gracefully on SIGQUIT.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import mirakuru
import psutil
import requests
from mirakuru.base import ENV_UUID
from mirakuru.exceptions import ProcessFinishedWithError

from uwsgi_reload import (
    EmperorVassal,
    PacketError,
    StatsError,
    listening_sockets,
    node_vassal_name,
    parse_emperor_stats,
    parse_fastrouter_stats,
    parse_status_line,
    probe_request,
    read_stats,
    touch,
    touch_mtime,
)

from . import render
from .render import KEY, Layout, Substitution

CONTROL_ENV = "UWSGI_RELOAD_DEMO_CONTROL"
POLL_INTERVAL = 0.1
STOP_TIMEOUT = 30.0


#: The demo app's control file in a release's directory (``some_proj/deploy.py`` reads it).
CONTROL_NAME = "control.json"


class StackError(RuntimeError):
    """The stack could not do what a test asked; the message carries the relevant log tails."""


class ProcessExitedWithError(StackError):
    """A process of the stack exited while it was starting or while the stack was waited on."""


class StackTimeout(StackError):
    """A probe did not succeed before its deadline."""


@dataclasses.dataclass(frozen=True)
class Release:
    """One version of the app a stack can run: a directory of its own, ``<base>/releases/<name>``,
    holding a link to each entry of ``app_dir`` (default: the stack's app dir). The vassals'
    ``chdir`` is the link ``<base>/current``: ``deploy(release=NAME)`` points it to another
    release, and each vassal runs that one from its next load (a reload, or the Emperor
    starting it again).

    A release of the demo app also holds its own control file (``some_proj/deploy.py``): its
    version is the release's name, and the fields below say how it behaves (``None``: the stack's
    value). Any other app gets the links only."""

    name: str
    app_dir: Path | None = None
    start_delay: float | None = None
    request_delay: float | None = None
    #: it cannot start: the app raises at import (with ``need-app`` the vassal exits)
    broken: bool = False
    #: ``/health`` answers 500 from this many seconds after the app loaded (0: never)
    sick_after: float = 0.0
    #: the first request this many seconds after the app loaded kills the vassal's master and
    #: workers mid-request (0: never); the Emperor starts the vassal again
    crash_after: float = 0.0
    #: each worker's first ``cold_requests`` requests to ``/`` take ``cold_delay`` s longer (a
    #: cache filled lazily, per process)
    cold_requests: int = 0
    cold_delay: float = 0.0

    def demo_control(self, config: StackConfig) -> dict[str, object]:
        """The control file of this release of the demo app."""
        return {
            "version": self.name,
            "start_delay": config.start_delay if self.start_delay is None else self.start_delay,
            "request_delay": (
                config.request_delay if self.request_delay is None else self.request_delay
            ),
            "broken": self.broken,
            "sick_after": self.sick_after,
            "crash_after": self.crash_after,
            "cold_requests": self.cold_requests,
            "cold_delay": self.cold_delay,
        }

    def drives_the_demo(self) -> bool:
        """Any field but the name and the app dir is set: only the demo app reads them."""
        return self != Release(self.name, self.app_dir)


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
    #: Versions of the app, the first one running at start: the vassals' ``chdir`` is the link
    #: ``<base>/current`` to one of them (:class:`Release`).
    releases: tuple[Release, ...] = ()
    #: Left running after the test (and after this Python process), for a look at it.
    keep: bool = False
    start_timeout: float = 60.0

    @property
    def demo_app(self) -> bool:
        return self.app_dir.resolve() == render.EXAMPLES_DIR.resolve()

    def release_dir(self, release: Release) -> Path:
        """The app dir a release links to."""
        return self.app_dir if release.app_dir is None else release.app_dir

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
        if not self.demo_app and (self.start_delay or self.request_delay):
            raise ValueError(
                "start delay and request delay drive the demo app in examples/: "
                f"{self.app_dir} does not read {CONTROL_ENV}"
            )
        self._check_releases()

    def _check_releases(self) -> None:
        names = [r.name for r in self.releases]
        if len(set(names)) != len(names):
            raise ValueError(f"release names must differ: {names}")
        for release in self.releases:
            if not release.name or release.name in (".", "..") or "/" in release.name:
                raise ValueError(f"a release name is one path component, not {release.name!r}")
            app_dir = self.release_dir(release)
            if not (app_dir / self.wsgi_file).is_file():
                raise ValueError(f"release {release.name}: no {self.wsgi_file} in {app_dir}")
            demo = app_dir.resolve() == render.EXAMPLES_DIR.resolve()
            if not demo and release.drives_the_demo():
                raise ValueError(
                    f"release {release.name}: its behaviour drives the demo app in examples/; "
                    f"{app_dir} does not read {CONTROL_ENV}"
                )


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Proc:
    """A process by (pid, start time): a reused pid is not taken for the process seen before."""

    pid: int
    start: float

    @classmethod
    def tree(cls, pid: int) -> set[Proc]:
        """``pid`` and its live descendants; empty when it is gone."""
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
            return {cls(p.pid, p.create_time()) for p in tree if _live(p)}
        return set()

    def alive(self) -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(self.pid)
            return process.create_time() == self.start and _live(process)
        return False


def children(pid: int) -> list[int]:
    """The live children of ``pid``; none when it is gone."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return sorted(p.pid for p in psutil.Process(pid).children() if _live(p))
    return []


def _live(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return process.status() != psutil.STATUS_ZOMBIE
    return False


class Process(mirakuru.Executor):
    """One process of a stack: mirakuru polls ``ready()`` until its deadline and raises
    ``mirakuru.ProcessExitedWithError`` at once if the process exits while starting. ``keep``:
    the process outlives this Python process (mirakuru kills what it started on exit, marked by
    an environment variable, and when the executor is collected)."""

    def __init__(
        self,
        command: list[str],
        ready: Callable[[], bool],
        *,
        keep: bool,
        emperor: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(command, **options)
        self.ready, self.keep, self.emperor = ready, keep, emperor

    def pre_start_check(self) -> bool:
        return False

    def after_start_check(self) -> bool:
        return self.ready()

    @property
    def envvars(self) -> dict[str, str]:
        env = super().envvars
        if self.keep:
            del env[ENV_UUID]
        return env

    def __del__(self) -> None:
        if not self.keep:
            super().__del__()


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200 * lines))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def write_control(path: Path, **changes: object) -> None:
    """Update the demo app's control file (JSON) with ``changes`` (None: unchanged), atomically:
    vassals read it when they next load."""
    control = json.loads(path.read_text()) if path.exists() else {}
    control.update({k: v for k, v in changes.items() if v is not None})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(control))
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Answer:
    """A vassal's answer to one GET sent straight to its socket: the status (``None``: no answer,
    ``detail`` says why) and the body."""

    status: int | None
    body: bytes = b""
    detail: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


def ask(address: str, key: str, path: str, timeout: float = 5.0) -> Answer:
    """GET ``path`` with ``key`` as Host straight to a vassal's socket (a unix path or
    ``host:port``) over the uwsgi protocol, as the tool's probe does; read the whole answer."""
    host, sep, port = address.rpartition(":")
    inet = "/" not in address and sep and port.isdigit()
    data, deadline = b"", time.monotonic() + timeout
    try:
        if inet:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address)
        with sock:
            sock.sendall(probe_request(path, key, address))
            while chunk := sock.recv(65536):
                data += chunk
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
    except OSError as exc:
        return Answer(None, data, f"GET {path} to {address}: {exc.strerror or exc!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return Answer(parse_status_line(head), body)
    except PacketError as exc:
        return Answer(None, data, f"GET {path} to {address}: {exc}")


# ---------------------------------------------------------------------------------------------
# Routers and hosts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Router:
    """A fastrouter, by its stats server and subscription server."""

    stats: str
    subscription_server: str

    def live_by_key(self) -> dict[str, list[str]]:
        """Names of the live nodes (their socket addresses), by key."""
        live: dict[str, list[str]] = {}
        for node in parse_fastrouter_stats(read_stats(self.stats)):
            if node.live:
                live.setdefault(node.key, []).append(node.name)
        return {key: sorted(names) for key, names in live.items()}


@dataclasses.dataclass
class Host:
    """An emperor and its vassals, behind ``routers``: a stack, or one host of a fleet."""

    layout: Layout
    emperor_stats: str
    #: the names of the vassal links (``uwsgi_vassal_01.ini``; on a fleet ``PORT.ini``)
    vassal_ids: list[str]
    routers: Sequence[Router]
    #: the app's health path: with drain, the tool probes it before a vassal goes back
    health_path: str

    @property
    def emperor_path(self) -> Path:
        return self.layout.vassals_dir

    @property
    def vassal_links(self) -> list[Path]:
        return [self.emperor_path / vid for vid in self.vassal_ids]

    @property
    def control_file(self) -> Path:
        """The demo app's control file of this host's vassals (each host of a fleet has its
        own, so a deploy can go wrong on one host only); with releases, the current release's,
        through the ``current`` link."""
        if self.releases:
            return self.layout.current / CONTROL_NAME
        return self.layout.control_file

    # --- releases -----------------------------------------------------------------------------

    @property
    def releases(self) -> list[str]:
        """The names of this host's releases; none when its vassals run the app dir itself."""
        found = self.layout.releases_dir
        return sorted(p.name for p in found.iterdir()) if found.is_dir() else []

    @property
    def current_release(self) -> str | None:
        """The release ``current`` points to (``None`` without releases)."""
        link = self.layout.current
        return Path(os.readlink(link)).name if link.is_symlink() else None

    def _release_target(self, name: str) -> str:
        if name not in self.releases:
            shown = ", ".join(self.releases) or "none"
            raise ValueError(f"{self.layout.base} has no release {name!r} (releases: {shown})")
        return f"releases/{name}"

    def use_release(self, name: str) -> None:
        """Point ``current`` to release ``name``: a new link renamed over the old one, so a
        vassal that loads at that moment finds one release or the other, never none."""
        new = self.layout.base / ".current.new"
        with contextlib.suppress(FileNotFoundError):
            new.unlink()
        new.symlink_to(self._release_target(name))
        os.replace(new, self.layout.current)

    def release_command(self, name: str) -> str:
        """The shell command doing what ``use_release(name)`` does (the team's way back, for
        ``--revert-command``): ``ln -sfn`` a new link, ``mv -T`` it over ``current``."""
        new, current = self.layout.base / ".current.new", self.layout.current
        return shlex.join(["ln", "-sfn", self._release_target(name), str(new)]) + (
            " && " + shlex.join(["mv", "-Tf", str(new), str(current)])
        )

    def emperor_vassals(self) -> dict[str, EmperorVassal]:
        return parse_emperor_stats(read_stats(self.emperor_stats))

    def vassal_pids(self) -> dict[str, int]:
        """Vassal master pid by vassal id, as the emperor reports them."""
        return {vid: v.pid for vid, v in self.emperor_vassals().items()}

    def worker_pids(self) -> dict[str, list[int]]:
        """Worker pids by vassal id: the live children of each vassal master."""
        return {vid: children(pid) for vid, pid in self.vassal_pids().items()}

    def nodes(self) -> dict[str, str]:
        """The address each vassal's master listens on (the tool's way of finding a vassal's
        node, read from the kernel), by vassal id; a vassal down or listening nowhere: none."""
        masters = {vid: pid for vid, pid in self.vassal_pids().items() if pid > 0}
        try:
            listening = listening_sockets(masters.values())
        except OSError:
            return {}
        return {vid: listening[pid][0] for vid, pid in masters.items() if listening.get(pid)}

    def touch(self, vassal_id: str) -> int:
        """Make the emperor reload one vassal: move its link's own mtime past ``last_mod``.

        The emperor compares whole seconds (``st_mtime > last_mod``) and, with --emperor-nofollow,
        lstat()s the link: touching the shared target would reload every vassal.
        """
        last_mod = self.emperor_vassals()[vassal_id].last_mod
        mtime = touch_mtime(time.time(), last_mod)
        touch(str(self.emperor_path / vassal_id), mtime)
        return mtime

    def reload_command(self, *flags: str, drain: bool = True) -> list[str]:
        """uwsgi_reload.py for this host, as examples/uwsgi_reload.sh runs it: every router's
        stats (and, with ``drain``, every subscription server and ``--probe`` of the health
        path), then ``flags``.

        The probe is part of drain: the tool would otherwise subscribe a reloaded vassal on the
        Emperor's "accepting", which worker 1 sends before its accepting hooks run, and a
        blocking accepting hook holds that worker (docs/design.md, "The example configs")."""
        routers = [a for r in self.routers for a in ("--fastrouter-stats-socket", r.stats)]
        servers = [
            a for r in self.routers for a in ("--subscription-server", r.subscription_server)
        ]
        return [
            sys.executable,
            str(render.RELOAD_TOOL),
            "--emperor-path",
            str(self.emperor_path),
            "--emperor-stats-socket",
            self.emperor_stats,
            *routers,
            *([*servers, "--probe", self.health_path] if drain else []),
            *flags,
        ]


# ---------------------------------------------------------------------------------------------
# What a stack and a fleet share
# ---------------------------------------------------------------------------------------------


class ProcessGroup:
    """A stack or a fleet: its hosts and routers, the processes started for them, their logs,
    the probes of the whole, and waiting on probes while checking that no process exited."""

    name: str
    config: Any  # StackConfig or FleetConfig
    layout: Layout
    hosts: Sequence[Host]
    routers: Sequence[Router]
    #: vassal ids by fastrouter key: :attr:`host` first
    keys: dict[str, list[str]]
    host: str  # the fastrouter key: nginx requests carry it as Host
    http_port: int
    logs: dict[str, Path]
    #: the processes started, by name: ``emperor``/``emperor-H``, ``router-R``, ``nginx``
    processes_started: dict[str, Process]
    stopped: bool

    def vassal_of(self, node: str) -> str:
        """The vassal id a router's node name stands for."""
        raise NotImplementedError

    # --- where things are ---------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    @property
    def base_dirs(self) -> list[Path]:
        return list(dict.fromkeys([self.layout.base, *(h.layout.base for h in self.hosts)]))

    @property
    def pids(self) -> dict[str, int]:
        started = self.processes_started.items()
        return {name: p.process.pid for name, p in started if p.process is not None}

    def processes(self) -> set[Proc]:
        """Every live process of the group: the trees of the processes it started."""
        return set().union(*(Proc.tree(pid) for pid in self.pids.values()))

    def log_tail(self, name: str, lines: int = 30) -> str:
        return log_tail(self.logs[name], lines)

    def report(self, lines: int = 15) -> str:
        return "\n".join(
            f"--- {name} ({path}) ---\n{log_tail(path, lines)}"
            for name, path in self.logs.items()
            if path.exists()
        )

    # --- probes -------------------------------------------------------------------------------

    def live_nodes(self) -> dict[str, dict[str, list[str]]]:
        """Live node names by router stats address, then by key."""
        return {r.stats: r.live_by_key() for r in self.routers}

    def worker_pids(self) -> dict[str, list[int]]:
        """Worker pids by vassal id, of every host (a fleet's ids are unique: named by port)."""
        return {vid: pids for h in self.hosts for vid, pids in h.worker_pids().items()}

    def answers(self, path: str | None = None, timeout: float = 5.0) -> dict[str, Answer]:
        """Every vassal's answer to GET ``path`` (default: the health path), sent straight to
        the socket its master listens on (:func:`ask`): which worker answers, on which release,
        whether the routers send it traffic or not. A vassal with no socket: status ``None``."""
        path = self.config.health_path if path is None else path
        key_of = {vid: key for key, ids in self.keys.items() for vid in ids}
        found: dict[str, Answer] = {}
        for h in self.hosts:
            nodes = h.nodes()
            for vid in h.vassal_ids:
                node = nodes.get(vid)
                found[vid] = (
                    Answer(None, detail=f"{vid}: no master listening")
                    if node is None
                    else ask(node, key_of.get(vid, self.host), path, timeout)
                )
        return found

    def get(
        self, path: str | None = None, timeout: float = 10.0, host: str | None = None
    ) -> requests.Response:
        """GET ``path`` (default: the health path) through nginx, a fastrouter key as Host."""
        path = self.config.health_path if path is None else path
        url = self.url + path.lstrip("/")
        return requests.get(url, headers={"Host": host or self.host}, timeout=timeout)

    def status(self, through_nginx: bool = True) -> tuple[bool, str]:
        """(every vassal accepting and live under its key in every router [and nginx answering
        200 for every key], a summary)."""
        parts, ok = [], True
        try:
            for h in self.hosts:
                accepting = sorted(vid for vid, v in h.emperor_vassals().items() if v.accepting)
                ok &= accepting == sorted(h.vassal_ids)
                parts.append(f"{h.emperor_stats}: {len(accepting)}/{len(h.vassal_ids)} accepting")
            for r in self.routers:
                live = r.live_by_key()
                for key, ids in self.keys.items():
                    vassals = sorted(self.vassal_of(node) for node in live.get(key, []))
                    ok &= vassals == sorted(ids)
                    parts.append(f"{r.stats}: {len(vassals)}/{len(ids)} live nodes for {key}")
        except StatsError as exc:
            return False, "; ".join([*parts, str(exc)])
        if ok and through_nginx:
            codes: list[object] = []
            for key in self.keys:
                try:
                    codes.append(self.get(timeout=2.0, host=key).status_code)
                except requests.RequestException as exc:
                    codes.append(type(exc).__name__)
            ok = all(code == 200 for code in codes)
            parts.append(f"nginx answered {', '.join(map(str, codes))}")
        return ok, "; ".join(parts)

    def all_live(self) -> bool:
        return self.status()[0]

    def check_running(self) -> None:
        """Raise ProcessExitedWithError if a process of the group is gone."""
        for name, process in self.processes_started.items():
            if not process.running():
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

    def wait_all_live(self, timeout: float = 30.0) -> None:
        last = [""]

        def check() -> bool:
            ok, last[0] = self.status()
            return ok

        vassals = sum(len(ids) for ids in self.keys.values())
        what = f"all {vassals} vassals live in {len(self.routers)} router(s)"
        try:
            self.wait_for(check, what, timeout)
        except StackTimeout as exc:
            raise StackTimeout(f"{exc.args[0]}\nlast status: {last[0]}") from None

    # --- acting -------------------------------------------------------------------------------

    def deploy(
        self,
        hosts: Sequence[Host] | None = None,
        *,
        release: str | None = None,
        version: str | None = None,
        start_delay: float | None = None,
        broken: bool | None = None,
        request_delay: float | None = None,
    ) -> None:
        """Change what the vassals of every host, or of ``hosts`` only, load at their next
        start: point ``current`` to ``release`` (a stack made with releases), then rewrite the
        demo app's control file (with releases, the current release's) with the values given."""
        changes = {
            "version": version,
            "start_delay": start_delay,
            "broken": broken,
            "request_delay": request_delay,
        }
        for h in self.hosts if hosts is None else hosts:
            if release is not None:
                h.use_release(release)
            if release is None or any(v is not None for v in changes.values()):
                write_control(h.control_file, **changes)

    # --- starting and stopping ----------------------------------------------------------------

    def start(
        self,
        name: str,
        command: list[str],
        ready: Callable[[], bool],
        what: str,
        *,
        env: dict[str, str] | None = None,
        stop_signal: int = signal.SIGINT,
        emperor: bool = False,
    ) -> None:
        """Start one process of the group, its output in ``<base>/<name>.out``; return once
        ``ready()``. It exiting while starting raises ``ProcessExitedWithError`` at once, the
        deadline ``StackTimeout``, both with the log tails."""
        log = self.logs[f"{name}-stdout"] = self.layout.base / f"{name}.out"
        timeout = self.config.start_timeout + self.config.start_delay
        with log.open("w") as out:
            process = Process(
                command,
                ready,
                keep=self.config.keep,
                emperor=emperor,
                envvars=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                stop_signal=stop_signal,
            )
            self.processes_started[name] = process
            try:
                process.start()
            except mirakuru.ProcessExitedWithError:
                raise ProcessExitedWithError(
                    f"{name} of {self.kind} {self.name} exited while starting "
                    f"({shlex.join(command)})\n{self.report()}"
                ) from None
            except mirakuru.TimeoutExpired:
                raise StackTimeout(
                    f"{name} of {self.kind} {self.name} not ready after {timeout:g} s: waited "
                    f"for {what}\nlast status: {self.status()[1]}\n{self.report()}"
                ) from None

    def start_nginx(self, nginx: str) -> None:
        """nginx in the foreground with the group's config; ready once it answers 200 through."""
        conf = ["-p", str(self.layout.nginx_dir), "-c", str(self.layout.nginx_conf)]
        command = [nginx, "-e", str(self.logs["nginx"]), *conf]

        def ready() -> bool:
            try:
                return self.get(timeout=2.0).status_code == 200
            except requests.RequestException:
                return False

        # SIGQUIT: a graceful shutdown (workers finish their requests, then exit)
        self.start("nginx", command, ready, "HTTP 200 through nginx", stop_signal=signal.SIGQUIT)

    def stop(self) -> set[Proc]:
        """Stop every process together, each as a tree; remove every dir. Idempotent.

        Returns every process seen while stopping. The processes are stopped in parallel (an
        emperor's vassals stop within about a second; ``_bury`` ends the emperor then);
        mirakuru waits for each process it started, and this for their descendants."""
        if self.stopped:
            return set()
        self.stopped = True
        seen = self.processes()
        with concurrent.futures.ThreadPoolExecutor() as pool:
            list(pool.map(_stop, self.processes_started.values()))
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(p.alive() for p in seen) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        for proc in seen:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for base in self.base_dirs:
            shutil.rmtree(base, ignore_errors=True)
        return seen


def _stop(process: Process) -> None:
    if process.emperor and process.process is not None:
        _bury(process.process.pid)
    with contextlib.suppress(ProcessFinishedWithError):  # how it ended no longer matters
        process.stop()


def _bury(master: int) -> None:
    """Stop an emperor's master with SIGINT; once every vassal is gone (no grandchild of the
    master is left: the vassals' masters and workers stopped as uWSGI stops them), kill what is
    left, the emperor and the master: uWSGI 2.0 has them poll once a second for about 3 s more
    before they exit, holding nothing."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(master, signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        kids = children(master)
        if len(kids) <= 1 and not any(children(kid) for kid in kids):
            break
        time.sleep(POLL_INTERVAL)
    for pid in [*children(master), master]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stack(Host, ProcessGroup):  # its methods as a host are its methods as a group
    """A running stack: one host (itself) and one router (the emperor's fastrouter)."""

    name: str
    config: StackConfig
    substitutions: list[Substitution]
    http_port: int
    host: str = KEY
    keys: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    logs: dict[str, Path] = dataclasses.field(default_factory=dict)
    processes_started: dict[str, Process] = dataclasses.field(default_factory=dict)
    stopped: bool = False
    hosts: list[Host] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.hosts = [self]

    @property
    def base_dir(self) -> Path:
        return self.layout.base

    @property
    def fastrouter_stats(self) -> str:
        return self.routers[0].stats

    @property
    def subscription_server(self) -> str:
        return self.routers[0].subscription_server

    def vassal_of(self, node: str) -> str:
        # the socket is named after the vassal's config: %n in the vassal config
        return f"{node_vassal_name(node)}.ini"


def vassal_ids(n: int) -> list[str]:
    return [f"uwsgi_vassal_{i:02d}.ini" for i in range(1, n + 1)]


def make_releases(layout: Layout, config: StackConfig) -> None:
    """Each release's dir (links to its app dir's entries; the demo app's control file), and
    ``current`` pointing to the first."""
    layout.releases_dir.mkdir()
    for release in config.releases:
        directory = layout.releases_dir / release.name
        directory.mkdir()
        app_dir = config.release_dir(release).resolve()
        for entry in app_dir.iterdir():
            if entry.name != CONTROL_NAME:
                (directory / entry.name).symlink_to(entry)
        if app_dir == render.EXAMPLES_DIR.resolve():
            write_control(directory / CONTROL_NAME, **release.demo_control(config))
    layout.current.symlink_to(f"releases/{config.releases[0].name}")


def prepare(config: StackConfig, uwsgi: str) -> Stack:
    """Render the examples into a new base dir: every file of the stack, no process yet."""
    config.check()
    layout = Layout(Path(tempfile.mkdtemp(prefix="ur-", dir="/tmp")))
    for directory in (layout.run_dir, layout.vassals_dir, layout.nginx_dir):
        directory.mkdir()
    port = render.free_port()
    app_dir = config.app_dir.resolve()
    if config.releases:
        make_releases(layout, config)
        app_dir = layout.current
    subs = render.substitutions(
        layout,
        http_port=port,
        app_dir=app_dir,
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
    if not config.releases:
        write_control(
            layout.control_file,
            version="v1",
            start_delay=config.start_delay,
            broken=False,
            request_delay=config.request_delay,
        )
    conf_d = files[render.CONF_D].read_text()
    options = render.conf_d_options(conf_d)
    logs = {
        "emperor": Path(render.shell_assignments(conf_d)["UWSGI_LOG_FILE"]),
        "nginx": layout.nginx_dir / "error.log",
        **{node_vassal_name(vid): layout.run_dir / f"{node_vassal_name(vid)}.log" for vid in ids},
    }
    router = Router(options["fastrouter-stats-server"], options["fastrouter-subscription-server"])
    return Stack(
        layout=layout,
        emperor_stats=options["emperor-stats-server"],
        vassal_ids=ids,
        routers=[router],
        health_path=config.health_path,
        name=f"uwsgi-reload-{layout.base.name}",
        config=config,
        substitutions=subs,
        http_port=port,
        host=host,
        keys=keys,
        logs=logs,
    )


def start_stack(config: StackConfig) -> Stack:
    """Render, start the emperor then nginx, return once every vassal is live through nginx."""
    uwsgi, nginx = render.find_uwsgi(), render.find_nginx()
    stack = prepare(config, uwsgi)
    try:
        command = render.emperor_command(uwsgi, stack.layout.rendered(render.CONF_D).read_text())
        # No bytecode written next to the app's sources: the app dir stays as it was.
        env = {CONTROL_ENV: str(stack.control_file), "PYTHONDONTWRITEBYTECODE": "1"}
        n = len(stack.vassal_ids)
        stack.start(
            "emperor",
            command,
            lambda: stack.status(through_nginx=False)[0],
            f"{n} vassals accepting and live in the router",
            env=env,
            emperor=True,
        )
        stack.start_nginx(nginx)
        stack.wait_all_live(config.start_timeout)
    except BaseException:
        stack.stop()
        raise
    return stack


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[Stack]:
    """A running stack outside pytest (a demo, a benchmark), stopped and its dir removed on the
    way out, however the block ends (an exception, Ctrl-C): what the fixtures do."""
    stack = start_stack(config)
    try:
        yield stack
    finally:
        stack.stop()
