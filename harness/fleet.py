"""A fleet on one machine: H app hosts (an emperor each), one or two fastrouters, nginx in front.

Rendered from ``examples/fleet/`` as :mod:`.render` renders ``examples/``: the harness keeps no
copy of the configs, it substitutes the placeholders of the examples (the private addresses of a
fleet) with loopback addresses and free ports. The whole of 127.0.0.0/8 is local on Linux, so
each "host" binds an address of its own:

=====================================  ========================================================
example text                           rendered as
=====================================  ========================================================
everything :func:`.render.substitutions` substitutes (user, group, app dir, run dir, emperor
dir and log, ``plugin = python3``, ``listen 80;``, ``uwsgi_params``)
``10.0.0.2`` (an app host's address)   ``127.0.0.N``: host 1 is 127.0.0.2, host 2 127.0.0.3, ...
``127.0.0.1:1716`` (emperor stats)     ``127.0.0.N:<free port>``: the hosts share one loopback
``10.0.1.R:2626`` (subscriptions)      ``127.0.0.1:<free port>`` per router R (1 or 2); with one
                                       router, lines naming router 2 are dropped
``10.0.1.R:3031`` (router socket)      ``127.0.0.1:<free port>`` per router
``10.0.1.1:1717`` (router stats)       ``127.0.0.1:<free port>`` (router R renders the router
                                       config with its own ports: the example is router 1's)
``/var/log/uwsgi-fastrouter``          ``<fleet dir>/fastrouter-R.log``
``/etc/uwsgi/keys``                    signed (``FleetConfig.signed``): ``<fleet dir>/keys``,
                                       the private key made for this fleet
``/etc/uwsgi/subscription-keys``       signed: ``<fleet dir>/subscription-keys``, its public
                                       half (``domain.tld.pem``) for the routers' check
``,sign=SHA1:<private key>``           unsigned: removed (the announces go out unsigned)
``subscriptions-sign-check``           unsigned: the routers' lines dropped (no check)
=====================================  ========================================================

Each vassal is a link named after its port (``38121.ini`` -> ``socket = 127.0.0.2:38121``); the
routers list it by that address. Readiness is probed: every emperor reports every vassal
accepting, every router has every node live, nginx answers 200. Stopping: nginx by SIGQUIT,
emperors and routers by SIGINT (a uWSGI master's shutdown; SIGTERM would be a reload, see
:mod:`.stack`), each as a process tree. A :class:`Fleet` answers what a :class:`.stack.Stack`
answers, with the same meaning (:class:`.stack.ProcessGroup`).

A signed fleet (``signed=True``) is secured as ``examples/fleet`` is: a key pair made for it
(``openssl genrsa``), the routers accept only packets the public key verifies, every vassal
signs its announces, and the tool is given the private key (``--subscription-sign``). It needs
a uWSGI built with OpenSSL's headers: :func:`sign_check_built_in` asks its ``--help``.

Use :func:`running_fleet` outside pytest, the ``make_uwsgi_fleet`` fixture inside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable

from uwsgi_reload import (
    Command,
    Node,
    StatsError,
    openssl_sign,
    read_stats,
    send_datagram,
    subscriptions,
)

from . import render
from .render import KEY, Layout, Substitution
from .stack import CONTROL_ENV, Host, Process, ProcessGroup, Router, write_control

FLEET_DIR = render.EXAMPLES_DIR / "fleet"
FLEET_VASSAL_INI = "fleet_vassal.ini"
FLEET_CONF_D = "uwsgi.conf.d.fragment"
ROUTER_INI = "fastrouter.ini"
FLEET_NGINX_FRAGMENT = "nginx.conf.fragment"
#: The playbook that rolls a fleet host by host or in batches (examples/ansible/reload.yml),
#: and its serial line (``-e batch=B``; a copy changes it to measure all hosts at once).
PLAYBOOK = render.EXAMPLES_DIR / "ansible" / "reload.yml"
SERIAL_LINE = '\n  serial: "{{ batch | default(1) }}"\n'

#: Placeholders of examples/fleet: an app host's private address, its emperor's stats server,
#: the router hosts' private addresses and the ports of a router (socket, subscriptions, stats).
HOST_ADDRESS = "10.0.0.2"
EMPEROR_STATS = "127.0.0.1:1716"
ROUTER_ADDRESSES = ("10.0.1.1", "10.0.1.2")
ROUTER_PORT, SUBSCRIPTION_PORT, ROUTER_STATS_PORT = 3031, 2626, 1717
#: Where the routers of the harness listen (the fleet's "private network").
ROUTER_HOST = "127.0.0.1"
#: Secured subscriptions in examples/fleet: the digest, the app hosts' private key, the routers'
#: dir of public keys (one per subscription key, named after it: core/ssl.c,
#: uwsgi_sanitize_cert_filename).
SIGN_DIGEST = "SHA1"
PRIVATE_KEYS_DIR = "/etc/uwsgi/keys"
PRIVATE_KEY = f"{PRIVATE_KEYS_DIR}/{KEY}.key.pem"
PUBLIC_KEYS_DIR = "/etc/uwsgi/subscription-keys"
SIGN_CHECK = "subscriptions-sign-check"


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """What a fleet is made of: ``hosts`` app hosts of ``vassals`` vassals, 1 or 2 routers."""

    hosts: int = 3
    vassals: int = 4
    routers: int = 1
    app_dir: Path = render.EXAMPLES_DIR
    wsgi_file: str = render.DEFAULT_WSGI_FILE
    health_path: str = "/"
    #: demo app only: seconds it sleeps while loading / per request (see stack.StackConfig)
    start_delay: float = 0.0
    request_delay: float = 0.0
    #: Left running after the test (and after this Python process), for a look at it.
    keep: bool = False
    start_timeout: float = 60.0
    #: Secured subscriptions: a key pair made for this fleet, routers that check signatures,
    #: vassals and the tool that sign (module docstring).
    signed: bool = False

    @property
    def demo_app(self) -> bool:
        return self.app_dir.resolve() == render.EXAMPLES_DIR.resolve()

    def check(self) -> None:
        """Raise ValueError on a combination the harness cannot honour."""
        if not 1 <= self.hosts <= 253:  # 127.0.0.2 .. 127.0.0.254
            raise ValueError(f"hosts must be 1..253, not {self.hosts}")
        if self.vassals < 1:
            raise ValueError(f"vassals must be >= 1, not {self.vassals}")
        if self.routers not in (1, 2):
            raise ValueError(f"routers must be 1 or 2 (the examples name two), not {self.routers}")
        if min(self.start_delay, self.request_delay) < 0:
            raise ValueError("start delay and request delay must be >= 0")
        if not (self.app_dir / self.wsgi_file).is_file():
            raise ValueError(f"wsgi file {self.app_dir / self.wsgi_file} does not exist")
        if not self.health_path.startswith("/"):
            raise ValueError(f"health path must start with /, not {self.health_path!r}")
        if not self.demo_app and (self.start_delay or self.request_delay):
            raise ValueError(
                f"start and request delay drive the demo app: {self.app_dir} is not it"
            )


@dataclasses.dataclass(frozen=True)
class FleetRouter(Router):
    """One standalone fastrouter (a uWSGI master with a fastrouter gateway)."""

    index: int  # 1 or 2: router R of the examples (10.0.1.R)
    socket: str  # what nginx connects to
    config: Path  # the rendered router config
    log: Path

    @property
    def name(self) -> str:
        return f"router-{self.index}"


@dataclasses.dataclass
class FleetHost(Host):
    """One app host: an emperor on its own address and dir, vassals on ``address:PORT``, each
    linked as ``PORT.ini``."""

    index: int  # 1-based; its address is 127.0.0.(index + 1)
    address: str
    substitutions: list[Substitution]
    #: ``DIGEST:private key`` on a signed fleet: the tool signs its drain with it
    subscription_sign: str | None = None

    @property
    def name(self) -> str:
        return f"emperor-{self.index}"

    def reload_command(self, *flags: str, drain: bool = True) -> list[str]:
        """The host's tool command (:meth:`.stack.Host.reload_command`); on a signed fleet,
        drain signs its packets with the fleet's key (``flags`` given after it win: a test may
        pass another key)."""
        spec = self.subscription_sign
        signing = ["--subscription-sign", spec] if drain and spec is not None else []
        return super().reload_command(*signing, *flags, drain=drain)

    def node_name(self, vassal_id: str) -> str:
        """How the routers list this vassal: its socket's address."""
        return f"{self.address}:{Path(vassal_id).stem}"

    def nodes(self) -> dict[str, str]:
        """Node name -> vassal id."""
        return {self.node_name(vid): vid for vid in self.vassal_ids}


@dataclasses.dataclass
class Fleet(ProcessGroup):
    """A running fleet (or one being started)."""

    name: str
    config: FleetConfig
    layout: Layout  # routers' configs and logs, nginx
    hosts: list[FleetHost] = dataclasses.field(default_factory=list)
    routers: list[FleetRouter] = dataclasses.field(default_factory=list)
    http_port: int = 0
    keys: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    host: str = KEY
    logs: dict[str, Path] = dataclasses.field(default_factory=dict)
    processes_started: dict[str, Process] = dataclasses.field(default_factory=dict)
    stopped: bool = False

    def expected_nodes(self) -> list[str]:
        return sorted(name for h in self.hosts for name in h.nodes())

    def node(self, name: str) -> tuple[FleetHost, str]:
        """The host and vassal id of a node name (``127.0.0.3:38121``)."""
        for host in self.hosts:
            if name in host.nodes():
                return host, host.nodes()[name]
        raise KeyError(name)

    def vassal_of(self, node: str) -> str:
        try:
            return self.node(node)[1]
        except KeyError:
            return node

    @property
    def subscription_sign(self) -> str | None:
        """``DIGEST:private key`` of a signed fleet (``--subscription-sign``), else None."""
        return self.hosts[0].subscription_sign if self.hosts else None

    def metrics_file(self, tool_dir: Path, host: FleetHost) -> Path:
        """Where a playbook run with :meth:`ansible_inventory`'s ``tool_dir`` has ``host``'s
        tool write its metrics (``--metrics-file``)."""
        return tool_dir / host.address / "uwsgi_reload.prom"

    def ansible_inventory(
        self,
        tool_dir: Path,
        minimum: int,
        timeout: float = 30,
        *,
        fleet_nodes: int | None = None,
    ) -> str:
        """An inventory for ``examples/ansible/reload.yml``: the variables of
        ``examples/ansible/inventory.sample.ini``, for this fleet's hosts, reached by a local
        connection (they all are this machine). Each host gets its own copy of the tool under
        ``tool_dir``, and writes its metrics there (:meth:`metrics_file`). ``fleet_nodes``
        (what batches divide into shares): default, this fleet's nodes per key; on a signed
        fleet, ``subscription_sign`` names its key."""
        hosts = [
            f"{h.address} ansible_connection=local ansible_python_interpreter={sys.executable} "
            f"emperor_path={h.emperor_path} emperor_stats={h.emperor_stats} "
            f"tool_path={tool_dir / h.address / 'uwsgi_reload.py'} "
            f"metrics_file={self.metrics_file(tool_dir, h)}"
            for h in self.hosts
        ]
        nodes = len(self.expected_nodes()) if fleet_nodes is None else fleet_nodes
        group_vars = [
            f"python={sys.executable}",
            f"probe_path={self.config.health_path}",
            f"fleet_minimum={minimum}",
            f"fleet_nodes={nodes}",
            f"fastrouter_stats={json.dumps([r.stats for r in self.routers])}",
            f"subscription_servers={json.dumps([r.subscription_server for r in self.routers])}",
            f"reload_timeout={timeout:g}",
        ]
        if self.subscription_sign:
            group_vars.append(f"subscription_sign={self.subscription_sign}")
        return "\n".join(["[app]", *hosts, "", "[app:vars]", *group_vars]) + "\n"

    def playbook_command(
        self,
        work_dir: Path,
        minimum: int,
        *,
        timeout: float = 30,
        batch: int | None = None,
        serial: str | None = None,
        fleet_nodes: int | None = None,
    ) -> list[str]:
        """``ansible-playbook`` running ``examples/ansible/reload.yml`` against this fleet, as
        one command (for a load run to start). Writes the inventory (:meth:`ansible_inventory`)
        into ``work_dir``, where each host gets its copy of the tool. ``batch``: hosts rolled
        together, each with its share (``-e batch=B``, as many forks). ``serial``: a copy of the
        playbook with its ``serial`` changed (``"100%"``: every host at once, no share), to
        measure what the shares prevent."""
        ansible_playbook = Path(sys.executable).with_name("ansible-playbook")
        if not ansible_playbook.exists():
            raise render.MissingTool(
                f"{ansible_playbook} is missing: install the fleet extra (ansible-core)"
            )
        inventory = work_dir / "inventory.ini"
        inventory.write_text(
            self.ansible_inventory(work_dir, minimum, timeout, fleet_nodes=fleet_nodes)
        )
        playbook = PLAYBOOK
        if serial is not None:
            text = PLAYBOOK.read_text()
            if text.count(SERIAL_LINE) != 1:
                raise ValueError(f"{PLAYBOOK} has no single {SERIAL_LINE.strip()!r} to change")
            playbook = work_dir / PLAYBOOK.name
            playbook.write_text(text.replace(SERIAL_LINE, f"\n  serial: {serial!r}\n"))
        batches = [] if batch is None else ["-e", f"batch={batch}"]
        return [
            "env",
            "ANSIBLE_LOCALHOST_WARNING=0",
            "ANSIBLE_NOCOLOR=1",
            # every host of a batch (or of the fleet, serial 100%) at once, not 5 at a time
            f"ANSIBLE_FORKS={max(5, len(self.hosts))}",
            f"ANSIBLE_LOCAL_TEMP={work_dir / 'ansible-local'}",
            f"ANSIBLE_REMOTE_TEMP={work_dir / 'ansible-remote'}",
            str(ansible_playbook),
            "-i",
            str(inventory),
            # where the tool comes from: this installation's (the playbook's default is the
            # tool beside examples/ in a checkout)
            "-e",
            f"tool_source={render.RELOAD_TOOL}",
            *batches,
            str(playbook),
        ]

    def reload_command(
        self, *flags: str, drain: bool = True, hosts: Sequence[FleetHost] | None = None
    ) -> list[str]:
        """Every host's (or ``hosts``') :meth:`FleetHost.reload_command`, host after host
        (``sh -c 'a && b'``): one command for a load run to start; it stops at the first host
        that fails."""
        chosen = self.hosts if hosts is None else hosts
        commands = (shlex.join(h.reload_command(*flags, drain=drain)) for h in chosen)
        return ["sh", "-c", " && ".join(commands)]

    def together_command(
        self,
        *flags: str,
        drain: bool = True,
        hosts: Sequence[FleetHost] | None = None,
        out_dir: Path | None = None,
    ) -> list[str]:
        """Every host's (or ``hosts``') :meth:`FleetHost.reload_command` started at the same
        moment (:func:`together`): hosts rolled together as a batch of the playbook rolls them,
        without Ansible's start-up between one host and the next, the closest race. ``out_dir``:
        each host's tool writes its metrics to ``out_dir/<address>.prom`` and its output to
        ``out_dir/<address>.out`` (their ``--json`` reports would interleave on one pipe)."""
        chosen = self.hosts if hosts is None else hosts
        commands = []
        for h in chosen:
            if out_dir is None:
                commands.append(h.reload_command(*flags, drain=drain))
                continue
            metrics = ["--metrics-file", str(out_dir / f"{h.address}.prom")]
            command = shlex.join(h.reload_command(*flags, *metrics, drain=drain))
            commands.append(["sh", "-c", f"exec {command} > {out_dir / h.address}.out"])
        return together(commands)

    def take_out(self, name: str, timeout: float = 10.0) -> None:
        """Take one node out of rotation and keep it out, as for maintenance: its vassal stops
        announcing itself (``S`` on its master FIFO blocks its subscription packets) and every
        router is told to unsubscribe it. The vassal keeps running; a reload of it (its hook
        writes ``S`` again) puts it back."""
        host, vid = self.node(name)
        fifo = host.layout.run_dir / f"{Path(vid).stem}.fifo"
        with open(fifo, "w") as pipe:
            pipe.write("S")
        node = Node(key=self.host, name=name, death_mark=False, ref=0)
        spec = self.subscription_sign
        sign = None if spec is None else functools.partial(openssl_sign, spec)
        for packet in subscriptions(Command.UNSUBSCRIBE, [node]):
            for router in self.routers:
                send_datagram(router.subscription_server, packet.packet(sign, time.time()))

        def gone() -> bool:
            return all(name not in r.live_by_key().get(self.host, []) for r in self.routers)

        self.wait_for(gone, f"{name} out of every router", timeout)


def together(commands: Sequence[Sequence[str]]) -> list[str]:
    """``commands`` started at the same moment, as one command (``sh``: each in the
    background, then a wait for every one); it exits with a failing one's exit code, else 0."""
    starts = [f'{shlex.join(c)} & p="$p $!"' for c in commands]
    wait = 'rc=0; for pid in $p; do wait "$pid" || rc=$?; done; exit $rc'
    return ["sh", "-c", "; ".join([*starts, wait])]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _free_ports(address: str, count: int, taken: set[int]) -> list[int]:
    """``count`` ports free on ``address``, none of them in ``taken`` (which they join)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind((address, 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            taken.add(port)
            ports.append(port)
    return ports


def router_substitutions(routers: Sequence[FleetRouter]) -> list[Substitution]:
    """The router addresses in the vassal config and nginx: present ones, or lines dropped."""
    subs = []
    for i, placeholder in enumerate(ROUTER_ADDRESSES):
        for port, attr, why in (
            (SUBSCRIPTION_PORT, "subscription_server", "router's subscription server"),
            (ROUTER_PORT, "socket", "router's socket"),
        ):
            old = f"{placeholder}:{port}"
            new = getattr(routers[i], attr) if i < len(routers) else None
            subs.append(Substitution(old, new, why if new else f"no router {i + 1}"))
    return subs


def own_router_substitutions(router: FleetRouter, log: Path) -> list[Substitution]:
    """The router config (router 1's in the example) rendered for ``router``."""
    placeholder = ROUTER_ADDRESSES[0]
    return [
        Substitution(f"{placeholder}:{ROUTER_PORT}", router.socket, "router's socket"),
        Substitution(
            f"{placeholder}:{SUBSCRIPTION_PORT}", router.subscription_server, "subscriptions"
        ),
        Substitution(f"{placeholder}:{ROUTER_STATS_PORT}", router.stats, "router's stats"),
        Substitution("/var/log/uwsgi-fastrouter", str(log), "router's log"),
    ]


def sign_check_built_in(uwsgi: str) -> bool:
    """True when ``uwsgi`` has secured subscriptions: its ``--help`` lists
    ``--subscriptions-sign-check``, an option compiled only with OpenSSL's headers present
    (core/uwsgi.c, under ``#ifdef UWSGI_SSL``)."""
    out = subprocess.run(
        [uwsgi, "--help"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return f"--{SIGN_CHECK}" in out


def check_signing(uwsgi: str) -> None:
    """Raise MissingTool, saying how to get it, when a signed fleet cannot run here."""
    if not sign_check_built_in(uwsgi):
        raise render.MissingTool(
            f"{uwsgi} was built without OpenSSL's headers: it has no --{SIGN_CHECK}, which a "
            "signed fleet's routers need. Install them and build uWSGI again: apt-get install "
            "-y libssl-dev && pip install --no-cache-dir --force-reinstall --no-binary uwsgi "
            "uWSGI (bash .ci/setup installs them before tox builds it)"
        )
    if shutil.which("openssl") is None:
        raise render.MissingTool(
            "openssl not found on PATH: a signed fleet makes its keys with it, and the tool "
            "signs with it (apt-get install -y openssl)"
        )


def make_keys(base: Path) -> tuple[Path, Path]:
    """A key pair for a signed fleet, made now: (private key file, dir of public keys), the
    public key named after the subscription key as the routers look it up."""
    private_dir, public_dir = base / "keys", base / "subscription-keys"
    private_dir.mkdir(mode=0o700)
    public_dir.mkdir()
    private = private_dir / Path(PRIVATE_KEY).name
    for command in (
        ["openssl", "genrsa", "-out", str(private), "2048"],
        ["openssl", "rsa", "-in", str(private), "-pubout", "-out", str(public_dir / f"{KEY}.pem")],
    ):
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    return private, public_dir


def signing_substitutions(keys: tuple[Path, Path] | None) -> list[Substitution]:
    """examples/fleet signs: with ``keys`` (a signed fleet), its key paths are this fleet's;
    without, the vassals' ``sign=`` and the routers' check go."""
    if keys is None:
        return [
            Substitution(f",sign={SIGN_DIGEST}:{PRIVATE_KEY}", "", "unsigned: announce unsigned"),
            Substitution(SIGN_CHECK, None, "unsigned: the routers check no signature"),
        ]
    private, public_dir = keys
    return [
        Substitution(PRIVATE_KEYS_DIR, str(private.parent), "the private key made for the fleet"),
        Substitution(PUBLIC_KEYS_DIR, str(public_dir), "its public half, for the routers"),
    ]


def prepare(config: FleetConfig, uwsgi: str) -> Fleet:
    """Render examples/fleet into new short dirs: every file of the fleet, no process yet."""
    config.check()
    if not FLEET_DIR.is_dir():
        raise render.MissingTool(
            f"{FLEET_DIR} is missing: this installation does not ship examples/fleet"
        )
    if config.signed:
        check_signing(uwsgi)
    built_in = render.python_built_in(uwsgi)
    layout = Layout(Path(tempfile.mkdtemp(prefix="ur-", dir="/tmp")))
    fleet = Fleet(name=f"uwsgi-fleet-{layout.base.name}", config=config, layout=layout)
    try:
        _render(fleet, built_in)
    except BaseException:
        for base in fleet.base_dirs:
            shutil.rmtree(base, ignore_errors=True)
        raise
    return fleet


def _render(fleet: Fleet, built_in: bool) -> None:
    config, layout = fleet.config, fleet.layout
    layout.nginx_dir.mkdir()
    taken: set[int] = set()
    fleet.http_port = _free_ports("127.0.0.1", 1, taken)[0]
    base_subs = render.substitutions(
        layout,
        http_port=fleet.http_port,
        app_dir=config.app_dir.resolve(),
        wsgi_file=config.wsgi_file,
        python_built_in=built_in,
    )
    keys = make_keys(layout.base) if config.signed else None
    signing = signing_substitutions(keys)
    sign_spec = None if keys is None else f"{SIGN_DIGEST}:{keys[0]}"
    for i in range(1, config.routers + 1):
        p, q, r = _free_ports(ROUTER_HOST, 3, taken)
        router = FleetRouter(
            index=i,
            socket=f"{ROUTER_HOST}:{p}",
            subscription_server=f"{ROUTER_HOST}:{q}",
            stats=f"{ROUTER_HOST}:{r}",
            config=layout.rendered(f"fastrouter-{i}.ini"),
            log=layout.base / f"fastrouter-{i}.log",
        )
        subs = [*own_router_substitutions(router, router.log), *signing, *base_subs]
        router.config.write_text(render.render_text((FLEET_DIR / ROUTER_INI).read_text(), subs))
        fleet.routers.append(router)
        fleet.logs[router.name] = router.log
    routing = router_substitutions(fleet.routers)
    nginx_text = render.render_text(
        (FLEET_DIR / FLEET_NGINX_FRAGMENT).read_text(), [*routing, *base_subs]
    )
    layout.rendered(FLEET_NGINX_FRAGMENT).write_text(nginx_text)
    layout.nginx_conf.write_text(
        render.nginx_config(nginx_text, layout, run_as_root=os.geteuid() == 0)
    )
    fleet.logs["nginx"] = layout.nginx_dir / "error.log"
    for index in range(1, config.hosts + 1):
        address = f"127.0.0.{index + 1}"
        *ports, stats_port = _free_ports(address, config.vassals + 1, taken)
        host_layout = Layout(Path(tempfile.mkdtemp(prefix="ur-", dir="/tmp")))
        emperor_stats = f"{address}:{stats_port}"
        subs = [
            Substitution(HOST_ADDRESS, address, "this host's own loopback address"),
            Substitution(EMPEROR_STATS, emperor_stats, "hosts share the machine's loopback"),
            *routing,
            *signing,
            *render.substitutions(
                host_layout,
                http_port=fleet.http_port,
                app_dir=config.app_dir.resolve(),
                wsgi_file=config.wsgi_file,
                python_built_in=built_in,
            ),
        ]
        host = FleetHost(
            layout=host_layout,
            emperor_stats=emperor_stats,
            vassal_ids=[f"{port}.ini" for port in ports],
            routers=fleet.routers,
            health_path=config.health_path,
            index=index,
            address=address,
            substitutions=subs,
            subscription_sign=sign_spec,
        )
        fleet.hosts.append(host)  # listed: prepare() removes its dir if rendering fails
        fleet.keys.setdefault(fleet.host, []).extend(host.vassal_ids)
        for directory in (host_layout.run_dir, host_layout.vassals_dir):
            directory.mkdir()
        write_control(
            host.control_file,
            version="v1",
            start_delay=config.start_delay,
            broken=False,
            request_delay=config.request_delay,
        )
        for name in (FLEET_VASSAL_INI, FLEET_CONF_D):
            text = render.render_text((FLEET_DIR / name).read_text(), subs)
            host_layout.rendered(name).write_text(text)
        conf_d = host_layout.rendered(FLEET_CONF_D).read_text()
        fleet.logs[host.name] = Path(render.shell_assignments(conf_d)["UWSGI_LOG_FILE"])
        for vid in host.vassal_ids:
            # ln -s /home/some_user/uwsgi/fleet_vassal.ini /etc/uwsgi.d/PORT.ini
            (host_layout.vassals_dir / vid).symlink_to(host_layout.rendered(FLEET_VASSAL_INI))
            fleet.logs[host.node_name(vid)] = host_layout.run_dir / f"{Path(vid).stem}.log"


# ---------------------------------------------------------------------------------------------
# Starting
# ---------------------------------------------------------------------------------------------


def _answers(read: Callable[[], object]) -> bool:
    try:
        read()
    except StatsError:
        return False
    return True


def start_fleet(config: FleetConfig) -> Fleet:
    """Render, start the routers, the emperors, then nginx; return once every node is live."""
    uwsgi, nginx = render.find_uwsgi(), render.find_nginx()
    fleet = prepare(config, uwsgi)
    try:
        env = {"PYTHONDONTWRITEBYTECODE": "1"}
        for router in fleet.routers:
            fleet.start(
                router.name,
                [uwsgi, "--ini", str(router.config)],
                functools.partial(_answers, functools.partial(read_stats, router.stats)),
                f"stats of {router.name} at {router.stats}",
                env=env,
            )
        # The emperors are waited for only until their stats answer: their vassals start
        # together, and the fleet is waited for as a whole below.
        for host in fleet.hosts:
            fleet.start(
                host.name,
                render.emperor_command(uwsgi, host.layout.rendered(FLEET_CONF_D).read_text()),
                functools.partial(_answers, host.emperor_vassals),
                f"emperor stats at {host.emperor_stats}",
                env={**env, CONTROL_ENV: str(host.control_file)},
                emperor=True,
            )
        fleet.wait_for(
            lambda: fleet.status(through_nginx=False)[0],
            "every vassal accepting and live in every router",
            config.start_timeout + config.start_delay,
        )
        fleet.start_nginx(nginx)
        fleet.wait_all_live(config.start_timeout)
    except BaseException:
        fleet.stop()
        raise
    return fleet


@contextlib.contextmanager
def running_fleet(config: FleetConfig) -> Iterator[Fleet]:
    """A running fleet outside pytest, stopped (and its dirs removed) on the way out."""
    fleet = start_fleet(config)
    try:
        yield fleet
    finally:
        fleet.stop()
