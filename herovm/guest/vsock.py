"""Host side of Cloud Hypervisor's hybrid vsock: the guest's vsock ports behind one unix socket.

The host connects to the unix socket Cloud Hypervisor made for the VM's vsock device, writes
`CONNECT <port>\\n`, and reads one line: `OK <host port>\\n` once a guest socket listening on that vsock port
accepted; Cloud Hypervisor closes the connection when nothing listens there. After the OK line the socket is
a plain byte stream to the guest's socket. See docs/cloud-hypervisor.md. The guest's ports are
herovm.protocol's AGENT_VSOCK_PORT (the agent's event channel) and SSH_PORT (SSH and exec).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

_LINE_LIMIT = 64


def connect_hybrid(
    uds_path: str | Path,
    port: int,
    deadline: float,
    *,
    alive: Callable[[], bool] | None = None,
) -> socket.socket:
    """A stream to guest vsock `port`, retried until `deadline` (time.monotonic()) while the socket is
    missing or the guest does not listen yet: TimeoutError then. `alive`, if given, is asked between tries;
    False (the VMM is gone) ends the wait at once with ConnectionError."""
    last = "no attempt"
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(max(0.05, min(2.0, deadline - time.monotonic())))
            s.connect(str(uds_path))
            s.sendall(f"CONNECT {int(port)}\n".encode())
            line = _read_line(s)
            if line.startswith(b"OK "):
                s.settimeout(None)
                return s
            last = f"answer {line[:40]!r}" if line else "closed: nothing listens on that port yet"
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, TimeoutError) as e:
            last = type(e).__name__
        except BaseException:
            s.close()
            raise
        s.close()
        if alive is not None and not alive():
            raise ConnectionError(f"vsock {uds_path} port {port}: the VMM is gone ({last})")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"vsock {uds_path} port {port} did not answer ({last})")
        time.sleep(0.05)


def _read_line(s: socket.socket) -> bytes:
    """One line, byte by byte: whatever follows it (an SSH banner) belongs to the caller."""
    line = b""
    while len(line) < _LINE_LIMIT:
        c = s.recv(1)
        if not c:
            return line
        line += c
        if c == b"\n":
            return line.rstrip(b"\n")
    return line
