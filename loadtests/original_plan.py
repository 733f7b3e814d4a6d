"""The 2014 original's reload schedule, for the benchmark to compare against (not the tool's).

    python -m uwsgi_reload_loadtests.original_plan --emperor-path DIR --emperor-stats-socket S \\
        --fastrouter-stats-socket F --minimum-active-vassals m

Touch the first N-m vassal configs together, wait until all of them are back, then the last m
one by one, each waited for. "Back" is the tool's own test (``reload_stage``: registered by the
emperor, accepting, live in the fastrouter), polled every ``--check-interval`` like the tool, so
the two differ in the schedule only. Built from uwsgi_reload's public functions; imports nothing
else but its name from ``schedules``, so its start-up and CPU compare with the tool's. Prints one
JSON report shaped like ``uwsgi_reload.py --json`` (each vassal also has ``stages``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any, Callable

from uwsgi_reload import (
    EmperorVassal,
    Node,
    Outcome,
    Stage,
    StatsError,
    find_configs,
    live_keys,
    parse_emperor_stats,
    parse_fastrouter_stats,
    plan_fleet,
    read_stats,
    reload_stage,
    touch,
    touch_mtime,
)

from .schedules import ORIGINAL


def original_batches(vassals: Sequence[str], minimum: int) -> list[list[str]]:
    """First N-m together, then the last m one by one (the 2014 script's plan)."""
    first = len(vassals) - minimum
    return [list(vassals[:first])] + [[v] for v in vassals[first:]]


Snapshot = tuple[dict[str, EmperorVassal], list[Node]]


@dataclasses.dataclass
class _Vassal:
    """What this driver saw of one vassal; seconds since the run started. Its own record (not
    the tool's ``VassalReload``, whose state the tool's core owns)."""

    id: str
    name: str
    config: str
    baseline: EmperorVassal | None = None
    triggered: float | None = None
    #: seconds after the trigger when it was first seen registered, accepting, back
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    outcome: Outcome = Outcome.NOT_STARTED
    detail: str = ""

    def at(self, stage: str) -> float | None:
        seen = self.stages.get(stage)
        return None if seen is None or self.triggered is None else self.triggered + seen

    def as_json(self) -> dict[str, Any]:
        """Shaped like one vassal of ``uwsgi_reload.py --json``, plus ``stages``."""

        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "name": self.name,
            "config": self.config,
            "outcome": self.outcome.value,
            "triggered": rounded(self.triggered),
            "accepting": rounded(self.at("accepting")),
            "back": rounded(self.at("back")),
            "duration": rounded(self.stages.get("back")),
            "drain": None,
            "drain_timed_out": False,
            "detail": self.detail,
            "stages": {k: round(t, 3) for k, t in self.stages.items()},
        }


def original_plan(
    emperor_path: str,
    emperor_stats: str,
    fastrouter_stats: str,
    minimum: int,
    *,
    suffix: str = ".ini",
    check_interval: float = 0.1,
    timeout: float = 120.0,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Run the 2014 schedule; a report shaped like ``uwsgi_reload.py --json``.

    Each vassal also gets ``stages``: seconds after its trigger when the driver first saw it
    registered by the emperor, accepting, and back (live in the router).
    """
    fleet = {
        v.id: _Vassal(v.id, v.name, v.config)
        for v in plan_fleet(find_configs(emperor_path, suffix), suffix)
    }

    def snapshot() -> Snapshot:
        return (
            parse_emperor_stats(read_stats(emperor_stats)),
            parse_fastrouter_stats(read_stats(fastrouter_stats)),
        )

    started_wall, started = wall_clock(), clock()
    exit_code = 0
    for batch in original_batches(sorted(fleet), minimum):
        vassals, _ = snapshot()
        for vid in batch:
            v = fleet[vid]
            v.baseline = vassals[vid]
            touch(v.config, touch_mtime(wall_clock(), v.baseline.last_mod))
            v.triggered, v.outcome = clock() - started, Outcome.IN_FLIGHT
        waiting = list(batch)
        while waiting:
            sleep(check_interval)
            now = clock() - started
            try:
                vassals, nodes = snapshot()
            except StatsError:
                continue
            for vid in list(waiting):
                v = fleet[vid]
                assert v.baseline is not None and v.triggered is not None
                current = vassals.get(vid)
                stage = reload_stage(v.baseline, current, live_keys(current, v.name, nodes))
                if stage is not Stage.TOUCHED:
                    v.stages.setdefault("registered", now - v.triggered)
                if stage in (Stage.ACCEPTING, Stage.BACK):
                    v.stages.setdefault("accepting", now - v.triggered)
                if stage is Stage.BACK:
                    v.stages["back"] = now - v.triggered
                    v.outcome = Outcome.RELOADED
                    waiting.remove(vid)
                elif now - v.triggered >= timeout:
                    v.outcome, v.detail = Outcome.TIMED_OUT, stage.name.lower()
                    waiting.remove(vid)
                    exit_code = 1
        if exit_code:
            break
    return {
        "schedule": ORIGINAL,
        "minimum_active_vassals": minimum,
        "started": round(started_wall, 3),
        "elapsed": round(clock() - started, 3),
        "exit_code": exit_code,
        "vassals": [v.as_json() for v in fleet.values()],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uwsgi_reload_loadtests.original_plan",
        description="Reload every vassal with the 2014 schedule; print a JSON report.",
    )
    parser.add_argument("--emperor-path", required=True)
    parser.add_argument("--emperor-stats-socket", required=True)
    parser.add_argument("--fastrouter-stats-socket", required=True)
    parser.add_argument("--minimum-active-vassals", type=int, default=1)
    parser.add_argument("--check-interval", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    report = original_plan(
        args.emperor_path,
        args.emperor_stats_socket,
        args.fastrouter_stats_socket,
        args.minimum_active_vassals,
        check_interval=args.check_interval,
        timeout=args.timeout,
    )
    print(json.dumps(report))
    return int(report["exit_code"])


if __name__ == "__main__":
    raise SystemExit(main())
