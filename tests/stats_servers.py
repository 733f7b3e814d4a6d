"""Stats servers for the tool's tests: real sockets answering what a test scripts."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Callable

#: An answer that resets the connection instead (over TCP, SO_LINGER 0: ECONNRESET).
RESET = b"<reset>"


class StatsServer:
    """A stats server: accept, write what ``answer`` returns for this connection, close.

    On a unix path, or over TCP on 127.0.0.1 (``address``: the ``host:port`` it got).
    """

    def __init__(self, path: str | None, answer: Callable[[], bytes]) -> None:
        self.answer = answer
        if path is None:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(path)
            self.address = path
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                payload = self.answer()
                if payload is RESET:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    continue
                with contextlib.suppress(OSError):
                    conn.sendall(payload)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
