"""The host side of the agent protocol (docs/protocol.md): read events from the agent channel as they
come, or from the console log after the fact; send commands. Every line the guest wrote is decoded by
herovm.protocol_host (bounded, checked against herovm.protocol's schema); `Story` says which events count.

The console log is written by libvirt's virtlogd (QEMU gets a pipe), which rotates it at `max_size` (2 MiB by
default) into console.log.0, .1, ... and keeps `max_backups` (3) of them: whatever a guest writes, a VM's
console takes a few MiB. Readers here take the newest `CONSOLE_WINDOW` bytes across those files, never more.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..protocol import CONSOLE_PREFIX, TERMINAL, Command
from ..protocol_host import MAX_LINE, Story, console_event, decode_event, printable

__all__ = [
    "CONSOLE_PREFIX",
    "CONSOLE_WINDOW",
    "TERMINAL",
    "AgentChannel",
    "console_events",
    "ConsoleWindow",
    "console_files",
    "console_story",
    "console_tail",
    "connect_unix",
    "follow_console",
    "read_console",
]

CONSOLE_WINDOW = 1 << 20  # the console bytes `status` and `logs` read: the newest, across rotated files
MAX_BACKUPS = 16  # console.log.N files looked at (virtlogd keeps 3 by default)


class AgentChannel:
    """A connection to the agent's virtio-serial port (a unix socket on the host), or `sock`: a stream
    already connected to the agent another way (Cloud Hypervisor's vsock, herovm/guest/vsock.py)."""

    def __init__(self, path: Path | None, deadline: float, sock: socket.socket | None = None) -> None:
        self.sock = sock if sock is not None else connect_unix(path, deadline)  # type: ignore[arg-type]
        self._buf = b""
        self._skipping = False
        self._seen = -1
        self.send({"op": Command.HELLO})

    def send(self, command: dict) -> None:
        self.sock.sendall(json.dumps(command).encode() + b"\n")

    def events(self, deadline: float, on_idle: Callable[[], None] | None = None) -> Iterator[dict]:
        """Events in order, each once (the agent replays on hello), until `deadline` (then TimeoutError).
        Yields decoded events only (herovm.protocol_host.decode_event); a closed channel (the guest stopped)
        ends the iteration. At most MAX_LINE bytes of a line are buffered: a longer one is dropped whole."""
        while True:
            if b"\n" in self._buf:
                *lines, self._buf = self._buf.split(b"\n")
                for line in lines:
                    if self._skipping:  # the rest of a line over the limit
                        self._skipping = False
                        continue
                    event = decode_event(line)
                    if event is None or event["seq"] <= self._seen:
                        continue
                    self._seen = event["seq"]
                    yield event
            if len(self._buf) > MAX_LINE:
                self._buf, self._skipping = b"", True
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.sock], [], [], min(left, 1.0))
            if not ready:
                if on_idle is not None:
                    on_idle()
                continue
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:  # the guest was destroyed mid-stream
                return
            if not chunk:
                return
            self._buf += chunk

    def close(self) -> None:
        self.sock.close()


def connect_unix(path: Path, deadline: float, running: Callable[[], bool] | None = None) -> socket.socket:
    """A stream to the unix socket `path`, retried while it is missing or refuses, until `deadline`
    (time.monotonic()): TimeoutError then (QEMU makes the agent's socket as the machine starts). `running`,
    asked once a second while it is retried: False ends the wait at once (a machine stopped meanwhile, e.g.
    by a cancelled `up`'s clean-up, never makes its socket: the wait ran to a 3-minute deadline)."""
    asked = time.monotonic()
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"agent channel {path} did not appear") from None
            if running is not None and now - asked >= 1.0:
                asked = now
                if not running():
                    raise TimeoutError(f"agent channel {path}: its machine is not running") from None
            time.sleep(0.02)


def console_files(console_log: Path) -> list[Path]:
    """The console log and virtlogd's rotated copies that exist, newest first (console.log, .0, .1, ...)."""
    files = [console_log]
    for i in range(MAX_BACKUPS):
        older = console_log.with_name(f"{console_log.name}.{i}")
        if not older.exists():
            break
        files.append(older)
    return files


@dataclass
class ConsoleWindow:
    """The newest bytes of a console, across rotated files, starting at a line."""

    data: bytes
    whole: bool  # nothing older was left out
    end: int  # console.log's size as read: where following it goes on

    def lines(self) -> list[str]:
        """The lines, decoded (bad UTF-8 replaced), without line ends."""
        return self.data.decode("utf-8", "replace").splitlines()


def read_console(console_log: Path, limit: int = CONSOLE_WINDOW) -> ConsoleWindow:
    """The newest `limit` bytes of the console: console.log, then as much of console.log.0, .1, ... before
    it as fits."""
    parts: list[bytes] = []
    left = limit
    whole = True
    end = 0
    for i, path in enumerate(console_files(console_log)):
        if left <= 0:
            whole = False
            break
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                take = min(size, left)
                f.seek(size - take)
                data = f.read(take)
        except OSError:
            continue  # rotated away meanwhile, or not a file: nothing to read there
        if i == 0:
            end = size - take + len(data)
        parts.append(data)
        left -= len(data)
        if take < size:
            whole = False
            break
    data = b"".join(reversed(parts))
    if not whole:
        data = data[data.find(b"\n") + 1 :]  # a cut line is no line (nothing, if none ends in it)
    return ConsoleWindow(data, whole, end)


def console_story(console_log: Path, nonce: str | None, limit: int = CONSOLE_WINDOW) -> tuple[Story, bool]:
    """What the console says about the boot with `nonce`, from its newest `limit` bytes; and whether those
    are the whole console (if not, and the story has not begun, its beginning may have been cut)."""
    story = Story(nonce)
    window = read_console(console_log, limit)
    for line in window.lines():
        event = console_event(line)
        if event is not None:
            story.take(event)
    return story, window.whole


def console_events(console_log: Path, nonce: str | None = None, offset: int = 0) -> list[dict]:
    """With `nonce`: the events of that boot as mirrored on the console (see Story). Without: every event on
    the console from byte `offset` of console.log on (from its start, if it was rotated since; at most the
    newest CONSOLE_WINDOW bytes)."""
    if nonce is not None:
        return console_story(console_log, nonce)[0].events
    try:
        with open(console_log, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = offset if offset <= size else 0  # smaller than at `offset`: virtlogd rotated it
            f.seek(max(start, size - CONSOLE_WINDOW))
            data = f.read(CONSOLE_WINDOW)
    except OSError:
        return []
    events = []
    for line in data.decode("utf-8", "replace").splitlines():
        event = console_event(line)
        if event is not None:
            events.append(event)
    return events


def console_tail(console_log: Path, lines: int = 15) -> list[str]:
    """The last non-empty console lines, safe to print (control characters shown as \\xNN)."""
    text = read_console(console_log, 64 << 10).lines()
    tail = [line.rstrip("\r") for line in text if line.strip()][-lines:]
    return [printable(line, one_line=True) for line in tail]


def follow_console(console_log: Path, start: int, poll: float = 0.2) -> Iterator[str]:
    """Lines written to console.log from byte `start` on (ConsoleWindow.end), without line ends, for ever;
    across virtlogd's rotations. A line longer than MAX_LINE comes in pieces."""
    f = None
    buf = b""
    try:
        while True:
            if f is None:
                try:
                    f = open(console_log, "rb")  # noqa: SIM115 - reopened on rotation
                except OSError:
                    time.sleep(poll)
                    continue
                if start <= os.fstat(f.fileno()).st_size:  # smaller: rotated meanwhile, read it all
                    f.seek(start)
                start = 0  # a file opened after a rotation is read from its start
            chunk = f.read(MAX_LINE)
            if chunk:
                buf += chunk
                *done, buf = buf.split(b"\n")
                if len(buf) > MAX_LINE:
                    done.append(buf)
                    buf = b""
                for line in done:
                    yield line.decode("utf-8", "replace").rstrip("\r")
                continue
            try:
                rotated = os.stat(console_log).st_ino != os.fstat(f.fileno()).st_ino
            except OSError:
                rotated = True
            if rotated:  # what the old file held was read above
                f.close()
                f = None
                continue
            time.sleep(poll)
    finally:
        if f is not None:
            f.close()
