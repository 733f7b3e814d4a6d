"""Fault injection around a reload command, run by locust as its reload command.

    python tests/faults.py kill PID -- CMD...       SIGKILL PID once CMD triggered its first reload
    python tests/faults.py interrupt [N] -- CMD... SIGINT CMD once it triggered its Nth reload (1)
    python tests/faults.py second-run -- CMD...    start CMD again once the first triggered
    python tests/faults.py kill-and-rerun -- CMD... SIGKILL CMD itself once it triggered its first
        reload (with --max-surge: its twins are up), then run CMD --json to the end; its exit code
    python tests/faults.py touch-all EMPEROR_STATS LINK...
        the naive reload: touch every config at once, then wait until every vassal is back
        (so that the load, which runs until the command ends, covers the whole outage)

The moment is CMD's own first "triggered" line on stdout, not a sleep. CMD's output is passed
through; the last stdout line is a JSON object with what happened (exit codes, timings).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import uwsgi_reload as ur


def touch_all(emperor_stats: str, links: Sequence[str], timeout: float = 60) -> int:
    before = ur.parse_emperor_stats(ur.read_stats(emperor_stats))
    for link in links:
        vassal = before[os.path.basename(link)]
        ur.touch(link, ur.touch_mtime(time.time(), vassal.last_mod))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = ur.parse_emperor_stats(ur.read_stats(emperor_stats))
        if all(
            ur.reload_registered(v, now.get(vid)) and now[vid].accepting
            for vid, v in before.items()
        ):
            return 0
        time.sleep(0.05)
    return 1


def main(argv: Sequence[str]) -> int:
    if argv[0] == "touch-all":
        return touch_all(argv[1], argv[2:])
    split = list(argv).index("--")
    action, args, command = argv[0], list(argv[1:split]), list(argv[split + 1 :])
    result: dict[str, Any] = {"action": action}
    started = time.monotonic()
    tool = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert tool.stdout is not None
    injected = False
    nth = int(args[0]) if action == "interrupt" and args else 1
    for line in tool.stdout:
        sys.stdout.write(line)
        if injected or "triggered" not in line:
            continue
        nth -= 1
        if nth:
            continue
        injected = True
        result["injected_at"] = round(time.monotonic() - started, 3)
        result["injected_wall"] = time.time()
        if action == "kill":
            os.kill(int(args[0]), signal.SIGKILL)
            result["killed"] = int(args[0])
        elif action == "interrupt":
            tool.send_signal(signal.SIGINT)
        elif action == "kill-and-rerun":
            tool.kill()
            tool.wait()
            result["killed"] = tool.pid
            rerun = subprocess.run([*command, "--json"], capture_output=True, text=True)
            sys.stdout.write(rerun.stdout)
            sys.stderr.write(rerun.stderr)
            result["second_exit"] = rerun.returncode
            break
        elif action == "second-run":
            t0 = time.monotonic()
            second = subprocess.run(command, capture_output=True, text=True, timeout=60)
            result["second_exit"] = second.returncode
            result["second_seconds"] = round(time.monotonic() - t0, 3)
            result["second_stderr"] = second.stderr.strip()
        else:
            raise SystemExit(f"faults.py: unknown action {action!r}")
    result["exit"] = tool.wait()
    result["injected"] = injected
    sys.stdout.write(json.dumps(result) + "\n")
    # kill-and-rerun: the command's outcome is its second run's; second-run: the first's
    return int(result["second_exit"] if action == "kill-and-rerun" else result["exit"])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
