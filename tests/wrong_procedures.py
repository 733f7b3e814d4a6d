"""Wrong procedures for the matrix and the faults: each breaks one promise on purpose, and a
control test shows its check failing on it (``tests/test_matrix.py``, ``tests/test_faults.py``).

    wrong_procedures.py refuse-late EMPEROR_DIR EMPEROR_STATS
        refuses a combination only after it touched the first vassal's config: exit 2 with a
        one-line reason, but something was touched.
    wrong_procedures.py drain-and-forget SUBSCRIPTION_SERVER FASTROUTER_STATS FIFO NODE KEY
        takes NODE out of rotation as for maintenance (``S`` on its master FIFO so that its
        announces do not undo the drain, then an unsubscribe), waits until the router has it
        out, puts it back with one subscribe packet and exits 0 without looking: a subscription
        server that stops answering leaves the node out, and nobody is told.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from uwsgi_reload import (
    Command,
    Node,
    parse_emperor_stats,
    parse_fastrouter_stats,
    read_stats,
    send_datagram,
    subscriptions,
    touch,
    touch_mtime,
)

#: How long drain-and-forget waits for the router to take the node out.
DRAIN_WAIT = 10.0


def refuse_late(emperor_dir: str, emperor_stats: str) -> int:
    first = sorted(p for p in Path(emperor_dir).iterdir() if p.suffix == ".ini")[0]
    last_mod = parse_emperor_stats(read_stats(emperor_stats))[first.name].last_mod
    touch(str(first), touch_mtime(time.time(), last_mod))
    print("wrong_procedures: error: this combination is refused", file=sys.stderr)
    return 2


def drain_and_forget(server: str, router: str, fifo: str, node: str, key: str) -> int:
    with open(fifo, "w") as master:
        master.write("S")  # its master's announces blocked: they would undo the drain
    entry = Node(key=key, name=node, death_mark=False, ref=0)
    for packet in subscriptions(Command.UNSUBSCRIBE, [entry]):
        send_datagram(server, packet.packet())
    deadline = time.monotonic() + DRAIN_WAIT
    while any(n.name == node and n.live for n in parse_fastrouter_stats(read_stats(router))):
        if time.monotonic() > deadline:
            print(f"wrong_procedures: {node} still live", file=sys.stderr)
            return 1
        time.sleep(0.01)
    for packet in subscriptions(Command.SUBSCRIBE, [entry]):
        send_datagram(server, packet.packet())  # back in rotation, it assumes
    return 0


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["refuse-late"]:
        return refuse_late(*argv[1:3])
    if argv[:1] == ["drain-and-forget"]:
        return drain_and_forget(*argv[1:6])
    raise SystemExit(f"wrong_procedures: unknown mode {' '.join(argv[:1])!r}")


def command(mode: str, *args: str) -> list[str]:
    """This script in ``mode``, as a reload command."""
    return [sys.executable, os.path.abspath(__file__), mode, *args]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
