"""The host side of the agent protocol (bootstrap/PROTOCOL.md): read events from the agent channel as they
come, or from the console log after the fact; send commands."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

CONSOLE_PREFIX = "@herovm "
TERMINAL = ("ready", "failed")


class AgentChannel:
    """A connection to the agent's virtio-serial port (a unix socket on the host), or `sock`: a stream
    already connected to the agent another way (Cloud Hypervisor's vsock, herovm/guest/vsock.py)."""

    def __init__(self, path: Path | None, deadline: float, sock: socket.socket | None = None) -> None:
        self.sock = sock if sock is not None else _connect_unix(path, deadline)  # type: ignore[arg-type]
        self._buf = b""
        self._seen = -1
        self.send({"op": "hello"})

    def send(self, command: dict) -> None:
        self.sock.sendall(json.dumps(command).encode() + b"\n")

    def events(self, deadline: float, on_idle: Callable[[], None] | None = None) -> Iterator[dict]:
        """Events in order, each once (the agent replays on hello), until `deadline` (then TimeoutError).
        Yields None-free dicts; a closed channel (the guest stopped) ends the iteration."""
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                event = _decode(line)
                if event is None or not isinstance(event.get("seq"), int) or event["seq"] <= self._seen:
                    continue
                self._seen = event["seq"]
                yield event
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


def _connect_unix(path: Path, deadline: float) -> socket.socket:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"agent channel {path} did not appear") from None
            time.sleep(0.02)


def _decode(line: bytes | str) -> dict | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def console_event(line: str) -> dict | None:
    """The event a console line mirrors (`@herovm {json}`, anywhere in the line), or None."""
    idx = line.find(CONSOLE_PREFIX)
    return _decode(line[idx + len(CONSOLE_PREFIX) :]) if idx >= 0 else None


def console_events(console_log: Path, nonce: str | None = None, offset: int = 0) -> list[dict]:
    """The events of the last boot (the one with `nonce`, if given) as mirrored on the console; `offset`
    skips what earlier boots wrote."""
    events: list[dict] = []
    try:
        with open(console_log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        event = console_event(line)
        if event is None:
            continue
        if event["event"] == "boot":
            events = []
        events.append(event)
    if nonce is not None and events and events[0].get("event") == "boot" and events[0].get("nonce") != nonce:
        return []
    return events


def console_tail(console_log: Path, lines: int = 15) -> list[str]:
    try:
        text = console_log.read_text(errors="replace")
    except OSError:
        return []
    return [line.rstrip("\r") for line in text.splitlines() if line.strip()][-lines:]
