"""Surge (``--max-surge``): twins planned, added, counted and removed, in simulation (no
sleeping): whole runs against an emperor that spawns a vassal for every new link in its
directory and stops it when its link goes, behind a router with drain; crash safety; the
capacity (live nodes per key) never below N with m = N and K >= 1."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uwsgi_reload as ur
from tests.test_drain_logic import KEY, RouterSim
from tests.test_reload_logic import node, per_pid, run_on, vassal

T = ur.TwinPhase


class SurgeSim(RouterSim):
    """A ``RouterSim`` whose emperor watches its directory: a new link is a new vassal, live
    ``twin_start`` seconds later (never, with ``broken_twins``); a removed link stops its vassal
    at once (uWSGI's ``kill_them_all``: it unsubscribes, its requests in flight are lost) and
    the emperor lists it ``twin_stop`` seconds more. ``fewest_in_router`` is the capacity."""

    def __init__(self, names: list[str], emperor_dir: Path, **kwargs: float) -> None:
        self.twin_start = kwargs.pop("twin_start", 1.0)
        self.twin_stop = kwargs.pop("twin_stop", 0.3)
        self.broken_twins = bool(kwargs.pop("broken_twins", False))
        self.dir = emperor_dir
        self.stopping: dict[str, float] = {}
        #: requests a removed twin still held when its link went
        self.lost = 0
        self.spawned: list[str] = []
        self._next_pid = 5000
        super().__init__(names, **kwargs)
        self.originals = set(names)

    def _scan(self) -> None:
        links = {p.name for p in self.dir.iterdir() if p.name.endswith(".ini")}
        for vid in sorted(links - set(self.vassals)):
            v = type(next(iter(self.vassals.values())))(vid, self._next_pid)
            self._next_pid += 1
            v.down_until = math.inf if self.broken_twins else self.t + self.twin_start
            self.vassals[vid] = v
            self.in_router[vid] = False
            self.next_announce[vid] = v.down_until + self.announce_delay
            self.requests[vid] = []
            self.spawned.append(vid)
        for vid in list(self.vassals):
            if vid in links or vid in self.originals:
                continue
            if vid not in self.stopping:
                self.stopping[vid] = self.t + self.twin_stop
                self.lost += self.ref(vid)
                self.requests[vid] = []
                self.in_router[vid] = False
                self.vassals[vid].down_until = math.inf
            elif self.t >= self.stopping[vid]:
                del self.vassals[vid], self.in_router[vid], self.next_announce[vid]
                del self.requests[vid], self.stopping[vid]

    def _advance(self) -> None:
        if hasattr(self, "originals"):
            self._scan()
        super()._advance()


def surge_run(
    emperor_dir: Path,
    n: int = 1,
    minimum: int = 1,
    surge: int = 1,
    *,
    drain: bool = True,
    probe: str | None = None,
    timeout: float = 10.0,
    setup: object = None,
    as_json: bool = False,
    **stack_args: float,
) -> tuple[int, SurgeSim, str]:
    stack = SurgeSim([f"vassal_{i:02d}.ini" for i in range(1, n + 1)], emperor_dir, **stack_args)
    code, output = run_on(
        stack,
        emperor_dir,
        setup,
        minimum_active_vassals=minimum,
        timeout=timeout,
        subscription_server="ss.sock" if drain else None,
        probe=probe,
        max_surge=surge,
        json=as_json,
    )
    return code, stack, output


def links(emperor_dir: Path) -> set[str]:
    return {p.name for p in emperor_dir.iterdir()}


def originals(n: int) -> set[str]:
    return {f"vassal_{i:02d}.ini" for i in range(1, n + 1)}


# ---------------------------------------------------------------------------------------------
# Planning: names, keys, ports
# ---------------------------------------------------------------------------------------------


def fleet_of(*names: str) -> list[ur.VassalReload]:
    return [ur.VassalReload(id=f"{n}.ini", name=n, config=f"/e/{n}.ini") for n in names]


def snapshot_of(**keys: tuple[str, ...]) -> ur.Snapshot:
    vassals = {f"{n}.ini": vassal(f"{n}.ini") for n in keys}
    nodes = [node(f"/r/{n}.sock", key) for n, ks in keys.items() for key in ks]
    return ur.Snapshot(vassals, nodes)


def plan(
    fleet: list[ur.VassalReload],
    snap: ur.Snapshot,
    surge: int,
    taken: AbstractSet[str] = frozenset(),
) -> list[tuple[str, str]]:
    twins = ur.plan_twins(fleet, snap, surge, ".ini", taken, lambda c: c, lambda p, h: True)
    return [(t.id, t.of) for t in twins]


@pytest.mark.parametrize(
    ("names", "keys", "surge", "taken", "expected"),
    [
        (["a"], {"a": ("k",)}, 1, set(), [("a.surge-1.ini", "a.ini")]),
        # twins of the originals in turn; a name already there is skipped
        (
            ["a", "b"],
            {"a": ("k",), "b": ("k",)},
            3,
            {"a.surge-1.ini"},
            [("a.surge-2.ini", "a.ini"), ("b.surge-1.ini", "b.ini"), ("a.surge-3.ini", "a.ini")],
        ),
        # dots survive: %n cuts at the last dot only
        (["shop.v2"], {"shop.v2": ("k",)}, 1, set(), [("shop.v2.surge-1.ini", "shop.v2.ini")]),
        # per key: a twin of a vassal serving two keys counts for both
        (
            ["a", "b"],
            {"a": ("k1", "k2"), "b": ("k2",)},
            1,
            set(),
            [("a.surge-1.ini", "a.ini")],
        ),
        (
            ["a", "b"],
            {"a": ("k1",), "b": ("k2",)},
            2,
            set(),
            [
                ("a.surge-1.ini", "a.ini"),
                ("a.surge-2.ini", "a.ini"),
                ("b.surge-1.ini", "b.ini"),
                ("b.surge-2.ini", "b.ini"),
            ],
        ),
        # named after its port: the next free port past every port-named link
        (["8001", "8002"], {"8001": ("k",), "8002": ("k",)}, 2, set(), []),
    ],
)
def test_plan_twins(
    names: list[str],
    keys: dict[str, tuple[str, ...]],
    surge: int,
    taken: set[str],
    expected: list[tuple[str, str]],
) -> None:
    taken = taken | {f"{n}.ini" for n in names}
    got = plan(fleet_of(*names), snapshot_of(**keys), surge, taken)
    if names[0].isdigit():
        assert got == [("8003.ini", "8001.ini"), ("8004.ini", "8002.ini")]
    else:
        assert got == expected


def test_a_port_in_use_is_skipped_and_none_free_is_refused() -> None:
    fleet = fleet_of("8001")
    snap = snapshot_of(**{"8001": ("k",)})
    twins = ur.plan_twins(fleet, snap, 1, ".ini", {"8001.ini"}, str, lambda p, h: p != 8002)
    assert [t.id for t in twins] == ["8003.ini"]
    with pytest.raises(ur.ReloadError, match="no free port"):
        ur.plan_twins(fleet, snap, 1, ".ini", {"8001.ini"}, str, lambda p, h: False)


def test_the_state_file_is_no_config_the_emperor_takes() -> None:
    # core/emperor.c uwsgi_emperor_is_valid: .xml .ini .yml .yaml .js .json
    assert not ur.SURGE_STATE.endswith((".xml", ".ini", ".yml", ".yaml", ".js", ".json"))


# ---------------------------------------------------------------------------------------------
# The core: removal keeps the minimum
# ---------------------------------------------------------------------------------------------


def twin(name: str, phase: ur.TwinPhase = T.LIVE) -> ur.Twin:
    return ur.Twin(
        id=f"{name}.ini", name=name, config=f"/e/{name}.ini", target="/t", of="a.ini", phase=phase
    )


@pytest.mark.parametrize(
    ("live", "minimum", "removed"),
    [
        ({"a": ("k",), "a.surge-1": ("k",)}, 1, {"a.surge-1"}),
        # the original is not back: the twin is what keeps the key at its minimum
        ({"a.surge-1": ("k",)}, 1, set()),
        (
            {"a": ("k",), "b": ("k",), "a.surge-1": ("k",), "a.surge-2": ("k",)},
            2,
            {"a.surge-1", "a.surge-2"},
        ),
        ({"a": ("k",), "a.surge-1": ("k",), "a.surge-2": ("k",)}, 2, {"a.surge-1"}),
    ],
)
def test_down_removes_a_twin_only_while_the_minimum_holds(
    live: dict[str, tuple[str, ...]], minimum: int, removed: set[str]
) -> None:
    twins = [twin(n) for n in live if ur.SURGE_MARK in n]
    surge = ur.Surge(twins, ur.Rules(minimum=minimum, timeout=10.0)).remove()
    events = surge.step(snapshot_of(**live), 0.0)
    assert {e.vassal.name for e in events if e.kind is ur.EventKind.REMOVE} == removed
    assert {t.name for t in surge.in_phase(T.LIVE)} == {t.name for t in twins} - removed


def test_a_twin_that_cannot_go_is_kept_at_the_deadline() -> None:
    surge = ur.Surge([twin("a.surge-1")], ur.Rules(minimum=1, timeout=5.0)).remove()
    snap = snapshot_of(**{"a.surge-1": ("k",)})
    assert surge.step(snap, 0.0) == []
    [kept] = surge.step(snap, 5.0)
    assert kept.kind is ur.EventKind.KEPT and surge.done
    assert surge.left == surge.twins


def test_with_drain_a_twin_is_unsubscribed_then_removed_then_gone() -> None:
    surge = ur.Surge([twin("a.surge-1")], ur.Rules(timeout=10.0, drain=True)).remove()
    both = snapshot_of(a=("k",), **{"a.surge-1": ("k",)})
    [draining] = surge.step(both, 0.0)
    assert draining.kind is ur.EventKind.DRAINING
    assert [s.command for s in draining.send] == [ur.Command.UNSUBSCRIBE]
    # re-announced by its master: unsubscribed again
    [again] = surge.step(both, 0.1)
    assert again.kind is ur.EventKind.UNSUBSCRIBED_AGAIN
    drained = ur.Snapshot(both.vassals, [node("/r/a.sock")])
    [remove] = surge.step(drained, 0.2)
    assert remove.kind is ur.EventKind.REMOVE and not surge.done
    [gone] = surge.step(snapshot_of(a=("k",)), 0.5)
    assert gone.kind is ur.EventKind.GONE and surge.done and surge.left == []


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "surge", "drain"), [(1, 1, True), (4, 2, True), (3, 1, True)])
def test_minimum_n_with_surge_never_loses_capacity(
    tmp_path: Path, n: int, surge: int, drain: bool
) -> None:
    code, stack, out = surge_run(tmp_path, n=n, minimum=n, surge=surge, drain=drain)
    assert code == ur.EXIT_OK, out
    assert stack.fewest_in_router >= n, out
    assert all(stack.vassals[v].respawns == 1 for v in originals(n)), out
    assert len(stack.spawned) == surge
    # the end state is clean: no twin link, no twin listed, no state file
    assert links(tmp_path) == originals(n), out
    assert set(stack.vassals) == originals(n), out
    assert stack.lost == 0, out


def test_surge_without_drain_is_refused_before_anything_is_touched(tmp_path: Path) -> None:
    """A twin removed without drain stops with requests in flight to it: refused, exit 2."""
    with pytest.raises(ur.ReloadError, match="needs --subscription-server") as refused:
        surge_run(tmp_path, n=2, minimum=2, surge=1, drain=False)
    assert refused.value.exit_code == ur.EXIT_USAGE
    assert links(tmp_path) == originals(2) and not (tmp_path / ur.SURGE_STATE).exists()


def test_without_surge_minimum_n_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ur.ReloadError, match="leaves nothing to reload"):
        surge_run(tmp_path, n=2, minimum=2, surge=0)
    assert links(tmp_path) == originals(2)
    with pytest.raises(ur.ReloadError, match="twins per key"):
        surge_run(tmp_path, n=2, minimum=3, surge=1)
    assert links(tmp_path) == originals(2)


def test_control_without_surge_capacity_drops(tmp_path: Path) -> None:
    """The same measure fails on a rollout without twins: capacity falls to the minimum."""
    code, stack, out = surge_run(tmp_path, n=4, minimum=3, surge=0)
    assert code == ur.EXIT_OK, out
    assert stack.fewest_in_router == 3, out


def test_twins_live_before_the_first_touch_and_gone_after_the_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stack, out = surge_run(tmp_path, n=2, minimum=2, surge=1, as_json=True)
    assert code == ur.EXIT_OK, out
    report = json.loads(capsys.readouterr().out)
    [twin_report] = report["twins"]
    assert twin_report["name"] == "vassal_01.surge-1" and twin_report["phase"] == "gone"
    first_touch = min(t for t, _ in stack.touched)
    last_back = max(v["back"] for v in report["vassals"])
    assert twin_report["added"] < twin_report["live"] <= first_touch
    assert twin_report["removed"] >= last_back
    assert twin_report["gone"] > twin_report["removed"]
    assert report["max_surge"] == 1


def test_a_twin_that_never_comes_up_stops_the_run_before_any_original(tmp_path: Path) -> None:
    code, stack, out = surge_run(tmp_path, n=2, minimum=2, surge=1, broken_twins=1, timeout=3.0)
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    assert stack.touched == [], out
    assert "nothing was reloaded" in out
    assert links(tmp_path) == originals(2), out
    assert stack.fewest_in_router >= 2


def test_a_failed_twin_probe_stops_the_run(tmp_path: Path) -> None:
    def refuse(stack: SurgeSim) -> None:
        stack.probe_status["vassal_01.surge-1.ini"] = 500

    code, stack, out = surge_run(tmp_path, n=1, surge=1, probe="/health", setup=refuse)
    assert code == ur.EXIT_NOT_ALL_RELOADED, out
    assert stack.touched == [] and links(tmp_path) == originals(1), out
    assert ("/run/vassal_01.surge-1.sock", KEY, "/health") in stack.probes


def test_leftover_twins_are_drained_and_removed_first_and_dry_run_lists_them(
    tmp_path: Path,
) -> None:
    """A run killed mid-surge left a twin link and the state file: the next run lists it in a
    dry run, then drains and removes it before the first reload, and completes."""

    def killed_run_left_a_twin(stack: SurgeSim) -> None:
        (tmp_path / "vassal_01.surge-1.ini").symlink_to(tmp_path / "vassal_01.ini")
        twin = ur.Twin(
            id="vassal_01.surge-1.ini",
            name="vassal_01.surge-1",
            config=str(tmp_path / "vassal_01.surge-1.ini"),
            target=str(tmp_path / "vassal_01.ini"),
            of="vassal_01.ini",
        )
        ur.write_surge_state(str(tmp_path), [twin])
        stack.originals = originals(2)
        stack._advance()

    stack = SurgeSim(sorted(originals(2)), tmp_path)
    code, out = run_on(
        stack,
        tmp_path,
        killed_run_left_a_twin,
        dry_run=True,
        max_surge=1,
        subscription_server="ss.sock",
    )
    assert code == ur.EXIT_OK and "left by an earlier run" in out, out
    assert "would add vassal_01.surge-2.ini" in out, out
    assert stack.touched == [] and (tmp_path / ur.SURGE_STATE).exists()
    stack.t += 5.0  # the leftover is live in the router
    stack._advance()
    assert stack.in_router["vassal_01.surge-1.ini"]
    # the killed run had drained vassal_02: accepting, but not in the router. Its node missing
    # and the twin's node matching no original must not read as "cannot tell which is which".
    stack.in_router["vassal_02.ini"] = False

    code, out = run_on(
        stack, tmp_path, minimum_active_vassals=2, max_surge=1, subscription_server="ss.sock"
    )
    assert code == ur.EXIT_OK, out
    # the new twin live first (it keeps the minimum while the leftover goes), the leftover
    # drained and removed, and only then the first reload
    live = out.index("vassal_01.surge-2: live")
    removed = out.index("vassal_01.surge-1: link removed after draining")
    assert live < removed < out.index("triggered"), out
    assert links(tmp_path) == originals(2) and set(stack.vassals) == originals(2), out
    assert all(stack.vassals[v].respawns == 1 for v in originals(2)), out
    assert stack.lost == 0


def test_a_link_the_state_lists_but_someone_changed_is_not_removed(tmp_path: Path) -> None:
    def changed(stack: SurgeSim) -> None:
        other = tmp_path / "other.conf"
        other.write_text("")
        (tmp_path / "vassal_01.surge-1.ini").symlink_to(other)
        twin = ur.Twin(
            id="vassal_01.surge-1.ini",
            name="vassal_01.surge-1",
            config=str(tmp_path / "vassal_01.surge-1.ini"),
            target=str(tmp_path / "vassal_01.ini"),
            of="vassal_01.ini",
        )
        ur.write_surge_state(str(tmp_path), [twin])
        stack.originals = originals(1) | {"vassal_01.surge-1.ini"}
        stack._advance()

    stack = SurgeSim(sorted(originals(1)), tmp_path)
    code, out = run_on(stack, tmp_path, changed, minimum_active_vassals=1, timeout=5.0)
    assert (tmp_path / "vassal_01.surge-1.ini").is_symlink()
    # not a twin of the tool's: it is a vassal like any other, and reloaded as one
    assert code == ur.EXIT_OK, out
    assert stack.vassals["vassal_01.surge-1.ini"].respawns == 1


def test_sigint_during_the_rollout_removes_the_twins_and_exits_130(tmp_path: Path) -> None:
    import signal as signals

    def interrupt_at_the_first_touch(stack: SurgeSim) -> None:
        touch = stack.touch

        def touched(path: str, mtime: int) -> None:
            touch(path, mtime)
            if len(stack.touched) == 1:
                signals.raise_signal(signals.SIGINT)

        stack.touch = touched  # type: ignore[method-assign]

    code, stack, out = surge_run(
        tmp_path, n=2, minimum=2, surge=1, setup=interrupt_at_the_first_touch
    )
    assert code == ur.EXIT_INTERRUPTED, out
    assert links(tmp_path) == originals(2), out
    assert set(stack.vassals) == originals(2), out
    assert stack.fewest_in_router >= 2, out


# ---------------------------------------------------------------------------------------------
# The property: with m = N and K >= 1, capacity never drops below N
# ---------------------------------------------------------------------------------------------


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    n=st.integers(1, 6),
    surge=st.integers(1, 3),
    reload=st.floats(0.2, 3.0),
    twin_start=st.floats(0.1, 3.0),
    announce_delay=st.floats(0.0, 1.5),
    twin_stop=st.floats(0.0, 1.0),
)
def test_property_capacity_never_below_n(
    tmp_path_factory: pytest.TempPathFactory,
    n: int,
    surge: int,
    reload: float,
    twin_start: float,
    announce_delay: float,
    twin_stop: float,
) -> None:
    emperor_dir = tmp_path_factory.mktemp("surge")
    code, stack, out = surge_run(
        emperor_dir,
        n=n,
        minimum=n,
        surge=surge,
        reload=reload,
        twin_start=twin_start,
        announce_delay=announce_delay,
        twin_stop=twin_stop,
    )
    assert code == ur.EXIT_OK, out
    assert stack.fewest_in_router >= n, out
    assert all(stack.vassals[v].respawns == 1 for v in originals(n)), out
    assert links(emperor_dir) == originals(n), out
    assert set(stack.vassals) == originals(n), out
    assert not os.path.exists(emperor_dir / ur.SURGE_STATE)


def test_twin_nodes_are_the_originals_renamed() -> None:
    unix = ur.Node(key="k", name="/run/shop.v2.sock", death_mark=True, ref=3, weight=2)
    [renamed] = ur.twin_nodes("shop.v2", "shop.v2.surge-1", [unix])
    assert (renamed.name, renamed.key, renamed.weight) == ("/run/shop.v2.surge-1.sock", "k", 2)
    assert renamed.live and renamed.ref == 0
    tcp = ur.Node(key="k", name="10.0.0.2:8001", death_mark=False, ref=0)
    assert [n.name for n in ur.twin_nodes("8001", "8005", [tcp])] == ["10.0.0.2:8005"]
    # a node that does not carry the original's name: no fast start, its master announces it
    assert ur.twin_nodes("a", "a.surge-1", [ur.Node("k", "/run/other.sock", False, 0)]) == ()


def test_with_drain_a_twin_is_subscribed_as_soon_as_it_accepts(tmp_path: Path) -> None:
    """Its master's first announce can come subscribe-freq cycles late (a retried accepting
    hook); the tool subscribes the twin itself once it accepts where its original's node says."""

    def proc(stack: SurgeSim) -> None:
        pids = {v.pid: vid for vid, v in stack.vassals.items()}
        io = stack.io

        def sockets(pid: int) -> tuple[str, ...]:
            for vid, v in stack.vassals.items():
                pids.setdefault(v.pid, vid)
            return (f"/run/{ur.strip_suffix(pids[pid], '.ini')}.sock",) if pid in pids else ()

        stack.io = lambda: dataclasses.replace(io(), sockets=per_pid(sockets))  # type: ignore[method-assign]

    code, stack, out = surge_run(
        tmp_path, n=1, surge=1, probe="/", setup=proc, twin_start=0.5, announce_delay=10.0
    )
    assert code == ur.EXIT_OK, out
    assert "vassal_01.surge-1: accepting: subscribed to domain.tld" in out, out
    assert ("/run/vassal_01.surge-1.sock", KEY, "/") in stack.probes
    live = float(out.split("vassal_01.surge-1: live after ")[1].split("s")[0])
    assert live < 1.0, out
    assert stack.fewest_in_router >= 1


class Deferred(Executor):
    """A pool whose calls answer only after the run has polled ``polls`` more times: a probe the
    driver waited on inline would never see an answer."""

    def __init__(self, polls: int = 3) -> None:
        self.polls, self.seen = polls, 0
        self.out: list[tuple[int, str, Future[ur.ProbeResult], Callable[[], ur.ProbeResult]]] = []
        #: (the node probed, polls while its probe was out)
        self.answered: list[tuple[str, int]] = []

    def submit(  # type: ignore[override]
        self, fn: Callable[..., ur.ProbeResult], /, *args: Any, **kwargs: Any
    ) -> Future[ur.ProbeResult]:
        future: Future[ur.ProbeResult] = Future()
        self.out.append((self.seen, args[0].name, future, lambda: fn(*args, **kwargs)))
        return future

    @classmethod
    def wired(cls, stack: RouterSim, polls: int) -> Deferred:
        """The stack's pool from now on, counting the polls of the stack's stats."""
        pool = cls(polls)
        snapshot, io = stack.snapshot, stack.io

        def polled(options: ur.Options) -> ur.Snapshot:
            pool.poll()
            return snapshot(options)

        stack.pool = lambda: pool
        stack.io = lambda: dataclasses.replace(io(), snapshot=polled)  # type: ignore[method-assign]
        return pool

    def poll(self) -> None:
        self.seen += 1
        for entry in [e for e in self.out if self.seen - e[0] >= self.polls]:
            self.out.remove(entry)
            since, node, future, call = entry
            future.set_result(call())
            self.answered.append((node, self.seen - since))


def test_a_vassal_and_a_twin_go_through_one_driver_whose_probes_never_hold_the_loop(
    tmp_path: Path,
) -> None:
    """The twin's probe and the original's run in the same pool, and the one loop goes on
    polling while each is out (a twin's probe used to block it)."""
    stack = SurgeSim(["vassal_01.ini"], tmp_path)
    pool = Deferred.wired(stack, polls=3)
    code, out = run_on(
        stack,
        tmp_path,
        minimum_active_vassals=1,
        max_surge=1,
        subscription_server="ss.sock",
        probe="/health",
    )
    assert code == ur.EXIT_OK, out
    probed = [name for name, _ in pool.answered]
    assert probed == ["/run/vassal_01.surge-1.sock", "/run/vassal_01.sock"], out
    assert all(polls >= 3 for _, polls in pool.answered), pool.answered
