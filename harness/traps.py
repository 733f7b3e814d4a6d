"""Set a trap for a reload procedure, then run it: a config reloaded earlier in the same second.

    python -m uwsgi_reload_harness.traps same-second LINK -- COMMAND...

The emperor reloads a vassal when its config's whole-second mtime moves past ``last_mod``
(``st_mtime > last_mod``, core/emperor.c). This wrapper waits for the start of a wall-clock
second, touches ``LINK`` with a plain touch (mtime = now: the emperor reloads that vassal and
sets ``last_mod`` to this second), and at once runs ``COMMAND``, the procedure under test. A
procedure whose own touch of that config sets the mtime to "now" again lands in the same second
and is ignored: that vassal is then reloaded once, not twice. The wrapper passes the command's
output and exit code through.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

#: What the wrapper prints (on stderr) before the command's output, with the trap's second.
TRAP_LINE = "same-second trap: config touched at "


def same_second(link: str, command: Sequence[str]) -> int:
    now = time.time()
    # Waiting for the clock, not for readiness: the touch must open a second, so that the
    # procedure's own touch comes within it.
    time.sleep(math.ceil(now) - now + 0.001)
    second = int(time.time())
    os.utime(link, (second, second), follow_symlinks=False)
    print(f"{TRAP_LINE}{second}", file=sys.stderr, flush=True)
    child = subprocess.Popen(command)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    code = child.wait()
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[0] != "same-second" or args[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    return same_second(args[1], args[3:])


if __name__ == "__main__":
    raise SystemExit(main())
