"""Ops (docs/protocol.md, "Ops"): the host's GuestOps against the agent's real exec server, and against a
hostile agent that proves the token and then answers anything at all.

The real server runs in a child process (it reaps its own children there, as test_exec_protocol's does);
file ops as a user run as `nobody` in a directory made for it. The hostile agent runs in a thread here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from herovm import protocol
from herovm.errors import GuestError
from herovm.guest import ops as guest_ops
from herovm.guest.agent_exec import AgentExec
from herovm.guest.ops import Dropped, End, GuestOps, OpError, Output

AGENT = Path(__file__).resolve().parents[2] / "herovm/_data/agent"
TOKEN = "cd" * 32
HEADER = struct.Struct(">cI")

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


def _client(port: int) -> AgentExec:
    return AgentExec(
        target="box", token=TOKEN, connect=lambda t: socket.create_connection(("127.0.0.1", port), timeout=t)
    )


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentExec]:
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT_SERVER, str(AGENT), TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = _client(int(proc.stdout.readline()))
    try:
        yield client
    finally:
        client.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert "Traceback" not in proc.stderr.read()


@pytest.fixture
def ops(agent: AgentExec) -> GuestOps:
    return GuestOps(agent)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory anyone may write (as /tmp), for ops as `nobody`."""
    if os.geteuid() != 0:
        pytest.skip("ops as another user need root")
    path = Path(tempfile.mkdtemp(prefix="herovm-ops-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- processes ---------------------------------------------------------------------------------------


def test_a_process_streams_its_output_and_its_end(ops: GuestOps) -> None:
    started = time.monotonic()
    h = ops.start_process(["sh", "-c", 'echo "$A"; echo err >&2; exit 3'], env={"A": "x"})
    assert h.pid > 1 and time.monotonic() - started < 5
    end = h.wait()
    assert (end.exit_code, end.signal, end.stdout, end.stderr) == (3, None, b"x\n", b"err\n")


def test_stdin_tag_connect_list_and_signal(ops: GuestOps) -> None:
    h = ops.start_process("cat; echo done", stdin=True, tag="cat-1")
    ops.send_stdin("cat-1", b"hello\n")
    ops.send_stdin(h.pid, b"x" * 200_000)  # several requests
    ops.close_stdin(h.pid)
    end = h.wait()
    assert end.stdout == b"hello\n" + b"x" * 200_000 + b"done\n" and end.exit_code == 0

    sleeper = ops.start_process("echo up; exec sleep 300", tag="sleeper")
    assert next(iter(sleeper)) == Output("stdout", b"up\n")
    sleeper.close()  # stops following; the process runs on
    listed = {p.tag: p for p in ops.list_processes()}
    assert listed["sleeper"].running and listed["sleeper"].argv == [
        "/bin/bash",
        "-c",
        "echo up; exec sleep 300",
    ]
    assert listed["cat-1"].running is False and listed["cat-1"].exit_code == 0
    again = ops.connect("sleeper", replay=True)
    ops.signal("sleeper", "TERM")
    assert list(again) == [Output("stdout", b"up\n"), End(143, 15)]
    with pytest.raises(OpError) as e:
        ops.signal("sleeper", "KILL")
    assert e.value.code == "not_found"
    with pytest.raises(OpError) as e:
        ops.send_stdin("no-such-tag", b"x")
    assert e.value.code == "not_found"


def test_a_running_tag_is_taken_and_bad_requests_are_invalid(ops: GuestOps) -> None:
    h = ops.start_process("exec sleep 300", tag="once")
    try:
        with pytest.raises(OpError) as e:
            ops.start_process("true", tag="once")
        assert e.value.code == "exists"
        with pytest.raises(OpError) as e:
            ops.start_process(["true"], user="no-such-user")
        assert e.value.code == "invalid" and "no such user" in e.value.message
        with pytest.raises(OpError) as e:
            ops.send_stdin(h.pid, b"x")
        assert e.value.code == "invalid" and "without stdin" in e.value.message
        with pytest.raises(OpError) as e:
            ops.start_process(["/no/such/program"])
        assert e.value.code == "not_found"
    finally:
        ops.signal(h.pid, "KILL")


def test_output_beyond_the_buffer_is_dropped_and_said(ops: GuestOps) -> None:
    h = ops.start_process("head -c 3000000 /dev/zero; sleep 0.5; echo tail", tag="big")
    h.close()
    time.sleep(2)
    events = list(ops.connect("big", replay=True))
    assert isinstance(events[-1], End) and events[-1].exit_code == 0
    got = sum(len(e.data) for e in events if isinstance(e, Output))
    assert got <= protocol.PROCESS_OUTPUT_BUFFER and events[-2] == Output("stdout", b"tail\n")
    # replay starts at the oldest output still held: nothing was sent to this follower, nothing dropped for it
    assert not any(isinstance(e, Dropped) for e in events)


def test_a_process_runs_as_its_user(ops: GuestOps) -> None:
    end = ops.start_process(["sh", "-c", "id -un; echo $HOME"], user="nobody").wait()
    assert end.stdout.split(b"\n")[0] == b"nobody"


# --- files -------------------------------------------------------------------------------------------


def test_files_round_trip_as_root_and_as_a_user(ops: GuestOps, shared: Path) -> None:
    data = os.urandom(3 << 20)
    info = ops.write_file(str(shared / "a/b/big.bin"), data)
    assert (info.size, info.owner, info.type) == (len(data), "root", "file")
    assert ops.read_file(str(shared / "a/b/big.bin")) == data
    assert ops.read_file(str(shared / "a/b/big.bin"), offset=10, limit=5) == data[10:15]
    mine = ops.write_file(str(shared / "mine.txt"), b"hi", user="nobody")
    assert mine.owner == "nobody" and (shared / "mine.txt").stat().st_uid == 65534
    root_only = shared / "root-only"
    root_only.mkdir(mode=0o700)
    for call in (
        lambda: ops.write_file(str(root_only / "x"), b"x", user="nobody"),
        lambda: ops.read_file(str(root_only / "x"), user="nobody"),
        lambda: ops.list_dir(str(root_only), user="nobody"),
        lambda: ops.make_dir(str(root_only / "d"), user="nobody"),
    ):
        with pytest.raises(OpError) as e:
            call()
        assert e.value.code == "permission", e.value
    assert not list(root_only.iterdir())  # nothing half-made, no temporary file left


def test_stat_list_mkdir_move_remove(ops: GuestOps, shared: Path) -> None:
    (shared / "d1/d2/d3").mkdir(parents=True)
    (shared / "d1/f").write_text("x")
    (shared / "d1/link").symlink_to("f")
    names = lambda depth: sorted(e.name for e in ops.list_dir(str(shared / "d1"), depth=depth))  # noqa: E731
    assert names(1) == ["d2", "f", "link"] and names(2) == ["d2", "d3", "f", "link"]
    link = ops.stat(str(shared / "d1/link"))
    assert link.type == "symlink" and link.symlink_target == "f"
    assert ops.make_dir(str(shared / "n/m")) is True and ops.make_dir(str(shared / "n/m")) is False
    moved = ops.move(str(shared / "d1/f"), str(shared / "elsewhere/g"))
    assert moved.path == str(shared / "elsewhere/g") and (shared / "elsewhere/g").read_text() == "x"
    with pytest.raises(OpError) as e:
        ops.remove(str(shared / "d1"))
    assert e.value.code == "is_a_directory"
    ops.remove(str(shared / "d1"), recursive=True)
    assert not ops.exists(str(shared / "d1")) and ops.exists(str(shared / "n"))
    for call, code in (
        (lambda: ops.stat(str(shared / "nope")), "not_found"),
        (lambda: ops.list_dir(str(shared / "elsewhere/g")), "not_a_directory"),
        (lambda: ops.read_file(str(shared / "n")), "is_a_directory"),
        (lambda: ops.write_file(str(shared / "n"), b""), "is_a_directory"),
        (lambda: ops.make_dir(str(shared / "elsewhere/g")), "exists"),
    ):
        with pytest.raises(OpError) as e:
            call()
        assert e.value.code == code, e.value


def test_a_watch_sees_create_write_and_remove(ops: GuestOps, shared: Path) -> None:
    (shared / "sub").mkdir()
    seen: list[tuple[str, str]] = []
    with ops.watch(str(shared), recursive=True) as w:
        ops.write_file(str(shared / "sub/new.txt"), b"1")
        with open(shared / "plain.txt", "w") as f:
            f.write("x")
        os.unlink(shared / "plain.txt")
        threading.Timer(1.0, w.close).start()
        seen = [(e.type, e.name) for e in w]
    assert ("create", "sub/new.txt") in seen and ("write", "sub/new.txt") in seen
    assert ("write", "plain.txt") in seen and ("remove", "plain.txt") in seen
    assert not any(".herovm-" in name for _, name in seen)


def test_connections_are_reused_after_ops_and_failures(agent: AgentExec, ops: GuestOps, shared: Path) -> None:
    agent.close()
    for _ in range(3):
        ops.stat(str(shared))
        with pytest.raises(OpError):
            ops.stat(str(shared / "nope"))
        with pytest.raises(OpError):
            ops.write_file(str(shared / "nope/x"), b"y" * 1_000_000, user="no-such-user")
    assert len(agent._idle) == 1


# --- a hostile agent -------------------------------------------------------------------------------------


class Hostile:
    """An agent that proves the token, reads the request, then sends `reply` (raw bytes) and waits."""

    def __init__(self, reply: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _read(self, conn: socket.socket) -> tuple[bytes, bytes]:
        kind, length = HEADER.unpack(conn.recv(HEADER.size, socket.MSG_WAITALL))
        return kind, conn.recv(length, socket.MSG_WAITALL) if length else b""

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(len(protocol.EXEC_MAGIC), socket.MSG_WAITALL)
            nonce = json.loads(self._read(conn)[1])["nonce"]
            challenge = os.urandom(32).hex()
            proof = protocol.agent_proof(TOKEN.encode(), nonce, challenge)
            conn.sendall(protocol.frame(b"C", json.dumps({"challenge": challenge, "proof": proof}).encode()))
            self._read(conn)  # AUTH
            self._read(conn)  # the request
            conn.sendall(self.reply)
            time.sleep(3)


def jf(kind: bytes, obj: object) -> bytes:
    return protocol.frame(kind, json.dumps(obj).encode())


ENTRY = {"name": "f", "path": "/f", "type": "file", "size": 1, "mode": 0o644, "permissions": "-rw-r--r--",
         "owner": "root", "group": "root", "mtime": 1.0, "symlink_target": None}  # fmt: skip


@pytest.mark.parametrize(
    ("call", "reply", "why"),
    [
        ("stat", HEADER.pack(b"O", 400 << 20), "frame of 419430400 bytes"),
        ("stat", HEADER.pack(b"Z", 0), "b'Z' frame"),
        ("stat", jf(b"O", {**ENTRY, "type": "fifo"}), "of type 'fifo'"),
        ("stat", jf(b"O", {**ENTRY, "size": -1}), "size"),
        ("stat", jf(b"O", {**ENTRY, "mtime": "now"}), "mtime"),
        ("stat", jf(b"O", {**ENTRY, "mode": 0o77777}), "mode"),
        ("stat", jf(b"O", {**ENTRY, "owner": "x" * 5000}), "owner"),
        ("stat", protocol.frame(b"O", b"[" * 300_000), "too many objects"),
        ("stat", protocol.frame(b"O", b"[" * 50_000 + b"]" * 50_000), "not JSON"),
        ("stat", jf(b"F", {"error": "teapot", "message": "x"}), "failure of kind 'teapot'"),
        ("stat", jf(b"V", {"entries": []}), "where a result was due"),
        ("read", protocol.frame(b"1", b"x" * 20), "more than the 10 bytes"),
        ("read", protocol.frame(b"1", b"x") + jf(b"O", {"size": 5}), "does not add up"),
        ("list", jf(b"V", {"entries": [ENTRY] * 5001}) * 2, "over its bounds"),
        ("list", jf(b"V", {"entries": [ENTRY] * 10_001}), "frame of"),
        ("procs", jf(b"O", {"processes": [{}] * 65}), "MAX_PROCESSES"),
        ("start", jf(b"O", {"event": "end"}), "where a process's start was due"),
        ("start", jf(b"V", {"event": "start", "pid": -4}), "pid"),
        (
            "watch",
            jf(b"V", {"event": "watching", "path": "/w", "dirs": 1, "complete": True})
            + jf(b"V", {"events": [{"type": "create", "name": "../../etc/passwd"}]}),
            "outside the directory",
        ),
    ],
)
def test_a_hostile_reply_fails_the_call_and_drops_the_connection(call: str, reply: bytes, why: str) -> None:
    server = Hostile(reply)
    agent = _client(server.port)
    ops = GuestOps(agent)
    calls = {
        "stat": lambda: ops.stat("/f"),
        "read": lambda: ops.read_file("/f", limit=10),
        "list": lambda: ops.list_dir("/"),
        "procs": lambda: ops.list_processes(),
        "start": lambda: list(ops.start_process(["x"])),
        "watch": lambda: list(ops.watch("/w")),
    }
    with pytest.raises(GuestError) as e:
        calls[call]()
    assert not isinstance(e.value, OpError) and why in str(e.value)
    assert not agent._idle  # never reused


def test_a_failure_frame_is_one_line_of_the_closed_set() -> None:
    server = Hostile(jf(b"F", {"error": "permission", "message": "no\nway " + "x" * 3000}))
    with pytest.raises(OpError) as e:
        GuestOps(_client(server.port)).stat("/f")
    assert e.value.code == "permission" and "\n" not in e.value.message and len(e.value.message) <= 300


def test_host_side_arguments_are_checked_before_anything_is_sent() -> None:
    ops = GuestOps(_client(1))  # nothing listens there: a check that passed would fail to connect
    for bad in (
        lambda: ops.signal(1, "NOPE"),
        lambda: ops.signal(1, 99),
        lambda: ops.stat("a\0b"),
        lambda: ops.stat("x" * 5000),
        lambda: ops.write_file("/f", b"", mode=0o10000),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError):
        ops.close_stdin(True)  # type: ignore[arg-type]
    assert guest_ops.STDIN_SLICE * 4 // 3 < protocol.MAX_REQUEST
