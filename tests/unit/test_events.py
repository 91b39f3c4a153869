"""herovm.guest.events: the agent channel against a real unix-socket server playing the agent, and the
console-log readers against files written here."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herovm import protocol, protocol_host
from herovm.guest.events import (
    CONSOLE_PREFIX,
    AgentChannel,
    console_events,
    console_story,
    console_tail,
    follow_console,
    read_console,
)
from herovm.protocol import SCHEMA, Kind
from herovm.protocol_host import (
    MAX_CONTAINERS,
    MAX_DEPTH,
    MAX_LINE,
    Story,
    console_event,
    decode_event,
    describe_event,
    printable,
    validate_event,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "herovm/_data/agent"))
from herovm_agent import jsonio  # noqa: E402 - the agent's own encoder: what the host must take

# What each kind needs to pass the schema (herovm.protocol.SCHEMA), for tests that do not care.
FIELDS: dict[str, dict] = {
    "boot": {"nonce": "n", "agent": "1", "kernel": "6.1", "pid": 1},
    "setup": {"step": "disk", "ok": True, "seconds": 0.01},
    "bootstrap": {"source": "drive", "actions": 1, "sha256": None},
    "action.start": {"index": 0, "action": "cmd.run", "line": 1, "file": "b.hero"},
    "action.end": {"index": 0, "action": "cmd.run", "line": 1, "ok": True, "seconds": 0.1, "exit_code": 0},
    "ready": {"actions": 1, "seconds": 0.5},
    "failed": {"stage": "action", "error": "exited with 1"},
    "service": {"name": "web", "state": "started", "pid": 9},
    "status": {"status": {"state": "ready"}},
    "shutdown": {"reason": "host asked"},
    "sealed": {},
}


def event(kind: str = "setup", seq: int = 0, **fields: object) -> dict:
    return {"event": kind, "seq": seq, "t": seq / 10, **FIELDS.get(kind, {}), **fields}


def ev(seq: int, kind: str = "setup", **fields: object) -> bytes:
    return json.dumps(event(kind, seq, **fields)).encode() + b"\n"


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


def test_an_oversized_line_is_dropped_whole_and_the_channel_goes_on(sock_path: Path) -> None:
    def script(conn: socket.socket, agent: FakeAgent) -> None:
        agent.read_command(conn)
        conn.sendall(ev(0, "boot"))
        # 3 MB without a newline, in pieces (the host must not buffer it), then its end and a real event.
        junk = b'{"event": "failed", "seq": 1, "t": 1, "stage": "x", "error": "' + b"x" * 65536
        for _ in range(48):
            conn.sendall(junk)
        conn.sendall(b'"}\n' + ev(1, "ready"))

    agent = FakeAgent(sock_path, script)
    channel = AgentChannel(sock_path, deadline())
    try:
        got = []
        for e in channel.events(deadline()):
            got.append(e["event"])
            assert len(channel._buf) <= MAX_LINE + 65536
    finally:
        channel.close()
    agent.join()
    assert got == ["boot", "ready"]


# ------------------------------------------------------------------------------------------ the decoder


def line_of(value: object) -> str:
    return json.dumps(value)


@pytest.mark.parametrize("kind", list(FIELDS))
def test_every_kind_the_agent_sends_decodes(kind: str) -> None:
    e = event(kind, 3)
    assert decode_event(line_of(e)) == e
    assert decode_event(line_of(e).encode()) == e
    assert decode_event(line_of(e) + "\r") == e  # serial consoles end lines with \r\n
    assert decode_event(jsonio.dumps(e)) == e  # as the agent writes it


def test_the_schema_knows_every_kind_and_its_fields() -> None:
    assert set(SCHEMA) == set(Kind.ALL) == set(FIELDS)
    for kind, fields in SCHEMA.items():
        names = [f.name for f in fields]
        assert len(names) == len(set(names)), kind
        # every required field of a kind is in the sample the other tests use
        assert {f.name for f in fields if f.required} <= set(FIELDS[kind]), kind


def test_fields_the_schema_does_not_name_are_dropped() -> None:
    e = {**event("ready", 2), "extra": {"deep": [1, 2]}, "__proto__": 1}
    assert decode_event(line_of(e)) == event("ready", 2)


def test_optional_fields_may_be_missing_or_null_where_allowed() -> None:
    assert decode_event(line_of({"event": "ready", "seq": 0, "t": 0})) == {"event": "ready", "seq": 0, "t": 0}
    boot = {"event": "boot", "seq": 0, "t": 1.5, "nonce": None}  # the agent could not read its drive
    assert decode_event(line_of(boot)) == boot
    end = event("action.end", 1, exit_code=None, error=None)
    assert decode_event(line_of(end)) == end


def test_a_word_outside_a_fields_vocabulary_is_kept() -> None:
    """An older or newer agent's `failed` must still end the boot, whatever it calls the stage."""
    e = event("failed", 3, stage="a-stage-this-host-does-not-know")
    assert decode_event(line_of(e)) == e


def test_the_initramfs_failure_line_decodes() -> None:
    # herovm/_data/initramfs/init writes this itself, with echo: the schema must take it.
    line = '@herovm {"event": "failed", "seq": 0, "t": 0, "stage": "initramfs", "error": "no root device"}'
    assert console_event(line) == {
        "event": "failed",
        "seq": 0,
        "t": 0,
        "stage": "initramfs",
        "error": "no root device",
    }


def test_an_oversized_line_is_none_and_one_at_the_limit_is_not() -> None:
    base = line_of(event("action.end", 1, output=""))
    pad = MAX_LINE - len(base)
    at_limit = line_of(event("action.end", 1, output="o" * pad))
    assert len(at_limit) == MAX_LINE
    assert decode_event(at_limit) is not None
    assert decode_event(at_limit.encode()) is not None
    over = line_of(event("action.end", 1, output="o" * (pad + 1)))
    assert decode_event(over) is None
    assert decode_event(over.encode()) is None
    assert decode_event("[" * (10 * MAX_LINE)) is None


def test_the_agents_largest_events_fit() -> None:
    """The agent keeps 4096 characters of output; escaped as ASCII JSON (an emoji: 12 bytes) that still fits,
    with a long error beside it."""
    worst = "\U0001f600" * 4096
    for kind, fields in (
        ("action.end", {"output": worst, "error": "e" * 16384}),
        (
            "failed",
            {"output": worst, "error": "\x00" * 16384, "file": "f" * 4096, "action": "a.b", "line": 1},
        ),
    ):
        text = jsonio.dumps(event(kind, 1, **fields))
        assert len(text) < MAX_LINE
        assert decode_event(text)["output"] == worst


def nested(depth: int) -> dict:
    inner: object = 1
    for _ in range(depth - 1):  # the event itself is the outermost level
        inner = {"a": inner}
    return event("status", 1, status=inner if isinstance(inner, dict) else {"a": inner})


def test_nesting_is_bounded_before_the_parser_sees_it() -> None:
    assert decode_event(line_of(nested(MAX_DEPTH))) is not None
    assert decode_event(line_of(nested(MAX_DEPTH + 1))) is None
    assert not protocol_host._shallow(line_of(nested(MAX_DEPTH + 1)))
    # Far deeper than Python's recursion limit: refused by the scan, json.loads is never reached.
    for text in (
        "[" * 200_000,
        "{" + '"a":{' * 100_000,
        '{"event": "ready", "x": ' + "[" * 100_000 + "]" * 100_000,
    ):
        assert not protocol_host._shallow(text)
        assert decode_event(text) is None
        assert decode_event(CONSOLE_PREFIX + text) is None
        assert console_event(CONSOLE_PREFIX + text) is None


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    for output in ("[" * 5000, "{[" * 3000, '\\"[[[[' * 500, '\\\\"' + "[" * 100, "\\" * 50 + "{" * 50):
        e = event("action.end", 1, output=output)
        assert decode_event(line_of(e)) == e, output[:20]


def test_escaped_quotes_cannot_hide_nesting() -> None:
    # The quote after \\ ends the string: the brackets after it are structure.
    text = '{"event": "ready", "seq": 0, "t": 0, "x": "\\\\", "y": ' + "[" * 40 + "]" * 40 + "}"
    assert json.loads(text)  # valid JSON
    assert decode_event(text) is None  # 41 deep


def test_too_many_containers_is_none() -> None:
    wide = event("status", 1, status={"a": [[] for _ in range(MAX_CONTAINERS)]})
    assert decode_event(line_of(wide)) is None
    ok = event("status", 1, status={"a": [[] for _ in range(MAX_CONTAINERS // 2)]})
    assert decode_event(line_of(ok)) == ok


BAD_VALUES = [
    ("setup", "seq", "1"),
    ("setup", "seq", -1),
    ("setup", "seq", True),
    ("setup", "seq", 1.0),
    ("setup", "seq", None),
    ("setup", "t", "1.0"),
    ("setup", "t", None),
    ("setup", "t", [1]),
    ("setup", "step", 5),
    ("setup", "ok", 1),
    ("setup", "ok", "true"),
    ("setup", "error", ["x"]),
    ("boot", "nonce", 5),
    ("boot", "nonce", {"n": 1}),
    ("boot", "pid", "1"),
    ("bootstrap", "actions", -1),
    ("bootstrap", "actions", "4"),
    ("bootstrap", "sha256", 0),
    ("action.start", "index", "x"),
    ("action.start", "index", -1),
    ("action.start", "line", None),
    ("action.start", "action", None),
    ("action.end", "index", "x"),
    ("action.end", "action", 1),
    ("action.end", "line", None),
    ("action.end", "line", "4"),
    ("action.end", "ok", None),
    ("action.end", "seconds", "s"),
    ("action.end", "seconds", False),
    ("action.end", "exit_code", "0"),
    ("action.end", "exit_code", 1.5),
    ("action.end", "output", 5),
    ("action.end", "error", {"e": 1}),
    ("ready", "actions", "1"),
    ("ready", "seconds", [0]),
    ("failed", "stage", None),
    ("failed", "error", None),
    ("failed", "error", 7),
    ("failed", "line", "3"),
    ("failed", "output", ["boom"]),
    ("service", "name", 1),
    ("service", "state", None),
    ("service", "restarts", -2),
    ("status", "status", "ready"),
    ("status", "status", [1]),
    ("shutdown", "reason", None),
]


@pytest.mark.parametrize("kind, key, value", BAD_VALUES)
def test_a_field_of_the_wrong_type_makes_the_event_none(kind: str, key: str, value: object) -> None:
    e = event(kind, 1)
    assert decode_event(line_of(e)) == e
    e[key] = value
    assert decode_event(line_of(e)) is None


@pytest.mark.parametrize(
    "kind, key",
    [(k, f.name) for k, fields in SCHEMA.items() for f in fields if f.required] + [("ready", "seq")],
)
def test_a_missing_required_field_makes_the_event_none(kind: str, key: str) -> None:
    e = event(kind, 1)
    del e[key]
    assert decode_event(line_of(e)) is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "[]",
        '"ready"',
        "5",
        '{"seq": 0, "t": 0}',
        '{"event": "Ready", "seq": 0, "t": 0}',
        '{"event": "ready ", "seq": 0, "t": 0}',
        '{"event": "exec", "seq": 0, "t": 0}',
        '{"event": 5, "seq": 0, "t": 0}',
        '{"event": null, "seq": 0, "t": 0}',
        '{"event": ["ready"], "seq": 0, "t": 0}',
        '{"event": "ready", "seq": 0, "t": NaN}',
        '{"event": "ready", "seq": 0, "t": Infinity}',
        '{"event": "ready", "seq": 0, "t": 1e999}',
        '{"event": "ready", "seq": ' + "9" * 5000 + ', "t": 0}',  # past Python's int-from-text limit
        '{"event": "ready", "seq": 0, "t": 0} trailing',
        '{"event": "ready", "seq": 0, "t": 0',
        "{'event': 'ready', 'seq': 0, 't': 0}",
    ],
)
def test_what_is_no_event_is_none(text: str) -> None:
    assert decode_event(text) is None
    assert decode_event(text.encode()) is None


def test_bad_utf8_is_none_and_lone_surrogates_are_replaced() -> None:
    assert decode_event(b'{"event": "failed", "seq": 1, "t": 1, "stage": "x", "error": "\xff"}') is None
    e = decode_event('{"event": "failed", "seq": 1, "t": 1, "stage": "x", "error": "a\\ud800b"}')
    assert e is not None and "\ud800" not in e["error"] and e["error"].startswith("a")
    e["error"].encode("utf-8")  # printable anywhere


def test_console_event_finds_the_prefix_anywhere_in_the_line() -> None:
    e = event("ready", 4)
    assert console_event(f"[    2.5] kernel text {CONSOLE_PREFIX}{line_of(e)}") == e
    assert console_event(f"@herovm{line_of(e)}") is None  # no space: not ours
    assert console_event(line_of(e)) is None  # no prefix: not ours
    assert console_event("@herovm ") is None


# -------------------------------------------------------------------------------------------- the story


def test_story_keeps_this_boots_events_up_to_its_first_end() -> None:
    story = Story("N")
    verdicts = [
        story.take(e)
        for e in (
            event("setup", 9),  # before any boot: the log was cut
            event("boot", 0, nonce="OLD"),
            event("ready", 1),
            event("failed", 2),  # after that boot's end
            event("boot", 0, nonce="N"),
            event("action.end", 1),
            event("ready", 2),
            event("failed", 3),  # a guest process, after ready
            event("action.end", 4, ok=False),
            event("service", 5),  # a service stops: news, not a forgery
            event("boot", 0, nonce="N"),  # this boot's nonce again
            event("boot", 0, nonce="OTHER"),
            event("ready", 1),
            event("shutdown", 6),
        )
    ]
    assert verdicts == [
        "before any boot event",
        Story.EARLIER,
        Story.EARLIER,
        "after ready",
        Story.THIS,
        Story.THIS,
        Story.THIS,
        "after ready",
        "after ready",
        Story.THIS,
        "a boot event after this boot's own",
        "a boot event after this boot's own",
        "after ready",
        Story.THIS,
    ]
    assert story.begun and story.outcome == "ready" and story.failure is None
    assert [(e["event"], e["seq"]) for e in story.events] == [
        ("boot", 0),
        ("action.end", 1),
        ("ready", 2),
        ("service", 5),
        ("shutdown", 6),
    ]


def test_story_the_first_end_decides() -> None:
    story = Story("N")
    for e in (event("boot", 0, nonce="N"), event("failed", 1, error="real"), event("ready", 2)):
        story.take(e)
    assert story.outcome == "failed" and story.failure["error"] == "real"
    assert [e["event"] for e in story.events] == ["boot", "failed"]


def test_story_of_the_wrong_nonce_or_none() -> None:
    for nonce in ("other", None):
        story = Story(nonce)
        for e in (event("boot", 0, nonce="N"), event("ready", 1)):
            story.take(e)
        assert not story.begun and story.outcome is None and story.events == []
    story = Story(None)
    assert story.take(event("boot", 0, nonce=None)) == Story.EARLIER  # no nonce matches None on the console
    unnamed = Story("N", unnamed=True)  # the agent channel: a boot without a nonce is this boot's
    assert unnamed.take(event("boot", 0, nonce=None)) == Story.THIS
    assert unnamed.take(event("failed", 1, stage="drive")) == Story.THIS
    assert unnamed.outcome == "failed"


def test_story_an_unfinished_earlier_boot_then_this_one() -> None:
    story = Story("N")
    for e in (event("boot", 0, nonce="A"), event("setup", 1), event("boot", 0, nonce="N"), event("setup", 1)):
        story.take(e)
    assert [e["event"] for e in story.events] == ["boot", "setup"] and story.outcome is None


# ------------------------------------------------------------------------------------------- rendering


def test_printable_shows_control_characters_instead_of_sending_them() -> None:
    assert printable("ok\tfine\nnext") == "ok\tfine\nnext"
    assert printable("\x1b]0;pwned\x07\x1b[2J\r\x9b") == "\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x9b"
    assert printable("a\nb\tc", one_line=True) == "a\\nb\\tc"
    assert printable(None) == "None"


def test_describe_event_escapes_what_the_guest_chose() -> None:
    e = event("failed", 1, stage="action\x1b[31m", error="x\ny\x1b]2;t\x07", line=3, action="cmd.run")
    text = describe_event(e)
    assert "\x1b" not in text and "\n" not in text and "\x07" not in text
    assert text == "FAILED in action\\x1b[31m at line 3 (cmd.run): x\\ny\\x1b]2;t\\x07"
    service = describe_event(event("service", 1, name="\x1b[2J", state="started\r"))
    assert service == "service \\x1b[2J started\\x0d (pid 9)"


def test_describe_event_renders_every_kind_for_people() -> None:
    """No kind falls through to its raw JSON (`up` and `logs` print these lines)."""
    for kind in FIELDS:
        assert not describe_event(event(kind, 1)).startswith("{"), kind
    assert describe_event(event("service", 2, name="web", state="exited", exit_code=3, restarts=2)) == (
        "service web exited (pid 9, exit code 3, restart 2)"
    )
    restored = describe_event(event("boot", 0, restored=True))
    assert restored.startswith("agent 1 restored at") and "identity" in restored


# ---------------------------------------------------------------------------------- console readers


def console(tmp_path: Path, *lines: str | bytes, name: str = "console.log") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return tmp_path / "console.log"


def at(e: dict) -> str:
    return CONSOLE_PREFIX + json.dumps(e)


def test_console_events_of_the_last_boot(tmp_path: Path) -> None:
    path = console(
        tmp_path,
        "[    0.000000] Linux version 6.1",
        at(event("boot", 0, nonce="old")),
        at(event("ready", 1)),
        "reboot: Power down",
        "[    0.000000] Linux version 6.1",
        at(event("boot", 0, nonce="new")),
        at(event("setup", 1)),
    )
    events = console_events(path, "new")
    assert [(e["event"], e.get("nonce")) for e in events] == [("boot", "new"), ("setup", None)]
    assert [e["event"] for e in console_events(path, "old")] == ["boot", "ready"]
    assert console_events(path, "other") == []
    assert [e["seq"] for e in console_events(path)] == [
        0,
        1,
        0,
        1,
    ]  # no nonce: every event, for the initramfs check


def test_console_events_garbage_and_prefix_mid_line(tmp_path: Path) -> None:
    path = console(
        tmp_path,
        "@herovm not json at all",
        "@herovm [1, 2]",
        '@herovm {"no": "event"}',
        "@herovm",
        "@herovm" + json.dumps(event("boot", 0)),  # no space after the prefix: not ours
        "[    2.5] random kernel text " + at(event("boot", 0, nonce="n")),
        at(event("setup", 1)) + "\r",  # serial consoles end lines with \r\n
        b"\xff\xfe binary noise \x00\x01",
        at(event("ready", 2))[:-3],  # cut short by a crash
        '@herovm {"event": "action.end", "seq": 2, "t": 1, "index": "x", "action": 1, "ok": 1}',
        "  " + at(event("ready", 3)),
    )
    assert [e["seq"] for e in console_events(path, "n")] == [0, 1, 3]


def test_console_events_without_this_boots_boot_event(tmp_path: Path) -> None:
    # Events with no boot line before them (a log cut at the start) cannot be told from a forgery: they are
    # nobody's story. Without a nonce, the initramfs check sees them all.
    path = console(tmp_path, at(event("setup", 3)), at(event("ready", 4)))
    assert console_events(path, "n") == []
    story, whole = console_story(path, "n")
    assert whole and not story.begun
    assert [e["seq"] for e in console_events(path)] == [3, 4]


def test_console_events_from_an_offset_and_after_a_rotation(tmp_path: Path) -> None:
    path = console(tmp_path, at(event("setup", 1)), at(event("failed", 2, stage="initramfs")))
    first = len(at(event("setup", 1))) + 1
    assert [e["seq"] for e in console_events(path, offset=first)] == [2]
    assert console_events(path, offset=path.stat().st_size) == []
    # past the end: virtlogd rotated the log since the offset was taken, so all of the new one counts
    assert [e["seq"] for e in console_events(path, offset=10**9)] == [1, 2]


def test_console_events_missing_or_empty_file(tmp_path: Path) -> None:
    assert console_events(tmp_path / "missing.log") == []
    assert console_events(tmp_path / "missing.log", "n") == []
    assert console_events(console(tmp_path)) == []
    assert console_events(tmp_path) == []  # a directory: OSError, not a crash
    assert console_events(tmp_path, "n") == []


def test_read_console_spans_virtlogds_rotated_files(tmp_path: Path) -> None:
    # virtlogd renames console.log to console.log.0 (.0 to .1, ...) when it reaches max_size; it may cut a
    # line in two there.
    console(tmp_path, "oldest 1", "oldest 2", name="console.log.1")
    (tmp_path / "console.log.0").write_bytes(
        b"older 1\nolder 2\n" + at(event("boot", 0, nonce="N"))[:20].encode()
    )
    (tmp_path / "console.log").write_bytes(at(event("boot", 0, nonce="N"))[20:].encode() + b"\nnewest\n")
    path = tmp_path / "console.log"
    window = read_console(path)
    assert window.whole and window.end == path.stat().st_size
    assert window.lines() == [
        "oldest 1",
        "oldest 2",
        "older 1",
        "older 2",
        at(event("boot", 0, nonce="N")),
        "newest",
    ]
    story, whole = console_story(path, "N")
    assert story.begun and whole
    # A window of 30 bytes: the newest line and the end of the cut one, which is dropped.
    window = read_console(path, 30)
    assert not window.whole and window.lines() == ["newest"]
    # A window ending inside console.log.0: in "older 2", whose rest is dropped; the cut boot line is whole.
    window = read_console(path, path.stat().st_size + 25)
    assert not window.whole and window.lines() == [at(event("boot", 0, nonce="N")), "newest"]


def test_console_story_when_the_start_of_the_boot_was_rotated_away(tmp_path: Path) -> None:
    lines = [at(event("boot", 0, nonce="N")), *(f"spam {i:06d} " + "x" * 90 for i in range(20_000))]
    lines += [at(event("failed", 9, error="forged after the cut"))]
    path = console(tmp_path, *lines)
    story, whole = console_story(path, "N")
    assert not whole and not story.begun and story.outcome is None and story.events == []
    story, whole = console_story(path, "N", limit=path.stat().st_size)
    assert whole and story.outcome == "failed"


def test_console_tail(tmp_path: Path) -> None:
    lines = [f"line {i}\r" for i in range(30)]
    path = console(tmp_path, *lines[:10], "", "   ", *lines[10:], b"bad \xff byte \x1b[2J")
    tail = console_tail(path)
    assert len(tail) == 15
    assert tail[-1] == "bad \ufffd byte \\x1b[2J"  # escape sequences are shown, not sent to the terminal
    assert tail[0] == "line 16"
    assert all(not x.endswith("\r") for x in tail)
    assert console_tail(path, 2) == ["line 29", "bad \ufffd byte \\x1b[2J"]
    assert console_tail(tmp_path / "missing.log") == []


def test_console_tail_reads_only_the_end(tmp_path: Path) -> None:
    path = console(tmp_path, *("x" * 1000 for _ in range(20_000)), "last")  # 20 MB
    t0 = time.monotonic()
    assert console_tail(path, 1) == ["last"]
    assert time.monotonic() - t0 < 1


def test_follow_console_goes_on_across_a_rotation(tmp_path: Path) -> None:
    path = console(tmp_path, "before")
    window = read_console(path)
    got: list[str] = []

    def follow() -> None:
        for line in follow_console(path, window.end, poll=0.01):
            got.append(line)
            if line == "done":
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    with open(path, "ab") as f:
        f.write(b"one\r\ntw")
        f.flush()
        time.sleep(0.1)
        f.write(b"o\n")
    time.sleep(0.1)
    os.rename(path, tmp_path / "console.log.0")  # what virtlogd does at max_size
    path.write_bytes(b"three\ndone\n")
    t.join(5)
    assert not t.is_alive()
    assert got == ["one", "two", "three", "done"]


# --------------------------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
kinds = st.sampled_from([*FIELDS, "x", "ready ", ""])


@st.composite
def event_like(draw) -> dict:
    """Mostly-right events: a kind, its fields, and some of them replaced by any JSON value."""
    kind = draw(kinds)
    e = {
        "event": kind,
        "seq": draw(st.integers(-2, 10)),
        "t": draw(st.floats(allow_nan=False)),
        **FIELDS.get(kind, {}),
    }
    for key in draw(st.lists(st.sampled_from([*e, "extra", "nonce", "output"]), max_size=3)):
        e[key] = draw(json_values)
    for key in draw(st.lists(st.sampled_from(list(e)), max_size=1)):
        del e[key]
    return e


def assert_valid(result: dict | None) -> None:
    if result is None:
        return
    assert validate_event(result) == result  # exactly what the schema allows
    kind = result["event"]
    allowed = {f.name for f in (*protocol.COMMON, *SCHEMA[kind])}
    assert set(result) <= allowed
    assert result["seq"] >= 0 and math.isfinite(result["t"])
    json.dumps(result).encode("utf-8")
    for v in result.values():
        if isinstance(v, str):
            v.encode("utf-8")  # printable: no lone surrogates
    describe_event(result)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_fuzz_decoder_on_any_text(line: str | bytes) -> None:
    assert_valid(decode_event(line))
    if isinstance(line, str):
        assert_valid(console_event(CONSOLE_PREFIX + line))


@FUZZ
@given(event_like() | json_values)
def test_fuzz_decoder_on_json(value: object) -> None:
    text = json.dumps(value)
    result = decode_event(text)
    assert_valid(result)
    if isinstance(value, dict) and result is not None:
        assert all(result[k] == value[k] or result[k] != result[k] for k in result)  # nothing is made up


@FUZZ
@given(st.lists(event_like(), max_size=12), st.sampled_from(["n", "N", None]))
def test_fuzz_story(values: list[dict], nonce: str | None) -> None:
    story = Story(nonce)
    for value in values:
        e = decode_event(json.dumps(value))
        if e is not None:
            story.take(e)
    terminals = [e for e in story.events if e["event"] in ("ready", "failed")]
    assert len(terminals) <= 1
    assert story.outcome == (terminals[0]["event"] if terminals else None)
    if story.events:
        assert story.events[0]["event"] == "boot" and story.events[0]["nonce"] == nonce


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.text(max_size=80),
            event_like().map(lambda e: CONSOLE_PREFIX + json.dumps(e)),
            st.binary(max_size=80).map(lambda b: CONSOLE_PREFIX + b.decode("latin-1")),
            st.integers(1, 40).map(lambda n: CONSOLE_PREFIX + "[" * n + "]" * n),
        ),
        max_size=30,
    )
)
def test_fuzz_console_readers(tmp_path_factory: pytest.TempPathFactory, lines: list[str]) -> None:
    d = tmp_path_factory.mktemp("fuzz")
    path = d / "console.log"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    for nonce in ("n", None):
        for e in console_events(path, nonce):
            assert_valid(e)
    story, _ = console_story(path, "n")
    assert story.events == console_events(path, "n")
    for line in console_tail(path):
        line.encode("utf-8")
