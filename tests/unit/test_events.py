"""herovm.guest.events: the agent channel against a real unix-socket server playing the agent, and the
console-log readers against files written here."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from herovm.guest.events import CONSOLE_PREFIX, AgentChannel, console_events, console_tail


def ev(seq: int, kind: str = "setup", **fields: object) -> bytes:
    return json.dumps({"event": kind, "seq": seq, "t": seq / 10, **fields}).encode() + b"\n"


class FakeAgent:
    """A unix-socket server standing in for the guest agent's virtio-serial port."""

    def __init__(
        self, path: Path, script: Callable[[socket.socket, FakeAgent], None], *, bind_after: float = 0.0
    ) -> None:
        self.path = path
        self.script = script
        self.received: list[dict] = []
        self.error: BaseException | None = None
        self._buf = b""
        self._bound = threading.Event()
        self._server: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, args=(bind_after,), daemon=True)
        self._thread.start()

    def _run(self, bind_after: float) -> None:
        try:
            time.sleep(bind_after)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(self.path))
            server.listen(1)
            self._server = server
            self._bound.set()
            server.settimeout(10)
            conn, _ = server.accept()
            conn.settimeout(10)
            with conn:
                self.script(conn, self)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e

    def read_command(self, conn: socket.socket) -> dict:
        """The next command line from the host (commands may arrive together in one chunk)."""
        while b"\n" not in self._buf:
            chunk = conn.recv(4096)
            if not chunk:
                raise EOFError("host closed before a full command")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        self.received.append(json.loads(line))
        return self.received[-1]

    def join(self) -> None:
        self._thread.join(10)
        if self._server is not None:
            self._server.close()
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


def deadline(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


# ------------------------------------------------------------------------------------ AgentChannel


def test_hello_then_events_in_order(sock_path: Path) -> None:
    def script(conn: socket.socket, agent: FakeAgent) -> None:
        assert agent.read_command(conn) == {"op": "hello"}
        conn.sendall(ev(0, "boot", nonce="n") + ev(1) + ev(2, "ready"))

    agent = FakeAgent(sock_path, script)
    channel = AgentChannel(sock_path, deadline())
    try:
        got = [e["seq"] for e in channel.events(deadline())]
    finally:
        channel.close()
    agent.join()
    assert got == [0, 1, 2]
    assert agent.received == [{"op": "hello"}]


def test_duplicates_replays_and_partial_lines(sock_path: Path) -> None:
    def script(conn: socket.socket, agent: FakeAgent) -> None:
        agent.read_command(conn)
        conn.sendall(ev(0, "boot") + ev(1))
        line = ev(2, "action.start", index=0)
        conn.sendall(line[:7])  # a partial line, completed later
        time.sleep(0.05)
        conn.sendall(line[7:-1])
        time.sleep(0.05)
        conn.sendall(b"\n" + ev(1) + ev(2))  # duplicates
        conn.sendall(ev(0, "boot") + ev(1) + ev(2) + ev(3))  # a full replay, one new event
        conn.sendall(ev(4, "ready"))

    agent = FakeAgent(sock_path, script)
    channel = AgentChannel(sock_path, deadline())
    try:
        got = [(e["seq"], e["event"]) for e in channel.events(deadline())]
    finally:
        channel.close()
    agent.join()
    assert got == [(0, "boot"), (1, "setup"), (2, "action.start"), (3, "setup"), (4, "ready")]


def test_garbage_lines_are_skipped(sock_path: Path) -> None:
    def script(conn: socket.socket, agent: FakeAgent) -> None:
        agent.read_command(conn)
        conn.sendall(
            b"not json\n"
            + b"[1, 2]\n"
            + b'{"no_event": 1, "seq": 0}\n'
            + b"\n"
            + b"\xff\xfe\n"
            + b'"a string"\n'
            + ev(0, "boot")
            + b'{"event": "x", "seq": 1'
            + b"\n"
            + ev(1, "ready")
        )

    agent = FakeAgent(sock_path, script)
    channel = AgentChannel(sock_path, deadline())
    try:
        got = [(e["seq"], e["event"]) for e in channel.events(deadline())]
    finally:
        channel.close()
    agent.join()
    assert got == [(0, "boot"), (1, "ready")]


def test_events_with_a_bad_seq_are_skipped(sock_path: Path) -> None:
    def script(conn: socket.socket, agent: FakeAgent) -> None:
        agent.read_command(conn)
        conn.sendall(
            b'{"event": "setup", "seq": null}\n'
            + b'{"event": "setup", "seq": "7"}\n'
            + b'{"event": "setup"}\n'
            + ev(0, "ready")
        )

    agent = FakeAgent(sock_path, script)
    channel = AgentChannel(sock_path, deadline())
    try:
        got = [(e["seq"], e["event"]) for e in channel.events(deadline())]
    finally:
        channel.close()
    agent.join()
    assert got == [(0, "ready")]


def test_channel_closed_by_the_guest_ends_iteration(sock_path: Path) -> None:
    def script(conn: socket.socket, agent: FakeAgent) -> None:
        agent.read_command(conn)
        conn.sendall(ev(0, "boot") + b'{"event": "setup", "se')  # the guest dies mid-line

    agent = FakeAgent(sock_path, script)
    channel = AgentChannel(sock_path, deadline())
    try:
        got = [e["seq"] for e in channel.events(deadline())]
    finally:
        channel.close()
    agent.join()
    assert got == [0]


def test_deadline_raises_timeout(sock_path: Path) -> None:
    release = threading.Event()

    def script(conn: socket.socket, agent: FakeAgent) -> None:
        agent.read_command(conn)
        conn.sendall(ev(0, "boot"))
        release.wait(10)

    agent = FakeAgent(sock_path, script)
    channel = AgentChannel(sock_path, deadline())
    got = []
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            for e in channel.events(time.monotonic() + 0.3):
                got.append(e["seq"])
    finally:
        channel.close()
        release.set()
    agent.join()
    assert got == [0]
    assert 0.25 < time.monotonic() - t0 < 3


def test_connect_waits_for_the_socket_to_appear(sock_path: Path) -> None:
    def script(conn: socket.socket, agent: FakeAgent) -> None:
        agent.read_command(conn)
        conn.sendall(ev(0, "ready"))

    agent = FakeAgent(sock_path, script, bind_after=0.3)
    t0 = time.monotonic()
    channel = AgentChannel(sock_path, deadline())
    assert time.monotonic() - t0 >= 0.25
    try:
        assert [e["event"] for e in channel.events(deadline())] == ["ready"]
    finally:
        channel.close()
    agent.join()


def test_connect_retries_while_refused(sock_path: Path) -> None:
    # A socket file nobody listens on (a stale one from an earlier QEMU): connect is refused, then works.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()

    def script(conn: socket.socket, agent: FakeAgent) -> None:
        agent.read_command(conn)
        conn.sendall(ev(0, "ready"))

    def rebind_later() -> None:
        time.sleep(0.3)
        sock_path.unlink()

    threading.Thread(target=rebind_later, daemon=True).start()
    agent = FakeAgent(sock_path, script, bind_after=0.4)
    channel = AgentChannel(sock_path, deadline())
    try:
        assert [e["event"] for e in channel.events(deadline())] == ["ready"]
    finally:
        channel.close()
    agent.join()


def test_connect_times_out_when_the_socket_never_appears(sock_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not appear"):
        AgentChannel(sock_path, time.monotonic() + 0.2)
    assert time.monotonic() - t0 < 2


def test_send_commands(sock_path: Path) -> None:
    done = threading.Event()

    def script(conn: socket.socket, agent: FakeAgent) -> None:
        agent.read_command(conn)
        agent.read_command(conn)
        done.set()

    agent = FakeAgent(sock_path, script)
    channel = AgentChannel(sock_path, deadline())
    channel.send({"op": "poweroff"})
    assert done.wait(5)
    channel.close()
    agent.join()
    assert agent.received == [{"op": "hello"}, {"op": "poweroff"}]


def test_events_can_resume_after_a_timeout(sock_path: Path) -> None:
    """_follow and later callers may call events() again on the same channel: no event is lost or repeated."""
    go = threading.Event()

    def script(conn: socket.socket, agent: FakeAgent) -> None:
        agent.read_command(conn)
        conn.sendall(ev(0, "boot") + ev(1)[:5])
        go.wait(10)
        conn.sendall(ev(1)[5:] + ev(0, "boot") + ev(2, "ready"))

    agent = FakeAgent(sock_path, script)
    channel = AgentChannel(sock_path, deadline())
    got = []
    try:
        with pytest.raises(TimeoutError):
            for e in channel.events(time.monotonic() + 0.3):
                got.append(e["seq"])
        go.set()
        got += [e["seq"] for e in channel.events(deadline())]
    finally:
        channel.close()
    agent.join()
    assert got == [0, 1, 2]


# ---------------------------------------------------------------------------------- console readers


def console(tmp_path: Path, *lines: str | bytes) -> Path:
    path = tmp_path / "console.log"
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def at(event: dict) -> str:
    return CONSOLE_PREFIX + json.dumps(event)


def test_console_events_of_the_last_boot(tmp_path: Path) -> None:
    path = console(
        tmp_path,
        "[    0.000000] Linux version 6.1",
        at({"event": "boot", "seq": 0, "nonce": "old"}),
        at({"event": "ready", "seq": 1}),
        "reboot: Power down",
        "[    0.000000] Linux version 6.1",
        at({"event": "boot", "seq": 0, "nonce": "new"}),
        at({"event": "setup", "seq": 1, "step": "drive", "ok": True}),
    )
    events = console_events(path)
    assert [(e["event"], e.get("nonce")) for e in events] == [("boot", "new"), ("setup", None)]
    assert console_events(path, "new") == events
    assert console_events(path, "old") == []  # the old boot is never taken for this one
    assert console_events(path, "other") == []


def test_console_events_garbage_and_prefix_mid_line(tmp_path: Path) -> None:
    path = console(
        tmp_path,
        "@herovm not json at all",
        "@herovm [1, 2]",
        '@herovm {"no": "event"}',
        "@herovm",
        '@herovm{"event": "boot"}',  # no space after the prefix: not ours
        "[    2.5] random kernel text " + at({"event": "boot", "seq": 0, "nonce": "n"}),
        at({"event": "setup", "seq": 1}) + "\r",  # serial consoles end lines with \r\n
        b"\xff\xfe binary noise \x00\x01",
        at({"event": "ready", "seq": 2})[:-3],  # cut short by a crash
        "  " + at({"event": "ready", "seq": 3}),
    )
    assert [e["seq"] for e in console_events(path, "n")] == [0, 1, 3]


def test_console_events_without_a_boot_event(tmp_path: Path) -> None:
    # Events before any boot line (a log cut at the start) are kept; a nonce cannot be checked then.
    path = console(tmp_path, at({"event": "setup", "seq": 3}), at({"event": "ready", "seq": 4}))
    assert [e["seq"] for e in console_events(path)] == [3, 4]
    assert [e["seq"] for e in console_events(path, "n")] == [3, 4]


def test_console_events_missing_or_empty_file(tmp_path: Path) -> None:
    assert console_events(tmp_path / "missing.log") == []
    assert console_events(console(tmp_path)) == []
    assert console_events(tmp_path) == []  # a directory: OSError, not a crash


def test_console_tail(tmp_path: Path) -> None:
    lines = [f"line {i}\r" for i in range(30)]
    path = console(tmp_path, *lines[:10], "", "   ", *lines[10:], b"bad \xff byte")
    tail = console_tail(path)
    assert len(tail) == 15
    assert tail[-1] == "bad \ufffd byte"
    assert tail[0] == "line 16"
    assert all(not x.endswith("\r") for x in tail)
    assert console_tail(path, 2) == ["line 29", "bad \ufffd byte"]
    assert console_tail(tmp_path / "missing.log") == []
