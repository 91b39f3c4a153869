"""Ops on a real guest (docs/protocol.md, "Ops"): processes that outlive their connection, files as a
user and as root, and a directory watch, through `vm.ops`. The finer points, with no VM, are in
tests/unit/test_guest_ops_client.py; the boot path staying as fast is tests/unit/test_agent_boot_path.py.

Timings are printed (`-s`): start to first output, a 10 MB write and read."""

from __future__ import annotations

import os
import threading
import time

import pytest

from herovm.guest.ops import Dropped, End, OpError, Output


@pytest.fixture(scope="module")
def box(module_vm_factory, run_id):
    vm = module_vm_factory(f"it-{run_id}-ops")
    # E2B's convention: a user `user` with its home
    assert vm.exec("id user >/dev/null 2>&1 || useradd -m -s /bin/bash user").exit_code == 0
    yield vm
    vm.close()


def test_a_background_process_with_stdin_term_list_and_reconnect(box):
    ops = box.ops
    t = time.monotonic()
    h = ops.start_process("echo started; while read line; do echo got $line; done", stdin=True, tag="bg",
                          user="user")  # fmt: skip
    events = iter(h)
    assert next(events) == Output("stdout", b"started\n")
    print(f"\nstart to first output: {time.monotonic() - t:.3f} s")
    ops.send_stdin("bg", b"one\n")
    assert next(events) == Output("stdout", b"got one\n")
    h.close()  # the connection goes; the process stays
    (info,) = [p for p in ops.list_processes() if p.tag == "bg"]
    assert info.running and info.user == "user" and info.pid == h.pid and info.cwd == "/home/user"
    again = ops.connect("bg")
    ops.send_stdin(h.pid, b"two\n")
    ops.signal("bg", "TERM")
    assert list(again) == [Output("stdout", b"got two\n"), End(128 + 15, 15)]
    # a finished one: its output is still there, and its end
    done = ops.start_process(["sh", "-c", "echo out; echo err >&2; exit 7"], tag="done")
    done.close()
    time.sleep(1.5)
    replay = list(ops.connect("done", replay=True))
    assert Output("stdout", b"out\n") in replay and Output("stderr", b"err\n") in replay
    assert replay[-1] == End(7, None) and not any(isinstance(e, Dropped) for e in replay)
    assert box.exec(["sh", "-c", f"kill -0 {h.pid}"]).exit_code != 0


def test_files_as_user_and_as_root(box):
    ops = box.ops
    info = ops.write_file("notes/a.txt", b"hello", user="user")  # relative: in the user's home
    assert (info.path, info.owner, info.mode) == ("/home/user/notes/a.txt", "user", 0o644)
    assert ops.read_file("/home/user/notes/a.txt", user="user") == b"hello"
    with pytest.raises(OpError) as e:
        ops.read_file("/root/.bashrc", user="user")
    assert e.value.code == "permission"
    with pytest.raises(OpError) as e:
        ops.write_file("/root/x.txt", b"x", user="user")
    assert e.value.code == "permission"
    ops.write_file("/root/x.txt", b"x")
    assert ops.stat("/root/x.txt").owner == "root"
    with pytest.raises(OpError) as e:
        ops.list_dir("/root", user="user")
    assert e.value.code == "permission"


def test_a_10_mb_file_round_trip(box):
    ops = box.ops
    data = os.urandom(10 << 20)
    t = time.monotonic()
    ops.write_file("/home/user/big.bin", data, user="user")
    wrote = time.monotonic() - t
    t = time.monotonic()
    back = ops.read_file("/home/user/big.bin", user="user")
    read = time.monotonic() - t
    print(f"\n10 MB write {wrote:.2f} s, read {read:.2f} s")
    assert back == data
    assert box.exec(["sha256sum", "/home/user/big.bin"]).stdout.split()[0].decode() == (
        __import__("hashlib").sha256(data).hexdigest()
    )


def test_list_make_dir_move_remove(box):
    ops = box.ops
    assert ops.make_dir("/home/user/t/a/b", user="user") is True
    assert ops.make_dir("/home/user/t/a/b", user="user") is False
    ops.write_file("/home/user/t/a/b/f", b"1", user="user")
    ops.write_file("/home/user/t/top", b"2", user="user")
    assert {e.name for e in ops.list_dir("/home/user/t", depth=1, user="user")} == {"a", "top"}
    deep = {e.path for e in ops.list_dir("/home/user/t", depth=3, user="user")}
    assert deep == {"/home/user/t/a", "/home/user/t/top", "/home/user/t/a/b", "/home/user/t/a/b/f"}
    moved = ops.move("/home/user/t/top", "/home/user/t/a/top2", user="user")
    assert moved.name == "top2" and not ops.exists("/home/user/t/top", user="user")
    ops.remove("/home/user/t", recursive=True, user="user")
    assert not ops.exists("/home/user/t")


def test_a_watch_sees_create_write_and_remove(box):
    ops = box.ops
    ops.make_dir("/home/user/w", user="user")
    seen: list[tuple[str, str]] = []
    with ops.watch("/home/user/w", user="user") as w:
        reader = threading.Thread(target=lambda: seen.extend((e.type, e.name) for e in w), daemon=True)
        reader.start()
        ops.write_file("/home/user/w/f.txt", b"x", user="user")
        box.exec("echo more >> /home/user/w/f.txt")
        ops.remove("/home/user/w/f.txt", user="user")
        deadline = time.monotonic() + 10
        while ("remove", "f.txt") not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
    reader.join(10)
    assert ("create", "f.txt") in seen and ("write", "f.txt") in seen and ("remove", "f.txt") in seen
