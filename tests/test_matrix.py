"""The tool's rotation features combined, under load: drain x probe x surge x (one key, two
keys, a two-host fleet).

A cell either reloads every vassal under load and passes the suite's one check
(``ReloadRun.problems``: zero failed requests, load served through the reload, every worker
replaced, the observer never below the minimum under any key, the end state), or is refused
before anything is touched: exit 2, one line naming the flag, every emperor, link and router as
they were.

Which cells run (CI time): every refused combination on every topology (they cost no load), and
of the accepted ones a pairwise set: every pair of values of any two factors is in some cell (7
cells, not the 18 of the full product). A surge cell holds the minimum at N, all the vassals of a
key (no capacity lost); the others at 1. Without drain the tool promises the minimum, not zero
failed requests: uWSGI can reset a request handed to a vassal as its reload begins
(docs/design.md, "A request reset by a reloading vassal"), so those cells allow that (at most 2,
as ``tests/test_drain.py``) and nothing else. Two keys on a fleet is no cell: the fleet harness
has one key.

Each kind of cell has its control, a wrong procedure the same check catches: a surge that
removes its twin too early (surge), the hosts of a fleet reloaded at once (fleet; judged as a
cell without drain too), a refusal that comes after a touch (refused). Two keys: the waves
counted over both keys together, ``tests/test_proof.py``'s
``test_control_minimum_counted_over_all_keys_together_is_caught`` (the same procedure and check
on 4 + 3 vassals; not run twice).

Each topology is started once for the module (pytest groups the cells by it) and is waited for
all live before every cell.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Union

import pytest

from tests import wrong_procedures
from tests.test_proof import procedure
from uwsgi_reload_harness.fleet import Fleet, FleetConfig, running_fleet
from uwsgi_reload_harness.plugin import MADE, stack_config
from uwsgi_reload_harness.stack import Stack, running_stack
from uwsgi_reload_loadtests.measure import Broken, ReloadRun, again, observed, reload_under_load

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Group = Union[Stack, Fleet]
Record = Callable[[dict[str, object]], None]

#: The topologies; each serves N vassals per key: "fleet" is two hosts of one vassal each.
STACK, TWO_KEYS, FLEET = "stack", "two keys", "fleet"
N = 2
OTHER_KEY = "other.test"
#: Without drain: requests reset by a vassal as its reload begins, at most (tests/test_drain.py).
RESETS_ALLOWED = 2
#: Seconds of load before the reload command and after it.
LOAD: dict[str, Any] = {"reload_at": 0.5, "after_reload": 0.5}
PROCEDURES = Path(__file__).with_name("reload_procedures.py")


@pytest.fixture(scope="module")
def group(request: pytest.FixtureRequest) -> Iterator[Group]:
    """The topology named by the cell (indirect parameter), started once for the module."""
    options = stack_config(request.config)
    if request.param == FLEET:
        fields = [f.name for f in dataclasses.fields(FleetConfig)]
        defaults = {name: getattr(options, name) for name in fields if hasattr(options, name)}
        config = FleetConfig(**{**defaults, "hosts": N, "vassals": 1, "routers": 1})
        with running_fleet(config) as fleet:
            yield fleet
        return
    extra = ((OTHER_KEY, N),) if request.param == TWO_KEYS else ()
    with running_stack(dataclasses.replace(options, vassals=N, extra_keys=extra)) as stack:
        yield stack


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest, group: Group) -> None:
    """The module's topology is the cell's: its log tails go into a failing cell's report."""
    request.node.stash.setdefault(MADE, []).append(group)


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    topology: str
    drain: bool
    probe: bool
    #: twins per key (per host on a fleet)
    surge: int = 0
    warmup: bool = False

    @property
    def minimum(self) -> int:
        return N if self.surge else 1

    @property
    def name(self) -> str:
        parts = [f"drain {'on' if self.drain else 'off'}", f"probe {'on' if self.probe else 'off'}"]
        parts += [f"surge {self.surge}"] + (["warm-up"] if self.warmup else [])
        return f"{self.topology}: {', '.join(parts)}, minimum {self.minimum}"

    def flags(self, group: Group) -> list[str]:
        flags = ["--json", "--minimum-active-vassals", str(self.minimum), "--timeout", "60"]
        if self.drain:
            flags += [
                a for r in group.routers for a in ("--subscription-server", r.subscription_server)
            ]
        if self.probe:
            flags += ["--probe", group.config.health_path]
        if self.surge:
            flags += ["--max-surge", str(self.surge)]
        if self.warmup:
            flags += ["--warmup", group.config.health_path]
        return flags

    def command(self, group: Group) -> list[str]:
        """The tool host after host on a fleet (``sh -c 'a && b'``), on the stack itself."""
        return group.reload_command(*self.flags(group), drain=False)


def cell_id(cell: Cell) -> str:
    return cell.name.replace(", minimum", " m").replace(": ", "-").replace(", ", "-")


#: Every pair of values of any two factors (topology, drain, probe, surge) in some cell; a surge
#: needs drain, so "drain on, surge 0" needs a seventh.
ACCEPTED = [
    Cell(STACK, drain=False, probe=False),
    Cell(STACK, drain=True, probe=True, surge=1),
    Cell(STACK, drain=True, probe=True),
    Cell(TWO_KEYS, drain=False, probe=True),
    Cell(TWO_KEYS, drain=True, probe=False, surge=1),
    Cell(FLEET, drain=False, probe=False),
    Cell(FLEET, drain=True, probe=True, surge=1),
]

#: Refused on every topology: surge or warm-up without drain. Why (README, docs/testing.md): a
#: twin leaves the router only as its master stops, with requests in flight to it; a reloaded
#: vassal takes requests as soon as its master announces it, before any warm-up.
REFUSED = [
    cell
    for topology in (STACK, TWO_KEYS, FLEET)
    for cell in (
        Cell(topology, drain=False, probe=False, surge=1),
        Cell(topology, drain=False, probe=True, surge=1),
        Cell(topology, drain=False, probe=True, warmup=True),
    )
]


def with_group(cells: list[Cell]) -> list[Any]:
    return [pytest.param(c.topology, c, id=cell_id(c)) for c in cells]


# ---------------------------------------------------------------------------------------------
# Accepted cells
# ---------------------------------------------------------------------------------------------


def leftovers(group: Group) -> list[str]:
    """What a surge left: files in an emperor dir, or vassals an emperor runs, that are none of
    the group's."""
    wrong = []
    for host in group.hosts:
        wrong += [
            f"file {p.name}" for p in host.emperor_path.iterdir() if p.name not in host.vassal_ids
        ]
        wrong += [f"vassal {v}" for v in host.emperor_vassals() if v not in host.vassal_ids]
    return sorted(wrong)


def cell_problems(cell: Cell, run: ReloadRun, group: Group) -> list[str]:
    """What the cell broke: the suite's check (failed requests without drain only as the reset
    above), and with surge every twin gone. An observer gap is not the cell's: ``observed``
    measures such a run again."""
    allowed = {Broken.OBSERVER_GAP} | (set() if cell.drain else {Broken.FAILED_REQUESTS})
    wrong = [p.text for p in run.problems(cell.minimum) if p.kind not in allowed]
    resets = all(f.kind == "HTTP 502" for f in run.failures())
    if not cell.drain and (run.load.total.failures > RESETS_ALLOWED or not resets):
        wrong.append(f"{run.load.total.failures} failed requests: {run.failures_text()}")
    return wrong + leftovers(group)


@pytest.mark.parametrize(
    ("group", "cell"), with_group(ACCEPTED), indirect=["group"], scope="module"
)
def test_accepted_cell_reloads_under_load_losing_nothing(
    group: Group, cell: Cell, record_reload: Record
) -> None:
    run = observed(
        again(group, cell.command(group), **LOAD),
        f"matrix {cell.name}",
        cell.minimum,
        record_reload,
        all_replaced=True,
        verify=lambda r: cell_problems(cell, r, group),
    )
    assert run.returncode == 0, run.output[-4000:]
    assert cell_problems(cell, run, group) == [], run.output[-4000:]
    assert not run.blind, f"observer gap {run.observer.max_gap * 1000:.0f} ms in every attempt"
    assert min(run.observer.min_live_by_key().values()) >= cell.minimum
    assert sorted(run.replaced()) == sorted(vid for h in group.hosts for vid in h.vassal_ids)
    if cell.surge:  # the twins were there, and are gone (leftovers)
        assert run.tool_json is not None and run.tool_json["twins"], run.output[-4000:]


# ---------------------------------------------------------------------------------------------
# Refused cells
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Untouched:
    """What a refused run must leave as it was: per host the emperor dir's files and their own
    mtimes, and each vassal's master, respawns and last_mod; every router's live nodes."""

    files: dict[str, float]
    vassals: dict[str, tuple[int, int, int]]
    live: dict[str, dict[str, list[str]]]

    @classmethod
    def of(cls, group: Group) -> Untouched:
        files, vassals = {}, {}
        for host in group.hosts:
            for path in host.emperor_path.iterdir():
                files[str(path)] = path.lstat().st_mtime
            for vid, v in host.emperor_vassals().items():
                vassals[f"{host.emperor_path}/{vid}"] = (v.pid, v.respawns, v.last_mod)
        return cls(files, vassals, group.live_nodes())


def refusal_problems(command: list[str], group: Group, flag: str) -> list[str]:
    """Run ``command`` against an all-live group: what is wrong with it as a refusal."""
    group.wait_all_live(timeout=30)
    before = Untouched.of(group)
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    after = Untouched.of(group)
    wrong = []
    if done.returncode != 2:
        wrong.append(f"exit {done.returncode}, not 2")
    lines = done.stderr.strip().splitlines()
    if len(lines) != 1 or flag not in lines[0]:
        wrong.append(f"not one line naming {flag}: {done.stderr!r}")
    for what in ("files", "vassals", "live"):
        if getattr(before, what) != getattr(after, what):
            wrong.append(f"{what} changed: {getattr(before, what)} -> {getattr(after, what)}")
    return wrong


@pytest.mark.parametrize(("group", "cell"), with_group(REFUSED), indirect=["group"], scope="module")
def test_refused_cell_touches_nothing(group: Group, cell: Cell) -> None:
    flag = "--warmup" if cell.warmup else "--max-surge"
    assert refusal_problems(cell.command(group), group, flag) == []


# ---------------------------------------------------------------------------------------------
# Controls: one per kind of cell
# ---------------------------------------------------------------------------------------------


def kinds(run: ReloadRun, minimum: int) -> set[Broken]:
    return {p.kind for p in run.problems(minimum)}


@pytest.mark.parametrize("group", [STACK], indirect=True)
def test_control_surge_twin_removed_too_early_is_caught(
    group: Group, record_reload: Record
) -> None:
    assert isinstance(group, Stack)
    group.wait_all_live(timeout=30)
    run = reload_under_load(group, procedure(group, "early-surge", N), **LOAD)
    record_reload(run.row("matrix control: surge twin removed too early", N))
    assert run.returncode == 0, run.output
    assert Broken.BELOW_MINIMUM in kinds(run, N), run.check(N)
    assert leftovers(group) == []


@pytest.mark.parametrize("group", [FLEET], indirect=True)
def test_control_fleet_hosts_reloaded_at_once_are_caught(
    group: Group, record_reload: Record
) -> None:
    """Each host touching all its vassals, both hosts at the same time."""
    assert isinstance(group, Fleet)
    router = group.routers[0].stats
    each = [
        f"{sys.executable} {PROCEDURES} together {h.emperor_path} {h.emperor_stats} {router}"
        for h in group.hosts
    ]
    group.wait_all_live(timeout=30)
    run = reload_under_load(group, ["sh", "-c", " & ".join(each) + " & wait"], **LOAD)
    record_reload(run.row("matrix control: fleet hosts at once", 1))
    assert Broken.BELOW_MINIMUM in kinds(run, 1), run.check(1)
    assert run.observer.min_live == 0
    # judged as the cell without drain it imitates: the reset allowance does not hide it
    assert cell_problems(Cell(FLEET, drain=False, probe=False), run, group) != []


@pytest.mark.parametrize("group", [STACK], indirect=True)
def test_control_a_refusal_after_a_touch_is_caught(group: Group) -> None:
    assert isinstance(group, Stack)
    late = wrong_procedures.command("refuse-late", str(group.emperor_path), group.emperor_stats)
    wrong = refusal_problems(late, group, "refused")
    # exit 2 and one line, as a refusal should; but its touch changed a link (and, once the
    # emperor noticed it, that vassal)
    assert [w for w in wrong if " changed: " not in w] == [], wrong
    assert any(w.startswith("files changed") for w in wrong), wrong
