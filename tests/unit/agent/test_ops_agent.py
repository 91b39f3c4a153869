"""The agent's ops pieces in this process (herovm_agent/ops*.py): the request check, the per-thread
filesystem credentials, the output buffer of a process and the inotify events' mapping. What needs the
reaper (processes as PID 1) is in tests/unit/test_guest_ops_client.py, with the agent's server in a child."""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from herovm import protocol

from .conftest import AGENT

sys.path.insert(0, str(AGENT))
from herovm_agent import ops, ops_procs, ops_watch  # noqa: E402


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"op": "nope"}, "unknown op 'nope'"),
        ({"op": "file.stat"}, "file.stat: path is missing"),
        ({"op": "file.stat", "path": "/x", "extra": 1}, "file.stat: unknown field 'extra'"),
        ({"op": "file.stat", "path": 5}, "file.stat: path must be string"),
        ({"op": "file.stat", "path": "/a\0b"}, "a NUL character in path"),
        ({"op": "file.stat", "path": "/" + "x" * 5000}, "path must be a path of 1 to 4096 bytes"),
        ({"op": "file.stat", "path": "/x", "user": "-rf"}, "is not a user name"),
        ({"op": "file.list", "path": "/x", "depth": 0}, "depth must be from 1 to 64"),
        ({"op": "file.list", "path": "/x", "depth": True}, "depth must be integer >= 0"),
        ({"op": "proc.start"}, "exactly one of argv and shell"),
        ({"op": "proc.start", "argv": []}, "argv must be a list of strings"),
        ({"op": "proc.start", "argv": ["x"], "env": {"A=B": "c"}}, "cannot be an environment variable"),
        ({"op": "proc.start", "shell": "x", "tag": "t" * 300}, "tag must be 1 to 256"),
        ({"op": "proc.signal", "pid": 1, "tag": "t", "signal": "TERM"}, "exactly one of pid and tag"),
        ({"op": "proc.signal", "pid": 1, "signal": "SEGV"}, "signal must be one of"),
        ({"op": "proc.input", "pid": 1, "data": "!!"}, "data must be base64"),
        ({"op": "file.write", "path": "/x", "mode": 0o70000}, "mode must be from 0 to 0o7777"),
    ],
)
def test_a_wrong_request_is_invalid_with_a_one_line_reason(request_: dict, message: str) -> None:
    with pytest.raises(ops.OpFailure) as e:
        ops.parse(dict(request_))
    assert e.value.code == protocol.OpError.INVALID and message in e.value.message
    assert "\n" not in e.value.message


def test_errno_maps_onto_the_closed_set() -> None:
    import errno

    for number, code in [
        (errno.ENOENT, "not_found"),
        (errno.EEXIST, "exists"),
        (errno.EACCES, "permission"),
        (errno.ENOTDIR, "not_a_directory"),
        (errno.EISDIR, "is_a_directory"),
        (errno.EIO, "other"),
    ]:
        failure = ops.os_failure(OSError(number, os.strerror(number)), "/p")
        assert (
            failure.code == code and failure.code in protocol.OpError.ALL and failure.message.endswith(": /p")
        )


@pytest.mark.skipif(os.geteuid() != 0, reason="changing credentials needs root")
def test_as_a_user_only_this_thread_acts_as_it_and_root_comes_back() -> None:
    """nobody may not write in a 0755 root directory: the kernel says so in the thread that acts as
    nobody, while another thread of the process (PID 1's other work) stays root; then root again."""
    base = Path(tempfile.mkdtemp())
    base.chmod(0o755)
    out: dict = {}
    inside = threading.Event()
    leave = threading.Event()

    def as_nobody() -> None:
        with ops.AsUser(ops.User("nobody")):
            try:
                (base / "x").write_text("x")
            except PermissionError:
                out["denied"] = True
            inside.set()
            leave.wait(5)
        (base / "back").write_text("root again")

    t = threading.Thread(target=as_nobody)
    t.start()
    inside.wait(5)
    (base / "other-thread").write_text("still root")  # this thread was never nobody
    leave.set()
    t.join()
    assert out == {"denied": True}
    assert sorted(p.name for p in base.iterdir()) == ["back", "other-thread"]
    assert (base / "back").stat().st_uid == 0
    # a file made as the user is the user's
    shared = Path(tempfile.mkdtemp())
    shared.chmod(0o1777)

    def make() -> None:
        with ops.AsUser(ops.User("nobody")):
            (shared / "mine").write_text("x")

    t = threading.Thread(target=make)
    t.start()
    t.join()
    assert (shared / "mine").stat().st_uid == ops.User("nobody").uid


class FakePopen:
    pid = 4242
    stdin = None


def test_the_output_buffer_drops_the_oldest_and_says_how_much() -> None:
    proc = ops_procs.Proc(FakePopen(), {}, ops.User("root"), ["x"], "/")  # type: ignore[arg-type]
    chunk = b"x" * 60_000
    for _ in range(40):  # 2.4 MB through a 1 MiB buffer
        proc.append(b"1", chunk)
    assert proc.size <= protocol.PROCESS_OUTPUT_BUFFER
    assert proc.start_offset + sum(len(d) for _, d in proc.chunks) == proc.total == 40 * 60_000
    many = ops_procs.Proc(FakePopen(), {}, ops.User("root"), ["x"], "/")  # type: ignore[arg-type]
    for _ in range(100_000):  # tiny writes are bounded by their count too
        many.append(b"2", b"y")
    assert len(many.chunks) <= protocol.PROCESS_OUTPUT_BUFFER // ops_procs.CHUNK_OVERHEAD


def _event(wd: int, mask: int, name: bytes = b"", cookie: int = 0) -> bytes:
    padded = name + b"\0" * (16 - len(name) % 16) if name else b""
    return struct.pack("iIII", wd, mask, cookie, len(padded)) + padded


def test_inotify_events_map_onto_the_watch_vocabulary() -> None:
    watch = ops_watch.Watch.__new__(ops_watch.Watch)
    watch.dirs, watch.recursive, watch.temps, watch.full = {1: "", 2: "sub"}, False, {}, False
    data = b"".join(
        [
            _event(1, ops_watch.IN_CREATE, b"a"),
            _event(2, ops_watch.IN_MODIFY, b"b"),
            _event(1, ops_watch.IN_DELETE, b"a"),
            _event(1, ops_watch.IN_MOVED_FROM, b"c", cookie=7),
            _event(1, ops_watch.IN_ATTRIB, b"d"),
            _event(1, ops_watch.IN_CREATE, b".t.herovm-0123456789ab"),  # a write's temporary file: hidden
            _event(1, ops_watch.IN_MOVED_FROM, b".t.herovm-0123456789ab", cookie=9),
            _event(1, ops_watch.IN_MOVED_TO, b"t", cookie=9),  # ... renamed onto t
            _event(99, ops_watch.IN_CREATE, b"unknown-wd"),
            _event(-1, ops_watch.IN_Q_OVERFLOW),
            _event(2, ops_watch.IN_IGNORED),
        ]
    )
    events, overflow, gone = watch._parse(data)
    assert [(e["type"], e["name"]) for e in events] == [
        ("create", "a"),
        ("write", "sub/b"),
        ("remove", "a"),
        ("rename", "c"),
        ("chmod", "d"),
        ("create", "t"),
        ("write", "t"),
    ]
    assert overflow and not gone and watch.dirs == {1: ""}
    assert watch._parse(_event(1, ops_watch.IN_IGNORED)) == ([], False, True)  # the root went away
