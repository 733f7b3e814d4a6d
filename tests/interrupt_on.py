"""SIGINT a reload command, as Ctrl-C would, at the Nth line of its output holding a text.

    python tests/interrupt_on.py TEXT [N] -- CMD...

The moment is CMD's own line (``soaking``, its Nth ``triggered``), not a sleep. Its event lines
are read from stdout, or from stderr with ``--json`` (where the tool then writes them); both are
passed through, and CMD's exit code returned. The last stdout line is a JSON object saying
whether and when (wall clock) the SIGINT went.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    split = list(argv).index("--")
    text, nth, command = argv[0], int(argv[1]) if split > 1 else 1, list(argv[split + 1 :])
    on_stderr = "--json" in command
    tool = subprocess.Popen(
        command,
        text=True,
        stdout=None if on_stderr else subprocess.PIPE,
        stderr=subprocess.PIPE if on_stderr else None,
    )
    lines, echo = (tool.stderr, sys.stderr) if on_stderr else (tool.stdout, sys.stdout)
    assert lines is not None
    result: dict[str, object] = {"interrupt_on": text, "nth": nth, "injected": False}
    for line in lines:
        echo.write(line)
        if result["injected"] or text not in line:
            continue
        nth -= 1
        if not nth:
            tool.send_signal(signal.SIGINT)
            result.update(injected=True, injected_wall=time.time(), line=line.strip())
    code = tool.wait()
    result["exit"] = code
    sys.stdout.write(json.dumps(result) + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
