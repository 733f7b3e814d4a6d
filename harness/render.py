"""Render ``examples/`` into a stack's temp dir, by substituting the placeholders the examples use.

The harness keeps no second copy of the configs: what runs under test is the example text with
these substitutions, applied line by line in one pass (a replacement is never rescanned):

=================================  ===========================================================
example text                       rendered as
=================================  ===========================================================
``/tmp/``                          ``<base>/``: sockets of the emperor, fastrouter, stats
``/home/some_user/uwsgi``          ``<base>/run``: each vassal's socket, log, pid and fifo
``/etc/uwsgi.d``                   ``<base>/vassals``: the emperor's directory of vassal links
``/var/log/uwsgi-emperor``         ``<base>/emperor.log``: the emperor's log
``some_user`` / ``some_group``     the user and group running the tests
``/some/project/dir``              the app dir (default: this repository's ``examples/``;
                                   with releases, the link ``<base>/current``)
``wsgi-file = ./wsgi.py``          ``wsgi-file = <file>``, only when another file is asked for
``plugin = python3``               line dropped when the uwsgi binary has Python built in (pip)
``listen 80;``                     ``listen 127.0.0.1:<free port>;``
``listen 443 ssl;``                line dropped (no certificate under test)
``include uwsgi_params;``          ``include /etc/nginx/uwsgi_params;`` (absolute: our nginx
                                   prefix has no copy of it)
=================================  ===========================================================

:func:`substitutions` returns exactly this table as data, so a test can check that the rendered
files differ from the examples by these lines only. The nginx main config (``daemon off``, pid,
logs, temp paths) is written around the rendered fragment by :func:`nginx_config`.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import uwsgi_reload

_HERE = Path(__file__).resolve().parent
#: The example configs: package data of the wheel (``uwsgi_reload_harness/examples``), or the
#: repository's top-level ``examples/`` beside ``harness/`` in a checkout (editable install).
EXAMPLES_DIR = _HERE / "examples" if (_HERE / "examples").is_dir() else _HERE.parent / "examples"
#: The reload tool: one file, installed as the top-level module ``uwsgi_reload``.
RELOAD_TOOL = Path(uwsgi_reload.__file__).resolve()

VASSAL_INI = "uwsgi_vassal.ini"
CONF_D = "uwsgi.conf.d.fragment"
NGINX_FRAGMENT = "nginx.conf.fragment"
#: The example files the stack runs, rendered into the base dir under the same names.
RENDERED_FILES = (VASSAL_INI, CONF_D, NGINX_FRAGMENT)

#: The fastrouter key of the examples (``subscribe2 ... key=domain.tld``, nginx ``server_name``).
KEY = "domain.tld"
DEFAULT_WSGI_FILE = "./wsgi.py"
UWSGI_PARAMS = Path("/etc/nginx/uwsgi_params")


class MissingTool(RuntimeError):
    """uwsgi or nginx (or a file they need) is not installed."""


@dataclasses.dataclass(frozen=True)
class Substitution:
    """Replace ``old`` by ``new`` wherever it occurs; ``new=None`` drops lines holding ``old``."""

    old: str
    new: str | None
    why: str

    def applies_to(self, line: str) -> bool:
        return self.old in line


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a stack's files go, under one short base dir (unix socket paths stay < 107 bytes)."""

    base: Path

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    @property
    def vassals_dir(self) -> Path:
        return self.base / "vassals"

    @property
    def nginx_dir(self) -> Path:
        return self.base / "nginx"

    @property
    def control_file(self) -> Path:
        return self.base / "control.json"

    @property
    def releases_dir(self) -> Path:
        """Where a stack with releases keeps them, one directory each."""
        return self.base / "releases"

    @property
    def current(self) -> Path:
        """The link to the release the vassals run (their ``chdir``), when there are releases."""
        return self.base / "current"

    @property
    def nginx_conf(self) -> Path:
        return self.nginx_dir / "nginx.conf"

    def rendered(self, name: str) -> Path:
        return self.base / name


def current_user_group() -> tuple[str, str]:
    return pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name


def substitutions(
    layout: Layout,
    *,
    http_port: int,
    app_dir: Path = EXAMPLES_DIR,
    wsgi_file: str = DEFAULT_WSGI_FILE,
    python_built_in: bool = True,
    user_group: tuple[str, str] | None = None,
    uwsgi_params: Path = UWSGI_PARAMS,
) -> list[Substitution]:
    """The substitutions turning ``examples/`` into one stack's configs (module docstring)."""
    user, group = user_group or current_user_group()
    base = str(layout.base)
    subs = [
        Substitution("/tmp/", f"{base}/", "emperor/fastrouter/stats sockets in the stack's dir"),
        Substitution("/home/some_user/uwsgi", str(layout.run_dir), "vassal socket/log/pid/fifo"),
        Substitution("/etc/uwsgi.d", str(layout.vassals_dir), "the emperor's vassal links"),
        Substitution("/var/log/uwsgi-emperor", f"{base}/emperor.log", "the emperor's log"),
        Substitution("some_user", user, "run as the user running the tests"),
        Substitution("some_group", group, "run as the group running the tests"),
        Substitution("/some/project/dir", str(app_dir), "the app under test (chdir)"),
    ]
    if wsgi_file != DEFAULT_WSGI_FILE:
        subs.append(
            Substitution(
                f"wsgi-file = {DEFAULT_WSGI_FILE}",
                f"wsgi-file = {wsgi_file}",
                "the app's wsgi file",
            )
        )
    if python_built_in:
        subs.append(
            Substitution("plugin = python3", None, "this uwsgi has Python built in (pip build)")
        )
    subs += [
        Substitution("listen 80;", f"listen 127.0.0.1:{http_port};", "a free local port"),
        Substitution("listen 443 ssl;", None, "no TLS certificate under test"),
        Substitution(
            "include uwsgi_params;", f"include {uwsgi_params};", "absolute: not in our prefix"
        ),
    ]
    return subs


def render_text(text: str, subs: Sequence[Substitution]) -> str:
    """Apply ``subs`` to every line of ``text`` in one pass (replacements are not rescanned)."""
    drops = [s.old for s in subs if s.new is None]
    replacements = {s.old: s.new for s in subs if s.new is not None}
    # Longest first, so "/home/some_user/uwsgi" wins over "some_user" at the same position.
    pattern = re.compile(
        "|".join(re.escape(o) for o in sorted(replacements, key=len, reverse=True))
    )
    out = []
    for line in text.splitlines(keepends=True):
        if any(d in line for d in drops):
            continue
        out.append(pattern.sub(lambda m: replacements[m.group(0)], line) if replacements else line)
    return "".join(out)


def render_examples(
    layout: Layout,
    subs: Sequence[Substitution],
    examples_dir: Path = EXAMPLES_DIR,
    vassal_config: Path | None = None,
) -> dict[str, Path]:
    """Write every file of :data:`RENDERED_FILES`, rendered, into the base dir.

    ``vassal_config``: a team's own vassal config, rendered in place of the example's (under the
    example's name, so the stack's layout does not depend on it).
    """
    sources = {name: examples_dir / name for name in RENDERED_FILES}
    if vassal_config is not None:
        sources[VASSAL_INI] = vassal_config
    written = {}
    for name, source in sources.items():
        target = layout.rendered(name)
        target.write_text(render_text(source.read_text(), subs))
        written[name] = target
    return written


_SUBSCRIBE_KEY = re.compile(r"^\s*subscribe2\s*=.*?\bkey=([^,\s]+)", re.MULTILINE)


def subscription_key(vassal_ini_text: str) -> str:
    """The fastrouter key a vassal config subscribes under (its ``subscribe2 = ...,key=K``)."""
    keys: set[str] = set(_SUBSCRIBE_KEY.findall(vassal_ini_text))
    if len(keys) != 1:
        found = ", ".join(sorted(keys)) or "none"
        raise ValueError(
            f"the vassal config must subscribe under exactly one key (subscribe2 = "
            f"server=/tmp/uwsgi_ss.sock,key=KEY); found {found}"
        )
    return keys.pop()


def with_subscription_key(vassal_ini_text: str, key: str) -> str:
    """The vassal config subscribing under ``key`` instead of its own key."""
    own = subscription_key(vassal_ini_text)
    return vassal_ini_text.replace(f"key={own}", f"key={key}")


def shell_assignments(text: str) -> dict[str, str]:
    """``NAME=value`` lines of a conf.d (shell) file; quotes handled as the shell would."""
    values = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        if len(words) == 1 and "=" in words[0]:
            name, _, value = words[0].partition("=")
            values[name] = value
    return values


def emperor_command(uwsgi: str, conf_d_text: str) -> list[str]:
    """The emperor as Gentoo's init script starts it, but in the foreground (``--logto``)."""
    conf = shell_assignments(conf_d_text)
    return [
        uwsgi,
        *shlex.split(conf.get("UWSGI_EXTRA_OPTIONS", "")),
        "--emperor",
        conf["UWSGI_EMPEROR_PATH"],
        "--logto",
        conf["UWSGI_LOG_FILE"],
    ]


def conf_d_options(conf_d_text: str) -> dict[str, str]:
    """``--option value`` pairs of ``UWSGI_EXTRA_OPTIONS`` (flags map to ``""``)."""
    words = shlex.split(shell_assignments(conf_d_text).get("UWSGI_EXTRA_OPTIONS", ""))
    options: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            nxt = words[i + 1] if i + 1 < len(words) else "--"
            options[word[2:]] = "" if nxt.startswith("--") else nxt
    return options


def nginx_config(fragment_text: str, layout: Layout, *, run_as_root: bool) -> str:
    """A complete nginx.conf: main-context lines, then the fragment with http-level lines added.

    As root, nginx workers switch to ``nobody`` unless told ``user root;``: they then could not
    reach the fastrouter socket in a root-only temp dir.
    """
    d = layout.nginx_dir
    main = [
        "# Written by harness/render.py: main context for the rendered nginx.conf.fragment.",
        "daemon off;",
        "worker_processes 1;",
        f"pid {d}/nginx.pid;",
        f"error_log {d}/error.log notice;",
        *(["user root;"] if run_as_root else []),
        "events {\n    worker_connections 512;\n}",
    ]
    http = [
        "    access_log off;",
        *(
            f"    {kind}_temp_path {d}/{kind}_temp;"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        ),
    ]
    lines = fragment_text.splitlines()
    opening = next((i for i, ln in enumerate(lines) if re.match(r"\s*http\s*\{", ln)), None)
    if opening is None:
        raise ValueError("the nginx fragment has no 'http {' block")
    lines[opening + 1 : opening + 1] = http
    return "\n".join([*main, *lines]) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_uwsgi() -> str:
    """uwsgi next to this Python (a venv's bin) first, then on PATH."""
    beside = Path(sys.executable).parent / "uwsgi"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("uwsgi")
    if not found:
        raise MissingTool("uwsgi not found next to python or on PATH: pip install uwsgi")
    return found


def find_nginx() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if not found:
        raise MissingTool("nginx not found on PATH or /usr/sbin: apt-get install -y nginx-light")
    if not UWSGI_PARAMS.is_file():
        raise MissingTool(f"{UWSGI_PARAMS} is missing: apt-get install -y nginx-light")
    return found


def python_built_in(uwsgi: str) -> bool:
    """True for the pip build (Python compiled in): its ``--help`` lists ``--wsgi-file``.

    A distro uwsgi without plugins loaded does not know ``--wsgi-file``: it needs the
    ``plugin = python3`` line of the example.
    """
    out = subprocess.run(
        [uwsgi, "--help"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return "--wsgi-file" in out
