"""The exec protocol (docs/protocol.md, "Exec without SSH") with no VM: the agent's real exec server on
real sockets, and the host's real AgentExec against it or against an impostor.

What is held here: before authentication the agent reads at most two small frames, within a deadline, and
only so many such connections at once; after it every frame kind has its cap; a malformed request gets an E
frame, never a traceback; the host sends nothing but a nonce until the agent has proved it holds the token.
Servers that run commands run in a child process (they reap their own children there); the ones in this
process never get that far, which `processes._started` confirms.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herovm import protocol
from herovm.errors import GuestError
from herovm.guest import agent_exec

AGENT = Path(__file__).resolve().parents[2] / "herovm/_data/agent"
sys.path.insert(0, str(AGENT))
from herovm_agent import exec_server as es  # noqa: E402
from herovm_agent.processes import Processes  # noqa: E402

TOKEN = "ab" * 32
HEADER = struct.Struct(">cI")
HANDSHAKE_READ_MAX = 2 * (
    HEADER.size + protocol.MAX_HANDSHAKE
)  # all the agent reads from a peer not yet proved


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def jframe(kind: bytes, obj: object) -> bytes:
    return frame(kind, json.dumps(obj).encode())


def mac(label: bytes, nonce: str, challenge: str, token: str = TOKEN) -> str:
    """The HMAC both sides compute, with the standard library: the agent's own code is checked against it."""
    return hmac.new(
        token.encode(), label + nonce.encode() + b" " + challenge.encode(), hashlib.sha256
    ).hexdigest()


class CountingSocket:
    """A real socket that counts what the server reads from it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.received = 0

    def recv(self, n: int, *flags: int) -> bytes:
        data = self._sock.recv(n, *flags)
        self.received += len(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class Served:
    """One connection served by the agent's Session in a thread of this process (the caller has the
    other end). Records any exception that escapes the session: there must be none."""

    def __init__(self, token: str = TOKEN) -> None:
        server, self.client = socket.socketpair()
        self.conn = CountingSocket(server)
        self.processes = Processes()
        self.escaped: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, args=(token,), daemon=True)
        self.thread.start()
        self.client.settimeout(10)

    def _serve(self, token: str) -> None:
        try:
            es.Session(self.conn, token.encode(), self.processes).serve()
        except BaseException as e:  # noqa: BLE001 - recorded for the test to fail on
            self.escaped.append(e)

    def send(self, data: bytes) -> bool:
        """False when the server has hung up meanwhile."""
        try:
            self.client.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def frames_until_closed(self) -> list[tuple[bytes, bytes]]:
        data = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := self.client.recv(65536):
                data += chunk
        frames = []
        while data:
            assert len(data) >= HEADER.size, f"a torn frame header: {bytes(data)!r}"
            kind, length = HEADER.unpack_from(data)
            assert len(data) >= HEADER.size + length, "a torn frame"
            frames.append((kind, bytes(data[HEADER.size : HEADER.size + length])))
            del data[: HEADER.size + length]
        return frames

    def finish(self) -> list[tuple[bytes, bytes]]:
        """Hang up our side for writing, take every frame the server sent, and check it ended cleanly."""
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_WR)
        frames = self.frames_until_closed()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the session did not end"
        assert not self.escaped, f"escaped the session: {self.escaped!r}"
        assert not self.processes._started, "nothing here may spawn a process"
        return frames

    def handshake(self, answer: str | None = None) -> dict:
        """HELLO, the agent's CHALLENGE (its proof checked), AUTH: as the host does it."""
        nonce = os.urandom(32).hex()
        self.client.sendall(jframe(b"H", {"nonce": nonce}))
        kind, length = HEADER.unpack(self._recv_exact(HEADER.size))
        assert kind == b"C" and length <= protocol.MAX_HANDSHAKE
        greeting = json.loads(self._recv_exact(length))
        assert greeting["proof"] == mac(protocol.AGENT_PROOF_LABEL, nonce, greeting["challenge"])
        answer = answer or mac(protocol.HOST_ANSWER_LABEL, nonce, greeting["challenge"])
        self.client.sendall(jframe(b"A", {"answer": answer}))
        return greeting

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.client.recv(n - len(data))
            assert chunk, "the server hung up"
            data += chunk
        return data


def errors(frames: list[tuple[bytes, bytes]]) -> list[str]:
    return [json.loads(p)["error"] for k, p in frames if k == b"E"]


# --- before authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [b"0", b"H", b"A", b"R", b"Z"])
def test_a_pre_auth_frame_declaring_400_mib_ends_the_connection_from_its_header_alone(kind: bytes) -> None:
    s = Served()
    sent = s.send(HEADER.pack(kind, 400 << 20))
    assert sent
    # Stream its payload as the attack did: the agent hangs up instead of reading (or allocating) it.
    streamed = 0
    while streamed < (64 << 20) and s.send(b"x" * (1 << 20)):
        streamed += 1 << 20
    frames = s.finish()
    assert s.conn.received == HEADER.size
    assert streamed < (64 << 20), "the agent kept reading a 400 MiB frame before authentication"
    assert len(frames) <= 1 and all(k == b"E" for k, _ in frames)


@pytest.mark.parametrize(
    "opening",
    [
        frame(b"0", b"stdin before any handshake"),
        jframe(b"R", {"argv": ["touch", "/tmp/herovm-unauthenticated"]}),
        frame(b"P"),
        frame(b"K"),
        jframe(b"A", {"answer": "0" * 64}),
    ],
    ids=["stdin", "request", "ping", "kill", "auth-before-hello"],
)
def test_before_hello_any_other_frame_ends_the_connection(opening: bytes) -> None:
    s = Served()
    s.send(opening)
    frames = s.finish()
    assert [k for k, _ in frames] == [b"E"] and "unexpected frame" in errors(frames)[0]
    assert s.conn.received == HEADER.size
    assert not os.path.exists("/tmp/herovm-unauthenticated")


@pytest.mark.parametrize(
    "hello",
    [
        jframe(b"H", {}),
        jframe(b"H", {"nonce": "xyz"}),
        jframe(b"H", {"nonce": "A" * 64}),
        frame(b"H", b"\xff"),
    ],
    ids=["no-nonce", "short", "uppercase", "not-utf8"],
)
def test_a_malformed_hello_is_refused(hello: bytes) -> None:
    s = Served()
    s.send(hello)
    frames = s.finish()
    assert errors(frames) == ["exec refused: malformed handshake (no nonce)"]


def test_after_the_challenge_only_auth_is_read() -> None:
    s = Served()
    s.send(jframe(b"H", {"nonce": "0" * 64}))
    s.send(jframe(b"R", {"argv": ["touch", "/tmp/herovm-unauthenticated"]}))
    frames = s.finish()
    assert [k for k, _ in frames] == [b"C", b"E"] and "unexpected frame kind b'R'" in errors(frames)[0]
    assert not os.path.exists("/tmp/herovm-unauthenticated")


def test_a_wrong_answer_is_refused_and_the_request_behind_it_is_not_read() -> None:
    s = Served()
    s.handshake(answer="0" * 64)
    s.send(jframe(b"R", {"argv": ["touch", "/tmp/herovm-unauthenticated"]}))
    frames = s.finish()
    assert errors(frames) == ["exec refused: wrong token"]
    assert s.conn.received <= HANDSHAKE_READ_MAX
    assert not os.path.exists("/tmp/herovm-unauthenticated")


def test_an_answer_from_the_other_direction_is_refused() -> None:
    """The agent's own proof, sent back as the host's answer (a reflection), proves nothing."""
    s = Served()
    nonce = "1" * 64
    s.send(jframe(b"H", {"nonce": nonce}))
    kind, length = HEADER.unpack(s._recv_exact(HEADER.size))
    greeting = json.loads(s._recv_exact(length))
    s.send(jframe(b"A", {"answer": greeting["proof"]}))
    assert errors(s.finish()) == ["exec refused: wrong token"]


def test_the_handshake_has_a_deadline_even_for_a_peer_that_trickles(monkeypatch) -> None:
    monkeypatch.setattr(es, "AUTH_DEADLINE_S", 0.6)
    s = Served()
    started = time.monotonic()
    hello = jframe(b"H", {"nonce": "0" * 64})
    for byte in hello[:-1]:  # one byte at a time, never quite a whole HELLO
        if not s.send(bytes([byte])):
            break
        time.sleep(0.05)
    s.thread.join(5)
    assert not s.thread.is_alive() and time.monotonic() - started < 3
    assert s.frames_until_closed() == []  # hung up without a word


def test_unauthenticated_connections_are_capped(monkeypatch) -> None:
    monkeypatch.setattr(es, "MAX_UNAUTHENTICATED", 3)
    idle = [Served() for _ in range(3)]
    time.sleep(0.2)  # they are all waiting for a HELLO now
    extra = Served()
    extra.thread.join(5)
    assert not extra.thread.is_alive() and extra.frames_until_closed() == []  # refused at once
    assert extra.conn.received == 0
    idle[0].finish()  # one hangs up: its place is free again
    s = Served()
    s.handshake()
    s.send(frame(b"P"))
    assert [k for k, _ in s.finish()] == [b"P"]
    for other in idle[1:]:
        other.finish()


# --- after authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (
            HEADER.pack(b"0", protocol.MAX_CHUNK + 1),
            f"a b'0' frame of {protocol.MAX_CHUNK + 1} bytes is over its limit of {protocol.MAX_CHUNK}",
        ),
        (HEADER.pack(b"0", 400 << 20), "a b'0' frame of 419430400 bytes is over its limit of 65536"),
        (
            HEADER.pack(b"R", protocol.MAX_REQUEST + 1),
            "a b'R' frame of 1048577 bytes is over its limit of 1048576",
        ),
        (HEADER.pack(b"K", 1), "a b'K' frame of 1 bytes is over its limit of 0"),
        (HEADER.pack(b"P", 4096), "a b'P' frame of 4096 bytes is over its limit of 0"),
        (HEADER.pack(b"H", 75), "unexpected frame kind b'H'"),
        (HEADER.pack(b"Z", 0), "unexpected frame kind b'Z'"),
    ],
    ids=["stdin-chunk+1", "stdin-400MiB", "request", "kill", "ping", "hello-again", "unknown"],
)
def test_after_auth_every_frame_kind_has_its_cap(header: bytes, message: str) -> None:
    s = Served()
    s.handshake()
    s.send(header)
    frames = s.finish()
    assert errors(frames) == [message]
    assert s.conn.received <= HANDSHAKE_READ_MAX + HEADER.size  # the payload was never read


MALFORMED = [
    (b"{", "bad request: not JSON"),
    (b"\xff\xfe", "bad request: not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "bad request: not JSON"),
    (b"[]", "bad request: not a JSON object"),
    (b"{}", "bad request: it needs exactly one of argv, shell and kill_session"),
    (b'{"argv": ["ls"], "shell": "ls"}', "bad request: it needs exactly one of argv, shell and kill_session"),
    (b'{"argv": "ls"}', "bad request: argv must be a list of strings, the first not empty"),
    (b'{"argv": []}', "bad request: argv must be a list of strings, the first not empty"),
    (b'{"argv": [""]}', "bad request: argv must be a list of strings, the first not empty"),
    (b'{"argv": ["ls", 1]}', "bad request: argv must be a list of strings, the first not empty"),
    (b'{"argv": ["l\\u0000s"]}', "bad request: a NUL character in argv"),
    (b'{"argv": ["\\ud800"]}', "bad request: argv does not encode (a lone surrogate)"),
    (b'{"shell": 5}', "bad request: shell must be a string"),
    (b'{"kill_session": 5}', "bad request: kill_session must be a string"),
    (b'{"argv": ["ls"], "env": []}', "bad request: env must be an object of strings"),
    (b'{"argv": ["ls"], "env": {"A": 1}}', "bad request: env must be an object of strings"),
    (b'{"argv": ["ls"], "env": {"A=B": "c"}}', "bad request: 'A=B' cannot be an environment variable's name"),
    (b'{"argv": ["ls"], "env": {"": "c"}}', "bad request: '' cannot be an environment variable's name"),
    (b'{"argv": ["ls"], "env": {"A": "\\u0000"}}', "bad request: a NUL character in env"),
    (b'{"argv": ["ls"], "cwd": 5}', "bad request: cwd must be a string"),
    (b'{"argv": ["ls"], "stdin": "yes"}', "bad request: stdin must be true or false"),
    (b'{"argv": ["ls"], "auth": "00"}', "bad request: unknown field 'auth'"),
    (b'{"argv": ["ls"], "' + b"x" * 5000 + b'": 1}', "bad request: unknown field '" + "x" * 40 + "'"),
]


@pytest.mark.parametrize(("payload", "message"), MALFORMED, ids=[m[1][13:40] for m in MALFORMED])
def test_a_malformed_request_gets_one_error_frame_and_no_traceback(
    payload: bytes, message: str, capfd
) -> None:
    s = Served()
    s.handshake()
    s.send(frame(b"R", payload))
    frames = s.finish()
    assert [k for k, _ in frames] == [b"E"]
    (error,) = errors(frames)
    assert error.startswith(message) and "\n" not in error and len(error) < 200
    assert "Traceback" not in capfd.readouterr().err


# --- fuzzing the frame reader and the handshake --------------------------------------------------------

KINDS = [b"H", b"A", b"R", b"0", b"K", b"P", b"C", b"E", b"X", b"\x00", b"\xff"]
chunks = st.one_of(
    st.binary(max_size=64),
    st.builds(frame, st.sampled_from(KINDS), st.binary(max_size=300)),
    st.builds(lambda k, n: HEADER.pack(k, n), st.sampled_from(KINDS), st.integers(0, 2**32 - 1)),
    st.builds(lambda n: jframe(b"H", {"nonce": n}), st.sampled_from(["0" * 64, "f" * 63, "g" * 64])),
    st.builds(lambda a: jframe(b"A", {"answer": a}), st.sampled_from(["0" * 64, "", None])),
)
requests = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(
        st.sampled_from(["argv", "env", "cwd", "stdin", "kill_session", "other"]),  # no shell: it would run
        st.one_of(st.none(), st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=3)),
        max_size=4,
    ).map(lambda d: json.dumps(d).encode()),
)
after_auth = st.one_of(
    chunks,
    st.builds(frame, st.just(b"R"), requests),
    st.builds(lambda c: jframe(b"R", {"kill_session": c}), st.text(max_size=64)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(chunks, max_size=6))
def test_fuzz_before_authentication_only_challenge_error_or_hang_up(stream: list[bytes]) -> None:
    s = Served()
    for chunk in stream:
        if not s.send(chunk):
            break
    frames = s.finish()
    kinds = [k for k, _ in frames]
    assert kinds in ([], [b"C"], [b"E"], [b"C", b"E"]), kinds
    assert s.conn.received <= HANDSHAKE_READ_MAX
    for message in errors(frames):
        assert message.startswith(("exec refused: ", "unexpected frame kind ", "a b'")), message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(after_auth, max_size=6))
def test_fuzz_after_authentication_only_documented_frames(stream: list[bytes]) -> None:
    s = Served()
    s.handshake()
    for chunk in stream:
        if not s.send(chunk):
            break
    frames = s.finish()
    kinds = [k for k, _ in frames]
    assert set(kinds) <= {b"P", b"X", b"E"} and kinds.count(b"E") <= 1
    assert b"E" not in kinds[:-1]  # an error is the last word
    for kind, payload in frames:
        if kind == b"X":
            assert json.loads(payload) == {"exit_code": 1}  # kill_session of no such session


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.dictionaries(st.sampled_from(KINDS), st.integers(0, 300)))
def test_fuzz_read_frame_returns_a_frame_in_its_limits_or_refuses(data: bytes, limits: dict) -> None:
    server, client = socket.socketpair()
    with server, client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        counted = CountingSocket(server)
        try:
            kind, payload = es.read_frame(counted, limits, time.monotonic() + 5)
        except (es.Disconnected, es.ProtocolError):
            assert counted.received <= HEADER.size + max(limits.values(), default=0)
        else:
            assert kind in limits and len(payload) <= limits[kind]
            assert data.startswith(HEADER.pack(kind, len(payload)) + payload)


# --- the host: AgentExec against an agent server and against impostors ----------------------------------

AGENT_SERVER = """
import socket, sys, threading
sys.path.insert(0, sys.argv[1])
from herovm.protocol import EXEC_MAGIC
from herovm_agent import exec_server
from herovm_agent.processes import Processes
processes = Processes()
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
def dispatch(conn):
    with conn:
        if conn.recv(len(EXEC_MAGIC), socket.MSG_WAITALL) == EXEC_MAGIC:
            exec_server.serve(conn, sys.argv[2].encode(), processes)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=dispatch, args=(conn,), daemon=True).start()
"""


@pytest.fixture(scope="module")
def agent_port() -> Iterator[int]:
    """The agent's exec server with real Processes, in a child process (its reaper reaps only there)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT_SERVER, str(AGENT), TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert "Traceback" not in proc.stderr.read()


def client(
    port: int, token: str = TOKEN, opened: list | None = None, on_unreachable=None
) -> agent_exec.AgentExec:
    def connect(timeout: float) -> socket.socket:
        if opened is not None:
            opened.append(1)
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)

    return agent_exec.AgentExec(target="box", token=token, connect=connect, on_unreachable=on_unreachable)


def test_the_host_and_the_agent_run_commands_on_one_kept_connection(agent_port: int) -> None:
    opened: list = []
    with client(agent_port, opened=opened) as box:
        r = box.exec(["sh", "-c", 'echo "$A"; echo err >&2; exit 3'], env={"A": "x", "N": 5})
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"x\n", b"err\n")
        assert box.exec("cat | wc -c", stdin=b"y" * 300_000).stdout.strip() == b"300000"
        assert len(opened) == 1  # the second exec reused the authenticated connection


class Generous(io.RawIOBase):
    """A stdin whose read() returns more than asked: the host still sends frames the agent accepts."""

    def __init__(self, total: int) -> None:
        self.left = total

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        give, self.left = min(self.left, 1 << 20), self.left - min(self.left, 1 << 20)
        return b"z" * give


def test_stdin_from_a_reader_that_returns_more_than_asked_is_sent_in_chunks(agent_port: int) -> None:
    with client(agent_port) as box:
        assert box.exec(["wc", "-c"], stdin=Generous(3 << 20)).stdout.strip() == str(3 << 20).encode()


def test_a_command_clogged_with_stdin_is_killed_through_another_connection(agent_port: int) -> None:
    """kill_session still names a session by its challenge: the timeout gets through 20 MB of unread stdin."""
    with client(agent_port) as box:
        r = box.exec("exec sleep 300", stdin=io.BytesIO(b"x" * (20 << 20)), timeout=1)
        assert r.timed_out and r.exit_code == 124 and r.seconds < 10
        assert box.exec(["true"]).exit_code == 0


def test_a_wrong_token_on_the_host_is_caught_before_anything_is_sent(agent_port: int) -> None:
    with client(agent_port, token="cd" * 32) as box, pytest.raises(GuestError) as caught:
        box.exec(["true"])
    assert caught.value.message == (
        f"the process on 127.0.0.1:{agent_port} did not prove it is VM box's agent: its proof is wrong"
    )


def test_the_400_mib_stdin_attack_leaves_the_agent_serving(agent_port: int) -> None:
    with socket.create_connection(("127.0.0.1", agent_port), timeout=10) as sock:
        sock.sendall(protocol.EXEC_MAGIC + HEADER.pack(b"0", 400 << 20))
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < (400 << 20):
                sock.sendall(b"\0" * (1 << 20))
                sent += 1 << 20
    assert sent < (64 << 20)
    with client(agent_port) as box:
        assert box.exec(["echo", "alive"]).stdout == b"alive\n"


class Impostor:
    """Holds a port and plays the agent without the token; records every byte the host sends it."""

    def __init__(self, answer) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answer = answer
        self.received = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(10)
            hello = conn.recv(len(protocol.EXEC_MAGIC) + HEADER.size, socket.MSG_WAITALL)
            hello += conn.recv(HEADER.unpack_from(hello, len(protocol.EXEC_MAGIC))[1], socket.MSG_WAITALL)
            self.received += hello
            with contextlib.suppress(OSError):
                conn.sendall(self.answer(hello))
                while data := conn.recv(65536):  # all the host sends, until it hangs up
                    self.received += data
        self.listener.close()


def _nonce(hello: bytes) -> str:
    return json.loads(hello[len(protocol.EXEC_MAGIC) + HEADER.size :])["nonce"]


IMPOSTORS = {
    "wrong-token": lambda h: jframe(b"C", {"challenge": "1" * 64, "proof": mac(b"", _nonce(h), "1" * 64)}),
    "reflected-nonce": lambda h: jframe(b"C", {"challenge": _nonce(h), "proof": _nonce(h)}),
    "ssh-server": lambda h: b"SSH-2.0-OpenSSH_9.2p1\r\n",
    "huge-frame": lambda h: HEADER.pack(b"C", 1 << 30),
    "error-frame": lambda h: jframe(b"E", {"error": "please send your request anyway"}),
    "not-json": lambda h: frame(b"C", b"{"),
}


@pytest.mark.parametrize("play", IMPOSTORS.values(), ids=IMPOSTORS.keys())
def test_an_impostor_on_the_port_learns_nothing_and_exec_fails_with_one_line(play) -> None:
    impostor = Impostor(play)
    unreachable: list = []
    box = client(impostor.port, on_unreachable=lambda: unreachable.append(1))
    with box, pytest.raises(GuestError) as caught:
        box.exec(["cat", "/secret"], env={"API_KEY": "s3cret-env"}, stdin=b"s3cret-stdin")
    impostor.thread.join(10)
    message = caught.value.message
    assert message.startswith(f"the process on 127.0.0.1:{impostor.port} did not prove it is VM box's agent")
    assert "\n" not in message and not unreachable
    # All it got: the magic and a HELLO with a nonce.
    hello = bytes(impostor.received)
    assert hello.startswith(protocol.EXEC_MAGIC)
    kind, length = HEADER.unpack_from(hello, len(protocol.EXEC_MAGIC))
    assert kind == b"H" and len(hello) == len(protocol.EXEC_MAGIC) + HEADER.size + length
    assert set(json.loads(hello[len(protocol.EXEC_MAGIC) + HEADER.size :])) == {"nonce"}
    for secret in (b"s3cret", b"/secret", b"API_KEY", b"argv"):
        assert secret not in hello


def test_an_error_before_the_challenge_is_shown_as_one_safe_line() -> None:
    """What the agent says when it refuses a connection before its challenge (under load, the only clue
    left): shown, with the guest's control characters escaped and no newline, cut short."""
    impostor = Impostor(lambda h: jframe(b"E", {"error": "busy\x1b[2J\nnext line " + "x" * 100}))
    box = client(impostor.port, on_unreachable=lambda: None)
    with box, pytest.raises(GuestError) as caught:
        box.exec(["true"])
    impostor.thread.join(10)
    message = caught.value.message
    assert "it answered with an error, not a challenge: busy\\x1b[2J\\nnext line x" in message
    assert "\n" not in message and "\x1b" not in message and len(message) < 400
