"""Safe deploys in simulation (no sleeping): canaries reloaded first and watched while they
serve (``--canary``, ``--soak``, ``--canary-check``), the way back when the new code fails
(``--revert-command``: exit 4, every vassal on the previous code), and warm-up requests before a
reloaded vassal goes back into rotation (``--warmup``)."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
from pathlib import Path

import pytest

import uwsgi_reload as ur
from tests.test_drain_logic import RouterSim
from tests.test_reload_logic import run_on
from tests.test_surge_logic import Deferred

NAMES = [f"vassal_{i:02d}.ini" for i in range(1, 5)]


class ReleaseSim(RouterSim):
    """A ``RouterSim`` whose vassals run a release: ``old`` before the run; a touch loads what
    the app link points to when the emperor acts on it (``release``). A release goes wrong one
    way: ``no-start`` never accepts (its master exits at start, and the emperor starts it again
    every second, loading what the link points to then), ``sick`` answers its probe with 500
    from ``after`` seconds after it is back, ``crash`` has its master die ``after`` seconds after
    it is back (the emperor starts it again: a new pid). ``revert`` (the team's command) points
    the link back to ``old``; ``check`` (the canary check) exits 1 when ``check_fails``."""

    def __init__(
        self, release: str, after: float = 3.0, check_fails: bool = False, announce: float = 0.1
    ) -> None:
        super().__init__(list(NAMES), reload=1.0, announce_delay=announce)
        self.release, self.after, self.check_fails = release, after, check_fails
        self.running = dict.fromkeys(self.vassals, "old")
        self.back_at: dict[str, float] = {}
        #: vassals whose master exits at start (``no-start``), with when it last started
        self.failing: dict[str, float] = {}
        self.commands: list[tuple[float, str]] = []
        #: warm-up requests each vassal answered since its reload; polls that found it in the
        #: router with fewer than ``warm`` of them (a user request there would find it cold)
        self.warmed = dict.fromkeys(self.vassals, 0)
        self.warm = 0
        self.cold_polls = dict.fromkeys(self.vassals, 0)

    def touch(self, path: str, mtime: int) -> None:
        vid = os.path.basename(path)
        (self.never_back.add if self.release == "no-start" else self.never_back.discard)(vid)
        super().touch(path, mtime)

    def _advance(self) -> None:
        waiting = {vid for vid, v in self.vassals.items() if v.registers_at is not None}
        super()._advance()
        for vid in waiting:
            v = self.vassals[vid]
            if v.registers_at is None:  # the emperor acted on the touch: the release loads
                self.running[vid] = self.release
                self.back_at[vid] = v.down_until or self.t
                self.warmed[vid] = 0
                if self.release == "no-start":
                    self.failing[vid] = self.t
        for vid, at in list(self.failing.items()):
            if self.t >= at + 1.0:  # it exited: the emperor starts it again, on today's link
                self.kill(vid, 1.0)
                self.running[vid] = self.release
                self.next_announce[vid] = self.t + 1.0 + self.announce_delay
                del self.failing[vid]
                if self.release == "no-start":
                    self.vassals[vid].down_until = math.inf
                    self.failing[vid] = self.t
        for vid, at in list(self.back_at.items()):
            if self.running[vid] == "crash" and self.t >= at + self.after:
                del self.back_at[vid]
                self.kill(vid, 1.0)  # its master died: the emperor starts it again

    def snapshot(self, options: ur.Options) -> ur.Snapshot:
        taken = super().snapshot(options)
        for vid, v in self.vassals.items():
            reloaded = vid in self.back_at and self.live(v)
            if reloaded and self.in_router[vid] and self.warmed[vid] < self.warm:
                self.cold_polls[vid] += 1
        return taken

    def probe(self, name: str, key: str, path: str, timeout: float) -> ur.ProbeResult:
        vid = self._vid(name)
        self.probes.append((name, key, path))
        self.warmed[vid] += path == "/warm"
        sick = self.running[vid] == "sick" and self.t >= self.back_at.get(vid, 0) + self.after
        status = 500 if sick else 200
        return ur.ProbeResult(status, f"GET {path} to {name} answered {status}")

    def run_command(self, command: str, timeout: float) -> ur.CommandResult:
        self.commands.append((self.t, command))
        if command == "revert":
            self.release = "old"
            return ur.CommandResult(0, "current -> releases/old")
        return ur.CommandResult(1 if self.check_fails else 0, "error rate 12%")

    def io(self) -> ur.Io:
        return dataclasses.replace(super().io(), run_command=self.run_command)

    def touches(self, vid: str) -> list[float]:
        return [t for t, v in self.touched if v == vid]


def deploy(stack: ReleaseSim, tmp_path: Path, **options: object) -> tuple[int, str]:
    given: dict[str, object] = {
        "minimum_active_vassals": 2,
        "timeout": 10.0,
        "subscription_server": "ss.sock",
        "probe": "/health",
        "canary": 1,
        "soak": 5.0,
        **options,
    }
    return run_on(stack, tmp_path, **given)


def test_a_good_release_goes_canary_first_then_soaks_then_the_rest(tmp_path: Path) -> None:
    stack = ReleaseSim("good")
    code, out = deploy(stack, tmp_path)
    assert code == ur.EXIT_OK, out
    assert set(stack.running.values()) == {"good"}, out
    canary_back = stack.touches("vassal_01.ini")[0] + 1.0
    rest = [t for vid in NAMES[1:] for t in stack.touches(vid)]
    # the rest start only after the canary served the whole soak, probed all along
    assert min(rest) >= canary_back + 5.0, out
    assert sum(1 for name, _, _ in stack.probes if "vassal_01" in name) >= 5, out
    assert "canary: 1 served 5s healthy" in out


@pytest.mark.parametrize(
    ("release", "judged"),
    [
        ("sick", "probe failed"),  # passes its first probe, answers 500 after 3 s of serving
        ("crash", "crashed under traffic"),  # its master dies after 3 s of serving
        ("no-start", "the new code failed on vassal_01"),  # never accepts: times out
    ],
)
def test_a_bad_release_is_caught_on_the_canary_and_reverted(
    tmp_path: Path, release: str, judged: str
) -> None:
    stack = ReleaseSim(release)
    code, out = deploy(stack, tmp_path, revert_command="revert")
    assert code == ur.EXIT_REVERTED, out
    assert judged in out, out
    # only the canary ever ran the new code; it runs the old one again, and serves
    assert [vid for _, vid in stack.touched if vid != "vassal_01.ini"] == [], out
    assert set(stack.running.values()) == {"old"}, out
    assert [c for _, c in stack.commands] == ["revert"], out
    assert all(stack.live(v) for v in stack.vassals.values()), out


def test_a_failing_canary_check_reverts(tmp_path: Path) -> None:
    stack = ReleaseSim("good", check_fails=True)
    code, out = deploy(stack, tmp_path, revert_command="revert", canary_check="check")
    assert code == ur.EXIT_REVERTED, out
    assert "--canary-check exited 1: error rate 12%" in out, out
    assert [c for _, c in stack.commands] == ["check", "revert"]
    assert set(stack.running.values()) == {"old"}


def test_without_a_revert_command_a_failed_canary_stops_as_before(tmp_path: Path) -> None:
    stack = ReleaseSim("sick")
    code, out = deploy(stack, tmp_path)
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    assert stack.commands == [] and stack.running["vassal_01.ini"] == "sick"
    assert all(stack.touches(vid) == [] for vid in NAMES[1:]), out
    assert "held back while the canaries went, and a canary failed" in out


def test_a_bad_release_after_the_canary_is_reverted_too(tmp_path: Path) -> None:
    """Without --canary, a timeout reverts every vassal already reloaded."""
    stack = ReleaseSim("no-start")
    code, out = deploy(stack, tmp_path, canary=0, revert_command="revert")
    assert code == ur.EXIT_REVERTED, out
    assert set(stack.running.values()) == {"old"}, out


def test_ctrl_c_during_the_soak_leaves_every_vassal_serving(tmp_path: Path) -> None:
    stack = ReleaseSim("good")
    stack.on_sleep.append((3.0, lambda: os.kill(os.getpid(), signal.SIGINT)))
    code, out = deploy(stack, tmp_path, revert_command="revert")
    assert code == ur.EXIT_INTERRUPTED, out
    assert stack.commands == [], out
    assert all(stack.live(v) for v in stack.vassals.values()), out
    assert all(stack.touches(vid) == [] for vid in NAMES[1:]), out


def warm_up(tmp_path: Path) -> tuple[int, ReleaseSim, str]:
    """Every vassal's master announces it as soon as it accepts, and each warm-up request is
    answered only after the run polled 3 more times (``Deferred``)."""
    stack = ReleaseSim("good", announce=0.0)
    stack.warm = 3
    Deferred.wired(stack, polls=3)
    code, out = deploy(stack, tmp_path, canary=0, probe=None, warmup="/warm", warmup_requests=3)
    return code, stack, out


def test_warm_up_keeps_a_vassal_out_of_rotation_until_it_is_warm(tmp_path: Path) -> None:
    """The tool takes a reloaded vassal out again when its master announces it, until its
    warm-up requests are answered, and only then subscribes it: a poll finds it cold in the
    router at most once, the moment its master announced it."""
    code, stack, out = warm_up(tmp_path)
    assert code == ur.EXIT_OK, out
    assert all(stack.warmed[vid] == 3 for vid in NAMES), stack.warmed
    assert max(stack.cold_polls.values()) <= 1, (stack.cold_polls, out)
    assert "unsubscribed again" in out, out


def test_control_warm_up_without_keeping_the_vassal_out_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ur.Rollout, "_warming", lambda self, v: False)
    _, stack, out = warm_up(tmp_path)
    assert max(stack.cold_polls.values()) > 1, (stack.cold_polls, out)


def test_bad_combinations_are_refused_before_anything_is_touched(tmp_path: Path) -> None:
    stack = ReleaseSim("good")
    with pytest.raises(ur.ReloadError, match="--warmup needs --subscription-server"):
        deploy(stack, tmp_path, subscription_server=None, warmup="/warm")
    with pytest.raises(ur.ReloadError, match="--canary-check needs --canary"):
        deploy(stack, tmp_path, canary=0, canary_check="check")
    assert stack.touched == []


def test_pick_canaries_takes_k_per_key() -> None:
    fleet = [ur.VassalReload(f"{n}.ini", n, f"/e/{n}.ini") for n in ("a", "b", "c", "d")]
    vassals = {v.id: ur.EmperorVassal(v.id, 1, 0, 0, True, True) for v in fleet}
    nodes = [
        ur.Node("k1", "/run/a.sock", False, 0),
        ur.Node("k1", "/run/b.sock", False, 0),
        ur.Node("k2", "/run/b.sock", False, 0),
        ur.Node("k2", "/run/c.sock", False, 0),
        ur.Node("k2", "/run/d.sock", False, 0),
    ]
    snapshot = ur.Snapshot(vassals, nodes)
    # b serves both keys: it is k2's canary as well as k1's second
    assert ur.pick_canaries(fleet, snapshot, 1) == ["a.ini", "b.ini"]
    assert ur.pick_canaries(fleet, snapshot, 2) == ["a.ini", "b.ini", "c.ini"]


def test_the_dry_run_names_the_canaries_the_revert_and_the_warm_up(tmp_path: Path) -> None:
    stack = ReleaseSim("good")
    code, out = deploy(
        stack, tmp_path, dry_run=True, revert_command="revert", warmup="/warm", canary=2
    )
    assert code == ur.EXIT_OK and stack.touched == [], out
    assert "canary: vassal_01, vassal_02 first, watched for 5s" in out, out
    assert "revert: when the new code fails, run 'revert'" in out, out
    assert "warm-up: GET /warm x 10" in out, out
