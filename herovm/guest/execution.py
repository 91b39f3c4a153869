"""What every way of running a command on a guest promises (SSH and the agent alike)."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass

TIMEOUT_EXIT_CODE = 124  # what coreutils `timeout` reports; ExecResult.timed_out says it for sure
KILL_GRACE_S = 5.0  # after killing a timed-out command, how long we wait for its channel to close
QUIET_PROBE_S = 20.0  # after this long without output, check that the guest still answers at all
PROBE_ANSWER_S = 10.0


@dataclass(frozen=True)
class ExecResult:
    """What a remote command did. ``stdout``/``stderr`` are empty when a callback consumed the stream."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def open_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to a guest's forwarded port, ready for small request/response exchanges."""
    sock = socket.create_connection((host, port), timeout=timeout)
    # Without TCP_NODELAY, Nagle's algorithm and delayed ACKs add ~40 ms to each small exchange.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
