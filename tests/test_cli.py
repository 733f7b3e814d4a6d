"""The command line through ``main(argv)``: bad input is refused with exit 2 and nothing touched.

Stats come from small in-process unix socket servers that answer canned JSON, as uWSGI's do.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import uwsgi_reload as ur
from tests.stats_servers import StatsServer


class CannedStats(StatsServer):
    """A stats server: accept, write the payload, close."""

    def __init__(self, path: str, payload: bytes) -> None:
        self.path, self.payload = path, payload
        super().__init__(path, lambda: payload)


def emperor_payload(ids: list[str], accepting: bool = True) -> dict[str, Any]:
    return {
        "version": "2.0.31",
        "vassals": [
            {"id": i, "pid": 100 + n, "respawns": 0, "last_mod": 1000, "accepting": int(accepting)}
            for n, i in enumerate(ids)
        ],
    }


def fastrouter_payload(names: list[str], key: str = "domain.tld") -> dict[str, Any]:
    return {
        "subscriptions": [
            {
                "key": key,
                "nodes": [{"name": f"/run/{n}.sock", "death_mark": 0, "ref": 0} for n in names],
            }
        ]
    }


class Site:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.emperor = base / "vassals"
        self.emperor.mkdir()
        self.servers: list[CannedStats] = []
        self.emperor_stats = str(base / "es.sock")
        self.fastrouter_stats = str(base / "fs.sock")

    def vassals(self, *names: str) -> list[Path]:
        paths = [self.emperor / n for n in names]
        for p in paths:
            p.write_text("[uwsgi]\n")
            os.utime(p, (1000, 1000))
        return paths

    def serve(self, path: str, payload: dict[str, Any] | bytes) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.servers.append(CannedStats(path, raw))

    def standard(self, n: int = 4) -> list[Path]:
        ids = [f"vassal_{i:02d}.ini" for i in range(1, n + 1)]
        paths = self.vassals(*ids)
        self.serve(self.emperor_stats, emperor_payload(ids))
        self.serve(self.fastrouter_stats, fastrouter_payload([i[:-4] for i in ids]))
        return paths

    def argv(self, *extra: str) -> list[str]:
        return [
            "--emperor-path",
            str(self.emperor),
            "--emperor-stats-socket",
            self.emperor_stats,
            "--fastrouter-stats-socket",
            self.fastrouter_stats,
            *extra,
        ]

    def mtimes(self) -> dict[str, int]:
        return {p.name: os.lstat(p).st_mtime_ns for p in self.emperor.iterdir()}


@pytest.fixture
def site() -> Iterator[Site]:
    with tempfile.TemporaryDirectory(prefix="ur-cli-", dir="/tmp") as base:
        s = Site(Path(base))
        yield s
        for server in s.servers:
            server.close()


def refused(site: Site, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    before = site.mtimes()
    code = ur.main(site.argv(*extra))
    out, err = capsys.readouterr()
    assert code == ur.EXIT_USAGE, (out, err)
    assert site.mtimes() == before, "a refused run touched a config"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert out == ""
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--minimum-active-vassals", "-1"], "must be 0 or more"),
        (["--minimum-active-vassals", "x"], "is not a whole number"),
        (["--minimum-active-vassals", "4"], "leaves nothing to reload"),
        (["--minimum-active-vassals", "9"], "leaves nothing to reload"),
        (["--timeout", "0"], "greater than 0"),
        (["--timeout", "-5"], "greater than 0"),
        (["--timeout", "nan"], "is not a finite number"),
        (["--check-interval", "0"], "greater than 0"),
        (["--max-parallel", "0"], "must be 1 or more"),
        (["--vassal-config-file-suffix", ".yaml"], "no vassal config ending in '.yaml'"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_refused_with_one_line(
    site: Site, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    site.standard()
    assert message in refused(site, capsys, *extra)


def test_missing_required_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert ur.main([]) == ur.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "required" in err[0]


def test_emperor_path_missing(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.standard()
    argv = site.argv()
    argv[1] = str(site.base / "nope")
    assert ur.main(argv) == ur.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_emperor_path_not_a_directory(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    paths = site.standard()
    argv = site.argv()
    argv[1] = str(paths[0])
    assert ur.main(argv) == ur.EXIT_USAGE
    assert "is not a directory" in capsys.readouterr().err


def test_stats_socket_missing(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.vassals("a.ini", "b.ini")
    assert "does not exist" in refused(site, capsys)


def test_stats_socket_refusing(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.vassals("a.ini", "b.ini")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(site.emperor_stats)
    dead.close()  # the path stays, nobody listens
    assert "Connection refused" in refused(site, capsys)


def test_stats_socket_refusing_tcp(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.vassals("a.ini", "b.ini")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site.emperor_stats = f"127.0.0.1:{port}"
    assert "Connection refused" in refused(site, capsys)


def test_stats_socket_not_json(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.vassals("a.ini", "b.ini")
    site.serve(site.emperor_stats, b"HTTP/1.0 400 Bad Request\r\n\r\n")
    assert "did not answer with JSON" in refused(site, capsys)


def test_stats_sockets_swapped(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.standard()
    site.emperor_stats, site.fastrouter_stats = site.fastrouter_stats, site.emperor_stats
    assert "is it an emperor stats server?" in refused(site, capsys)


def test_unmatched_node_names_are_refused(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    ids = ["a.ini", "b.ini"]
    site.vassals(*ids)
    site.serve(site.emperor_stats, emperor_payload(ids))
    site.serve(site.fastrouter_stats, fastrouter_payload(["127.0.0.1:3031", "127.0.0.1:3032"]))
    assert "cannot tell which fastrouter node is which vassal" in refused(site, capsys)


def test_emperor_following_symlinks_is_refused(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    target = site.base / "vassal.ini"
    target.write_text("[uwsgi]\n")
    os.utime(target, (1000, 1000))  # the emperor's last_mod is the target's mtime
    ids = ["a.ini", "b.ini"]
    for i in ids:
        (site.emperor / i).symlink_to(target)
        os.utime(site.emperor / i, (1500, 1500), follow_symlinks=False)
    site.serve(site.emperor_stats, emperor_payload(ids))
    site.serve(site.fastrouter_stats, fastrouter_payload(["a", "b"]))
    assert "--emperor-nofollow" in refused(site, capsys)


def test_dry_run_prints_the_plan_and_touches_nothing(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.standard()
    before = site.mtimes()
    assert ur.main(site.argv("--dry-run", "--minimum-active-vassals", "2")) == ur.EXIT_OK
    out = capsys.readouterr().out
    assert site.mtimes() == before
    assert "vassal_01 (vassal_01.ini): live for domain.tld" in out
    assert "up to 2 reloading at once, about 2 reload times" in out


def test_dry_run_json(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.standard(2)
    assert ur.main(site.argv("--dry-run", "--json")) == ur.EXIT_OK
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["dry_run"] is True
    assert [v["name"] for v in report["vassals"]] == ["vassal_01", "vassal_02"]
    assert {v["outcome"] for v in report["vassals"]} == {"not started"}
    assert "dry run" in captured.err


def test_quiet_dry_run_prints_nothing(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.standard(2)
    assert ur.main(site.argv("--dry-run", "-q")) == ur.EXIT_OK
    assert capsys.readouterr() == ("", "")


def hold_lock(path: Path) -> subprocess.Popen[str]:
    code = (
        "import sys, uwsgi_reload as ur\n"
        "with ur.emperor_lock(sys.argv[1]):\n"
        "    print('locked', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(ur.__file__).parent,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "locked\n"
    return holder


def release(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.close()
    holder.stdout.close()
    assert holder.wait(10) == 0


def test_second_run_exits_3_naming_the_first(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.standard()
    before = site.mtimes()
    holder = hold_lock(site.emperor)
    try:
        assert ur.main(site.argv()) == ur.EXIT_LOCKED
    finally:
        release(holder)
    err = capsys.readouterr().err
    assert f"(pid {holder.pid})" in err
    assert site.mtimes() == before


def test_lock_is_released_when_the_holder_dies(site: Site) -> None:
    holder = hold_lock(site.emperor)
    holder.kill()
    holder.wait(10)
    for pipe in (holder.stdin, holder.stdout):
        assert pipe is not None
        pipe.close()
    with ur.emperor_lock(str(site.emperor)):
        pass


def test_lock_creates_no_file(site: Site) -> None:
    before = sorted(os.listdir(site.base))
    with ur.emperor_lock(str(site.emperor)):
        assert sorted(os.listdir(site.base)) == before
        assert os.listdir(site.emperor) == []


def test_lock_holder_reads_proc_locks(tmp_path: Path) -> None:
    st = os.stat(tmp_path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    locks = tmp_path / "locks"
    locks.write_text(
        f"1: POSIX  ADVISORY  WRITE 11 {dev}:{st.st_ino} 0 EOF\n"
        f"2: FLOCK  ADVISORY  WRITE 4242 {dev}:{st.st_ino} 0 EOF\n"
        f"2: -> FLOCK  ADVISORY  WRITE 77 {dev}:{st.st_ino} 0 EOF\n"
    )
    assert ur.lock_holder(st, str(locks)) == 4242
    assert ur.lock_holder(st, str(tmp_path / "missing")) is None


def test_runs_as_a_script_with_help() -> None:
    script = Path(ur.__file__)
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
    )
    for flag in (
        "--emperor-path",
        "--fastrouter-stats-socket",
        "--emperor-stats-socket",
        "--vassal-config-file-suffix",
        "--minimum-active-vassals",
        "--timeout",
        "--check-interval",
        "--quiet",
        "--dry-run",
        "--json",
        "--max-parallel",
    ):
        assert flag in result.stdout
    assert "130 interrupted" in result.stdout
