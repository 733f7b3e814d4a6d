"""The reload tool's decision logic, table-driven, and whole runs against a simulated emperor."""

from __future__ import annotations

import io
import json
import math
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import uwsgi_reload as ur


def vassal(
    vid: str = "a.ini",
    pid: int = 10,
    respawns: int = 0,
    last_mod: int = 1000,
    accepting: bool = True,
) -> ur.EmperorVassal:
    return ur.EmperorVassal(
        id=vid, pid=pid, respawns=respawns, last_mod=last_mod, accepting=accepting, ready=True
    )


def node(name: str, key: str = "k", dead: bool = False, ref: int = 0) -> ur.Node:
    return ur.Node(key=key, name=name, death_mark=dead, ref=ref)


@pytest.mark.parametrize(
    ("node_name", "expected"),
    [
        ("/run/uwsgi/vassal_01.sock", "vassal_01"),
        ("/run/uwsgi/shop.v2.sock", "shop.v2"),
        ("/run/uwsgi/plain", "plain"),
        ("relative.sock", "relative"),
        ("127.0.0.1:3031", "127.0.0"),
    ],
)
def test_node_vassal_name_keeps_dots(node_name: str, expected: str) -> None:
    assert ur.node_vassal_name(node_name) == expected


@pytest.mark.parametrize(
    ("emperor", "nodes", "expected"),
    [
        (vassal(), [node("/r/a.sock")], {"k"}),
        (vassal(accepting=False), [node("/r/a.sock")], set()),
        (None, [node("/r/a.sock")], set()),
        (vassal(), [node("/r/a.sock", dead=True)], set()),
        (vassal(), [node("/r/b.sock")], set()),
        (vassal(), [node("/r/a.sock", "k1"), node("/r/a.sock", "k2")], {"k1", "k2"}),
        # a name that only shares a prefix is another vassal
        (vassal(), [node("/r/a.b.sock")], set()),
    ],
)
def test_live_keys(
    emperor: ur.EmperorVassal | None, nodes: list[ur.Node], expected: set[str]
) -> None:
    assert ur.live_keys(emperor, "a", nodes) == expected


@pytest.mark.parametrize(
    ("current", "keys", "stage"),
    [
        (vassal(), {"k"}, ur.Stage.TOUCHED),  # nothing moved: still the old instance
        (None, set(), ur.Stage.TOUCHED),
        (vassal(respawns=1, accepting=False), set(), ur.Stage.REGISTERED),
        (vassal(last_mod=1001, accepting=False), set(), ur.Stage.REGISTERED),
        (vassal(respawns=1), set(), ur.Stage.ACCEPTING),
        (vassal(respawns=1), {"k"}, ur.Stage.BACK),
        (vassal(last_mod=1001), {"k"}, ur.Stage.BACK),
        # died and was re-added by the emperor: new pid, respawns back to 0
        (vassal(pid=11), {"k"}, ur.Stage.BACK),
    ],
)
def test_reload_stage_back_means_back(
    current: ur.EmperorVassal | None, keys: set[str], stage: ur.Stage
) -> None:
    assert ur.reload_stage(vassal(), current, frozenset(keys)) is stage


@pytest.mark.parametrize(
    ("now", "last_mod", "expected"),
    [(2000.7, 1000, 2000), (1000.2, 1000, 1001), (999.0, 1000, 1001), (1001.0, 1000, 1001)],
)
def test_touch_mtime_moves_past_last_mod(now: float, last_mod: int, expected: int) -> None:
    assert ur.touch_mtime(now, last_mod) == expected
    assert ur.touch_mtime(now, last_mod) > last_mod


@pytest.mark.parametrize(
    ("now", "last_mod", "current", "expected"),
    [
        (1000.2, 990, 1000.0, 1001),  # touched by someone else this second, not yet registered
        (1000.2, 1000, 1000.0, 1001),  # registered: the same as without ``current``
        (2000.7, 1000, 1000.0, 2000),
        (999.0, 1000, 5000.0, 5001),  # a pending mtime from the future
    ],
)
def test_touch_mtime_moves_past_a_pending_touch(
    now: float, last_mod: int, current: float, expected: int
) -> None:
    assert ur.touch_mtime(now, last_mod, current) == expected


def test_touch_moves_the_link_past_its_own_mtime(tmp_path: Path) -> None:
    """Someone touched the config at second S and the emperor has not rescanned: our touch,
    computed from the old ``last_mod``, would also be S and be lost."""
    target = tmp_path / "vassal.ini"
    target.write_text("[uwsgi]\n")
    link = tmp_path / "vassal_01.ini"
    link.symlink_to(target)
    os.utime(link, (1000, 1000), follow_symlinks=False)
    ur.touch(str(link), ur.touch_mtime(1000.2, 990))
    assert link.lstat().st_mtime == 1001
    assert target.stat().st_mtime != 1001  # the link, never its target


K = frozenset({"k"})
K2 = frozenset({"k2"})
BOTH = frozenset({"k", "k2"})


@pytest.mark.parametrize(
    ("candidates", "live", "minimum", "slots", "expected"),
    [
        (["a", "b", "c", "d"], dict(a=K, b=K, c=K, d=K), 1, None, ["a", "b", "c"]),
        (["a", "b", "c", "d"], dict(a=K, b=K, c=K, d=K), 3, None, ["a"]),
        (["a", "b", "c", "d"], dict(a=K, b=K, c=K, d=K), 0, None, ["a", "b", "c", "d"]),
        (["a", "b", "c", "d"], dict(a=K, b=K, c=K, d=K), 1, 2, ["a", "b"]),
        # not-live vassals cost nothing and go first
        (["a", "b", "c"], dict(a=K, b=K), 1, None, ["c", "a"]),
        (["a", "b", "c"], dict(a=K, b=K), 2, None, ["c"]),
        (["a", "b", "c"], dict(a=K, b=K), 2, 0, []),
        # in-flight vassals are absent from `live`: the two left must both stay
        (["c", "d"], dict(c=K, d=K), 2, None, []),
        # per key: each key keeps its minimum
        (["a", "b", "c", "d"], dict(a=K, b=K, c=K2, d=K2), 1, None, ["a", "c"]),
        (["a", "b", "c"], dict(a=BOTH, b=K, c=K2), 1, None, ["a"]),
        ([], dict(a=K), 0, None, []),
    ],
)
def test_pick_reloads(
    candidates: list[str],
    live: dict[str, frozenset[str]],
    minimum: int,
    slots: int | None,
    expected: list[str],
) -> None:
    assert ur.pick_reloads(candidates, live, minimum, slots) == expected


@pytest.mark.parametrize(
    ("n", "m", "rounds"), [(4, 1, 2), (4, 3, 4), (8, 4, 2), (8, 0, 1), (2, 2, 0)]
)
def test_rounds_needed(n: int, m: int, rounds: int) -> None:
    assert ur.rounds_needed(n, m) == rounds


# ---------------------------------------------------------------------------------------------
# The core: one phase per vassal, moved by step() and by what the driver reports
# ---------------------------------------------------------------------------------------------

P = ur.Phase
E = ur.EventKind


def fleet(*names: str) -> list[ur.VassalReload]:
    return [ur.VassalReload(id=f"{n}.ini", name=n, config=f"/e/{n}.ini") for n in names]


def snap(**vassals: tuple[int, bool, bool]) -> ur.Snapshot:
    """name=(respawns, accepting, live in the router) for each vassal."""
    return ur.Snapshot(
        {
            f"{n}.ini": vassal(f"{n}.ini", respawns=r, accepting=a)
            for n, (r, a, _) in vassals.items()
        },
        [node(f"/r/{n}.sock") for n, (_, _, live) in vassals.items() if live],
    )


def phases(rollout: ur.Rollout) -> dict[str, ur.Phase]:
    return {v.name: v.phase for v in rollout.vassals.values()}


UP = (0, True, True)


@pytest.mark.parametrize(
    ("a", "phase", "kinds"),
    [
        ((0, True, True), P.RELOADING, []),  # the emperor has not acted on the touch yet
        ((1, False, False), P.STARTING, []),
        ((1, True, False), P.SUBSCRIBING, []),  # accepting, its node not yet live
        ((1, True, True), P.BACK, [("a", E.BACK), ("b", E.TRIGGERED)]),
    ],
)
def test_step_moves_a_reload_by_what_the_stats_show(
    a: tuple[int, bool, bool], phase: ur.Phase, kinds: list[tuple[str, ur.EventKind]]
) -> None:
    rollout = ur.Rollout(fleet("a", "b"), ur.Rules(minimum=1, timeout=10))
    first = rollout.step(snap(a=UP, b=UP), 0.0)
    assert [(e.vassal.name, e.kind) for e in first] == [("a", E.TRIGGERED)]
    assert phases(rollout) == {"a": P.RELOADING, "b": P.PENDING}
    events = rollout.step(snap(a=a, b=UP), 0.5)
    assert rollout.vassals["a.ini"].phase is phase
    assert [(e.vassal.name, e.kind) for e in events] == kinds


def test_a_timeout_keeps_how_far_it_got() -> None:
    rollout = ur.Rollout(fleet("a", "b"), ur.Rules(minimum=1, timeout=1))
    rollout.step(snap(a=UP, b=UP), 0.0)
    rollout.step(snap(a=(1, False, False), b=UP), 0.5)
    events = rollout.step(snap(a=(1, False, False), b=UP), 1.0)
    a = rollout.vassals["a.ini"]
    assert (a.phase, a.stalled_in) == (P.TIMED_OUT, P.STARTING)
    # nothing in flight, b may not go without a back: not started, for the minimum
    assert [(e.vassal.name, e.kind) for e in events] == [("a", E.TIMED_OUT), ("b", E.NOT_STARTED)]
    b = rollout.vassals["b.ini"]
    assert (b.phase, b.not_started) == (P.NOT_STARTED, ur.NotStarted.MINIMUM)
    assert ur.outcome(a.phase) is ur.Outcome.TIMED_OUT
    assert ur.vassal_detail(a, rollout) == ur.HOW_FAR[P.STARTING]
    assert rollout.done


def test_a_vassal_the_emperor_does_not_run_is_waited_for_then_not_started() -> None:
    """The emperor may list it later (a new config, a vassal between two restarts)."""
    rollout = ur.Rollout(fleet("a", "b", "gone"), ur.Rules(minimum=1, timeout=10))
    rollout.step(snap(a=UP, b=UP), 0.0)
    rollout.step(snap(a=(1, True, True), b=UP), 1.0)
    rollout.step(snap(a=(1, True, True), b=(1, True, True)), 2.0)
    assert phases(rollout) == {"a": P.BACK, "b": P.BACK, "gone": P.PENDING}
    rollout.step(snap(a=(1, True, True), b=(1, True, True)), 10.0)
    assert phases(rollout) == {"a": P.BACK, "b": P.BACK, "gone": P.NOT_STARTED}
    assert rollout.vassals["gone.ini"].not_started is ur.NotStarted.UNKNOWN


def test_a_failed_touch_is_reported_through_the_core() -> None:
    rollout = ur.Rollout(fleet("a", "b"), ur.Rules(minimum=1, timeout=10))
    (event,) = rollout.step(snap(a=UP, b=UP), 0.0)
    assert event.touches
    (failed,) = rollout.act_failed(event.vassal, "[Errno 1] Operation not permitted", 0.0)
    assert (failed.kind, failed.phase) == (E.FAILED, P.TOUCH_FAILED)
    assert ur.outcome(event.vassal.phase) is ur.Outcome.FAILED


def test_abandon_leaves_in_flight_ones_where_they_were() -> None:
    rollout = ur.Rollout(fleet("a", "b", "c"), ur.Rules(minimum=1, timeout=10))
    rollout.step(snap(a=UP, b=UP, c=UP), 0.0)
    rollout.step(snap(a=(1, False, False), b=(1, False, False), c=UP), 0.5)
    assert rollout.abandon("interrupted by SIGINT", 0.6) == []
    a, c = rollout.vassals["a.ini"], rollout.vassals["c.ini"]
    assert (a.phase, a.stalled_in) == (P.ABANDONED, P.STARTING)
    assert (c.phase, c.not_started) == (P.NOT_STARTED, ur.NotStarted.ABANDONED)
    assert ur.outcome(a.phase) is ur.Outcome.IN_FLIGHT
    assert rollout.done


def test_every_phase_has_words_and_no_phase_is_words() -> None:
    for phase in ur.Phase:
        assert not isinstance(phase.value, str)
        assert isinstance(ur.outcome(phase), ur.Outcome)
    assert set(ur.HOW_FAR) == ur.IN_FLIGHT
    assert {ur.outcome(p) for p in ur.IN_FLIGHT} == {ur.Outcome.IN_FLIGHT}
    assert ur.outcome(P.BACK) is ur.Outcome.RELOADED


# ---------------------------------------------------------------------------------------------
# Whole runs against a simulated emperor + fastrouter: no sockets, no sleeping
# ---------------------------------------------------------------------------------------------


class SimVassal:
    def __init__(self, vid: str, pid: int) -> None:
        self.vid, self.pid, self.respawns, self.last_mod = vid, pid, 0, 1000
        self.down_until: float | None = None  # not live until then (math.inf: never)
        self.registers_at: float | None = None  # the emperor acts on a touch at this time
        self.pending_mtime = 0


class SimStack:
    """An emperor that registers a touch after ``lag`` and brings a vassal back after ``reload``."""

    def __init__(self, names: list[str], reload: float = 1.0, lag: float = 0.05) -> None:
        self.t = 0.0
        self.reload, self.lag = reload, lag
        self.vassals = {n: SimVassal(n, 100 + i) for i, n in enumerate(names)}
        self.reload_times: dict[str, float] = {}
        self.never_back: set[str] = set()
        self.fewest_live = len(names)
        self.touched: list[tuple[float, str]] = []
        self.on_sleep: list[tuple[float, object]] = []

    def live(self, v: SimVassal) -> bool:
        return v.down_until is None or self.t >= v.down_until

    def _advance(self) -> None:
        for v in self.vassals.values():
            if v.registers_at is not None and self.t >= v.registers_at:
                v.registers_at = None
                v.respawns += 1
                v.last_mod = v.pending_mtime
                back = self.reload_times.get(v.vid, self.reload)
                v.down_until = math.inf if v.vid in self.never_back else self.t + back
        self.fewest_live = min(self.fewest_live, sum(self.live(v) for v in self.vassals.values()))

    def touch(self, path: str, mtime: int) -> None:
        v = self.vassals[os.path.basename(path)]
        assert mtime > v.last_mod
        v.pending_mtime = mtime
        v.registers_at = self.t + self.lag
        self.touched.append((self.t, v.vid))

    def kill(self, vid: str, down_for: float) -> None:
        """A vassal that dies comes back as a new entry: new pid, respawns 0."""
        v = self.vassals[vid]
        v.pid += 1000
        v.respawns = 0
        v.down_until = self.t + down_for

    def snapshot(self, options: ur.Options) -> ur.Snapshot:
        self._advance()
        vassals = {
            v.vid: vassal(v.vid, v.pid, v.respawns, v.last_mod, accepting=self.live(v))
            for v in self.vassals.values()
        }
        nodes = [
            node(f"/run/{ur.strip_suffix(v.vid, '.ini')}.sock")
            for v in self.vassals.values()
            if self.live(v)
        ]
        return ur.Snapshot(vassals, nodes)

    def sleep(self, seconds: float) -> None:
        for at, action in list(self.on_sleep):
            if self.t >= at:
                self.on_sleep.remove((at, action))
                action()  # type: ignore[operator]
        self.t += seconds
        self._advance()

    def io(self) -> ur.Io:
        return ur.Io(
            clock=lambda: self.t,
            wall_clock=lambda: 2000.0 + self.t,
            sleep=self.sleep,
            snapshot=self.snapshot,
            touch=self.touch,
            # no /proc: its vassals are found by name (tests/test_fleet_core.py finds them by
            # the sockets their masters listen on)
            sockets=lambda pids: {},
        )


@pytest.fixture
def emperor_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def per_pid(
    sockets: Callable[[int], tuple[str, ...]],
) -> Callable[[Iterable[int]], dict[int, tuple[str, ...]]]:
    """``Io.sockets`` from a fake that answers for one pid (an ``OSError``: it cannot be read)."""

    def every(pids: Iterable[int]) -> dict[int, tuple[str, ...]]:
        found: dict[int, tuple[str, ...]] = {}
        for pid in pids:
            try:
                found[pid] = sockets(pid)
            except OSError:
                found[pid] = ()
        return found

    return every


def run_on(
    stack: SimStack, emperor_dir: Path, setup: object = None, **options: object
) -> tuple[int, str]:
    """Run the tool on a simulated stack (a config file per vassal); return (exit code, output)."""
    for name in stack.vassals:
        (emperor_dir / name).write_text("[uwsgi]\n")
    if setup is not None:
        setup(stack)  # type: ignore[operator]
    given: dict[str, object] = {"fastrouter_stats_socket": "unused", **options}
    opts = ur.Options(
        emperor_path=str(emperor_dir),
        emperor_stats_socket="unused",
        **given,  # type: ignore[arg-type]
    )
    out = io.StringIO()
    code = ur.run(opts, ur.Reporter(False, out, out), stack.io())
    return code, out.getvalue()


def simulate(
    emperor_dir: Path,
    n: int = 4,
    minimum: int = 1,
    timeout: float = 10.0,
    max_parallel: int | None = None,
    names: list[str] | None = None,
    setup: object = None,
    as_json: bool = False,
    **stack_args: float,
) -> tuple[int, SimStack, str]:
    stack = SimStack(names or [f"vassal_{i:02d}.ini" for i in range(1, n + 1)], **stack_args)
    code, output = run_on(
        stack,
        emperor_dir,
        setup,
        minimum_active_vassals=minimum,
        timeout=timeout,
        max_parallel=max_parallel,
        json=as_json,
    )
    return code, stack, output


@pytest.mark.parametrize(("n", "minimum"), [(2, 1), (4, 1), (4, 2), (4, 3), (8, 4), (5, 2)])
def test_run_keeps_minimum_and_is_pipelined(emperor_dir: Path, n: int, minimum: int) -> None:
    code, stack, out = simulate(emperor_dir, n=n, minimum=minimum)
    assert code == ur.EXIT_OK, out
    assert stack.fewest_live >= minimum, out
    assert all(v.respawns == 1 for v in stack.vassals.values())
    # each reload takes lag + 1 s; polling adds at most one interval per round
    rounds = ur.rounds_needed(n, minimum)
    assert stack.t <= rounds * (1.05 + 0.2) + 0.2, out
    assert f"reloaded {n} of {n}" in out


def test_pipelined_next_starts_as_soon_as_one_is_back(emperor_dir: Path) -> None:
    def uneven(stack: SimStack) -> None:
        stack.reload_times = {"vassal_01.ini": 0.5, "vassal_02.ini": 3.0}

    code, stack, _ = simulate(emperor_dir, n=3, minimum=1, setup=uneven)
    assert code == ur.EXIT_OK
    started = dict((vid, t) for t, vid in stack.touched)
    # vassal_03 waits only for the fast one, not for the whole first round
    assert started["vassal_03.ini"] < 1.0


def test_touch_not_registered_yet_is_not_back(emperor_dir: Path) -> None:
    # The emperor is slow to notice: stats still show the old instance, accepting and live.
    code, stack, out = simulate(emperor_dir, n=2, minimum=1, lag=2.0)
    assert code == ur.EXIT_OK
    assert stack.fewest_live >= 1
    assert stack.touched[1][0] >= 3.0, out


def test_never_back_times_out_and_keeps_the_minimum(emperor_dir: Path) -> None:
    def stuck(stack: SimStack) -> None:
        stack.never_back = {"vassal_01.ini", "vassal_02.ini"}

    code, stack, out = simulate(emperor_dir, n=4, minimum=2, timeout=3.0, setup=stuck)
    assert code == ur.EXIT_NOT_ALL_RELOADED
    assert stack.fewest_live >= 2
    # the two stuck vassals used up the margin: nothing else may go down
    assert [vid for _, vid in stack.touched] == ["vassal_01.ini", "vassal_02.ini"]
    assert "timed out after 3s: reloading, but never accepting again" in out
    assert "vassal_03: not started: reloading it would leave fewer than 2 live" in out


def test_timeout_of_one_lets_the_others_go_when_the_minimum_allows(emperor_dir: Path) -> None:
    def stuck(stack: SimStack) -> None:
        stack.never_back = {"vassal_01.ini"}

    code, stack, out = simulate(emperor_dir, n=4, minimum=1, timeout=3.0, setup=stuck)
    assert code == ur.EXIT_NOT_ALL_RELOADED
    assert stack.fewest_live >= 1
    assert sorted(vid for _, vid in stack.touched) == [f"vassal_0{i}.ini" for i in range(1, 5)]
    assert "reloaded 3 of 4" in out


def test_emperor_never_registers_a_symlink_touch_hints_nofollow(emperor_dir: Path) -> None:
    target = emperor_dir.parent / "target.ini"
    target.write_text("[uwsgi]\n")
    names = ["a.ini", "b.ini"]

    def links(stack: SimStack) -> None:
        for name in names:
            (emperor_dir / name).unlink()
            (emperor_dir / name).symlink_to(target)
        stack.lag = math.inf

    code, _, out = simulate(emperor_dir, names=names, timeout=1.0, setup=links)
    assert code == ur.EXIT_NOT_ALL_RELOADED
    assert "the emperor never registered the touch" in out
    assert "--emperor-nofollow" in out


def test_a_vassal_killed_during_the_run_is_not_counted_live(emperor_dir: Path) -> None:
    def kill_later(stack: SimStack) -> None:
        stack.on_sleep.append((0.5, lambda: stack.kill("vassal_03.ini", down_for=5.0)))

    code, stack, out = simulate(emperor_dir, n=4, minimum=2, setup=kill_later)
    assert code == ur.EXIT_OK, out
    touched_at = {vid: t for t, vid in stack.touched}
    # 01 and 02 went first; 03 died on its own at 0.5 s, leaving 04 as the only live one. The
    # emperor restarts 03 with the current code: it is waited for, not touched mid-start. 04
    # must wait until 01 and 02 are back.
    assert "vassal_03.ini" not in touched_at
    assert "vassal_03: restarted by the emperor (pid 102 -> 1102): not touched" in out
    assert "vassal_03: back after" in out
    assert touched_at["vassal_04.ini"] >= 1.05


def test_max_parallel_caps_reloads_in_flight(emperor_dir: Path) -> None:
    code, stack, _ = simulate(emperor_dir, n=4, minimum=0, max_parallel=1)
    assert code == ur.EXIT_OK
    assert stack.fewest_live >= 3
    assert stack.t >= 4.0


def test_names_with_dots(emperor_dir: Path) -> None:
    names = ["shop.v1.ini", "shop.v2.ini", "shop.ini"]
    code, stack, out = simulate(emperor_dir, names=names, minimum=1)
    assert code == ur.EXIT_OK, out
    assert stack.fewest_live >= 1


def test_sigint_starts_nothing_more_and_exits_130(emperor_dir: Path) -> None:
    def interrupt(stack: SimStack) -> None:
        stack.on_sleep.append((0.3, lambda: os.kill(os.getpid(), signal.SIGINT)))

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a job a shell started in background
    code, stack, out = simulate(emperor_dir, n=4, minimum=3, setup=interrupt)
    assert code == ur.EXIT_INTERRUPTED
    assert [vid for _, vid in stack.touched] == ["vassal_01.ini"]
    assert "vassal_01: in flight" in out
    assert "vassal_02: not started: interrupted by SIGINT" in out
    assert signal.getsignal(signal.SIGINT) is before  # the run put its handler back


def test_a_vassal_the_emperor_is_starting_is_touched_only_once_it_accepts(
    emperor_dir: Path,
) -> None:
    """uWSGI 2.0 loses a reload that reaches a vassal before it accepts: it waits for that."""

    def one_starting(stack: SimStack) -> None:
        stack.vassals["vassal_04.ini"].down_until = 0.5

    code, stack, out = simulate(emperor_dir, n=4, minimum=3, setup=one_starting)
    assert code == ur.EXIT_OK, out
    assert stack.touched[0][0] >= 0.5, out
    assert all(t >= 0.5 for t, vid in stack.touched if vid == "vassal_04.ini"), out


def test_a_vassal_never_accepting_is_not_started_after_the_timeout(emperor_dir: Path) -> None:
    def one_hung(stack: SimStack) -> None:
        stack.vassals["vassal_04.ini"].down_until = math.inf

    code, stack, out = simulate(emperor_dir, n=4, minimum=1, timeout=3.0, setup=one_hung)
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    assert "vassal_04.ini" not in [vid for _, vid in stack.touched], out
    assert "vassal_04: not started: never accepting while the emperor started it (3s)" in out


def test_json_report(emperor_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def stuck(stack: SimStack) -> None:
        stack.never_back = {"vassal_02.ini"}

    code, _, _ = simulate(emperor_dir, n=3, minimum=1, timeout=2.0, setup=stuck, as_json=True)
    report = json.loads(capsys.readouterr().out)
    assert code == report["exit_code"] == ur.EXIT_NOT_ALL_RELOADED
    assert report["minimum_active_vassals"] == 1
    assert report["lowest_live"] == {"k": 1}
    by_name = {v["name"]: v for v in report["vassals"]}
    assert by_name["vassal_01"]["outcome"] == "reloaded"
    assert by_name["vassal_01"]["triggered"] == 0.0
    assert by_name["vassal_01"]["duration"] == pytest.approx(1.1, abs=0.11)
    assert 0.0 < by_name["vassal_01"]["accepting"] <= by_name["vassal_01"]["back"]
    assert by_name["vassal_02"]["outcome"] == "timed out"
    assert by_name["vassal_02"]["back"] is None
    assert by_name["vassal_02"]["accepting"] is None
    assert "never accepting" in by_name["vassal_02"]["detail"]
    assert by_name["vassal_03"]["outcome"] == "reloaded"


def test_a_move_the_table_does_not_list_is_refused() -> None:
    v = ur.VassalReload("a.ini", "a", "/e/a.ini")
    with pytest.raises(ur.IllegalMove, match="PENDING -> BACK"):
        v.move(P.BACK)
    v.move(P.RELOADING)
    v.move(P.RELOADING)  # staying is no move
    t = ur.Twin("a.surge-1.ini", "a.surge-1", "/e/a.surge-1.ini")
    with pytest.raises(ur.IllegalMove):
        t.move(ur.TwinPhase.LIVE)


@pytest.mark.parametrize(
    ("heading", "table"),
    [("A vassal's phases", ur.PHASE_MOVES), ("A twin's phases", ur.TWIN_MOVES)],
)
def test_the_design_doc_draws_each_phase_table(
    heading: str, table: dict[Any, frozenset[Any]]
) -> None:
    text = (Path(__file__).parent.parent / "docs" / "design.md").read_text(encoding="utf-8")
    diagram = text.split(f"### {heading}", 1)[1].split("```mermaid", 1)[1].split("```", 1)[0]
    drawn = {tuple(line.split(" --> ")) for line in diagram.splitlines() if " --> " in line}
    legal = {(a.name, b.name) for a, moves in table.items() for b in moves}
    assert {(a.strip(), b.strip()) for a, b in drawn} == legal
